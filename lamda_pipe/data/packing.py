"""Packing variable-length examples (a prepared dialog dir) into fixed-length training rows.

Fixed shapes: every row is seq_len + 1 tokens, as plain text windows are (DeepSpeed's pipeline
sends tensor shapes between stages once). Examples are placed into rows by best-fit decreasing
(longest first, each into the row whose free space it fills most tightly; among rows with the
same free space, the one that reached it last), which is deterministic and a pure function of the example lengths and seq_len, so every
rank computes the same rows and a resumed run finds them again. A row's free tail is padding:
mask 0 (never a target) and a document of its own (attended to by nothing else).

An example longer than a row loses its oldest tokens (the start of its context): the targets
are at the end of an example (data/dialog.py), and a context cut at the front is what a long
conversation gets in decoding too (dialog.fit_prompt).

Rows are then drawn like text windows: epochs in a seeded order (order.EpochOrder).
Each row's count of target tokens is computed with the packing, so the loss weights of a step
(data/batches.py) need no row built to count them.
"""

from __future__ import annotations

import numpy as np

from .batches import Row
from .order import CURRENT, EpochOrder


def pack(lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Best-fit decreasing: example indices per row, each row's lengths summing to <= capacity
    (lengths are clipped to capacity first). Within a row the examples keep their file order."""
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), capacity)
    order = np.argsort(-lengths, kind="stable")  # longest first, ties in file order
    free_rows: list[list[int]] = [[] for _ in range(capacity + 1)]  # free space -> open rows (a stack)
    has_free = np.zeros(capacity + 1, dtype=bool)
    rows: list[list[int]] = []
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
        rows[r].append(int(e))
        left = space - n
        if left > 0:
            free_rows[left].append(r)
            has_free[left] = True
    return [np.sort(np.asarray(r, dtype=np.int64)) for r in rows]


class PackedExamples:
    """The rows of one split of a prepared dialog dir, as training samples: row(k) for any k >= 0
    (epochs repeat, each in its own order)."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, offsets: np.ndarray, seq_len: int, pad_id: int,
                 seed: int, shuffle: bool = True, order: int = CURRENT):
        self.tokens, self.mask, self.offsets = tokens, mask, np.asarray(offsets, dtype=np.int64)
        self.seq_len, self.pad_id = seq_len, pad_id
        width = seq_len + 1
        lengths = np.diff(self.offsets)
        self.starts = np.maximum(self.offsets[:-1], self.offsets[1:] - width)  # an example clipped from the front
        self.rows = pack(lengths, width)
        self.num_samples = len(self.rows)
        self.examples = len(lengths)
        self.clipped = int((lengths > width).sum())  # examples that lose their oldest tokens
        self.real_tokens = int(np.minimum(lengths, width).sum())
        self.order = EpochOrder(self.num_samples, seed, shuffle, order)
        # Targets per row: the examples' mask over what each keeps, less the row's first token,
        # which is never a label.
        csum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
        kept = csum[self.offsets[1:]] - csum[self.starts]
        first = np.cumsum([0] + [len(r) for r in self.rows[:-1]])
        self.row_targets = (np.add.reduceat(kept[np.concatenate(self.rows)], first)
                            - np.asarray(mask[self.starts[[r[0] for r in self.rows]]], dtype=np.int64))

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
            start, end = int(self.starts[e]), int(self.offsets[e + 1])
            n = end - start
            tokens[at:at + n] = self.tokens[start:end]
            mask[at:at + n] = self.mask[start:end]
            doc[at:at + n] = d
            at += n
        doc[at:] = len(examples)  # padding: a document of its own
        return Row(tokens, mask, doc)

    def targets(self, k: int) -> int:
        """Target tokens among the labels of row(k), without building it."""
        return int(self.row_targets[self.order.index(k)])
