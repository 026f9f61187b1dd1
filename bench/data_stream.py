"""Streaming reader throughput against a raw sequential read of the same bytes, in one run.

Starts the local S3 endpoint (moto, as the tests do), writes a token dataset to it, then for
each I/O backend (fsspec/s3fs and pyarrow's S3 client):

- raw: every shard read whole, one after another, through that backend's client;
- reader: `ShardSource` streaming one full epoch (shuffled, checked, decoded, batched) at
  world size 1 through the same backend, the consumer taking batches as fast as it can.

It prints tokens/s and MB/s of both and their ratio (target: reader >= 0.8 x raw), the
reader's peak memory (its own accounting, and the process RSS growth sampled while it
runs) against its configured bound, and which backend was faster (what `data.io=auto`
uses). Last, it trains the tiny preset on shards from the endpoint and reports the loop's
data wait as a share of step time.

    python bench/data_stream.py [--mb 64] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from dataloader.config import DataConfig  # noqa: E402
from dataloader.format import write_dataset  # noqa: E402
from dataloader.reader import ShardSource  # noqa: E402
from dataloader.storage import open_storage  # noqa: E402
from tests.s3_server import S3Server  # noqa: E402

SEQ_LEN = 2048


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Samples the process RSS every 20 ms while active."""

    def __init__(self) -> None:
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.02)

    def __enter__(self) -> RssPeak:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def raw_read(url: str, io: str, shards: list[tuple[str, int]]) -> tuple[float, int]:
    """Each shard whole, in one ranged request, one after another."""
    storage = open_storage(url, io=io)
    t0 = time.perf_counter()
    n = sum(len(storage.read_range(path, 0, size)) for path, size in shards)
    return time.perf_counter() - t0, n


def raw_read_groups(url: str, io: str, groups: list[tuple[str, int, int]]) -> tuple[float, int]:
    """Each row group's byte range, one request each, one after another."""
    storage = open_storage(url, io=io)
    t0 = time.perf_counter()
    n = sum(len(storage.read_range(path, a, b)) for path, a, b in groups)
    return time.perf_counter() - t0, n


def reader_read(
    url: str, io: str, micro: int, overrides: dict[str, str]
) -> tuple[float, int, int, ShardSource, int]:
    fields = DataConfig.__dataclass_fields__
    extra = {k: type(getattr(DataConfig(), k))(v) for k, v in overrides.items() if k in fields}
    cfg = DataConfig(source="shards", path=url, io=io, **extra)
    src = ShardSource(cfg, seq_len=SEQ_LEN, micro_batch_size=micro, rank=0, world_size=1, seed=0)
    steps = src.order.num_rows // micro
    with RssPeak() as rss:
        t0 = time.perf_counter()
        for _ in range(steps):
            src.next_batch()
        dt = time.perf_counter() - t0
    src.close()
    return dt, steps * micro * (SEQ_LEN + 1), src.bytes_read, src, rss.peak - rss.base


