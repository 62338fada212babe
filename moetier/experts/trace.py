"""Expert activation traces: which experts each request used, per MoE layer.

A request's trace is a matrix ``[moe_layers, experts]`` of routed token counts.
Finished requests feed a bounded :class:`TraceLibrary`; during decode, the
running request's partial trace is matched against it to predict the experts
of the layers still to come.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)


def normalize(counts: np.ndarray) -> np.ndarray:
    """Each layer's row as a distribution over experts (rows with no tokens stay zero)."""
    counts = np.asarray(counts, dtype=np.float32)
    sums = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, sums, out=np.zeros_like(counts), where=sums > 0)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of ``a`` ``[n]`` against each row of ``b`` ``[m, n]``."""
    na = np.linalg.norm(a)
    nb = np.linalg.norm(b, axis=-1)
    return (b @ a) / np.maximum(na * nb, 1e-12)


class TraceLibrary:
    """A bounded set of representative traces.

    A new trace close to a stored one (cosine >= ``merge_threshold``) is averaged
    into it, weighted by how many traces each stands for; otherwise it is
    stored. Past ``capacity`` the two most similar stored traces are merged, so
    the library keeps its spread rather than its most recent entries.
    """

    def __init__(self, num_layers: int, num_experts: int, capacity: int = 128, merge_threshold: float = 0.97):
        self.shape = (num_layers, num_experts)
        self.capacity = capacity
        self.merge_threshold = merge_threshold
        self.traces = np.zeros((0, num_layers, num_experts), dtype=np.float32)  # each row-normalized
        self.weights = np.zeros((0,), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.traces)

    def add(self, counts: np.ndarray) -> None:
        """Add one finished request's counts ``[layers, experts]``."""
        t = normalize(counts)
        if t.shape != self.shape:
            raise ValueError(f"trace shape {t.shape} does not match the library's {self.shape}")
        if not t.any():
            return
        if len(self):
            sims = _cosine(t.ravel(), self.traces.reshape(len(self), -1))
            best = int(np.argmax(sims))
            if sims[best] >= self.merge_threshold:
                self._merge_into(best, t, 1.0)
                return
        self.traces = np.concatenate([self.traces, t[None]])
        self.weights = np.append(self.weights, np.float32(1.0))
        if len(self) > self.capacity:
            self._merge_closest_pair()

    def _merge_into(self, i: int, t: np.ndarray, w: float) -> None:
        total = self.weights[i] + w
        self.traces[i] = (self.traces[i] * self.weights[i] + t * w) / total
        self.weights[i] = total

    def _merge_closest_pair(self) -> None:
        flat = self.traces.reshape(len(self), -1)
        unit = flat / np.maximum(np.linalg.norm(flat, axis=-1, keepdims=True), 1e-12)
        sims = unit @ unit.T
        np.fill_diagonal(sims, -np.inf)
        i, j = np.unravel_index(int(np.argmax(sims)), sims.shape)
        self._merge_into(int(i), self.traces[j], float(self.weights[j]))
        self.traces = np.delete(self.traces, j, axis=0)
        self.weights = np.delete(self.weights, j)

    def predict(self, partial: np.ndarray, layers_seen: np.ndarray, top: int = 3) -> Optional[np.ndarray]:
        """Predicted expert distribution ``[layers, experts]`` for a request.

        ``partial`` holds the request's counts so far and ``layers_seen`` (bool
        ``[layers]``) marks the rows that mean something. The ``top`` most similar
        traces on those rows are averaged, weighted by similarity.
        """
        if not len(self) or not layers_seen.any():
            return None
        q = normalize(partial)[layers_seen].ravel()
        sims = _cosine(q, self.traces[:, layers_seen].reshape(len(self), -1))
        idx = np.argsort(-sims)[:top]
        w = np.clip(sims[idx], 0, None) * self.weights[idx]
        if w.sum() <= 0:
            return None
        return np.tensordot(w / w.sum(), self.traces[idx], axes=1)

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file, fsync, rename) so a kill never leaves half a library."""
        from ..weights.atomic import write_file

        write_file(path, lambda fh: np.savez(fh, traces=self.traces, weights=self.weights))

    @classmethod
    def load(cls, path: str | Path, num_layers: int, num_experts: int, **kw) -> "TraceLibrary":
        """Load a saved library; a missing or mismatched file gives an empty one, and so does an
        unreadable or corrupt one (with a warning): the library only guides prefetching."""
        lib = cls(num_layers, num_experts, **kw)
        try:
            with np.load(path) as data:
                traces, weights = data["traces"], data["weights"]
        except FileNotFoundError:
            return lib
        except Exception as e:  # a damaged zip raises BadZipFile, EOFError, zlib.error, ValueError, ...
            log.warning("ignoring the trace library %s: unreadable (%s: %s); starting an empty one",
                        path, type(e).__name__, e)
            return lib
        if traces.ndim == 3 and weights.ndim == 1 and traces.shape[1:] == lib.shape and len(traces) == len(weights):
            lib.traces = traces.astype(np.float32)[-lib.capacity :]
            lib.weights = weights.astype(np.float32)[-lib.capacity :]
        return lib
