"""``bench/latency.py --ram-limit SIZE``: every engine in a memory cgroup of SIZE, as on a machine
with that much RAM (page cache counted, no swap; bench/cgroup.py).

- ``convert``: moetier's first-use conversion of the HF folder to the packed format, in the limit;
- ``moetier``: one per ``--ram-budgets`` entry (``auto`` included: the limit less moetier.ram's
  margin), the engine's default cache policy and prefetch;
- ``llama.cpp``: the same bf16 model as a GGUF (bench/gguf_peer.py) through llama-cpp-python,
  plain mmap (the OS page cache is its expert cache), where llama-cpp-python is installed;
- ``accelerate``: transformers + accelerate disk offload with ``max_memory={"cpu": --acc-budget}``;
- with ``--unlimited-refs``, outside any limit: moetier all-resident and llama.cpp with the whole
  file cached after its warm-up, the compute floors (what the limit costs each engine).

No page dropping between tokens here: the cgroup's limit is what keeps the page cache from
holding the model. Before each worker the model files are dropped from the host's page cache,
so that what a worker reads is charged to its own group, not served from pages charged
elsewhere. Engines alternate within each of ``--rounds`` rounds; the summary pools every timed
token of a configuration (median), takes the mean hit rate, the highest peak and any OOM kill,
and each engine's ratio to llama.cpp within a round (median over rounds).
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

from common import drop_file_cache, emit, mixtral_config, spawn_worker, synthetic_checkpoint

GIB = 2**30


def _files(*folders_or_files) -> list[Path]:
    out = []
    for p in folders_or_files:
        p = Path(p)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.exists():
            out.append(p)
    return out


def key(r: dict) -> str:
    if r["what"] == "moetier":
        return f"moetier/{r['budget']}"
    if r["what"] == "accelerate":
        return f"accelerate/{r['budget']}"
    if r["what"] == "resident":
        return "moetier/all-resident, no limit"
    if r.get("unlimited"):
        return f"{r['what']}, no limit"
    return r["what"]


def run(args, script: str, folder: Path, prompt_ids) -> dict:
    """The whole ``--ram-limit`` run; emits each row as it comes and returns the summary row."""
    import torch

    from moetier.experts.setup import packed_cache_dir
    from moetier.units import parse_size

    from cgroup import cgroup_support

    ok, why = cgroup_support()
    if not ok:
        raise SystemExit(f"--ram-limit needs a memory cgroup it can create (root, or a delegated subtree): {why}")
    t_start = time.perf_counter()
    limit = parse_size(args.ram_limit)
    synthetic_checkpoint(folder, "mixtral", mixtral_config(args), dtype=torch.bfloat16)
    off = args.dir / (folder.name + "-ramlimit-offload")
    packed = packed_cache_dir(folder, torch.bfloat16, off)
    acc_off = args.dir / (folder.name + "-ramlimit-accelerate-offload")
    gguf = args.dir / (folder.name + ".bf16.gguf")
    hf_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    rows: list[dict] = []

    def spawn(spec: dict, round_: int | None = None) -> list[dict]:
        drop_file_cache(_files(folder, off, acc_off, gguf))
        unlimited = spec.get("unlimited", False)  # a reference: the same engine with all the RAM it wants
        got = spawn_worker(script, spec, args.timeout, tags=("budget", "mode"), ram_limit=None if unlimited else limit)
        for row in got:
            row.setdefault("budget", spec.get("budget"))
            row["round"], row["unlimited"] = round_, unlimited
            emit(row)
        return got

    emit({"what": "setup", "model": folder.name, "model_gib": round(hf_bytes / GIB, 3), "ram_limit": args.ram_limit,
          "budgets": args.ram_budgets, "rounds": args.rounds, "new_tokens": args.new_tokens,
          "acc_tokens": args.acc_tokens, "warmup_requests": args.warmup_requests, "threads": args.threads,
          "torch": torch.__version__})
    shutil.rmtree(packed, ignore_errors=True)  # convert inside the limit, as a first use would
    conv = spawn({"kind": "convert", "folder": str(folder), "offload_dir": str(off)})
    rows += conv
    if any("error" in r for r in conv):
        return {"what": "summary", "error": "conversion failed under the limit", "convert": conv}

    llama = None
    if not args.skip_llama:
        from gguf_peer import llama_cpp_version, make_gguf

        llama = llama_cpp_version()
        if llama is None:
            emit({"what": "llama.cpp", "skipped": "llama-cpp-python is not installed (pip install llama-cpp-python)"})
        else:
            t0 = time.perf_counter()
            try:
                make_gguf(folder, gguf, "bf16", args.gguf_converter)
                emit({"what": "gguf", "path": str(gguf), "gib": round(gguf.stat().st_size / GIB, 3),
                      "seconds": round(time.perf_counter() - t0, 1)})
            except (FileNotFoundError, RuntimeError) as e:
                emit({"what": "llama.cpp", "skipped": f"no GGUF: {e}"})
                llama = None

    base = {"folder": str(folder), "packed": str(packed), "offload_dir": str(off), "vocab": args.vocab,
            "prompt_len": args.prompt_len, "prompt": prompt_ids(args.vocab, args.prompt_len, 0),
            "new_tokens": args.new_tokens, "warmup_requests": args.warmup_requests,
            "warmup_tokens": args.warmup_tokens, "cold": "none", "threads": args.threads, "device": "cpu",
            "host_memory": None}
    budgets = [b for b in args.ram_budgets]
    acc_budget = args.acc_budget or next((b for b in budgets if b != "auto"), "1GiB")
    specs = [{**base, "kind": "moetier", "policy": "activation", "prefetch": "lookahead", "budget": b}
             for b in budgets]
    if llama is not None:
        specs.append({**base, "kind": "llamacpp", "gguf": str(gguf), "mode": "mmap"})
    if not args.skip_accelerate:
        specs.append({**base, "kind": "accelerate", "budget": acc_budget, "new_tokens": args.acc_tokens,
                      "offload_dir": str(acc_off)})
    if args.unlimited_refs:  # what the limit costs each engine: moetier all-resident, llama.cpp fully cached
        specs.append({**base, "kind": "moetier", "policy": None, "prefetch": None, "unlimited": True})
        if llama is not None:
            specs.append({**base, "kind": "llamacpp", "gguf": str(gguf), "mode": "mmap", "unlimited": True})
    for r in range(args.rounds):
        for spec in specs:
            rows += spawn(spec, r)
    return summarize(rows, args, limit, time.perf_counter() - t_start)


def summarize(rows: list[dict], args, limit: int, elapsed: float) -> dict:
    s: dict = {"what": "summary", "ram_limit": args.ram_limit, "ram_limit_mib": round(limit / 2**20, 1),
               "rounds": args.rounds, "elapsed_s": round(elapsed, 1)}
    conv = next((r for r in rows if r["what"] == "convert"), None)
    if conv:
        s["convert"] = {k: conv.get(k) for k in ("convert_s", "peak_mib", "oom_killed", "reached_limit", "error")}
    timed = [r for r in rows if r["what"] in ("moetier", "llama.cpp", "accelerate", "resident")]
    groups: dict[str, list[dict]] = {}
    for r in timed:
        groups.setdefault(key(r), []).append(r)
    table = {}
    for k, rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        e = {"runs": len(rs), "failed": len(rs) - len(ok), "oom_killed": any(r.get("oom_killed") for r in rs),
             "peak_mib": max((r["peak_mib"] for r in rs if r.get("peak_mib") is not None), default=None),
             "reached_limit": any(r.get("reached_limit") for r in rs)}
        if ok:
            steps = [x for r in ok for x in r["step_ms"]]
            e.update({"ms_per_token_median": round(statistics.median(steps), 1),
                      "round_medians_ms": [r["median_ms"] for r in ok]})
            if ok[0].get("hit_rate") is not None:
                e["hit_rate"] = round(statistics.fmean(r["hit_rate"] for r in ok), 4)
                e["budget_mib"] = round(ok[0]["budget_gib"] * 1024, 1)
                e["expert_slots"] = ok[0]["expert_slots"]
            if ok[0].get("major_faults_per_token") is not None:
                e["major_faults_per_token"] = round(statistics.fmean(r["major_faults_per_token"] for r in ok), 1)
        errs = [r["error"] for r in rs if "error" in r]
        if errs:
            e["errors"] = sorted(set(errs))
        table[k] = e
    s["table"] = table
    by_round = {(key(r), r["round"]): r for r in timed if "error" not in r}
    if any(k == "llama.cpp" for k, _ in by_round):
        ratios = {}
        for k in table:
            if k == "llama.cpp":
                continue
            if k.endswith("no limit"):
                continue
            xs = [by_round[("llama.cpp", i)]["median_ms"] / by_round[(k, i)]["median_ms"]
                  for i in range(args.rounds) if (k, i) in by_round and ("llama.cpp", i) in by_round]
            if xs:
                ratios[k] = round(statistics.median(xs), 2)
        s["speedup_vs_llama_cpp"] = ratios  # > 1: faster than llama.cpp's mmap in the same limit
    moe = [r for r in timed if r["what"] == "moetier" and "error" not in r]
    if moe:
        s["moetier_outputs_identical"] = len({tuple(r["tokens"]) for r in moe}) == 1
        res = [r for r in timed if r["what"] == "resident" and "error" not in r]
        if res:
            s["moetier_matches_all_resident"] = all(r["tokens"] == res[0]["tokens"] for r in moe)
        lc = [r for r in timed if r["what"] == "llama.cpp" and "error" not in r]
        if lc:
            n = min(len(lc[0]["tokens"]), len(moe[0]["tokens"]))
            s["llama_cpp_same_tokens"] = lc[0]["tokens"][:n] == moe[0]["tokens"][:n]
    return s
