"""Per-token decode latency of a MoE bigger than its memory budget: moetier's expert cache vs accelerate.

Prints one JSON object per result (``"what"`` says which), then a ``summary``:

- ``setup``: the synthetic Mixtral (random weights, hub layout, bf16), its size, the budget;
- ``disk``: the disk read rate measured in this run on the packed checkpoint: a sequential
  O_DIRECT read (16 MiB buffer) and random single-expert reads as the expert store does them;
- ``resident``: moetier with every weight in RAM (no budget): the compute floor per token;
- ``moetier``: one per (cache policy, prefetch mode) under ``--budget``: per-token decode latency
  (median, p90) at batch 1, decode-only hit rate, prefetch counters, stall per token, bytes read
  per token and the limit they imply (bytes read per token / disk rate);
- ``accelerate``: transformers + accelerate, ``device_map="auto"``, ``max_memory={"cpu": budget}``,
  ``offload_folder`` (the way accelerate users offload to disk), the same prompt, greedy;
- ``demo``: the packaged demo model (skewed routing) with ``expert_slots`` about a third of its
  experts, on prompts of its task: hit rate per policy and prefetch mode;
- ``summary``: the table, the ratios and whether the issue's targets are met.

The page cache. The host has more RAM than the budget, so the OS could keep the whole
checkpoint cached and turn "disk" reads into memory copies, which a model really bigger than
RAM would not get. ``--cold per-token`` (default) drops the weight files' pages
(``posix_fadvise(DONTNEED)``, after ``sync``) before every decode step, untimed, for both
engines: every byte a step needs from the disk tier then comes from the disk. moetier reads
experts with O_DIRECT, which bypasses the cache anyway; accelerate reads its offload folder
through it. ``--cold none`` leaves the cache alone (accelerate is then served from RAM the
budget does not count); ``--acc-modes`` runs accelerate both ways.

Every engine configuration runs in its own process (bench/latency_worker.py), so each one's RSS is its own,
and every configuration runs ``--rounds`` times round-robin; the summary pools the rounds' tokens
and takes ratios against the peer within a round. Workers use one torch thread by default (both
engines): on a small host shared with other jobs two OpenMP threads lose whole time slices.
Each moetier configuration starts with an empty trace library and runs ``--warmup-requests``
requests (other prompts) before the timed one, which fill the library and the cache.

    python bench/latency.py                        # the issue's size: 32-layer Mixtral ~5.5 GiB, 2 GiB budget (~16 min)
    python bench/latency.py --layers 16 --budget 1GiB --rounds 1      # ~2.8 GiB model, faster
    python bench/latency.py --layers 4 --budget 0.5GiB --quick        # a smoke run (~2 min)

``--ram-limit SIZE`` runs a different comparison (bench/latency_ram.py): every engine (moetier at
each of ``--ram-budgets``, llama.cpp's mmap through llama-cpp-python, accelerate) inside a memory
cgroup of SIZE (bench/cgroup.py; needs root or a delegated cgroup), conversion included:

    python bench/latency.py --layers 16 --ram-limit 2GiB --rounds 3 --new-tokens 16 --warmup-requests 1 \
        --warmup-tokens 4 --acc-tokens 4 --gguf-converter llama_cpp_python-0.3.36.tar.gz     # ~10 min
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from common import emit, mixtral_config  # noqa: E402
from latency_worker import GB, GIB, disk_rates, model_name, pct, prompt_ids, skew_router, spawn  # noqa: E402



# -- the run ---------------------------------------------------------------------------------------



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/moetier-bench-latency"),
                    help="where the synthetic checkpoint, its packed copy and the offload folders live")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--layers", type=int, default=32, help="32: ~5.5 GiB bf16 (the issue's medium Mixtral)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--skew", type=float, default=0.0,
                    help="scale a quarter of each router's rows by this (0: random routing)")
    ap.add_argument("--budget", default="2GiB",
                    help="RAM budget for both engines (moetier device_memory, accelerate max_memory['cpu'])")
    ap.add_argument("--device", default="cpu",
                    help="cpu, or cuda: --budget is then the GPU budget of both engines (moetier device_memory, "
                         "accelerate max_memory[0]) and --host-memory their host tier")
    ap.add_argument("--host-memory", default=None, metavar="SIZE",
                    help="with --device cuda: moetier's pinned host tier and accelerate's max_memory['cpu']")
    ap.add_argument("--policies", nargs="+", default=["lru", "lfu", "activation"])
    ap.add_argument("--prefetch", nargs="+", default=["trace", "lookahead", "none"])
    ap.add_argument("--rounds", type=int, default=2,
                    help="run every configuration this many times, round-robin (the host is shared and noisy)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=24, help="tokens generated by each timed moetier request")
    ap.add_argument("--warmup-requests", type=int, default=2,
                    help="requests run before the timed one (they fill the trace library and the cache)")
    ap.add_argument("--warmup-tokens", type=int, default=6)
    ap.add_argument("--acc-tokens", type=int, default=10, help="tokens generated by each timed accelerate request")
    ap.add_argument("--cold", choices=["per-token", "none"], default="per-token",
                    help="drop the weight files from the page cache before every step (see above)")
    ap.add_argument("--acc-modes", nargs="+", default=["per-token", "none"], choices=["per-token", "none"],
                    help="page-cache modes to run accelerate in; the equal-budget comparison uses --cold's")
    ap.add_argument("--skip-accelerate", action="store_true")
    ap.add_argument("--skip-resident", action="store_true", help="skip the all-resident compute-floor run")
    ap.add_argument("--skip-synthetic", action="store_true", help="only the demo model")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--demo-slots", type=int, default=12, help="expert slots for the demo model (it has 32 experts)")
    ap.add_argument("--demo-warmup", type=int, default=20, help="demo task prompts run first (trace library)")
    ap.add_argument("--demo-prompts", type=int, default=60, help="demo task prompts measured")
    ap.add_argument("--demo-tokens", type=int, default=6)
    ap.add_argument("--demo-task", default="addition")
    ap.add_argument("--disk-probe-gib", type=float, default=1.0, help="bytes to read for the sequential disk rate")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in every worker, both engines (default 1: on a small shared host two "
                         "OpenMP threads fall apart when another process takes a core; 0: torch's choice)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per worker process")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 1 round, few tokens, lru/activation x trace/none")
    ap.add_argument("--cleanup", action="store_true", help="delete --dir at the end (checkpoints can be many GB)")
    ap.add_argument("--ram-limit", default=None, metavar="SIZE",
                    help="run every engine in a memory cgroup of SIZE, conversion included (see above)")
    ap.add_argument("--ram-budgets", nargs="+", default=["1GiB", "1400MiB", "auto"],
                    help="with --ram-limit: moetier's device_memory values")
    ap.add_argument("--acc-budget", default=None,
                    help="with --ram-limit: accelerate's max_memory['cpu'] (default: the first of --ram-budgets)")
    ap.add_argument("--gguf-converter", default=None, metavar="PATH",
                    help="with --ram-limit: llama.cpp's convert_hf_to_gguf.py, its folder, or the llama-cpp-python "
                         "sdist (default: $LLAMA_CPP_CONVERTER)")
    ap.add_argument("--skip-llama", action="store_true", help="with --ram-limit: no llama.cpp run")
    ap.add_argument("--unlimited-refs", action="store_true",
                    help="with --ram-limit: also moetier all-resident and llama.cpp outside the limit")
    args = ap.parse_args()

    if args.quick:
        args.rounds, args.new_tokens, args.acc_tokens, args.warmup_requests, args.warmup_tokens = 1, 8, 4, 1, 4
        args.policies, args.prefetch, args.acc_modes = ["lru", "activation"], ["trace", "none"], [args.cold]
        args.demo_prompts, args.demo_warmup = 20, 10
    t_start = time.perf_counter()
    import torch

    from moetier.experts.setup import ensure_packed
    from moetier.units import parse_size

    def out(row: dict) -> dict:
        emit(row)
        return row

    folder = args.dir / model_name(args)
    if args.ram_limit:
        import latency_ram

        out(latency_ram.run(args, str(HERE / "latency_worker.py"), folder, prompt_ids))
        return
    budget = parse_size(args.budget)
    rows: list[dict] = []
    demo_rows: list[dict] = []
    setup = disk = None
    if not args.skip_synthetic:
        from common import synthetic_checkpoint

        t0 = time.perf_counter()
        made = not (folder / "config.json").exists()
        synthetic_checkpoint(folder, "mixtral", mixtral_config(args), dtype=torch.bfloat16)
        if made and args.skew:
            skew_router(folder, args.skew, args.experts)
        made_s = time.perf_counter() - t0
        off = args.dir / (folder.name + "-offload")
        t0 = time.perf_counter()
        packed = ensure_packed(folder, torch.bfloat16, off)
        convert_s = time.perf_counter() - t0
        hf_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        from moetier.weights.packed import PackedCheckpoint

        with PackedCheckpoint(packed) as ck:
            expert_bytes = sum(r.nbytes for r in ck.experts.values())
            n_experts = len(ck.experts)
        setup = out({
            "what": "setup", "model": folder.name, "model_gib": round(hf_bytes / GIB, 3),
            "experts_gib": round(expert_bytes / GIB, 3), "experts": n_experts, "budget": args.budget,
            "model_over_budget": round(hf_bytes / budget, 2), "layers": args.layers, "skew": args.skew,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "acc_tokens": args.acc_tokens,
            "warmup_requests": args.warmup_requests, "warmup_tokens": args.warmup_tokens, "rounds": args.rounds,
            "cold": args.cold, "cpus": os.cpu_count(), "load_avg": os.getloadavg()[0], "torch": torch.__version__,
            "torch_threads": args.threads or torch.get_num_threads(), "made_s": round(made_s, 1),
            "convert_s": round(convert_s, 1), "scaled_down": args.layers < 32 or budget < 2 * GIB})
        disk = out({"what": "disk", **disk_rates(packed, int(args.disk_probe_gib * GIB), 48, 4)})

        base = {"folder": str(folder), "packed": str(packed), "offload_dir": str(off), "budget": args.budget,
                "vocab": args.vocab, "prompt_len": args.prompt_len,
                "prompt": prompt_ids(args.vocab, args.prompt_len, 0),
                "new_tokens": args.new_tokens, "warmup_requests": args.warmup_requests,
                "warmup_tokens": args.warmup_tokens, "cold": args.cold, "threads": args.threads,
                "device": args.device, "host_memory": args.host_memory}
        specs = []
        if not args.skip_resident:
            specs.append({**base, "kind": "moetier", "policy": None, "prefetch": None, "warmup_requests": 1})
        specs += [{**base, "kind": "moetier", "policy": p, "prefetch": m} for p in args.policies for m in args.prefetch]
        if not args.skip_accelerate:
            specs += [{**base, "kind": "accelerate", "cold": mode, "new_tokens": args.acc_tokens,
                       "offload_dir": str(args.dir / (folder.name + "-accelerate-offload"))} for mode in args.acc_modes]
        rate = disk["seq_direct_gbps"] * GB
        for r in range(args.rounds):
            for spec in specs:
                for row in spawn(spec, args.timeout):
                    row["round"] = r
                    if row.get("bytes_read_per_token") is not None:  # moetier: what it read per token
                        row["limit_ms_per_token"] = round(row["bytes_read_per_token"] / rate * 1e3, 1)
                    if row.get("what") == "accelerate" and "bytes_offloaded" in row:  # all it offloaded, if cold
                        row["limit_ms_per_token"] = round(row["bytes_offloaded"] / rate * 1e3, 1)
                    rows.append(out(row))

    if not args.skip_demo:
        for row in spawn({"kind": "demo", "offload_dir": str(args.dir / "demo-offload"), "slots": args.demo_slots,
                          "policies": args.policies, "prefetch": args.prefetch, "warmup": args.demo_warmup,
                          "prompts": args.demo_prompts, "tokens": args.demo_tokens, "task": args.demo_task,
                          "threads": args.threads}, args.timeout):
            if "error" not in row:
                demo_rows.append(row)
            out(row)

    out(summarize(rows, demo_rows, setup, disk, args, time.perf_counter() - t_start))
    if args.cleanup:
        shutil.rmtree(args.dir, ignore_errors=True)


def _key(r: dict) -> str:
    if r["what"] == "accelerate":
        return f"accelerate/{r['cold']}"
    if r["what"] == "resident":
        return "moetier/all-resident"
    return f"{r['policy']}/{r['prefetch']}"


def summarize(rows, demo_rows, setup, disk, args, elapsed) -> dict:
    """Pool the rounds: per configuration, the median and p90 of every timed token of every round."""
    s: dict = {"what": "summary", "elapsed_s": round(elapsed, 1)}
    if setup:
        s.update({k: setup[k] for k in ("model", "model_gib", "budget", "rounds", "torch_threads", "cold")})
    errors = [r for r in rows if "error" in r]
    if errors:
        s["errors"] = [{"config": r.get("what"), **{k: r.get(k) for k in ("policy", "prefetch", "cold", "error")}}
                       for r in errors]
    ok = [r for r in rows if "error" not in r]
    groups: dict[str, list[dict]] = {}
    for r in ok:
        groups.setdefault(_key(r), []).append(r)
    table = {}
    for k, rs in groups.items():
        steps = [x / 1e3 for r in rs for x in r["step_ms"]]
        e = {"median_ms": round(statistics.median(steps) * 1e3, 1), "p90_ms": round(pct(steps, 0.9) * 1e3, 1),
             "round_medians_ms": [r["median_ms"] for r in rs], "rss_gib": max(r["rss_gib"] for r in rs)}
        if "hit_rate" in rs[0]:
            e.update({
                "hit_rate": round(statistics.fmean(r["hit_rate"] for r in rs), 4),
                "stall_ms_per_token": round(statistics.fmean(r["stall_ms_per_token"] for r in rs), 1),
                "read_mib_per_token": round(statistics.fmean(r["bytes_read_per_token"] for r in rs) / 2**20, 1),
                "prefetched_per_token": round(statistics.fmean(r["prefetched_per_token"] for r in rs), 2),
                "wasted_prefetches_per_token": round(statistics.fmean(r["wasted_prefetches_per_token"] for r in rs), 2),
                "limit_ms_per_token": round(statistics.fmean(r["limit_ms_per_token"] for r in rs), 1)})
        if "limit_ms_per_token" in rs[0] and "hit_rate" not in rs[0]:
            e["limit_ms_per_token"] = rs[0]["limit_ms_per_token"]
        table[k] = e
    s["table"] = table
    targets: dict = {}
    moe = {k: v for k, v in table.items() if "hit_rate" in v}
    by_round = {(_key(r), r["round"]): r for r in ok}
    if moe:
        moe_rows = [r for r in ok if r["what"] == "moetier"]
        s["moetier_outputs_identical"] = len({tuple(r["tokens"]) for r in moe_rows}) == 1
        res = [r for r in ok if r["what"] == "resident"]
        if res:
            s["moetier_matches_all_resident"] = all(r["tokens"] == res[0]["tokens"] for r in moe_rows)
        best = min(moe, key=lambda k: moe[k]["median_ms"])
        b = moe[best]
        s["best"] = best
        compute = table.get("moetier/all-resident", {}).get("median_ms")
        io_ms = b["read_mib_per_token"] * 2**20 / (disk["seq_direct_gbps"] * GB) * 1e3
        best_rows = groups[best]
        mean_ms = statistics.fmean(r["mean_ms"] for r in best_rows)
        s["best_breakdown_ms_per_token"] = {
            "total_median": b["median_ms"], "total_mean": round(mean_ms, 1),
            "stall_mean": b["stall_ms_per_token"],
            "compute_all_resident_median": compute,
            "other_mean": None if compute is None else round(mean_ms - b["stall_ms_per_token"] - compute, 1),
            "disk_read_time_at_seq_rate": round(io_ms, 1),
            "disk_read_hidden_behind_compute": round(max(0.0, io_ms - b["stall_ms_per_token"]), 1),
            "note": "CPU: an expert is read from disk straight into its slot (O_DIRECT), so the only copy is the "
                    "disk read; stall = time the forward waited for it (llm.stats()); compute = the all-resident "
                    "run; other = mean - stall - compute (bookkeeping, prefetch decisions, contention)"}
        s["limit_ms_per_token"] = {"best_reads_over_disk_rate": b["limit_ms_per_token"]}
        if compute is not None:
            lim = b["limit_ms_per_token"]
            s["limit_ms_per_token"].update({"with_compute_perfect_overlap": round(max(compute, lim), 1),
                                            "with_compute_no_overlap": round(compute + lim, 1),
                                            "best_over_no_overlap_limit": round(b["median_ms"] / (compute + lim), 2)})
        pf = {}
        for p in args.policies:
            for m in ("trace", "lookahead"):
                ratios = [by_round[(f"{p}/none", r)]["median_ms"] / by_round[(f"{p}/{m}", r)]["median_ms"]
                          for r in range(args.rounds) if (f"{p}/none", r) in by_round and (f"{p}/{m}", r) in by_round]
                if ratios:
                    pf[f"{p}/{m}"] = round(statistics.median(ratios), 3)
        s["prefetch_speedup_vs_none"] = pf
        if pf:
            targets["prefetch_on_faster_than_off"] = {
                "met": max(pf.values()) > 1.0, "met_by": sorted(k for k, v in pf.items() if v > 1.0),
                "note": "median over rounds of median(none) / median(prefetch on), same policy, same round"}
        acc = {k: v for k, v in table.items() if k.startswith("accelerate/")}
        if acc:
            sp = {}
            for k in acc:
                ratios = [by_round[(k, r)]["median_ms"] / by_round[(best, r)]["median_ms"]
                          for r in range(args.rounds) if (k, r) in by_round and (best, r) in by_round]
                sp[k] = {"pooled": round(acc[k]["median_ms"] / b["median_ms"], 2),
                         "per_round": [round(x, 2) for x in ratios]}
            s["speedup_vs_accelerate"] = sp
            acc_rows = [r for r in ok if r["what"] == "accelerate"]
            ours = best_rows[0]["tokens"]
            s["accelerate_same_tokens"] = all(r["tokens"] == ours[: len(r["tokens"])] for r in acc_rows)
            if not s["accelerate_same_tokens"]:  # bf16 rounding differs from transformers'; random weights tie often
                theirs = acc_rows[0]["tokens"]
                s["accelerate_first_different_token"] = next(
                    (i for i, (a, b2) in enumerate(zip(ours, theirs)) if a != b2), None)
            eq = f"accelerate/{args.cold}"
            if eq in sp:
                targets["5x_faster_than_accelerate_equal_budget"] = {
                    "met": sp[eq]["pooled"] >= 5.0, "speedup": sp[eq]["pooled"], "accelerate": eq, "moetier": best}
    if demo_rows:
        s["demo"] = {f"{r['policy']}/{r['prefetch']}": {"hit_rate": r["hit_rate_decode"], "median_ms": r["median_ms"],
                                                       "prefetched": r["prefetched"], "wasted": r["wasted_prefetches"]}
                     for r in demo_rows}
        dm = {(r["policy"], r["prefetch"]): r["hit_rate_decode"] for r in demo_rows}
        pairs = {m: (dm.get(("activation", m)), dm.get(("lru", m))) for m in args.prefetch}
        pairs = {m: v for m, v in pairs.items() if None not in v}
        if pairs:
            alone = pairs.get("none")
            targets["activation_hit_rate_above_lru_on_demo"] = {
                "met": (alone[0] > alone[1]) if alone else all(a > b for a, b in pairs.values()),
                "met_with_every_prefetch_mode": all(a > b for a, b in pairs.values()),
                "note": "met: the policies alone (prefetch none); with prefetch on, hits also count prefetched experts",
                **{m: {"activation": a, "lru": b} for m, (a, b) in pairs.items()}}
        s["demo_outputs_identical"] = all(r["same_tokens_as_first_config"] in (None, True) for r in demo_rows)
    s["targets"] = targets
    return s


if __name__ == "__main__":
    main()
