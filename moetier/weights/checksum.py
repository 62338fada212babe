"""CRC-32 of weight bytes, and the ``verify`` modes that say when moetier checks them.

Every region of a packed folder carries the CRC-32 (zlib's polynomial) of its bytes. ``crc32``
computes it with ISA-L (the ``isal`` package: carry-less multiply, about 6x zlib's rate on one
core) where that is installed, else with ``zlib``; both give the same value and release the GIL
on large buffers, so reader threads check bytes while other threads read or compute.

``verify`` (``LLM(verify=...)``, ``--verify``) takes one of ``VERIFY_MODES``:

- ``"off"`` (or ``False``): no checksums, only sizes (a file cut short is still an error);
- ``"first-read"`` (the default, or ``None``): each region is checked the first time this process
  reads it from disk: dense tensors (and resident experts) while loading, offloaded experts on
  their first read into the host tier or a slot. A (layer, expert) once checked is not checked
  again when it is read anew after an eviction: the same open file gives the same bytes, every
  read is still checked for length, and in throughput mode every expert is read again on each
  pass, where a checksum per read would compete with the math for the cores;
- ``"full"`` (or ``True``): every region, offloaded experts included, is read and checked before
  the model is ready (as ``moetier convert --verify`` does), and every later expert read from disk
  is checked again.
"""

from __future__ import annotations

from typing import Optional, Union

try:
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # no wheel for this platform: the same checksum, slower
    from zlib import crc32 as _crc32

VERIFY_MODES = ("off", "first-read", "full")
DEFAULT_VERIFY = "first-read"


def crc32(data, value: int = 0) -> int:
    """CRC-32 of ``data`` (any buffer), continuing from ``value``; equals ``zlib.crc32``."""
    return _crc32(data, value)


def parse_verify(value: Union[str, bool, None]) -> str:
    """A ``verify`` option as one of ``VERIFY_MODES``: ``True`` is ``"full"``, ``False`` ``"off"``,
    ``None`` the default (``"first-read"``); anything else is a ValueError naming the choices."""
    if value is None:
        return DEFAULT_VERIFY
    if value is True or value is False:
        return "full" if value else "off"
    if isinstance(value, str) and value in VERIFY_MODES:
        return value
    raise ValueError(f"verify={value!r} is not one of {', '.join(VERIFY_MODES)} (or True / False)")


def checks_on_load(mode: Optional[str]) -> bool:
    """Whether a load that reads a region from disk checks its checksum in this mode."""
    return parse_verify(mode) != "off"


def mismatch(region, crc: int):
    """The CheckpointError for ``region`` (a packed Region: path, offset, nbytes, what, checksum)
    whose bytes hashed to ``crc``: it names the file, the tensor (for an expert, its layer and
    number) and the byte range."""
    from ..errors import CheckpointError

    return CheckpointError(
        f"{region.path}: checksum mismatch in {region.what} (bytes {region.offset}..{region.offset + region.nbytes}): "
        f"crc32 {crc:#010x}, the index records {region.checksum:#010x}; the file is corrupt, convert the model again"
    )
