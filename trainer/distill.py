"""Knowledge distillation (`distill.*`): a frozen teacher's soft targets in the student's loss.

On each micro-batch the loss is

    (1 - alpha) x CE(student, next tokens) + alpha x T^2 x KL(p_teacher^T || p_student^T)

with p^T = softmax(logits / T), the KL summed over the vocabulary and averaged over the
tokens (the T^2 keeps the soft term's gradient scale independent of T, as in Hinton et
al.); the MoE auxiliary and z-losses are added as without distillation. Both parts are
logged (`lm_loss` is the cross-entropy, `distill_kl` the KL at temperature T).

The teacher is built the way the student is: `build_model` on the meta device ->
`parallelize(teacher, mesh)` with the student's mesh (its experts split over the same EP
ranks, and sharded as the student's parameters are, so it fits beside it) -> `materialize`
-> the teacher's weights copied into this rank's part. It runs in eval mode under
`torch.no_grad()`, in bf16 on GPU (under FSDP its shards are gathered as bf16, unsharded its
weights are cast; on CPU it stays fp32), and never receives a gradient or an optimizer
step.

Teachers: an exported moeyard checkpoint (`moeyard export`: `model.safetensors` and
`config.yaml` in one directory), or a transformers directory (`config.json` plus
safetensors) read through trainer/init_from.py.
"""

from __future__ import annotations

import os
import tempfile

import fsspec
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from trainer.config import ConfigError, JobConfig, ModelConfig, load_config
from trainer.mesh import Mesh
from trainer.model import Transformer, build_model, materialize
from trainer.parallelize import parallelize
from trainer.run_state import RunState

EXPORT_MODEL = "model.safetensors"  # as trainer/export.py writes them
EXPORT_CONFIG = "config.yaml"
HF_CONFIG = "config.json"


def kl_teacher_student(
    student_logits_BSV: Tensor, teacher_logits_BSV: Tensor, *, temperature: float
) -> Tensor:
    """Mean over tokens of KL(softmax(teacher / T) || softmax(student / T)), times T^2.

    Computed in fp32 whatever the logits' dtype. Zero when the logits are equal; a scalar
    with the student's gradient.
    """
    t = temperature
    s_logp = F.log_softmax(student_logits_BSV.float().flatten(0, -2) / t, dim=-1)
    t_logp = F.log_softmax(teacher_logits_BSV.float().flatten(0, -2) / t, dim=-1)
    kl_N = (t_logp.exp() * (t_logp - s_logp)).sum(dim=-1)
    return kl_N.mean() * (t * t)


def _read_text(url: str) -> str:
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "r") as f:
        return f.read()


def teacher_kind(url: str) -> str:
    """ "export" (model.safetensors + config.yaml) or "hf" (config.json).

    Raises:
        ConfigError: neither, naming distill.teacher.
    """
    fs, path = fsspec.core.url_to_fs(url)
    root = path.rstrip("/")
    if fs.exists(f"{root}/{EXPORT_MODEL}") and fs.exists(f"{root}/{EXPORT_CONFIG}"):
        return "export"
    if fs.exists(f"{root}/{HF_CONFIG}"):
        return "hf"
    raise ConfigError(
        f"distill.teacher ({url}) is neither an exported moeyard checkpoint ({EXPORT_MODEL} and "
        f"{EXPORT_CONFIG}, as `moeyard export` writes them) nor a transformers directory "
        f"({HF_CONFIG})"
    )


def teacher_model_config(url: str, kind: str) -> ModelConfig:
    """The teacher's model section, from its export's config.yaml or its config.json."""
    if kind == "hf":
        import json

        from trainer.hf import model_config_from_hf

        hf = json.loads(_read_text(f"{url.rstrip('/')}/{HF_CONFIG}"))
        return model_config_from_hf(hf, where=url)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, EXPORT_CONFIG)
        with open(p, "w") as f:
            f.write(_read_text(f"{url.rstrip('/')}/{EXPORT_CONFIG}"))
        return load_config(p, ignore_sections=("cluster",)).model


