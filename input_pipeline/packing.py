"""Packing: a stream of tokenized documents -> rows of exactly `seq_len` tokens.

The documents (each [BOS, ..., EOS]) are concatenated into one stream and cut into rows of T = seq_len
consecutive tokens; the targets are the stream shifted by one, so the last target of a row is the first
token of the next row. Hence every token of every document is an input exactly once, in order, and nothing
is dropped; only the very end of a finite stream is padded.

Per row (all [T]):
- tokens, targets: int32; padding uses PAD_ID.
- segment_ids: int32, 1, 2, 3, ... for the documents (or document pieces) in the row, in order; 0 = padding.
  A document that runs past the end of a row continues in the next row with a new segment id (1 there).
- positions: int32, the index of the token within its document: restarts at 0 on each BOS, and continues
  (does not restart) when a document carries over into the next row.
- loss_mask: float32, 1 where the target is a real next token. 0 on padding, on the last token of the
  stream, and, if `mask_document_boundary`, on each document's EOS, whose target would be the next
  document's BOS (a cross-document prediction).

The iterator's state is (state of the block iterator before the block holding the first document still
in use, that document's index in the block, the number of its tokens already emitted): small,
JSON-serialisable, and exact, since packing is deterministic given the document stream.
"""

from __future__ import annotations

import collections
import copy
from typing import Any

import grain
import numpy as np

PAD_ID = 0
KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def empty_rows(n: int, seq_len: int) -> dict[str, np.ndarray]:
    """n rows of padding (segment 0, loss_mask 0)."""
    out = {k: np.full((n, seq_len), PAD_ID if k in ("tokens", "targets") else 0, np.int32) for k in KEYS}
    out["loss_mask"] = np.zeros((n, seq_len), np.float32)
    return out


class PackIterDataset(grain.IterDataset):
    """grain IterDataset of packed rows (dicts of [T] arrays) from an IterDataset whose elements are blocks
    (sequences) of documents, each an int32 array. Reading documents in blocks amortises grain's per-element
    cost (thread hand-off, state, stats) over many documents."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, mask_document_boundary: bool = True):
        super().__init__(parent)
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self._seq_len, self._mask_boundary = seq_len, mask_document_boundary

    def __iter__(self):
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._mask_boundary)

    def __str__(self):
        return f"PackIterDataset(seq_len={self._seq_len}, mask_document_boundary={self._mask_boundary})"


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int, mask_boundary: bool):
        super().__init__(parent)
        self._T, self._mask_boundary = seq_len, mask_boundary
        # Buffered documents: (parent state before their block, index in the block, ids).
        self._docs: collections.deque[tuple[dict, int, np.ndarray]] = collections.deque()
        self._offset = 0  # tokens of self._docs[0] already emitted
        self._skip = 0  # after set_state: documents of the next block already emitted in full
        self._buffered = 0  # tokens in self._docs not yet emitted
        self._exhausted = False

    def _fill(self, need: int) -> None:
        while self._buffered < need and not self._exhausted:
            state = self._parent.get_state()
            try:
                block = next(self._parent)
            except StopIteration:
                self._exhausted = True
                return
            for j in range(self._skip, len(block)):
                doc = block[j]
                if len(doc) == 0:  # cannot come from encode_document (BOS, EOS); never let it stall a row
                    continue
                if not self._docs:
                    assert self._offset < len(doc), (self._offset, len(doc))
                    self._buffered -= self._offset
                self._docs.append((state, j, doc))
                self._buffered += len(doc)
            self._skip = 0

    def __next__(self) -> dict[str, np.ndarray]:
        T = self._T
        self._fill(T + 1)  # one token of look-ahead: the target of the row's last token
        if self._buffered == 0:
            raise StopIteration
        row = {k: v[0] for k, v in empty_rows(1, T).items()}
        n = min(self._buffered, T)
        i, k, off, seg = 0, 0, self._offset, 0
        while i < n:
            doc = self._docs[k][2]
            take = min(len(doc) - off, n - i)
            seg += 1
            row["tokens"][i:i + take] = doc[off:off + take]
            row["positions"][i:i + take] = np.arange(off, off + take)
            row["segment_ids"][i:i + take] = seg
            inside = min(take, len(doc) - off - 1)  # tokens whose next token is in the same document
            row["targets"][i:i + inside] = doc[off + 1:off + 1 + inside]
            row["loss_mask"][i:i + inside] = 1.0
            if inside < take:  # the document's last token (EOS) is in this row
                if k + 1 < len(self._docs):
                    row["targets"][i + take - 1] = self._docs[k + 1][2][0]
                    row["loss_mask"][i + take - 1] = 0.0 if self._mask_boundary else 1.0
                # else: end of the stream, no target: stays padding with loss_mask 0
            i, off = i + take, off + take
            if off == len(doc):
                k, off = k + 1, 0
        for _ in range(k):
            self._docs.popleft()
        self._offset, self._buffered = off, self._buffered - n
        return row

    def get_state(self) -> dict[str, Any]:
        if self._docs:
            parent, doc = self._docs[0][0], self._docs[0][1]
        else:  # nothing buffered: resume at the next block (or where set_state left us)
            parent, doc = self._parent.get_state(), self._skip
        return {"parent": copy.deepcopy(parent), "doc": int(doc), "offset": int(self._offset)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._docs.clear()
        self._skip, self._offset = int(state["doc"]), int(state["offset"])
        self._buffered, self._exhausted = 0, False

    def __str__(self):
        return f"PackDatasetIterator(seq_len={self._T})"
