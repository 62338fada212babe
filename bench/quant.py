"""Quantized decode, moetier vs llama.cpp at the same bits, in one run (JSON lines out).

Three parts (``--only`` picks some):

``decode``
    The medium synthetic Mixtral (bf16, 16 layers, h1024, i3584, 8 experts top-2, vocab 32000,
    2.8 GiB), all resident, ``--threads`` threads, batch 1 and 16: decode tokens/s of moetier int8
    vs llama.cpp Q8_0, moetier int4 vs Q4_0 and moetier bf16 vs llama.cpp bf16. moetier's
    quantized models are ``moetier convert --quant int8|int4 --quant-dense int8`` folders (experts
    int8 per-channel / int4 group 32, attention and LM head int8 per-channel, embeddings, norms and
    routers bf16); llama.cpp's are its own converter's bf16 GGUF and ``llama_model_quantize``'s
    Q8_0 / Q4_0 of it (attention in the same type, the LM head Q6_K in Q4_0). Each pair of engines
    runs in two long-lived worker processes, alternating request by request for ``--rounds``
    rounds; a rate is the median over rounds of (time of 1 + n tokens - time of 1 token) / n.
    llama.cpp is driven through llama-cpp-python's low-level batch API (one sequence per row, as
    its server batches), weights in the file's mmap (``use_extra_bufts=False``; ``--llama-repack``
    turns its repacking on, which segfaults in this build's first decode on an AMX CPU).
``error``
    Against the bf16 model (moetier bf16, which is transformers' output) on the same prompts: for
    every prompt position, the log-probability of the actual next token and the top-1 token; mean
    |delta log p| and top-1 agreement for moetier int8 / int4 and llama.cpp Q8_0 / Q4_0 (and
    llama.cpp bf16, the floor of its own numerics). On these random-weight models the next-token
    distributions are nearly flat, so these are small numbers and top-1 is a near-tie often.
``offload``
    The 32-layer synthetic Mixtral (same dims, 5.6 GiB bf16) in a memory cgroup of ``--ram-limit``
    (1 GiB, page cache counted, bench/cgroup.py): moetier int4 (``--quant int4 --quant-dense int8``)
    at each ``--budgets`` entry (bench/latency_worker.py) vs llama.cpp Q4_0 with plain mmap
    (``use_extra_bufts=False``; its default repacking copies the weights into anonymous memory).
    With each moetier row: the bytes it read from disk per token / the disk's O_DIRECT rate, the
    time a token must take at least.

    python bench/quant.py                         # everything (about 15 min on 2 cores)
    python bench/quant.py --only decode --batch 1 --rounds 2
    python bench/quant.py --only decode error --pairs gguf   # moetier on llama.cpp's own Q4_0 file
    python bench/quant.py --only offload --budgets 600MiB 700MiB

Machine-noise note: rates are medians of few, short requests; on a shared machine they move by
10-20 % between runs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import drop_file_cache, emit, spawn_worker, synthetic_checkpoint  # noqa: E402

GIB = 2**30
ROOT = Path(__file__).resolve().parent.parent
CONVERTER_SDIST = "/tmp/dl/llama_cpp_python-0.3.36.tar.gz"


def model_cfg(layers: int) -> dict:
    return dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=layers, num_attention_heads=16,
                num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                max_position_embeddings=4096)


def prompts(n: int, length: int, seed: int, vocab: int = 32000) -> list[list[int]]:
    import random

    g = random.Random(seed)
    return [[g.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


# -- preparing the models (cached under --dir) -----------------------------------------------------


def prepare(args, layers: int, ggufs: tuple[str, ...], moetier_quants: tuple[str, ...]) -> dict:
    """The HF folder, llama.cpp's GGUFs and moetier's quantized folders of the ``layers``-layer model."""
    import torch

    from gguf_peer import make_gguf
    from moetier.weights.packed_write import convert

    name = f"mixtral-h1024-i3584-l{layers}-e8-bfloat16"
    hf = synthetic_checkpoint(args.models / name, "mixtral", model_cfg(layers), torch.bfloat16)
    out = {"hf": hf}
    t0 = time.perf_counter()
    if ggufs:
        out["bf16"] = make_gguf(hf, args.dir / f"{name}.bf16.gguf", "bf16", args.gguf_converter)
    for q in ggufs:
        if q == "bf16":
            continue
        path = args.dir / f"{name}.{q}.gguf"
        if not path.exists():
            import llama_cpp

            p = llama_cpp.llama_model_quantize_default_params()
            p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{q}")
            p.nthread = args.threads
            tmp = path.with_name(path.name + ".tmp")
            if llama_cpp.llama_model_quantize(str(out["bf16"]).encode(), str(tmp).encode(), ctypes.byref(p)) != 0:
                raise RuntimeError(f"llama_model_quantize to {q} failed")
            tmp.rename(path)
        out[q] = path
    for kind in moetier_quants:
        path = args.dir / f"{name}.moetier-{kind}"
        if kind == "gguf-Q4_0":  # llama.cpp's own Q4_0 file imported: the same codes on both sides
            from moetier.weights.gguf import import_gguf

            if not path.exists():
                import_gguf(out["Q4_0"], path, progress=False)
        elif not path.exists():
            convert(hf, path, quant=kind, quant_dense="int8", progress=False)
        out[kind] = path
    emit({"what": "prepared", "layers": layers, "seconds": round(time.perf_counter() - t0, 1),
          **{k: {"path": str(v), "gib": round(_size(v) / GIB, 3)} for k, v in out.items()}})
    return out


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


# -- engines (each in a long-lived worker process) ------------------------------------------------


class LlamaCpp:
    """llama.cpp through llama-cpp-python's C API: one context with ``n_seq`` sequences, greedy
    decode of a batch of prompts (one row per sequence per step) and per-position logits."""

    def __init__(self, path: str, threads: int, n_seq: int, n_ctx: int, repack: bool = True):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.use_extra_bufts = repack  # False: weights stay in the file's mmap (page cache), no anonymous copy
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, 512, 512, n_seq
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(512, 0, n_seq)

    def _decode(self, items) -> None:
        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _row(self, i: int):
        import numpy as np

        return np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def generate(self, batch: list[list[int]], n: int) -> tuple[list[list[int]], list[float]]:
        """Greedy ``n`` tokens for each prompt (prefill one prompt at a time, then one row per sequence
        per step); the tokens and each decode step's seconds (greedy pick included)."""
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        toks, steps = [], []
        for s, ids in enumerate(batch):
            self._decode([(t, p, s, p == len(ids) - 1) for p, t in enumerate(ids)])
            toks.append([int(self._row(len(ids) - 1).argmax())])
        for step in range(1, n):
            t = time.perf_counter()
            self._decode([(toks[s][-1], len(ids) + step - 1, s, True) for s, ids in enumerate(batch)])
            for s in range(len(batch)):
                toks[s].append(int(self._row(s).argmax()))
            steps.append(time.perf_counter() - t)
        return toks, steps

    def logprobs(self, ids: list[int]):
        """``[len(ids) - 1, vocab]`` log-softmax of the next token after each prefix."""
        import numpy as np
        import torch

        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        self._decode([(t, p, 0, True) for p, t in enumerate(ids)])
        rows = np.stack([self._row(i) for i in range(len(ids) - 1)])
        return torch.log_softmax(torch.from_numpy(rows).float(), dim=-1)


