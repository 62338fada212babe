"""Offline throughput on the CPU: moetier's throughput runner vs transformers, all in RAM and under a budget.

Prints one JSON object per result (``"what"`` says which), then a ``summary``:

- ``setup``: the synthetic Mixtral (random weights, hub layout, bf16), its size, the workload;
- ``moetier``: the throughput runner on every prompt (``budget`` none: all in RAM; ``half``: a RAM
  budget of half the model, experts served from the packed file through the expert store), with
  the planner's plan, its predicted tokens/s and the measured tokens/s;
- ``transformers``: ``generate`` with static batches (left-padded to the batch's longest prompt),
  one timed batch per batch size, the best of them as the peer for (a);
- ``--hf-float32``: transformers again in float32 at that batch size (informational: twice the
  weight memory, the peer a user with the RAM could pick where float32 GEMMs beat bf16 ones);
- ``accelerate``: transformers + accelerate, ``device_map="auto"``, ``max_memory={"cpu": half}``,
  ``offload_folder``, the best static batch size of (a): the peer for (b);
- ``summary``: tokens/s, ratios, predicted vs measured, and whether the issue's targets are met.

Tokens/s is generated tokens over wall time including prefill, the same for every engine; every
sequence generates exactly ``--new-tokens`` (EOS ignored), greedy. Each configuration runs in its
own process so its peak RSS is its own.

The page cache. The host has more RAM than the budget, so the OS could keep the whole checkpoint
cached and turn "disk" reads into memory copies, which a model really bigger than RAM would not
get. By default the weight files' pages are dropped before each timed run, and for accelerate
after every decode step too (untimed): moetier reads experts with O_DIRECT, which neither uses
nor fills the cache once the pages are gone, so both engines read their offloaded weights from
the disk at every pass/step. ``--no-cold`` leaves the cache alone.

The issue's protocol is 500+ prompts of 32-512 tokens, 256 new tokens each, on the 2.8 GiB
"medium" model. That takes hours on a shared 2-core machine; the defaults scale it (the JSON
says by how much) so the whole script finishes in about ten minutes:

    python bench/throughput.py                     # scaled: ~0.4 GiB model, 256 prompts of 16-128, 64 new
    python bench/throughput.py --hidden 1024 --intermediate 3584 --layers 16 --prompts 512 \\
        --min-prompt 32 --max-prompt 512 --new-tokens 256        # the issue's size
    python bench/throughput.py --quick              # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from common import drop_file_cache, emit, mixtral_config, spawn_worker  # noqa: E402

GIB = 2**30
ISSUE = dict(hidden=1024, intermediate=3584, layers=16, prompts=512, min_prompt=32, max_prompt=512, new_tokens=256)


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)


def prompts_for(a) -> list[list[int]]:
    g = random.Random(0)
    return [[g.randrange(2, a.vocab) for _ in range(g.randint(a.min_prompt, a.max_prompt))] for _ in range(a.prompts)]


# -- workers (one process each) ---------------------------------------------------------------------


def worker_moetier(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    from moetier import LLM, SamplingParams

    out = {"what": "moetier", "budget": spec["budget_name"], "device": spec["device"]}
    kw = {"device": spec["device"]}
    if spec["budget"]:  # on the CPU the RAM budget; on a GPU the device budget
        kw.update(device_memory=spec["budget"], offload_dir=spec["offload_dir"])
    if spec["cold"]:
        drop_file_cache(spec["files"])
    t0 = time.perf_counter()
    llm = LLM(spec["folder"], dtype="bfloat16", **kw)
    out["load_s"] = round(time.perf_counter() - t0, 2)
    if spec["cold"]:
        packed = Path(spec["offload_dir"]).rglob("weights-*.bin") if spec["budget"] else []
        drop_file_cache(spec["files"] + [str(p) for p in packed])
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    params = SamplingParams(max_tokens=spec["new_tokens"], temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    plan = llm.plan(prompts, params)
    out["plan_s"] = round(time.perf_counter() - t0, 2)  # machine probes (cached after the first run), read probe
    print(plan.explain(), file=sys.stderr)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, mode="throughput", use_tqdm=False, plan=plan)
    wall = time.perf_counter() - t0
    run = llm.last_run
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    out.update({
        "tok_s": round(gen / wall, 2), "generated_tokens": gen, "seconds": round(wall, 2),
        "predicted_tok_s": round(plan.predicted_tok_s, 2),
        "measured_over_predicted": round(gen / wall / plan.predicted_tok_s, 3),
        "pass_model_error": run.get("pass_model_error"),
        "plan": {"max_seqs": plan.max_seqs, "prefill_tokens": plan.prefill_tokens, "expert_slots": plan.expert_slots,
                 "kv_budget_mib": round(plan.kv_budget / 2**20, 1), "passes_predicted": round(plan.passes),
                 "pass_ms_predicted": {k: round(v * 1e3, 2) for k, v in plan.pass_s.items()},
                 "memory_mib": {k: round(v / 2**20, 1) for k, v in plan.memory.items() if v is not None},
                 "moved_mib_per_pass": round(plan.moved_bytes_per_pass / 2**20, 1), "profile": plan.profile},
        "run": {k: run[k] for k in ("passes", "peak_seqs", "peak_kv_reserved", "expert_bytes_read",
                                    "predicted_s_for_passes_run")},
        "memory": llm.memory, "peak_rss_gib": peak_rss_gib(), "first_tokens": outs[0].outputs[0].token_ids[:8],
    })
    if llm.engine.offload is not None:
        out["stats"] = llm.stats()
    llm.close()
    emit(out)


class _DropEachStep:
    """A logits processor that drops the offloaded weights from the page cache after every step
    (untimed), so each step's reads come from the disk as for a model bigger than RAM."""

    def __init__(self, files):
        self.files, self.calls, self.spent = files, 0, 0.0

    def __call__(self, input_ids, scores):
        t = time.perf_counter()
        drop_file_cache(self.files, sync=False)  # written once at load: clean already
        self.calls += 1
        self.spent += time.perf_counter() - t
        return scores


