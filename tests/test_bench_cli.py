"""``moetier bench`` and ``moetier bench report`` on the demo model, as a user runs them."""

import json
import struct

import pytest

from moetier.cli import main as cli_main

SMALL = ["--model", "demo", "--batch", "2", "--input-len", "12", "--output-len", "6", "--task-limit", "8", "--quiet"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """One run per system: moetier against this machine's measured peaks, transformers against an H100's."""
    root = tmp_path_factory.mktemp("bench")
    assert cli_main(["bench", *SMALL, "--hardware", "local", "--out", str(root / "moetier")]) == 0
    assert cli_main(["bench", *SMALL, "--system", "transformers", "--hardware", "h100",
                     "--out", str(root / "transformers")]) == 0
    return root, {s: json.loads((root / s / "result.json").read_text()) for s in ("moetier", "transformers")}


PHASE_FIELDS = ("steps", "seconds", "tokens", "throughput_tok_s", "bytes_per_step", "flops_per_step", "s_mbu",
                "s_mfu", "activated_experts_per_step")
REQUIRED = {
    "prefill": PHASE_FIELDS + ("ttft_s",),
    "decode": PHASE_FIELDS + ("tpot_s",),
    "end_to_end": ("seconds", "output_tokens", "throughput_tok_s"),
    "cost": ("usd_per_1m_output_tokens", "kwh_per_1m_output_tokens", "usd_per_hour", "watts"),
    "hardware": ("bandwidth", "flops", "usd_per_hour", "watts"),
    "accuracy": ("items", "correct", "accuracy"),
}


@pytest.mark.parametrize("system", ["moetier", "transformers"])
def test_result_is_complete_and_positive(runs, system):
    r = runs[1][system]
    assert r["system"] == system and r["model_type"] == "mixtral"
    for section, fields in REQUIRED.items():
        for f in fields:
            value = r[section][f]
            if isinstance(value, dict):  # latency percentiles
                assert set(value) == {"mean", "p50", "p90", "p99"} and min(value.values()) > 0, (section, f)
            else:
                assert value > 0, (section, f, value)
    assert r["prefill"]["ttft_s"]["p50"] <= r["prefill"]["ttft_s"]["p99"]
    assert r["end_to_end"]["output_tokens"] == 2 * 6 and r["decode"]["steps"] == 5
    assert 0 < r["decode"]["s_mbu"] and 0 < r["decode"]["s_mfu"] < 1
    assert len(r["decode"]["activated_experts_per_layer"]) == r["model_shape"]["moe_layers"]
    assert r["quantization"] == "none" and r["dtype"] == "float32"  # the demo ships float32 weights


def test_quantization_is_recorded_and_labels_the_run(runs):
    from types import SimpleNamespace

    import torch

    from moetier.bench.report import label, radar_scores
    from moetier.bench.system_moetier import quantization_of

    plain = SimpleNamespace(model=torch.nn.Linear(2, 2))
    assert quantization_of(plain) == "none"
    scheme = {"name": "int4", "experts": {"kind": "int4", "group_size": 32}, "dense": None}
    assert quantization_of(SimpleNamespace(model=plain.model, quantization=scheme)) == scheme
    marked = SimpleNamespace(model=torch.nn.Sequential(torch.nn.Linear(2, 2)))
    marked.model[0].qweight = object()  # a quantized linear the LLM does not describe: not "none"
    assert quantization_of(marked) != "none"
    r = dict(runs[1]["moetier"], quantization=scheme)
    assert label(r) == "moetier · demo · int4" and label(runs[1]["moetier"]) == "moetier · demo"
    # the radar's accuracy axis is the task's exact-match accuracy, as recorded
    assert radar_scores([r])[0][0] == r["accuracy"]["accuracy"] > 0


def test_both_systems_see_the_same_routing(runs):
    """Same weights, same greedy tokens: the hooks count the same experts per layer in both systems."""
    m, hf = runs[1]["moetier"], runs[1]["transformers"]
    for ph in ("prefill", "decode"):
        assert m[ph]["activated_experts_per_layer"] == hf[ph]["activated_experts_per_layer"]
        assert m[ph]["bytes_per_step"] == hf[ph]["bytes_per_step"] and m[ph]["flops_per_step"] == hf[ph]["flops_per_step"]
    assert m["accuracy"]["accuracy"] == hf["accuracy"]["accuracy"]


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_draws_pngs_and_a_table(runs, tmp_path, capsys):
    image = pytest.importorskip("matplotlib.image")
    root, _ = runs
    out = tmp_path / "report"
    assert cli_main(["bench", "report", str(root / "moetier"), str(root / "transformers"), "--out", str(out)]) == 0
    for name in ("radar.png", "utilization.png"):
        w, h = _png_size(out / name)
        assert w > 200 and h > 200 and (out / name).stat().st_size < 200_000
        assert image.imread(out / name).shape[:2] == (h, w)
    table = capsys.readouterr().out
    assert "| moetier · demo |" in table and "| transformers · demo |" in table
    assert table in (out / "report.md").read_text()


def test_concurrency_with_a_workload_file(tmp_path):
    work = tmp_path / "work.jsonl"
    work.write_text('{"prompt": "12+34="}\n\n{"prompt": "5+6=", "max_tokens": 3}\n{"prompt": "7+8="}\n')
    out = tmp_path / "run"
    assert cli_main(["bench", "--model", "demo", "--workload", str(work), "--concurrency", "2", "--output-len", "4",
                     "--task-limit", "2", "--hardware", "a100", "--quiet", "--out", str(out)]) == 0
    r = json.loads((out / "result.json").read_text())
    assert r["workload"]["prompts"] == 3 and r["workload"]["concurrency"] == 2
    assert r["end_to_end"]["output_tokens"] == 4 + 3 + 4


@pytest.mark.parametrize("body, message", [
    ('{"prompt": "1+1="}\n{"prompt": "2+2=", "max_tokens": 0}\n', ":2: 'max_tokens' must be a positive integer"),
    ('{"prompt": "1+1="}\nnot json\n', ":2: not valid JSON"),
    ('{"text": "1+1="}\n', ":1: missing key 'prompt'"),
    ("\n", "the workload has no prompts"),
])
def test_bad_workload_file_is_a_clear_error(tmp_path, capsys, body, message):
    work = tmp_path / "work.jsonl"
    work.write_text(body)
    assert cli_main(["bench", "--model", "demo", "--workload", str(work), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"moetier: error: {work}" in err and message in err


@pytest.mark.parametrize("args, message", [
    (["--hardware", "tpu9"], "unknown hardware 'tpu9'; known: h100, h200, a100, a5000, rtx4090, local"),
    (["--workload", "/no/such/file.jsonl"], "/no/such/file.jsonl: workload file does not exist"),
    (["--system", "transformers", "--concurrency", "2"], "--concurrency needs --system moetier"),
])
def test_bad_options_are_clear_errors(capsys, args, message):
    assert cli_main(["bench", "--model", "demo", "--quiet", *args]) == 1
    assert message in capsys.readouterr().err


def test_report_of_a_folder_without_a_result(tmp_path, capsys):
    assert cli_main(["bench", "report", str(tmp_path), "--out", str(tmp_path / "r")]) == 1
    assert f"{tmp_path / 'result.json'}: no such file" in capsys.readouterr().err
