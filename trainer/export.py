"""`moeyard export CHECKPOINT --out DIR [--format moeyard|hf]`: a sharded checkpoint as files
other tools read.

CHECKPOINT is a step directory (`.../checkpoints/step-NNNNNNNN`) or a run's output_dir (its
newest complete checkpoint), written at any EP/FSDP layout. DIR is any fsspec URL.

`--format moeyard` (the default): `model.safetensors`, the whole model's state dict with
experts under their global ids (the keys of `Transformer.state_dict()`), and `config.yaml`,
the run's resolved config. `load_exported` builds the model from both in one process. The
file streams too: its header comes from the checkpoint's metadata, then the tensors in
groups of at most `--max-shard-size`.

`--format hf`: a directory `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads
with no custom code: `config.json` (`MixtralForCausalLM`, `Qwen3MoeForCausalLM`,
`DeepseekV2ForCausalLM` or `DeepseekV3ForCausalLM`, picked from the model config; see
`trainer/hf.py` for which configurations have none and are refused; DeepSeek-V3's MTP
modules are written as the released checkpoints hold them, after the last layer),
`model-0000N-of-0000M.safetensors` shards with `model.safetensors.index.json`, and the
tokenizer files when the run's dataset was prepared with a tokenizer JSON.

The hf export streams: output shards are planned in the order the checkpoint stores its
tensors, and each shard's tensors are read with one DCP load, converted, written and
dropped before the next. Peak memory above the process's baseline is bounded by about
three shards (`--max-shard-size`, default 2 GiB: the bytes read, the converted copies, and
the read buffer) plus the largest single tensor, whatever the model's size; the tests
measure it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import tempfile
from typing import Any

import fsspec
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load as st_load
from safetensors.torch import save_file
from torch import Tensor
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from trainer.checkpoint import (
    CheckpointError,
    RangeReader,
    read_metadata,
    read_objects,
    resolve_checkpoint,
)
from trainer.config import ConfigError, JobConfig, load_config
from trainer.hf import (
    INDEX,
    ST_DTYPE_NAMES,
    HFError,
    TensorMap,
    architecture,
    hf_config,
    tensor_map,
    to_hf,
)
from trainer.model import Transformer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
DEFAULT_SHARD_BYTES = 2 << 30

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export(checkpoint: str, out: str, *, max_group_bytes: int = DEFAULT_SHARD_BYTES) -> str:
    """Writes `out/model.safetensors` and `out/config.yaml`; returns the checkpoint used.

    The file is written as it is read: its header comes from the checkpoint's metadata,
    then the tensors follow in storage order, loaded in groups of at most
    `max_group_bytes`, so memory holds one group, never the model.

    Raises:
        CheckpointError: `checkpoint` is not a complete checkpoint (nor a run holding one).
    """
    url = resolve_checkpoint(checkpoint)
    md = read_metadata(url)
    config_yaml = read_objects(url, ["meta.config"])["meta.config"]
    meta = md.state_dict_metadata
    keys = [k for k, m in meta.items() if k.startswith("model.")]
    keys = [k for k in keys if isinstance(meta[k], TensorStorageMetadata)]
    order = _storage_order(md, keys)
    keys.sort(key=lambda k: order.get(k, ("", 0)))
    header: dict[str, Any] = {"__metadata__": {"checkpoint": url}}
    groups: list[list[str]] = [[]]
    offset = group_bytes = 0
    for k in keys:
        m = meta[k]
        assert isinstance(m, TensorStorageMetadata)
        numel = 1
        for n in m.size:
            numel *= n
        nbytes = numel * m.properties.dtype.itemsize
        header[k[len("model.") :]] = {
            "dtype": ST_DTYPE_NAMES[m.properties.dtype],
            "shape": list(m.size),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
        if groups[-1] and group_bytes + nbytes > max_group_bytes:
            groups.append([])
            group_bytes = 0
        groups[-1].append(k)
        group_bytes += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data to 8 bytes
    fs, path = fsspec.core.url_to_fs(out)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/{MODEL_FILE}", "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for group in groups:
            request: dict[str, Any] = {}
            for k in group:
                m = meta[k]
                assert isinstance(m, TensorStorageMetadata)
                request[k] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
            dcp.load(request, storage_reader=RangeReader(url), no_dist=True)
            for k in group:
                t = request.pop(k).contiguous()
                f.write(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    with fs.open(f"{path}/{CONFIG_FILE}", "w") as f:
        f.write(config_yaml)
    return url


def _config_from_yaml(config_yaml: str) -> JobConfig:
    with tempfile.TemporaryDirectory() as d:
        cfg_path = os.path.join(d, CONFIG_FILE)
        with open(cfg_path, "w") as f:
            f.write(config_yaml)
        return load_config(cfg_path, ignore_sections=("cluster",))


def load_exported(out: str) -> Transformer:
    """The model of an export, on the CPU, in this process (EP=1, no process group)."""
    fs, path = fsspec.core.url_to_fs(out)
    with fs.open(f"{path}/{CONFIG_FILE}", "r") as f:
        cfg = _config_from_yaml(f.read())
    with fs.open(f"{path}/{MODEL_FILE}", "rb") as f:
        state = st_load(f.read())
    model = Transformer(cfg.model)
    model.load_state_dict(state, strict=True)
    return model


def _storage_order(md: Metadata, keys: list[str]) -> dict[str, tuple[str, int]]:
    """(file, byte offset) of each key's first stored chunk: reading in this order keeps
    each DCP load's ranged reads over bytes that are all wanted."""
    first: dict[str, tuple[str, int]] = {}
    for index, info in (md.storage_data or {}).items():
        where = (info.relative_path, info.offset)
        if index.fqn in keys and (index.fqn not in first or where < first[index.fqn]):
            first[index.fqn] = where
    return first


