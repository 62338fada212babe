"""moetier eval --kl-base: KL divergence, top-1 agreement and perplexity against transformers' logits."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moetier import LLM
from moetier.cli import main
from moetier.errors import TaskError
from moetier.text_eval import make_windows, text_eval
from tiny import FAMILY_CONFIGS, add_char_tokenizer, make_checkpoint, reference_logits

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ("The quick brown fox jumps over the lazy dog. 12+34=46. Mixture-of-experts models route each token "
        "to a few experts; the rest stay idle.")
CTX = 16


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    cfg = dict(FAMILY_CONFIGS["mixtral"], vocab_size=97, eos_token_id=1, bos_token_id=0, pad_token_id=0)
    folder = make_checkpoint(tmp_path_factory.mktemp("base"), "mixtral", cfg)
    add_char_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def perturbed(base, tmp_path_factory):
    """The base with every weight scaled by 1 + 5% noise (as a quantization error would be)."""
    folder = tmp_path_factory.mktemp("perturbed") / "model"
    shutil.copytree(base, folder)
    g = torch.Generator().manual_seed(7)
    sd = load_file(folder / "model.safetensors")
    save_file({k: (v * (1 + 0.05 * torch.randn(v.shape, generator=g))).contiguous() for k, v in sd.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


def _windows(tokenizer):
    """The documented split, computed here: BOS, then CTX - 1 tokens of text, per window."""
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    step = CTX - 1
    return [[tokenizer.bos_token_id] + ids[i * step:(i + 1) * step] for i in range(len(ids) // step)]


def _reference_scores(base_dir, model_dir, windows):
    """KL(base || model), top-1 agreement, perplexities and mean |delta log p| from transformers' logits."""
    kl, top1, nll_m, nll_b = [], [], [], []
    for ids in windows:
        lb = torch.log_softmax(reference_logits(base_dir, ids).double(), -1)[:-1][CTX // 2:]
        lm = torch.log_softmax(reference_logits(model_dir, ids).double(), -1)[:-1][CTX // 2:]
        t = torch.tensor(ids[1:])[CTX // 2:]
        kl.append((lb.exp() * (lb - lm)).sum(-1))
        top1.append(lb.argmax(-1) == lm.argmax(-1))
        nll_m.append(-lm.gather(1, t[:, None])[:, 0])
        nll_b.append(-lb.gather(1, t[:, None])[:, 0])
    kl, top1, nll_m, nll_b = (torch.cat(x) for x in (kl, top1, nll_m, nll_b))
    return {"kl": kl.mean().item(), "kl_max": kl.max().item(), "top1": top1.double().mean().item(),
            "ppl": math.exp(nll_m.mean().item()), "base_ppl": math.exp(nll_b.mean().item()),
            "dlogp": (nll_m - nll_b).abs().mean().item(), "n": kl.numel()}


def test_windows_follow_the_documented_split(base):
    llm = LLM(base, dtype="float32")
    assert make_windows(llm.tokenizer, TEXT, CTX) == _windows(llm.tokenizer)
    assert make_windows(llm.tokenizer, TEXT, CTX, limit=2) == _windows(llm.tokenizer)[:2]
    with pytest.raises(TaskError, match="fewer than one window"):
        make_windows(llm.tokenizer, "short", CTX)


def test_kl_of_a_model_against_itself_is_zero(base):
    a, b = LLM(base, dtype="float32"), LLM(base, dtype="float32")
    r = text_eval(a, _windows(a.tokenizer), base=b, use_tqdm=False)
    assert r["kl_divergence"] == {"mean": 0.0, "stderr": 0.0, "median": 0.0, "p99": 0.0, "max": 0.0}
    assert r["top1_agreement"] == 1.0 and r["mean_abs_delta_logprob"] == 0.0
    assert r["perplexity"] == r["base_perplexity"]


def test_kl_against_a_different_model_matches_transformers(base, perturbed):
    model, ref = LLM(perturbed, dtype="float32"), LLM(base, dtype="float32")
    windows = _windows(model.tokenizer)
    r = text_eval(model, windows, base=ref, use_tqdm=False)
    want = _reference_scores(base, perturbed, windows)
    assert r["tokens_scored"] == want["n"] == len(windows) * (CTX - 1 - CTX // 2)
    assert want["kl"] > 1e-3  # the perturbation is visible, so the comparison below means something
    assert r["kl_divergence"]["mean"] == pytest.approx(want["kl"], rel=1e-3)
    assert r["kl_divergence"]["max"] == pytest.approx(want["kl_max"], rel=1e-3)
    assert r["top1_agreement"] == pytest.approx(want["top1"], abs=1.5 / want["n"])  # one near-tie may flip
    assert r["perplexity"] == pytest.approx(want["ppl"], rel=1e-4)
    assert r["base_perplexity"] == pytest.approx(want["base_ppl"], rel=1e-4)
    assert r["mean_abs_delta_logprob"] == pytest.approx(want["dlogp"], rel=1e-3)


def test_cli_reports_json_and_rejects_bad_input(base, perturbed, text_file, capsys):
    assert main(["eval", "--model", str(perturbed), "--kl-base", str(base), "--text", str(text_file),
                 "--ctx", str(CTX), "--dtype", "float32", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kl_divergence"]["mean"] > 0 and 0 <= report["top1_agreement"] <= 1
    assert report["ctx"] == CTX and report["windows"] == len(TEXT) // (CTX - 1)
    assert main(["eval", "--model", str(base), "--kl-base", str(base), "--kl-base-dtype", "bfloat16", "--dtype",
                 "float32", "--text", str(text_file), "--ctx", str(CTX), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["kl_divergence"]["mean"] > 0  # what bf16 costs against float32
    assert main(["eval", "--model", str(base), "--text", str(text_file), "--ctx", "16", "--quiet"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert "kl_divergence" not in alone and alone["perplexity"] > 1
    for argv, message in [
        (["--ctx", "256"], "does not fit the context"),
        (["--ctx", "200"], "fewer than one window"),
        (["--text", str(text_file.parent / "missing.txt")], "does not exist"),
        (["--task", str(text_file)], "options of the task evaluation"),
    ]:
        argv = ["eval", "--model", str(perturbed), "--kl-base", str(base), "--text", str(text_file), *argv]
        assert main(argv) == 1
        assert message in capsys.readouterr().err


def test_demo_against_itself_out_of_the_box(capsys):
    assert main(["eval", "--model", "demo", "--kl-base", "demo", "--limit", "2", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kl_divergence"]["mean"] == 0.0 and report["top1_agreement"] == 1.0
    assert report["windows"] == 2 and report["ctx"] == 127  # the demo's 128-token context
