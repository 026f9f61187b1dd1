"""What the `moeyard` commands check before they start: the preset, the run directory, the
Ray address. Each check fails with a message that says what is wrong and how to fix it.

- `resolve_preset("tiny")` -> `infra/runs/tiny.yaml`; a path to a YAML file is taken as it
  is; an unknown name lists the presets in `infra/runs/` (and the closest match).
- `check_run_dir(url)` accepts a run's output_dir (it holds `metrics.jsonl`, `config.yaml`,
  `summary.json` or `checkpoints/`) or a checkpoint step directory (`.metadata`); anything
  else fails, listing the runs that do exist beside it.
- `ray_address_hint(address)` is the advice to print when nothing answers at a Ray address.

`cluster/cli.py` applies the first two to the commands that take a preset or a run directory
(`PRESET_ARG`, `RUN_DIR_ARG` there); entrypoints run outside the `moeyard` command
(`python -m cluster.launch`) call them themselves.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import fsspec

from trainer.config import ConfigError

PRESETS_DIR = Path(__file__).resolve().parent.parent / "infra" / "runs"
PRESET_SUFFIXES = (".yaml", ".yml")
# Files whose presence makes a folder a run's output_dir (see README: run.output_dir).
RUN_MARKERS = ("metrics.jsonl", "config.yaml", "summary.json", "checkpoints")
CHECKPOINT_MARKER = ".metadata"  # a complete checkpoint step directory


class PresetError(ConfigError):
    """An unknown preset name or a preset file that does not exist."""


class RunDirError(ValueError):
    """A run directory that holds no run; the message lists the runs beside it."""


def available_presets(presets_dir: Path = PRESETS_DIR) -> list[str]:
    """The preset names (file stems) in `presets_dir`, sorted."""
    if not presets_dir.is_dir():
        return []
    return sorted(p.stem for p in presets_dir.iterdir() if p.suffix in PRESET_SUFFIXES)


def resolve_preset(name_or_path: str, *, presets_dir: Path = PRESETS_DIR) -> Path:
    """The YAML file for a preset name (`tiny`) or path (`infra/runs/tiny.yaml`).

    A name without a path separator or YAML suffix is looked up in `presets_dir`; anything
    else must be an existing file.

    Raises:
        PresetError: no such file or preset; the message lists the presets in `presets_dir`
            and suggests the closest name.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    is_name = path.suffix not in PRESET_SUFFIXES and len(path.parts) == 1
    if is_name:
        for suffix in PRESET_SUFFIXES:
            candidate = presets_dir / f"{name_or_path}{suffix}"
            if candidate.is_file():
                return candidate
    names = available_presets(presets_dir)
    what = f"unknown preset {name_or_path!r}" if is_name else f"preset file {path} does not exist"
    close = difflib.get_close_matches(path.stem, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    listing = ", ".join(names) if names else "none"
    raise PresetError(
        f"{what}{hint}. Presets in {_shown(presets_dir)}: {listing}. Give one of those names "
        "or the path of a YAML file."
    )


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is inside it (shorter messages)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _runs_beside(fs: fsspec.AbstractFileSystem, parent: str) -> list[str]:
    try:
        entries = fs.ls(parent, detail=True)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    runs = []
    for e in entries:
        if e.get("type") != "directory":
            continue
        path = e["name"].rstrip("/")
        if any(fs.exists(f"{path}/{m}") for m in RUN_MARKERS):
            runs.append(path.rsplit("/", 1)[-1])
    return sorted(runs)


def check_run_dir(url: str) -> None:
    """Checks that `url` (a local path or fsspec URL) is a run's output_dir or a checkpoint.

    Raises:
        RunDirError: it is neither; the message names the URL, what was looked for, and the
            runs that exist in its parent folder.
    """
    fs, path = fsspec.core.url_to_fs(url)
    path = path.rstrip("/")
    fs.invalidate_cache()
    if any(fs.exists(f"{path}/{m}") for m in (*RUN_MARKERS, CHECKPOINT_MARKER)):
        return
    parent_path = path.rsplit("/", 1)[0] if "/" in path else "."
    parent_path = parent_path or "/"
    trimmed = url.rstrip("/")
    parent = (trimmed.rsplit("/", 1)[0] or "/") if "/" in trimmed else "."
    runs = _runs_beside(fs, parent_path)
    why = "holds no run" if fs.exists(path) else "does not exist"
    if runs:
        fix = f"runs in {parent}: {', '.join(runs)}"
    elif fs.exists(parent_path):
        fix = f"{parent} holds no run either"
    else:
        fix = f"{parent} does not exist either"
    raise RunDirError(
        f"{url} {why}: a run directory holds one of {', '.join(RUN_MARKERS)}, a checkpoint "
        f"holds {CHECKPOINT_MARKER}. Give the run.output_dir the run was started with; {fix}"
    )


def ray_address_hint(address: str) -> str:
    """What to try when nothing answers at the Ray `address` (host:port or http URL)."""
    return (
        f"nothing answers at {address}. Check that the head node is up (`ray status --address "
        f"{address}` on a node of the cluster); on one machine start one with `ray start --head`; "
        "otherwise point RAY_ADDRESS (or cluster.ray_address) at the head's GCS (port 6379) for "
        "`python -m cluster.launch`, or at its dashboard (http://HEAD:8265) for `ray job submit`"
    )
