"""``moetier convert model.gguf OUT``: import a GGUF file (llama.cpp's format) into the packed format.

The ``gguf`` package reads the file. What is imported:

- **config**: the GGUF metadata of a supported architecture becomes a ``config.json`` of the
  Hugging Face ``model_type`` (:data:`ARCHS`: llama with experts = ``mixtral``, ``qwen2moe``,
  ``qwen3moe``, ``olmoe``; DeepSeek's ``deepseek2`` (MLA, split ``attn_k_b``/``attn_v_b``) is not
  supported yet).
- **tokenizer**: built from the GGUF vocabulary by transformers' GGUF converter; where that
  fails, ``tokenizer=HF_DIR`` copies one, ``tokenizer="none"`` imports without (token-id prompts).
- **tensors**, under moetier's names: ``blk.N.ffn_{gate,up,down}_exps`` ``[E, ...]`` (or the older
  per-expert ``ffn_gate.E``) become expert regions, gate rows then up rows. llama.cpp's converter
  permutes the rows of Mixtral's ``attn_q`` / ``attn_k`` for its rotary layout
  (``LlamaModel.permute``); that is undone here, row by row, so it is exact on quantized rows too.
- **blocks**: ``Q8_0`` becomes int8 with group 32 and its fp16 scales, ``Q4_0`` int4 ``(d, 0)``,
  ``Q4_1`` int4 ``(d, m + 8 d)`` (``kernels/quant.py``): the codes as they are in the file, never
  re-quantized. int4 ``(scale, zero)`` pairs are stored in bfloat16 (torch's int4 CPU kernel is
  ~70x slower with fp16 scales; rounding d costs 2^-9 relative), fp16 as in the file with
  ``exact_scales=True`` (``--exact-scales``). ``F16``/``BF16``/``F32`` stay float (in the
  model's dtype). Any other type (``Q4_K``, ``Q6_K``, ``MXFP4``, ...) is dequantized by
  ``gguf.quants.dequantize`` and re-quantized to the nearest moetier kind: int4 group 32 below
  6 bits per weight, int8 per-channel from 6 on; a log line says which tensors were.
- Embeddings, norms and routers are always stored in the model's dtype (16 bits); attention and the
  LM head keep their GGUF kind as above.

The packed folder is written like ``moetier convert``'s (packed_write.py's writer and temporary
folder; quantized regions as packed_quant.py lays them out), tensors streamed one at a time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import __version__
from ..errors import CheckpointError, ConfigError, MoetierError
from ..kernels.quant import QuantScheme, QuantWeight, int4_from_codes, int8_from_codes, quantize, spec_of
from ..kernels.region import QuantExpertLayout
from ..units import parse_size
from .atomic import new_folder
from .packed import ALIGN, FORMAT, INDEX_NAME, VERSION, _bar, dtype_name
from .packed_quant import QUANT_VERSION
from .packed_write import DEFAULT_MAX_FILE_SIZE, _Writer, _write_synced

log = logging.getLogger(__name__)

# general.architecture -> model_type (llama only with experts: Mixtral)
ARCHS = {"llama": "mixtral", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "olmoe": "olmoe"}
CARRIED = ("Q8_0", "Q4_0", "Q4_1")  # block types that map exactly onto a QuantWeight
FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_FILE_TYPE_DTYPES = {0: torch.float32, 1: torch.float16, 32: torch.bfloat16}  # general.file_type

# GGUF name (after "blk.N.") -> moetier name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_SIXTEEN_BIT = ("embed_tokens.weight", "norm.weight", "mlp.gate.weight", "shared_expert_gate.weight")


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` is a GGUF file (by its magic bytes)."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            return p.is_file() and fh.read(4) == b"GGUF"
    except OSError:
        return False


# --- reading: metadata and tensors -------------------------------------------------------------------------

def _reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise MoetierError("importing a GGUF file needs the gguf package: pip install gguf") from None
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError / struct.error / IndexError on a damaged file
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v if v is not None else default


def gguf_config(reader, path: Path) -> dict:
    """The ``config.json`` (a dict) of the Hugging Face model type that the GGUF metadata describes."""
    arch = _field(reader, "general.architecture")
    tensors = {t.name for t in reader.tensors}
    if arch not in ARCHS:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                          f"{', '.join(sorted(ARCHS))}; llama only with experts, i.e. Mixtral)")
    model_type = ARCHS[arch]

    def get(key: str, default=None, required: bool = False):
        v = _field(reader, f"{arch}.{key}", default)
        if v is None and required:
            raise ConfigError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    heads = get("attention.head_count", required=True)
    vocab = get("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []) or []) or None
    if vocab is None:
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if embd is None:
            raise CheckpointError(f"{path}: no vocab size in the metadata and no token_embd.weight")
        vocab = int(embd.shape[1])
    cfg = {
        "model_type": model_type, "vocab_size": int(vocab),
        "hidden_size": get("embedding_length", required=True),
        "num_hidden_layers": get("block_count", required=True),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "max_position_embeddings": get("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if isinstance(cfg["num_key_value_heads"], list):  # per-layer counts (hybrid models): not ours
        raise ConfigError(f"{path}: per-layer key/value head counts are not supported")
    head_dim = get("attention.key_length")
    if head_dim is not None and head_dim != cfg["hidden_size"] // heads:
        cfg["head_dim"] = head_dim
    rope = {"rope_theta": float(get("rope.freq_base", {"mixtral": 1e6}.get(model_type, 10000.0))),
            "rope_type": "default"}
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling not in ("linear", "yarn"):
            raise ConfigError(f"{path}: rope scaling {scaling!r} is not supported (linear, yarn)")
        rope.update(rope_type=scaling, factor=float(get("rope.scaling.factor", 1.0)))
        if get("rope.scaling.original_context_length") is not None:
            rope["original_max_position_embeddings"] = get("rope.scaling.original_context_length")
    cfg["rope_parameters"] = rope
    experts, used = get("expert_count"), get("expert_used_count")
    if not experts or not used:
        raise ConfigError(f"{path}: GGUF {arch} model without experts ({arch}.expert_count): not a MoE model")
    ff, eff = get("feed_forward_length"), get("expert_feed_forward_length")
    if model_type == "mixtral":
        cfg.update(architectures=["MixtralForCausalLM"], intermediate_size=eff or ff, num_local_experts=experts,
                   num_experts_per_tok=used)
    else:
        cfg.update(num_experts=experts, num_experts_per_tok=used, intermediate_size=ff or eff)
        if model_type == "olmoe":
            cfg.update(architectures=["OlmoeForCausalLM"], intermediate_size=eff or ff, norm_topk_prob=False)
        else:
            cfg.update(moe_intermediate_size=eff or ff, decoder_sparse_step=1, mlp_only_layers=[])
        if model_type == "qwen2_moe":
            cfg.update(architectures=["Qwen2MoeForCausalLM"], norm_topk_prob=False,
                       shared_expert_intermediate_size=get("expert_shared_feed_forward_length", 0))
        elif model_type == "qwen3_moe":
            cfg.update(architectures=["Qwen3MoeForCausalLM"], norm_topk_prob=True)
        if get("expert_weights_norm") is not None:  # written by newer converters where it varies
            cfg["norm_topk_prob"] = bool(get("expert_weights_norm"))
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        v = _field(reader, f"tokenizer.ggml.{name}")
        if v is not None:
            cfg[key] = int(v)
    return cfg


@dataclass
class Rows:
    """One GGUF tensor as rows of a ``[..., N, K]`` weight: ``w`` (float) for float and re-quantized types,
    or the codes of a carried block type, as plain values (``q`` int8 / uint8 0..15, ``scale``, ``offset``
    ``[..., N, K // 32]``)."""

    kind: str  # "float" | "int8" | "int4"
    w: Optional[torch.Tensor] = None
    q: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None  # int4: w = scale * q + offset
    source: str = ""  # the GGUF type name
    requant: Optional[str] = None  # float from a quantized type: re-quantize to this kind

    def map(self, fn) -> "Rows":
        """The same tensor with ``fn`` applied to each field (a row permutation, an expert's slice)."""
        return Rows(self.kind, *(None if t is None else fn(t) for t in (self.w, self.q, self.scale, self.offset)),
                    self.source, self.requant)

    @property
    def rows(self) -> int:
        return (self.w if self.w is not None else self.q).shape[-2]


def read_rows(t) -> Rows:
    """A GGUF ``ReaderTensor`` as :class:`Rows`, copied out of the file mapping (shape: the numpy order,
    the reverse of GGML's ``ne``)."""
    import gguf

    kind = t.tensor_type.name
    shape = [int(n) for n in reversed(t.shape.tolist())]
    data = np.asarray(t.data)
    if kind in FLOATS:
        raw = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).copy())
        return Rows("float", w=raw.view(FLOATS[kind]).view(shape), source=kind)
    if kind in CARRIED:
        *lead, K = shape
        block = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
        b = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(*lead, K // 32, block).copy())
        d = b[..., 0:2].contiguous().view(torch.float16).squeeze(-1)  # [..., N, K/32]
        if kind == "Q8_0":
            q = b[..., 2:34].contiguous().view(torch.int8).reshape(*lead, K)
            return Rows("int8", q=q, scale=d, source=kind)
        qs = b[..., -16:]  # byte j: weight j in the low nibble, weight j + 16 in the high one
        q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(*lead, K)
        offset = -8 * d if kind == "Q4_0" else b[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
        return Rows("int4", q=q, scale=d, offset=offset, source=kind)
    try:
        w = gguf.quants.dequantize(data, t.tensor_type)
    except NotImplementedError:
        raise CheckpointError(f"tensor {t.name!r}: GGUF type {kind} cannot be dequantized by the gguf package") from None
    block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    bits = 8 * size / block
    return Rows("float", w=torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).view(shape), source=kind,
                requant="int4" if bits < 6 else "int8")


def unpermute_index(n_rows: int, n_head: int) -> torch.Tensor:
    """Row indices undoing llama.cpp's ``LlamaModel.permute`` of a q/k projection of ``n_head`` heads:
    ``original = permuted[index]``. Computed by applying the converter's own permutation to the row
    numbers (``permuted[i] = original[p[i]]``), so the inverse is ``argsort(p)``."""
    p = torch.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(n_rows)
    return torch.argsort(p)


def to_weight(r: Rows, dtype: torch.dtype, what: str, int4_scales: torch.dtype = torch.bfloat16):
    """A 2D :class:`Rows` as what the packed folder stores: a float tensor in ``dtype``, or a QuantWeight
    (carried block codes exactly, int8 scales as the file's fp16, int4 ``(scale, zero)`` in ``int4_scales``;
    a re-quantized type by moetier's quantize, scales in ``dtype``)."""
    if r.kind == "int8":
        return int8_from_codes(r.q, r.scale)
    if r.kind == "int4":  # zero = offset + 8 d in float32 (Q4_0: exactly 0), then rounded once
        qw = int4_from_codes(r.q, r.scale.float(), r.offset.float())
        return dataclasses.replace(qw, scales=qw.scales.to(int4_scales))
    if r.requant is not None:
        return quantize(r.w.float(), QuantScheme(r.requant), dtype=dtype, what=what)
    return r.w.to(dtype)


def cat_rows(a: Rows, b: Rows) -> Rows:
    """Gate rows then up rows: ``[2I, H]``. Two different kinds meet in float, re-quantized to the finer kind."""
    if a.kind == b.kind and a.requant == b.requant and (a.kind != "int4" or a.scale.dtype == b.scale.dtype):
        return Rows(a.kind, *(None if x is None else torch.cat([x, y], dim=-2)
                              for x, y in ((a.w, b.w), (a.q, b.q), (a.scale, b.scale), (a.offset, b.offset))),
                    a.source if a.source == b.source else f"{a.source}+{b.source}", a.requant)
    fa, fb = (_dequant(r) for r in (a, b))
    finer = "int8" if "int8" in (a.kind, b.kind, a.requant, b.requant) else "int4"
    return Rows("float", w=torch.cat([fa, fb], dim=-2), source=f"{a.source}+{b.source}", requant=finer)


def _dequant(r: Rows) -> torch.Tensor:
    if r.kind == "float":
        return r.w.float()
    G = r.q.shape[-1] // r.scale.shape[-1]
    q = r.q.float().unflatten(-1, (-1, G))
    w = q * r.scale.float()[..., None] + (0 if r.offset is None else r.offset.float()[..., None])
    return w.flatten(-2)


# --- planning: GGUF names onto the model's parameters -------------------------------------------------------

@dataclass
class _Layer:
    prefix: str  # model.layers.N.mlp.experts
    layer: int
    fused: dict  # "gate" | "up" | "down" -> ReaderTensor [E, ...]
    pieces: dict  # (expert, "gate" | "up" | "down") -> ReaderTensor (older per-expert GGUFs)

    def tensor(self, e: int, part: str):
        """``(tensor, expert index into it or None)``."""
        if part in self.fused:
            return self.fused[part], e
        return self.pieces.get((e, part)), None


def _plan(reader, path: Path, cfg: dict, expected: dict) -> tuple[dict, list[_Layer]]:
    import re

    dense, layers = {}, {}
    for t in reader.tensors:
        name = t.name
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        if m is None:
            target = _TOP_NAMES.get(name)
        else:
            bid, rest = int(m.group(1)), m.group(2)
            ex = re.fullmatch(r"ffn_(gate|up|down)(_exps|\.(\d+))\.weight", rest)
            if ex is not None:
                prefix = f"model.layers.{bid}.mlp.experts"
                lay = layers.setdefault(prefix, _Layer(prefix, bid, {}, {}))
                if ex.group(3) is None:
                    lay.fused[ex.group(1)] = t
                else:
                    lay.pieces[(int(ex.group(3)), ex.group(1))] = t
                continue
            target = f"model.layers.{bid}.{_LAYER_NAMES[rest]}" if rest in _LAYER_NAMES else None
        if target is None or target not in expected:
            log.warning("%s: ignoring GGUF tensor %s (the %s model has no place for it)", path.name, name,
                        cfg["model_type"])
            continue
        dense[target] = t
    for prefix, lay in layers.items():
        E, twoI, H = expected[f"{prefix}.gate_up_proj"].shape
        for e in range(E):
            for part, want in (("gate", (twoI // 2, H)), ("up", (twoI // 2, H)), ("down", (H, twoI // 2))):
                t, idx = lay.tensor(e, part)
                if t is None:
                    raise CheckpointError(f"{path}: lacks the {part} weight of expert {e} in layer {lay.layer}")
                got = tuple(int(n) for n in reversed(t.shape.tolist()))
                if (got[1:] if idx is not None else got) != want or (idx is not None and got[0] != E):
                    raise CheckpointError(f"{path}: tensor {t.name!r} has shape {list(got)}, expected "
                                          f"{[E, *want] if idx is not None else list(want)} from the metadata")
    for name, t in dense.items():
        got = tuple(int(n) for n in reversed(t.shape.tolist()))
        want = tuple(expected[name].shape)
        if got != want and [n for n in got if n != 1] != [n for n in want if n != 1]:  # [H] for [1, H] is fine
            raise CheckpointError(f"{path}: tensor {t.name!r} has shape {list(got)}, expected {list(want)} "
                                  f"for {name} from the metadata")
    covered = set(dense) | {f"{p}.{k}" for p in layers for k in ("gate_up_proj", "down_proj")}
    missing = [n for n in expected if n not in covered and not (n == "lm_head.weight" and cfg["tie_word_embeddings"])]
    if missing:
        raise CheckpointError(f"{path}: lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    return {n: dense[n] for n in expected if n in dense}, sorted(layers.values(), key=lambda lay: lay.layer)


def _scheme(kind: Optional[str], group_size: Optional[int]):
    from ..kernels.quant import parse_scheme

    return "none" if kind == "none" else parse_scheme(kind, group_size)


def _as_stored(r: Rows, target, dtype: torch.dtype, what: str, requantized: list, int4_scales=torch.bfloat16):
    """``r`` as the folder stores it. ``target``: None (as the file has it: carried blocks stay, other
    quantized types become the nearest kind), ``"none"`` (dequantized to ``dtype``) or a QuantScheme (blocks
    of that kind and group carried, anything else dequantized and quantized by it)."""
    if target is None:
        if r.requant is not None:
            requantized.append(f"{what} ({r.source} -> {r.requant})")
        return to_weight(r, dtype, what, int4_scales)
    if target == "none":
        return (r.w if r.kind == "float" else _dequant(r)).to(dtype)
    K = (r.w if r.w is not None else r.q).shape[-1]
    if r.kind == target.kind and r.scale.shape[-1] * target.group_for(K, what) == K:
        return to_weight(r, dtype, what, int4_scales)
    if r.kind != "float" or r.requant is not None:
        requantized.append(f"{what} ({r.source} -> {target.kind})")
    return quantize(_dequant(r), target, dtype=dtype, what=what)


# --- writing ------------------------------------------------------------------------------------------------

def _region_entry(w: _Writer, name: str, weight) -> dict:
    if isinstance(weight, QuantWeight):
        region, _ = w.write([[weight.codes], [weight.scales]])
        return {"name": name, **region, "dtype": dtype_name(weight.dtype), "shape": list(weight.shape),
                "quant": spec_of(weight).to_json()}
    region, _ = w.write([[weight.contiguous()]])
    return {"name": name, **region, "dtype": dtype_name(weight.dtype), "shape": list(weight.shape)}


def _expert_entry(w: _Writer, lay: _Layer, e: int, gu, dn) -> dict:
    """One expert region as packed_write.py (float) or packed_quant.py (QuantWeights) lays it out."""
    parts = [{"name": f"{lay.prefix}.gate_up_proj"}, {"name": f"{lay.prefix}.down_proj"}]
    if isinstance(gu, QuantWeight) and isinstance(dn, QuantWeight):
        region, (gu_off, _, dn_off, _) = w.write([[gu.codes], [gu.scales], [dn.codes], [dn.scales]])
        layout = QuantExpertLayout(spec_of(gu), spec_of(dn))
        assert dn_off == layout.down_offset and region["nbytes"] == layout.nbytes
        parts[0].update(quant=layout.gate_up_spec.to_json())
        parts[1].update(quant=layout.down_spec.to_json())
        dtype = gu.dtype
    else:
        region, (gu_off, dn_off) = w.write([[gu.contiguous()], [dn.contiguous()]])
        dtype = gu.dtype
    parts[0].update(offset=gu_off, shape=list(gu.shape))
    parts[1].update(offset=dn_off, shape=list(dn.shape))
    for p in parts:  # the index's key order: name, offset, shape[, quant]
        p.update({k: p.pop(k) for k in ("offset", "shape", *(("quant",) if "quant" in p else ()))})
    return {"name": f"{lay.prefix}[{e}]", "layer": lay.layer, "expert": e, **region, "dtype": dtype_name(dtype),
            "parts": parts}


def _tokenizer_files(src: Path, tokenizer: Optional[str | Path], into: Path) -> str:
    """Write the tokenizer files into ``into``; returns where they came from."""
    if tokenizer is not None and str(tokenizer) == "none":
        return "none"
    if tokenizer is not None:
        tdir = Path(tokenizer).expanduser()
        names = [f for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                             "vocab.json", "merges.txt", "chat_template.jinja") if (tdir / f).is_file()]
        if not names:
            raise MoetierError(f"{tdir}: no tokenizer files (tokenizer.json, tokenizer.model, ...) to copy")
        for f in names:
            shutil.copy2(tdir / f, into / f)
        return str(tdir)
    try:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(str(src.parent), gguf_file=src.name)
        tok.save_pretrained(str(into))
    except Exception as e:
        raise MoetierError(f"{src}: could not build a tokenizer from the GGUF vocabulary ({type(e).__name__}: "
                           f"{str(e)[:300]}); pass --tokenizer HF_DIR (a folder with the model's tokenizer files), "
                           f"or --tokenizer none to import without one (token-id prompts only)") from None
    return "gguf"


def import_gguf(src: str | Path, dst: str | Path, dtype: str | torch.dtype | None = None,
                tokenizer: Optional[str | Path] = None, max_file_size: int | str = DEFAULT_MAX_FILE_SIZE,
                force: bool = False, progress: bool = True, quant: Optional[str] = None,
                group_size: Optional[int] = None, quant_dense: Optional[str] = None,
                exact_scales: bool = False) -> Path:
    """Write the GGUF file ``src`` as a packed folder ``dst`` (see the module docstring); returns ``dst``.

    ``dtype``: the model's dtype (float weights, norms, embeddings, routers; default the file's
    ``general.file_type`` when it is F32/F16/BF16, else the embeddings' type if float, else bfloat16). ``tokenizer``: None (from the GGUF
    vocabulary), a folder to copy one from, or ``"none"``. ``quant`` / ``group_size`` (experts) and
    ``quant_dense`` (attention, LM head): None keeps each tensor's GGUF kind; ``"int8"``/``"int4"``
    re-quantize what is not already of that kind and group; ``"none"`` dequantizes to ``dtype``.
    ``exact_scales``: int4 blocks keep fp16 ``(d, zero)`` as in the file; by default they are rounded to
    bfloat16 (relative 2^-9, far under a 4-bit step), because torch's int4 CPU kernel computes in the
    scales' dtype and runs some 70x slower in float16 than in bfloat16. Codes are never changed.
    """
    from ..models import get_family
    from .loader import parse_dtype

    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    experts_target, dense_target = _scheme(quant, group_size), _scheme(quant_dense, None)
    max_file_size = parse_size(max_file_size)
    if not is_gguf(src):
        raise MoetierError(f"{src}: not a GGUF file")
    if dst.exists() and not dst.is_dir():
        raise MoetierError(f"{dst}: exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise MoetierError(f"{dst}: exists and is not empty; pass --force to replace it")
    if dst.resolve() in src.resolve().parents:
        raise MoetierError(f"{dst}: the output folder must not hold the source file")
    reader = _reader(src)
    cfg = gguf_config(reader, src)
    family = get_family(cfg["model_type"])
    try:
        args = family.args.from_dict(cfg)
    except ConfigError as e:
        raise ConfigError(f"{src}: the GGUF metadata gives an unusable config: {e}") from None
    embd = next((FLOATS.get(t.tensor_type.name) for t in reader.tensors if t.name == "token_embd.weight"), None)
    target = parse_dtype(dtype) or _FILE_TYPE_DTYPES.get(_field(reader, "general.file_type")) or embd or torch.bfloat16
    cfg["dtype"] = dtype_name(target)
    with torch.device("meta"):
        expected = dict(family.build(args).named_parameters())
    dense, layers = _plan(reader, src, cfg, expected)
    heads, kv_heads = args.num_attention_heads, args.num_key_value_heads or args.num_attention_heads
    total = sum(int(t.n_bytes) for t in reader.tensors)
    need = _needed_bytes(reader, target, len(dense) + sum(expected[f"{lay.prefix}.gate_up_proj"].shape[0]
                                                          for lay in layers))
    requantized: list[str] = []
    int4_scales = torch.float16 if exact_scales else torch.bfloat16
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    bar = _bar(total, "Importing", progress)
    try:
        with new_folder(dst, need) as tmp:
            source = _tokenizer_files(src, tokenizer, tmp)
            writer = _Writer(tmp, max_file_size, None)  # the bar counts the GGUF's bytes read
            tensors, experts = [], []
            try:
                for name, t in dense.items():
                    r = read_rows(t)
                    if cfg["model_type"] == "mixtral" and name.endswith(("q_proj.weight", "k_proj.weight")):
                        idx = unpermute_index(r.rows, heads if "q_proj" in name else kv_heads)
                        r = r.map(lambda x: x.index_select(0, idx))
                    want = tuple(expected[name].shape)
                    if name.endswith(_SIXTEEN_BIT) or len(want) != 2:  # norms, biases, routers, embeddings
                        keep = torch.float32 if family.weights.keeps_fp32(name) else target
                        w = (r.w if r.kind == "float" else _dequant(r)).to(keep).reshape(want)
                    else:
                        w = _as_stored(r, dense_target, target, name, requantized, int4_scales)
                    tensors.append(_region_entry(writer, name, w))
                    if bar is not None:
                        bar.update(int(t.n_bytes))
                for lay in layers:
                    E = expected[f"{lay.prefix}.gate_up_proj"].shape[0]
                    for e in range(E):
                        rows = {}
                        for part in ("gate", "up", "down"):
                            t, idx = lay.tensor(e, part)
                            rows[part] = read_rows(t) if idx is None else _expert_rows(t, idx)
                        gu = _as_stored(cat_rows(rows["gate"], rows["up"]), experts_target, target,
                                        f"{lay.prefix}.gate_up_proj", requantized, int4_scales)
                        dn = _as_stored(rows["down"], experts_target, target, f"{lay.prefix}.down_proj", requantized,
                                        int4_scales)
                        if isinstance(gu, QuantWeight) != isinstance(dn, QuantWeight):  # one region, one form
                            fix = QuantScheme("int8")
                            gu, dn = (x if isinstance(x, QuantWeight) else quantize(x.float(), fix, dtype=target)
                                      for x in (gu, dn))
                            requantized.append(f"{lay.prefix} (float part -> int8, beside a quantized one)")
                        experts.append(_expert_entry(writer, lay, e, gu, dn))
                        if bar is not None:
                            bar.update(sum(int(lay.tensor(e, p)[0].n_bytes) // (E if p in lay.fused else 1)
                                           for p in ("gate", "up", "down")))
            finally:
                writer.close()
            if requantized:
                seen = list(dict.fromkeys(requantized))
                log.warning("%s: %d tensor(s) re-quantized (their GGUF type has no exact moetier kind): %s%s",
                            src.name, len(seen), "; ".join(seen[:6]), " ..." if len(seen) > 6 else "")
            qinfo = _quant_info(tensors, experts)
            gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if k in cfg}
            _write_synced(tmp / "config.json", json.dumps(cfg, indent=2) + "\n")
            _write_synced(tmp / "generation_config.json", json.dumps(gen, indent=2) + "\n")
            index = {"format": FORMAT, "version": VERSION if qinfo is None else QUANT_VERSION, "alignment": ALIGN,
                     "checksum": "crc32", "dtype": dtype_name(target), "model_type": cfg["model_type"],
                     "created_by": f"moetier {__version__}", "files": writer.files,
                     "tensors": tensors, "experts": experts, **({"quant": qinfo} if qinfo else {}),
                     "source": {"gguf": src.name, "tensor_types": types, "tokenizer": source,
                                "requantized": sorted(set(requantized))}}
            _write_synced(tmp / INDEX_NAME, json.dumps(index, indent=1))
    finally:
        if bar is not None:
            bar.close()
    return dst


def _needed_bytes(reader, target: torch.dtype, regions: int) -> int:
    """About what the folder will take (checked before writing): a quantized tensor at int4's 0.625 or int8's
    1.07 bytes a weight (codes, fp16 scales), a float one (and the embeddings) in ``target``, each region
    padded to ALIGN (an expert region: three times), plus the tokenizer and index."""
    import gguf

    need = 0
    for t in reader.tensors:
        n = math.prod(int(x) for x in t.shape.tolist())
        kind = t.tensor_type.name
        if kind in FLOATS or t.name == "token_embd.weight" or len(t.shape) < 2:
            need += n * max(target.itemsize, FLOATS.get(kind, target).itemsize)
        else:
            block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            need += int(n * (0.625 if kind in ("Q4_0", "Q4_1") or 8 * size / block < 6 else 1.07))
    return need + 3 * ALIGN * regions + (64 << 20)


def _expert_rows(t, e: int) -> Rows:
    """Expert ``e`` of a fused ``[E, N, K]`` GGUF tensor, read on its own (one expert in memory at a time)."""

    class _One:  # the ReaderTensor fields read_rows uses, for one expert's slice
        tensor_type = t.tensor_type
        shape = t.shape[:-1]
        data = t.data[e]
        name = t.name

    return read_rows(_One)


def _quant_info(tensors: list, experts: list) -> Optional[dict]:
    """The index's top-level ``quant``: the kind and group of the first quantized expert and dense weight."""
    def one(entry):  # group_size None: int8 per-channel, as packed_quant.index_quant writes it
        if entry is None:
            return None
        q = entry["quant"]
        per_channel = q["kind"] == "int8" and q["group_size"] == entry["shape"][1]
        return {"kind": q["kind"], "group_size": None if per_channel else q["group_size"]}

    ex = next((p for r in experts for p in r["parts"] if "quant" in p), None)
    de = next((r for r in tensors if "quant" in r), None)
    return None if ex is None and de is None else {"experts": one(ex), "dense": one(de)}
