"""`moeyard report RUN_DIR`: the summary of a finished run (tokens, time, energy, J/token,
MFU, final loss, final validation loss, tokens per dataset of a mixture) from its
metrics.jsonl and summary.json, with its plots as PNG files.

Quantities that were not measured in the run (no energy counter, no known peak) are
reported as "not measured", never as zero.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from typing import Any

import fsspec

from ops.sinks import read_metrics


def summarize(
    records: list[dict[str, Any]], summary: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The run's totals from its records.

    Returns keys `steps`, `tokens`, `time_s`, `tokens_per_s`, `final_loss`, and, when
    measured, `final_val_loss` and `final_val_ppl` (the last evaluation), `dataset_tokens`
    (per dataset of a data.mix), `energy_j`, `kwh`, `energy_scope`, `energy_per_token_j`, `tokens_per_kwh`,
    `mfu` (time-weighted over the logged windows), `model_tflops_per_s`.

    Raises:
        ValueError: there are no records.
    """
    if not records:
        raise ValueError("the run has no logged step (metrics.jsonl is empty)")
    last = records[-1]
    out: dict[str, Any] = {"steps": last["step"], "tokens": last.get("tokens")}
    windows = [
        (r, r["step_time_s"] * r.get("window_steps", 1)) for r in records if "step_time_s" in r
    ]
    train_s = math.fsum(t for _, t in windows)
    out["time_s"] = summary["wall_s"] if summary and "wall_s" in summary else train_s
    out["train_time_s"] = train_s
    if out["tokens"] and train_s > 0:
        out["tokens_per_s"] = out["tokens"] / train_s
    out["final_loss"] = last.get("loss")
    evaluated = [r for r in records if isinstance(r.get("val_loss"), int | float)]
    if evaluated:
        out["final_val_loss"] = evaluated[-1]["val_loss"]
        out["final_val_ppl"] = evaluated[-1].get("val_ppl")
        out["val_step"] = evaluated[-1]["step"]
    mixed = [r for r in records if r.get("data_mix")]
    if mixed:
        out["dataset_tokens"] = {k: d["tokens"] for k, d in mixed[-1]["data_mix"].items()}
    measured = [(r, t) for r, t in windows if "energy_j" in r]
    if measured:
        joules = math.fsum(r["energy_j"] for r, _ in measured)
        tokens = sum(r.get("tokens_window", 0) for r, _ in measured)
        out["energy_j"] = joules
        out["kwh"] = joules / 3.6e6
        out["energy_scope"] = measured[-1][0].get("energy_scope")
        out["energy_measured_share"] = len(measured) / len(windows)
        if tokens:
            out["energy_per_token_j"] = joules / tokens
        if joules > 0:
            out["tokens_per_kwh"] = tokens / (joules / 3.6e6)
    with_mfu = [(r["mfu"], t) for r, t in windows if "mfu" in r]
    if with_mfu and train_s > 0:
        out["mfu"] = math.fsum(m * t for m, t in with_mfu) / math.fsum(t for _, t in with_mfu)
    with_flops = [(r["model_tflops_per_s"], t) for r, t in windows if "model_tflops_per_s" in r]
    if with_flops:
        out["model_tflops_per_s"] = math.fsum(f * t for f, t in with_flops) / math.fsum(
            t for _, t in with_flops
        )
    return out


def _line(
    ax: Any,
    records: list[dict[str, Any]],
    key: str,
    label: str,
    scale: float = 1.0,
    color: str | None = None,
) -> int:
    pts = [(r["step"], r[key] * scale) for r in records if isinstance(r.get(key), int | float)]
    if pts:
        ax.plot(*zip(*pts, strict=True), label=label, color=color)
    return len(pts)


def _no_data(ax: Any, why: str) -> None:
    ax.text(
        0.5, 0.5, f"no data\n{why}", ha="center", va="center", color="gray", transform=ax.transAxes
    )


