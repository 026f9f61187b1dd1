"""Fuzzed configuration and command-line input: every value either works or raises the
project's ConfigError naming the key; never a traceback from inside OmegaConf or torch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.config import ConfigError, JobConfig, load_config
from trainer.flops import param_counts
from trainer.model import build_model
from trainer.train import main as train_main


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        t = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if dataclasses.is_dataclass(t):
            keys += _leaf_keys(type(t), f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


KEYS = _leaf_keys(JobConfig)
VALUES = st.one_of(
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(
        [
            "",
            "abc",
            "1e3",
            "-1",
            "0",
            "none",
            "null",
            "[1, 2]",
            "{a: 1}",
            "softmax",
            "mla",
            "s3://x/y",
        ]
    ),
    st.text(max_size=12),
)
KEY = st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=20))


def _as_override(key: str, value) -> str:
    return f"{key}={value}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(KEY, VALUES), min_size=1, max_size=4))
def test_any_override_loads_or_raises_config_error(pairs):
    overrides = [_as_override(k, v) for k, v in pairs]
    try:
        cfg = load_config("infra/runs/tiny.yaml", overrides)
    except ConfigError as e:
        assert str(e)  # a message, whatever the input
        return
    # A config that loads can be sized and built on the meta device without surprises.
    try:
        cfg.check_world(cfg.parallel.ep)
    except ConfigError:
        return
    counts = param_counts(cfg.model)
    if counts.total > 2e8:  # meta build of a huge model is fine but slow; skip
        return
    model = build_model(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == counts.total


@settings(max_examples=150, deadline=None)
@given(argv=st.lists(st.text(max_size=15), max_size=4))
def test_train_cli_never_raises_on_bad_arguments(argv, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    # Only a path that does not exist, or overrides on the tiny preset that fail validation,
    # may reach the trainer here; anything that would start training is filtered out.
    args = ["does-not-exist.yaml", *argv]
    assert train_main(args) == 2
    args = ["infra/runs/tiny.yaml", "train.steps=0", f"run.output_dir={out}", *argv]
    assert train_main(args) == 2


@pytest.mark.parametrize(
    "override",
    [
        "model.moe.num_experts=0",
        "train.lr=-1",
        "model.attention=flash",
        "parallel.ep=0",
        "train.seq_len=100000",
    ],
)
def test_named_keys_in_errors(override):
    with pytest.raises(ConfigError) as e:
        load_config("infra/runs/tiny.yaml", [override])
    assert override.split("=")[0].split(".")[-1] in str(e.value)


def test_no_torch_state_leaks_from_fuzzing():
    assert torch.get_default_device() == torch.device("cpu")


# --- resilience keys, the cluster launcher's config, the `moeyard` subcommands -----------

RESILIENCE_KEYS = st.sampled_from(
    [
        "parallel.timeout_s",
        "train.preempt_grace_s",
        "train.on_bad_steps",
        "train.max_rollbacks",
        "train.max_bad_steps",
    ]
)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(RESILIENCE_KEYS, VALUES), min_size=1, max_size=3))
def test_resilience_values_load_or_raise_and_are_usable(pairs):
    """A timeout or grace time that loads is one the process group, the watchdog and the
    preemption timer accept (no OverflowError from inside datetime or threading)."""
    import datetime

    from trainer.resilience import CollectiveWatch, Preemption

    try:
        cfg = load_config("infra/runs/tiny.yaml", [_as_override(k, v) for k, v in pairs])
    except ConfigError as e:
        assert str(e)
        return
    datetime.timedelta(seconds=cfg.parallel.timeout_s)  # what init_process_group gets
    int(cfg.parallel.timeout_s)  # what Ray's TorchConfig gets
    CollectiveWatch(rank=0, world_size=1, timeout_s=cfg.parallel.timeout_s).close()
    p = Preemption(cfg.train.preempt_grace_s)
    p._on_signal(15, None)  # starts the grace timer without sending a signal
    p.uninstall()
    assert cfg.train.on_bad_steps in ("abort", "rollback") and cfg.train.max_rollbacks >= 0


LAUNCH_KEYS = st.one_of(
    st.sampled_from(
        [
            "cluster.num_workers",
            "cluster.cpus_per_worker",
            "cluster.use_gpu",
            "cluster.placement_strategy",
            "cluster.max_failures",
            "cluster.ray_address",
            "cluster.connect_timeout_s",
            "cluster.start_timeout_s",
            "cluster.storage_path",
            "cluster.run_name",
            "cluster.min_workers",
            "cluster.elastic_batch",
            "cluster.resize_check_s",
            "train.grad_accum",
            "parallel.ep",
            "parallel.world_size",
            "parallel.backend",
            "parallel.timeout_s",
            "run.output_dir",
        ]
    ),
    st.sampled_from(KEYS),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(LAUNCH_KEYS, VALUES), min_size=1, max_size=4))
def test_launch_config_loads_or_raises_config_error(pairs):
    """The launcher's config: ConfigError or a config whose derived settings (resources,
    failure policy, Ray storage, process-group timeout) come out without a traceback; a
    storage layout Ray cannot use is the launcher's own LaunchError."""
    from cluster.config import load_launch_config
    from cluster.launch import FailurePolicy, LaunchError, RayStorage, worker_resources

    try:
        cfg = load_launch_config("infra/runs/tiny.yaml", [_as_override(k, v) for k, v in pairs])
    except ConfigError as e:
        assert str(e)
        return
    res = worker_resources(cfg)
    assert res["CPU"] > 0
    FailurePolicy(cfg).describe()
    assert cfg.backend in ("gloo", "nccl")
    int(cfg.parallel.timeout_s)
    try:
        RayStorage.for_config(cfg)
    except LaunchError as e:
        assert "run.output_dir" in str(e)
    # Every size an elastic run may use is a layout: EP divides it, and (elastic_batch=keep)
    # its grad_accum makes up the full global batch.
    from cluster.elastic import at_size, counts_for, describe

    describe(cfg)
    full = cfg.cluster.num_workers * cfg.train.grad_accum
    for n in counts_for(cfg):
        assert n % cfg.parallel.ep == 0 and n >= max(cfg.cluster.min_workers, 1)
        accum = at_size(cfg, n).train.grad_accum
        if cfg.cluster.elastic_batch == "keep":
            assert n * accum == full


