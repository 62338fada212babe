"""Read Hugging Face safetensors checkpoints: one file or shards with an index.

Two ways to read a tensor: :meth:`SafetensorsReader.get` through the library's memory map (the
loader), and :meth:`SafetensorsReader.read` by ``pread`` into memory of its own, after which the
range's pages are dropped from the page cache (conversion: a checkpoint many times the RAM
streams through without filling the page cache, which a memory cgroup counts against the
process)."""

from __future__ import annotations

import json
import os
import struct
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from ..errors import CheckpointError

INDEX = "model.safetensors.index.json"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def shard_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files, from the index when there is one."""
    index = folder / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = sorted({folder / f for f in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weight files found")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: weight file listed in {INDEX} is missing")
        check_complete(f)
    return files


def _header(path: Path) -> tuple[dict, int]:
    """The file's JSON header and the byte offset its data section starts at."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as fh:
            (hlen,) = struct.unpack("<Q", fh.read(8))
            if hlen > size - 8:
                raise CheckpointError(f"{path}: truncated or not a safetensors file (header says {hlen} bytes)")
            header = json.loads(fh.read(hlen))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e
    return header, 8 + hlen


def check_complete(path: Path) -> None:
    """Fail with the file and tensor named if the file is shorter than its header says."""
    size = os.path.getsize(path)
    header, start = _header(path)
    data = size - start
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = info["data_offsets"][1]
        if end > data:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} of the data section "
                f"but the file holds only {data} bytes"
            )


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _drop_cache(fd: int, offset: int, length: int) -> None:
    """Drop a range's clean pages from the page cache (``length`` 0: to the end of the file)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


class SafetensorsReader:
    """Open every shard once (memory-mapped) and fetch tensors by name."""

    def __init__(self, folder: Path):
        self.files = shard_files(folder)
        self._stack = ExitStack()
        self._handles = []
        self.where: dict[str, int] = {}  # tensor name -> index into self.files
        self._headers: list = [None] * len(self.files)  # (header, data start) per file, for read()
        self._fds: dict[int, int] = {}  # file index -> fd, for read()
        for i, f in enumerate(self.files):
            try:
                h = self._stack.enter_context(safe_open(str(f), framework="pt"))
            except Exception as e:  # safetensors raises its own error types
                self.close()
                raise CheckpointError(f"{f}: cannot open as safetensors ({e})") from e
            self._handles.append(h)
            for name in h.keys():
                self.where[name] = i

    def names(self) -> list[str]:
        return list(self.where)

    def file_of(self, name: str) -> Path:
        return self.files[self.where[name]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handles[self.where[name]].get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self.where[name]].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.file_of(name)}: cannot read tensor {name!r} ({e})") from e

    def get_slice(self, name: str, index: int) -> torch.Tensor:
        """``get(name)[index]`` without reading the rest (one expert of a fused 3D tensor)."""
        try:
            return self._handles[self.where[name]].get_slice(name)[index]
        except Exception as e:
            raise CheckpointError(f"{self.file_of(name)}: cannot read tensor {name!r}[{index}] ({e})") from e

    def read(self, name: str, index: Optional[int] = None) -> torch.Tensor:
        """``get(name)`` (or ``get_slice(name, index)``: one row of the first dimension) read by
        ``pread`` into a new tensor, the range then dropped from the page cache (see above)."""
        i = self.where[name]
        path = self.files[i]
        if self._headers[i] is None:
            self._headers[i] = _header(path)
        header, data_start = self._headers[i]
        info = header[name]
        dtype = _TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            return self.get(name) if index is None else self.get_slice(name, index)
        shape = list(info["shape"])
        begin, end = info["data_offsets"]
        if index is not None:
            row = (end - begin) // max(shape[0], 1)
            begin, end, shape = begin + index * row, begin + (index + 1) * row, shape[1:]
        out = torch.empty(end - begin, dtype=torch.uint8)
        fd = self._fds.get(i)
        if fd is None:
            fd = self._fds[i] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        view, got = memoryview(out.numpy()), 0
        try:
            while got < len(view):
                n = os.preadv(fd, [view[got:]], data_start + begin + got)
                if n == 0:
                    raise CheckpointError(f"{path}: truncated: tensor {name!r} ends past the end of the file")
                got += n
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from e
        _drop_cache(fd, data_start + begin, end - begin)
        return out.view(dtype).view(shape)

    def close(self) -> None:
        for fd in self._fds.values():
            _drop_cache(fd, 0, 0)
            os.close(fd)
        self._fds.clear()
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
