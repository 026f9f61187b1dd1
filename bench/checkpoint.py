"""Checkpoint save and load throughput against raw writes and reads of the same bytes, and
the time an asynchronous save blocks the loop, in one run.

Starts the local S3 endpoint (moto, as the tests do), builds the tiny preset scaled up
(`--dim`, `--layers`, `--experts`), takes one optimizer step so the AdamW moments exist,
then, each `--repeat` times:

- save: a synchronous checkpoint (`checkpoint.async_save=false`) to the endpoint; raw: the
  same number of bytes written as one object through the same client (s3fs);
- load: the checkpoint loaded back into the live state; raw: the shard object read whole;
- async: the loop's blocked time in `Checkpointer.save` with `async_save=true` (the CPU
  snapshot), the background write then awaited outside the timing.

It prints MB/s of each and the ratios (targets: save >= 0.7 x raw write; async blocked time
<= 0.1 x the synchronous save time), medians over the repeats.

    python bench/checkpoint.py [--dim 256] [--layers 4] [--experts 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import fsspec  # noqa: E402

from tests.s3_server import S3Server  # noqa: E402
from trainer.checkpoint import Checkpointer, load_into, step_url  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.loop import setup, train_step  # noqa: E402

MB = 1e6


def shard_bytes(url: str) -> tuple[int, list[str]]:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    files = fs.ls(path, detail=False)
    return sum(fs.size(p) for p in files), files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    server = S3Server().start()
    os.environ.update(server.env())
    try:
        fs, _ = fsspec.core.url_to_fs("s3://bench")
        fs.mkdir("bench")
        out = "s3://bench/run"
        cfg = load_config(
            ROOT / "infra" / "runs" / "tiny.yaml",
            [
                f"model.dim={args.dim}",
                f"model.num_layers={args.layers}",
                f"model.moe.num_experts={args.experts}",
                f"model.moe.expert_hidden={2 * args.dim}",
                f"model.dense_hidden={4 * args.dim}",
                "parallel.ep=1",
                "train.seq_len=32",
                "train.micro_batch_size=2",
                "data.corpus_max_bytes=60000",
                f"run.output_dir={out}",
                "checkpoint.every=1",
                "checkpoint.keep_last=100",
            ],
            ignore_sections=("cluster",),
        )
        state = setup(cfg)
        train_step(state)
        params = sum(p.numel() for p in state.model.parameters())
        print(f"model: {params / 1e6:.1f}M parameters (+ 2 AdamW moments each), fp32")

        cfg.checkpoint.async_save = False
        sync = Checkpointer(cfg.checkpoint, out, state.mesh)
        cfg_async = type(cfg.checkpoint)(**{**vars(cfg.checkpoint), "async_save": True})
        asy = Checkpointer(cfg_async, out, state.mesh)
        raw_url = "s3://bench/raw/blob"
        raw_fs, raw_path = fsspec.core.url_to_fs(raw_url)

        save_s, raw_w_s, load_s, raw_r_s, blocked_s = [], [], [], [], []
        nbytes = 0
        for i in range(args.repeat):
            state.step = 1000 + i
            t0 = time.perf_counter()
            sync.save(state)
            save_s.append(time.perf_counter() - t0)
            url = step_url(out, state.step)
            nbytes, files = shard_bytes(url)
            payload = os.urandom(1 << 20) * (nbytes // (1 << 20)) + os.urandom(nbytes % (1 << 20))
            t0 = time.perf_counter()
            with raw_fs.open(raw_path, "wb") as f:
                f.write(payload)
            raw_w_s.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            load_into(state, url)
            load_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            raw_fs.cat_file(raw_path)
            raw_r_s.append(time.perf_counter() - t0)

            state.step = 2000 + i
            t0 = time.perf_counter()
            asy.save(state)
            blocked_s.append(time.perf_counter() - t0)
            asy.wait()
            train_step(state)  # the state moves on between checkpoints, as in training
        asy.close()

        med = statistics.median
        mb = nbytes / MB
        print(
            f"checkpoint bytes: {mb:.1f} MB in {len(files)} objects ({args.repeat} repeats, medians)"
        )
        print(
            f"save  {mb / med(save_s):8.1f} MB/s   raw write {mb / med(raw_w_s):8.1f} MB/s   "
            f"ratio {med(raw_w_s) / med(save_s):.2f} (target >= 0.7)"
        )
        print(
            f"load  {mb / med(load_s):8.1f} MB/s   raw read  {mb / med(raw_r_s):8.1f} MB/s   "
            f"ratio {med(raw_r_s) / med(load_s):.2f}"
        )
        print(
            f"async blocked {med(blocked_s) * 1e3:.1f} ms per checkpoint vs sync save "
            f"{med(save_s) * 1e3:.1f} ms: ratio {med(blocked_s) / med(save_s):.3f} (target <= 0.1)"
        )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
