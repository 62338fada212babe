"""``moetier bench report``: several result.json files as a radar, a utilization chart and a table.

The radar has one chart per model and workload, so that only runs of the same work are
scaled against each other. Its axes are scaled so that better is outward: accuracy as
is (0..1); cost, TTFT and TPOT as the best run's value over this run's (1 = the best);
throughput as this run's over the best's. Drawing needs matplotlib (the ``report``
extra), imported only here and used through its object API (no pyplot state).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from ..errors import BenchError

AXES = ("accuracy", "cost", "throughput", "TTFT", "TPOT")
AXIS_LABELS = ("accuracy", "cost\n$ / 1M tokens", "throughput\ntokens/s", "TTFT p50", "TPOT p50")
PNG_DPI = 100


def load_results(dirs: list[Path]) -> list[dict]:
    """The result.json of each folder; a missing or unreadable one is a BenchError naming it."""
    results = []
    for d in dirs:
        path = d / "result.json"
        try:
            results.append(json.loads(path.read_text()))
        except FileNotFoundError:
            raise BenchError(f"{path}: no such file (write it with moetier bench --out {d})") from None
        except (OSError, ValueError) as e:
            raise BenchError(f"{path}: not a readable result ({e})") from e
    return results


def quant_label(r: dict) -> str:
    """The run's quantization in a few characters ("" for none, and for results written before it was recorded)."""
    q = r.get("quantization", "none")
    if isinstance(q, dict):
        q = q.get("name") or ", ".join(f"{k} {v}" for k, v in q.items())
    return "" if q in (None, "none") else str(q)


def label(r: dict) -> str:
    q = quant_label(r)
    return f"{r['system']} · {Path(r['model']).name}" + (f" · {q}" if q else "")


def _work(r: dict) -> str:
    """The workload of a run: prompts × input → output tokens, and the batching."""
    w = r["workload"]
    slots = f"concurrency {w['concurrency']}" if "concurrency" in w else f"batch {w['batch']}"
    return f"{w['prompts']} × {w['mean_input_tokens']:g} → {w['mean_output_tokens']:g} tokens, {slots}"


def _group(r: dict, cascades: Optional[dict] = None) -> str:
    """Runs with the same group did the same work: same model and workload. A single model that is
    part of a cascade among the results (``cascades``, see ``cascade_run.cascade_group``) joins the
    cascade's group, so that the cascade and its models alone share a chart."""
    name = Path(r["model"]).name
    if cascades and not r.get("cascade") and name in cascades:
        name = cascades[name]
    return f"{name}: {_work(r)}"


def _get(r: dict, *keys) -> Optional[float]:
    for k in keys:
        r = r.get(k) if isinstance(r, dict) else None
    return r