def _copy_full_into(target: Tensor, full: Tensor) -> None:
    """Copies this rank's part of the whole tensor `full` into `target` (a DTensor's local
    shard, as its placements give it; a plain tensor whole)."""
    from torch.distributed.tensor import DTensor

    if isinstance(target, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(
            target.shape, target.device_mesh, target.placements
        )
        index = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
        target.to_local().copy_(full[index])
    else:
        target.copy_(full)


@torch.no_grad()
def _load_export(model: Transformer, url: str) -> None:
    from safetensors.torch import load as st_load

    fs, path = fsspec.core.url_to_fs(f"{url.rstrip('/')}/{EXPORT_MODEL}")
    with fs.open(path, "rb") as f:
        full = st_load(f.read())
    # Experts appear under their global ids, this rank's only (trainer/moe.py).
    targets = model.state_dict()
    missing = sorted(set(targets) - set(full))
    if missing:
        raise ConfigError(
            f"distill.teacher ({url}) lacks {len(missing)} tensors of its own config's model, "
            f"e.g. {missing[:3]}"
        )
    for key, dst in targets.items():
        src = full[key]
        if tuple(src.shape) != tuple(dst.shape):
            raise ConfigError(
                f"distill.teacher ({url}): {key} is {list(src.shape)} in {EXPORT_MODEL}, "
                f"{list(dst.shape)} in the model its {EXPORT_CONFIG} describes"
            )
        _copy_full_into(dst, src.to(dst.dtype))


def build_teacher(cfg: JobConfig, *, mesh: Mesh, device: torch.device) -> Transformer:
    """The frozen teacher of `distill.teacher`, on this rank, laid out like the student.

    Raises:
        ConfigError: the teacher is missing or unreadable, its vocabulary differs from
            model.vocab_size, or its experts do not split over parallel.ep; every message
            names distill.teacher.
    """
    url = cfg.distill.teacher
    kind = teacher_kind(url)
    tcfg = teacher_model_config(url, kind)
    if tcfg.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"distill.teacher ({url}) has a vocabulary of {tcfg.vocab_size} tokens, "
            f"model.vocab_size is {cfg.model.vocab_size}: the KL compares the same tokens"
        )
    if tcfg.max_seq_len < cfg.train.seq_len:
        raise ConfigError(
            f"distill.teacher ({url}) takes sequences of at most {tcfg.max_seq_len} tokens, "
            f"train.seq_len is {cfg.train.seq_len}"
        )
    if tcfg.moe.num_experts % mesh.ep:
        raise ConfigError(
            f"distill.teacher ({url}) has {tcfg.moe.num_experts} experts, which do not split "
            f"over parallel.ep ({mesh.ep})"
        )
    teacher = build_model(tcfg)
    on_gpu = device.type == "cuda"
    # The student's layout (EP, then FSDP over the same mesh); no activation checkpointing
    # or compile: the teacher never runs a backward. Under FSDP on GPU it gathers its
    # shards as bf16, as the student does.
    parallelize(teacher, mesh, param_dtype=torch.bfloat16 if on_gpu and mesh.fsdp else None)
    # Every weight is overwritten below. Drawn from another seed than the student's, a
    # tensor the load missed would differ from the student's (a test with the student's own
    # initial weights as teacher would see a KL above 0), not hide behind an equal draw.
    materialize(teacher, device=device, seed=cfg.train.seed + 1)
    if kind == "export":
        _load_export(teacher, url)
    else:
        from trainer.init_from import load_hf_weights

        load_hf_weights(teacher, url, rank=mesh.rank)
    if on_gpu and not mesh.fsdp:
        teacher.to(torch.bfloat16)  # unsharded: the weights themselves become bf16
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class Distiller:
    """The teacher and the loss mix of `distill.*`; `loss` is called per micro-batch."""

    def __init__(self, cfg: JobConfig, *, mesh: Mesh, device: torch.device) -> None:
        self.alpha = cfg.distill.alpha
        self.temperature = cfg.distill.temperature
        self.teacher = build_teacher(cfg, mesh=mesh, device=device)

    def loss(
        self, inputs_BS: Tensor, student_logits_BSV: Tensor, lm: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(the mixed next-token loss that replaces `lm` in the step's loss, the KL part).

        `lm` is the student's mean cross-entropy on the batch; the teacher runs on the same
        `inputs_BS`, without gradients. Under expert parallelism every rank must call it.
        """
        with torch.no_grad():
            teacher_logits = self.teacher(inputs_BS).logits
        kl = kl_teacher_student(student_logits_BSV, teacher_logits, temperature=self.temperature)
        return (1 - self.alpha) * lm + self.alpha * kl, kl

    def reduce(self, kl: Tensor, mesh: Mesh) -> Tensor:
        """The KL averaged over the ranks (for the log; one small all-reduce per step)."""
        if mesh.world_size == 1:
            return kl
        kl = kl.detach().clone()
        dist.all_reduce(kl, group=mesh.group("world"))
        return kl / mesh.world_size


DISTILLER_KEY = "distiller"  # where `attach` keeps the Distiller in RunState.extra


def attach(state: RunState) -> None:
    """Builds the Distiller of `distill.*` into `state.extra` (nothing without a teacher)."""
    if state.cfg.distill.teacher:
        state.extra[DISTILLER_KEY] = Distiller(state.cfg, mesh=state.mesh, device=state.device)
