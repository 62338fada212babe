"""Server metrics in the Prometheus text format (version 0.0.4), without a client library."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

# seconds; TTFT spans a queue wait and a prefill, TPOT one decode step
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    """Cumulative-bucket histogram of one labelled series."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v

    def lines(self, name: str, labels: str) -> list[str]:
        out, total = [], 0
        for le, n in zip((*map(repr, self.buckets), "+Inf"), self.counts):
            total += n
            out.append(f'{name}_bucket{{{labels}{"," if labels else ""}le="{le}"}} {total}')
        out.append(f"{name}_sum{{{labels}}} {self.sum}")
        out.append(f"{name}_count{{{labels}}} {total}")
        return out


class Metrics:
    """Counters and histograms the handlers update; ``render`` adds the live gauges."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (model, status code) -> count
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.generation_tokens: dict[str, int] = defaultdict(int)
        self.ttft: dict[str, Histogram] = {}
        self.tpot: dict[str, Histogram] = {}

    def request_done(self, model: str, status: int) -> None:
        with self._lock:
            self.requests[(model, str(status))] += 1

    def tokens(self, model: str, prompt: int, generated: int, ttft_s: float | None, tpot_s: float | None) -> None:
        with self._lock:
            self.prompt_tokens[model] += prompt
            self.generation_tokens[model] += generated
            if ttft_s is not None:
                self.ttft.setdefault(model, Histogram(TTFT_BUCKETS)).observe(ttft_s)
            if tpot_s is not None:
                self.tpot.setdefault(model, Histogram(TPOT_BUCKETS)).observe(tpot_s)

    def render(self, pool, inflight: int) -> str:
        """The exposition text: these counters plus, per loaded model, live requests and expert-cache stats."""
        lines: list[str] = []

        def family(name: str, kind: str, doc: str) -> None:
            lines.extend((f"# HELP {name} {doc}", f"# TYPE {name} {kind}"))

        with self._lock:
            family("moetier_requests_total", "counter", "HTTP requests to the completion endpoints, by status code")
            for (model, code), n in sorted(self.requests.items()):
                lines.append(f'moetier_requests_total{{model="{_esc(model)}",code="{code}"}} {n}')
            for name, series, doc in (("moetier_prompt_tokens_total", self.prompt_tokens, "prompt tokens processed"),
                                      ("moetier_generation_tokens_total", self.generation_tokens,
                                       "tokens generated")):
                family(name, "counter", doc)
                lines.extend(f'{name}{{model="{_esc(m)}"}} {n}' for m, n in sorted(series.items()))
            for name, hists, doc in (("moetier_time_to_first_token_seconds", self.ttft,
                                      "time from request to first generated token"),
                                     ("moetier_time_per_output_token_seconds", self.tpot,
                                      "mean time between generated tokens after the first, per request")):
                family(name, "histogram", doc)
                for m, h in sorted(hists.items()):
                    lines.extend(h.lines(name, f'model="{_esc(m)}"'))
        family("moetier_requests_inflight", "gauge", "requests being served now, all models")
        lines.append(f"moetier_requests_inflight {inflight}")
        family("moetier_model_loaded", "gauge", "1 for a loaded model, 0 for a registered one not loaded")
        lines.extend(f'moetier_model_loaded{{model="{_esc(e.name)}"}} {int(e.loaded)}' for e in pool.entries.values())
        loaded = pool.loaded()
        family("moetier_model_device_bytes", "gauge", "bytes a loaded model holds on its device")
        lines.extend(f'moetier_model_device_bytes{{model="{_esc(m.name)}"}} {m.footprint}' for m in loaded)
        stats = [(m.name, m.llm.stats()) for m in loaded]
        stats = [(m, s) for m, s in stats if s]
        family("moetier_expert_cache_hit_rate", "gauge", "expert-cache hits / lookups of an offloaded model")
        lines.extend(f'moetier_expert_cache_hit_rate{{model="{_esc(m)}"}} {s["hit_rate"] or 0.0}' for m, s in stats)
        for key, doc in (("hits", "expert lookups found resident"), ("misses", "expert lookups that had to load"),
                         ("prefetch_hits", "expert lookups served by a prefetch")):
            family(f"moetier_expert_{key}_total", "counter", doc)
            lines.extend(f'moetier_expert_{key}_total{{model="{_esc(m)}"}} {s[key]}' for m, s in stats)
        family("moetier_expert_bytes_moved_total", "counter", "expert bytes moved between tiers")
        for m, s in stats:
            lines.append(f'moetier_expert_bytes_moved_total{{model="{_esc(m)}",tier="disk_to_host"}} '
                         f'{s["bytes_disk_to_host"]}')
            lines.append(f'moetier_expert_bytes_moved_total{{model="{_esc(m)}",tier="host_to_device"}} '
                         f'{s["bytes_host_to_device"]}')
        family("moetier_expert_stall_seconds_total", "counter", "time the forward pass waited for experts")
        lines.extend(f'moetier_expert_stall_seconds_total{{model="{_esc(m)}"}} {s["stall_s"]}' for m, s in stats)
        return "\n".join(lines) + "\n"


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
