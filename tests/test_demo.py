"""The packaged demo model: parity with transformers, learned accuracy, packaging, task files.

``LLM("demo")`` must behave like any other checkpoint, score clearly above a random-weight
model of the same shape on the held-out addition task, and ship inside the wheel.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from moetier import LLM, SamplingParams
from moetier.cli import main as cli_main
from moetier.demo import demo_path, task_path
from moetier.errors import TaskError
from moetier.evaluate import evaluate, load_task

from tiny import assert_logits_close, moetier_logits, reference_greedy, reference_logits

ROOT = Path(__file__).resolve().parent.parent
N_EVAL = 50
FLOOR = 0.5  # the shipped model scores far above this; random weights score 0


@pytest.fixture(scope="module")
def demo_llm():
    return LLM("demo", dtype="float32")


@pytest.fixture(scope="module")
def items():
    return load_task(task_path("addition"), limit=N_EVAL)


def test_demo_files_are_a_checkpoint():
    folder = demo_path()
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 20 * 2**20
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] is not None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith(tok.bos_token) and "What is 2+3?" in text
    assert tok.encode("12+345=")[0] == tok.bos_token_id


def test_demo_parity_with_transformers(demo_llm):
    folder = demo_path()
    ids = demo_llm.tokenizer.encode("The capital of France is Paris. 27+58=")
    ref = reference_logits(folder, ids)
    assert_logits_close(moetier_logits(demo_llm.model, ids), ref)
    assert_logits_close(moetier_logits(demo_llm.model, ids, split=len(ids) // 2), ref)
    prompt = demo_llm.tokenizer.encode("Alice has a")
    out = demo_llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
                            use_tqdm=False)
    assert out[0].outputs[0].token_ids == reference_greedy(folder, prompt, 16)


def test_demo_generates_its_domain(demo_llm):
    params = SamplingParams(max_tokens=12, temperature=0)
    out = demo_llm.generate(["21+34=", "The capital of Italy is"], params, use_tqdm=False)
    assert out[0].outputs[0].text.strip().isdigit()  # a number (whether right is test_demo_accuracy's job)
    assert out[0].outputs[0].finish_reason == "stop"  # the answer ends with EOS
    assert out[1].outputs[0].text.strip() == "Rome."
    chat = demo_llm.chat([{"role": "user", "content": "What is the capital of Japan?"}], params, use_tqdm=False)
    assert "Tokyo" in chat[0].outputs[0].text


def _cli_eval(capsys, model: str) -> dict:
    assert cli_main(["eval", "--model", model, "--limit", str(N_EVAL), "--quiet", "--routing"]) == 0
    return json.loads(capsys.readouterr().out)


def test_demo_accuracy_above_floor(capsys):
    report = _cli_eval(capsys, "demo")
    assert report["items"] == N_EVAL and report["accuracy"] >= FLOOR, report["accuracy"]
    shares = report["routing"]["top_experts_share"]
    assert set(shares) == {"0", "1", "2", "3"}
    assert report["routing"]["mean_top_experts_share"] > 0.3  # learned routing is skewed (uniform: 0.25)


def test_evaluate_api(demo_llm, items):
    result = evaluate(demo_llm, items[:10], use_tqdm=False)
    assert result["items"] == 10 and len(result["completions"]) == 10 and "routing" not in result
    assert result["accuracy"] >= FLOOR


def _random_weight_demo(folder: Path) -> Path:
    """Same config and tokenizer as the demo, weights freshly initialised by transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(str(demo_path()))
    AutoModelForCausalLM.from_config(cfg).float().save_pretrained(folder)
    for f in demo_path().iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(f, folder / f.name)
    return folder


def test_random_weights_fail_the_floor(tmp_path, capsys):
    report = _cli_eval(capsys, str(_random_weight_demo(tmp_path / "random")))
    assert report["accuracy"] < FLOOR
    assert report["accuracy"] <= 0.1


@pytest.mark.parametrize("body, message", [
    ('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n', ":2: missing key 'answer'"),
    ('{"prompt": "1+1=", "answer": "2"}\n\nnot json\n', ":3: not valid JSON"),
    ('["1+1=", "2"]\n', ":1: expected an object"),
    ('{"prompt": 5, "answer": "2"}\n', ":1: 'prompt' must be"),
    ("\n", "has no items"),
])
def test_bad_task_file(tmp_path, body, message):
    path = tmp_path / "task.jsonl"
    path.write_text(body)
    with pytest.raises(TaskError) as e:
        load_task(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value)


def test_bad_task_file_cli(tmp_path, capsys):
    path = tmp_path / "task.jsonl"
    path.write_text('{"answer": "2"}\n')
    assert cli_main(["eval", "--model", "demo", "--task", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:1: missing key 'prompt'" in err


def test_shipped_task_is_held_out():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from train_demo import is_held_out
    finally:
        sys.path.pop(0)
    items = load_task(task_path("addition"))
    assert len(items) >= 100
    for it in items:
        a, b = (int(x) for x in it.prompt.rstrip("=").split("+"))
        assert is_held_out(a, b) and str(a + b) == it.answer


def test_wheel_ships_demo_files(tmp_path):
    """The wheel holds the demo files, and an install of it (not the source tree) runs the demo."""
    build = tmp_path / "build"
    shutil.copytree(ROOT, build, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info",
                                                               "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, cwd=build)
    (wheel,) = (tmp_path / "dist").glob("moetier-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("moetier/demo_model/model.safetensors", "moetier/demo_model/config.json",
              "moetier/demo_model/generation_config.json", "moetier/demo_model/tokenizer.json",
              "moetier/demo_model/tokenizer_config.json", "moetier/tasks/addition.jsonl", "moetier/demo.py"):
        assert f in names, f
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts in site-packages
    code = ("import moetier, moetier.demo as d; from moetier import LLM, SamplingParams; "
            "print(moetier.__file__); print(d.demo_path()); "
            "print(LLM('demo').generate('The capital of Italy is', SamplingParams(max_tokens=8, temperature=0), "
            "use_tqdm=False)[0].outputs[0].text)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env={**__import__("os").environ, "PYTHONPATH": str(site)}).stdout.split("\n")
    assert out[0].startswith(str(site)) and out[1].startswith(str(site)), out
    assert out[2].strip() == "Rome."
