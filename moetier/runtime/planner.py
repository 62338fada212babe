"""The throughput planner: a cost model of one model on this machine, and the plan with the best
predicted tokens/s.

Given the machine's rates (:class:`~moetier.runtime.machine.MachineProfile`),
:class:`ModelCost` predicts the time of one forward pass from the model's sizes:
each dense matmul as ``call cost + FLOPs / matmul rate + weight bytes / streaming
rate`` (:meth:`ModelCost.matmul_s`, the one place a kernel's rates enter), the
routed experts the same way for the experts a pass of ``T`` tokens is expected to
hit, attention from the query-key pairs and cached keys of the pass's sequences layer kind by kind
(full KV, a sliding window or chunk bounded to its limit, a linear-attention state's update),
the fixed costs of the model's own code (per routed expert, MoE layer, prompt
chunk's attention, pooled decode attention, decoder layer and sequence: measured
through that code by the machine profile), per-token sampling work, and the expert
loads a pass makes through its slots (:meth:`Planner.loads_per_pass`) at the
measured read rate, overlapped with compute as far as slots beyond one layer's
experts allow. :class:`Planner` searches sequences per pass, prefill tokens per
pass and (when experts are offloaded under a memory budget) the split of that
budget between expert slots and KV cache, and keeps the plan with the best
predicted tokens/s that fits; :meth:`Plan.explain` says where the prediction
cannot be trusted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from ..errors import MoetierError
from ..units import fmt_size
from .machine import MachineProfile

# the standard normal's quantiles at (i + 0.5) / 8: eight equally likely points of a spread
_NORMAL_8 = (-1.534, -0.887, -0.489, -0.157, 0.157, 0.489, 0.887, 1.534)
# compute rate of the int8 / int4 CPU kernels relative to the bf16 matmul at a few rows (kernels/linear.py);
# measured on an AVX-512 BF16 + AMX core: both grow ~linearly in rows, at about a quarter of bf16's rate
QUANT_FLOPS_SHARE = {"int8": 0.25, "int4": 0.25}
CHUNKS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)  # prompt tokens per pass the planner tries


# ---------------------------------------------------------------------------------------------
# the model


@dataclass
class PassShape:
    """What one forward pass holds (sums over the pass's sequences)."""

    tokens: float  # T: tokens fed
    rows: float  # tokens sampled (sequences whose prompt is complete)
    seqs: float  # sequences in the pass (attention calls per layer)
    pairs: float  # sum of n_i x (start_i + n_i): query-key pairs
    ctx: float  # sum of start_i + n_i: cached keys read per layer
    decode: float = 0.0  # sequences adding one token (they attend together in one call per layer)
    spans: Optional[list[tuple[int, int]]] = None  # (start, n) of each sequence, where known (passes that ran)

    def attended(self, cache) -> tuple[float, float]:
        """(query-key pairs, cached keys read) of one layer caching ``cache`` (``runtime/cache_spec.py``):
        ``pairs`` / ``ctx`` for a KV layer; a bounded layer's from the spans where known, else at most
        ``limit`` keys a query (an upper bound for a chunked layer, whose queries see half a chunk on
        average)."""
        if cache.kind == "kv":
            return self.pairs, self.ctx
        if self.spans is not None:
            keys = [cache.keys(start, n) for start, n in self.spans]
            return float(sum(n * k for (_, n), k in zip(self.spans, keys))), float(sum(keys))
        return min(self.pairs, self.tokens * cache.limit), min(self.ctx, self.seqs * cache.limit)


@dataclass
class ModelCost:
    """Sizes of one model that set its time per pass, read from its modules."""

    linears: list[int]  # parameter count of each dense matmul per pass (routers and shared experts included)
    head: int  # LM head parameters (applied to sampled rows only)
    moe_layers: int
    experts: int  # routed experts per MoE layer
    top_k: int
    expert_params: int  # one expert's parameters (gate, up, down)
    layers: int
    hidden: int
    vocab: int
    attn_flops_per_pair: float  # per layer, one query against one key
    kv_bytes_per_token: int  # all unbounded KV layers (all layers when ``caches`` is None)
    elem: int  # bytes per weight / activation element
    dense_bytes: int  # resident weights (the experts too when they are not offloaded)
    row_s: float = 2e-5  # per sampled token: sampler, detokenizer, stop rules (measured by the planner)
    expert_quant: Optional[tuple[str, float]] = None  # quantized experts: (kind, region bytes per parameter)
    state_bytes_per_seq: int = 0  # fixed per sequence, whatever its length (linear-attention layers' states)
    caches: Optional[tuple] = None  # each layer's runtime.cache_spec.LayerCache (None: every layer plain KV)

    @classmethod
    def of(cls, model, expert_layout=None) -> "ModelCost":
        from ..experts.setup import dense_bytes, kv_bytes_per_token, moe_blocks
        from .cache_spec import layer_caches, state_bytes_per_seq
        from ..models.moe import ExpertsBase

        args = model.args
        p = next(q for q in model.parameters() if q.device.type != "meta")
        blocks = moe_blocks(model)
        linears, head = [], model.lm_head.weight.numel()
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and m is not model.lm_head:
                linears.append(m.weight.numel())
            elif not isinstance(m, ExpertsBase) and hasattr(m, "top_k") and isinstance(getattr(m, "weight", None), torch.Tensor):
                linears.append(m.weight.numel())  # a router
        if blocks:
            ex = blocks[0].experts
            E, k = ex.num_experts, getattr(blocks[0].gate, "top_k", 2)
            if expert_layout is not None:
                per = expert_layout.gate_up[0] * expert_layout.gate_up[1] + expert_layout.down[0] * expert_layout.down[1]
            else:
                per = ex.gate_up_proj[0].numel() + ex.down_proj[0].numel()
            qlayout = expert_layout if hasattr(expert_layout, "kind") else getattr(ex, "quant_layout", None)
            quant = (qlayout.kind, qlayout.nbytes / per) if qlayout is not None else None
        else:
            E, k, per, quant = 1, 1, 0, None
        hq = args.num_attention_heads
        if getattr(args, "kv_lora_rank", None):
            dqk, dv = args.qk_nope_head_dim + args.qk_rope_head_dim, args.v_head_dim
        else:
            dqk = dv = args.head_dim
        return cls(linears=linears, head=head, moe_layers=len(blocks), experts=E, top_k=k, expert_params=per,
                   layers=args.num_hidden_layers, hidden=args.hidden_size, vocab=args.vocab_size,
                   attn_flops_per_pair=2.0 * hq * (dqk + dv), kv_bytes_per_token=kv_bytes_per_token(args, p.dtype),
                   elem=p.dtype.itemsize, dense_bytes=dense_bytes(model), expert_quant=quant,
                   state_bytes_per_seq=state_bytes_per_seq(args, p.dtype),
                   caches=tuple(layer_caches(args, p.dtype)))

    def seq_bytes(self, tokens: int) -> int:
        """Cache bytes one sequence of ``tokens`` tokens holds: each layer for what it caches."""
        if self.caches is None:
            return tokens * self.kv_bytes_per_token + self.state_bytes_per_seq
        return sum(c.seq_bytes(tokens) for c in self.caches)

    def cache_groups(self) -> list[tuple]:
        """``(LayerCache, how many layers)`` for each kind of layer cache the model has."""
        if self.caches is None:
            from .cache_spec import kv

            return [(kv(self.kv_bytes_per_token // max(self.layers, 1)), self.layers)]
        groups: dict = {}
        for c in self.caches:
            groups[c] = groups.get(c, 0) + 1
        return list(groups.items())

    def attention_s(self, s: PassShape, prof: MachineProfile, calls: float) -> float:
        """Seconds of a pass's attention (or linear-attention) work, layer kind by kind: per layer ``calls``
        (the fixed cost of its calls) and, for a layer with keys, the larger of its query-key pairs at the
        attention rate and its cached keys at the copy rate (a bounded layer's at most its limit a query,
        :meth:`PassShape.attended`); for a state layer its update's FLOPs per token at the attention rate
        and its state read and written once per sequence."""
        total = 0.0
        for c, count in self.cache_groups():
            if c.kind == "state":
                per = s.tokens * c.flops_per_token / prof.attn_flops + 2 * s.seqs * c.bytes_per_seq / prof.copy_bps
            else:
                pairs, keys = s.attended(c)
                per = max(pairs * self.attn_flops_per_pair / prof.attn_flops, keys * c.bytes_per_token / prof.copy_bps)
            total += count * (calls + per)
        return total

    @property
    def expert_bytes(self) -> int:
        if self.expert_quant is not None:  # the quantized region, as the store reads it
            return int(self.expert_params * self.expert_quant[1])
        return self.expert_params * self.elem

    def experts_hit(self, tokens: float) -> float:
        """Expected distinct experts of one layer that ``tokens`` tokens route to (uniform routing)."""
        if tokens <= 0:
            return 0.0
        return self.experts * (1 - (1 - self.top_k / self.experts) ** tokens)

    def act_bytes(self, tokens: float, rows: float) -> int:
        """Transient memory of a pass of ``tokens`` tokens sampling ``rows``: a layer's hidden states,
        q/k/v, the expert gather (``k`` copies, float32 weighting), one expert's intermediates, logits."""
        inter = self.expert_params // (3 * self.hidden) if self.hidden else 0
        e, H, k = self.elem, self.hidden, self.top_k
        per_token = (e * (8 * H + 3 * k * H + self.attn_flops_per_pair) + 4 * (k + 1) * H
                     + e * 3 * inter * 2 * k / max(self.experts, 1))
        return int(1.25 * (tokens * per_token + rows * self.vocab * 8))

    def matmul_s(self, rows: float, params: int, prof: MachineProfile, calls: int = 1,
                 quant: Optional[tuple[str, float]] = None) -> float:
        """Seconds of ``rows`` rows through a weight of ``params`` parameters, in ``calls`` matmul calls
        (an expert: two). The bf16/float32 kernels pay a fixed cost per call, stream the weight once
        and do 2 x rows x params FLOPs, times that add on CPUs at the few-to-hundreds of rows a pass
        has; from ``wide_rows`` on, bf16 converts the weight to float32 and multiplies at the float32
        rate instead (models/prepack.py). The one place a kernel's rates enter the model: another
        kernel (quantized weights) adds its own branch here.

        ``quant`` (kind, bytes per parameter): below ``kernels.linear.quant_rows`` rows the int kernel
        streams the codes and computes at :data:`QUANT_FLOPS_SHARE` of the bf16 matmul rate (they batch
        poorly); from there the weight is dequantized (float32 written at ``upcast_bps``) and multiplied
        at the float32 rate (kernels/linear.py)."""
        fixed = calls * prof.linear_call_s
        if quant is not None:
            from ..kernels.linear import quant_rows

            kind, bpp = quant
            if rows < quant_rows(kind, prof.threads):
                return fixed + params * bpp / prof.stream_bps + 2 * rows * params / (
                    prof.matmul_flops * QUANT_FLOPS_SHARE[kind])
            wide = prof.wide_flops or prof.matmul_flops
            return fixed + params * 4 / (prof.upcast_bps or prof.stream_bps) + 2 * rows * params / wide
        if prof.wide_rows and rows >= prof.wide_rows:
            return fixed + 2 * rows * params / prof.wide_flops + params * self.elem / prof.upcast_bps
        return fixed + 2 * rows * params / prof.matmul_flops + params * self.elem / prof.stream_bps

    def expert_matmul_s(self, tokens: float, mean_rows: float, prof: MachineProfile) -> float:
        """One hit expert's matmul time, ``mean_rows`` rows on average. Where the wide path starts at
        some row count, the spread of rows across experts matters (half the experts of a pass may fall
        short of it): averaged over eight equally likely row counts of the binomial spread of
        ``tokens`` tokens choosing ``top_k`` of ``experts`` experts (uniform routing)."""
        if not prof.wide_rows:
            return self.matmul_s(mean_rows, self.expert_params, prof, calls=2, quant=self.expert_quant)
        p = min(self.top_k / max(self.experts, 1), 1.0)
        sd = math.sqrt(tokens * p * (1 - p))
        return sum(self.matmul_s(max(mean_rows + z * sd, 1.0), self.expert_params, prof, calls=2,
                                 quant=self.expert_quant) for z in _NORMAL_8) / 8

    def pass_time(self, s: PassShape, moved_bytes: float, prof: MachineProfile, read_bps: Optional[float],
                  overlap: float = 1.0, cpu_share: float = 1.0) -> dict:
        """Predicted seconds of one pass, by part; ``total`` is what the pass takes. ``cpu_share``: the
        share of wall time this process gets the CPU (1 on an idle machine); the profile's rates are
        CPU time, so the compute parts take ``1 / cpu_share`` longer on the wall clock."""
        T, e = s.tokens, self.elem
        dense = sum(self.matmul_s(T, p, prof) for p in self.linears)
        experts = 0.0
        if self.moe_layers:
            U = self.experts_hit(T)
            n = T * self.top_k / U if U else 0.0
            per = self.expert_matmul_s(T, n, prof) + prof.expert_call_s
            route = prof.moe_call_s + 8 * T * self.top_k * self.hidden * e / prof.copy_bps
            experts = self.moe_layers * (U * per + route)
        # decoding sequences attend together, one call per layer (on the KV pool); prompt chunks one each
        group = s.decode if s.decode >= 2 else 0.0
        calls = (s.seqs - group) * prof.attn_call_s + (prof.attn_group_s if group else 0.0)
        attn = self.attention_s(s, prof, calls)
        other = (self.layers * (prof.layer_s + 24 * T * self.hidden * e / prof.copy_bps)
                 + s.seqs * prof.seq_s)
        head = (self.matmul_s(s.rows, self.head, prof) if s.rows else 0.0) \
            + s.rows * (self.row_s + 8 * self.vocab / prof.copy_bps)
        k = 1 / min(1.0, max(cpu_share, 0.05))
        dense, experts, attn, other, head = dense * k, experts * k, attn * k, other * k, head * k
        compute = dense + experts + attn + other + head
        transfer = moved_bytes / read_bps if moved_bytes and read_bps else 0.0
        # expert reads run on loader threads while layers compute; ``overlap`` is the share of the
        # compute time they can hide under (a GPU's copy engine: all of it; a CPU reading with
        # O_DIRECT: most of it, the DMA needs little CPU; none without room to prefetch into)
        total = compute + max(0.0, transfer - overlap * compute) if transfer else compute
        return {"dense": dense, "experts": experts, "attention": attn, "other": other, "head_sampling": head,
                "compute": compute, "transfer": transfer, "total": total}


# ---------------------------------------------------------------------------------------------
# the plan


@dataclass
class Job:
    """The work: each sequence's prompt length and most new tokens (a request with n > 1 counts n)."""

    prompt_lens: list[int]
    new_tokens: list[int]
    max_len: int
    stops_early: bool = True  # sequences may end before max_tokens (EOS, stop strings)

    @property
    def n(self) -> int:
        return len(self.prompt_lens)

    def reserve_tokens(self, i: int) -> int:
        """KV positions sequence ``i`` may fill: its prompt and every token it may generate."""
        return min(self.max_len, self.prompt_lens[i] + self.new_tokens[i])


@dataclass
class Plan:
    """Batch sizes and memory split of a throughput run, with the prediction that chose them."""

    max_seqs: int  # most sequences in a pass
    prefill_tokens: int  # most prompt tokens fed per pass (prompts are cut into chunks)
    kv_budget: int  # bytes of KV cache the running sequences may reserve
    expert_slots: Optional[int]  # slots of the expert store during the run (None: experts resident)
    predicted_tok_s: float  # generated tokens per second over the job
    predicted_s: float
    passes: float
    pass_s: dict  # the average pass, by part
    memory: dict  # bytes: budget, dense, expert slots, KV, activations
    moved_bytes_per_pass: float
    profile: dict
    job: dict
    candidates: int = 0
    notes: list[str] = field(default_factory=list)
    loads_per_pass: float = 0.0  # expert loads into slots per pass (Planner.loads_per_pass)
    read_from: Optional[str] = None  # where expert reads come from (machine.Transfer.where)
    unreliable: list[str] = field(default_factory=list)  # why the prediction cannot be trusted, if it cannot
    caveats: list[str] = field(default_factory=list)  # the same in a few words each (a progress line)

    def explain(self) -> str:
        """The plan and its prediction, for a person."""
        m, p = self.memory, self.pass_s
        lines = [
            f"throughput plan: {self.max_seqs} sequences per pass, {self.prefill_tokens} prompt tokens per pass"
            + (f", {self.expert_slots} expert slots" if self.expert_slots is not None else ", experts resident"),
            f"  job: {self.job['sequences']} sequences, prompts {self.job['prompt_tokens']} tokens "
            f"(mean {self.job['mean_prompt']:.0f}), up to {self.job['new_tokens']} new tokens "
            f"(mean {self.job['mean_new']:.0f})",
            f"  memory: budget {fmt_size(m['budget']) if m['budget'] else 'none given'}; dense weights "
            f"{fmt_size(m['dense'])}, expert slots {fmt_size(m['expert_slots'])}, KV budget {fmt_size(m['kv'])} "
            f"({fmt_size(m['kv_per_seq'])} reserved per sequence), activations {fmt_size(m['activations'])}; "
            f"total {fmt_size(m['total'])}",
            f"  predicted: {self.predicted_tok_s:.1f} generated tokens/s, {self.predicted_s:.1f} s over "
            f"{self.passes:.0f} passes of {p['total'] * 1e3:.1f} ms",
            "  average pass: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in p.items() if k != "total"),
        ]
        if self.expert_slots is not None:
            lines.append(f"  expert loads per pass: {self.loads_per_pass:.1f} ({fmt_size(self.moved_bytes_per_pass)}) "
                         f"at {self.profile.get('read_gb_s', 0):.2f} GB/s"
                         + (f" from {self.read_from}" if self.read_from else ""))
        lines.append("  machine: " + ", ".join(f"{k} {v}" for k, v in self.profile.items()))
        lines += [f"  note: {n}" for n in self.notes]
        if self.unreliable:
            lines.append("  the prediction is not reliable here: " + "; ".join(self.unreliable))
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return asdict(self)


def default_kv_budget(device: torch.device) -> int:
    """Without a memory budget: half the memory available now (host RAM on the CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available) // 2
    except ImportError:
        return 4 << 30


class Planner:
    """Chooses a :class:`Plan` for a :class:`Job` on one model and machine.

    ``budget``: bytes the run may hold in total (weights, expert slots, KV, activations);
    None: the KV cache gets ``kv_budget`` (default: half the available memory).
    Offloaded experts: ``slot_bytes`` per slot, at least ``min_slots``, at most ``max_slots``;
    with a budget the planner also picks the slot count, else it keeps ``max_slots``.
    """

    def __init__(self, cost: ModelCost, profile: MachineProfile, budget: Optional[int] = None,
                 kv_budget: Optional[int] = None, slot_bytes: Optional[int] = None, min_slots: int = 0,
                 max_slots: Optional[int] = None, read_bps: Optional[float] = None, max_seqs: int = 1024,
                 overlap: float = 0.9, transfer=None, load: Optional[tuple[float, int]] = None,
                 cpu_share: float = 1.0):
        self.cost = cost
        self.profile = profile
        self.budget = budget
        self.kv_budget = kv_budget
        self.slot_bytes = slot_bytes
        self.min_slots = min_slots
        self.max_slots = max_slots
        self.read_bps = read_bps
        self.max_seqs = max_seqs
        self.overlap = overlap  # see ModelCost.pass_time
        self.transfer = transfer  # machine.Transfer: where expert reads come from (for the explanation)
        self.load = load  # (load average, CPUs) when the plan is made: other work on the cores
        self.cpu_share = cpu_share  # share of wall time this process got the CPU while planning

    @property
    def offloaded(self) -> bool:
        return self.slot_bytes is not None

    def hidden_share(self, slots: Optional[int]) -> float:
        """Share of the compute time expert reads can hide under: the loads of the next layer
        start while this one computes only as far as slots beyond one layer's experts allow."""
        E = self.cost.experts
        return self.overlap * min(1.0, max(0, (slots or 0) - E) / E) if E else 0.0

    def loads_per_pass(self, slots: Optional[int], tokens: float) -> float:
        """Expert loads (disk reads into a slot) a pass of ``tokens`` tokens makes through ``slots`` slots.

        A pass runs the layers in order and a layer's experts must all sit in slots while it runs,
        so the slots cycle through the layers. With one or two layers' worth of slots (the layer
        running and the one loading next) every expert hit is read again every pass; with a slot for
        every expert nothing is read; in between, the scan policy (``throughput_offload``: evict the
        layer that runs again last) keeps a share that grows linearly from nothing to everything:
        loads = hit x (N - slots) / (N - 2E) for N experts in all, E per layer. That line follows
        the real store within a few percent (``tests/test_planner_cost.py`` drives it through passes).
        None (experts resident): nothing is read."""
        c = self.cost
        if slots is None:
            return 0.0
        total = c.moe_layers * c.experts
        if slots >= total:
            return 0.0
        share = min(1.0, (total - slots) / max(total - 2 * c.experts, 1))
        return c.moe_layers * c.experts_hit(tokens) * share

    def moved_per_pass(self, slots: Optional[int], tokens: float) -> float:
        """Expert bytes read per pass (:meth:`loads_per_pass` whole experts)."""
        return self.loads_per_pass(slots, tokens) * self.cost.expert_bytes

    def _job_time(self, job: Job, B: int, C: int, slots: Optional[int]) -> tuple[float, float, PassShape, dict]:
        """Closed-form estimate: (seconds, passes, the average pass, its parts)."""
        n = job.n
        P = sum(job.prompt_lens)
        G = sum(job.new_tokens)
        Pm, Gm = P / n, G / n
        B = min(B, n)
        C = max(1, C)
        # decoding sequences per pass: B, unless prompts cannot be fed fast enough to replace leavers
        dec = min(B, C * Gm / max(Pm, 1e-9))
        if n <= B:
            passes = P / C + max(job.new_tokens)
        else:
            passes = G / dec + dec * Pm / C + Gm / 2  # steady state, filling up, draining
        passes = max(passes, 1.0)
        tokens = (G + P) / passes
        rows = G / passes
        prefilling = min(P / passes / max(Pm, 1e-9) + 1, B) if P else 0
        seqs = min(B, rows + prefilling)
        ctx_dec = Pm + Gm / 2
        pairs = (G * ctx_dec + sum(p * (p + min(p, C)) / 2 for p in job.prompt_lens)) / passes
        ctx = rows * ctx_dec + prefilling * Pm
        shape = PassShape(tokens=tokens, rows=rows, seqs=seqs, pairs=pairs, ctx=ctx, decode=max(0.0, seqs - prefilling))
        parts = self.cost.pass_time(shape, self.moved_per_pass(slots, tokens), self.profile, self.read_bps,
                                    self.hidden_share(slots), self.cpu_share)
        return passes * parts["total"], passes, shape, parts

    def plan(self, job: Job) -> Plan:
        """The plan with the best predicted generated tokens/s that fits the memory budgets."""
        c = self.cost
        if job.n == 0:
            raise MoetierError("nothing to plan: no sequences")
        reserve = [c.seq_bytes(job.reserve_tokens(i)) for i in range(job.n)]
        biggest, mean_reserve = max(reserve), sum(reserve) / job.n
        slot_options: list[Optional[int]] = [None]
        if self.offloaded:
            if self.budget is None:
                slot_options = [self.max_slots]
            else:
                room = (self.budget - c.dense_bytes - biggest - c.act_bytes(CHUNKS[0] + 1, 1)) // self.slot_bytes
                hi = min(self.max_slots or room, room)
                if hi < self.min_slots:
                    raise MoetierError(
                        f"the memory budget {fmt_size(self.budget)} is too small for throughput mode: dense weights "
                        f"{fmt_size(c.dense_bytes)}, {self.min_slots} expert slots "
                        f"{fmt_size(self.min_slots * self.slot_bytes)}, one sequence's KV {fmt_size(biggest)} and "
                        f"the activations of a {CHUNKS[0]}-token pass {fmt_size(c.act_bytes(CHUNKS[0] + 1, 1))}")
                lo = self.min_slots
                slot_options = sorted({lo, hi, *(lo + (hi - lo) * i // 8 for i in range(1, 8)),
                                       *(s for s in (2 * c.experts, 3 * c.experts) if lo <= s <= hi)})
        best = None
        tried = 0
        for slots in slot_options:
            for C in CHUNKS:
                kv = self._kv_room(slots, C)
                if kv < biggest:
                    continue
                b_max = int(min(self.max_seqs, job.n, kv // mean_reserve))
                Bs = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if b < b_max} | {b_max})
                for B in Bs:
                    kvB = self._kv_room(slots, C, B)
                    if kvB < max(biggest, B * mean_reserve if B < job.n else sum(reserve)):
                        continue
                    secs, passes, shape, parts = self._job_time(job, B, C, slots)
                    tried += 1
                    rate = sum(job.new_tokens) / secs
                    # within 2% of the best, prefer fewer bytes read per pass (reads are never quite
                    # free), then less memory (fewer sequences, smaller chunks: visited first)
                    moved = self.moved_per_pass(slots, shape.tokens)
                    if best is None or rate > best[0] * 1.02 or (rate >= best[0] / 1.02 and moved < best[-1] * 0.98):
                        best = (rate, B, C, slots, kvB, secs, passes, shape, parts, moved)
        if best is None:
            raise MoetierError(
                f"the memory budget is too small for throughput mode: one sequence needs {fmt_size(biggest)} of KV "
                f"cache (prompt + max_tokens), more than the {fmt_size(max(0, self._kv_room(slot_options[0], CHUNKS[0])))} "
                f"left after the weights" + (" and expert slots" if self.offloaded else ""))
        rate, B, C, slots, kv, secs, passes, shape, parts, _ = best
        reasons = self.unreliable(job, slots)
        act = c.act_bytes(B + C, B)
        kv_budget = kv
        memory = {"budget": self.budget, "dense": c.dense_bytes,
                  "expert_slots": (slots or 0) * (self.slot_bytes or 0), "kv": kv_budget, "kv_per_seq": int(mean_reserve),
                  "activations": act}
        memory["total"] = memory["dense"] + memory["expert_slots"] + kv_budget + act
        prof = self.profile
        profile = {"matmul_gflop_s": round(prof.matmul_flops / 1e9, 1), "stream_gb_s": round(prof.stream_bps / 1e9, 2),
                   "copy_gb_s": round(prof.copy_bps / 1e9, 2), "attn_call_us": round(prof.attn_call_s * 1e6, 1),
                   "op_us": round(prof.op_s * 1e6, 2), "row_us": round(c.row_s * 1e6, 1), "threads": prof.threads}
        if prof.wide_rows:
            profile.update(wide_rows=prof.wide_rows, wide_gflop_s=round(prof.wide_flops / 1e9, 1),
                           upcast_gb_s=round(prof.upcast_bps / 1e9, 2))
        profile.update({k.removesuffix("_s") + "_us": round(getattr(prof, k) * 1e6, 1) for k in (
            "linear_call_s", "expert_call_s", "moe_call_s", "attn_group_s", "layer_s", "seq_s")})
        if self.cpu_share < 1:
            profile["cpu_share"] = round(self.cpu_share, 2)
        if self.read_bps:
            profile["read_gb_s"] = round(self.read_bps / 1e9, 2)
            profile["read_overlap"] = round(self.overlap, 2)
        jobd = {"sequences": job.n, "prompt_tokens": sum(job.prompt_lens), "new_tokens": sum(job.new_tokens),
                "mean_prompt": sum(job.prompt_lens) / job.n, "mean_new": sum(job.new_tokens) / job.n}
        notes = []
        if any(t >= job.max_len - p for p, t in zip(job.prompt_lens, job.new_tokens)):
            notes.append("some sequences have no max_tokens below the context: KV is reserved up to max_model_len")
        if slots is not None and parts["transfer"] > parts["compute"]:
            notes.append(f"passes are bound by expert reads ({parts['transfer'] * 1e3:.1f} of "
                         f"{parts['total'] * 1e3:.1f} ms): the prediction is as good as the read rate measured "
                         f"now, which other I/O on the disk changes")
        return Plan(max_seqs=B, prefill_tokens=C, kv_budget=kv_budget, expert_slots=slots, predicted_tok_s=rate,
                    predicted_s=secs, passes=passes, pass_s=parts, memory=memory,
                    moved_bytes_per_pass=self.moved_per_pass(slots, shape.tokens), profile=profile, job=jobd,
                    candidates=tried, notes=notes, loads_per_pass=self.loads_per_pass(slots, shape.tokens),
                    read_from=self.transfer.where() if self.transfer is not None and slots is not None else None,
                    unreliable=[long for _, long in reasons], caveats=[short for short, _ in reasons])

    def unreliable(self, job: Job, slots: Optional[int]) -> list[tuple[str, str]]:
        """Why a prediction for ``job`` cannot be trusted: (a few words, the reason in full) each; empty
        when nothing is known against it."""
        out = []
        if job.stops_early:
            out.append(("sequences may stop early", "it assumes every sequence runs to max_tokens, and sequences "
                        "that stop sooner (EOS, stop strings) leave passes part-empty, so fewer tokens/s are "
                        "measured; after a run, last_run['predicted_tok_s_for_passes_run'] is the model on the "
                        "passes as they ran"))
        if self.load is not None:
            avg, cpus = self.load
            if avg > cpus:
                out.append(("busy machine", f"the machine is busy (load average {avg:.1f} on {cpus} CPUs): other "
                            f"processes take CPU time this run needs, by an amount that changes from run to run "
                            f"(the prediction counts the {self.cpu_share:.0%} of the CPU this process got while "
                            f"planning)"))
            if slots is not None and self.profile.threads >= cpus:
                out.append(("torch threads take every CPU", f"torch runs {self.profile.threads} threads on {cpus} "
                            f"CPU(s) and the expert loader threads need CPU time too (page-cache copies, "
                            f"checksums): compute and loads compete for the cores, which the cost model does not "
                            f"count"))
        t = self.transfer
        if slots is not None and t is not None and not t.direct and (t.cached or 0) < t.experts:
            out.append(("buffered expert reads", "expert reads are buffered (no O_DIRECT on this filesystem), so "
                        "the page cache fills as the run reads and the read rate measured now changes during the run"))
        return out

    def _kv_room(self, slots: Optional[int], C: int, B: int = 1) -> int:
        """KV bytes that fit next to the weights, ``slots`` expert slots and a pass's activations."""
        if self.budget is None:
            return self.kv_budget if self.kv_budget is not None else 0
        used = self.cost.dense_bytes + (slots or 0) * (self.slot_bytes or 0) + self.cost.act_bytes(B + C, B)
        room = self.budget - used
        return room if self.kv_budget is None else min(room, self.kv_budget)

    def predict_passes(self, shapes: list[PassShape], slots: Optional[int]) -> float:
        """Seconds the cost model gives to passes that actually ran (checks the model, not the plan)."""
        return sum(self.cost.pass_time(s, self.moved_per_pass(slots, s.tokens), self.profile, self.read_bps,
                                       self.hidden_share(slots), self.cpu_share)["total"] for s in shapes)
