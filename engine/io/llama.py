"""llama.cpp KL-divergence base files as a source (`llama-perplexity --kl-divergence-base`).

The layout (read from llama.cpp's tools/perplexity/perplexity.cpp; docs/llama-kld-format.md):

    "_logits_"  n_ctx:int32  n_vocab:int32  n_chunk:int32  tokens:int32[n_ctx·n_chunk]
    then per chunk, R = n_ctx - 1 - n_ctx/2 rows, each nv = 2·ceil(n_vocab/2) + 4 uint16:
        scale:float32  min_log_prob:float32  q:uint16[n_vocab]  (one 0 pad if n_vocab odd)

Row j of chunk i is the model's distribution at position n_ctx/2 + j of the chunk; its
log-probs are scale·q + min_log_prob (llama.cpp floors them 16 nats below the top, where
q = 0), and it predicts token tokens[i·n_ctx + n_ctx/2 + j + 1]. Little-endian, packed.

The reader presents such a file like an Arrow file: columns ``logits``
(fixed_size_list<float32>[n_vocab], the dequantised log-probs, which softmax takes as
logits), ``target`` (int64, the next token), ``chunk`` and ``position`` (int32), one
"row group" per chunk, each decoded by a read job from a memory map.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from engine.errors import XentInputError

MAGIC = b"_logits_"
HEADER_BYTES = 20


def _geometry(n_ctx: int, n_vocab: int, n_chunk: int) -> tuple[int, int, int]:
    """(rows per chunk, uint16 values per row, byte offset of the first row)."""
    rows = n_ctx - 1 - n_ctx // 2
    nv = 2 * ((n_vocab + 1) // 2) + 4
    return rows, nv, HEADER_BYTES + 4 * n_ctx * n_chunk


class LlamaKldReader:
    format = "llama-kld"

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(HEADER_BYTES)
        except OSError as e:
            raise XentInputError(f"cannot read: {e.strerror or e}", file=path) from None
        if len(head) < HEADER_BYTES or head[:8] != MAGIC:
            raise XentInputError("not a llama.cpp KL-divergence base file (header)", file=path)
        n_ctx, n_vocab, n_chunk = (int(v) for v in np.frombuffer(head[8:], "<i4"))
        if n_ctx < 2 or n_vocab < 1 or n_chunk < 0:
            raise XentInputError(
                f"not a llama.cpp KL-divergence base file (n_ctx {n_ctx}, n_vocab {n_vocab}, "
                f"n_chunk {n_chunk})",
                file=path,
            )
        self.n_ctx, self.n_vocab, self.n_chunk = n_ctx, n_vocab, n_chunk
        self.chunk_rows, self.nv, self.data_offset = _geometry(n_ctx, n_vocab, n_chunk)
        row_bytes = 2 * self.nv
        expected = self.data_offset + n_chunk * self.chunk_rows * row_bytes
        if size < expected:
            complete = max(0, (size - self.data_offset) // row_bytes)
            raise XentInputError(
                f"truncated llama.cpp KL-divergence base file: {size} bytes, the header "
                f"promises {expected} ({n_chunk} chunks of {self.chunk_rows} rows of "
                f"{n_vocab} classes); row {complete} is incomplete",
                file=path,
                row=int(complete),
            )
        if size > expected:
            raise XentInputError(
                f"{size - expected} bytes after the last row of a llama.cpp KL-divergence "
                f"base file ({n_chunk} chunks of {self.chunk_rows} rows of {n_vocab} "
                "classes): not such a file, or a different version",
                file=path,
            )
        self.rows = n_chunk * self.chunk_rows
        self.row_groups = n_chunk
        self.schema = pa.schema(
            [
                pa.field("logits", pa.list_(pa.field("item", pa.float32()), n_vocab)),
                pa.field("target", pa.int64()),
                pa.field("chunk", pa.int32()),
                pa.field("position", pa.int32()),
            ]
        )

    def _map(self):
        return np.memmap(self.path, mode="r", dtype=np.uint8)

    def tokens(self, raw=None) -> np.ndarray:
        raw = self._map() if raw is None else raw
        count = self.n_ctx * self.n_chunk
        return np.frombuffer(raw, "<i4", count=count, offset=HEADER_BYTES)

    def read_chunks(self, first: int, count: int, columns, raw=None) -> pa.RecordBatch:
        """Chunks [first, first + count) as one record batch of the wanted columns."""
        raw = self._map() if raw is None else raw
        R, nv = self.chunk_rows, self.nv
        rows = count * R
        cols: dict[str, pa.Array] = {}
        if "logits" in columns:
            start = self.data_offset + first * R * nv * 2
            block = np.frombuffer(raw, "<u2", count=rows * nv, offset=start).reshape(rows, nv)
            params = np.ascontiguousarray(block[:, :4]).view("<f4")  # (scale, min_log_prob)
            q = block[:, 4 : 4 + self.n_vocab]
            logp = np.empty((rows, self.n_vocab), np.float32)
            np.multiply(q, params[:, 0:1], out=logp, casting="unsafe")
            logp += params[:, 1:2]  # float32, as llama.cpp dequantises
            values = pa.array(logp.reshape(-1))
            cols["logits"] = pa.FixedSizeListArray.from_arrays(values, self.n_vocab)
        if "target" in columns:  # row j of chunk i predicts token i·n_ctx + n_ctx/2 + j + 1
            chunks = np.arange(first, first + count, dtype=np.int64)[:, None] * self.n_ctx
            index = (chunks + (self.n_ctx // 2 + 1 + np.arange(R, dtype=np.int64))).reshape(-1)
            cols["target"] = pa.array(self.tokens(raw)[index].astype(np.int64))
        if "chunk" in columns:
            cols["chunk"] = pa.array(np.repeat(np.arange(first, first + count, dtype=np.int32), R))
        if "position" in columns:
            pos = np.tile(np.arange(self.n_ctx // 2, self.n_ctx // 2 + R, dtype=np.int32), count)
            cols["position"] = pa.array(pos)
        names = [n for n in self.schema.names if n in columns]
        return pa.RecordBatch.from_arrays([cols[n] for n in names], names=names)

    def jobs(self, columns) -> Iterator:
        """One read job per run of chunks of about 16 MB of logits (float32, decoded)."""
        names = list(columns)
        per_chunk = max(1, self.chunk_rows * self.n_vocab * 4)
        step = max(1, (16 * 2**20) // per_chunk)
        lock = threading.Lock()
        mapped: list = []

        def raw():
            with lock:
                if not mapped:
                    mapped.append(self._map())
                return mapped[0]

        def job(first: int, count: int):
            return lambda: [self.read_chunks(first, count, names, raw())]

        for first in range(0, self.n_chunk, step):
            yield job(first, min(step, self.n_chunk - first))