def _hf_generate(model, batch: list[list[int]], new_tokens: int, dropper=None):
    import torch
    from transformers import LogitsProcessorList

    width = max(len(p) for p in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(batch):  # left padding, as decoder-only generate wants
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    with torch.no_grad():
        extra = {"logits_processor": LogitsProcessorList([dropper])} if dropper is not None else {}
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0, **extra)[:, width:]


def worker_hf(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers
    from transformers import AutoModelForCausalLM

    what = "accelerate" if spec["budget"] else "transformers"
    out = {"what": what, "transformers": transformers.__version__, "dtype": spec.get("dtype", "bfloat16")}
    kw = {}
    if spec["budget"]:
        import accelerate

        out["accelerate"] = accelerate.__version__
        off = Path(spec["offload_dir"])
        shutil.rmtree(off, ignore_errors=True)
        kw = dict(device_map="auto", max_memory={"cpu": spec["budget"]}, offload_folder=str(off))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=getattr(torch, out["dtype"]), **kw).eval()
    if not spec["budget"]:
        model.to(spec["device"])
    out["load_s"] = round(time.perf_counter() - t0, 2)
    if spec["budget"]:
        where: dict = {}
        for v in getattr(model, "hf_device_map", {}).values():
            where[str(v)] = where.get(str(v), 0) + 1
        out["device_map_counts"] = where
    prompts = spec["prompts"]
    _hf_generate(model, [p[:8] for p in prompts[:2]], 2)  # warm up
    files = spec["files"]
    if spec["budget"]:
        files = files + [str(p) for p in Path(spec["offload_dir"]).rglob("*") if p.is_file()]
    dropper = _DropEachStep(files) if spec["budget"] and spec["cold"] else None
    for B in spec["batch_sizes"]:
        if spec["cold"]:
            drop_file_cache(files)
        batch = prompts[:B]  # the first static batch of the job: same length mix as the rest
        t0 = time.perf_counter()
        res = _hf_generate(model, batch, spec["new_tokens"], dropper)
        wall = time.perf_counter() - t0 - (dropper.spent if dropper else 0.0)
        if dropper:
            out["cache_drops"], out["drop_s_untimed"] = dropper.calls, round(dropper.spent, 2)
            dropper.calls, dropper.spent = 0, 0.0
        emit({**out, "batch": B, "tok_s": round(res.numel() / wall, 2), "seconds": round(wall, 2),
              "generated_tokens": res.numel(), "padding_share": round(1 - sum(map(len, batch)) /
                                                                      (B * max(map(len, batch))), 3),
              "peak_rss_gib": peak_rss_gib(), "first_tokens": res[0, :8].tolist()})


