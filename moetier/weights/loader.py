"""Build a model on the meta device and fill it from a checkpoint folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..models import Family, get_family
from ..models.args import BaseModelArgs
from ..models.decoder import CausalLM
from ..models.weights_map import ExpertPiece, layer_index
from .storage import weight_storage
from .safetensors import SafetensorsReader
from .packed import PackedCheckpoint, is_packed
from .checksum import checks_on_load

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``, ``"float32"``, ``torch.float16``... -> torch.dtype; ``None``/``"auto"`` -> None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value == "auto":
        return None
    if value not in _DTYPES:
        raise ValueError(f"dtype {value!r} is not supported; use one of: bfloat16, float16, float32, auto")
    return _DTYPES[value]


def read_config(folder: Path) -> dict:
    """Parse ``config.json``; a missing or malformed file is a ConfigError naming it."""
    path = folder / "config.json"
    if not folder.is_dir():
        raise ConfigError(f"{folder}: model folder does not exist")
    if not path.exists():
        raise ConfigError(f"{path}: missing (a model folder needs config.json)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: malformed JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if "text_config" in raw and "model_type" not in raw.get("text_config", {}):
        raise ConfigError(f"{path}: multimodal configs are not supported")
    return raw


def load_args(folder: Path) -> tuple[Family, BaseModelArgs, dict]:
    raw = read_config(folder)
    family = get_family(raw.get("model_type"))
    try:
        args = family.args.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{folder / 'config.json'}: {str(e).removeprefix('config.json: ')}") from e
    return family, args, raw


def checkpoint_dtype(raw: dict, reader: SafetensorsReader) -> torch.dtype:
    """The dtype the checkpoint declares (``dtype``/``torch_dtype``), else that of its first float tensor."""
    declared = raw.get("dtype") or raw.get("torch_dtype")
    if declared in _DTYPES:
        return _DTYPES[declared]
    for name in reader.names():
        if reader.dtype(name) in _ST_DTYPES:
            return _ST_DTYPES[reader.dtype(name)]
    return torch.float32


def load_model(
    folder: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
    *, verify: bool | str | None = None, experts: bool = True, experts_scheme=None,
) -> tuple[CausalLM, BaseModelArgs, dict]:
    """Return ``(model, args, raw_config)`` with every weight on ``device`` in ``dtype``.

    ``folder`` is a Hugging Face safetensors folder or a packed one (``moetier convert``), told
    apart by the packed index. ``verify``: a mode of :mod:`moetier.weights.checksum`; every mode
    but ``"off"`` checks the checksum of each region this load reads (packed folders; sizes are
    always checked; safetensors files carry no checksums). ``experts=False`` leaves the routed
    experts unloaded (on the meta device), for the expert store to serve.

    ``experts_scheme``: an exact ``kernels.quant.QuantScheme`` (``MXFP4_INT8``) that MXFP4 experts of a
    safetensors folder are quantized by as they are read, one expert at a time, so the load never holds
    a layer's experts dequantized; a QuantError if one cannot be held exactly (then load without it).
    """
    folder = Path(folder)
    family, args, raw = load_args(folder)
    device = torch.device(device)
    with torch.device("meta"):
        model = family.build(args)
    expected = {n: p for n, p in model.named_parameters() if experts or not is_expert_param(n)}
    quant: dict = {}  # quantized weights of a packed folder (packed_quant.load_quant_jobs)
    if is_packed(folder):
        with PackedCheckpoint(folder) as ckpt:
            dtype = parse_dtype(dtype) or ckpt.dtype
            state = ckpt.load_state(family.weights, expected, device, dtype, verify=checks_on_load(verify),
                                    quant=quant)
    else:
        with family.weights.open(SafetensorsReader(folder)) as reader:
            dtype = parse_dtype(dtype) or checkpoint_dtype(raw, reader)
            exact = experts_scheme if getattr(reader, "mxfp4", False) else None
            state = _collect(reader, family, args, expected, device, dtype, exact, quant)
    missing = [n for n in expected if n not in state and n not in quant and n.rsplit(".", 1)[0] not in quant]
    if args.tie_word_embeddings and "lm_head.weight" in missing:
        missing.remove("lm_head.weight")
    if missing:
        raise CheckpointError(
            f"{folder}: checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    if quant:
        _install_quant(model, quant)
    model.eval()
    return model, args, raw


def _install_quant(model, quant: dict) -> None:
    """Hand a packed folder's quantized weights to their modules (models/quantize.py, models/moe.py)."""
    from ..models.quantize import quantize_dense

    dense = {}
    for name, q in quant.items():
        if isinstance(q, tuple):  # a layer's experts: (layout, regions)
            model.get_submodule(name).install_regions(*q)
        else:
            dense[name] = q
    if dense:
        quantize_dense(model, None, install=dense)


def is_expert_param(name: str) -> bool:
    """Whether ``name`` is a layer's stacked routed-expert weights."""
    return name.endswith((".experts.gate_up_proj", ".experts.down_proj"))


