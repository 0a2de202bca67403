"""Packing variable-length examples (a prepared dialog dir) into fixed-length training rows.

Fixed shapes: every row is seq_len + 1 tokens, as plain text windows are (DeepSpeed's pipeline
sends tensor shapes between stages once). Examples are placed into rows by best-fit decreasing
(longest first, each into the row whose free space it fills most tightly, ties to the lowest
row), which is deterministic and a pure function of the example lengths and seq_len, so every
rank computes the same rows and a resumed run finds them again. A row's free tail is padding:
mask 0 (never a target) and a document of its own (attended to by nothing else).

An example longer than a row loses its oldest tokens (the start of its context): the targets
are at the end of an example (data/dialog.py), and a context cut at the front is what a long
conversation gets in decoding too (dialog.fit_prompt).

Rows are then drawn like text windows: epochs of a seeded permutation (loader.EpochOrder).
"""

from __future__ import annotations

import numpy as np

from .batches import Row


def pack(lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Best-fit decreasing: example indices per row, each row's lengths summing to <= capacity
    (lengths are clipped to capacity first). Within a row the examples keep their file order."""
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), capacity)
    order = np.argsort(-lengths, kind="stable")  # longest first, ties in file order
    free_rows: list[list[int]] = [[] for _ in range(capacity + 1)]  # free space -> open rows (a stack)
    has_free = np.zeros(capacity + 1, dtype=bool)
    rows: list[list[int]] = []
    free_of: list[int] = []
    for e in order:
        n = int(lengths[e])
        fit = np.flatnonzero(has_free[n:])  # rows with room for n, tightest first
        if len(fit):
            space = n + int(fit[0])
            r = free_rows[space].pop()
            has_free[space] = bool(free_rows[space])
        else:
            r, space = len(rows), capacity
            rows.append([])
            free_of.append(capacity)
        rows[r].append(int(e))
        left = space - n
        free_of[r] = left
        if left > 0:
            free_rows[left].append(r)
            has_free[left] = True
    return [np.sort(np.asarray(r, dtype=np.int64)) for r in rows]


class PackedExamples:
    """The rows of one split of a prepared dialog dir, as training samples: row(k) for any k >= 0
    (epochs repeat, each in its own order)."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, offsets: np.ndarray, seq_len: int, pad_id: int,
                 order):
        """order: loader.EpochOrder over the rows (built by the caller, who owns seeding)."""
        self.tokens, self.mask, self.offsets = tokens, mask, np.asarray(offsets, dtype=np.int64)
        self.seq_len, self.pad_id = seq_len, pad_id
        lengths = np.diff(self.offsets)
        self.rows = pack(lengths, seq_len + 1)
        self.num_samples = len(self.rows)
        self.examples = len(lengths)
        self.clipped = int((lengths > seq_len + 1).sum())  # examples that lose their oldest tokens
        self.real_tokens = int(np.minimum(lengths, seq_len + 1).sum())
        self.order = order(self.num_samples)

    @property
    def fill(self) -> float:
        """The share of row positions that hold example tokens (the rest is padding)."""
        return self.real_tokens / (self.num_samples * (self.seq_len + 1))

    def row(self, k: int) -> Row:
        width = self.seq_len + 1
        tokens = np.full(width, self.pad_id, dtype=np.int64)
        mask = np.zeros(width, dtype=np.uint8)
        doc = np.zeros(width, dtype=np.int64)
        at = 0
        examples = self.rows[self.order.index(k)]
        for d, e in enumerate(examples):
            start, end = int(self.offsets[e]), int(self.offsets[e + 1])
            start = max(start, end - width)  # clipped from the front
            n = end - start
            tokens[at:at + n] = self.tokens[start:end]
            mask[at:at + n] = self.mask[start:end]
            doc[at:at + n] = d
            at += n
        doc[at:] = len(examples)  # padding: a document of its own
        return Row(tokens, mask, doc)
