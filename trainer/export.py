"""`moeyard export CHECKPOINT --out DIR`: one consolidated safetensors file from a sharded
checkpoint.

CHECKPOINT is a step directory (`.../checkpoints/step-NNNNNNNN`) or a run's output_dir (its
newest complete checkpoint). DIR (any fsspec URL) receives `model.safetensors`, the whole
model's state dict with experts under their global ids (the keys of
`Transformer.state_dict()`), and `config.yaml`, the run's resolved config. `load_exported`
builds the model from both in one process, with no process group.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import fsspec
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from trainer.checkpoint import (
    CheckpointError,
    consolidated_model_state,
    read_objects,
    resolve_checkpoint,
)
from trainer.config import ConfigError, load_config
from trainer.model import Transformer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


def export(checkpoint: str, out: str) -> str:
    """Writes `out/model.safetensors` and `out/config.yaml`; returns the checkpoint used.

    Raises:
        CheckpointError: `checkpoint` is not a complete checkpoint (nor a run holding one).
    """
    url = resolve_checkpoint(checkpoint)
    tensors = {k: v.contiguous() for k, v in consolidated_model_state(url).items()}
    config_yaml = read_objects(url, ["meta.config"])["meta.config"]
    fs, path = fsspec.core.url_to_fs(out)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/{MODEL_FILE}", "wb") as f:
        f.write(st_save(tensors, metadata={"checkpoint": url}))
    with fs.open(f"{path}/{CONFIG_FILE}", "w") as f:
        f.write(config_yaml)
    return url


def load_exported(out: str) -> Transformer:
    """The model of an export, on the CPU, in this process (EP=1, no process group)."""
    fs, path = fsspec.core.url_to_fs(out)
    with fs.open(f"{path}/{CONFIG_FILE}", "r") as f:
        config_yaml = f.read()
    with tempfile.TemporaryDirectory() as d:
        cfg_path = os.path.join(d, CONFIG_FILE)
        with open(cfg_path, "w") as f:
            f.write(config_yaml)
        cfg = load_config(cfg_path, ignore_sections=("cluster",))
    with fs.open(f"{path}/{MODEL_FILE}", "rb") as f:
        state = st_load(f.read())
    model = Transformer(cfg.model)
    model.load_state_dict(state, strict=True)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moeyard export",
        description="Write a sharded checkpoint as one safetensors file plus its config.",
    )
    parser.add_argument("checkpoint", help="a step directory or a run's output_dir (URL)")
    parser.add_argument("--out", required=True, help="directory (URL) to write into")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        url = export(args.checkpoint, args.out)
    except (CheckpointError, ConfigError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    print(f"exported {url} -> {args.out.rstrip('/')}/{MODEL_FILE}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
