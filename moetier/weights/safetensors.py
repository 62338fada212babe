"""Read Hugging Face safetensors checkpoints: one file or shards with an index."""

from __future__ import annotations

import json
import os
import struct
from contextlib import ExitStack
from pathlib import Path

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


def check_complete(path: Path) -> None:
    """Fail with the file and tensor named if the file is shorter than its header says."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as fh:
            (hlen,) = struct.unpack("<Q", fh.read(8))
            if hlen > size - 8:
                raise CheckpointError(f"{path}: truncated or not a safetensors file (header says {hlen} bytes)")
            header = json.loads(fh.read(hlen))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e
    data = size - 8 - hlen
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = info["data_offsets"][1]
        if end > data:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} of the data section "
                f"but the file holds only {data} bytes"
            )


class SafetensorsReader:
    """Open every shard once (memory-mapped) and fetch tensors by name."""

    def __init__(self, folder: Path):
        self.files = shard_files(folder)
        self._stack = ExitStack()
        self._handles = []
        self.where: dict[str, int] = {}  # tensor name -> index into self.files
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

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
