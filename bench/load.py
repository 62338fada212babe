"""Load time: moetier's packed format vs safetensors vs torch.load(mmap=True), against the raw read rate.

Builds a synthetic Mixtral (hub layout, bf16, ~--size-gib GiB) once, converts it to the packed
format once and saves its state dict with torch.save once, then times, cold (page cache dropped)
and warm, how long each way takes until every weight is usable on --device:

- ``packed``: ``load_model(packed folder)`` (moetier's pipelined loader, the model built and filled,
  each region's CRC-32 checked as it is read: the default ``verify="first-read"``);
- ``hf_folder``: ``load_model(HF folder)`` (moetier's safetensors loader, experts stacked);
- ``safetensors``: ``safetensors.torch.load_file`` for every shard, then ``.to(device)`` (on the
  CPU a no-op: the tensors view the file mapping, so warm it measures almost nothing);
- ``safetensors_copy`` (CPU): the same, then ``.clone()`` into process memory, as the packed
  loader delivers it;
- ``torch_load_mmap``: ``torch.load(mmap=True, weights_only=True)``, then materialised: ``.clone()``
  on the CPU (mmap'd tensors are not loaded until touched) or ``.to(device)``;
- ``raw_read``: a dd-like sequential read of the packed files with one 16 MiB buffer
  (``raw_read_direct``: the same with O_DIRECT), the rate the disk gives;
- ``expert_read``: ``PackedCheckpoint.read_into(layer, expert, slot)`` of random experts, one
  aligned read each, as the expert store does it.

``--checksums`` measures instead what checking each region's CRC-32 on its first read costs
(``verify="first-read"`` against ``"off"``, alternating, cold, medians): one expert read alone
(the read, then the check, in one thread), the store's way (4 loader threads, each checking what
it read while the others read), decoding 8 tokens with offloaded experts (a fresh LLM per run:
every expert read a first read) and the resident load of the whole folder.

Cold means ``sync; echo 3 > /proc/sys/vm/drop_caches`` when the script may (root), else
``posix_fadvise(DONTNEED)`` on each file (drops its clean pages, no root needed); the JSON says
which. Prints one JSON object per (method, cache state) and a summary with GB/s and ratios.

    python bench/load.py                    # ~2 GiB, CPU
    python bench/load.py --size-gib 6       # the issue's larger size
    python bench/load.py --device cuda      # GB/s into GPU memory
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from common import drop_file_cache, emit, raw_read, synthetic_checkpoint  # noqa: E402

from moetier.weights.direct_io import aligned_buffer  # noqa: E402
from moetier.weights.loader import load_model  # noqa: E402
from moetier.weights.packed import PackedCheckpoint  # noqa: E402
from moetier.weights.packed_write import convert  # noqa: E402

GB = 1e9


def model_config(size_gib: float, hidden: int, inter: int, experts: int, vocab: int) -> dict:
    """A Mixtral config whose bf16 weights come to about ``size_gib`` GiB."""
    heads, kv = hidden // 128, max(1, hidden // 512)
    per_layer = 3 * experts * hidden * inter + hidden * 128 * (2 * heads + 2 * kv) + experts * hidden + 2 * hidden
    layers = max(1, round((size_gib * 2**30 / 2 - 2 * vocab * hidden) / per_layer))
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, num_local_experts=experts, num_experts_per_tok=2, vocab_size=vocab,
                max_position_embeddings=4096, tie_word_embeddings=False)


def prepare(root: Path, cfg: dict, torch_save: bool = True) -> dict[str, list[Path]]:
    hf = synthetic_checkpoint(root / "hf", "mixtral", cfg, dtype=torch.bfloat16)
    packed = root / "packed"
    if not (packed / "moetier-index.json").exists():
        t = time.perf_counter()
        convert(hf, packed, progress=False)
        dt = time.perf_counter() - t
        size = sum(f.stat().st_size for f in packed.glob("weights-*.bin"))
        emit({"what": "convert", "seconds": round(dt, 2), "gbps": round(size / dt / GB, 3)})
    pt = root / "model.pt"
    if torch_save and not pt.exists():
        from safetensors.torch import load_file

        sd = {}
        for f in sorted(hf.glob("*.safetensors")):
            sd.update(load_file(f))
        torch.save(sd, root / "model.pt.tmp")
        (root / "model.pt.tmp").rename(pt)
        del sd
    return {"hf": sorted(hf.glob("*.safetensors")), "packed": sorted(packed.glob("weights-*.bin")),
            "pt": [pt] if pt.exists() else [],
            "hf_dir": hf, "packed_dir": packed}


def drop_caches(files: list[Path]) -> str:
    """Empty the page cache (all of it if we may, else these files' pages); how it was done."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return "drop_caches"
    except OSError:
        pass
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise_dontneed"


def warm_up(files: list[Path]) -> None:
    """Read every file once through the page cache (untimed) so the next read is warm."""
    buf = bytearray(16 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_packed(paths, device):
    model, _, _ = load_model(paths["packed_dir"], device=device)
    sync(device)
    return model


def run_hf_folder(paths, device):
    model, _, _ = load_model(paths["hf_dir"], device=device)
    sync(device)
    return model


def run_safetensors(paths, device):
    from safetensors.torch import load_file

    out = {}
    for f in paths["hf"]:
        out.update({k: v.to(device) for k, v in load_file(f).items()})
    sync(device)
    return out


def run_safetensors_copy(paths, device):
    """CPU only: load_file's tensors view the file mapping (nothing read until touched), so copy
    them into process memory, which is what the packed loader hands over."""
    from safetensors.torch import load_file

    out = {}
    for f in paths["hf"]:
        out.update({k: v.clone() for k, v in load_file(f).items()})
    return out


def run_torch_load(paths, device):
    sd = torch.load(paths["pt"][0], mmap=True, weights_only=True)
    out = {k: (v.clone() if device.type == "cpu" else v.to(device)) for k, v in sd.items()}
    sync(device)
    return out


def checksum_cost(paths, experts_read: int, repeats: int) -> None:
    """CRC-32 on first read vs none: single expert reads, 4 loader threads, the resident load (cold:
    the packed files' pages dropped before each read, the rest of the page cache left alone)."""
    import threading
    import zlib
    from concurrent.futures import ThreadPoolExecutor

    from moetier.experts.sources import PackedSource
    from moetier.weights import checksum

    files = paths["packed"]
    os.sync()  # once: the files' pages are clean from then on, so dropping them is enough for a cold read
    ratio = lambda on, off: round(statistics.median(on) / statistics.median(off) - 1, 4)  # noqa: E731
    with PackedCheckpoint(paths["packed_dir"]) as ck:
        keys = sorted(ck.experts)
        layers = sorted({k[0] for k in keys})
        per = ck.experts[keys[0]].nbytes
        slot = aligned_buffer(ck.experts[keys[0]].read_nbytes)
        g = torch.Generator().manual_seed(0)
        pick = [keys[i] for i in torch.randperm(len(keys), generator=g)[:experts_read].tolist()]
        times: dict[str, list[float]] = {"off": [], "first-read": []}
        crc_s = []
        for i, (layer, e) in enumerate(pick):  # alternate which goes first
            for mode in (("off", "first-read") if i % 2 == 0 else ("first-read", "off")):
                drop_file_cache(files, sync=False)
                t = time.perf_counter()
                ck.read_into(layer, e, slot, verify=mode != "off")
                times[mode].append(time.perf_counter() - t)
            view = memoryview(slot.numpy())[:per]
            t = time.thread_time()  # CPU time: what the check costs, however busy the machine's cores are
            checksum.crc32(view)
            crc_s.append(time.thread_time() - t)
        t = time.perf_counter()
        zlib.crc32(view)
        zlib_s = time.perf_counter() - t
        emit({"what": "checksum_expert_read", "experts": len(pick), "expert_mib": round(per / 2**20, 2),
              "crc": checksum._crc32.__module__, "read_ms": round(statistics.median(times["off"]) * 1e3, 2),
              "read_checked_ms": round(statistics.median(times["first-read"]) * 1e3, 2),
              "crc_cpu_ms": round(statistics.median(crc_s) * 1e3, 2),
              "crc_gbps": round(per / statistics.median(crc_s) / GB, 2),
              "crc_over_read": round(statistics.median(crc_s) / statistics.median(times["off"]), 4),
              "zlib_crc_gbps": round(per / zlib_s / GB, 2), "overhead": ratio(times["first-read"], times["off"])})

        # the store's way: 4 loader threads, each reads an expert and checks it (a fresh source: all first reads)
        batch = [keys[i] for i in torch.randperm(len(keys), generator=g)[: max(8, min(len(keys), 64))].tolist()]
        local = threading.local()

        def read(src, key) -> None:
            if not hasattr(local, "buf"):  # one slot per loader thread, as the store's staging buffers
                local.buf = aligned_buffer(slot.numel())
            src.read_into(layers.index(key[0]), key[1], local.buf)

        wall: dict[str, list[float]] = {"off": [], "first-read": []}
        for rep in range(repeats):
            for mode in (("off", "first-read") if rep % 2 == 0 else ("first-read", "off")):
                src = PackedSource(ck, layers, verify=mode)
                drop_file_cache(files, sync=False)
                with ThreadPoolExecutor(4) as pool:
                    t = time.perf_counter()
                    list(pool.map(lambda key: read(src, key), batch))
                    wall[mode].append(time.perf_counter() - t)
        emit({"what": "checksum_store_reads", "threads": 4, "experts": len(batch),
              "gbps_off": round(len(batch) * per / statistics.median(wall["off"]) / GB, 3),
              "gbps_checked": round(len(batch) * per / statistics.median(wall["first-read"]) / GB, 3),
              "all_s": {k: [round(x, 3) for x in v] for k, v in wall.items()},
              "overhead": ratio(wall["first-read"], wall["off"])})

    # decoding with offloaded experts: a fresh LLM each run, so every expert read is a first read
    from moetier import LLM, SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    decode: dict[str, list[float]] = {"off": [], "first-read": []}
    for rep in range(repeats):
        for mode in (("off", "first-read") if rep % 2 == 0 else ("first-read", "off")):
            with LLM(paths["packed_dir"], expert_slots=4 * len(set(e for _, e in keys)), verify=mode) as llm:
                drop_file_cache(files, sync=False)
                t = time.perf_counter()
                llm.generate([{"prompt_token_ids": list(range(1, 17))}], params, use_tqdm=False)
                decode[mode].append((time.perf_counter() - t) / params.max_tokens)
                read = llm.stats()["bytes_disk_to_host"]
    emit({"what": "checksum_decode", "slots": 4 * len(set(e for _, e in keys)), "tokens": params.max_tokens,
          "ms_per_token_off": round(statistics.median(decode["off"]) * 1e3, 1),
          "ms_per_token_checked": round(statistics.median(decode["first-read"]) * 1e3, 1),
          "read_mib_per_run": round(read / 2**20), "overhead": ratio(decode["first-read"], decode["off"])})

    # the resident load of the whole folder: every region checked while the pipeline reads it
    load: dict[str, list[float]] = {"off": [], "first-read": []}
    for rep in range(repeats):
        for mode in (("off", "first-read") if rep % 2 == 0 else ("first-read", "off")):
            drop_file_cache(files, sync=False)
            gc.collect()
            t = time.perf_counter()
            model, _, _ = load_model(paths["packed_dir"], verify=mode)
            load[mode].append(time.perf_counter() - t)
            del model
    emit({"what": "checksum_resident_load", "seconds_off": round(statistics.median(load["off"]), 3),
          "seconds_checked": round(statistics.median(load["first-read"]), 3),
          "all_s": {k: [round(x, 3) for x in v] for k, v in load.items()},
          "overhead": ratio(load["first-read"], load["off"]), "target": "< 0.05"})


METHODS = {"packed": (run_packed, "packed"), "hf_folder": (run_hf_folder, "hf"),
           "safetensors": (run_safetensors, "hf"), "safetensors_copy": (run_safetensors_copy, "hf"),
           "torch_load_mmap": (run_torch_load, "pt")}


def fs_type(path: Path) -> str:
    try:
        return subprocess.run(["df", "-T", str(path)], capture_output=True, text=True).stdout.split("\n")[1].split()[1]
    except Exception:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2.0, help="checkpoint size (default 2; the issue asks 2-6)")
    ap.add_argument("--dir", default="/tmp/moetier-bench-load", help="where the checkpoints are kept between runs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--experts-read", type=int, default=16, help="random single-expert reads to time")
    ap.add_argument("--checksums", action="store_true",
                    help="only measure the cost of checking CRC-32s on first read (verify first-read vs off)")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type != "cpu" and "safetensors_copy" in args.methods:
        args.methods.remove("safetensors_copy")  # .to(device) already copies
    cfg = model_config(args.size_gib, args.hidden, args.intermediate, args.experts, args.vocab)
    root = Path(args.dir) / f"mixtral-{args.size_gib:g}gib-h{args.hidden}-i{args.intermediate}-e{args.experts}"
    root.mkdir(parents=True, exist_ok=True)
    paths = prepare(root, cfg, torch_save=not args.checksums)
    with PackedCheckpoint(paths["packed_dir"]) as ck:
        r = ck.regions()[0]
        direct = ck.reader.uses_direct(r.path, r.what)
        nbytes = sum(r.nbytes for r in ck.regions())  # the model's weight bytes, the same for every method
    all_files = paths["hf"] + paths["packed"] + paths["pt"]
    env = {"device": str(device), "cpus": os.cpu_count(), "kernel": platform.release(), "fs": fs_type(root),
           "o_direct": direct, "torch": torch.__version__, "weights_gib": round(nbytes / 2**30, 3),
           "layers": cfg["num_hidden_layers"], "repeats": args.repeats}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    emit({"what": "setup", **env})
    if args.checksums:
        checksum_cost(paths, args.experts_read, args.repeats)
        return

    results: dict[tuple[str, str], float] = {}
    cold_how = None
    for state in ("cold", "warm"):
        # raw sequential reads of the packed files: buffered (dd-like) and O_DIRECT
        for name, direct_io in (("raw_read", False), ("raw_read_direct", True)):
            if direct_io and not direct:
                continue
            times = []
            for _ in range(args.repeats):
                if state == "cold":
                    cold_how = drop_caches(all_files)
                else:
                    warm_up(paths["packed"])
                t = time.perf_counter()
                got = raw_read(paths["packed"], direct_io)
                times.append(time.perf_counter() - t)
            med = statistics.median(times)
            results[(name, state)] = got / med
            emit({"what": name, "cache": state, "seconds": round(med, 3), "gbps": round(got / med / GB, 3),
                  "all_s": [round(x, 3) for x in times]})
        for name in args.methods:
            fn, files = METHODS[name]
            times = []
            for _ in range(args.repeats):
                if state == "cold":
                    cold_how = drop_caches(all_files)
                else:
                    warm_up(paths[files])
                gc.collect()
                t = time.perf_counter()
                out = fn(paths, device)
                times.append(time.perf_counter() - t)
                del out
                gc.collect()
            med = statistics.median(times)
            results[(name, state)] = nbytes / med
            emit({"what": name, "cache": state, "seconds": round(med, 3), "gbps": round(nbytes / med / GB, 3),
                  "all_s": [round(x, 3) for x in times]})

        # the expert store's access: one aligned read of one (layer, expert), in random order
        with PackedCheckpoint(paths["packed_dir"]) as ck:
            keys = sorted(ck.experts)
            g = torch.Generator().manual_seed(0)
            pick = [keys[i] for i in torch.randperm(len(keys), generator=g)[: args.experts_read].tolist()]
            slot = aligned_buffer(max(ck.experts[k].read_nbytes for k in pick))
            if state == "cold":
                cold_how = drop_caches(all_files)
            else:
                warm_up(paths["packed"])
            times = []
            for layer, e in pick:
                t = time.perf_counter()
                ck.read_into(layer, e, slot)
                times.append(time.perf_counter() - t)
            per = ck.experts[pick[0]].nbytes
        emit({"what": "expert_read", "cache": state, "experts": len(pick), "expert_mib": round(per / 2**20, 2),
              "median_ms": round(statistics.median(times) * 1e3, 2), "gbps": round(per / statistics.median(times) / GB, 3)})

    summary = {"what": "summary", "cold_method": cold_how, **env}
    for state in ("cold", "warm"):
        packed = results.get(("packed", state))
        for name in ("safetensors", "safetensors_copy", "torch_load_mmap", "hf_folder"):
            if packed and (name, state) in results:
                summary[f"packed_vs_{name}_{state}"] = round(packed / results[(name, state)], 2)
        for raw in ("raw_read", "raw_read_direct"):
            if packed and (raw, state) in results:
                summary[f"packed_over_{raw}_{state}"] = round(packed / results[(raw, state)], 2)
        summary[f"gbps_{state}"] = {k[0]: round(v / GB, 3) for k, v in results.items() if k[1] == state}
    summary["targets"] = {"packed_vs_safetensors_cold": ">= 2.0", "packed_over_raw_read_cold": ">= 0.8"}
    emit(summary)


if __name__ == "__main__":
    main()
