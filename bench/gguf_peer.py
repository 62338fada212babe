"""llama.cpp as a peer: a GGUF of a Hugging Face checkpoint, and batch-1 greedy decode timed through
llama-cpp-python.

:func:`make_gguf` runs llama.cpp's own converter (``convert_hf_to_gguf.py``, with its
``conversion/`` and ``gguf-py/`` folders beside it, as in a llama.cpp checkout or in the
``vendor/llama.cpp`` folder of the llama-cpp-python sdist, which it can unpack) on a staging
folder: the checkpoint's config and weight files (linked, not copied) plus, where the checkpoint
has no tokenizer (the benchmarks' random-weight models), a stand-in: a byte-fallback BPE
vocabulary of exactly ``vocab_size`` tokens (``<unk>``, ``<s>``, ``</s>``, the 256 byte tokens,
then fillers) that the converter reads as a Llama tokenizer. Benchmarks feed token ids, so the
vocabulary only has to have the right size.

:func:`decode_latency` loads a GGUF with ``Llama(use_mmap=True)`` (llama.cpp's default: the
weights stay in the file's page cache, which a memory cgroup counts) and times every decode
step of greedy requests.

    python bench/gguf_peer.py HF_DIR OUT.gguf --outtype bf16 --converter llama_cpp_python-0.3.36.tar.gz
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Optional

CONVERTER_ENV = "LLAMA_CPP_CONVERTER"  # where convert_hf_to_gguf.py is, when not passed


def llama_cpp_version() -> Optional[str]:
    """llama-cpp-python's version, or None where it is not importable."""
    try:
        import llama_cpp
    except Exception:
        return None
    return getattr(llama_cpp, "__version__", "unknown")


def find_converter(converter: Optional[str | Path], cache: Path) -> Path:
    """``convert_hf_to_gguf.py`` from a path to it, a folder holding it, or a llama-cpp-python sdist
    (its ``vendor/llama.cpp`` converter is unpacked into ``cache``); default: ``$LLAMA_CPP_CONVERTER``."""
    converter = converter or os.environ.get(CONVERTER_ENV)
    if not converter:
        raise FileNotFoundError(
            f"no llama.cpp converter: pass one (convert_hf_to_gguf.py, its folder, or the llama-cpp-python sdist "
            f"from `pip download llama-cpp-python --no-binary :all: --no-deps`) or set {CONVERTER_ENV}")
    p = Path(converter).expanduser()
    if p.is_dir():
        p = p / "convert_hf_to_gguf.py"
    if p.name.endswith((".tar.gz", ".tgz")):
        out = cache / p.name.split(".tar")[0].split(".tgz")[0]
        script = out / "convert_hf_to_gguf.py"
        if not script.exists():
            with tarfile.open(p) as tar:
                members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and (
                    m.name.endswith("/convert_hf_to_gguf.py") and m.name.count("/") == 3
                    or "/vendor/llama.cpp/conversion/" in m.name or "/vendor/llama.cpp/gguf-py/" in m.name)]
                if not members:
                    raise FileNotFoundError(f"{p}: no vendor/llama.cpp/convert_hf_to_gguf.py inside")
                tmp = out.with_name(out.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                for m in members:
                    m.name = m.name.split("/vendor/llama.cpp/", 1)[1]
                    tar.extract(m, tmp, filter="data")
                shutil.rmtree(out, ignore_errors=True)
                tmp.rename(out)
        p = script
    if not p.is_file():
        raise FileNotFoundError(f"{p}: not llama.cpp's convert_hf_to_gguf.py")
    return p


def standin_tokenizer(folder: Path, vocab_size: int) -> None:
    """Write a byte-fallback BPE tokenizer of exactly ``vocab_size`` tokens into ``folder``."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 3 + 256:
        raise ValueError(f"a stand-in tokenizer needs a vocabulary of at least 259 tokens, got {vocab_size}")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    vocab.update({f"t{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


def make_gguf(hf_dir: str | Path, out_path: str | Path, outtype: str = "bf16",
              converter: Optional[str | Path] = None, timeout: float = 3600) -> Path:
    """Write ``hf_dir`` as a GGUF file ``out_path`` (``outtype``: f32, f16, bf16, q8_0, ...) with llama.cpp's
    converter; reuses an existing ``out_path``. Returns ``out_path``."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if out_path.exists():
        return out_path
    out_path.parent.mkdir(parents=True, exist_ok=True)
    script = find_converter(converter, out_path.parent / ".llama-converter")
    stage = out_path.with_name(out_path.name + ".stage")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        for f in hf_dir.iterdir():
            if f.is_file():
                (stage / f.name).symlink_to(f.resolve())
        if not any((hf_dir / n).exists() for n in ("tokenizer.json", "tokenizer.model")):
            cfg = json.loads((hf_dir / "config.json").read_text())
            standin_tokenizer(stage, int(cfg["vocab_size"]))
        tmp = out_path.with_name(out_path.name + ".tmp")
        p = subprocess.run([sys.executable, str(script), str(stage), "--outfile", str(tmp), "--outtype", outtype],
                           capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0 or not tmp.exists():
            raise RuntimeError(f"convert_hf_to_gguf.py failed (exit {p.returncode}): {p.stderr[-3000:]}")
        tmp.rename(out_path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_path


def decode_latency(gguf: str | Path, prompt: list[int], new_tokens: int, threads: int = 1,
                   warmup: Optional[list[list[int]]] = None, warmup_tokens: int = 4, n_ctx: int = 512) -> dict:
    """Greedy batch-1 requests through llama-cpp-python (mmap, no mlock): the warm-up prompts, then
    ``prompt``; returns the timed request's decode step times (s), prefill time, tokens and load time."""
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=64,
                use_mmap=True, use_mlock=False, verbose=False)
    load_s = time.perf_counter() - t0

    def request(ids: list[int], n: int) -> tuple[list[float], list[int]]:
        llm.reset()
        times, tokens = [], []
        t = time.perf_counter()
        for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            now = time.perf_counter()
            times.append(now - t)
            tokens.append(int(tok))
            t = now
            if len(tokens) >= n:
                break
        return times, tokens

    for ids in warmup or []:
        request(ids, warmup_tokens)
    times, tokens = request(prompt, new_tokens)
    return {"load_s": round(load_s, 2), "prefill_s": times[0], "decode_s": times[1:], "tokens": tokens}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--outtype", default="bf16")
    ap.add_argument("--converter", default=None, help=f"convert_hf_to_gguf.py, its folder or the sdist (${CONVERTER_ENV})")
    a = ap.parse_args()
    t0 = time.perf_counter()
    out = make_gguf(a.hf_dir, a.out, a.outtype, a.converter)
    print(json.dumps({"what": "gguf", "path": str(out), "gib": round(out.stat().st_size / 2**30, 3),
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
