"""A short single-process training run exports its metrics through the prometheus_client
endpoint; a real Prometheus scrapes it; every PromQL expression of the Grafana dashboard is
then run against that Prometheus. On this CPU machine the GPU panels must have no data
(nothing fabricated) and every other panel must have data."""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from ops.config import OpsConfigError
from ops.grafana import DASHBOARD_FILE
from ops.prometheus import ClientBackend
from ops.rapl import RaplReader
from ops.sinks import read_metrics
from tests.prometheus_server import PrometheusServer, free_port, prometheus_fixture  # noqa: F401
from trainer.config import load_config
from trainer.flops import flops_per_token
from trainer.loop import run

STEPS = 40


def nvml_present() -> bool:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.fixture(scope="module")
def scraped_run(
    prometheus: PrometheusServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("prom-run")
    port = free_port()
    name = f"prom-{uuid.uuid4().hex[:8]}"
    cfg = load_config(
        "infra/runs/tiny.yaml",
        [
            f"run.name={name}",
            f"run.output_dir={out}",
            "parallel.ep=1",
            f"train.steps={STEPS}",
            "ops.stdout=false",
            "ops.prometheus=client",
            f"ops.prometheus_port={port}",
            "ops.prometheus_linger_s=1.5",
            "ops.peak_tflops=1.0",
        ],
    )
    prometheus.set_targets([f"127.0.0.1:{port}"])
    t0 = time.time()
    run(cfg)
    t1 = time.time()
    return {
        "cfg": cfg,
        "name": name,
        "start": t0 - 1,
        "end": t1 + 1,
        "records": read_metrics(f"{out}/metrics.jsonl"),
    }


def _value(result: list[dict[str, Any]]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def test_scraped_values_equal_the_run(
    prometheus: PrometheusServer, scraped_run: dict[str, Any]
) -> None:
    run_sel = f'run="{scraped_run["name"]}"'
    at = scraped_run["end"]
    last = scraped_run["records"][-1]
    assert last["step"] == STEPS
    # *_over_time skips the stale markers written once the endpoint closed.
    tokens = _value(prometheus.query(f"max_over_time(moeyard_tokens_total{{{run_sel}}}[2m])", at))
    assert tokens == last["tokens"]
    steps = _value(prometheus.query(f"max_over_time(moeyard_steps_total{{{run_sel}}}[2m])", at))
    assert steps == STEPS
    flops = _value(
        prometheus.query(f"max_over_time(moeyard_model_flops_total{{{run_sel}}}[2m])", at)
    )
    fpt = flops_per_token(scraped_run["cfg"].model, scraped_run["cfg"].train.seq_len)
    assert flops == pytest.approx(last["tokens"] * fpt, rel=1e-12)
    loss = _value(prometheus.query(f"last_over_time(moeyard_loss{{{run_sel}}}[2m])", at))
    assert loss == pytest.approx(last["loss"], rel=1e-12)
    count = _value(
        prometheus.query(f"max_over_time(moeyard_step_seconds_count{{{run_sel}}}[2m])", at)
    )
    assert count == len(scraped_run["records"])
    mfu = _value(prometheus.query(f"last_over_time(moeyard_mfu{{{run_sel}}}[2m])", at))
    assert mfu == pytest.approx(last["mfu"], rel=1e-12)
    # The labels the dashboard filters on.
    series = prometheus.api("series", **{"match[]": f"moeyard_loss{{{run_sel}}}"})
    assert series and series[0]["node"] == socket.gethostname() and series[0]["rank"] == "0"


HARDWARE = re.compile(r"moeyard_(gpu_\w+|cpu_energy\w*|energy_per_token\w*)")
# Series of features the scraped run does not switch on (eval.every, distill.teacher,
# data.mix): they must be absent, not zero (tests/test_eval_metrics.py checks their values).
UNCONFIGURED = re.compile(r"moeyard_(val_\w+|distill_kl|dataset_\w+)")


def _expected_absent(expr: str, rapl: bool) -> bool:
    """True if the expression reads a series this CPU machine cannot measure, or one of a
    feature the scraped run leaves off."""
    if UNCONFIGURED.search(expr):
        return True
    for m in HARDWARE.finditer(expr):
        family = m.group(1)
        if family.startswith("gpu_"):
            return True
        if not rapl:
            return True
    return False


def _substitute(expr: str, run_name: str) -> str:
    return (
        expr.replace("$__rate_interval", "5s")
        .replace("$run", run_name)  # the name has no regex metacharacters
        .replace("$node", ".*")
    )


def test_every_dashboard_expression_against_prometheus(
    prometheus: PrometheusServer,
    scraped_run: dict[str, Any],
) -> None:
    if nvml_present():
        pytest.skip("this machine has NVML: the CPU expectations do not apply")
    dash = json.loads(Path(DASHBOARD_FILE).read_text())
    rapl = RaplReader(scraped_run["cfg"].ops.rapl_root).available
    exprs = [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 15
    with_data, no_data = [], []
    for title, expr in exprs:
        result = prometheus.query_range(
            _substitute(expr, scraped_run["name"]), scraped_run["start"], scraped_run["end"], 0.25
        )
        points = sum(len(s["values"]) for s in result)
        if _expected_absent(expr, rapl):
            assert points == 0, f"{title}: {expr} returned values on a machine without the counter"
            no_data.append(title)
        else:
            assert points > 0, f"{title}: {expr} returned no data"
            with_data.append(title)
    assert "Power per GPU" in no_data and "GPU utilization" in no_data
    assert {"Tokens / s", "MFU", "Loss", "Step time histogram", "Data wait"} <= set(with_data)
    # The template variables' queries.
    for var in dash["templating"]["list"]:
        q = var["query"]["query"]
        m = re.fullmatch(r"label_values\((.*), (\w+)\)", q)
        assert m, q
        selector = m.group(1).replace("$run", scraped_run["name"])
        values = prometheus.api(f"label/{m.group(2)}/values", **{"match[]": selector})
        wanted = scraped_run["name"] if var["name"] == "run" else socket.gethostname()
        assert wanted in values, (var["name"], values)


def test_no_gpu_numbers_are_invented_on_cpu(
    prometheus: PrometheusServer,
    scraped_run: dict[str, Any],
) -> None:
    if nvml_present():
        pytest.skip("this machine has NVML")
    res = prometheus.query_range(
        f'{{__name__=~"moeyard_gpu_.+",run="{scraped_run["name"]}"}}',
        scraped_run["start"],
        scraped_run["end"],
        0.25,
    )
    assert res == []
    for r in scraped_run["records"]:
        assert "gpu_energy_j" not in r
        assert not any("power_w" in d or "util_pct" in d for d in r.get("devices", ()))
    # Throughput metrics are real and present on every logged step.
    assert all(
        r["tokens_window"] > 0 and 0 <= r["data_wait_share"] <= 1 for r in scraped_run["records"]
    )


def test_prometheus_port_already_taken(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OpsConfigError, match=rf"127\.0\.0\.1:{port} \(ops\.prometheus_port\)"):
            ClientBackend(host="127.0.0.1", port=port)
        cfg = load_config(
            "infra/runs/tiny.yaml",
            [
                f"run.output_dir={tmp_path}",
                "parallel.ep=1",
                "train.steps=1",
                "ops.prometheus=client",
                f"ops.prometheus_port={port}",
            ],
        )
        with pytest.raises(OpsConfigError, match=r"ops\.prometheus_port"):
            run(cfg)
