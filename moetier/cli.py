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
    g.add_argument("--model", required=True, help="checkpoint folder (config.json + *.safetensors), or 'demo'")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    g.add_argument("--dtype", default=None, choices=["auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32"],
                   help="weight and activation dtype (default: the checkpoint's own)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output in tokens (default: the model's max_position_embeddings)")


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

    return LLM(args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len)


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
    t0, n = time.perf_counter(), 0
    for piece in llm.stream(prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
        n += 1
    sys.stdout.write("\n")
    dt = time.perf_counter() - t0
    print(f"[{dt:.2f} s]", file=sys.stderr)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
