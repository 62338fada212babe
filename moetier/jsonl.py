"""Prompt files in JSONL (evaluation tasks, benchmark workloads), with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator


def read_prompt_lines(path: str | Path, error: type[Exception], keys: tuple[str, ...] = ("prompt",),
                      what: str = "task") -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for each non-blank line of ``path``.

    Each line must be a JSON object holding every key in ``keys``, with ``"prompt"`` a
    non-empty string; otherwise ``error`` is raised, its message starting ``FILE:LINE:``.
    A missing or non-UTF-8 file is ``error`` too. Checking that the file had any line
    at all is the caller's (it may stop early).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} file does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e})") from e
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{n}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise error(f"{path}:{n}: expected an object with {' and '.join(repr(k) for k in keys)}, "
                        f"got {type(obj).__name__}")
        missing = [k for k in keys if k not in obj]
        if missing:
            raise error(f"{path}:{n}: missing key {' and '.join(repr(k) for k in missing)}")
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise error(f"{path}:{n}: 'prompt' must be a non-empty string")
        yield n, obj
