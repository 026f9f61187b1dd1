"""`python -m trainer.train CONFIG [key=value ...]`, alone or under torchrun.

`--dry-run` sizes the job instead of training it (no GPU, no process group; see
`trainer/dryrun.py`); `--json` prints that sizing as one JSON object.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

from trainer.config import ConfigError, JobConfig, load_config


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    flags = {a for a in args if a in ("--dry-run", "--json")}
    args = [a for a in args if a not in flags]
    if not args or args[0] in ("-h", "--help"):
        print(
            "usage: python -m trainer.train CONFIG.yaml [key=value ...] [--dry-run [--json]]",
            file=sys.stderr,
        )
        return 2
    if "--json" in flags and "--dry-run" not in flags:
        print("--json goes with --dry-run", file=sys.stderr)
        return 2
    if "--dry-run" in flags:
        from trainer import dryrun

        try:
            cfg: JobConfig = load_config(args[0], args[1:], ignore_sections=("cluster",))
            return dryrun.main(cfg, json_out="--json" in flags)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
    # Imported here so that a dry run does not load the training loop and its dependencies.
    from dataloader.format import ManifestError
    from dataloader.storage import DataError
    from ops.config import OpsConfigError
    from trainer.checkpoint import CheckpointError
    from trainer.guard import TrainingDiverged
    from trainer.loop import run

    try:
        cfg = load_config(args[0], args[1:], ignore_sections=("cluster",))
        summary = run(cfg, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    except (ConfigError, OpsConfigError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (DataError, ManifestError, CheckpointError, TrainingDiverged) as e:
        # Errors a user can act on: the message names the file, URL or setting; no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary.world_size == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(
            f"done: {summary.steps} steps, final loss {summary.final_loss:.4f}, "
            f"{summary.tokens_per_s:.0f} tokens/s, outputs in {summary.output_dir}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
