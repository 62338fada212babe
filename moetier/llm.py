"""``LLM``: the offline Python API, shaped like vLLM's."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence as Seq, Union

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


def resolve_model_path(model: str | Path) -> Path:
    """A checkpoint folder, or ``"demo"`` for the model that ships with the package."""
    if str(model) == "demo":
        from .demo import demo_path

        return demo_path()
    return Path(model).expanduser()


class LLM:
    """Load a MoE checkpoint and generate from it.

    >>> llm = LLM("path/to/checkpoint", device="cpu", dtype="float32")
    >>> out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=32, temperature=0))
    >>> out[0].outputs[0].text
    """

    def __init__(self, model: str | Path, device: str = "cpu", dtype: Optional[str] = None,
                 max_model_len: Optional[int] = None, max_num_seqs: int = 64, max_batch_tokens: int = 8192,
                 seed: Optional[int] = None, *, verify: bool = False,
                 device_memory: Optional[str | int] = None, host_memory: Optional[str | int] = None,
                 offload_dir: Optional[str | Path] = None, cache_policy: str = "activation",
                 prefetch: str = "trace", expert_slots: Optional[int] = None):
        """Load ``model`` (a checkpoint folder, a packed folder, or ``"demo"``).

        ``verify``: check the checksum of every weight region while loading a packed folder.

        Offloading (any of ``device_memory``, ``expert_slots``, or ``host_memory`` on the CPU):
        the dense weights stay on ``device`` and the routed experts are served from the packed
        checkpoint (an HF folder is converted on first use into ``offload_dir``) through an
        expert cache that gets what ``device_memory`` leaves (e.g. ``"6GiB"``).
        ``cache_policy``: ``lru``, ``lfu`` or ``activation``; ``prefetch``: ``trace`` (match
        the trace library), ``lookahead`` (next layer's router) or ``none``. Outputs are
        bit-identical to the all-resident run whatever the budget and policy.
        """
        self.config = EngineConfig(str(model), device, dtype, max_model_len, max_num_seqs, max_batch_tokens, seed)
        if seed is not None:
            torch.manual_seed(seed)
        self.path = resolve_model_path(model)
        if device == "cpu" and device_memory is None:
            device_memory = host_memory  # on the CPU the host is the device: one RAM budget
        offload = None
        self.memory: dict = {}
        if device_memory is not None or expert_slots is not None:
            from .experts.setup import attach_offload, ensure_packed, kv_bytes_per_token
            from .weights.loader import parse_dtype
            from .weights.packed import PackedCheckpoint

            want = parse_dtype(dtype)
            packed_path = ensure_packed(self.path, want, Path(offload_dir) if offload_dir else None)
            self.model, self.args, raw_config = load_model(packed_path, device, want, verify=verify, experts=False)
            self._packed = PackedCheckpoint(packed_path)
            run_dtype = next(p for p in self.model.parameters() if p.device.type != "meta").dtype
            limit = max_model_len or self.args.max_position_embeddings
            kv_reserve = kv_bytes_per_token(self.args, run_dtype) * min(limit, 2048)
            library = Path(offload_dir) / "traces.npz" if offload_dir else packed_path / "traces.npz"
            offload, self.memory = attach_offload(
                self.model, self._packed, torch.device(device), parse_size(device_memory) if device_memory else None,
                kv_reserve, policy=cache_policy, prefetch=prefetch, library_path=library, expert_slots=expert_slots)
        else:
            self.model, self.args, raw_config = load_model(self.path, device, dtype, verify=verify)
        self.tokenizer = load_tokenizer(self.path)
        gen_path = self.path / "generation_config.json"
        self.generation_config = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        limit = self.args.max_position_embeddings
        if max_model_len is not None and max_model_len > limit:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {limit}")
        self.engine = Engine(self.model, self.tokenizer, eos_ids(self.generation_config, raw_config, self.tokenizer),
                             max_model_len or limit, max_num_seqs, max_batch_tokens, offload=offload)

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
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate completions for every prompt; returns one RequestOutput per prompt, in order.

        All prompts are checked before any runs, so a bad one fails the call
        without doing half the work.
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        encoded = [self._prompt_ids(p) for p in prompts]
        for _, ids in encoded:
            self.engine.check_prompt(ids)
        return self._run(encoded, params_list, use_tqdm)

    def chat(self, messages: Union[list[dict], list[list[dict]]],
             sampling_params: Union[SamplingParams, Seq[SamplingParams], None] = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of messages) or to several."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": chat_prompt(self.tokenizer, c, add_generation_prompt)} for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

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

    def _run(self, encoded, params_list, use_tqdm: bool) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for i, ((text, ids), params) in enumerate(zip(encoded, params_list)):
            seqs = self.engine.add_request(str(i), ids, params)
            outputs.append(RequestOutput(str(i), text, ids, [s.out for s in seqs]))
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


def _progress(total: int, enabled: bool):
    if not enabled or total < 2:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Generating", unit="req", dynamic_ncols=True)
