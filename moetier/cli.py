"""Command line: ``moetier generate | ...``. The only module that reads the environment."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .errors import MoetierError

DESCRIPTION = """\
moetier runs Mixture-of-Experts language models (Mixtral, Qwen-MoE, OLMoE,
DeepSeek-V2/V3) from Hugging Face checkpoint folders.

Use --model demo for the small model that ships with the package."""


def _add_model_args(p: argparse.ArgumentParser, many: bool = False, required: bool = True) -> None:
    g = p.add_argument_group("model")
    if many:
        g.add_argument("--model", required=required, action="append", metavar="[ID=]PATH",
                       help="a checkpoint folder (or 'demo') to serve, repeatable; clients name it by ID, "
                            "or by PATH as given when there is no ID=. Each loads on its first request.")
    else:
        g.add_argument("--model", required=required, help="checkpoint folder (config.json + *.safetensors, or a packed "
                                                    "folder from moetier convert), or 'demo'")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    g.add_argument("--dtype", default=None, choices=["auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32"],
                   help="weight and activation dtype (default: the checkpoint's own)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output in tokens (default: the model's max_position_embeddings)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for the model's math (default: torch's choice; for serve on the CPU, "
                        "all cores but one, which the HTTP side needs)")
    g.add_argument("--verify", default="first-read", choices=["off", "first-read", "full"],
                   help="packed folders: check each region's CRC-32 the first time it is read from disk "
                        "(first-read, the default), also every region before the model is ready and every "
                        "later expert read (full), or not at all (off)")
    g.add_argument("--quantization", default=None, choices=["int8", "int4"],
                   help="quantize the routed experts on load (offloaded: into the packed copy); a folder "
                        "converted with --quant is already quantized and needs none")
    g.add_argument("--quant-group-size", type=int, default=None, metavar="N",
                   help="inputs per scale (int8: per-channel by default; int4: 32 (default), 64, 128 or 256)")
    g.add_argument("--quant-dense", default=None, choices=["int8", "none"],
                   help="also quantize attention, LM head and dense MLPs (int8 per-channel; default: none)")
    g = p.add_argument_group("memory (offloading)", "Give a budget to keep only the dense weights resident and "
                             "serve the routed experts from disk through a cache; output is unchanged.")
    g.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="all the engine may hold on --device: weights, KV and expert cache (e.g. 6GiB; "
                        "auto on the CPU: the memory cgroup's limit, else the available RAM, less a margin)")
    g.add_argument("--host-memory", default=None, metavar="SIZE",
                   help="host tier budget; on --device cpu the RAM budget when --device-memory is not given")
    g.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="where the packed copy of an HF folder and the trace library go "
                        "(default: a per-model folder under ~/.cache/moetier)")
    g.add_argument("--cache-policy", default="activation", choices=["activation", "lru", "lfu"],
                   help="expert cache replacement policy (default: activation)")
    g.add_argument("--prefetch", default="lookahead", choices=["trace", "lookahead", "none"],
                   help="read coming experts early, predicted by the next layer's router (lookahead, the default: "
                        "the best measured), by the trace library of past requests (trace), or not at all")
    g.add_argument("--stats", action="store_true", help="print a one-line expert-cache summary at the end")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens to generate (default: 128, or what the context leaves after the prompt; "
                        "more than the context leaves is an error)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0 = off)")
    g.add_argument("--top-k", type=int, default=-1, help="sample among the k most likely tokens (default: -1 = off)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling; same seed, same output")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def _sampling(args):
    from .runtime.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


def _set_threads(args) -> None:
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise MoetierError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def llm_options(args) -> dict:
    """The model arguments as LLM's keyword arguments."""
    return dict(model=args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                device_memory=args.device_memory, host_memory=args.host_memory, offload_dir=args.offload_dir,
                cache_policy=args.cache_policy, prefetch=args.prefetch, verify=args.verify,
                quantization=args.quantization, quant_group_size=args.quant_group_size, quant_dense=args.quant_dense)


