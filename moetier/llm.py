"""``LLM``: the offline Python API, shaped like vLLM's."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Iterator, Optional, Sequence as Seq, Union

import torch

from .config import EngineConfig
from .errors import RequestError
from .outputs import RequestOutput
from .runtime.engine import Engine
from .runtime.sampling import SamplingParams
from .tokenizer import chat_prompt, eos_ids, load_tokenizer, require
from .units import parse_size
from .weights.loader import load_model

PromptType = Union[str, dict, list[int]]
MODES = ("auto", "latency", "throughput")
THROUGHPUT_MIN_SEQS = 64  # mode="auto": this many sequences or more go to the throughput runner

log = logging.getLogger(__name__)


def resolve_model_path(model: str | Path) -> Path:
    """A checkpoint folder, or ``"demo"`` / ``"demo-small"`` for the models that ship with the package."""
    if str(model) in ("demo", "demo-small"):
        from .demo import demo_path

        return demo_path(str(model))
    return Path(model).expanduser()


class LLM:
    """Load a MoE checkpoint and generate from it.

    >>> llm = LLM("path/to/checkpoint", device="cpu", dtype="float32")
    >>> out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=32, temperature=0))
    >>> out[0].outputs[0].text
    """

    def __init__(self, model: str | Path, device: str = "cpu", dtype: Optional[str] = None,
                 max_model_len: Optional[int] = None, max_num_seqs: int = 64, max_batch_tokens: int = 8192,
                 seed: Optional[int] = None, *, verify: bool | str | None = "first-read",
                 device_memory: Optional[str | int] = None, host_memory: Optional[str | int] = None,
                 offload_dir: Optional[str | Path] = None, cache_policy: str = "activation",
                 prefetch: str = "lookahead", expert_slots: Optional[int] = None,
                 quantization: Optional[str] = None, quant_group_size: Optional[int] = None,
                 quant_dense: Optional[str] = None):
        """Load ``model`` (a checkpoint folder, a packed folder, or ``"demo"``).

        ``verify`` (packed folders; see :mod:`moetier.weights.checksum`): ``"first-read"`` (the
        default) checks each region's CRC-32 the first time it is read from disk (dense weights
        while loading, an offloaded expert on its first read into a slot); ``"full"`` (``True``)
        reads and checks every region, offloaded experts included, before the model is ready and
        every expert read after that; ``"off"`` (``False``) checks sizes only. A mismatch is a
        CheckpointError naming the file and the tensor (for an expert, its layer and number).

        Offloading (any of ``device_memory``, ``expert_slots``, or ``host_memory`` on the CPU):
        the dense weights stay on ``device`` and the routed experts are served from the packed
        checkpoint (an HF folder is converted on first use into ``offload_dir``) through an
        expert cache that gets what ``device_memory`` leaves (e.g. ``"6GiB"``; ``"auto"`` on the
        CPU: the memory cgroup's limit, else the available RAM, less a margin for the process
        itself, see :mod:`moetier.ram`). On a GPU,
        ``host_memory`` (e.g. ``"32GiB"``) adds a pinned host tier between disk and device.
        ``cache_policy``: ``lru``, ``lfu`` or ``activation``; ``prefetch``: ``lookahead`` (next
        layer's router; the default, best in ``bench/latency.py``), ``trace`` (match the trace
        library) or ``none``. Outputs are
        bit-identical to the all-resident run whatever the budget and policy.

        ``quantization``: ``"int8"`` or ``"int4"`` routed experts, quantized on load (offloaded:
        into the first-use packed copy in ``offload_dir``), ``quant_group_size`` inputs per scale
        (int8: per-channel by default; int4: 32, or 64, 128, 256); ``quant_dense``: ``"int8"``
        attention, LM head and dense MLPs, or ``"none"`` (routers, norms, embeddings stay 16-bit).
        A packed folder converted with ``--quant`` loads as it is (``self.quantization`` says how).
        MXFP4 experts (gpt-oss's hub checkpoints) are kept exactly, as int8 groups of 32 with
        power-of-two scales, unless ``quantization`` asks for another kind (``"none"``: dequantized).
        """
        from .kernels.quant import parse_scheme
        from .weights.checksum import parse_verify

        from .device_check import check_device

        check_device(device)  # device="cuda" on a CPU-only torch: one clear line, before anything loads
        verify = parse_verify(verify)
        quant = (parse_scheme(quantization, quant_group_size), parse_scheme(quant_dense))  # bad values: fail first
        self.config = EngineConfig(str(model), device, dtype, max_model_len, max_num_seqs, max_batch_tokens, seed)
        if seed is not None:
            torch.manual_seed(seed)
        self.path = resolve_model_path(model)
        if quantization is None:  # experts stored quantized (gpt-oss's MXFP4) stay so, exactly (weights/views.py)
            from .weights.views import stored_scheme

            quant = (stored_scheme(self.path), quant[1])
        if device == "cpu" and device_memory is None:
            device_memory = host_memory  # on the CPU the host is the device: one RAM budget
        from .ram import resolve_budget

        device_memory = resolve_budget(device_memory, device)  # bytes; "auto" read from the cgroup / RAM
        offload = None
        self.memory: dict = {}
        # the RAM (CPU) / device budget the throughput planner splits between expert slots and KV
        self._budget = parse_size(device_memory) if device_memory is not None else None
        self.machine_profile = None  # MachineProfile: measured (or read from its cache) on first throughput run
        self.last_run: Optional[dict] = None  # plan and measurements of the last throughput run
        self._planner_inputs: Optional[dict] = None
        if device_memory is not None or expert_slots is not None:
            from .experts.setup import attach_offload, ensure_packed
            from .weights.loader import parse_dtype
            from .weights.packed import PackedCheckpoint

            want = parse_dtype(dtype)
            packed_path = ensure_packed(self.path, want, Path(offload_dir) if offload_dir else None, quant=quant)
            self.model, self.args, raw_config = load_model(packed_path, device, want, verify=verify, experts=False)
            self._packed = PackedCheckpoint(packed_path)
            if verify == "full":  # every expert once now, not only those a request happens to route to
                try:
                    self._packed.verify(regions=list(self._packed.experts.values()))
                except BaseException:
                    self._packed.close()
                    raise
            kv_reserve = self._kv_reserve(max_model_len)
            library = Path(offload_dir) / "traces.npz" if offload_dir else packed_path / "traces.npz"
            offload, self.memory = attach_offload(
                self.model, self._packed, torch.device(device), parse_size(device_memory) if device_memory else None,
                kv_reserve, policy=cache_policy, prefetch=prefetch, library_path=library, expert_slots=expert_slots,
                host_memory=parse_size(host_memory) if host_memory is not None and device != "cpu" else None,
                verify=verify)
        else:
            from .kernels.quant import QuantError

            exact = quant[0] if quant[0] is not None and quant[0].exact else None
            try:  # MXFP4 experts quantized as they are read: never all dequantized at once
                self.model, self.args, raw_config = load_model(self.path, device, dtype, verify=verify,
                                                               experts_scheme=exact)
                quant = (None, quant[1]) if exact is not None else quant
            except QuantError:  # a value int8 cannot hold: loaded dequantized, then as quantize_on_load says
                self.model, self.args, raw_config = load_model(self.path, device, dtype, verify=verify)
            from .models.quantize import quantize_on_load

            quantize_on_load(self.model, self.path, *quant)
            self.memory = {"device_bytes": _tensor_bytes(self.model) + self._kv_reserve(max_model_len)}
        from .models.quantize import describe

        self.quantization = describe(self.model)  # None: 16/32-bit weights
        self.tokenizer = load_tokenizer(self.path)
        gen_path = self.path / "generation_config.json"
        self.generation_config = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        limit = self.args.max_position_embeddings
        if max_model_len is not None and max_model_len > limit:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {limit}")
        if torch.device(device).type == "cpu":  # bf16 weights in oneDNN's layout: same results, faster
            from .models.prepack import prepack

            prepack(self.model)
            from .models.fused import install

            install(self.model)
        self.engine = Engine(self.model, self.tokenizer, eos_ids(self.generation_config, raw_config, self.tokenizer),
                             max_model_len or limit, max_num_seqs, max_batch_tokens, offload=offload)

    def _kv_reserve(self, max_model_len: Optional[int]) -> int:
        """KV bytes set aside in the memory accounting: one sequence of up to 2048 tokens (its KV layers'
        keys and values, its linear-attention layers' fixed-size states)."""
        from .runtime.cache_spec import seq_bytes

        run_dtype = next(p for p in self.model.parameters() if p.device.type != "meta").dtype
        return seq_bytes(self.args, run_dtype, min(max_model_len or self.args.max_position_embeddings, 2048))

    def footprint(self) -> int:
        """Bytes this model holds on its device: weights (or dense weights + expert slots) and the KV reserve."""
        return self.memory["device_bytes"]

    def stats(self) -> dict:
        """Expert-cache counters: hits, misses, prefetch hits, bytes moved per tier, stall time.

        Empty when every expert is resident.
        """
        return self.engine.offload.stats() if self.engine.offload is not None else {}

    def close(self) -> None:
        """Stop the expert loaders, save the trace library and close the checkpoint files."""
        if self.engine.offload is not None:
            self.engine.offload.close()
            self._packed.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def get_tokenizer(self):
        return self.tokenizer

    def _prompt_ids(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            return prompt, require(self.tokenizer, "a text prompt").encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return self._prompt_ids(prompt["prompt"])
            raise RequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise RequestError(f"cannot use {type(prompt).__name__} as a prompt; pass a str or {{'prompt_token_ids': [...]}}")

    def generate(self, prompts: Union[PromptType, Seq[PromptType]],
                 sampling_params: Union[SamplingParams, Seq[SamplingParams], None] = None,
                 use_tqdm: bool = True, mode: str = "auto", plan=None) -> list[RequestOutput]:
        """Generate completions for every prompt; returns one RequestOutput per prompt, in order.

        ``mode``: ``"latency"`` runs the prompts through the engine as they come (streaming
        order, small batches); ``"throughput"`` plans big passes over all of them (see
        :meth:`plan`); ``"auto"`` picks throughput for 64 sequences or more. Outputs are the
        same tokens either way. ``plan``: run in throughput mode with this plan (e.g. one from
        :meth:`plan`, adjusted) instead of the planner's. All prompts are checked before any
        runs, so a bad one fails the call without doing half the work.
        """
        encoded, params_list = self._prepare(prompts, sampling_params)
        if plan is not None or self._pick_mode(mode, params_list) == "throughput":
            outputs: list = [None] * len(encoded)
            for i, out in self._run_throughput(encoded, params_list, use_tqdm, plan):
                outputs[i] = out
            return outputs
        return self._run(encoded, params_list, use_tqdm)

    def iter_generate(self, prompts: Seq[PromptType],
                      sampling_params: Union[SamplingParams, Seq[SamplingParams], None] = None,
                      mode: str = "throughput", use_tqdm: bool = False, plan=None
                      ) -> Iterator[tuple[int, RequestOutput]]:
        """Like :meth:`generate`, but yield ``(index, output)`` for each request as soon as it finishes."""
        encoded, params_list = self._prepare(prompts, sampling_params)
        if plan is not None or self._pick_mode(mode, params_list) == "throughput":
            yield from self._run_throughput(encoded, params_list, use_tqdm, plan)
            return
        for i, out in enumerate(self._run(encoded, params_list, use_tqdm)):
            yield i, out

    def plan(self, prompts: Seq[PromptType], sampling_params: Union[SamplingParams, Seq[SamplingParams], None] = None):
        """The throughput plan for these prompts (:class:`~moetier.runtime.planner.Plan`;
        ``plan(...).explain()`` prints it with its predicted tokens/s)."""
        encoded, params_list = self._prepare(prompts, sampling_params)
        return self._plan_for(self._sequences(encoded, params_list)[1])

    def _prepare(self, prompts, sampling_params) -> tuple[list, list[SamplingParams]]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        encoded = [self._prompt_ids(p) for p in prompts]
        for _, ids in encoded:
            self.engine.check_prompt(ids)
        return encoded, params_list

    @staticmethod
    def _pick_mode(mode: str, params_list: list[SamplingParams]) -> str:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode == "auto":
            return "throughput" if sum(p.n for p in params_list) >= THROUGHPUT_MIN_SEQS else "latency"
        return mode

    def chat(self, messages: Union[list[dict], list[list[dict]]],
             sampling_params: Union[SamplingParams, Seq[SamplingParams], None] = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True, mode: str = "auto") -> list[RequestOutput]:
        """Generate replies to one conversation (a list of messages) or to several (``mode``: as in generate)."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": chat_prompt(self.tokenizer, c, add_generation_prompt)} for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm, mode=mode)

    def stream(self, prompt: PromptType, sampling_params: Optional[SamplingParams] = None) -> Iterator[str]:
        """Yield the text of one completion piece by piece as it is generated."""
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError("stream() makes one completion; use n=1")
        _, ids = self._prompt_ids(prompt)
        rid = uuid.uuid4().hex
        self.engine.add_request(rid, ids, params)
        try:
            while self.engine.has_unfinished():
                for ev in self.engine.step():
                    if ev.seq.request_id == rid and ev.delta:
                        yield ev.delta
        finally:
            self.engine.abort(rid)

    def next_token_logprobs(self, token_ids: list[int], start: int = 0) -> torch.Tensor:
        """The model's next-token log-softmax after each prefix of ``token_ids``.

        Row ``i`` of the ``[len(token_ids) - 1 - start, vocab]`` float32 result is
        ``log p(. | token_ids[:start + i + 1])``: the full distributions behind
        ``SamplingParams(prompt_logprobs=k)``, computed by the same step (``moetier eval --kl-base``
        compares them between two models). ``start``: skip the first positions' rows (not kept).
        """
        return self.next_token_logprobs_batch([token_ids], start)[0]

    def next_token_logprobs_batch(self, prompts: list[list[int]], start: int = 0) -> list[torch.Tensor]:
        """:meth:`next_token_logprobs` of several prompts, run together (one expert read serves all)."""
        from .runtime.prompt_logprobs import FullDistributions

        prompts = [[int(t) for t in ids] for ids in prompts]
        for ids in prompts:  # all checked before anything is allocated
            self.engine.check_prompt(ids)
            if not 0 <= start < len(ids):
                raise RequestError(f"start must be in [0, {len(ids) - 1}] for {len(ids)} tokens, got {start}")
        rid = f"logprobs-{uuid.uuid4().hex}"
        seqs, sinks = [], []
        try:
            for i, ids in enumerate(prompts):
                seq = self.engine.add_request(f"{rid}-{i}", ids,
                                              SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))[0]
                seq.prompt_sink = FullDistributions(len(ids), self.args.vocab_size, start)
                seqs.append(seq)
                sinks.append(seq.prompt_sink)
            while not all(s.finished for s in seqs):
                self.engine.step()
        finally:
            for i in range(len(seqs)):
                self.engine.abort(f"{rid}-{i}")
        return [sink.rows for sink in sinks]

    def _run(self, encoded, params_list, use_tqdm: bool) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for i, ((text, ids), params) in enumerate(zip(encoded, params_list)):
            seqs = self.engine.add_request(str(i), ids, params)
            outputs.append(RequestOutput(str(i), text, ids, [s.out for s in seqs], _prompt_logprobs(seqs)))
        bar = _progress(len(outputs), use_tqdm)
        done_tokens = 0
        try:
            while self.engine.has_unfinished():
                events = self.engine.step()
                done_tokens += len(events)
                if bar is not None:
                    finished = sum(o.finished for o in outputs)
                    bar.update(finished - bar.n)
                    bar.set_postfix_str(f"{done_tokens / max(bar.format_dict['elapsed'], 1e-9):.1f} tok/s", refresh=False)
        finally:
            for o in outputs:
                self.engine.abort(o.request_id)
            if bar is not None:
                bar.close()
        return outputs


    # -- throughput mode ----------------------------------------------------------------------------

    def _sequences(self, encoded, params_list) -> tuple[list[RequestOutput], list]:
        from .runtime.sequence import make_sequences

        outputs, seqs = [], []
        for i, ((text, ids), params) in enumerate(zip(encoded, params_list)):
            ss = make_sequences(str(i), ids, params, self.tokenizer, self.engine.max_model_len)
            outputs.append(RequestOutput(str(i), text, ids, [s.out for s in ss], _prompt_logprobs(ss)))
            seqs.extend(ss)
        return outputs, seqs

    def _planner(self):
        """A planner for this model, machine and memory budget (probes run once per LLM)."""
        from .runtime.machine import MachineProfile, measure_cpu_share, measure_row_cost, measure_transfer
        from .runtime.planner import ModelCost, Planner, default_kv_budget

        e = self.engine
        if self.machine_profile is None:
            prof = MachineProfile.load_or_measure(e.dtype, device=e.device)
            if prof.wide_rows:  # the cached rates, with the threshold this process's matmuls use
                from .models.prepack import NEVER, upcast_rows

                live = upcast_rows(torch.get_num_threads())
                prof = dataclasses.replace(prof, wide_rows=0 if live == NEVER else live)
            self.machine_profile = prof
        store = e.offload.store if e.offload is not None else None
        if self._planner_inputs is None:
            inputs = {"row_s": measure_row_cost(self.tokenizer, self.args.vocab_size), "read_bps": None,
                      "overlap": 1.0 if e.device.type == "cuda" else 0.0, "transfer": None}
            if store is not None:
                layers, experts = e.offload.tracer.shape
                transfer = measure_transfer(store.source, layers, experts, e.dtype)
                inputs["read_bps"], inputs["transfer"] = transfer.read_bps, transfer
                if e.device.type != "cuda":  # on a GPU the copy engine overlaps; on the CPU it is measured
                    inputs["overlap"] = transfer.overlap
            self._planner_inputs = inputs
        cost = ModelCost.of(self.model, store.layout if store is not None else None)
        cost.row_s = self._planner_inputs["row_s"]
        budget = self._budget
        kw: dict = {}
        if store is not None:
            layers, experts = e.offload.tracer.shape
            # with a budget the planner sizes the pool; with only expert_slots it keeps the user's count
            kw = dict(slot_bytes=store.slot_bytes, min_slots=experts,
                      max_slots=layers * experts if budget is not None else self.memory["expert_slots"],
                      read_bps=self._planner_inputs["read_bps"])
        load = _machine_load() if e.device.type == "cpu" else None
        # the CPU this process gets, per plan (the load varies), where other processes compete for it
        share = measure_cpu_share() if load is not None and load[0] > load[1] - 0.5 else 1.0
        return Planner(cost, self.machine_profile, budget=budget,
                       kv_budget=None if budget is not None else default_kv_budget(e.device),
                       overlap=self._planner_inputs["overlap"], transfer=self._planner_inputs["transfer"],
                       load=load, cpu_share=share, **kw)

    def _plan_for(self, seqs, planner=None):
        from .runtime.planner import Job

        planner = planner or self._planner()
        limit = self.engine.max_model_len
        job = Job([len(s.prompt_ids) for s in seqs],
                  [min(s.params.max_tokens or limit, limit - len(s.prompt_ids)) for s in seqs], limit,
                  stops_early=any(not s.params.ignore_eos or s.params.stop or s.params.stop_token_ids for s in seqs))
        return planner.plan(job)

    def _run_throughput(self, encoded, params_list, use_tqdm: bool, plan=None) -> Iterator[tuple[int, RequestOutput]]:
        from .runtime.throughput import ThroughputRunner

        outputs, seqs = self._sequences(encoded, params_list)
        planner = self._planner()
        plan = plan or self._plan_for(seqs, planner)
        log.info("%s", plan.explain())
        runner = ThroughputRunner(self.engine, planner)
        left = [p.n for p in params_list]
        done = 0
        bar = _progress(len(outputs), use_tqdm, "Generating (throughput)")
        caveat = f"; not reliable: {', '.join(plan.caveats)}" if plan.caveats else ""
        passes = runner.run(seqs, plan)
        try:
            for finished in passes:
                for s in finished:
                    i = int(s.request_id)
                    left[i] -= 1
                    if left[i] == 0:
                        done += 1
                        yield i, outputs[i]
                if bar is not None:
                    bar.update(done - bar.n)
                    bar.set_postfix_str(
                        f"{runner.report.tok_s:.1f} tok/s (predicted {plan.predicted_tok_s:.1f}{caveat})", refresh=False)
        finally:
            passes.close()  # an early exit stops the run and restores the expert store
            if bar is not None:
                ran = runner.report.predicted_tok_s_for_passes_run
                if ran:  # the cost model on the passes as they ran: sequences that stopped early included
                    bar.set_postfix_str(f"{runner.report.tok_s:.1f} tok/s (predicted {ran:.1f} for the passes run, "
                                        f"{plan.predicted_tok_s:.1f} planned{caveat})", refresh=False)
                bar.close()
            self.last_run = {"plan": {k: v for k, v in plan.as_dict().items() if k in (
                "max_seqs", "prefill_tokens", "kv_budget", "expert_slots", "predicted_tok_s", "predicted_s",
                "passes", "memory", "moved_bytes_per_pass")}, **runner.report.as_dict()}
            log.info("throughput run: %s", runner.report.summary())


def _prompt_logprobs(seqs) -> Optional[list]:
    """The request's prompt_logprobs list (filled in place as its prompt runs), or None if not asked."""
    sink = seqs[0].prompt_sink
    return sink.entries if sink is not None else None


def _machine_load() -> Optional[tuple[float, int]]:
    """(1-minute load average, CPUs): the planner's check for other work on the cores."""
    try:
        return os.getloadavg()[0], os.cpu_count() or 1
    except (OSError, AttributeError):
        return None


def _tensor_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if t.device.type != "meta")


def _progress(total: int, enabled: bool, desc: str = "Generating"):
    if not enabled or total < 2:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True)
