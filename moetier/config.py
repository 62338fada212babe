"""Engine configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class EngineConfig:
    """How the engine runs a model.

    Attributes:
        model: a checkpoint folder (config.json + safetensors), or ``"demo"``.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dtype: ``"bfloat16"``, ``"float16"``, ``"float32"``, or ``None``/``"auto"`` for the checkpoint's own.
        max_model_len: longest prompt + output in tokens; default: the model's ``max_position_embeddings``.
        max_num_seqs: most sequences decoded together in one step.
        max_batch_tokens: most prompt tokens prefilled in one step (long prompts still run whole).
        seed: seed for requests that give none.
    """

    model: str
    device: str = "cpu"
    dtype: Optional[str] = None
    max_model_len: Optional[int] = None
    max_num_seqs: int = 64
    max_batch_tokens: int = 8192
    seed: Optional[int] = None

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be at least 1, got {self.max_batch_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
