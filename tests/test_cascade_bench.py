"""``moetier bench --cascade``: a cascade benchmarked like a model (who answered, cost per request)
and ``moetier bench report`` putting it on one radar with its models alone."""

import json

import pytest

from moetier.bench.report import _group, write_report
from moetier.bench.run import BenchConfig, run_bench
from moetier.cli import main
from moetier.errors import BenchError

pytestmark = pytest.mark.usefixtures("one_thread")

N = 24  # task items: the workload and the accuracy run


def _bench(tmp_path, name, **kw):
    cfg = BenchConfig(model=kw.pop("model", "demo"), out=tmp_path / name, workload="task", batch=8, task_limit=N,
                      hardware="a5000", progress=False, **kw)
    return run_bench(cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    return tmp, {"small": _bench(tmp, "small", model="demo-small"), "large": _bench(tmp, "large"),
                 "cascade": _bench(tmp, "cascade", cascade="demo-small,demo")}


def test_cascade_result(runs):
    _, r = runs
    c = r["cascade"]
    assert c["system"] == "moetier-cascade" and c["cascade"]["models"] == ["demo-small", "demo"]
    shares = c["cascade"]["answered_share"]
    assert sum(shares.values()) == pytest.approx(1.0) and 0 < shares["demo"] < 1
    per_model = c["cascade"]["per_model"]
    assert per_model["demo-small"]["requests"] == N  # every request reaches the first model
    assert per_model["demo"]["requests"] == round(shares["demo"] * N)  # the escalated ones reach the second
    # the run's time is the two models' runs; its requests' cost is that time at the hardware's price
    total = per_model["demo-small"]["end_to_end"]["seconds"] + per_model["demo"]["end_to_end"]["seconds"]
    assert c["end_to_end"]["seconds"] == pytest.approx(total)
    assert c["cost"]["usd_per_request"] == pytest.approx(c["hardware"]["usd_per_hour"] * total / 3600 / N)
    assert c["cost"]["joules_per_request"] == pytest.approx(c["hardware"]["watts"] * total / N)
    # accuracy: the cascade on the task, between the small model's and the large one's
    acc = {k: v["accuracy"]["accuracy"] for k, v in r.items()}
    assert acc["small"] < acc["cascade"] <= acc["large"]
    assert set(c["accuracy"]["answered_share"]) == {"demo-small", "demo"}
    for k in ("small", "large"):
        assert r[k]["cost"]["joules_per_request"] > 0 and "cascade" not in r[k]


def test_threshold_0_is_the_small_model(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"models": ["demo-small", "demo"], "rule": "min", "thresholds": [0.0]}))
    r = _bench(tmp_path, "zero", cascade=str(f))
    assert r["cascade"]["answered_share"] == {"demo-small": 1.0, "demo": 0.0}
    assert list(r["cascade"]["per_model"]) == ["demo-small"]  # the second model never ran


def test_report_puts_the_cascade_and_its_models_on_one_chart(runs, tmp_path):
    tmp, r = runs
    assert len({_group(x, {"demo-small": "demo-small,demo", "demo": "demo-small,demo"}) for x in r.values()}) == 1
    table = write_report([tmp / "small", tmp / "large", tmp / "cascade"], tmp_path / "report")
    assert "moetier-cascade · demo-small,demo" in table and "answered demo-small" in table
    assert (tmp_path / "report" / "radar.png").stat().st_size > 0


def test_bad_options(tmp_path, capsys):
    with pytest.raises(BenchError, match="--system moetier"):
        run_bench(BenchConfig(model="demo", out=tmp_path, workload="task", system="transformers"))
    assert main(["bench", "--cascade", "demo-small", "--out", str(tmp_path / "x"), "--quiet"]) == 1
    assert "two models or more" in capsys.readouterr().err