def _fmt(value: Optional[float], scale: float = 1.0) -> str:
    """Three significant digits, or whole numbers with thousands separators from 1000 up; "–" for none."""
    if value is None:
        return "–"
    v = value * scale
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def markdown_table(results: list[dict]) -> str:
    """One row per run: latency, throughput, utilization, activated experts, cost, accuracy."""
    head = ("| run | hardware | workload | TTFT p50 (ms) | TPOT p50 / p90 / p99 (ms) | prefill tok/s | decode tok/s "
            "| prefill S-MBU / S-MFU | decode S-MBU / S-MFU | experts/layer/step (decode) | $ / 1M out tok "
            "| kWh / 1M out tok | accuracy |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        tpot = " / ".join(_fmt(_get(r, "decode", "tpot_s", p), 1e3) for p in ("p50", "p90", "p99"))
        util = {ph: f"{_fmt(_get(r, ph, 's_mbu'), 100)} % / {_fmt(_get(r, ph, 's_mfu'), 100)} %"
                for ph in ("prefill", "decode")}
        rows.append(
            f"| {label(r)} | {r['hardware']['name']} | {_work(r)} "
            f"| {_fmt(_get(r, 'prefill', 'ttft_s', 'p50'), 1e3)} | {tpot} "
            f"| {_fmt(_get(r, 'prefill', 'throughput_tok_s'))} | {_fmt(_get(r, 'decode', 'throughput_tok_s'))} "
            f"| {util['prefill']} | {util['decode']} | {_fmt(_get(r, 'decode', 'activated_experts_per_step'))} "
            f"| {_fmt(_get(r, 'cost', 'usd_per_1m_output_tokens'))} | {_fmt(_get(r, 'cost', 'kwh_per_1m_output_tokens'))} "
            f"| {_fmt(_get(r, 'accuracy', 'accuracy'))} |")
    return "\n".join(rows)


def radar_scores(runs: list[dict]) -> list[list[float]]:
    """Each run's value on each of :data:`AXES`, 0..1, better outward, scaled within ``runs``."""
    raw = {
        "accuracy": [_get(r, "accuracy", "accuracy") for r in runs],
        "cost": [_get(r, "cost", "usd_per_1m_output_tokens") for r in runs],
        "throughput": [_get(r, "end_to_end", "throughput_tok_s") for r in runs],
        "TTFT": [_get(r, "prefill", "ttft_s", "p50") for r in runs],
        "TPOT": [_get(r, "decode", "tpot_s", "p50") for r in runs],
    }
    lower_is_better = {"cost", "TTFT", "TPOT"}
    present = {axis: [v for v in vals if v] for axis, vals in raw.items()}  # a missing value scores 0
    scores = []
    for i in range(len(runs)):
        row = []
        for axis in AXES:
            v = raw[axis][i]
            if not v:
                row.append(0.0)
            elif axis == "accuracy":
                row.append(v)
            else:
                row.append(min(present[axis]) / v if axis in lower_is_better else v / max(present[axis]))
        scores.append(row)
    return scores


def _figure(**kw):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise BenchError("moetier bench report draws with matplotlib: pip install 'moetier[report]'") from None
    return Figure(**kw)


def draw_radar(results: list[dict], path: Path) -> None:
    """One polar chart per model and workload, a polygon per run."""
    from .cascade_run import cascade_group

    cascades = cascade_group(results)
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(_group(r, cascades), []).append(r)
    fig = _figure(figsize=(4.8 * len(groups), 5.8), layout="constrained")
    angles = [2 * math.pi * i / len(AXES) for i in range(len(AXES))]
    for n, (title, runs) in enumerate(groups.items()):
        ax = fig.add_subplot(1, len(groups), n + 1, projection="polar")
        several_hw = len({r["hardware"]["name"] for r in runs}) > 1
        for r, row in zip(runs, radar_scores(runs)):
            name = f"{r['system']} ({r['hardware']['name']})" if several_hw else r["system"]
            if quant_label(r):  # runs of one model at several quantizations share a chart
                name += f" · {quant_label(r)}"
            if len({x["model"] for x in runs}) > 1:  # a cascade and its models share a chart
                name += f" · {Path(r['model']).name}"
            ax.plot(angles + angles[:1], row + row[:1], linewidth=2, label=name)
            ax.fill(angles + angles[:1], row + row[:1], alpha=0.15)
        scored = any(_get(r, "accuracy", "accuracy") is not None for r in runs)
        ax.set_xticks(angles, AXIS_LABELS if scored else ("accuracy\nn/a", *AXIS_LABELS[1:]))
        ax.tick_params(axis="x", pad=14, labelsize=9)
        ax.set_ylim(0, 1)
        ax.set_yticks([0.25, 0.5, 0.75, 1.0], ["", "", "", ""])
        ax.set_title(title, fontsize=9, pad=24)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=9, frameon=False)
    fig.suptitle("Cost, accuracy, performance (better is outward)", fontsize=11)
    fig.savefig(path, dpi=PNG_DPI)


def draw_utilization(results: list[dict], path: Path) -> None:
    """S-MBU and S-MFU per phase, a group of bars per run (percent of the hardware's peak)."""
    bars = [("prefill", "s_mbu", "prefill S-MBU"), ("prefill", "s_mfu", "prefill S-MFU"),
            ("decode", "s_mbu", "decode S-MBU"), ("decode", "s_mfu", "decode S-MFU")]
    fig = _figure(figsize=(max(6.0, 1.9 * len(results) + 2), 4.2), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(bars)
    for j, (ph, key, name) in enumerate(bars):
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(results))]
        vals = [100 * (_get(r, ph, key) or 0.0) for r in results]
        rects = ax.bar(xs, vals, width, label=name)
        ax.bar_label(rects, [f"{v:.2g}" for v in vals], fontsize=7, padding=1)
    ax.set_xticks(range(len(results)), [f"{label(r)}\n{r['hardware']['name']}" for r in results], fontsize=8)
    ax.set_ylabel("% of peak")
    ax.set_title("Sparsity-aware utilization: S-MBU (bandwidth), S-MFU (compute)", fontsize=10)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    fig.savefig(path, dpi=PNG_DPI)


def write_report(dirs: list[Path], out: Path) -> str:
    """Write radar.png, utilization.png and report.md into ``out``; return the markdown table."""
    results = load_results(dirs)
    out.mkdir(parents=True, exist_ok=True)
    draw_radar(results, out / "radar.png")
    draw_utilization(results, out / "utilization.png")
    table = markdown_table(results)
    for r in results:  # who answered a cascade's requests
        if r.get("cascade"):
            shares = ", ".join(f"{m} {100 * v:.0f} %" for m, v in r["cascade"]["answered_share"].items())
            table += f"\n\ncascade {r['model']} ({r['cascade']['rule']}, thresholds {r['cascade']['thresholds']}): " \
                     f"answered {shares}; per request {_fmt(_get(r, 'cost', 'joules_per_request'))} J"
    (out / "report.md").write_text(
        "# moetier bench report\n\n![radar](radar.png)\n\n![utilization](utilization.png)\n\n" + table + "\n\n"
        "S-MBU / S-MFU: bytes / FLOPs a step needs given the experts it activated, over its time, over the "
        "hardware's peak (docs/metrics.md). TPOT: every gap between two tokens of a request.\n")
    return table
