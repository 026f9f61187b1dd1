"""Byte-level tokenizer: ids 0-255 are bytes, 256 ends a document. Needs no download."""

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
