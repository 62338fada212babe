"""Command line: ``moetier generate | ...``. The only module that reads the environment."""

from __future__ import annotations

import argparse
import sys
import time

from .errors import MoetierError

DESCRIPTION = """\
moetier runs Mixture-of-Experts language models (Mixtral, Qwen-MoE, OLMoE,
DeepSeek-V2/V3) from Hugging Face checkpoint folders.

Use --model demo for the small model that ships with the package."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="checkpoint folder (config.json + *.safetensors, or a packed folder "
                                                "from moetier convert), or 'demo'")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    g.add_argument("--dtype", default=None, choices=["auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32"],
                   help="weight and activation dtype (default: the checkpoint's own)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output in tokens (default: the model's max_position_embeddings)")
    g = p.add_argument_group("memory (offloading)", "Give a budget to keep only the dense weights resident and "
                             "serve the routed experts from disk through a cache; output is unchanged.")
    g.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="all the engine may hold on --device: weights, KV and expert cache (e.g. 6GiB)")
    g.add_argument("--host-memory", default=None, metavar="SIZE",
                   help="host tier budget; on --device cpu the RAM budget when --device-memory is not given")
    g.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="where the packed copy of an HF folder and the trace library go "
                        "(default: a per-model folder under ~/.cache/moetier)")
    g.add_argument("--cache-policy", default="activation", choices=["activation", "lru", "lfu"],
                   help="expert cache replacement policy (default: activation)")
    g.add_argument("--prefetch", default="trace", choices=["trace", "lookahead", "none"],
                   help="predict coming experts from the trace library, the next layer's router, or not at all "
                        "(default: trace)")
    g.add_argument("--stats", action="store_true", help="print a one-line expert-cache summary at the end")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
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


def _llm(args):
    from .llm import LLM

    return LLM(args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
               device_memory=args.device_memory, host_memory=args.host_memory, offload_dir=args.offload_dir,
               cache_policy=args.cache_policy, prefetch=args.prefetch)


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
    params = _sampling(args)
    llm = _llm(args)
    prompt = args.prompt
    if args.chat:
        from .tokenizer import chat_prompt

        prompt = {"prompt_token_ids": chat_prompt(llm.tokenizer, [{"role": "user", "content": args.prompt}])}
    elif llm.tokenizer is None:
        raise MoetierError("this model folder has no tokenizer, so it cannot take a text prompt")
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


def cmd_batch(args) -> int:
    import json
    from pathlib import Path

    from .batch_file import run_batch

    if not Path(args.input).exists():  # before the model loads
        raise FileNotFoundError(f"{args.input}: no such input file")
    llm = _llm(args)
    try:
        summary = run_batch(llm, args.input, args.output, model=args.model, explain=args.explain,
                            use_tqdm=not args.quiet)
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
    from .weights.packed_write import convert

    t0 = time.perf_counter()
    out = convert(args.hf_dir, args.out_dir, dtype=args.dtype, max_file_size=args.max_file_size,
                  force=args.force, progress=not args.quiet)
    size = sum(f.stat().st_size for f in out.glob("weights-*.bin"))
    print(f"wrote {out} ({_size(size)}) in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_serve(args) -> int:
    from .serve import serve

    llm = _llm(args)
    try:
        serve(llm, args.model, host=args.host, port=args.port, api_key=args.api_key)
    finally:
        llm.close()
    return 0


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
    p.add_argument("--prompt", required=True, help="the prompt text")
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
    p.add_argument("--limit", type=int, default=None, help="score only the first N items")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens per completion (default: each answer's length in tokens + 2)")
    p.add_argument("--routing", action="store_true",
                   help="also report, per MoE layer, the share of routed tokens that go to the most popular "
                        "25%% of experts (uniform routing gives about 25%%)")
    p.add_argument("--show", action="store_true", help="print every completion to stderr")
    p.add_argument("--quiet", action="store_true", help="no progress bar; one-line JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "batch", help="run an OpenAI Batch API file (JSONL) offline, in throughput mode",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every request of --input, an OpenAI Batch API file (one\n"
                    '{"custom_id", "method": "POST", "url": "/v1/chat/completions" or "/v1/completions", "body"}\n'
                    "per line), in big planned passes, appending one result line per request to --output as\n"
                    "it finishes. Re-running with the same --output skips the custom_ids already there, so an\n"
                    "interrupted job resumes where it stopped. A malformed line gets an error entry.")
    _add_model_args(p)
    p.add_argument("--input", required=True, metavar="FILE", help="requests, JSONL")
    p.add_argument("--output", required=True, metavar="FILE", help="results, JSONL (appended to; resumed from)")
    p.add_argument("--explain", action="store_true",
                   help="print the throughput plan (batch sizes, memory split, predicted tokens/s) and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
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
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    p.add_argument("--verify", action="store_true", help="check the packed folder HF_DIR instead of converting")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert, parser=p)

    p = sub.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve --model at http://HOST:PORT/v1 (GET /v1/models, POST /v1/completions and "
                    "/v1/chat/completions, streaming with stream=true; GET /health). Requests running at "
                    "the same time share decode steps. The model id clients pass is the --model value.")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 requests (default: $MOETIER_API_KEY, else none)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "serve" and args.api_key is None:
        import os

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
