"""Load test of ``moetier serve``: many concurrent streaming clients vs one at a time.

Starts the server on a free loopback port, then runs N streaming completions with C
clients at once (default 200 requests, 32 clients), and the same kind of requests one
at a time (concurrency 1) for the batching gain. Each request streams ``--max-tokens``
tokens (EOS ignored, so every request does the same work). Prints one JSON object per
concurrency level and a summary with the ratio of aggregate tokens/s.

With --structured, the concurrent level runs again with every request constrained by a grammar
(``structured_outputs: {"regex": "[0-9+= ]{N,}"}`` with N = --max-tokens: as many tokens as the
plain run, since the pattern cannot end sooner), and one more JSON object gives the masking cost: the wall
time it adds per generated token.

    python bench/serve_load.py [--model demo] [--requests 200] [--concurrency 32] [--max-tokens 64] [--structured]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402


def start_server(model: str, extra: list[str]) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moetier", "serve", "--model", model, "--port", str(port), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            conn.getresponse().read()
            return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up")


def one_request(port: int, model: str, prompt: str, max_tokens: int, extra: dict | None = None) -> dict:
    """One streamed completion: TTFT, mean TPOT, tokens (from the usage chunk), or the error."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, **(extra or {})})
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            return {"error": f"HTTP {r.status}: {r.read()[:200]!r}"}
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                return {"error": obj["error"]["message"]}
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            elif obj["choices"] and obj["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
        conn.close()
    except OSError as e:
        return {"error": repr(e)}
    if first is None or tokens < 1:
        return {"error": "no tokens streamed"}
    return {"ttft": first - t0, "tpot": (last - first) / (tokens - 1) if tokens > 1 else None, "tokens": tokens}


def run_level(port: int, model: str, prompts: list[str], concurrency: int, max_tokens: int,
              extra: dict | None = None) -> dict:
    """``len(prompts)`` requests through ``concurrency`` client threads; latency percentiles and tokens/s."""
    results: list[dict] = []
    lock = threading.Lock()
    todo = iter(prompts)

    def client():
        while True:
            with lock:
                prompt = next(todo, None)
            if prompt is None:
                return
            r = one_request(port, model, prompt, max_tokens, extra)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttft = sorted(r["ttft"] for r in ok)
    tpot = sorted(r["tpot"] for r in ok if r["tpot"] is not None)
    tokens = sum(r["tokens"] for r in ok)
    return {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
            "error_examples": [r["error"] for r in results if "error" in r][:3],
            "ttft_ms": _pcts(ttft), "tpot_ms": _pcts(tpot), "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1)}


def _pcts(xs: list[float]) -> dict:
    if not xs:
        return {}
    q = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) > 1 else xs * 99
    return {"p50": round(q[49] * 1e3, 1), "p99": round(q[98] * 1e3, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--requests", type=int, default=200, help="requests at the high concurrency (default 200)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--serial-requests", type=int, default=24,
                    help="requests at concurrency 1 (default 24; its tokens/s settles quickly)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--server-arg", action="append", default=[], help="extra argument for moetier serve")
    ap.add_argument("--structured", action="store_true",
                    help="also run the concurrent level with a grammar and report the masking cost per token")
    a = ap.parse_args()
    prompts = [f"{i * 7 % 90 + 10}+{i * 13 % 900 + 10}=" for i in range(max(a.requests, a.serial_requests))]
    proc, port = start_server(a.model, a.server_arg)
    try:
        run_level(port, a.model, prompts[:2], 1, 4)  # load the model and warm up
        high = run_level(port, a.model, prompts[:a.requests], a.concurrency, a.max_tokens)
        emit({"bench": "serve_load", "model": a.model, "max_tokens": a.max_tokens, **high})
        serial = run_level(port, a.model, prompts[:a.serial_requests], 1, a.max_tokens)
        emit({"bench": "serve_load", "model": a.model, "max_tokens": a.max_tokens, **serial})
        if a.structured:
            so = {"structured_outputs": {"regex": f"[0-9+= ]{{{a.max_tokens},}}"}}
            grammar = run_level(port, a.model, prompts[:a.requests], a.concurrency, a.max_tokens, so)
            emit({"bench": "serve_structured", "model": a.model, "max_tokens": a.max_tokens, **so, **grammar})
            emit({"bench": "serve_structured_summary", "model": a.model, "concurrency": a.concurrency,
                  "failed_requests": grammar["errors"],
                  "tokens_per_s": {"plain": high["tokens_per_s"], "structured": grammar["tokens_per_s"]},
                  "mask_ms_per_token": round((grammar["wall_s"] / max(grammar["tokens"], 1)
                                              - high["wall_s"] / max(high["tokens"], 1)) * 1e3, 3)})
    finally:
        proc.terminate()
        proc.wait(30)
    emit({"bench": "serve_load_summary", "model": a.model, "concurrency": a.concurrency,
          "failed_requests": high["errors"] + serial["errors"],
          "tokens_per_s": {"concurrent": high["tokens_per_s"], "serial": serial["tokens_per_s"]},
          "batching_gain": round(high["tokens_per_s"] / serial["tokens_per_s"], 2),
          "target": {"failed_requests": 0, "batching_gain": 4.0}})


if __name__ == "__main__":
    main()
