"""The command line, run as a user would."""

import subprocess
import sys

import pytest

from moetier import LLM, SamplingParams
from tiny import add_char_tokenizer, make_checkpoint

CONFIG = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, vocab_size=97,
              max_position_embeddings=64, eos_token_id=1)


def run(*args):
    return subprocess.run([sys.executable, "-m", "moetier", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("cli"), "mixtral", CONFIG)
    add_char_tokenizer(folder)
    return folder


def test_generate_streams_the_greedy_text(ckpt):
    r = run("generate", "--model", str(ckpt), "--prompt", "abc", "--max-tokens", "12", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    want = LLM(ckpt).generate(["abc"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert r.stdout == "abc" + want[0].outputs[0].text + "\n"


def test_chat_mode_runs(ckpt):
    r = run("generate", "--model", str(ckpt), "--prompt", "hi", "--chat", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("cmd", [[], ["generate"]])
def test_help_explains(cmd):
    r = run(*cmd, "--help")
    assert r.returncode == 0
    assert "usage: moetier" in r.stdout
    if cmd:
        assert "--max-tokens" in r.stdout and "--model" in r.stdout


def test_bad_model_is_a_clear_error(tmp_path):
    r = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode == 1
    assert "moetier: error:" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_generate_offloaded_prints_stats_and_same_text(ckpt, tmp_path):
    base = run("generate", "--model", str(ckpt), "--prompt", "abc", "--max-tokens", "8", "--ignore-eos")
    r = run("generate", "--model", str(ckpt), "--prompt", "abc", "--max-tokens", "8", "--ignore-eos",
            "--device-memory", "1GiB", "--offload-dir", str(tmp_path), "--cache-policy", "lru", "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout == base.stdout
    assert "[stats] expert hits" in r.stderr and "misses" in r.stderr


def test_too_small_budget_is_a_clear_cli_error(ckpt, tmp_path):
    r = run("generate", "--model", str(ckpt), "--prompt", "abc", "--device-memory", "1KiB",
            "--offload-dir", str(tmp_path))
    assert r.returncode == 1 and "give at least" in r.stderr and "Traceback" not in r.stderr
