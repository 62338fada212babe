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

Every engine configuration runs in its own process (``--worker``), so each one's RSS is its own,
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
import json
import os
import random
import resource
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from common import drop_file_cache, emit, mixtral_config, raw_read, spawn_worker  # noqa: E402

GB = 1e9
GIB = 2**30


# -- small helpers ---------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of xs by linear interpolation."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def latency_fields(samples: list[float], keep: bool = True) -> dict:
    extra = {"step_ms": [round(x * 1e3, 1) for x in samples]} if keep else {}
    return {**extra, "tokens_timed": len(samples), "median_ms": round(statistics.median(samples) * 1e3, 1),
            "p90_ms": round(pct(samples, 0.9) * 1e3, 1), "mean_ms": round(statistics.fmean(samples) * 1e3, 1),
            "min_ms": round(min(samples) * 1e3, 1), "max_ms": round(max(samples) * 1e3, 1)}


def rss_gib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) * 1024 / GIB, 3)
    return float("nan")


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)


def model_name(args) -> str:
    skew = f"-skew{args.skew:g}" if args.skew else ""
    return f"mixtral-h{args.hidden}-i{args.intermediate}-l{args.layers}-e{args.experts}-bfloat16{skew}"


def skew_router(folder: Path, skew: float, experts: int) -> None:
    """Make routing skewed: scale up the router rows of a few experts per layer (in place)."""
    from safetensors.torch import load_file, save_file

    g = random.Random(0)
    for f in sorted(folder.glob("*.safetensors")):
        sd = load_file(f)
        changed = False
        for k, v in sd.items():
            if k.endswith("mlp.gate.weight"):
                hot = g.sample(range(experts), max(1, experts // 4))
                v = v.clone()
                v[hot] *= skew
                sd[k] = v
                changed = True
        if changed:
            save_file(sd, f, metadata={"format": "pt"})


def prompt_ids(vocab: int, length: int, seed: int) -> list[int]:
    g = random.Random(seed)
    return [g.randrange(3, vocab) for _ in range(length)]


# -- the disk ------------------------------------------------------------------------------------


def disk_rates(packed: Path, probe_bytes: int, expert_reads: int, threads: int) -> dict:
    """Sequential O_DIRECT read of the packed weight files (up to ``probe_bytes``), and random
    single-expert reads (1 thread, and ``threads`` threads as the store issues them), cold."""
    from concurrent.futures import ThreadPoolExecutor

    from moetier.weights.direct_io import aligned_buffer
    from moetier.weights.packed import PackedCheckpoint

    files = sorted(packed.glob("weights-*.bin"))
    drop_file_cache(files)
    t0 = time.perf_counter()
    total = raw_read(files, direct=True, limit=probe_bytes)
    seq = total / (time.perf_counter() - t0)
    out = {"seq_direct_gbps": round(seq / GB, 3), "seq_bytes": total}
    with PackedCheckpoint(packed) as ck:
        keys = sorted(ck.experts)
        g = random.Random(1)
        size = ck.experts[keys[0]].read_nbytes
        nbytes = ck.experts[keys[0]].nbytes
        for nthreads in (1, threads):
            drop_file_cache(files)
            pick = g.sample(keys, min(expert_reads, len(keys)))
            local = threading.local()

            def one(key):
                b = getattr(local, "buf", None)
                if b is None:
                    b = local.buf = aligned_buffer(size)
                ck.read_into(key[0], key[1], b)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(nthreads) as ex:
                list(ex.map(one, pick))
            rate = len(pick) * nbytes / (time.perf_counter() - t0)
            out[f"expert_read_{nthreads}thr_gbps"] = round(rate / GB, 3)
        out["expert_mib"] = round(nbytes / 2**20, 2)
    return out


# -- workers (each in its own process) -------------------------------------------------------------


def run_request(llm, ids, n, drop=False, files=(), name="r"):
    """One batch-1 request of ``n`` greedy tokens; step times, tokens, stats after the prefill step."""
    from moetier import SamplingParams

    engine = llm.engine
    engine.add_request(name, ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    times, tokens, after_prefill = [], [], None
    while engine.has_unfinished():
        if drop:
            drop_file_cache(list(files))
        t = time.perf_counter()
        events = engine.step()
        times.append(time.perf_counter() - t)
        tokens.extend(e.token for e in events)
        if after_prefill is None:
            after_prefill = dict(llm.stats())
    return times, tokens, after_prefill


def stat_delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a.get(k, 0) for k in b if isinstance(b[k], (int, float)) and k != "hit_rate"}


def worker_moetier(spec: dict) -> None:
    import torch

    from moetier import LLM

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    off = Path(spec["offload_dir"])
    (off / "traces.npz").unlink(missing_ok=True)  # every configuration starts with an empty trace library
    kw = {} if spec["policy"] is None else dict(
        device_memory=spec["budget"], offload_dir=off, cache_policy=spec["policy"], prefetch=spec["prefetch"],
        host_memory=spec["host_memory"])
    t0 = time.perf_counter()
    llm = LLM(spec["folder"], dtype="bfloat16", device=spec["device"], **kw)
    load_s = time.perf_counter() - t0
    files = sorted(Path(spec["packed"]).glob("weights-*.bin")) if spec["policy"] else []
    drop = spec["cold"] == "per-token" and bool(files)
    for i in range(spec["warmup_requests"]):
        run_request(llm, prompt_ids(spec["vocab"], spec["prompt_len"], 100 + i), spec["warmup_tokens"], drop, files,
                    name=f"w{i}")
    before = dict(llm.stats())
    times, tokens, after_prefill = run_request(llm, spec["prompt"], spec["new_tokens"], drop, files, name="m")
    after = dict(llm.stats())
    decode = times[1:]  # the first step is the prefill (it also yields the first token)
    out = {"what": "moetier" if spec["policy"] else "resident", "policy": spec["policy"],
           "prefetch": spec["prefetch"], "load_s": round(load_s, 2), "prefill_ms": round(times[0] * 1e3, 1),
           **latency_fields(decode), "tokens": tokens, "rss_gib": rss_gib(), "peak_rss_gib": peak_rss_gib()}
    if spec["policy"]:
        d = stat_delta(after_prefill, after)
        n = len(decode)
        req = d["hits"] + d["misses"]
        mem = llm.memory
        out.update({
            "hit_rate": round(d["hits"] / req, 4) if req else None,
            "hit_rate_whole_request": round((after["hits"] - before["hits"]) / max(
                1, after["hits"] + after["misses"] - before["hits"] - before["misses"]), 4),
            "misses_per_token": round(d["misses"] / n, 2), "prefetch_hits_per_token": round(d["prefetch_hits"] / n, 2),
            "prefetch_late_per_token": round(d["prefetch_late"] / n, 2),
            "prefetched_per_token": round(d["prefetched"] / n, 2),
            "wasted_prefetches_per_token": round(d["wasted_prefetches"] / n, 2),
            "bytes_read_per_token": int(d["bytes_disk_to_host"] / n),
            "stall_ms_per_token": round(d["stall_s"] / n * 1e3, 1),
            "stall_fraction": round(d["stall_s"] / sum(decode), 3),
            "expert_slots": mem["expert_slots"], "slot_bytes": mem["slot_bytes"],
            "dense_gib": round(mem["dense_bytes"] / GIB, 3), "budget_gib": round(mem["device_budget"] / GIB, 3),
            "accounted_gib": round(mem["device_bytes"] / GIB, 3),
        })
        llm.close()
    emit(out)


class _Timestamps:
    """A transformers streamer that timestamps every token; the first ``put`` is the prompt.

    With ``drop`` it drops the weight files' pages after stamping, so that time is not counted
    (the next interval starts after the drop)."""

    def __init__(self, drop: bool, files: list[Path]):
        self.drop, self.files = drop, files
        self.starts: list[float] = []  # when each step began (after the previous drop)
        self.ends: list[float] = []  # when each token arrived

    def put(self, value) -> None:
        self.ends.append(time.perf_counter())
        if self.drop:
            drop_file_cache(self.files)
        self.starts.append(time.perf_counter())

    def end(self) -> None:
        pass

    def step_times(self) -> list[float]:
        # put #0 is the prompt, put #1 the first token (prefill); decode step i ends at put #i+1
        return [self.ends[i + 1] - self.starts[i] for i in range(1, len(self.ends) - 1)]


def worker_accelerate(spec: dict) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    out = {"what": "accelerate", "cold": spec["cold"]}
    try:
        import accelerate
        import transformers
        from transformers import AutoModelForCausalLM

        out.update({"accelerate": accelerate.__version__, "transformers": transformers.__version__})
        off = Path(spec["offload_dir"])
        shutil.rmtree(off, ignore_errors=True)
        t0 = time.perf_counter()
        # on a GPU: the device budget on GPU 0, host_memory on the CPU, the rest on disk
        max_memory = {"cpu": spec["budget"]} if spec["device"] == "cpu" else \
            {0: spec["budget"], "cpu": spec["host_memory"] or "1GiB"}
        model = AutoModelForCausalLM.from_pretrained(
            spec["folder"], dtype=torch.bfloat16, device_map="auto", max_memory=max_memory,
            offload_folder=str(off)).eval()
        out["load_s"] = round(time.perf_counter() - t0, 2)
        dm = getattr(model, "hf_device_map", {})
        where = {}
        for v in dm.values():
            where[str(v)] = where.get(str(v), 0) + 1
        out["device_map_counts"] = where
        disk_layers = [k for k, v in dm.items() if v == "disk"]
        out["disk_modules"] = disk_layers if len(disk_layers) <= 4 else disk_layers[:2] + ["..."] + disk_layers[-2:]
        files = sorted(p for p in off.rglob("*") if p.is_file()) + sorted(Path(spec["folder"]).glob("*.safetensors"))
        out["offload_folder_gib"] = round(sum(p.stat().st_size for p in off.rglob("*") if p.is_file()) / GIB, 3)
        drop = spec["cold"] == "per-token"
        ids = torch.tensor([spec["prompt"]], device="cpu" if spec["device"] == "cpu" else 0)

        def gen(n, streamer=None):
            with torch.no_grad():
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=0, streamer=streamer)

        gen(2)  # warm up
        stamps = _Timestamps(drop, files)
        if drop:
            drop_file_cache(files)
        t0 = time.perf_counter()
        res = gen(spec["new_tokens"], stamps)
        out["total_s"] = round(time.perf_counter() - t0, 2)
        decode = stamps.step_times()
        out.update(latency_fields(decode))
        out["prefill_ms"] = round((stamps.ends[1] - stamps.starts[0]) * 1e3, 1)
        out["tokens"] = res[0, ids.shape[1]:].tolist()
        out["rss_gib"] = rss_gib()
        out["peak_rss_gib"] = peak_rss_gib()
        out["bytes_offloaded"] = int(out["offload_folder_gib"] * GIB)
    except Exception as e:  # report exactly what failed
        import traceback

        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
    emit(out)


def worker_demo(spec: dict) -> None:
    """The demo model (skewed routing): hit rate per policy and prefetch mode, batch 1."""
    import torch

    from moetier import LLM
    from moetier.demo import task_path

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    rows = [json.loads(line) for line in task_path(spec["task"]).read_text().splitlines() if line.strip()]
    g = random.Random(0)
    g.shuffle(rows)
    warm, measured = rows[: spec["warmup"]], rows[spec["warmup"]: spec["warmup"] + spec["prompts"]]
    off = Path(spec["offload_dir"])
    ref_tokens = None
    for policy in spec["policies"]:
        for prefetch in spec["prefetch"]:
            (off / "traces.npz").unlink(missing_ok=True)
            llm = LLM("demo", expert_slots=spec["slots"], offload_dir=off, cache_policy=policy, prefetch=prefetch)
            enc = lambda r: llm.tokenizer.encode(r["prompt"])  # noqa: E731
            for i, r in enumerate(warm):
                run_request(llm, enc(r), spec["tokens"], name=f"w{i}")
            before = dict(llm.stats())
            decode, toks, correct = [], [], 0
            hits = misses = 0
            for i, r in enumerate(measured):
                times, tokens, after_prefill = run_request(llm, enc(r), spec["tokens"], name=f"m{i}")
                end = dict(llm.stats())
                decode.extend(times[1:])
                toks.append(tokens)
                text = llm.tokenizer.decode(tokens, skip_special_tokens=True)
                correct += text.strip().startswith(str(r["answer"]))
                hits += end["hits"] - after_prefill["hits"]
                misses += end["misses"] - after_prefill["misses"]
            after = dict(llm.stats())
            d = stat_delta(before, after)
            mem = llm.memory
            total_experts = len(llm._packed.experts)
            emit({"what": "demo", "policy": policy, "prefetch": prefetch, "expert_slots": mem["expert_slots"],
                  "experts_total": int(total_experts), "warmup_requests": len(warm), "requests": len(measured),
                  "hit_rate_decode": round(hits / max(1, hits + misses), 4),
                  "hit_rate_all": round(d["hits"] / max(1, d["hits"] + d["misses"]), 4),
                  "prefetch_hits": d["prefetch_hits"], "prefetched": d["prefetched"],
                  "wasted_prefetches": d["wasted_prefetches"], "stall_ms_total": round(d["stall_s"] * 1e3, 1),
                  **latency_fields(decode, keep=False), "exact_match": round(correct / max(1, len(measured)), 3),
                  "same_tokens_as_first_config": None if ref_tokens is None else toks == ref_tokens})
            if ref_tokens is None:
                ref_tokens = toks
            llm.close()


def worker_convert(spec: dict) -> None:
    """moetier's first-use conversion (HF folder -> packed), alone in its process."""
    import torch

    from moetier.experts.setup import ensure_packed

    t0 = time.perf_counter()
    ensure_packed(Path(spec["folder"]), torch.bfloat16, Path(spec["offload_dir"]))
    emit({"what": "convert", "convert_s": round(time.perf_counter() - t0, 1), "peak_rss_gib": peak_rss_gib()})


def worker_llamacpp(spec: dict) -> None:
    """llama.cpp (llama-cpp-python, mmap) on the GGUF: the same prompts and token counts as moetier."""
    from gguf_peer import decode_latency, llama_cpp_version

    before = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    warm = [prompt_ids(spec["vocab"], spec["prompt_len"], 100 + i) for i in range(spec["warmup_requests"])]
    r = decode_latency(spec["gguf"], spec["prompt"], spec["new_tokens"], threads=spec["threads"] or 1,
                       warmup=warm, warmup_tokens=spec["warmup_tokens"])
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - before
    n_tok = spec["warmup_requests"] * spec["warmup_tokens"] + spec["new_tokens"]
    emit({"what": "llama.cpp", "mode": spec["mode"], "llama_cpp_python": llama_cpp_version(), "load_s": r["load_s"],
          "prefill_ms": round(r["prefill_s"] * 1e3, 1), **latency_fields(r["decode_s"]), "tokens": r["tokens"],
          "major_faults_per_token": round(faults / max(1, n_tok), 1), "rss_gib": rss_gib(),
          "peak_rss_gib": peak_rss_gib()})


WORKERS = {"moetier": worker_moetier, "accelerate": worker_accelerate, "demo": worker_demo,
           "convert": worker_convert, "llamacpp": worker_llamacpp}


def spawn(spec: dict, timeout: float) -> list[dict]:
    return spawn_worker(__file__, spec, timeout, tags=("policy", "prefetch", "cold"))


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
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        WORKERS[spec["kind"]](spec)
        return

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

        out(latency_ram.run(args, __file__, folder, prompt_ids))
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
