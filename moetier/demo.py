"""The small trained MoE and the evaluation tasks that ship inside the package.

``LLM("demo")`` and ``--model demo`` resolve to :func:`demo_path`. The model is made
by ``scripts/train_demo.py``: an 8-expert, top-2 Mixtral trained on additions and
template sentences, so that its routing is skewed the way real MoE routing is.
``"demo-small"`` (``demo_path("demo-small")``) is a much smaller model with the same
tokenizer and training mix (``train_demo.py --size small``) that gets only part of the
addition task right: the small end of a confidence cascade (:mod:`moetier.cascade`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import MoetierError

_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def _package_dir(name: str) -> Path:
    # moetier is installed as plain files (no zip import), so the resource is a real folder
    return Path(str(resources.files("moetier") / name))


DEMO_MODELS = {"demo": ("demo_model", ""), "demo-small": ("demo_small_model", " --size small")}


def demo_path(name: str = "demo") -> Path:
    """The packaged demo checkpoint folder (``"demo"`` or ``"demo-small"``); a MoetierError if this
    install lacks it."""
    folder_name, size = DEMO_MODELS[name]
    folder = _package_dir(folder_name)
    missing = [f for f in _REQUIRED if not (folder / f).is_file()]
    if missing:
        raise MoetierError(
            f"the {name} model is missing from this moetier install ({folder} lacks {', '.join(missing)}); "
            f"reinstall moetier, or rebuild it with: python scripts/train_demo.py{size}"
        )
    return folder


def task_path(name: str = "addition") -> Path:
    """A packaged task file (``moetier/tasks/<name>.jsonl``)."""
    path = _package_dir("tasks") / f"{name}.jsonl"
    if not path.is_file():
        raise MoetierError(f"no packaged task {name!r} ({path} does not exist)")
    return path