def loop_wait(url_root: str, steps: int) -> dict:
    from dataloader.prepare import prepare
    from trainer.config import load_config
    from trainer.loop import run

    data = f"{url_root}/tiny-text"
    prepare(
        [str(Path(sysconfig.get_paths()["stdlib"]) / n) for n in ("json", "email", "asyncio")],
        data,
        seq_len=64,
        row_group_mb=0.25,
        progress=False,
    )
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            ROOT / "infra" / "runs" / "tiny.yaml",
            [
                "parallel.ep=1",
                f"train.steps={steps}",
                "data.source=shards",
                f"data.path={data}",
                f"run.output_dir={out}",
                "ops.stdout=false",
            ],
        )
        run(cfg)
        recs = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
    wait = [r["data_wait_s"] for r in recs]
    step = [r["step_time_s"] for r in recs]
    return {
        "steps": len(recs),
        "wait_share_all": sum(wait) / sum(step),
        "wait_share_after_first": sum(wait[1:]) / sum(step[1:]),
        "first_step_wait_s": wait[0],
        "median_step_s": float(np.median(step)),
        "max_wait_s_after_first": max(wait[1:]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=64.0, help="dataset size in MB")
    p.add_argument("--row-group-mb", type=float, default=1.0, help="as prepare's default")
    p.add_argument("--shard-mb", type=float, default=16.0, help="shard size in MiB")
    p.add_argument("--micro", type=int, default=8, help="rows per micro-batch")
    p.add_argument("--steps", type=int, default=40, help="training steps for the wait check")
    p.add_argument("--set", nargs="*", default=[], help="reader settings, e.g. prefetch_depth=16")
    p.add_argument("--repeat", type=int, default=3, help="interleaved raw/reader runs")
    p.add_argument("--no-loop", action="store_true", help="skip the training-loop check")
    args = p.parse_args()

    server = S3Server().start()
    os.environ.update(server.env())
    try:
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")
        row_bytes = (SEQ_LEN + 1) * 2
        num_rows = int(args.mb * 1e6) // row_bytes
        rng = np.random.default_rng(0)
        rows = rng.integers(0, 50_000, size=(num_rows, SEQ_LEN + 1), dtype=np.int32)
        url = "s3://bench/tokens"
        t0 = time.perf_counter()
        m = write_dataset(
            url,
            rows,
            tokenizer={"kind": "bench", "vocab_size": 50_000, "eod_id": 0},
            rows_per_group=int(args.row_group_mb * (1 << 20)) // row_bytes,
            rows_per_shard=int(args.shard_mb * (1 << 20)) // row_bytes,
        )
        del rows
        stored = sum(s.bytes for s in m.shards)
        print(
            f"dataset: {m.num_rows} rows x {m.row_len} tokens (uint16), {len(m.shards)} shards, "
            f"{stored / 1e6:.1f} MB stored, written in {time.perf_counter() - t0:.1f}s"
        )
        shards = [(s.path, s.bytes) for s in m.shards]
        groups = [(s.path, g.offset, g.offset + g.length) for s in m.shards for g in s.row_groups]
        tokens_per_byte = m.num_rows * m.row_len / stored
        overrides = dict(kv.split("=", 1) for kv in args.set)
        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        best = {}
        for io in ("fsspec", "arrow"):
            raw_read(url, io, shards[:1])  # warm the client and the server's path
            ratios, raws, rds = [], [], []
            for _ in range(args.repeat):  # interleaved, so load drifts hit both alike
                raw_s, raw_n = raw_read(url, io, shards)
                rd_s, rd_tokens, rd_bytes, src, rss_growth = reader_read(
                    url, io, args.micro, overrides
                )
                raw_tps, rd_tps = raw_n * tokens_per_byte / raw_s, rd_tokens / rd_s
                raws.append((raw_n / raw_s / 1e6, raw_tps))
                rds.append((rd_bytes / rd_s / 1e6, rd_tps))
                ratios.append(rd_tps / raw_tps)
            i = int(np.argsort(ratios)[len(ratios) // 2])  # the median run
            (raw_mbs, raw_tps), (rd_mbs, rd_tps) = raws[i], rds[i]
            best[io] = float(np.median([t for _, t in rds]))
            grp_s, grp_n = raw_read_groups(url, io, groups)
            print(f"\n[{io}] median of {args.repeat} interleaved runs")
            print(f"  raw sequential read: {raw_mbs:8.1f} MB/s  {raw_tps / 1e6:8.2f} M tokens/s")
            print(f"  reader (1 epoch):    {rd_mbs:8.1f} MB/s  {rd_tps / 1e6:8.2f} M tokens/s")
            print(
                f"  (second reference: raw, one request per row group: "
                f"{grp_n / grp_s / 1e6:.1f} MB/s, {len(groups)} requests)"
            )
            print(
                f"  reader / raw (tokens/s): {ratios[i]:.2f}  (target >= 0.80; all runs: "
                f"{', '.join(f'{r:.2f}' for r in ratios)})"
            )
            print(
                f"  bytes fetched / dataset: {src.bytes_read / stored:.2f}   "
                f"row groups read: {src.row_groups_read} of "
                f"{sum(len(s.row_groups) for s in m.shards)}   "
                f"requests: reader {src.requests}, raw {len(shards)}"
            )
            print(
                f"  memory: peak held {src.mem_peak_bytes / 1e6:.1f} MB, bound "
                f"{src.memory_bound_bytes / 1e6:.1f} MB "
                f"(ratio {src.mem_peak_bytes / src.memory_bound_bytes:.2f}); "
                f"process RSS growth while streaming {rss_growth / 1e6:.1f} MB; "
                f"dataset decoded {m.num_rows * m.row_len * 2 / 1e6:.1f} MB"
            )
        faster = max(best, key=best.get)
        medians = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in best.items())
        print(
            f"\nfaster reader backend: {faster} ({best[faster] / min(best.values()):.2f}x; "
            f"median reader M tokens/s: {medians})"
        )
        print(f"load average after: {os.getloadavg()[0]:.1f}")

        if args.no_loop:
            return 0
        w = loop_wait("s3://bench", args.steps)
        print(
            f"\n[training loop, tiny preset, shards from the S3 endpoint, {w['steps']} steps]\n"
            f"  data_wait_s / step_time_s: {w['wait_share_all'] * 100:.2f}% over all steps, "
            f"{w['wait_share_after_first'] * 100:.2f}% after the first "
            f"(first step waits {w['first_step_wait_s'] * 1e3:.1f} ms for the prefetch to start; "
            f"max later wait {w['max_wait_s_after_first'] * 1e3:.2f} ms; "
            f"median step {w['median_step_s'] * 1e3:.1f} ms)  (target < 2%)"
        )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
