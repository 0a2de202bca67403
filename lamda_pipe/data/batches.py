"""What one training row is, and how rows become the micro-batches DeepSpeed's pipeline takes.

A row is seq_len + 1 consecutive token ids (inputs are the first seq_len, labels the last
seq_len) with two optional companions of the same length:

* ``mask``: uint8, 1 where the token is a training target (data/dialog.py's loss mask); None
  means every token is one (plain text);
* ``doc``: one integer per token, equal within a document / packed example and rising from
  one to the next; None means the row is one document as far as attention is concerned.

The run decides once, from its data and flags, which tensors its micro-batches carry
(``BatchFormat``), so every micro-batch of a run has the same structure and shapes (DeepSpeed's
pipeline sends tensor metadata between stages once, on the first micro-batch):

    inputs  = tokens                      (B, T) int64           plain
            | (tokens, doc_ids)           (B, T) int64 each      document_mask
    labels  = labels                      (B, T) int64           plain
            | (labels, weights)           (B, T) int64, float32  loss_weights

``weights`` make the step's loss the mean over every target token of the *global* batch (all
micro-batches of all data-parallel ranks), not a mean of per-micro-batch means: a micro-batch
of short responses must not weigh as much as a full one. Target tokens get weight
``accum * dp / N`` and the rest 0, where N counts the target tokens of the whole step; the loss
of a micro-batch is ``sum(nll * weight)``. DeepSpeed then divides each micro-batch's loss by
``accum`` (in backward and in the reported loss) and averages gradients and the loss over the
``dp`` ranks, which leaves exactly ``sum(nll over the step's targets) / N``. N is a pure function
of the step's sample indices, so each last-stage rank computes it from the data: nothing is
communicated for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch


class Row(NamedTuple):
    tokens: np.ndarray  # (T + 1,) token ids
    mask: np.ndarray | None = None  # (T + 1,) uint8, 1 = target; None: all tokens are targets
    doc: np.ndarray | None = None  # (T + 1,) document index per token; None: one document


@dataclass(frozen=True)
class BatchFormat:
    """Which tensors a run's micro-batches carry (see the module docstring)."""

    document_mask: bool = False  # inputs carry doc_ids; attention stays within a document
    loss_weights: bool = False  # labels carry per-token weights (loss masks, global-batch mean)

    @classmethod
    def for_data(cls, kinds: Sequence[str], document_mask_flag: bool) -> "BatchFormat":
        """kinds: DataSource.kind of every source. Dialog data is packed examples, so it needs both;
        --document-mask asks for document masks on plain text too."""
        dialog = "dialog" in kinds
        return cls(document_mask=document_mask_flag or dialog, loss_weights=dialog)


PLAIN = BatchFormat()


def text_doc_ids(tokens: np.ndarray, eot: int) -> np.ndarray:
    """Document index per token of a plain-text row: each <|endoftext|> ends its document, so
    the index rises on the token after it."""
    ends = (tokens == eot).astype(np.int64)
    return np.concatenate([[0], np.cumsum(ends[:-1])])


def micro_batch(rows: Sequence[Row], fmt: BatchFormat, weight: float = 1.0):
    """(inputs, labels) of `rows` in `fmt`; `weight` is each target token's weight (accum * dp / N)."""
    tokens = torch.from_numpy(np.stack([r.tokens for r in rows]).astype(np.int64))  # (B, T + 1)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # (B, T) each
    if fmt.document_mask:
        doc = np.stack([np.zeros(len(r.tokens), np.int64) if r.doc is None else r.doc for r in rows])
        inputs = (inputs, torch.from_numpy(doc[:, :-1].astype(np.int64)))
    if fmt.loss_weights:
        mask = np.stack([np.ones(len(r.tokens), np.uint8) if r.mask is None else r.mask for r in rows])
        weights = torch.from_numpy(mask[:, 1:].astype(np.float32)) * weight  # (B, T)
        labels = (labels, weights)
    return inputs, labels