WORKERS = {"moetier": worker_moetier, "hf": worker_hf}


def spawn(spec: dict, timeout: float) -> list[dict]:
    return spawn_worker(__file__, spec, timeout, echo_stderr=spec["kind"] == "moetier")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/moetier-bench-throughput"))
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1792)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--min-prompt", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--hf-batches", type=int, nargs="+", default=[16, 64, 128],
                    help="static batch sizes tried for transformers generate (one timed batch each)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (accelerate's peer runs on the CPU only)")
    ap.add_argument("--budget-fraction", type=float, default=0.5, help="the RAM budget of (b), times the model size")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for every engine (default 1: on a shared 2-core machine a second OpenMP "
                         "thread mostly spin-waits, and the other core serves the expert loader threads)")
    ap.add_argument("--no-cold", dest="cold", action="store_false", help="leave the page cache alone")
    ap.add_argument("--skip-accelerate", action="store_true")
    ap.add_argument("--hf-float32", action="store_true",
                    help="(a) also runs transformers in float32 (twice the weight memory) at its best batch size: "
                         "the peer a user with the RAM could pick, where float32 GEMMs beat bf16 ones")
    ap.add_argument("--parts", nargs="+", default=["a", "b"], choices=["a", "b"],
                    help="(a) all in RAM, (b) the RAM budget; (b) alone uses the first --hf-batches size")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny model and workload")
    a = ap.parse_args()
    if a.worker:
        spec = json.loads(Path(a.worker).read_text())
        WORKERS[spec["kind"]](spec)
        return
    if a.quick:
        a.hidden, a.intermediate, a.layers, a.vocab, a.prompts, a.new_tokens = 128, 512, 4, 1000, 24, 8
        a.min_prompt, a.max_prompt, a.hf_batches, a.budget_fraction = 4, 32, [8, 24], 0.8

    import torch
    from common import synthetic_checkpoint

    a.dir.mkdir(parents=True, exist_ok=True)
    name = f"mixtral-h{a.hidden}-i{a.intermediate}-l{a.layers}-e{a.experts}-v{a.vocab}-bfloat16"
    cfg = mixtral_config(a, eos_token_id=1, bos_token_id=0)
    folder = synthetic_checkpoint(a.dir / name, "mixtral", cfg, torch.bfloat16)
    files = [str(p) for p in folder.glob("*.safetensors")]
    model_bytes = sum(Path(f).stat().st_size for f in files)
    half = int(model_bytes * a.budget_fraction)
    prompts = prompts_for(a)
    scale = {k: getattr(a, k) for k in ISSUE}
    tokens = lambda d: d["prompts"] * (d["min_prompt"] + d["max_prompt"]) / 2 + d["prompts"] * d["new_tokens"]
    params = lambda d: d["layers"] * d["hidden"] * d["intermediate"] * 3 * 8
    emit({"what": "setup", "model": name, "model_gib": round(model_bytes / GIB, 3), "budget_b_gib": round(half / GIB, 3), "budget_fraction": a.budget_fraction,
          "prompts": a.prompts, "prompt_tokens": sum(map(len, prompts)), "new_tokens_each": a.new_tokens,
          "threads": a.threads, "cold": a.cold, "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
          "scale_vs_issue": {"config": scale, "issue": ISSUE,
                             "expert_params_ratio": round(params(scale) / params(ISSUE), 3),
                             "tokens_ratio": round(tokens(scale) / tokens(ISSUE), 3)},
          "note": "the machine is shared with other jobs: rates vary between runs"})
    if a.device != "cpu":
        a.skip_accelerate = True
    base = {"folder": str(folder), "files": files, "prompts": prompts, "new_tokens": a.new_tokens, "device": a.device,
            "threads": a.threads, "cold": a.cold, "dir": str(a.dir)}
    t_all = time.perf_counter()

    rows = {"moetier_ram": {}, "moetier_half": {}}
    best_hf = {"batch": a.hf_batches[0]}
    if "a" in a.parts:
        r = spawn({**base, "kind": "moetier", "budget": None, "budget_name": "none"}, a.timeout)
        [emit(x) for x in r]
        rows["moetier_ram"] = r[-1]
        r = spawn({**base, "kind": "hf", "budget": None, "batch_sizes": a.hf_batches}, a.timeout)
        [emit(x) for x in r]
        hf = [x for x in r if "tok_s" in x]
        best_hf = max(hf, key=lambda x: x["tok_s"]) if hf else None
        if a.hf_float32 and best_hf is not None:
            r = spawn({**base, "kind": "hf", "budget": None, "batch_sizes": [best_hf["batch"]], "dtype": "float32"},
                      a.timeout)
            [emit(x) for x in r]
            rows["transformers_fp32"] = next((x for x in r if "tok_s" in x), {})
    acc = None
    if "b" in a.parts:
        r = spawn({**base, "kind": "moetier", "budget": half, "budget_name": "half",
                   "offload_dir": str(a.dir / (name + "-moetier-offload"))}, a.timeout)
        [emit(x) for x in r]
        rows["moetier_half"] = r[-1]
    if "b" in a.parts and not a.skip_accelerate and best_hf is not None:
        r = spawn({**base, "kind": "hf", "budget": half, "batch_sizes": [best_hf["batch"]],
                   "offload_dir": str(a.dir / (name + "-accelerate-offload"))}, a.timeout)
        [emit(x) for x in r]
        acc = next((x for x in r if "tok_s" in x), None)

    s: dict = {"what": "summary", "wall_s": round(time.perf_counter() - t_all, 1), "parts": a.parts}
    ram, off = rows["moetier_ram"], rows["moetier_half"]
    if "tok_s" in ram:
        s["a_all_in_ram"] = {"moetier_tok_s": ram["tok_s"], "moetier_predicted_tok_s": ram["predicted_tok_s"]}
        if best_hf and "tok_s" in best_hf:
            s["a_all_in_ram"].update({"transformers_tok_s": best_hf["tok_s"], "transformers_batch": best_hf["batch"],
                                      "ratio": round(ram["tok_s"] / best_hf["tok_s"], 2),
                                      "same_first_tokens": ram["first_tokens"] == best_hf["first_tokens"]})
        fp32 = rows.get("transformers_fp32", {})
        if "tok_s" in fp32:
            s["a_all_in_ram"].update({"transformers_float32_tok_s": fp32["tok_s"],
                                      "ratio_vs_float32": round(ram["tok_s"] / fp32["tok_s"], 2)})
    if "tok_s" in off:
        s["b_half_budget"] = {"moetier_tok_s": off["tok_s"], "moetier_predicted_tok_s": off["predicted_tok_s"],
                              "moetier_peak_rss_gib": off["peak_rss_gib"]}
        if acc:
            s["b_half_budget"].update({"accelerate_tok_s": acc["tok_s"], "accelerate_batch": acc["batch"],
                                       "accelerate_peak_rss_gib": acc["peak_rss_gib"],
                                       "ratio": round(off["tok_s"] / acc["tok_s"], 2)})
    preds = [x for x in (ram, off) if "measured_over_predicted" in x]
    s["prediction_error"] = [round(x["measured_over_predicted"] - 1, 3) for x in preds]
    s["targets"] = {
        "a_2x_vs_transformers": s.get("a_all_in_ram", {}).get("ratio", 0) >= 2,
        "b_10x_vs_accelerate": s.get("b_half_budget", {}).get("ratio", 0) >= 10,
        "prediction_within_25pct": bool(preds) and all(abs(e) <= 0.25 for e in s["prediction_error"]),
    }
    emit(s)


if __name__ == "__main__":
    main()
