"""A setting that changes nothing is a warning that names it, never silence (the audit of
issue 16: each key below is read only when another key says so)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from trainer.config import load_config

TINY = Path(__file__).resolve().parents[1] / "infra" / "runs" / "tiny.yaml"


def _warnings(overrides: list[str]) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_config(TINY, overrides, ignore_sections=("cluster",))
    return [str(w.message) for w in seen]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            ["model.mla.kv_lora_rank=8"],
            "model.mla.kv_lora_rank (8) is ignored: model.attention is 'gqa'",
        ),
        (
            ["model.dense_hidden=64"],
            "model.dense_hidden (64) is ignored: model.num_dense_layers is 0",
        ),
        (
            ["train.loss_guard=false", "train.max_bad_steps=5"],
            "train.max_bad_steps (5) is ignored: train.loss_guard is false",
        ),
        (
            ["checkpoint.resume=false", "checkpoint.load_step=3"],
            "checkpoint.load_step (3) is ignored: checkpoint.resume is false",
        ),
        (["faults.loss_spike_factor=3"], "faults.loss_spike_factor (3.0) is ignored"),
        (
            ["ops.prometheus_port=9999"],
            "ops.prometheus_port (9999) is ignored: ops.prometheus is 'off'",
        ),
        (["ops.telemetry=false", "ops.rapl_root=/x"], "ops.rapl_root ('/x') is ignored"),
        (
            ["parallel.ep=1", "parallel.ep_exchange=p2p"],
            "parallel.ep_exchange ('p2p') is ignored: parallel.ep is 1",
        ),
    ],
)
def test_an_ignored_setting_warns_naming_its_key(overrides, needle):
    assert any(needle in w for w in _warnings(overrides)), _warnings(overrides)


def test_the_same_settings_where_they_apply_are_silent():
    applied = [
        "model.attention=mla",
        "model.num_kv_heads=0",
        "model.mla.kv_lora_rank=8",
        "model.num_dense_layers=1",
        "model.dense_hidden=64",
        "train.max_bad_steps=5",
        "checkpoint.load_step=3",
        "faults.loss_spike_steps=[2]",
        "faults.loss_spike_factor=3",
        "ops.prometheus=client",
        "ops.prometheus_port=9999",
        "parallel.ep_exchange=p2p",
    ]
    assert not [w for w in _warnings(applied) if "is ignored" in w]
