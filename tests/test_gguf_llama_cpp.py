"""GGUF import against llama.cpp itself: its real converter's files and its own outputs.

Needs llama-cpp-python (``llama_cpp``: its ``llama_model_quantize`` and its inference) and llama.cpp's
``convert_hf_to_gguf.py`` (``$LLAMA_CPP_CONVERTER``: the script, its folder or the llama-cpp-python
sdist, see bench/gguf_peer.py); skipped where either is missing (CI: tests/test_gguf.py covers the
importer on GGUFs written with the gguf package's writer).

Tolerances: llama.cpp multiplies Q8_0 / Q4_0 weights by activations it first rounds to 8 bits (its
``vec_dot_type``), moetier by float32 activations, so the two differ by llama.cpp's own activation
rounding: on this model a mean |delta log p| of about 0.02 (bf16: 0.004) over 45 positions. The
test allows 0.06 (bf16 0.015) and a top-1 agreement of 0.85 (bf16: 1.0); greedy continuations are
not compared token for token (one near-tie flips the rest).
"""

import ctypes
import sys
from pathlib import Path

import pytest
import torch

from moetier.weights.loader import load_model
from tiny import make_checkpoint

llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from gguf_peer import find_converter, make_gguf  # noqa: E402
from quant import LlamaCpp, prompts  # noqa: E402

from moetier.weights.gguf import import_gguf  # noqa: E402

CONFIG = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=300,
              max_position_embeddings=256, rope_theta=1e6)
LIMITS = {"bf16": (0.015, 1.0), "Q8_0": (0.06, 0.85), "Q4_0": (0.06, 0.85)}  # mean |dlogp|, top-1 agreement


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("llama_cpp")
    try:
        find_converter(None, base / ".converter")
    except FileNotFoundError as e:
        pytest.skip(f"no llama.cpp converter: {e}")
    hf = make_checkpoint(base / "hf", "mixtral", CONFIG)
    out = {"hf": hf, "bf16": make_gguf(hf, base / "m-bf16.gguf", "bf16")}
    for q in ("Q8_0", "Q4_0"):
        out[q] = base / f"m-{q}.gguf"
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{q}")
        p.nthread = 1
        assert llama_cpp.llama_model_quantize(str(out["bf16"]).encode(), str(out[q]).encode(), ctypes.byref(p)) == 0
    return out


def test_converter_bf16_file_imports_as_the_checkpoint(files, tmp_path):
    """llama.cpp's own converter (q/k rows permuted, experts fused): every weight back as the HF
    checkpoint's, rounded to bf16 as the converter wrote it."""
    out = import_gguf(files["bf16"], tmp_path / "out", progress=False)
    ours, _, _ = load_model(out, dtype="float32")
    theirs, _, _ = load_model(files["hf"], dtype="float32")
    a, b = ours.state_dict(), theirs.state_dict()
    for k in b:
        assert torch.equal(a[k], b[k].to(torch.bfloat16).float()), k


@pytest.mark.parametrize("q", ["bf16", "Q8_0", "Q4_0"])
def test_logits_match_llama_cpp(files, tmp_path, q):
    from moetier import LLM

    llm = LLM(import_gguf(files[q], tmp_path / "out", dtype="float32", progress=False))
    theirs = LlamaCpp(str(files[q]), 1, 1, 256, repack=False)  # repacking segfaults on tiny shapes here
    dlogp, agree = [], []
    for ids in prompts(3, 16, 1, vocab=CONFIG["vocab_size"]):
        a, b = llm.next_token_logprobs(ids), theirs.logprobs(ids)
        tgt = torch.tensor(ids[1:])[:, None]
        dlogp += (a.gather(1, tgt) - b.gather(1, tgt)).abs()[:, 0].tolist()
        agree += (a.argmax(-1) == b.argmax(-1)).tolist()
    mean, top1 = sum(dlogp) / len(dlogp), sum(agree) / len(agree)
    max_mean, min_top1 = LIMITS[q]
    assert mean <= max_mean and top1 >= min_top1, f"{q}: mean |dlogp| {mean:.4f}, top-1 agreement {top1:.3f}"
