"""The Weights & Biases sink (`ops.wandb`): one W&B run per moeyard run, written by rank 0.

Each logged step sends every scalar of the record (tags in ops/trackers.py) at W&B step =
the training step; the resolved config is the run config; the expert-load heat map (MoE
layers x experts, each expert's tokens over its layer's mean) is an image at every
evaluation step and every `ops.wandb_image_every` logged steps.

One run, one curve: the run id is kept in `run.output_dir/wandb_run.json`, so a restarted
or resumed job opens the same run (`resume="allow"`). W&B keeps a run's steps increasing
and has no public way to take steps back, so a step W&B already holds is not sent again:
online, W&B says after `init` which step comes next, and a resumed attempt starts there
(the steps between its checkpoint and that step keep the values the stopped attempt sent);
a loss-guard rollback likewise sends nothing until it passes the last step it sent. Offline,
each attempt is a folder `offline-run-*-ID` of the same run id under the local W&B dir, and
`wandb sync` uploads them in order.

The API key comes from the environment (`WANDB_API_KEY`), where W&B itself reads it; this
module never reads its value, and no config or record carries it.

`wandb.log` costs about a millisecond per step of the tiny preset, so a worker thread sends
the records: `log` hands it the flattened scalars and returns.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import string
import sys
import tempfile
import threading
from typing import Any

import fsspec

from ops.config import OpsConfig, OpsConfigError
from ops.trackers import expert_load, import_tracker, is_local, load_share, scalars

RUN_FILE = "wandb_run.json"
IMAGE_KEY = "moe/expert_load"
CELL_PX = 16  # pixels per (layer, expert) cell of the heat map
_DONE = None


def heatmap(loads: list[list[int]]) -> Any:
    """The heat map of a record's expert load: an RGB uint8 array of (layers x CELL_PX) by
    (experts x CELL_PX) pixels; colour = the expert's tokens over its layer's mean on
    matplotlib's viridis, from 0 (dark purple) through 1 (an even load, teal) to 2 or more
    (yellow)."""
    import matplotlib
    import numpy as np

    share = np.array([load_share(t) for t in loads], dtype=np.float64)
    rgb = matplotlib.colormaps["viridis"](np.clip(share / 2.0, 0.0, 1.0))[..., :3]
    img = (rgb * 255).round().astype(np.uint8)
    return img.repeat(CELL_PX, axis=0).repeat(CELL_PX, axis=1)


def local_dir(cfg: OpsConfig, output_dir: str, run_name: str) -> str:
    """Where W&B writes its files: `ops.wandb_dir`, else a local output dir, else a folder
    under the system's temporary directory named after the run."""
    if cfg.wandb_dir:
        return cfg.wandb_dir
    fs, path = fsspec.core.url_to_fs(output_dir)
    if is_local(fs):
        return path
    return os.path.join(tempfile.gettempdir(), "moeyard-wandb", run_name)


def new_run_id() -> str:
    """8 random lowercase letters and digits, as W&B's own ids."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def run_id(output_dir: str, *, project: str, entity: str) -> str:
    """The run's W&B id, from `run.output_dir/wandb_run.json`; made and written there on the
    first start."""
    fs, path = fsspec.core.url_to_fs(f"{output_dir.rstrip('/')}/{RUN_FILE}")
    if fs.exists(path):
        with fs.open(path, "r") as f:
            return str(json.load(f)["id"])
    rid = new_run_id()
    fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump({"id": rid, "project": project, "entity": entity}, f)
    return rid


class WandbSink:
    """A metric sink (`log`, `close`) that sends records to a W&B run.

    Args:
        cfg: the `ops` section (wandb_project, wandb_entity, wandb_mode, wandb_dir,
            wandb_image_every).
        output_dir: run.output_dir (the run id is kept there).
        run_name: run.name, the W&B run's display name.
        config: the resolved config as a dict, the run config.

    Raises:
        OpsConfigError: wandb is not installed, or `ops.wandb_mode` is online without
            WANDB_API_KEY in the environment.
    """

    def __init__(
        self,
        cfg: OpsConfig,
        *,
        output_dir: str,
        run_name: str,
        config: dict[str, Any],
    ) -> None:
        wandb = import_tracker("wandb", key="ops.wandb", package="wandb")
        if cfg.wandb_mode == "online" and not os.environ.get("WANDB_API_KEY"):
            raise OpsConfigError(
                "ops.wandb_mode is 'online' but WANDB_API_KEY is not set in the environment "
                "of rank 0 (under Ray: the environment `ray start` was run with on each node); "
                "set it there, or use ops.wandb_mode=offline and `wandb sync` later"
            )
        self._wandb = wandb
        self.dir = local_dir(cfg, output_dir, run_name)
        os.makedirs(self.dir, exist_ok=True)
        self.id = run_id(
            output_dir,
            project=cfg.wandb_project,
            entity=cfg.wandb_entity,
        )
        self.run = wandb.init(
            project=cfg.wandb_project,
            entity=cfg.wandb_entity or None,
            id=self.id,
            resume="allow",
            mode=cfg.wandb_mode,
            dir=self.dir,
            name=run_name,
            config=config,
            # moeyard's own output goes to stdout and the job logs; W&B gets the metrics.
            settings=wandb.Settings(console="off"),
        )
        # The first step W&B takes: online, the one after what the run already holds (0 for
        # a new run, and offline).
        self.next_step = int(self.run.step)
        self.image_every = cfg.wandb_image_every
        self.skipped: list[int] = []
        self._logged = 0
        self._error: BaseException | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1000)
        self._thread = threading.Thread(target=self._send, name="moeyard-wandb", daemon=True)
        self._thread.start()
        print(
            f"W&B run {self.id} ({cfg.wandb_mode}, project {cfg.wandb_project}): its files are "
            f"in {os.path.dirname(self.run.dir)}"
            + (f"; it holds the steps before {self.next_step}" if self.next_step else ""),
            flush=True,
        )

    def _send(self) -> None:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self._error is not None:
                continue  # drain, so that log() never blocks on a dead sender
            step, data, loads = item
            try:
                if loads:
                    data[IMAGE_KEY] = self._wandb.Image(
                        heatmap(loads),
                        caption=(
                            f"expert load at step {step}: rows = MoE layers 0..{len(loads) - 1}, "
                            f"columns = experts 0..{len(loads[0]) - 1}; colour = tokens over "
                            "the layer's mean, viridis: 0 dark purple, 1 (even) teal, "
                            ">= 2 yellow"
                        ),
                    )
                self.run.log(data, step=step)
            except BaseException as e:  # raised in log() or close(), never lost
                self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the W&B sink failed: {self._error!r}") from self._error

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._raise()
        if step < self.next_step:
            self.skipped.append(step)  # W&B holds this step already
            return
        self.next_step = step + 1
        self._logged += 1
        image = "val_loss" in metrics or (
            self.image_every > 0 and self._logged % self.image_every == 0
        )
        self._queue.put((step, scalars(metrics), expert_load(metrics) if image else None))

    def close(self) -> None:
        # Called from the loop's `finally`: an exception on its way out means the run failed.
        failed = sys.exc_info()[0] is not None
        self._queue.put(_DONE)
        self._thread.join()
        self.run.finish(exit_code=1 if failed or self._error is not None else 0)
        if self.skipped:
            print(
                f"W&B run {self.id}: steps {self.skipped[0]}..{self.skipped[-1]} were not sent "
                "again (W&B held them already; its steps only increase)",
                flush=True,
            )
        self._raise()