def mapped_names(reader: SafetensorsReader, family: Family, args: BaseModelArgs):
    """``(checkpoint name, moetier name or ExpertPiece)`` for each tensor of the decoder layers."""
    for hf_name in reader.names():
        li = layer_index(hf_name)
        if li is not None and li >= args.num_hidden_layers:
            continue  # e.g. DeepSeek-V3 multi-token-prediction layers, not used for decoding
        yield hf_name, family.weights.translate(hf_name)


def _collect(reader, family, args, expected, device, dtype, scheme=None, quant=None) -> dict[str, torch.Tensor]:
    """Read every tensor the model expects, checking shapes, stacking per-expert pieces; with ``scheme``,
    stacked experts go into ``quant`` as ``(layout, regions)`` per layer instead (:func:`_quantized_experts`)."""
    state: dict[str, torch.Tensor] = {}
    pieces: dict[str, list[tuple[ExpertPiece, str]]] = {}
    stacked: dict[str, dict[str, str]] = {}  # experts prefix -> {gate_up_proj | down_proj: checkpoint name}
    for hf_name, name in mapped_names(reader, family, args):
        if isinstance(name, ExpertPiece):
            pieces.setdefault(name.target, []).append((name, hf_name))
            continue
        if name not in expected:
            log.debug("ignoring checkpoint tensor %s", hf_name)
            continue
        if scheme is not None and is_expert_param(name):
            prefix, kind = name.rsplit(".", 1)
            stacked.setdefault(prefix, {})[kind] = hf_name
            continue
        _check_shape(reader, hf_name, reader.shape(hf_name), tuple(expected[name].shape))
        want = torch.float32 if family.weights.keeps_fp32(name) else dtype
        state[name] = _own(reader.get(hf_name), device, want)
    for target, items in pieces.items():
        if target not in expected:
            log.debug("ignoring expert tensors for %s", target)
            continue
        state[target] = _stack_experts(reader, target, items, tuple(expected[target].shape), device, dtype)
    for prefix, names in stacked.items():
        if len(names) < 2:  # not both as one stack: read as they are
            for kind, hf_name in names.items():
                _check_shape(reader, hf_name, reader.shape(hf_name), tuple(expected[f"{prefix}.{kind}"].shape))
                state[f"{prefix}.{kind}"] = _own(reader.get(hf_name), device, dtype)
            continue
        quant[prefix] = _quantized_experts(reader, prefix, names, expected, device, dtype, scheme)
    return state


def _quantized_experts(reader, prefix: str, names: dict, expected: dict, device, dtype, scheme):
    """One layer's experts quantized by ``scheme`` as they are read, one expert at a time, into regions laid
    out as resident quantized experts are (``Experts.quantize``): ``(layout, regions [E, slot_bytes])``."""
    from ..kernels.quant import quantize
    from ..kernels.region import QuantExpertLayout
    from .packed_quant import _storage

    gu, dn = (tuple(expected[f"{prefix}.{k}"].shape) for k in ("gate_up_proj", "down_proj"))
    for kind, shape in (("gate_up_proj", gu), ("down_proj", dn)):
        _check_shape(reader, names[kind], reader.shape(names[kind]), shape)
    layout = QuantExpertLayout.of(scheme, gu[1:], dn[1:], dtype)
    regions = _storage(gu[0] * layout.slot_bytes, device).view(gu[0], layout.slot_bytes)
    for e in range(gu[0]):
        w = [quantize(reader.read(names[k], e).to(dtype), scheme, what=f"{prefix}.{k}[{e}]")
             for k in ("gate_up_proj", "down_proj")]
        layout.write(regions[e], *w)
    return layout, regions


def _own(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``t`` copied into :func:`weight_storage` (never a view of a checkpoint file's mapping)."""
    return weight_storage(t.shape, device, dtype).copy_(t)


def _stack_experts(reader, target, items, shape, device, dtype) -> torch.Tensor:
    """Fill ``[E, 2I, H]`` (gate rows then up rows) or ``[E, H, I]`` from per-expert 2D tensors."""
    out = weight_storage(shape, device, dtype)
    n_exp = shape[0]
    fused = target.endswith("gate_up_proj")
    rows = shape[1] // 2 if fused else shape[1]
    seen = set()
    for piece, hf_name in items:
        if piece.expert >= n_exp:
            raise CheckpointError(
                f"{reader.file_of(hf_name)}: tensor {hf_name!r} is for expert {piece.expert} "
                f"but the config has {n_exp} experts"
            )
        _check_shape(reader, hf_name, reader.shape(hf_name), (rows, shape[2]))
        lo = rows if piece.part == "up" else 0
        out[piece.expert, lo : lo + rows].copy_(reader.get(hf_name))
        seen.add((piece.expert, piece.part))
    parts = ("gate", "up") if fused else ("down",)
    lacking = [(e, p) for e in range(n_exp) for p in parts if (e, p) not in seen]
    if lacking:
        e, p = lacking[0]
        raise CheckpointError(f"checkpoint lacks the {p} weight of expert {e} for {target} ({len(lacking)} missing)")
    return out


def _check_shape(reader, hf_name: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise CheckpointError(
            f"{reader.file_of(hf_name)}: tensor {hf_name!r} has shape {list(got)}, expected {list(want)} from config.json"
        )
