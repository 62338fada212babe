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


E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
P = "moetier:"  # vLLM's metric names under moetier's prefix, labelled by model_name


class Metrics:
    """Counters and histograms the handlers update; ``render`` adds the live gauges.

    The request metrics carry vLLM's names (``vllm:num_requests_running`` is
    ``moetier:num_requests_running`` here), so vLLM's dashboards read them with the prefix changed.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.http: dict[tuple[str, str], int] = defaultdict(int)  # (model, status code) -> count
        self.success: dict[tuple[str, str], int] = defaultdict(int)  # (model, finished_reason) -> count
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.generation_tokens: dict[str, int] = defaultdict(int)
        self.ttft: dict[str, Histogram] = {}
        self.itl: dict[str, Histogram] = {}
        self.e2e: dict[str, Histogram] = {}

    def request_done(self, model: str, status: int) -> None:
        with self._lock:
            self.http[(model, str(status))] += 1

    def token_gap(self, model: str, seconds: float) -> None:
        """One inter-token latency (between two streamed deltas of a request)."""
        with self._lock:
            self.itl.setdefault(model, Histogram(TPOT_BUCKETS)).observe(seconds)

    def finished(self, model: str, prompt: int, generated: int, ttft_s: float | None, e2e_s: float,
                 reasons: list[str]) -> None:
        with self._lock:
            self.prompt_tokens[model] += prompt
            self.generation_tokens[model] += generated
            if ttft_s is not None:
                self.ttft.setdefault(model, Histogram(TTFT_BUCKETS)).observe(ttft_s)
            self.e2e.setdefault(model, Histogram(E2E_BUCKETS)).observe(e2e_s)
            for r in reasons:
                self.success[(model, r or "abort")] += 1

    def render(self, pool, inflight: int) -> str:
        """The exposition text: these counters plus, per loaded model, live requests and expert-cache stats."""
        lines: list[str] = []

        def family(name: str, kind: str, doc: str) -> None:
            lines.extend((f"# HELP {P}{name} {doc}", f"# TYPE {P}{name} {kind}"))

        loaded = pool.loaded()
        family("num_requests_running", "gauge", "sequences in the engine's running batch")
        lines.extend(f'{P}num_requests_running{{model_name="{_esc(m.name)}"}} {m.worker.running()}' for m in loaded)
        family("num_requests_waiting", "gauge", "sequences queued in the engine, waiting to run")
        lines.extend(f'{P}num_requests_waiting{{model_name="{_esc(m.name)}"}} {m.worker.waiting()}' for m in loaded)
        with self._lock:
            family("http_requests_total", "counter", "HTTP requests to the generation endpoints, by status code")
            for (model, code), n in sorted(self.http.items()):
                lines.append(f'{P}http_requests_total{{model_name="{_esc(model)}",code="{code}"}} {n}')
            family("request_success_total", "counter", "requests that finished, by finish reason")
            for (model, reason), n in sorted(self.success.items()):
                lines.append(f'{P}request_success_total{{model_name="{_esc(model)}",finished_reason="{reason}"}} {n}')
            for name, series, doc in (("prompt_tokens_total", self.prompt_tokens, "prompt tokens processed"),
                                      ("generation_tokens_total", self.generation_tokens, "tokens generated")):
                family(name, "counter", doc)
                lines.extend(f'{P}{name}{{model_name="{_esc(m)}"}} {n}' for m, n in sorted(series.items()))
            for name, hists, doc in (("time_to_first_token_seconds", self.ttft,
                                      "time from request to first generated token"),
                                     ("inter_token_latency_seconds", self.itl, "time between streamed tokens"),
                                     ("e2e_request_latency_seconds", self.e2e, "time from request to its last token")):
                family(name, "histogram", doc)
                for m, h in sorted(hists.items()):
                    lines.extend(h.lines(P + name, f'model_name="{_esc(m)}"'))
        family("requests_inflight", "gauge", "HTTP requests being served now, all models")
        lines.append(f"{P}requests_inflight {inflight}")
        family("model_loaded", "gauge", "1 for a loaded model, 0 for a registered one not loaded")
        lines.extend(f'{P}model_loaded{{model_name="{_esc(e.name)}"}} {int(e.loaded)}' for e in pool.entries.values())
        family("model_device_bytes", "gauge", "bytes a loaded model holds on its device")
        lines.extend(f'{P}model_device_bytes{{model_name="{_esc(m.name)}"}} {m.footprint}' for m in loaded)
        stats = [(m.name, m.llm.stats()) for m in loaded]
        stats = [(m, s) for m, s in stats if s]
        family("expert_cache_hit_rate", "gauge", "expert-cache hits / lookups of an offloaded model")
        lines.extend(f'{P}expert_cache_hit_rate{{model_name="{_esc(m)}"}} {s["hit_rate"] or 0.0}' for m, s in stats)
        for key, doc in (("hits", "expert lookups found resident"), ("misses", "expert lookups that had to load"),
                         ("prefetch_hits", "expert lookups served by a prefetch")):
            family(f"expert_{key}_total", "counter", doc)
            lines.extend(f'{P}expert_{key}_total{{model_name="{_esc(m)}"}} {s[key]}' for m, s in stats)
        family("expert_bytes_moved_total", "counter", "expert bytes moved between tiers")
        for m, s in stats:
            lines.append(f'{P}expert_bytes_moved_total{{model_name="{_esc(m)}",tier="disk_to_host"}} '
                         f'{s["bytes_disk_to_host"]}')
            lines.append(f'{P}expert_bytes_moved_total{{model_name="{_esc(m)}",tier="host_to_device"}} '
                         f'{s["bytes_host_to_device"]}')
        family("expert_stall_seconds_total", "counter", "time the forward pass waited for experts")
        lines.extend(f'{P}expert_stall_seconds_total{{model_name="{_esc(m)}"}} {s["stall_s"]}' for m, s in stats)
        return "\n".join(lines) + "\n"


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