class Moetier:
    def __init__(self, folder: str, threads: int):
        import torch

        from moetier import LLM

        torch.set_num_threads(threads)
        self.llm = LLM(folder)

    def generate(self, batch: list[list[int]], n: int) -> tuple[list[list[int]], list[float]]:
        """Greedy ``n`` tokens for each prompt through the engine's step loop; the tokens and the seconds
        of each step that decoded every sequence (the prefill steps are not counted)."""
        from moetier import SamplingParams

        engine = self.llm.engine
        rids = [f"q{i}" for i in range(len(batch))]
        for rid, ids in zip(rids, batch):
            engine.add_request(rid, ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        toks = {rid: [] for rid in rids}
        steps = []
        while engine.has_unfinished():
            t = time.perf_counter()
            events = engine.step()
            dt = time.perf_counter() - t
            decoding = all(toks[rid] for rid in rids)  # every sequence past its prefill before this step
            for e in events:
                toks[e.seq.request_id].append(e.token)
            if decoding and len(events) == len(batch):
                steps.append(dt)
        return [toks[rid] for rid in rids], steps

    def logprobs(self, ids: list[int]):
        return self.llm.next_token_logprobs(ids)


def serve_engine(spec: dict) -> None:
    """A long-lived worker: load one engine, then answer one JSON command a line on stdin."""
    t0 = time.perf_counter()
    if spec["engine"] == "llama.cpp":
        eng = LlamaCpp(spec["path"], spec["threads"], spec["n_seq"], spec["n_ctx"], repack=spec["repack"])
    else:
        eng = Moetier(spec["path"], spec["threads"])
    print(json.dumps({"ready": True, "load_s": round(time.perf_counter() - t0, 2)}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "decode":  # the median decode step of one greedy request of the whole batch
            toks, steps = eng.generate(prompts(cmd["batch"], cmd["prompt_len"], cmd["seed"]), 1 + cmd["new_tokens"])
            out = {"s_per_step": statistics.median(steps), "steps": len(steps), "tokens": toks[0]}
        else:  # per-position log p of the actual next token and the top-1 token
            rows = []
            for ids in cmd["prompts"]:
                lp = eng.logprobs(ids)
                nxt = lp.gather(1, __import__("torch").tensor(ids[1:])[:, None])[:, 0]
                rows.append({"logp": nxt.tolist(), "top1": lp.argmax(-1).tolist()})
            out = {"rows": rows}
        print(json.dumps(out), flush=True)


class Worker:
    def __init__(self, spec: dict):
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.name = spec["name"]
        self.log = open(Path(spec["log_dir"]) / f"worker-{self.name.replace(' ', '-')}.log", "w")  # llama.cpp is chatty
        self.p = subprocess.Popen([sys.executable, __file__, "--engine", json.dumps(spec)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.ready = self._read()

    def _read(self) -> dict:
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name}: worker exited ({self.p.wait()}), see {self.log.name}")
            if line.startswith("{"):
                return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=60)
        self.log.close()


# -- the parts ------------------------------------------------------------------------------------


def part_decode_and_error(args, m: dict) -> dict:
    pairs = [("bf16", "bf16", "bf16"), ("int8", "int8", "Q8_0"), ("int4", "int4", "Q4_0"),
             ("gguf", "gguf-Q4_0", "Q4_0")]
    pairs = [p for p in pairs if p[0] in args.pairs]
    eval_prompts = prompts(args.eval_prompts, args.eval_len, 7)
    n_ctx = max(max(args.batch) * (args.prompt_len + args.new_tokens + 2), args.eval_len + 8)
    n_ctx = -(-n_ctx // 256) * 256
    summary, lp = {}, {}
    for label, ours, theirs in pairs:
        spec = {"threads": args.threads, "n_seq": max(args.batch), "n_ctx": n_ctx, "log_dir": str(args.dir),
                "repack": args.llama_repack}
        ws = [Worker({**spec, "name": f"moetier {label}", "engine": "moetier",
                      "path": str(m["hf"] if ours == "bf16" else m[ours])}),  # bf16: the HF folder as it is
              Worker({**spec, "name": f"llama.cpp {theirs}", "engine": "llama.cpp", "path": str(m[theirs])})]
        try:
            times = {w.name: {B: [] for B in args.batch} for w in ws}
            tokens = {}
            for r in range(args.rounds):
                for B in args.batch:
                    for w in (ws if r % 2 == 0 else ws[::-1]):
                        res = w.ask(op="decode", batch=B, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                    seed=r)
                        times[w.name][B].append(res["s_per_step"])
                        tokens[(w.name, B)] = res["tokens"]  # informational: the two quantizers differ
                        emit({"what": "decode", "engine": w.name, "batch": B, "round": r,
                              "tok_s": round(B / res["s_per_step"], 2)})
            if "error" in args.only:
                for w in ws:
                    lp[w.name] = w.ask(op="logprobs", prompts=eval_prompts)["rows"]
        finally:
            for w in ws:
                w.close()
        for B in args.batch:
            a, b = (statistics.median(times[w.name][B]) for w in ws)
            row = {"what": "decode_summary", "pair": f"moetier {label} vs llama.cpp {theirs}", "batch": B,
                   "threads": args.threads, "moetier_tok_s": round(B / a, 2), "llama_cpp_tok_s": round(B / b, 2),
                   "ratio": round(b / a, 3), "rounds": args.rounds,
                   "load_s": {w.name: w.ready["load_s"] for w in ws},
                   "same_first_tokens": tokens[(ws[0].name, B)][:4] == tokens[(ws[1].name, B)][:4]}
            emit(row)
            summary[f"{label}/b{B}"] = row
    if lp and "moetier bf16" in lp:
        ref = lp["moetier bf16"]
        err = {}
        for name, rows in lp.items():
            if name == "moetier bf16":
                continue
            d = [abs(x - y) for r0, r1 in zip(ref, rows) for x, y in zip(r0["logp"], r1["logp"])]
            agree = [int(x == y) for r0, r1 in zip(ref, rows) for x, y in zip(r0["top1"], r1["top1"])]
            err[name] = {"mean_abs_dlogp": round(statistics.fmean(d), 5), "max_abs_dlogp": round(max(d), 4),
                         "top1_agreement": round(statistics.fmean(agree), 4), "positions": len(d)}
        emit({"what": "error_summary", "reference": "moetier bf16 (= transformers)", "prompts": args.eval_prompts,
              "prompt_len": args.eval_len, "errors": err})
        summary["error"] = err
    return summary


def worker_llama_offload(spec: dict) -> None:
    """In the cgroup: llama.cpp Q4_0 with plain mmap, batch-1 greedy; per-token times."""
    eng = LlamaCpp(spec["gguf"], spec["threads"], 1, 256, repack=False)
    ids = spec["prompt"]
    eng.generate([ids], 2)  # warm-up (the first pages)
    eng.L.llama_memory_clear(eng.L.llama_get_memory(eng.ctx), True)
    eng._decode([(t, p, 0, p == len(ids) - 1) for p, t in enumerate(ids)])
    tok, steps = int(eng._row(len(ids) - 1).argmax()), []
    for i in range(spec["new_tokens"]):
        t = time.perf_counter()
        eng._decode([(tok, len(ids) + i, 0, True)])
        tok = int(eng._row(0).argmax())
        steps.append(time.perf_counter() - t)
    emit({"what": "llama.cpp", "mode": "mmap, use_extra_bufts=False", "step_ms": [round(s * 1e3, 1) for s in steps],
          "median_ms": round(statistics.median(steps) * 1e3, 1)})


def part_offload(args, m: dict) -> dict:
    from latency_worker import disk_rates
    from moetier.units import parse_size

    limit = parse_size(args.ram_limit)
    files = sorted(Path(m["int4"]).glob("weights-*.bin")) + [Path(m["Q4_0"])]
    disk = disk_rates(Path(m["int4"]), 512 << 20, 32, args.threads)
    emit({"what": "disk", **disk})
    base = {"folder": str(m["int4"]), "packed": str(m["int4"]), "offload_dir": str(args.dir / "offload32"),
            "vocab": 32000, "prompt_len": args.prompt_len, "prompt": prompts(1, args.prompt_len, 3)[0],
            "new_tokens": args.offload_tokens, "warmup_requests": 1, "warmup_tokens": 4, "cold": "none",
            "threads": args.threads, "device": "cpu", "host_memory": None, "policy": "activation",
            "prefetch": "lookahead"}
    rows = {}
    for r in range(args.offload_rounds):
        for b in args.budgets:
            drop_file_cache(files)
            got = spawn_worker(str(ROOT / "bench" / "latency_worker.py"), {**base, "kind": "moetier", "budget": b},
                               args.timeout, tags=("budget",), ram_limit=limit)
            for row in got:
                row.update(budget=b, round=r)
                if "bytes_read_per_token" in row:
                    row["disk_limit_ms"] = round(row["bytes_read_per_token"] / (disk["seq_direct_gbps"] * 1e9) * 1e3, 1)
                emit(row)
            rows.setdefault(f"moetier int4 {b}", []).extend(got)
        drop_file_cache(files)
        got = spawn_worker(__file__, {"kind": "llama_offload", "gguf": str(m["Q4_0"]), "threads": args.threads,
                                      "prompt": base["prompt"], "new_tokens": args.llama_offload_tokens},
                           args.timeout, ram_limit=limit)
        for row in got:
            row["round"] = r
            emit(row)
        rows.setdefault("llama.cpp Q4_0 mmap", []).extend(got)
    table = {}
    for k, rs in rows.items():
        ok = [x for x in rs if "median_ms" in x or "median" in x or "p50_ms" in x]
        e = {"runs": len(rs), "oom_killed": any(x.get("oom_killed") for x in rs),
             "peak_mib": max((x["peak_mib"] for x in rs if x.get("peak_mib") is not None), default=None)}
        meds = [x.get("median_ms", x.get("p50_ms")) for x in ok]
        if meds:
            e["ms_per_token"] = statistics.median(meds)
        if ok and "disk_limit_ms" in ok[0]:
            e["disk_limit_ms"] = statistics.median(x["disk_limit_ms"] for x in ok)
            e["bytes_read_per_token_mib"] = round(statistics.median(x["bytes_read_per_token"] for x in ok) / 2**20, 1)
            e["hit_rate"] = statistics.median(x["hit_rate"] for x in ok)
        errs = sorted({x["error"] for x in rs if "error" in x})
        if errs:
            e["errors"] = errs
        table[k] = e
    ours = {k: v for k, v in table.items() if k.startswith("moetier") and "ms_per_token" in v}
    s = {"what": "offload_summary", "ram_limit": args.ram_limit, "table": table}
    if ours:
        best = min(ours, key=lambda k: ours[k]["ms_per_token"])
        s["best"] = best
        lc = table.get("llama.cpp Q4_0 mmap", {}).get("ms_per_token")
        if lc:
            s["speedup_vs_llama_cpp"] = round(lc / ours[best]["ms_per_token"], 2)
        if ours[best].get("disk_limit_ms"):
            s["over_disk_limit"] = round(ours[best]["ms_per_token"] / ours[best]["disk_limit_ms"], 2)
    emit(s)
    return s


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--engine":
        return serve_engine(json.loads(sys.argv[2]))
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        spec = json.loads(Path(sys.argv[2]).read_text())
        return worker_llama_offload(spec)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=["decode", "error", "offload"], choices=["decode", "error", "offload"])
    ap.add_argument("--pairs", nargs="+", default=["bf16", "int8", "int4"], choices=["bf16", "int8", "int4", "gguf"],
                    help="gguf: moetier on llama.cpp's Q4_0 file imported (moetier convert MODEL.gguf) vs llama.cpp on it")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--eval-prompts", type=int, default=4)
    ap.add_argument("--eval-len", type=int, default=64)
    ap.add_argument("--ram-limit", default="1GiB")
    ap.add_argument("--budgets", nargs="+", default=["640MiB", "768MiB"])
    ap.add_argument("--offload-tokens", type=int, default=12)
    ap.add_argument("--llama-offload-tokens", type=int, default=4)
    ap.add_argument("--offload-rounds", type=int, default=1)
    ap.add_argument("--llama-repack", action="store_true",
                    help="llama.cpp's default weight repacking (use_extra_bufts) in the resident runs; off by default: "
                         "this llama-cpp-python build segfaults in its first decode with it on an AMX CPU")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--models", type=Path, default=Path("/tmp/moetier-bench"), help="synthetic HF checkpoints")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/moetier-bench-quant"), help="GGUFs, quantized folders")
    ap.add_argument("--gguf-converter", default=os.environ.get("LLAMA_CPP_CONVERTER", CONVERTER_SDIST))
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    from gguf_peer import llama_cpp_version

    t0 = time.perf_counter()
    emit({"what": "setup", "llama_cpp_python": llama_cpp_version(), "threads": args.threads, "only": args.only,
          "llama_repack": args.llama_repack, "load_average": os.getloadavg(),
          "note": "shared 2-core VM: figures are noisy"})
    if llama_cpp_version() is None:
        emit({"what": "skipped", "why": "llama-cpp-python is not installed (pip install llama-cpp-python)"})
        return
    out = {}
    if "decode" in args.only or "error" in args.only:
        want = {"bf16": ("bf16", ()), "int8": ("Q8_0", ("int8",)), "int4": ("Q4_0", ("int4",)),
                "gguf": ("Q4_0", ("gguf-Q4_0",))}
        m = prepare(args, 16, tuple(dict.fromkeys(want[p][0] for p in args.pairs)),
                    tuple(k for p in args.pairs for k in want[p][1]))
        out.update(part_decode_and_error(args, m))
    if "offload" in args.only:
        out["offload"] = part_offload(args, prepare(args, 32, ("Q4_0",), ("int4",)))
    emit({"what": "done", "elapsed_s": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
