"""Unit tests of packing and the micro-batch format (lamda_pipe/data/packing.py, batches.py):
best-fit decreasing against a naive implementation, packed rows decode to exactly the
examples, loss weights give the global-batch mean over target tokens, masked tokens get no
gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lamda_pipe.data.batches import BatchFormat, Row, micro_batch, text_doc_ids
from lamda_pipe.data.loader import DialogSplit, MicroBatchStream, TextSplit
from lamda_pipe.data.packing import PackedExamples, pack
from lamda_pipe.pipeline import lm_loss, weighted_lm_loss

pytestmark = pytest.mark.unit

PAD = 0


def naive_best_fit_decreasing(lengths, capacity):
    """The textbook algorithm, written plainly: longest first, into the open row with the least
    room that still fits, else a new row."""
    lengths = [min(n, capacity) for n in lengths]
    rows, room = [], []
    for e in sorted(range(len(lengths)), key=lambda e: (-lengths[e], e)):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[e]]
        if fits:
            r = min(fits, key=lambda r: room[r])
        else:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append(e)
        room[r] -= lengths[e]
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_is_best_fit_decreasing(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 70, size=300)
    lengths[:3] = [64, 80, 65]  # an exact fit, a clipped one, one that must start a row
    rows = pack(lengths, 64)
    assert sorted(np.concatenate(rows).tolist()) == list(range(300))  # each example exactly once
    clipped = np.minimum(lengths, 64)
    assert all(clipped[r].sum() <= 64 for r in rows)
    assert all((np.diff(r) > 0).all() for r in rows)  # file order within a row
    naive = naive_best_fit_decreasing(lengths.tolist(), 64)
    # rows with the same room are interchangeable, so the row fillings agree whatever the tie order
    assert len(rows) == len(naive)
    assert sorted(int(clipped[r].sum()) for r in rows) == sorted(int(clipped[r].sum()) for r in naive)
    assert [r.tolist() for r in pack(lengths, 64)] == [r.tolist() for r in rows]  # deterministic


def make_examples(rng, n, max_len):
    """n examples of random length; targets at the end of each, as dialog examples have."""
    ids, masks, offsets = [], [], [0]
    for _ in range(n):
        length = int(rng.integers(3, max_len))
        targets = int(rng.integers(1, length))
        ids.append(rng.integers(1, 50, size=length))
        masks.append(np.r_[np.zeros(length - targets, np.uint8), np.ones(targets, np.uint8)])
        offsets.append(offsets[-1] + length)
    return np.concatenate(ids), np.concatenate(masks), np.asarray(offsets, np.int64)


def test_packed_rows_hold_each_example_once_per_epoch():
    rng = np.random.default_rng(3)
    tokens, mask, offsets = make_examples(rng, 120, 30)
    seq = 40
    packed = PackedExamples(tokens, mask, offsets, seq, PAD, seed=5)
    seen = []
    for k in range(packed.num_samples):  # one epoch
        row = packed.row(k)
        assert row.tokens.shape == row.mask.shape == row.doc.shape == (seq + 1,)
        assert (np.diff(row.doc) >= 0).all()  # each document is one contiguous run
        assert packed.targets(k) == int(row.mask[1:].sum())  # counted at packing time, without the row
        count = len(packed.rows[packed.order.index(k)])
        assert set(np.unique(row.doc).tolist()) <= set(range(count + 1))
        for d in range(count):
            at = row.doc == d
            seen.append((tuple(row.tokens[at]), tuple(row.mask[at])))
        pad = row.doc == count  # the padded tail, if any: never a target
        assert (row.mask[pad] == 0).all() and (row.tokens[pad] == PAD).all()
    want = sorted((tuple(tokens[a:b]), tuple(mask[a:b])) for a, b in zip(offsets, offsets[1:]))
    assert sorted(seen) == want
    assert packed.examples == 120 and packed.clipped == 0
    assert packed.fill == pytest.approx(len(tokens) / (packed.num_samples * (seq + 1)))
    assert packed.fill > 0.9  # short examples fill rows well


def test_an_example_longer_than_a_row_keeps_its_end():
    tokens = np.arange(1, 31)
    mask = np.r_[np.zeros(25, np.uint8), np.ones(5, np.uint8)]
    packed = PackedExamples(tokens, mask, np.array([0, 30]), 9, PAD, seed=0)
    row = packed.row(0)
    assert row.tokens.tolist() == list(range(21, 31)) and row.mask.tolist() == [0] * 5 + [1] * 5
    assert packed.targets(0) == 5
    assert packed.clipped == 1


def test_text_doc_ids_rise_after_each_end_of_text():
    eot = 9
    tokens = np.array([1, 2, 9, 3, 9, 9, 4, 5])
    want, doc = [], 0
    for t in tokens:  # the end-of-text token belongs to the document it ends
        want.append(doc)
        doc += t == eot
    assert text_doc_ids(tokens, eot).tolist() == want


def step_rows(stream, step, accum, dp, mbs):
    return [stream.slot_row(step * accum * dp * mbs + j) for j in range(accum * dp * mbs)]


def test_loss_weights_give_the_global_mean_over_targets():
    """sum over micro-batches and ranks of sum(nll * weight) / (accum * dp), which is what
    DeepSpeed makes of the micro-batch losses, equals the mean nll over every target of the step;
    a mean of per-micro-batch means would not."""
    rng = np.random.default_rng(0)
    tokens, mask, offsets = make_examples(rng, 200, 25)
    split = DialogSplit(tokens, mask, offsets, PAD)
    fmt = BatchFormat(document_mask=True, loss_weights=True)
    accum, dp, mbs, seq = 3, 2, 2, 24
    streams = [MicroBatchStream([split], seq, mbs, r, dp, seed=1, fmt=fmt, accum=accum) for r in range(dp)]
    nll = {}  # a made-up per-token loss, fixed per (row slot, position)
    for step in range(2):
        rows = step_rows(streams[0], step, accum, dp, mbs)
        all_targets, all_nll = [], []
        losses, means = [], []
        for m in range(step * accum, (step + 1) * accum):
            for r, s in enumerate(streams):
                (inputs, doc_ids), (labels, weights) = s.micro_batch(m)
                key = (m, r)
                nll[key] = torch.rand(inputs.shape, generator=torch.Generator().manual_seed(m * 10 + r))
                losses.append((nll[key] * weights).sum())
                target = weights > 0
                all_targets.append(target)
                all_nll.append(nll[key][target])
                means.append(nll[key][target].mean())
        reported = sum(losses) / (accum * dp)
        oracle = torch.cat(all_nll).mean()
        assert sum(int(t.sum()) for t in all_targets) == sum(int(r.mask[1:].sum()) for r in rows)
        torch.testing.assert_close(reported, oracle, rtol=1e-6, atol=0)
        assert abs(torch.stack(means).mean() - oracle) > 1e-3  # the two means differ on this data


def test_mixed_text_and_dialog_micro_batches_share_one_format():
    rng = np.random.default_rng(1)
    tokens, mask, offsets = make_examples(rng, 50, 12)
    eot = 7
    text = np.tile(np.array([1, 2, 3, eot, 4, 5, eot]), 30)
    fmt = BatchFormat(document_mask=True, loss_weights=True)
    for flag in (False, True):
        s = MicroBatchStream([TextSplit(text, eot if flag else None), DialogSplit(tokens, mask, offsets, PAD)], 12,
                             4, seed=2, weights=[0.5, 0.5], fmt=fmt, accum=1)
        for m in range(6):
            (inputs, doc_ids), (labels, weights) = s.micro_batch(m)
            assert inputs.shape == doc_ids.shape == labels.shape == weights.shape == (4, 12)
            for slot in range(m * 4, m * 4 + 4):
                row = s.slot_row(slot)
                j = slot - m * 4
                if row.mask is None:  # a text row: every label is a target
                    assert (weights[j] > 0).all()
                    want = text_doc_ids(row.tokens, eot)[:-1] if flag else np.zeros(12)
                    assert doc_ids[j].tolist() == want.tolist()
                else:
                    assert ((weights[j] > 0).numpy() == row.mask[1:].astype(bool)).all()


def test_plain_format_is_unchanged_tokens_and_labels():
    rows = [Row(np.arange(i, i + 9)) for i in range(3)]
    inputs, labels = micro_batch(rows, BatchFormat())
    assert torch.equal(labels, inputs + 1) and inputs.shape == (3, 8) and inputs.dtype == torch.int64


def test_masked_tokens_get_no_gradient_and_full_weights_equal_the_plain_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    weights = torch.tensor([[0, 0, 1, 1, 0], [1, 0, 0, 0, 1]], dtype=torch.float32) / 4
    weighted_lm_loss(logits, (labels, weights)).backward()
    masked = weights == 0
    assert (logits.grad[masked] == 0).all()
    assert (logits.grad[~masked].abs().sum(-1) > 0).all()
    # every token a target with weight 1/N: the plain mean cross-entropy
    full = torch.full((2, 5), 1 / 10)
    torch.testing.assert_close(weighted_lm_loss(logits, (labels, full)), lm_loss(logits, labels))
