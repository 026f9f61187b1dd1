"""Tokenizers for `moeyard prepare`: the byte-level default (ids 0-255 are bytes, 256 ends a
document; needs no download) and, optionally, a Hugging Face `tokenizers` JSON file."""

from __future__ import annotations

import numpy as np

EOD_ID = 256
BYTE_VOCAB_SIZE = 257


class ByteTokenizer:
    name = "bytes"
    vocab_size = BYTE_VOCAB_SIZE
    eod_id = EOD_ID

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        arr = np.asarray(ids)
        return bytes(arr[arr < 256].astype(np.uint8).tolist()).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        """What the manifest records about this tokenizer."""
        return {
            "kind": "bytes",
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
        }


# End-of-document tokens tried, in order, when a Hugging Face tokenizer is given without one.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file. The `tokenizers` package is optional and
    imported only here."""

    def __init__(self, path: str, *, eod_token: str | None = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError(
                f"the tokenizer {path} needs the optional 'tokenizers' package: "
                "pip install tokenizers (or use the default byte-level tokenizer)"
            ) from None
        import hashlib

        import fsspec

        with fsspec.open(path, "rb") as f:
            raw = f.read()
        try:
            self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:
            raise ValueError(f"{path} is not a Hugging Face tokenizers JSON file: {e}") from None
        self.path = path
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.name = path.rstrip("/").rsplit("/", 1)[-1]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        names = (eod_token,) if eod_token else EOD_CANDIDATES
        ids = [(n, self._tok.token_to_id(n)) for n in names]
        found = [(n, i) for n, i in ids if i is not None]
        if not found:
            raise ValueError(
                f"tokenizer {path} has no end-of-document token "
                f"{'named ' + repr(eod_token) if eod_token else 'among ' + ', '.join(names)}; "
                "pass --eod-token"
            )
        self.eod_token, self.eod_id = found[0]

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids: np.ndarray | list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def describe(self) -> dict:
        return {
            "kind": "hf",
            "name": self.name,
            "path": self.path,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
            "eod_token": self.eod_token,
        }


def load_tokenizer(
    spec: str = "bytes", *, eod_token: str | None = None
) -> ByteTokenizer | HFTokenizer:
    """ "bytes" (the default) or the path/URL of a Hugging Face tokenizers JSON file."""
    if spec in ("", "bytes", "byte"):
        return ByteTokenizer()
    return HFTokenizer(spec, eod_token=eod_token)
