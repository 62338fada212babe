"""``moetier chat``, driven through its standard input as a user at a terminal would."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest
from tiny import add_char_tokenizer, make_checkpoint

from moetier import LLM, SamplingParams

Q1, Q2 = "What is 12+34?", "What is 7+8?"


def chat(*args, stdin: str):
    return subprocess.run([sys.executable, "-m", "moetier", "chat", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def demo():
    return LLM("demo")


def _greedy(llm, messages, n=40) -> str:
    return llm.chat(messages, SamplingParams(max_tokens=n, temperature=0), use_tqdm=False)[0].outputs[0].text


def test_turns_carry_the_history(demo):
    r = chat("--model", "demo", "--max-tokens", "40", stdin=f"{Q1}\n{Q2}\n/clear\n{Q2}\n/bye\nnever read\n")
    assert r.returncode == 0, r.stderr
    a1 = _greedy(demo, [{"role": "user", "content": Q1}])
    a2 = _greedy(demo, [{"role": "user", "content": Q1}, {"role": "assistant", "content": a1},
                        {"role": "user", "content": Q2}])
    fresh = _greedy(demo, [{"role": "user", "content": Q2}])
    assert a2 != fresh  # the history changes the demo's answer, so the check below can fail
    assert r.stdout == f"{a1}\n{a2}\n{fresh}\n"
    assert "cleared" in r.stderr


def test_system_message_and_commands(demo):
    r = chat("--model", "demo", "--max-tokens", "20", "--system", "Be brief.", stdin=f"{Q1}\n/help\n/nope\n")
    assert r.returncode == 0, r.stderr
    want = _greedy(demo, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": Q1}], 20)
    assert r.stdout == want + "\n"
    assert "/clear" in r.stderr and "unknown command /nope" in r.stderr


def test_context_overflow_is_one_line_and_the_session_goes_on():
    long = "1+1=" * 40  # the demo's context is 128 tokens
    r = chat("--model", "demo", "--max-tokens", "8", stdin=f"{long}\n{Q1}\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert "maximum context length is 128" in r.stderr and "/clear" in r.stderr
    assert r.stdout.count("\n") == 1  # the second turn was answered


def _read_until(fd, want: bytes, timeout: float = 120) -> bytes:
    got, deadline = b"", time.time() + timeout
    while want not in got:
        assert time.time() < deadline, got[-200:]
        if select.select([fd], [], [], 1)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, got[-200:]
            got += chunk
    return got


def test_ctrl_c_stops_the_reply_not_the_session(tmp_path):
    cfg = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, vocab_size=97,
               max_position_embeddings=100000, eos_token_id=1)
    folder = make_checkpoint(tmp_path, "mixtral", cfg)
    add_char_tokenizer(folder)
    p = subprocess.Popen([sys.executable, "-m", "moetier", "chat", "--model", str(folder), "--max-tokens", "50000",
                          "--ignore-eos", "--threads", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, bufsize=0)
    try:
        for turn in ("abc", "def"):
            p.stdin.write(turn.encode() + b"\n")
            assert os.read(p.stdout.fileno(), 1)  # the reply has begun (50000 tokens: it is far from done)
            p.send_signal(signal.SIGINT)
            _read_until(p.stderr.fileno(), b"[stopped]")
            assert p.poll() is None  # the session is still there
            while select.select([p.stdout], [], [], 0.5)[0]:  # what the stopped reply wrote
                os.read(p.stdout.fileno(), 65536)
        p.stdin.close()
        assert p.wait(60) == 0
    finally:
        if p.poll() is None:
            p.kill()
