"""Command line: ``moetier generate | chat | ...``. The only module that reads the environment."""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import cascade_cli, cli_batch, cli_bench, cli_chat, cli_serve
from .cli_args import add_model_args, add_sampling_args, open_llm, print_stats, sampling_params
from .errors import MoetierError

DESCRIPTION = """\
moetier runs Mixture-of-Experts language models (Mixtral, Qwen-MoE, OLMoE,
DeepSeek-V2/V3) from Hugging Face checkpoint folders.

Use --model demo for the small model that ships with the package."""


def cmd_generate(args) -> int:
    if args.prompt == "-":
        args.prompt = sys.stdin.read()
    asked = args.max_tokens
    args.max_tokens = asked or 128
    params = sampling_params(args)  # bad values fail before the model loads
    llm = open_llm(args)
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
    print_stats(llm, args)
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
    llm = open_llm(args)
    t0 = time.perf_counter()
    result = evaluate(llm, items, max_tokens=args.max_tokens, routing=args.routing, use_tqdm=not args.quiet)
    completions = result.pop("completions")
    if args.show:
        for it, c in zip(items, completions):
            print(f"{'ok ' if c == it.answer else 'BAD'} {it.prompt!r} -> {c!r} (want {it.answer!r})", file=sys.stderr)
    report = {"model": args.model, "task": args.task, **result, "seconds": round(time.perf_counter() - t0, 2)}
    print(json.dumps(report, indent=None if args.quiet else 2))
    print_stats(llm, args)
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
    llm = open_llm(args)
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
        print_stats(llm, args)
    finally:
        llm.close()
        if base is not None:
            base.close()
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moetier", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"moetier {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="generate text from a prompt, streamed to the terminal",
                       description="Generate a continuation of --prompt (or a chat reply with --chat), "
                                   "printing tokens as they are produced.")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text ('-': read it from standard input)")
    p.add_argument("--chat", action="store_true", help="treat --prompt as a user message and apply the chat template")
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)
    cli_chat.add_parser(sub)  # moetier/cli_chat.py

    p = sub.add_parser("eval", help="score a model by exact match on a JSONL task",
                       description="Greedily complete each task prompt and count the completions that, "
                                   "stripped, equal the answer. Prints the accuracy as JSON.")
    add_model_args(p)
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

    cli_batch.add_parser(sub)  # moetier/cli_batch.py

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
                    "                 --quant / --quant-dense re-quantize what is not of that kind\n"
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
    p.add_argument("--quant", default=None, choices=["int8", "int4", "none"],
                   help="quantize the routed experts: int8 (symmetric; per-channel unless --group-size) or int4 "
                        "(asymmetric, groups of --group-size inputs); routers, norms, embeddings stay 16-bit. "
                        "MXFP4 experts (gpt-oss) are kept exactly as int8 groups of 32 by default; none "
                        "dequantizes them")
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

    cli_serve.add_parser(sub)  # moetier/cli_serve.py
    cli_bench.add_parser(sub)  # moetier/cli_bench.py
    cascade_cli.add_parser(sub)  # moetier/cascade_cli.py
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