@settings(max_examples=100, deadline=None)
@given(
    name=st.sampled_from(["train", "submit", "report", "export"]),
    first=st.text(min_size=1, max_size=15),
    rest=st.lists(st.text(max_size=10), max_size=2),
)
def test_moeyard_subcommands_reject_unknown_targets(name, first, rest):
    """A preset or run directory that does not exist gets exit code 2 and a message, never a
    traceback (and never a started job)."""
    import contextlib
    import io
    import os

    from hypothesis import assume

    from cluster.cli import main as moeyard
    from cluster.presets import PresetError, resolve_preset

    assume(not first.startswith("-") and not os.path.exists(first))
    try:
        resolve_preset(first)
        assume(False)  # a real preset name would start a run
    except PresetError:
        pass
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert moeyard([name, first, *rest]) == 2
    assert f"moeyard {name}:" in err.getvalue()


# --- faults.* (the loss-guard rehearsal hook) -------------------------------------------------

STEP_LISTS = st.lists(st.integers(min_value=-3, max_value=55), max_size=4).map(
    lambda xs: "[" + ",".join(map(str, xs)) + "]"
)
FAULT_PAIRS = st.one_of(
    st.tuples(st.sampled_from(["faults.nonfinite_loss_steps", "faults.loss_spike_steps"]), VALUES),
    st.tuples(
        st.sampled_from(["faults.nonfinite_loss_steps", "faults.loss_spike_steps"]), STEP_LISTS
    ),
    st.tuples(st.just("faults.loss_spike_factor"), VALUES),
    st.tuples(st.just("train.steps"), st.integers(min_value=-2, max_value=60)),
)


@settings(max_examples=80, deadline=None)
@given(st.lists(FAULT_PAIRS, min_size=1, max_size=4))
def test_fault_values_load_or_raise_and_inject_exactly_the_listed_steps(pairs):
    """A `faults.*` config that loads names steps in 1..train.steps, one fault per step, and
    the loop's hook injects exactly those steps, once each."""
    import math

    from trainer.fault_hook import LossFaults

    try:
        cfg = load_config("infra/runs/tiny.yaml", [_as_override(k, v) for k, v in pairs])
    except ConfigError as e:
        assert str(e)
        return
    f = cfg.faults
    assert all(1 <= s <= cfg.train.steps for s in f.steps)
    assert len(set(f.steps)) == len(f.steps)
    assert math.isfinite(f.loss_spike_factor) and f.loss_spike_factor > 1
    # Not resuming, not rank 0: no record is read or written.
    hook = LossFaults(f, output_dir="unused", rank=1, resume=False)
    got = {s: hook.take(s) for s in range(1, cfg.train.steps + 1)}
    assert {s for s, x in got.items() if x is not None} == set(f.steps)
    assert all(math.isnan(got[s]) for s in f.nonfinite_loss_steps)
    assert all(got[s] == f.loss_spike_factor for s in f.loss_spike_steps)
    assert all(hook.take(s) is None for s in f.steps)  # first pass only
