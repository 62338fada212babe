"""What Ray costs on one machine: the same batch file through `moetier batch` locally and through
`moetier batch --ray local` (a one-node Ray cluster started on 127.0.0.1 for the run).

Runs, each a fresh process, in turn (--rounds times, medians):
- ``local``: ``moetier batch --threads T``;
- ``ray_1x{T}``: ``--ray local --replicas 1 --threads T``: one replica with the same threads;
- ``ray_2x{T/2}``: ``--ray local --replicas 2 --threads T/2`` (two replicas splitting the cores),
  against ``ray_1x{T}``.
Reports per run the process wall time, the job's own time (local: the summary's ``seconds``, the
run after the model load; ray: ``run_s``, after the replicas are loaded) and tokens/s; the
overhead figure is ray_1x over local on the job time (target: within 10 %) and on the wall time
(which adds Ray's start, ~10-20 s here).

  python bench/ray_overhead.py --requests 256 --max-tokens 32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_job(path: Path, n: int, max_tokens: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"prompt": f"{i % 97} + {i % 13} =", "max_tokens": max_tokens,
                                         "temperature": 0, "ignore_eos": True}}) + "\n")


def run(model: str, inp: Path, out: Path, threads: int, ray: list[str]) -> dict:
    if out.exists():
        out.unlink()
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    cmd = [sys.executable, "-m", "moetier", "batch", "--model", model, "--input", str(inp), "--output", str(out),
           "--threads", str(threads), "--quiet", *ray]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    s = json.loads(p.stdout.strip().splitlines()[-1])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    tokens = sum(e["response"]["body"]["usage"]["completion_tokens"] for e in lines if e["response"])
    job = s.get("run_s", s.get("seconds"))
    return {"wall_s": round(wall, 2), "job_s": job, "tokens": tokens, "tok_s": round(tokens / job, 1),
            "answered": len(lines)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    half = max(1, a.threads // 2)
    setups = {"local": (a.threads, []), f"ray_1x{a.threads}": (a.threads, ["--ray", "local", "--replicas", "1"]),
              f"ray_2x{half}": (half, ["--ray", "local", "--replicas", "2"])}
    runs: dict[str, list[dict]] = {k: [] for k in setups}
    with tempfile.TemporaryDirectory() as d:
        inp = Path(d) / "in.jsonl"
        write_job(inp, a.requests, a.max_tokens)
        for _ in range(a.rounds):
            for name, (threads, extra) in setups.items():
                r = run(a.model, inp, Path(d) / f"{name}.jsonl", threads, extra)
                runs[name].append(r)
                print(json.dumps({"run": name, **r}), flush=True)
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("wall_s", "job_s", "tok_s")} for k, v in runs.items()}
    one = med[f"ray_1x{a.threads}"]
    print(json.dumps({"summary": med, "requests": a.requests, "max_tokens": a.max_tokens, "cpus": os.cpu_count(),
                      "ray_1_over_local_job": round(one["job_s"] / med["local"]["job_s"], 3),
                      "ray_1_over_local_wall": round(one["wall_s"] / med["local"]["wall_s"], 3),
                      f"ray_2x{half}_over_1x{a.threads}_tok_s":
                          round(med[f"ray_2x{half}"]["tok_s"] / one["tok_s"], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
