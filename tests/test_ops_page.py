"""The built-in ops page in headless Chromium (driven over the DevTools protocol) with the
metrics.jsonl of a real short run, and `moeyard report` on the same run. The run trains on a
mixture of two prepared datasets (the standard library's email and json packages) and
evaluates on email's held-out split, so the validation and per-dataset plots have data.

The page is first served half of the run's lines, then the rest appear with the run's
summary, as while a run goes on: the page must pick them up by itself. A screenshot is
saved to .artifacts/ops_page.png.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import shutil
import subprocess
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.cli import main as cli
from dataloader.prepare import prepare
from ops.page import serve_in_thread
from ops.report import summarize
from ops.sinks import read_metrics
from trainer.config import load_config
from trainer.loop import run

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / ".artifacts"
STEPS = 30


EVAL_EVERY = 10


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("page-run")
    data = tmp_path_factory.mktemp("page-data")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for pkg, fraction in (("email", 0.1), ("json", 0.0)):
        prepare(
            [str(stdlib / pkg)], str(data / pkg), seq_len=64, progress=False, val_fraction=fraction
        )
    mix = f"[{{name: email, path: '{data / 'email'}', weight: 0.7}}, " + (
        f"{{name: json, path: '{data / 'json'}', weight: 0.3}}]"
    )
    cfg = load_config(
        "infra/runs/tiny.yaml",
        [
            f"run.output_dir={out}",
            "run.name=page-run",
            "parallel.ep=1",
            f"train.steps={STEPS}",
            "ops.stdout=false",
            "ops.peak_tflops=0.5",
            "data.source=auto",
            f"data.mix={mix}",
            f"eval.every={EVAL_EVERY}",
            f"eval.path={data / 'email' / 'val'}",
            "eval.steps=2",
            "eval.batch_size=4",
        ],
    )
    run(cfg)
    return out


class Chromium:
    """Headless Chromium with the DevTools protocol on a local port."""

    def __init__(self) -> None:
        binary = shutil.which("chromium")
        if binary is None:
            raise RuntimeError("chromium is not installed; run scripts/setup.sh")
        self.profile = tempfile.mkdtemp(prefix="moeyard-chromium-")
        self.proc = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",  # root in CI
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                "--window-size=1400,1200",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        self.port = 0
        lines = []
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError("chromium exited: " + "".join(lines[-20:]))
            lines.append(line)
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if m:
                self.port = int(m.group(1))
                break
        if not self.port:
            self.close()
            raise RuntimeError("chromium did not open its DevTools port: " + "".join(lines[-20:]))
        # Keep reading stderr so that the pipe never fills and blocks the browser.
        self._drain = subprocess.Popen(["cat"], stdin=self.proc.stderr, stdout=subprocess.DEVNULL)
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        self.ws_url = pages[0]["webSocketDebuggerUrl"]

    async def _session(self, commands: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        import aiohttp

        results = []
        async with (
            aiohttp.ClientSession() as s,
            s.ws_connect(self.ws_url, max_msg_size=0) as ws,
        ):
            for i, (method, params) in enumerate(commands, start=1):
                await ws.send_json({"id": i, "method": method, "params": params})
                while True:
                    msg = await ws.receive_json(timeout=30)
                    if msg.get("id") == i:
                        if "error" in msg:
                            raise RuntimeError(f"{method}: {msg['error']}")
                        results.append(msg["result"])
                        break
        return results

    def call(self, method: str, **params: Any) -> Any:
        return asyncio.run(self._session([(method, params)]))[0]

    def evaluate(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                v = self.evaluate(expression)
            except RuntimeError:  # the page is still loading (no body yet)
                v = None
            if v:
                return v
            time.sleep(0.1)
        raise TimeoutError(f"page never satisfied {expression}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if getattr(self, "_drain", None):
            self._drain.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    c = Chromium()
    yield c
    c.close()


POINTS = "JSON.stringify(Object.fromEntries([...document.querySelectorAll('canvas')].map(c => [c.id, Number(c.dataset.points)])))"
INKED = """(() => { const c = document.getElementById('%s');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; })()"""


def test_ops_page_renders_and_follows_the_run(
    chromium: Chromium, real_run: Path, tmp_path: Path
) -> None:
    lines = (real_run / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == STEPS
    live = tmp_path / "live"
    live.mkdir()
    half = STEPS // 2
    (live / "metrics.jsonl").write_text("".join(lines[:half]))
    shutil.copy(real_run / "config.yaml", live / "config.yaml")
    server, _ = serve_in_thread(str(live))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/?interval=200"
        chromium.call(
            "Emulation.setDeviceMetricsOverride",
            width=1400,
            height=1200,
            deviceScaleFactor=1,
            mobile=False,
        )
        chromium.call("Page.navigate", url=url)
        chromium.wait_for(f"document.body.dataset.records === '{half}'")
        assert chromium.evaluate("document.body.dataset.finished") == "false"
        # The run goes on: the rest of the lines and then its summary appear.
        with open(live / "metrics.jsonl", "a") as f:
            f.write("".join(lines[half:]))
        shutil.copy(real_run / "summary.json", live / "summary.json")
        chromium.wait_for(f"document.body.dataset.records === '{STEPS}'")
        chromium.wait_for("document.body.dataset.finished === 'true'")
        points = json.loads(chromium.evaluate(POINTS))
        assert points["plot-loss"] == 2 * STEPS  # loss and lm_loss
        assert points["plot-tps"] == STEPS and points["plot-wait"] == STEPS
        assert points["plot-mfu"] == STEPS  # ops.peak_tflops is set for this run
        assert points["plot-experts"] == 2 * 8  # 2 MoE layers x 8 experts
        assert points["plot-val"] == STEPS // EVAL_EVERY  # one point per evaluation
        assert points["plot-mix"] == 2 * STEPS  # two datasets, every step
        # No GPU and no readable energy counter here: those plots say so, with no line.
        assert points["plot-power"] == 0 and points["plot-util"] == 0 and points["plot-jpt"] == 0
        for canvas in (
            "plot-loss",
            "plot-tps",
            "plot-experts",
            "plot-power",
            "plot-val",
            "plot-mix",
        ):
            assert chromium.evaluate(INKED % canvas) > 500, canvas
        last = read_metrics(str(real_run / "metrics.jsonl"))[-1]
        assert chromium.evaluate("document.getElementById('step').textContent") == str(STEPS)
        assert (
            chromium.evaluate("document.getElementById('loss').textContent")
            == f"{last['loss']:.4f}"
        )
        assert chromium.evaluate("document.getElementById('kwh').textContent") == "not measured"
        assert (
            chromium.evaluate("document.getElementById('val').textContent")
            == f"{last['val_loss']:.4f} (step {STEPS})"
        )
        assert chromium.evaluate("document.getElementById('run').textContent") == "page-run"
        size = chromium.call("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = chromium.call(
            "Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True
        )
        ARTIFACTS.mkdir(exist_ok=True)
        png = base64.b64decode(shot["data"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        (ARTIFACTS / "ops_page.png").write_bytes(png)
    finally:
        server.shutdown()
        server.server_close()


def test_page_api_reads_whole_lines_only(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    server, _ = serve_in_thread(str(tmp_path))
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(f"{base}/api/metrics?offset=0") as r:
            body = json.load(r)
        assert [x["step"] for x in body["records"]] == [1]
        with open(tmp_path / "metrics.jsonl", "a") as f:
            f.write('ss": 1.5}\n')
        with urllib.request.urlopen(f"{base}/api/metrics?offset={body['offset']}") as r:
            body2 = json.load(r)
        assert body2["records"] == [{"step": 2, "loss": 1.5}]
        with urllib.request.urlopen(f"{base}/") as r:
            html = r.read().decode()
        assert "<script" in html and "http://" not in html and "https://" not in html  # no CDN
    finally:
        server.shutdown()
        server.server_close()


def test_report(real_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert cli(["report", str(real_run), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    records = read_metrics(str(real_run / "metrics.jsonl"))
    rep = json.loads((out / "report.json").read_text())
    assert rep["steps"] == STEPS and rep["tokens"] == records[-1]["tokens"]
    assert rep["final_loss"] == records[-1]["loss"]
    times = [r["step_time_s"] * r["window_steps"] for r in records]
    want_mfu = sum(r["mfu"] * t for r, t in zip(records, times, strict=True)) / sum(times)
    assert math.isclose(rep["mfu"], want_mfu, rel_tol=1e-12)
    assert "energy_j" not in rep and "energy_per_token_j" not in rep  # nothing measured here
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    assert rep["final_val_loss"] == evals[-1]["val_loss"] and rep["val_step"] == STEPS
    assert rep["final_val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    mix = records[-1]["data_mix"]
    assert rep["dataset_tokens"] == {"email": mix["email"]["tokens"], "json": mix["json"]["tokens"]}
    assert mix["email"]["tokens"] + mix["json"]["tokens"] == records[-1]["tokens"]
    assert re.search(r"val loss\s+\d+\.\d+ \(ppl \d", text) and re.search(
        r"tokens of json\s+\d", text
    )
    assert re.search(r"energy\s+not measured", text) and re.search(r"MFU\s+\d", text)
    for name in ("loss", "throughput", "power", "energy", "experts", "datasets"):
        data = (out / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, name
    ARTIFACTS.mkdir(exist_ok=True)
    for name in ("loss", "experts", "datasets"):
        shutil.copy(out / f"{name}.png", ARTIFACTS / f"report_{name}.png")


def test_report_energy_from_measured_windows() -> None:
    recs = [
        {
            "step": 1,
            "tokens": 100,
            "tokens_window": 100,
            "step_time_s": 1.0,
            "window_steps": 1,
            "loss": 3.0,
            "energy_j": 50.0,
            "energy_scope": "gpu",
        },
        {
            "step": 2,
            "tokens": 200,
            "tokens_window": 100,
            "step_time_s": 1.0,
            "window_steps": 1,
            "loss": 2.0,
        },
        {
            "step": 4,
            "tokens": 400,
            "tokens_window": 200,
            "step_time_s": 0.5,
            "window_steps": 2,
            "loss": 1.0,
            "energy_j": 150.0,
            "energy_scope": "gpu",
        },
    ]
    s = summarize(recs)
    assert s["energy_j"] == 200.0 and s["energy_per_token_j"] == pytest.approx(200.0 / 300)
    assert s["energy_measured_share"] == pytest.approx(2 / 3)
    assert s["final_loss"] == 1.0 and s["train_time_s"] == pytest.approx(3.0)
    assert "mfu" not in s


def test_report_missing_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ops.report import main as report_main

    assert report_main([str(tmp_path)]) == 2  # a directory without metrics.jsonl
    assert f"no metrics.jsonl in {tmp_path}" in capsys.readouterr().err
    assert cli(["report", str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
