"""Argument groups and helpers the commands share: the model, memory and sampling options, and
the LLM they open."""

from __future__ import annotations

import argparse
import sys

from .errors import MoetierError


def add_model_args(p: argparse.ArgumentParser, many: bool = False, required: bool = True) -> None:
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
    g.add_argument("--quantization", default=None, choices=["int8", "int4", "none"],
                   help="quantize the routed experts on load (offloaded: into the packed copy); a folder "
                        "converted with --quant is already quantized and needs none. MXFP4 experts (gpt-oss) "
                        "are kept exactly as int8 groups of 32 unless this asks otherwise (none: dequantized)")
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


def add_sampling_args(p: argparse.ArgumentParser) -> None:
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


def sampling_params(args):
    from .runtime.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


def set_threads(args) -> None:
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


def open_llm(args, **override):
    from .llm import LLM

    set_threads(args)
    return LLM(**{**llm_options(args), **override})


def print_stats(llm, args) -> None:
    s = llm.stats()
    if not args.stats:
        return
    if not s:
        print("[stats] all experts resident", file=sys.stderr)
        return
    print(f"[stats] expert hits {s['hits']} misses {s['misses']} (hit rate {s['hit_rate']}), prefetch hits "
          f"{s['prefetch_hits']}/{s['prefetched']}, read {s['bytes_disk_to_host'] / 2**20:.1f} MiB from disk, "
          f"{s['bytes_host_to_device'] / 2**20:.1f} MiB to device, stalled {s['stall_s']:.2f} s", file=sys.stderr)
