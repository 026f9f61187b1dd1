"""`moeyard prepare`: text, JSONL and Parquet inputs -> shards + manifest on the local S3
endpoint, read back (whole shards and through the streaming reader) to the same tokens;
restart after an interruption; the optional Hugging Face tokenizer."""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from cluster.cli import main as cli
from dataloader import format as fmt
from dataloader.config import DataConfig
from dataloader.prepare import prepare
from dataloader.reader import ManifestError, ShardSource
from dataloader.tokenizer import EOD_ID, ByteTokenizer, load_tokenizer

DOCS_TXT = {"a.txt": "first document\nwith two lines\n", "sub/b.md": "second: ünïcode ✓\n"}
DOCS_JSONL = ["jsonl one", "jsonl two, a little longer than the first"]
DOCS_PARQUET = ["parquet row one", "parquet row two"]


def make_inputs(tmp_path) -> tuple[list[str], list[str]]:
    """Input paths and the documents they hold, in the order prepare reads them."""
    folder = tmp_path / "texts"
    for name, text in DOCS_TXT.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    (folder / ".hidden").write_text("never read")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(DOCS_JSONL))
    )
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": DOCS_PARQUET, "n": [1, 2]}), parquet)
    docs = [DOCS_TXT["a.txt"], DOCS_TXT["sub/b.md"], *DOCS_JSONL, *DOCS_PARQUET]
    return [str(folder), str(jsonl), str(parquet)], docs


def expected_rows(docs: list[str], tok, row_len: int) -> np.ndarray:
    stream = np.concatenate([np.append(tok.encode(d), tok.eod_id) for d in docs])
    n = len(stream) // row_len
    return stream[: n * row_len].reshape(n, row_len)


def all_rows(url: str) -> tuple[fmt.Manifest, np.ndarray]:
    fs, root = s3fs.S3FileSystem(skip_instance_cache=True), url.removeprefix("s3://")
    m = fmt.read_manifest(fs, root)
    return m, np.concatenate([fmt.read_shard_rows(fs, root, s, m) for s in m.shards])


def test_prepare_round_trips_to_the_same_tokens(tmp_path, s3_bucket, capsys) -> None:
    inputs, docs = make_inputs(tmp_path)
    # The JSONL input is read from the S3 endpoint, the rest from local files.
    s3fs.S3FileSystem(skip_instance_cache=True).put_file(inputs[1], f"{s3_bucket}/in/docs.jsonl")
    inputs[1] = f"{s3_bucket}/in/docs.jsonl"
    out = f"{s3_bucket}/ds"
    rc = cli(["prepare", *inputs, "--out", out, "--seq-len", "15", "--rows-per-group", "2",
              "--shard-mb", "0.0001"])  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    assert "tokens/s" in err and "MB" in err  # the progress bar
    m, rows = all_rows(out)
    want = expected_rows(docs, ByteTokenizer(), 16)
    np.testing.assert_array_equal(rows, want)
    assert m.row_len == 16 and m.seq_len == 15 and m.dtype == "uint16"
    assert m.tokenizer == {"kind": "bytes", "name": "bytes", "vocab_size": 257, "eod_id": EOD_ID}
    assert len(m.shards) > 1 and all(len(s.row_groups) >= 1 for s in m.shards)
    assert (rows == EOD_ID).sum() >= len(docs) - 1  # documents are separated
    assert "never read" not in ByteTokenizer().decode(rows.reshape(-1))
    raw = json.loads(s3fs.S3FileSystem(skip_instance_cache=True).cat_file(out + "/manifest.json"))
    for key in ("format", "version", "tokenizer", "seq_len", "num_rows", "shards"):
        assert key in raw
    assert set(raw["shards"][0]) >= {"path", "rows", "bytes", "sha256", "row_groups"}

    # The streaming reader, unshuffled, returns the same rows in the same order.
    src = ShardSource(
        DataConfig(source="shards", path=out, shuffle=False),
        seq_len=15, micro_batch_size=1, rank=0, world_size=1, seed=0,
    )  # fmt: skip
    got = np.concatenate([src.next_batch().numpy() for _ in range(len(want))])
    src.close()
    np.testing.assert_array_equal(got, want)


def test_interrupted_prepare_never_looks_complete_and_reruns(
    tmp_path, s3_bucket, monkeypatch
) -> None:
    inputs, docs = make_inputs(tmp_path)
    out = f"{s3_bucket}/ds"
    args = dict(seq_len=7, rows_per_group=2, shard_mb=0.00003, progress=False)
    real = fmt.write_shard
    calls = []

    def dying(*a, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the machine went away mid-run
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(fmt, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare(inputs, out, **args)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert len(fs.glob(out + "/shard-*.parquet")) == 2 and not fs.exists(out + "/manifest.json")
    with pytest.raises(ManifestError, match="did not finish"):
        ShardSource(DataConfig(source="shards", path=out), seq_len=7, micro_batch_size=1,
                    rank=0, world_size=1, seed=0)  # fmt: skip
    monkeypatch.setattr(fmt, "write_shard", real)

    m = prepare(inputs, out, **args)  # the rerun completes
    _, rows = all_rows(out)
    np.testing.assert_array_equal(rows, expected_rows(docs, ByteTokenizer(), 8))
    assert len(fs.glob(out + "/shard-*.parquet")) == len(m["shards"]) > 2

    # A complete dataset is not overwritten by accident; --overwrite rebuilds it, and
    # shards of the old layout that the new one does not name are removed.
    with pytest.raises(FileExistsError, match="already holds a complete dataset"):
        prepare(inputs, out, **args)
    assert cli(["prepare", *inputs, "--out", out, "--quiet"]) == 2
    m2 = prepare(inputs, out, **{**args, "shard_mb": 1.0}, overwrite=True)
    assert len(m2["shards"]) == 1 and len(fs.glob(out + "/shard-*.parquet")) == 1


def test_bad_inputs_are_named(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no 'text' field"):
        prepare([str(bad)], str(tmp_path / "out"), seq_len=4, progress=False)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p.parquet has no 'text' column"):
        prepare([str(tmp_path / "p.parquet")], str(tmp_path / "out"), seq_len=4, progress=False)
    with pytest.raises(FileNotFoundError, match=r"nope\.txt does not exist"):
        prepare([str(tmp_path / "nope.txt")], str(tmp_path / "out"), seq_len=4, progress=False)
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(ValueError, match="too short for seq_len 64"):
        prepare([str(tmp_path / "short.txt")], str(tmp_path / "out"), seq_len=64, progress=False)


def test_hf_tokenizer_missing_package_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(ImportError, match="optional 'tokenizers' package"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_hf_tokenizer_json(tmp_path, s3_bucket) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"]
    )
    inputs, docs = make_inputs(tmp_path)
    tok.train_from_iterator(docs * 3, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))

    out = f"{s3_bucket}/hf"
    prepare(inputs, out, seq_len=5, tokenizer=str(path), progress=False)
    m, rows = all_rows(out)
    hf = load_tokenizer(str(path))
    assert m.tokenizer["kind"] == "hf" and m.tokenizer["eod_id"] == tok.token_to_id("<|endoftext|>")
    assert m.vocab_size == tok.get_vocab_size()
    np.testing.assert_array_equal(rows, expected_rows(docs, hf, 6))
    with pytest.raises(ValueError, match="no end-of-document token named '<eos>'"):
        load_tokenizer(str(path), eod_token="<eos>")
