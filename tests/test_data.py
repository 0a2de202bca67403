"""Unit tests of lamda_pipe.data, the training side: --data specs, mixtures, deterministic
micro-batches, data-parallel shares, exact resume, and the checks on prepared dirs."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from lamda_pipe.data.loader import (MIX_BLOCK, DataError, MicroBatchStream, Mixture, bundled_corpus,
                             open_sources, parse_data_spec)

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------------------------------------
# MicroBatchStream
# ---------------------------------------------------------------------------------------------

SEQ = 4
TOKENS = np.arange(12 * SEQ + 1)  # exactly 12 samples; token value = position, so samples name themselves


def sample_ids(inputs: torch.Tensor) -> list[int]:
    return (inputs[:, 0] // SEQ).tolist()


def test_micro_batches_are_windows_with_shifted_labels():
    s = MicroBatchStream(TOKENS, SEQ, micro_batch_size=3, seed=1)
    assert s.num_samples == 12
    for m in range(6):
        x, y = s.micro_batch(m)
        assert x.shape == y.shape == (3, SEQ) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # labels are the inputs shifted by one
        assert (x[:, 0] % SEQ == 0).all()  # non-overlapping windows starting at multiples of SEQ
        assert torch.equal(x, x[:, :1] + torch.arange(SEQ))  # contiguous text


def test_micro_batch_stream_is_deterministic():
    def first(seed, n=4):
        s = MicroBatchStream(TOKENS, SEQ, micro_batch_size=2, seed=seed)
        return [sample_ids(s.micro_batch(m)[0]) for m in range(n)]

    assert first(0) == first(0)
    assert first(0) != first(1)
    # random access equals sequential access, in any order
    s = MicroBatchStream(TOKENS, SEQ, micro_batch_size=2, seed=0)
    backwards = [sample_ids(s.micro_batch(m)[0]) for m in reversed(range(8))]
    s2 = MicroBatchStream(TOKENS, SEQ, micro_batch_size=2, seed=0)
    assert backwards[::-1] == [sample_ids(s2.micro_batch(m)[0]) for m in range(8)]
    # without shuffling the order is the text order
    s = MicroBatchStream(TOKENS, SEQ, micro_batch_size=2, shuffle=False)
    assert [sample_ids(s.micro_batch(m)[0]) for m in range(7)][:6] == [[0, 1], [2, 3], [4, 5], [6, 7],
                                                                        [8, 9], [10, 11]]


def test_data_parallel_ranks_partition_each_epoch():
    mbs, dp = 2, 2
    ranks = [MicroBatchStream(TOKENS, SEQ, mbs, dp_rank=r, dp_size=dp, seed=3) for r in range(dp)]
    per_epoch = 12 // (mbs * dp)  # micro-batches per rank per epoch
    epochs = []
    for e in range(2):
        seen = {r: [i for m in range(e * per_epoch, (e + 1) * per_epoch)
                    for i in sample_ids(ranks[r].micro_batch(m)[0])] for r in range(dp)}
        assert not set(seen[0]) & set(seen[1])  # disjoint
        assert sorted(seen[0] + seen[1]) == list(range(12))  # every sample exactly once
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new epoch, a new order (same set, checked above)


def test_iterate_from_start():
    s = MicroBatchStream(TOKENS, SEQ, micro_batch_size=2, seed=5)
    it = s.iterate(start=7)
    for m in range(7, 15):
        x, y = next(it)
        ref_x, ref_y = s.micro_batch(m)
        assert torch.equal(x, ref_x) and torch.equal(y, ref_y)


def test_too_little_data():
    with pytest.raises(ValueError, match="--seq-len"):
        MicroBatchStream(np.arange(SEQ), SEQ, micro_batch_size=1)  # SEQ tokens < SEQ + 1
    assert MicroBatchStream(np.arange(SEQ + 1), SEQ, micro_batch_size=1).num_samples == 1


# ---------------------------------------------------------------------------------------------
# --data specs and mixtures
# ---------------------------------------------------------------------------------------------

def test_parse_data_spec_forms():
    assert parse_data_spec("data/pile") == [(__import__("pathlib").Path("data/pile"), 1.0)]
    spec = parse_data_spec("a:0.5, b:0.25,c:0.25")
    assert [(str(p), w) for p, w in spec] == [("a", 0.5), ("b", 0.25), ("c", 0.25)]
    spec = parse_data_spec("a:3,b:1")  # normalised
    assert [w for _, w in spec] == [0.75, 0.25]


@pytest.mark.parametrize("bad", ["", "a:x,b:1", "a:-1,b:1", "a:0,b:1", "a,b", "a:nan,b:1", "a:1,a:2"])
def test_parse_data_spec_refuses_what_does_not_parse(bad):
    with pytest.raises(DataError, match="--data"):
        parse_data_spec(bad)


def test_mixture_realises_lamda_weights_exactly_per_block():
    weights = [0.5, 0.125, 0.125, 0.125, 0.0625, 0.0625]  # LaMDA's pre-training mix
    mix = Mixture(weights, seed=3)
    blocks = 5
    counts = Counter(mix.locate(s)[0] for s in range(blocks * MIX_BLOCK))
    assert [counts[i] / (blocks * MIX_BLOCK) for i in range(6)] == weights


def test_mixture_proportions_within_one_slot_per_block_and_no_sample_skipped():
    weights = [1 / 3, 0.5, 1 / 6]
    mix = Mixture(weights, seed=0)
    n = 7 * MIX_BLOCK + 100  # ends mid-block
    seen = {i: [] for i in range(3)}
    for s in range(n):
        i, k = mix.locate(s)
        seen[i].append(k)
    for i, w in enumerate(weights):
        assert abs(len(seen[i]) - w * n) <= 1 + 100 * w + 8  # 1/block rounding x 7 blocks + partial block
        # each source is read in order, k = 0, 1, 2, ...: nothing skipped, nothing repeated
        assert sorted(seen[i]) == list(range(len(seen[i])))
    # order within a block differs between blocks and between seeds
    first = [mix.locate(s)[0] for s in range(64)]
    assert first != [mix.locate(MIX_BLOCK + s)[0] for s in range(64)]
    assert first != [Mixture(weights, seed=1).locate(s)[0] for s in range(64)]


def test_mixture_refuses_a_weight_too_small_for_a_block():
    with pytest.raises(DataError, match="below 1/"):
        Mixture([0.9999, 0.0001], seed=0)


def test_stream_over_a_mixture_follows_the_weights_and_stays_disjoint_across_ranks():
    a = np.arange(0, 8001)  # source 0: token values < 10000, 1000 samples (one epoch covers a block)
    b = np.arange(10000, 14001)  # source 1: 500 samples
    weights = [0.75, 0.25]
    ranks = [MicroBatchStream([a, b], 8, 4, dp_rank=r, dp_size=2, seed=1, weights=weights) for r in range(2)]
    per_rank = MIX_BLOCK // (4 * 2)  # micro-batches per rank in one mixture block
    starts = {r: [int(v) for m in range(per_rank) for v in ranks[r].micro_batch(m)[0][:, 0]] for r in range(2)}
    assert not set(starts[0]) & set(starts[1])
    both = starts[0] + starts[1]
    share_b = sum(v >= 10000 for v in both) / len(both)
    assert share_b == 0.25  # one whole block: the quota is exact


def test_resume_with_slot_offset_continues_exactly_whatever_the_split():
    """Run A: 1 data-parallel rank, micro-batch 4, 2 micro-batches per step, 3 steps.
    Run B resumes after those 3 steps with 2 ranks x micro-batch 2 x 2 micro-batches (same
    global batch of 8). Together they see exactly the samples of one uninterrupted run, step
    by step, with nothing repeated or skipped."""
    a, b = np.arange(0, 3001), np.arange(10000, 13001)
    kw = dict(seed=4, weights=[0.5, 0.5])
    gbs, steps_a, steps_b = 8, 3, 4

    def step_samples(streams, step, gas, offset):
        out = []
        for s in streams:
            for m in range(step * gas, (step + 1) * gas):
                out += [int(v) for v in s.micro_batch(m, slot_offset=offset)[0][:, 0]]
        return sorted(out)

    whole = [MicroBatchStream([a, b], 8, 4, **kw)]
    uninterrupted = [step_samples(whole, t, 2, 0) for t in range(steps_a + steps_b)]
    run_a = [step_samples(whole, t, 2, 0) for t in range(steps_a)]
    resumed = [MicroBatchStream([a, b], 8, 2, dp_rank=r, dp_size=2, **kw) for r in range(2)]
    run_b = [step_samples(resumed, t - steps_a, 2, steps_a * gbs) for t in range(steps_a, steps_a + steps_b)]
    assert run_a + run_b == uninterrupted
    flat = [v for step in uninterrupted for v in step]
    assert len(flat) == len(set(flat))  # no sample twice within these 7 steps


# ---------------------------------------------------------------------------------------------
# open_sources: the checks ds_train.py runs on --data before starting any process
# ---------------------------------------------------------------------------------------------

DOCS = [f"Document number {i} talks about {'apples' if i % 2 else 'rivers'} and {i * 7} stones." for i in range(60)]


def prepared(tmp_path, name, vocab=300, docs=DOCS, tokenizer=None):
    from lamda_pipe.data.prepare import prepare_data
    from lamda_pipe.data.tokenizer import train_tokenizer

    if tokenizer is None:
        tokenizer = tmp_path / f"tok{vocab}.json"
        if not tokenizer.exists():
            train_tokenizer(docs, vocab).save(str(tokenizer))
    out = tmp_path / name
    prepare_data(docs, tokenizer, out, val_fraction=0.1, workers=1, progress=False)
    return out


def test_open_sources_reads_a_mixture(tmp_path):
    a, b = prepared(tmp_path, "a"), prepared(tmp_path, "b")
    sources = open_sources(f"{a}:3,{b}:1", model_vocab=512, seq_len=16)
    assert [s.directory for s in sources] == [a, b] and [s.weight for s in sources] == [0.75, 0.25]
    meta = json.loads((a / "meta.json").read_text())
    train = sources[0].tokens("train")
    assert len(train) == meta["splits"]["train"]["tokens"] and train.dtype == np.uint16
    assert sources[0].tokenizer_path.is_file()


def test_open_sources_refusals(tmp_path):
    a = prepared(tmp_path, "a")
    other_tok = prepared(tmp_path, "other", vocab=280)  # another tokenizer
    with pytest.raises(DataError, match="different tokenizers"):
        open_sources(f"{a}:0.5,{other_tok}:0.5", model_vocab=512, seq_len=16)
    vocab = json.loads((a / "meta.json").read_text())["vocab_size"]
    with pytest.raises(DataError, match=f"pass --vocab-size {vocab}"):
        open_sources(str(a), model_vocab=vocab - 1, seq_len=16)
    open_sources(str(a), model_vocab=vocab, seq_len=16)  # equal is fine, and so is a larger model vocab
    train_tokens = json.loads((a / "meta.json").read_text())["splits"]["train"]["tokens"]
    with pytest.raises(DataError, match="--seq-len"):
        open_sources(str(a), model_vocab=512, seq_len=train_tokens)
    with pytest.raises(ValueError, match="no such data dir"):
        open_sources(str(tmp_path / "missing"), model_vocab=512, seq_len=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no meta.json"):
        open_sources(str(tmp_path / "empty"), model_vocab=512, seq_len=16)
    with pytest.raises(DataError, match="weight"):
        open_sources(f"{a}:half", model_vocab=512, seq_len=16)


def test_bundled_corpus_goes_through_the_prepare_path(tmp_path):
    from lamda_pipe.data.loader import prepare_bundled
    from lamda_pipe.data.prepare import read_meta
    from lamda_pipe.data.text_sources import iter_documents

    out = prepare_bundled(tmp_path / "data", 512)
    meta = read_meta(out)
    docs = list(iter_documents(inputs=[str(p) for p in bundled_corpus()]))
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(docs) > 100
    assert meta["vocab_size"] == 512
    mtime = (out / "train.bin").stat().st_mtime_ns
    assert prepare_bundled(tmp_path / "data", 512) == out  # cached
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    prepare_bundled(tmp_path / "data", 600)  # another vocabulary: rebuilt
    assert read_meta(out)["vocab_size"] == 600
