"""`python -m trainer.train CONFIG [key=value ...]`, alone or under torchrun."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

from trainer.config import ConfigError, load_config
from trainer.loop import run


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m trainer.train CONFIG.yaml [key=value ...]", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args[0], args[1:], ignore_sections=("cluster",))
        summary = run(cfg, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
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
