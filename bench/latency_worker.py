"""The worker processes of bench/latency.py (and bench/latency_ram.py, bench/quant.py): each engine
configuration runs here in a process of its own, ``python bench/latency_worker.py --worker SPEC``
(bench/common.py's ``spawn_worker``), so its RSS is its own; it prints JSON lines. Also the small
measuring helpers the drivers share (percentiles, RSS, disk rates, prompts)."""

from __future__ import annotations

import json
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
from common import drop_file_cache, emit, raw_read, spawn_worker  # noqa: E402

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
    return spawn_worker(str(HERE / "latency_worker.py"), spec, timeout, tags=("policy", "prefetch", "cold"))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        sys.exit("usage: latency_worker.py --worker SPEC.json (started by bench/latency.py)")
    spec = json.loads(Path(sys.argv[2]).read_text())
    WORKERS[spec["kind"]](spec)
