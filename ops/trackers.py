"""What the experiment-tracker sinks (TensorBoard, Weights & Biases) share: the record
flattened into named scalars, the optional import of a tracker's package, and the
expert-load matrix of a record.

Tag names follow the record's own keys, so a tag leads back to its `metrics.jsonl` field:
- a top-level number `k` is `train/k`, or `val/k` when `k` starts with `val_`;
- a per-MoE-layer number `k` of layer i is `moe/layer{i}/k`;
- a per-rank device number `k` of rank r (power, utilization, energy, ...) is
  `devices/rank{r}/k`;
- a number inside a dict (a data mix's per-dataset figures) is its path of keys:
  `data_mix/{name}/k`.
Booleans become 0 or 1; strings and lists (a layer's tokens per expert, the names of a
GPU's clock events) are not scalars and are left out.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Any

from ops.config import OpsConfigError

EXTRA = "moeyard[trackers]"
# Keys of the per-item dicts that name the item rather than measure it.
_ITEM_IDS = {"moe": "layer", "devices": "rank"}


def import_tracker(module: str, *, key: str, package: str) -> ModuleType:
    """Imports a tracker's package, only when its sink is switched on.

    Raises:
        OpsConfigError: the package is not installed; names the key that asked for it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise OpsConfigError(
            f"{key} is true but the package {package!r} is not installed ({e}); install it "
            f"with `pip install '{EXTRA}'` or switch {key} off"
        ) from None


def is_local(fs: Any) -> bool:
    """Whether an fsspec filesystem is this machine's own."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float):
        return float(v)
    return None


def _walk(prefix: str, v: Any, out: dict[str, float]) -> None:
    x = _number(v)
    if x is not None:
        out[prefix] = x
    elif isinstance(v, dict):
        for k, sub in v.items():
            _walk(f"{prefix}/{k}", sub, out)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """Every number of a metrics record by its tag (see the module docstring)."""
    out: dict[str, float] = {}
    for k, v in record.items():
        x = _number(v)
        if x is not None:
            out[f"{'val' if k.startswith('val_') else 'train'}/{k}"] = x
        elif k in _ITEM_IDS and isinstance(v, list):
            id_key = _ITEM_IDS[k]
            for item in v:
                _walk(
                    f"{k}/{id_key}{item[id_key]}",
                    {ik: iv for ik, iv in item.items() if ik != id_key},
                    out,
                )
        elif isinstance(v, dict):
            _walk(k, v, out)
    return out


def expert_load(record: dict[str, Any]) -> list[list[int]]:
    """Tokens per expert of each MoE layer, [layer][expert]; empty without MoE layers."""
    return [list(layer["tokens"]) for layer in record.get("moe", ())]


def load_share(tokens: list[int]) -> list[float]:
    """Each expert's tokens over the layer's mean (1 = a perfectly even load)."""
    mean = math.fsum(tokens) / len(tokens) if tokens else 0.0
    return [t / mean if mean > 0 else 0.0 for t in tokens]