def _llm(args, **override):
    from .llm import LLM

    _set_threads(args)
    return LLM(**{**llm_options(args), **override})


def _print_stats(llm, args) -> None:
    s = llm.stats()
    if not args.stats:
        return
    if not s:
        print("[stats] all experts resident", file=sys.stderr)
        return
    print(f"[stats] expert hits {s['hits']} misses {s['misses']} (hit rate {s['hit_rate']}), prefetch hits "
          f"{s['prefetch_hits']}/{s['prefetched']}, read {s['bytes_disk_to_host'] / 2**20:.1f} MiB from disk, "
          f"{s['bytes_host_to_device'] / 2**20:.1f} MiB to device, stalled {s['stall_s']:.2f} s", file=sys.stderr)


def cmd_generate(args) -> int:
    if args.prompt == "-":
        args.prompt = sys.stdin.read()
    asked = args.max_tokens
    args.max_tokens = asked or 128
    params = _sampling(args)  # bad values fail before the model loads
    llm = _llm(args)
    prompt = args.prompt
    if args.chat:
        from .tokenizer import chat_prompt

        prompt = {"prompt_token_ids": chat_prompt(llm.tokenizer, [{"role": "user", "content": args.prompt}])}
    elif llm.tokenizer is None:
        raise MoetierError("this model folder has no tokenizer, so it cannot take a text prompt")
    from .openai_api import check_context

    n = len(prompt["prompt_token_ids"]) if args.chat else len(llm.tokenizer.encode(prompt))
    room = check_context(n, asked, llm.engine.max_model_len)  # --max-tokens past the context: one line
    params.max_tokens = min(params.max_tokens, room)
    if not args.chat:
        sys.stdout.write(args.prompt)
    t0 = time.perf_counter()
    for piece in llm.stream(prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    dt = time.perf_counter() - t0
    print(f"[{dt:.2f} s]", file=sys.stderr)
    _print_stats(llm, args)
    llm.close()
    return 0


def cmd_eval(args) -> int:
    import json

    from .evaluate import evaluate, load_task

    if args.kl_base is not None or args.text is not None:
        return _eval_text(args)

    if args.task is None:
        from .demo import task_path

        args.task = str(task_path("addition"))
    items = load_task(args.task, args.limit)  # a bad file fails before the model loads
    llm = _llm(args)
    t0 = time.perf_counter()
    result = evaluate(llm, items, max_tokens=args.max_tokens, routing=args.routing, use_tqdm=not args.quiet)
    completions = result.pop("completions")
    if args.show:
        for it, c in zip(items, completions):
            print(f"{'ok ' if c == it.answer else 'BAD'} {it.prompt!r} -> {c!r} (want {it.answer!r})", file=sys.stderr)
    report = {"model": args.model, "task": args.task, **result, "seconds": round(time.perf_counter() - t0, 2)}
    print(json.dumps(report, indent=None if args.quiet else 2))
    _print_stats(llm, args)
    llm.close()
    return 0


def _eval_text(args) -> int:
    """``moetier eval --kl-base BASE [--text FILE]``: KL divergence and top-1 agreement against BASE,
    perplexity of both (of the model alone without --kl-base). Inputs are checked before loading."""
    import json

    from .errors import TaskError
    from .llm import resolve_model_path
    from .text_eval import DEFAULT_CTX, default_text, make_windows, read_text, text_eval
    from .tokenizer import load_tokenizer
    from .weights.loader import load_args

    given = [f for f, v in (("--task", args.task), ("--routing", args.routing), ("--max-tokens", args.max_tokens),
                            ("--show", args.show)) if v]
    if given:
        raise TaskError(f"{', '.join(given)}: options of the task evaluation; --kl-base and --text score a text")
    text_path = args.text or str(default_text())
    text = read_text(text_path)
    paths = {"--model": resolve_model_path(args.model)}
    if args.kl_base is not None:
        paths["--kl-base"] = resolve_model_path(args.kl_base)
    model_args = {flag: load_args(p)[1] for flag, p in paths.items()}
    vocabs = {flag: a.vocab_size for flag, a in model_args.items()}
    if len(set(vocabs.values())) > 1:
        raise TaskError(f"the models' vocabularies differ ({', '.join(f'{k} {v}' for k, v in vocabs.items())} "
                        f"tokens): KL divergence compares distributions over the same tokens")
    tokenizers = {flag: load_tokenizer(p) for flag, p in paths.items()}
    tok = tokenizers["--model"]
    if tok is None:
        raise TaskError(f"{paths['--model']}: scoring a text needs a tokenizer, and this model folder has none")
    base_tok = tokenizers.get("--kl-base")
    if base_tok is not None and base_tok.get_vocab() != tok.get_vocab():
        raise TaskError(f"{paths['--kl-base']} and {paths['--model']} have different tokenizers: "
                        f"KL divergence compares distributions over the same tokens")
    limit = min(args.max_model_len or a.max_position_embeddings for a in model_args.values()) - 1
    ctx = min(DEFAULT_CTX, limit) if args.ctx is None else args.ctx
    if ctx > limit:
        raise TaskError(f"--ctx {ctx} does not fit the context: a window must be shorter than the models' "
                        f"{limit + 1} tokens (max_model_len); give --ctx {limit} or less")
    windows = make_windows(tok, text, ctx, args.limit, source=text_path)
    llm = _llm(args)
    base = None
    try:
        if args.kl_base is not None:
            from .llm import LLM

            # the reference as it is: only the options that make its numbers comparable are passed on
            base = LLM(args.kl_base, device=args.device, dtype=args.kl_base_dtype or args.dtype,
                       max_model_len=args.max_model_len, device_memory=args.kl_base_memory)
        t0 = time.perf_counter()
        result = text_eval(llm, windows, base, use_tqdm=not args.quiet)
        report = {"model": args.model, "kl_base": args.kl_base, "text": text_path, **result,
                  "seconds": round(time.perf_counter() - t0, 2)}
        print(json.dumps(report, indent=None if args.quiet else 2))
        _print_stats(llm, args)
    finally:
        llm.close()
        if base is not None:
            base.close()
    return 0


def cmd_batch(args) -> int:
    import json
    from pathlib import Path

    from .batch_file import run_batch

    if not Path(args.input).exists():  # before the model loads
        raise FileNotFoundError(f"{args.input}: no such input file")
    if args.cascade is None and args.model is None:
        raise MoetierError("moetier batch needs --model (or --cascade)")
    if args.ray is not None:  # on a Ray cluster (moetier/cluster)
        from .cluster.cli import cmd_batch_ray

        return cmd_batch_ray(args, llm_options(args))
    if args.cascade is not None:
        from .cascade_cli import open_cascade

        _set_threads(args)
        llm = open_cascade(args.cascade, device_memory=args.device_memory or args.host_memory, device=args.device,
                           dtype=args.dtype, max_model_len=args.max_model_len, offload_dir=args.offload_dir)
        args.model = args.model or args.cascade
    else:
        llm = _llm(args)
    try:
        summary = run_batch(llm, args.input, args.output, model=args.model, explain=args.explain,
                            use_tqdm=not args.quiet, retry_errors=args.retry_errors)
    finally:
        llm.close()
    if args.explain:
        print(summary.pop("plan"))
    elif summary.get("run"):
        r = summary["run"]
        print(f"[batch] {summary['written']} results appended to {args.output} ({summary['errors']} errors, "
              f"{summary['already_done']} already there); {r['generated_tokens']} tokens in {r['seconds']:.1f} s: "
              f"{r['measured_tok_s']:.1f} tok/s measured, {r['predicted_tok_s']:.1f} predicted", file=sys.stderr)
    print(json.dumps(summary if not args.quiet else {k: v for k, v in summary.items() if k != "run"}))
    _print_stats(llm, args)
    if "checkpoint_error" in summary:  # its requests have error lines; a rerun once repaired runs them
        print(f"moetier: error: the run stopped on a damaged checkpoint: {summary['checkpoint_error']}",
              file=sys.stderr)
        return 1
    return 0


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def cmd_convert(args) -> int:
    from .weights.packed import PackedCheckpoint

    if args.verify:
        if args.out_dir is not None:
            args.parser.error("--verify takes one folder: moetier convert --verify OUT_DIR")
        t0 = time.perf_counter()
        with PackedCheckpoint(args.hf_dir) as ckpt:
            n = ckpt.verify(progress=not args.quiet)
            regions = len(ckpt.tensors) + len(ckpt.experts)
        dt = time.perf_counter() - t0
        print(f"{args.hf_dir}: ok: {regions} regions, {_size(n)} checked in {dt:.1f} s")
        return 0
    if args.out_dir is None:
        args.parser.error("convert needs HF_DIR and OUT_DIR (or --verify OUT_DIR)")
    from .weights.gguf import import_gguf, is_gguf
    from .weights.packed_write import convert

    t0 = time.perf_counter()
    if is_gguf(args.hf_dir):  # a GGUF file: imported (weights/gguf.py), its quantized blocks carried over
        out = import_gguf(args.hf_dir, args.out_dir, dtype=args.dtype, tokenizer=args.tokenizer,
                          max_file_size=args.max_file_size, force=args.force, progress=not args.quiet,
                          quant=args.quant, group_size=args.group_size, quant_dense=args.quant_dense,
                          exact_scales=args.exact_scales)
    elif args.tokenizer is not None or args.exact_scales:
        args.parser.error("--tokenizer and --exact-scales are for GGUF sources only")
    else:
        out = convert(args.hf_dir, args.out_dir, dtype=args.dtype, max_file_size=args.max_file_size,
                      force=args.force, progress=not args.quiet, quant=args.quant, group_size=args.group_size,
                      quant_dense=args.quant_dense)
    size = sum(f.stat().st_size for f in out.glob("weights-*.bin"))
    print(f"wrote {out} ({_size(size)}) in {time.perf_counter() - t0:.1f} s")
    return 0


def serve_models(values: list[str]) -> dict[str, str]:
    """``--model`` values as {id: path}: ``NAME=PATH``, or a bare path (or ``demo``) that is its own id."""
    models: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        name, path = (name, path) if sep and name and path else (v, v)
        if name in models:
            raise MoetierError(f"--model: the id {name!r} is given twice")
        models[name] = path
    return models


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def cmd_serve(args) -> int:
    from .ram import resolve_budget

    try:
        from .serve import make_server, serve
    except ImportError as e:  # fastapi / uvicorn: the serve extra
        raise MoetierError(f"moetier serve needs the serve extra ({e.name} is missing): pip install fastapi uvicorn "
                           "llguidance, or pip install -e '.[serve]' from a checkout") from None

    models = serve_models(args.model or [])
    from .cascade_cli import serve_cascades

    cascades = serve_cascades(args.cascade or [], models)  # adds the cascades' models to models
    if not models:
        raise MoetierError("moetier serve needs a --model (or a --cascade)")
    if args.ray is not None:  # on Ray Serve (moetier/cluster)
        from .cluster.cli import cmd_serve_ray

        return cmd_serve_ray(args, models, cascades, llm_options(args))
    total = args.device_memory or (args.host_memory if args.device == "cpu" else None)
    budget = resolve_budget(total, args.device)

    from .llm import resolve_model_path
    from .weights.loader import read_config

    for path in models.values():  # a folder that is not there fails now, not on the first request
        read_config(resolve_model_path(path))
    if args.threads is None and args.device == "cpu":
        # torch's worker threads spin between ops; on every core they starve the handler threads
        # that stream the tokens out (measured on 2 cores: 32 clients got 2.6x one client's
        # tokens/s with 2 threads, 5x with 1)
        args.threads = max(1, (os.cpu_count() or 2) - 1)
    if args.max_requests < 1:
        raise MoetierError(f"--max-requests must be at least 1, got {args.max_requests}")
    import logging

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def load(name: str, path: str, device_memory):
        """Resident when the pool says it fits; otherwise offloaded within the whole budget."""
        offload_dir = args.offload_dir and (str(Path(args.offload_dir) / _safe_name(name)) if len(models) > 1
                                            else args.offload_dir)
        return _llm(args, model=path, device_memory=device_memory, offload_dir=offload_dir,
                    host_memory=args.host_memory if device_memory is not None else None)

    server = make_server(models, load, host=args.host, port=args.port, api_key=args.api_key, budget=budget,
                         max_requests=args.max_requests, keep_alive=args.keep_alive, log_level=args.log_level)
    server.pool.cascades = cascades  # read by the app's generation endpoints (moetier/cascade_serve.py)
    serve(server)
    return 0


BENCH_DESCRIPTION = """\
Run a workload through moetier (or, with --system transformers, through Hugging Face
transformers) and write DIR/result.json: per phase (prefill, decode) TTFT, TPOT p50/p90/p99,
tokens/s, the sparsity-aware utilizations S-MBU and S-MFU (docs/metrics.md) and the
experts activated per step; the cost per million output tokens and its energy; the
exact-match accuracy on a task. Then draw several results on one chart:

  moetier bench --model demo --batch 4 --out runs/moetier-demo
  moetier bench --model demo --batch 4 --system transformers --out runs/hf-demo
  moetier bench report runs/moetier-demo runs/hf-demo --out report   (radar.png, utilization.png, report.md)"""


def cmd_bench(args) -> int:
    from .bench.report import markdown_table
    from .bench.run import BenchConfig, run_bench

    if args.model is None and args.cascade is None:
        args.parser.error("the following arguments are required: --model (or --cascade, or: moetier bench report DIR ...)")
    _set_threads(args)
    memory = {k: v for k, v in (("device_memory", args.device_memory), ("host_memory", args.host_memory),
                                ("offload_dir", args.offload_dir)) if v is not None}
    if memory:
        memory.update(cache_policy=args.cache_policy, prefetch=args.prefetch)
    if args.max_model_len is not None:
        memory["max_model_len"] = args.max_model_len
    if args.verify != "first-read":
        memory["verify"] = args.verify
    cfg = BenchConfig(
        model=args.model or args.cascade, cascade=args.cascade,
        out=Path(args.out or (f"bench-results/cascade-{Path(args.cascade).name.replace(',', '-')}" if args.cascade
                              else f"bench-results/{args.system}-{Path(args.model).name}")),
        system=args.system, workload=args.workload, input_len=args.input_len, output_len=args.output_len,
        batch=args.batch, concurrency=args.concurrency, num_prompts=args.num_prompts, hardware=args.hardware,
        usd_per_hour=args.price_per_hour, watts=args.watts, task=args.task, task_limit=args.task_limit,
        device=args.device, dtype=args.dtype, llm_options=memory, progress=not args.quiet)
    result = run_bench(cfg)
    print(markdown_table([result]))
    if args.stats:
        print(f"[stats] {result['expert_cache'] or 'all experts resident'}", file=sys.stderr)
    print(f"[bench] wrote {cfg.out / 'result.json'}", file=sys.stderr)
    return 0


def cmd_bench_report(args) -> int:
    from .bench.report import write_report

    print(write_report([Path(d) for d in args.dirs], Path(args.out)))
    print(f"[bench] wrote radar.png, utilization.png and report.md in {args.out}", file=sys.stderr)
    return 0


def _add_bench_parser(sub) -> None:
    from .bench.hardware import NAMES

    p = sub.add_parser("bench", help="measure cost, accuracy and performance (S-MBU, S-MFU) on a workload",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=BENCH_DESCRIPTION)
    _add_model_args(p, required=False)
    g = p.add_argument_group("workload")
    g.add_argument("--workload", default="fixed", metavar="fixed|task|FILE",
                   help='"fixed": --num-prompts prompts of --input-len random token ids (default); "task": the '
                        "--task prompts, each up to its answer's length + 2 tokens, ending at end-of-sequence; or "
                        'a JSONL file, one {"prompt": ..., "max_tokens": N (optional)} per line')
    g.add_argument("--cascade", default=None, metavar="A,B|FILE",
                   help="instead of --model, a confidence cascade (models smallest first, or a moetier cascade "
                        "calibrate file): also reports the share each model answered (best with --workload task)")
    g.add_argument("--input-len", type=int, default=64, metavar="N", help="fixed prompt length in tokens (default: 64)")
    g.add_argument("--output-len", type=int, default=32, metavar="N",
                   help="tokens each request generates, end-of-sequence ignored (default: 32)")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--batch", type=int, default=None, metavar="B",
                   help="run the requests in waves of B, each wave to its end (default: 1)")
    m.add_argument("--concurrency", type=int, default=None, metavar="C",
                   help="keep C requests in flight, a new one starting as one finishes (moetier only)")
    g.add_argument("--num-prompts", type=int, default=None, metavar="N",
                   help="requests of the fixed workload (default: B, or 4 x C)")
    g = p.add_argument_group("measurement")
    g.add_argument("--system", default="moetier", choices=["moetier", "transformers"],
                   help="run the workload through moetier's engine or transformers' generate (default: moetier)")
    g.add_argument("--hardware", default="local", metavar="NAME",
                   help=f"peaks, price and power to measure against: {', '.join(NAMES)} "
                        "(default: local, its peaks measured now)")
    g.add_argument("--price-per-hour", type=float, default=None, metavar="USD", help="override the hardware's price")
    g.add_argument("--watts", type=float, default=None, metavar="W", help="override the hardware's power")
    g.add_argument("--task", default=None, metavar="FILE",
                   help="exact-match task, JSONL of {\"prompt\", \"answer\"} (default: the demo's addition task)")
    g.add_argument("--task-limit", type=int, default=None, metavar="N", help="score only the first N task items")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="where result.json goes (default: bench-results/SYSTEM-MODEL)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench, parser=p)
    reports = p.add_subparsers(dest="bench_command", metavar="report", title="or compare runs")
    r = reports.add_parser(
        "report", help="draw results side by side: radar.png, utilization.png, report.md",
        description="Read DIR/result.json of each run and write, in --out: radar.png (accuracy, cost and "
                    "performance axes, each scaled so that better is outward; one chart per model and "
                    "workload), utilization.png (S-MBU and S-MFU per phase) and report.md (the table, "
                    "also printed).")
    r.add_argument("dirs", nargs="+", metavar="DIR", help="a folder holding a result.json")
    r.add_argument("--out", default="bench-report", metavar="DIR", help="where the report goes (default: bench-report)")
    r.set_defaults(func=cmd_bench_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moetier", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"moetier {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="generate text from a prompt, streamed to the terminal",
                       description="Generate a continuation of --prompt (or a chat reply with --chat), "
                                   "printing tokens as they are produced.")
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text ('-': read it from standard input)")
    p.add_argument("--chat", action="store_true", help="treat --prompt as a user message and apply the chat template")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="score a model by exact match on a JSONL task",
                       description="Greedily complete each task prompt and count the completions that, "
                                   "stripped, equal the answer. Prints the accuracy as JSON.")
    _add_model_args(p)
    p.add_argument("--task", default=None,
                   help='JSONL file, one {"prompt": ..., "answer": ...} per line '
                        "(default: the packaged held-out addition task)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items (with a text: windows)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens per completion (default: each answer's length in tokens + 2)")
    p.add_argument("--routing", action="store_true",
                   help="also report, per MoE layer, the share of routed tokens that go to the most popular "
                        "25%% of experts (uniform routing gives about 25%%)")
    p.add_argument("--show", action="store_true", help="print every completion to stderr")
    p.add_argument("--quiet", action="store_true", help="no progress bar; one-line JSON")
    g = p.add_argument_group(
        "text and reference model", "Instead of a task, score a text: the model's perplexity and, with --kl-base, "
        "the mean KL divergence KL(base || model) of its next-token distributions from the reference's, their "
        "top-1 agreement, the base's perplexity and the mean |delta log p| of the actual next token, over windows "
        "of --ctx tokens (the second half of each scored), as llama.cpp's perplexity --kl-divergence.")
    g.add_argument("--kl-base", default=None, metavar="FOLDER",
                   help="the reference model (e.g. the bf16 checkpoint a quantized --model came from), loaded "
                        "on the same --device, in --dtype unless --kl-base-dtype (a model against itself gives KL 0)")
    g.add_argument("--kl-base-dtype", default=None, choices=["bfloat16", "bf16", "float16", "fp16", "float32", "fp32"],
                   help="the reference's dtype (default: --dtype; e.g. float32 to measure what bf16 costs)")
    g.add_argument("--kl-base-memory", default=None, metavar="SIZE",
                   help="offload the reference's experts within this budget (default: load it whole)")
    g.add_argument("--text", default=None, metavar="FILE",
                   help="UTF-8 text to score (default: the packaged moetier/tasks/eval_text.txt)")
    g.add_argument("--ctx", type=int, default=None, metavar="N",
                   help="window length in tokens, BOS included (default: 512, or less to fit the context)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "batch", help="run an OpenAI Batch API file (JSONL) offline, in throughput mode",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every request of --input, an OpenAI Batch API file (one\n"
                    '{"custom_id", "method": "POST", "url": "/v1/chat/completions" or "/v1/completions", "body"}\n'
                    "per line), in big planned passes, appending one result line per request to --output as\n"
                    "it finishes. Re-running with the same --output skips the custom_ids already there, so an\n"
                    "interrupted job resumes where it stopped. A malformed line gets an error entry.")
    _add_model_args(p, required=False)
    p.add_argument("--cascade", default=None, metavar="A,B|FILE",
                   help="instead of --model, a confidence cascade: the whole file through A in throughput mode, "
                        "then the requests A is unsure of through B (FILE: a moetier cascade calibrate file); "
                        "each result's model names the model that answered, bodies may name the cascade "
                        "as --model NAME (default: the A,B list)")
    p.add_argument("--input", required=True, metavar="FILE", help="requests, JSONL")
    p.add_argument("--output", required=True, metavar="FILE", help="results, JSONL (appended to; resumed from)")
    p.add_argument("--explain", action="store_true",
                   help="print the throughput plan (batch sizes, memory split, predicted tokens/s) and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--retry-errors", action="store_true",
                   help="run again the lines whose last result in --output was an error")
    from .cluster.cli import add_batch_args

    add_batch_args(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser(
        "convert", help="write a checkpoint in moetier's packed format (fast loads), or verify one",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a Hugging Face checkpoint folder (config.json + *.safetensors) into moetier's\n"
                    "packed format: dense tensors, then each (layer, expert) as one 4 KiB-aligned region, in\n"
                    "files of bounded size, with an index (moetier-index.json) of offsets, shapes and CRC-32\n"
                    "checksums; config, generation config and tokenizer files are copied alongside. The\n"
                    "result loads like any model folder (--model OUT_DIR, LLM(OUT_DIR)) and faster.\n"
                    "The output is written to a hidden temporary folder and renamed at the end, so an\n"
                    "interrupted convert leaves nothing that looks complete.\n\n"
                    "  moetier convert HF_DIR OUT_DIR [--dtype bf16] [--max-file-size 2GiB]\n"
                    "                 [--quant int8|int4 [--group-size N]] [--quant-dense int8|none]\n"
                    "  moetier convert MODEL.gguf OUT_DIR [--tokenizer HF_DIR|none]   import a GGUF file: Q8_0 /\n"
                    "                 Q4_0 / Q4_1 blocks carried over as int8 / int4, F16/BF16/F32 as they are,\n"
                    "                 other types (Q4_K, Q6_K, MXFP4, ...) re-quantized to int4 / int8 (logged);\n"
                    "                 --quant / --quant-dense re-quantize what is not of that kind"
                    "  moetier convert --verify OUT_DIR   re-read every region and check its checksum\n"
                    "                                     (exit 1 and name the file and tensor if any is bad)")
    p.add_argument("hf_dir", metavar="HF_DIR", help="the source checkpoint folder (with --verify: the packed folder)")
    p.add_argument("out_dir", metavar="OUT_DIR", nargs="?", default=None,
                   help="the packed folder to write (must not exist or be empty, unless --force)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "bf16", "float16", "fp16", "float32", "fp32"],
                   help="stored dtype (default: the checkpoint's own, so outputs stay bit-identical; "
                        "router weights a family keeps in float32 stay float32)")
    p.add_argument("--max-file-size", default="2GiB",
                   help="largest weight file, e.g. 2GiB, 500MB (default: 2GiB); tensors are never split, "
                        "so one bigger than this gets a file of its own")
    p.add_argument("--quant", default=None, choices=["int8", "int4"],
                   help="quantize the routed experts: int8 (symmetric; per-channel unless --group-size) or int4 "
                        "(asymmetric, groups of --group-size inputs); routers, norms, embeddings stay 16-bit")
    p.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="inputs per scale for --quant (int4: 32 (default), 64, 128, 256; int8: a divisor of "
                        "each input dimension, e.g. 32 as GGUF Q8_0)")
    p.add_argument("--quant-dense", default=None, choices=["int8", "none"],
                   help="attention, LM head and dense MLPs: int8 per-channel, or none (the default; GGUF "
                        "sources: the default keeps each tensor's GGUF kind, none dequantizes)")
    p.add_argument("--tokenizer", default=None, metavar="HF_DIR|none",
                   help="GGUF sources: copy the tokenizer from this folder instead of building it from the GGUF "
                        "vocabulary, or 'none' to import without one (token-id prompts only)")
    p.add_argument("--exact-scales", action="store_true",
                   help="GGUF sources: keep Q4_0/Q4_1 scales in fp16 as in the file (default: rounded to bf16, "
                        "which torch's int4 CPU kernel runs ~70x faster; the codes are never changed)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    p.add_argument("--verify", action="store_true", help="check the packed folder HF_DIR instead of converting")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert, parser=p)

    p = sub.add_parser(
        "serve", help="serve models over an OpenAI-compatible HTTP API",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve one or more models at http://HOST:PORT/v1: GET /v1/models, POST /v1/completions and\n"
                    "/v1/chat/completions (stream=true for server-sent events), GET /health and GET /metrics\n"
                    "(Prometheus). Requests running at the same time share decode steps.\n\n"
                    "Each --model loads on its first request. With a memory budget (--device-memory, or\n"
                    "--host-memory on the CPU) a model that fits loads whole, the least recently used idle\n"
                    "models are evicted to make room, and a model bigger than the budget runs offloaded\n"
                    "within it. Without a budget nothing is evicted.\n\n"
                    "  moetier serve --model demo\n"
                    "  moetier serve --model mixtral=/models/Mixtral-8x7B --model olmoe=/models/OLMoE --device-memory 20GiB")
    _add_model_args(p, many=True, required=False)
    p.add_argument("--cascade", action="append", default=None, metavar="NAME=A,B|NAME=FILE",
                   help="also serve the model id NAME as a confidence cascade: A answers, B when A is unsure "
                        "(models by --model id or path; FILE: a moetier cascade calibrate file); repeatable")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 requests (default: $MOETIER_API_KEY, else none)")
    p.add_argument("--max-requests", type=int, default=256, metavar="N",
                   help="requests served at once, all models; more get 429 (default: 256)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="info: model loads and evictions (default); debug: also one line per request; "
                        "warning: problems only")
    p.add_argument("--keep-alive", type=float, default=None, metavar="SECONDS",
                   help="unload a model this long after its last request (default: keep it loaded; a "
                        "request's own keep_alive field overrides this)")
    from .cluster.cli import add_serve_args

    add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    _add_bench_parser(sub)
    from .cascade_cli import add_parser as _add_cascade_parser

    _add_cascade_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "serve" and args.api_key is None:
        args.api_key = os.environ.get("MOETIER_API_KEY") or None
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (MoetierError, ValueError, FileNotFoundError) as e:
        print(f"moetier: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