def plot(records: list[dict[str, Any]]) -> dict[str, bytes]:
    """PNG files by name: loss (training, and validation where evaluated), throughput
    (tokens/s and MFU), power (per GPU), energy (J/token), experts (load heat map of the last
    logged step), and datasets (tokens per dataset of a data.mix) when the run had one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs: dict[str, bytes] = {}

    def save(fig: Any, name: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        pngs[name] = buf.getvalue()

    fig, ax = plt.subplots(figsize=(7, 4))
    _line(ax, records, "loss", "loss")
    _line(ax, records, "lm_loss", "lm loss")
    pts = [
        (r["step"], r["val_loss"]) for r in records if isinstance(r.get("val_loss"), int | float)
    ]
    if pts:
        ax.plot(*zip(*pts, strict=True), label="val loss", marker="o")
    _line(ax, records, "distill_kl", "distill KL")
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.legend()
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    _line(ax, records, "tokens_per_s", "tokens/s")
    ax.set(xlabel="step", ylabel="tokens/s", title="Throughput")
    both = next((r for r in reversed(records) if r.get("mfu") and r.get("tokens_per_s")), None)
    if both:
        # MFU is tokens/s times a constant of the run (FLOPs per token over the peak), so it
        # is a second scale of the same line rather than a second line.
        k = 100.0 * both["mfu"] / both["tokens_per_s"]
        ax.secondary_yaxis("right", functions=(lambda x: x * k, lambda y: y / k)).set_ylabel(
            "MFU (%)"
        )
    save(fig, "throughput.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    ranks = sorted({d["rank"] for r in records for d in r.get("devices", ()) if "power_w" in d})
    for rank in ranks:
        pts = [
            (r["step"], d["power_w"])
            for r in records
            for d in r.get("devices", ())
            if d["rank"] == rank and "power_w" in d
        ]
        ax.plot(*zip(*pts, strict=True), label=f"rank {rank}")
    if ranks:
        ax.legend()
    else:
        _no_data(ax, "no GPU telemetry (NVML) in this run")
    ax.set(xlabel="step", ylabel="W", title="Power per GPU")
    save(fig, "power.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    if not _line(ax, records, "energy_per_token_j", "J/token"):
        _no_data(ax, "no energy counter (NVML or RAPL) in this run")
    ax.set(xlabel="step", ylabel="J/token", title="Energy per token")
    save(fig, "energy.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    last = next((r for r in reversed(records) if r.get("moe")), None)
    if last:
        loads = [
            [n / max(1e-9, sum(layer["tokens"]) / len(layer["tokens"])) for n in layer["tokens"]]
            for layer in last["moe"]
        ]
        im = ax.imshow(loads, aspect="auto", cmap="Reds", vmin=0, vmax=2, interpolation="nearest")
        fig.colorbar(im, ax=ax, label="tokens / mean")
        ax.set_yticks(range(len(loads)), [str(layer["layer"]) for layer in last["moe"]])
        num_experts = len(loads[0])
        ax.set_xticks(range(0, num_experts, max(1, num_experts // 16)))
        ax.set(xlabel="expert", ylabel="MoE layer", title=f"Expert load, step {last['step']}")
    else:
        _no_data(ax, "this model logged no MoE layer")
    save(fig, "experts.png")

    names = sorted({k for r in records for k in (r.get("data_mix") or {})})
    if names:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in names:
            pts = [
                (r["step"], r["data_mix"][name]["tokens"])
                for r in records
                if name in (r.get("data_mix") or {})
            ]
            weight = next(
                r["data_mix"][name]["weight"] for r in records if name in (r.get("data_mix") or {})
            )
            ax.plot(*zip(*pts, strict=True), label=f"{name} (weight {weight:.3g})")
        ax.legend()
        ax.set(xlabel="step", ylabel="tokens", title="Tokens per dataset")
        save(fig, "datasets.png")
    return pngs


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "not measured"
    if isinstance(v, float):
        s = f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    else:
        s = f"{v:,}" if isinstance(v, int) else str(v)
    return f"{s} {unit}".rstrip()


def render_text(s: dict[str, Any]) -> str:
    rows = [
        ("steps", _fmt(s.get("steps"))),
        ("tokens", _fmt(s.get("tokens"))),
        ("wall time", _fmt(s.get("time_s"), "s")),
        ("tokens/s", _fmt(s.get("tokens_per_s"))),
        ("final loss", _fmt(s.get("final_loss"))),
        (
            "val loss",
            f"{_fmt(s['final_val_loss'])} (ppl {_fmt(s.get('final_val_ppl'))}, step {s['val_step']})"
            if "final_val_loss" in s
            else "not evaluated (eval.every=0)",
        ),
        ("MFU", _fmt(s["mfu"] * 100, "%") if "mfu" in s else "not measured (device peak unknown)"),
        (
            "energy",
            _fmt(s.get("kwh"), f"kWh ({s.get('energy_scope')})") if "kwh" in s else "not measured",
        ),
        ("energy per token", _fmt(s.get("energy_per_token_j"), "J")),
        ("tokens per kWh", _fmt(s.get("tokens_per_kwh"))),
    ]
    for name, tokens in (s.get("dataset_tokens") or {}).items():
        rows.append((f"tokens of {name}", _fmt(tokens)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def report(run_dir: str, *, out_dir: str | None = None) -> dict[str, Any]:
    """Writes report.json and the PNG plots to `out_dir` (default RUN_DIR/report) and returns
    the summary.

    Raises:
        FileNotFoundError: RUN_DIR has no metrics.jsonl.
        ValueError: metrics.jsonl has no record.
    """
    run_dir = run_dir.rstrip("/")
    metrics_url = f"{run_dir}/metrics.jsonl"
    fs, path = fsspec.core.url_to_fs(metrics_url)
    if not fs.exists(path):
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    records = read_metrics(metrics_url)
    summary = None
    sfs, spath = fsspec.core.url_to_fs(f"{run_dir}/summary.json")
    if sfs.exists(spath):
        with sfs.open(spath, "r") as f:
            summary = json.load(f)
    s = summarize(records, summary)
    out_dir = (out_dir or f"{run_dir}/report").rstrip("/")
    ofs, opath = fsspec.core.url_to_fs(out_dir)
    ofs.makedirs(opath, exist_ok=True)
    files = plot(records)
    for name, data in files.items():
        with ofs.open(f"{opath}/{name}", "wb") as f:
            f.write(data)
    s["plots"] = sorted(f"{out_dir}/{name}" for name in files)
    with ofs.open(f"{opath}/report.json", "w") as f:
        f.write(json.dumps(s, indent=1))
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moeyard report", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="the run's output_dir (a local path or an fsspec URL)")
    p.add_argument("--out", help="where to write report.json and the PNGs (default RUN_DIR/report)")
    args = p.parse_args(argv)
    try:
        s = report(args.run_dir, out_dir=args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"moeyard report: {e}", file=sys.stderr)
        return 2
    print(render_text(s))
    print("plots: " + ", ".join(s["plots"]))
    return 0
