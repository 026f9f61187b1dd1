"""Knowledge distillation (`distill.*`): the KL by hand, KL 0 at step 0 when the teacher is the
student's own initial weights, a student distilled from a trained tiny teacher ends with a
lower val_loss than the same student alone (fixed seeds, CPU), and bad input names its key.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from safetensors.torch import save as st_save

from dataloader.prepare import prepare
from tests.distributed import run_ranks
from trainer.config import ConfigError, JobConfig, load_config, to_yaml
from trainer.distill import kl_teacher_student
from trainer.export import export, export_hf
from trainer.loop import run, setup
from trainer.model import build_model, materialize

PRESET = Path(__file__).resolve().parents[1] / "infra" / "runs" / "tiny.yaml"
SMALL = [
    "model.dim=32",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.dense_hidden=64",
    "model.moe.expert_hidden=32",
    # This test's own learning settings: a teacher of 30 steps must be good enough to teach,
    # whatever the preset tunes for its demo.
    "train.lr=3e-3",
    "model.moe.aux_loss_coef=0.05",
    "train.seq_len=32",
    "train.micro_batch_size=4",
    "ops.stdout=false",
    "ops.telemetry=false",
    "data.source=auto",
    "parallel.ep=1",
]
EVAL = ["eval.steps=4", "eval.batch_size=8"]


class Record:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.records.append({"step": step, **metrics})

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("distill") / "email")
    # Real text: the standard library's email package, byte-tokenized, 10 % held out.
    email = str(Path(sysconfig.get_paths()["stdlib"]) / "email")
    prepare([email], out, seq_len=32, rows_per_group=64, progress=False, val_fraction=0.1)
    return out


def cfg_for(data: str, out: Path, *extra: str) -> JobConfig:
    return load_config(
        PRESET,
        [
            *SMALL,
            *(EVAL if any(x.startswith("eval.every") for x in extra) else []),
            f"data.path={data}",
            f"run.output_dir={out}",
            *extra,
        ],
        ignore_sections=("cluster",),
    )


def test_kl_by_hand() -> None:
    student = torch.zeros(1, 1, 2)
    teacher = torch.tensor(
        [[[math.log(3.0), 0.0]]]
    )  # p_teacher = (3/4, 1/4), p_student = (1/2, 1/2)
    want = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # 0.130812
    assert kl_teacher_student(student, teacher, temperature=1.0).item() == pytest.approx(want)
    # T = 2: p_teacher = softmax(ln 3 / 2, 0) = (sqrt 3, 1) / (sqrt 3 + 1); times T^2 = 4.
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    want2 = 4 * (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))
    assert kl_teacher_student(student, teacher, temperature=2.0).item() == pytest.approx(want2)
    # Averaged over tokens, and zero (with zero gradient) for equal logits.
    s = torch.randn(2, 3, 5, requires_grad=True)
    kl = kl_teacher_student(s, s.detach().clone(), temperature=1.5)
    kl.backward()
    assert abs(kl.item()) < 1e-6 and s.grad is not None and s.grad.abs().max() < 1e-6
    two = torch.cat([student, student], dim=1), torch.cat([teacher, student], dim=1)
    assert kl_teacher_student(*two, temperature=1.0).item() == pytest.approx(want / 2)


def export_initial_weights(cfg: JobConfig, teacher_dir: Path) -> None:
    """The student's initial weights (one process, EP 1) in `moeyard export`'s format."""
    model = materialize(build_model(cfg.model), device=torch.device("cpu"), seed=cfg.train.seed)
    fs, _ = fsspec.core.url_to_fs(str(teacher_dir))
    fs.makedirs(str(teacher_dir), exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (teacher_dir / "model.safetensors").write_bytes(st_save(state))
    (teacher_dir / "config.yaml").write_text(to_yaml(cfg))


def test_a_teacher_equal_to_the_students_initial_weights_gives_kl_0_at_step_0(
    data, tmp_path
) -> None:
    cfg = cfg_for(data, tmp_path / "run", "train.steps=2")
    teacher_dir = tmp_path / "teacher"
    export_initial_weights(cfg, teacher_dir)
    rec = Record()
    cfg = cfg_for(
        data,
        tmp_path / "run",
        "train.steps=2",
        "distill.alpha=1.0",
        f"distill.teacher={teacher_dir}",
        "distill.temperature=2.0",
    )
    run(cfg, sinks=[rec])
    first, second = rec.records
    assert abs(first["distill_kl"]) < 1e-6 and first["distill_loss"] == pytest.approx(
        first["distill_kl"]
    )
    # alpha 1 trains on the KL alone: at step 0 its gradient is 0, so only the auxiliary
    # losses moved the weights, and the KL stays small but is no longer exactly 0.
    assert 0 < second["distill_kl"] < 0.05
    assert first["lm_loss"] > 4.0  # the cross-entropy is still logged, untouched


def _first_kl(rank: int, world: int, data: str, out: str, teacher: str) -> float:
    rec = Record()
    cfg = cfg_for(
        data,
        Path(out),
        "train.steps=1",
        "parallel.ep=2",
        "distill.alpha=1.0",
        f"distill.teacher={teacher}",
    )
    run(cfg, sinks=[rec])
    return float(rec.records[0]["distill_kl"]) if rank == 0 else 0.0


@pytest.mark.slow
def test_the_teacher_is_sharded_like_the_student_at_ep_2(data, tmp_path) -> None:
    # Exported at EP 1, loaded by two ranks that each hold half of every layer's experts:
    # a wrong expert in the teacher would make the step-0 KL positive.
    teacher_dir = tmp_path / "teacher"
    export_initial_weights(cfg_for(data, tmp_path / "x"), teacher_dir)
    kl0, _ = run_ranks(_first_kl, 2, data, str(tmp_path / "run"), str(teacher_dir))
    assert abs(kl0) < 1e-6


def test_a_distilled_student_reaches_a_lower_val_loss_than_the_student_alone(
    data, tmp_path
) -> None:
    teacher_run = tmp_path / "teacher-run"
    run(
        cfg_for(
            data,
            teacher_run,
            "train.steps=30",
            "checkpoint.every=30",
            "checkpoint.async_save=false",
        ),
        sinks=[],
    )
    export(str(teacher_run), str(tmp_path / "teacher"))
    student = ("train.steps=10", "eval.every=10", "train.seed=1")  # another init than the teacher's
    alone, taught = Record(), Record()
    run(cfg_for(data, tmp_path / "alone", *student), sinks=[alone])
    run(
        cfg_for(
            data,
            tmp_path / "taught",
            *student,
            f"distill.teacher={tmp_path / 'teacher'}",
            "distill.alpha=0.9",
            "distill.temperature=2.0",
        ),
        sinks=[taught],
    )
    val_alone = alone.records[-1]["val_loss"]
    val_taught = taught.records[-1]["val_loss"]
    assert val_taught < val_alone - 0.02, (val_taught, val_alone)
    kls = [r["distill_kl"] for r in taught.records]
    assert kls[-1] < kls[0]  # the student moves toward the teacher
    assert "distill_kl" not in alone.records[-1]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["distill.teacher=x", "distill.alpha=1.5"],
            r"distill\.alpha \(1\.5\) must be in \[0, 1\]",
        ),
        (["distill.teacher=x", "distill.alpha=-0.1"], r"distill\.alpha"),
        (["distill.teacher=x", "distill.temperature=0"], r"distill\.temperature \(0\.0\) must be"),
        (["distill.teacher=x", "distill.temperature=.inf"], r"distill\.temperature"),
        (["distill.teachr=x"], r"teachr"),
    ],
)
def test_bad_distill_settings_are_errors_naming_the_key(overrides, match) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_a_missing_or_mismatched_teacher_is_an_error_naming_distill_teacher(data, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"distill\.teacher \(.*nowhere\) is neither an exported"):
        setup(cfg_for(data, tmp_path / "a", f"distill.teacher={tmp_path / 'nowhere'}"))
    other = tmp_path / "other"
    other.mkdir()
    big = cfg_for(data, tmp_path / "b", "model.vocab_size=512")
    (other / "config.yaml").write_text(to_yaml(big))
    (other / "model.safetensors").write_bytes(st_save({"x": torch.zeros(1)}))
    with pytest.raises(ConfigError, match=r"vocabulary of 512 tokens, model\.vocab_size is 320"):
        setup(cfg_for(data, tmp_path / "c", f"distill.teacher={other}"))
    with pytest.warns(UserWarning, match=r"distill\.alpha \(0\.7\) .* ignored"):
        load_config(None, ["distill.alpha=0.7"])


def test_a_transformers_teacher_gives_the_same_kl_as_the_moeyard_export(data, tmp_path) -> None:
    # Mixtral-shaped (top-2, renormalized), so `moeyard export --format hf` can write it.
    mixtral = "model.moe.norm_topk_prob=true"
    teacher_run = tmp_path / "teacher-run"
    run(
        cfg_for(
            data,
            teacher_run,
            mixtral,
            "train.steps=5",
            "checkpoint.every=5",
            "checkpoint.async_save=false",
        ),
        sinks=[],
    )
    export(str(teacher_run), str(tmp_path / "moeyard"))
    export_hf(str(teacher_run), str(tmp_path / "hf"))
    kls = []
    for kind in ("moeyard", "hf"):
        rec = Record()
        run(
            cfg_for(
                data,
                tmp_path / f"student-{kind}",
                mixtral,
                "train.steps=1",
                f"distill.teacher={tmp_path / kind}",
            ),
            sinks=[rec],
        )
        kls.append(rec.records[0]["distill_kl"])
    assert kls[0] > 1e-3  # a trained teacher and a fresh student disagree
    assert kls[1] == pytest.approx(kls[0], rel=1e-5)