def plan_shards(
    specs: list[TensorMap], md: Metadata, out_dtype: torch.dtype, max_shard_bytes: int
) -> list[list[TensorMap]]:
    """Groups the tensors into output shards of at most `max_shard_bytes` (counting the
    larger of the stored and the written size), in storage order. A tensor larger than the
    bound gets a shard of its own."""
    meta = md.state_dict_metadata
    order = _storage_order(md, ["model." + s.key for s in specs])
    specs = sorted(specs, key=lambda s: order.get("model." + s.key, ("", 0)))
    shards: list[list[TensorMap]] = [[]]
    size = 0
    for s in specs:
        m = meta["model." + s.key]
        assert isinstance(m, TensorStorageMetadata)
        numel = 1
        for n in m.size:
            numel *= n
        nbytes = numel * max(m.properties.dtype.itemsize, out_dtype.itemsize)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    return [s for s in shards if s]


def _write_safetensors(fs: Any, path: str, tensors: dict[str, Tensor]) -> None:
    """Writes one safetensors file (through a local temporary file for remote storage)."""
    meta = {"format": "pt"}
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        save_file(tensors, path, metadata=meta)
        return
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, "shard.safetensors")
        save_file(tensors, local, metadata=meta)
        fs.put_file(local, path)


def export_hf(
    checkpoint: str,
    out: str,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
    """Writes a transformers checkpoint directory to `out` (see the module docstring).

    Args:
        checkpoint: a step directory or a run's output_dir (URL).
        out: the directory (URL) to write into.
        dtype: "fp32", "bf16" or "fp16"; None keeps the checkpoint's (fp32 master weights).
            Router weights stay fp32.
        max_shard_bytes: the most bytes one output shard holds (a single larger tensor gets
            a shard of its own).

    Returns:
        what was written: {"checkpoint", "architecture", "shards", "tensors", "bytes",
        "tokenizer"}.

    Raises:
        CheckpointError: not a complete checkpoint.
        HFError: a model configuration no transformers architecture computes.
    """
    url = resolve_checkpoint(checkpoint)
    md = read_metadata(url)
    cfg = _config_from_yaml(read_objects(url, ["meta.config"])["meta.config"])
    arch = architecture(cfg.model)
    specs = tensor_map(cfg.model, arch)
    meta = md.state_dict_metadata
    for s in specs:
        if "model." + s.key not in meta:
            raise CheckpointError(f"checkpoint {url} lacks model.{s.key} (needed for {s.hf})")
    stored = meta["model.embed.weight"]
    assert isinstance(stored, TensorStorageMetadata)
    out_dtype = _DTYPES[dtype] if dtype else stored.properties.dtype
    shards = plan_shards(specs, md, out_dtype, max_shard_bytes)
    fs, path = fsspec.core.url_to_fs(out)
    path = path.rstrip("/")
    fs.makedirs(path, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        request: dict[str, Any] = {}
        for s in shard:  # a key twice in a shard (a shared tensor's copy) is read once
            m = meta["model." + s.key]
            assert isinstance(m, TensorStorageMetadata)
            request["model." + s.key] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
        dcp.load(request, storage_reader=RangeReader(url), no_dist=True)
        tensors: dict[str, Tensor] = {}
        for s in shard:
            t = to_hf(request["model." + s.key], s, cfg.model)
            keep_fp32 = s.key.endswith(("router.weight", "router.expert_bias"))
            t = t.to(torch.float32 if keep_fp32 else out_dtype).contiguous()
            if s.shared:  # safetensors writes no two names over one storage
                t = t.clone()
            tensors[s.hf] = t
            weight_map[s.hf] = name
            total += t.numel() * t.element_size()
        _write_safetensors(fs, f"{path}/{name}", tensors)
        del tensors, request
    with fs.open(f"{path}/{INDEX}", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    tok = _export_tokenizer(cfg, fs, path)
    eos = tok["eod_id"] if tok else None
    with fs.open(f"{path}/config.json", "w") as f:
        json.dump(hf_config(cfg.model, dtype=out_dtype, eos_token_id=eos), f, indent=1)
    return {
        "checkpoint": url,
        "architecture": arch,
        "shards": len(shards),
        "tensors": len(weight_map),
        "bytes": total,
        "tokenizer": tok["name"] if tok else None,
    }


def _dataset_tokenizer(cfg: JobConfig) -> dict[str, Any] | None:
    """The tokenizer record of the run's dataset manifest, or None (the corpus source, or
    no manifest to read)."""
    from dataloader.format import MANIFEST

    root = getattr(cfg.data, "path", "")
    if not root:
        return None
    url = f"{str(root).rstrip('/')}/{MANIFEST}"
    try:
        fs, p = fsspec.core.url_to_fs(root)
        with fs.open(f"{p.rstrip('/')}/{MANIFEST}", "r") as f:
            return dict(json.load(f).get("tokenizer") or {})
    except FileNotFoundError:
        return None
    except Exception as e:  # any store's error: the weights still export
        # The dataset may be gone or out of reach (a local S3 endpoint that was stopped, no
        # credentials here): the weights do not depend on it, so they still go out.
        print(
            f"export: could not read the dataset manifest {url} (data.path) to find the "
            f"run's tokenizer ({type(e).__name__}: {e}); no tokenizer files written. If the "
            "run used a Hugging Face tokenizer, copy its tokenizer.json next to the weights",
            flush=True,
        )
        return {"kind": "unreadable"}


def _export_tokenizer(cfg: JobConfig, fs: Any, path: str) -> dict[str, Any] | None:
    """Copies the run's tokenizer JSON (checked against the manifest's sha256) and writes a
    tokenizer_config.json; returns the manifest's tokenizer record, or None with a note when
    the run used moeyard's byte tokenizer."""
    tok = _dataset_tokenizer(cfg)
    if tok and tok.get("kind") == "unreadable":
        return None
    if not tok or tok.get("kind") != "hf":
        print(
            "export: the run used moeyard's byte tokenizer (ids 0-255 are bytes, 256 ends a "
            "document) or no dataset manifest was found; no tokenizer files written",
            flush=True,
        )
        return None
    src = str(tok["path"])
    with fsspec.open(src, "rb") as f:
        raw = f.read()
    if tok.get("sha256") and hashlib.sha256(raw).hexdigest() != tok["sha256"]:
        raise HFError(
            f"tokenizer {src} changed since the dataset was prepared (sha256 differs from the "
            "manifest's); the exported model would decode with another vocabulary"
        )
    with fs.open(f"{path}/tokenizer.json", "wb") as f:
        f.write(raw)
    from tokenizers import Tokenizer

    eod = Tokenizer.from_str(raw.decode("utf-8")).id_to_token(int(tok["eod_id"]))
    with fs.open(f"{path}/tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eod}, f, indent=1)
    return tok


def _size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "KIB": 1 << 10}
    units |= {"MIB": 1 << 20, "GIB": 1 << 30}
    t = text.strip().upper()
    digits = t.rstrip("KMGIB")
    try:
        return int(float(digits) * units[t[len(digits) :]])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(
            f"--max-shard-size {text!r}: use e.g. 2GB, 500MB"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moeyard export",
        description="Write a sharded checkpoint as one safetensors file plus its config "
        "(--format moeyard), or as a transformers model directory (--format hf).",
    )
    parser.add_argument("checkpoint", help="a step directory or a run's output_dir (URL)")
    parser.add_argument("--out", required=True, help="directory (URL) to write into")
    parser.add_argument("--format", choices=("moeyard", "hf"), default="moeyard")
    parser.add_argument(
        "--dtype",
        choices=tuple(_DTYPES),
        default=None,
        help="hf: weights dtype (default: as stored)",
    )
    parser.add_argument(
        "--max-shard-size",
        type=_size,
        default=DEFAULT_SHARD_BYTES,
        help="bytes per output shard (hf) or per read (moeyard); 2GB",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.format == "moeyard" and args.dtype:
        parser.error("--dtype applies to --format hf only")
    try:
        if args.format == "hf":
            done = export_hf(
                args.checkpoint, args.out, dtype=args.dtype, max_shard_bytes=args.max_shard_size
            )
            print(
                f"exported {done['checkpoint']} -> {args.out.rstrip('/')} as "
                f"{done['architecture']}: {done['tensors']} tensors, {done['bytes']} bytes in "
                f"{done['shards']} shards",
                flush=True,
            )
            return 0
        url = export(args.checkpoint, args.out, max_group_bytes=args.max_shard_size)
    except (CheckpointError, ConfigError, HFError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    print(f"exported {url} -> {args.out.rstrip('/')}/{MODEL_FILE}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
