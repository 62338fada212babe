"""moetier: run Mixture-of-Experts language models bigger than your accelerator's memory, fast."""

from .cascade import Cascade
from .config import EngineConfig
from .errors import CheckpointError, ConfigError, MoetierError, RequestError
from .llm import LLM
from .outputs import CompletionOutput, RequestOutput
from .runtime.sampling import SamplingParams

__all__ = [
    "LLM", "Cascade", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput",
    "MoetierError", "ConfigError", "CheckpointError", "RequestError",
]
__version__ = "0.1.0"
