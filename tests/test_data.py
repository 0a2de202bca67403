"""Unit tests of lamda_pipe.data: tokenizer, corpus preparation and its cache, micro-batches."""

import json

import numpy as np
import pytest
import torch

from lamda_pipe import data
from lamda_pipe.data import (EOT, MicroBatchStream, bundled_corpus, prepare_corpus, read_documents,
                             resolve_text_paths, train_tokenizer)

UNICODE_TEXT = "naïve café — 東京 🙂 Ünïcödé"

DOCS_A = [
    "In the beginning was the word, and the word was short.",
    "Naïve café owners in 東京 serve coffee 🙂 all day.",
    "A third document\nspanning two lines.",
    "Four: numbers 1 2 3 and punctuation !?;",
    "Five — with an em dash.",
]
DOCS_B = [
    "Six is in the second file.",
    "Seven, Ünïcödé and more text here.",
    "Eight is short.",
    "Nine has tabs\tand  double  spaces.",
    "Ten ends the corpus.",
]


def write_corpus(tmp_path, docs_a=DOCS_A, docs_b=DOCS_B):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    # documents separated by blank lines; extra blank lines and edge whitespace are not documents
    (src / "a.txt").write_text("\n\n".join(docs_a) + "\n\n\n", encoding="utf-8")
    (src / "b.txt").write_text("\n" + "\n\n".join(docs_b) + "\n", encoding="utf-8")
    return [src / "a.txt", src / "b.txt"]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

def test_tokenizer_round_trip_non_ascii():
    tok = train_tokenizer(DOCS_A + DOCS_B, vocab_size=300)
    assert tok.get_vocab_size() <= 300
    for text in (UNICODE_TEXT, " leading space", "unseen: ∑ ж ✓ \u00a0 tabs\t", DOCS_B[3]):
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
    assert tok.token_to_id(EOT) is not None


# ---------------------------------------------------------------------------------------------
# prepare_corpus
# ---------------------------------------------------------------------------------------------

def _split(ids: np.ndarray, eot: int) -> list[list[int]]:
    """Token ids -> documents, each ending at (and without) its end-of-text."""
    ids = ids.tolist()
    assert ids and ids[-1] == eot
    docs, cur = [], []
    for t in ids:
        if t == eot:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    return docs


def test_prepare_corpus_splits_and_packs_documents(tmp_path):
    paths = write_corpus(tmp_path)
    docs = DOCS_A + DOCS_B  # document order: files in the given order, then within each file
    assert read_documents(paths) == docs
    pc = prepare_corpus(paths, tmp_path / "out", vocab_size=300, val_every=3)
    tok = pc.load_tokenizer()
    assert pc.eot_id == tok.token_to_id(EOT)
    assert pc.vocab_size == tok.get_vocab_size()
    # every 3rd document (the 3rd, 6th, 9th) is held out for validation
    want_val = [docs[2], docs[5], docs[8]]
    want_train = [d for i, d in enumerate(docs) if i not in (2, 5, 8)]
    for split, want in ((pc.train, want_train), (pc.val, want_val)):
        got = _split(np.asarray(split), pc.eot_id)
        assert [tok.decode(ids) for ids in got] == want  # the original text, document by document
        assert got == [tok.encode(d).ids for d in want]  # and the direct tokenization
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["splits"]["train"] == {"tokens": len(pc.train), "documents": 7}
    assert meta["splits"]["val"] == {"tokens": len(pc.val), "documents": 3}


def test_prepare_corpus_reuses_cache_and_redoes_on_change(tmp_path, monkeypatch):
    paths = write_corpus(tmp_path)
    out = tmp_path / "out"
    first = prepare_corpus(paths, out, vocab_size=300, val_every=3)
    files = ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    stamps = {f: (out / f).stat().st_mtime_ns for f in files}
    train, val = np.array(first.train), np.array(first.val)

    def no_training(*a, **k):
        raise AssertionError("train_tokenizer called although the cache is valid")

    monkeypatch.setattr(data, "train_tokenizer", no_training)
    again = prepare_corpus(paths, out, vocab_size=300, val_every=3)
    assert np.array_equal(again.train, train) and np.array_equal(again.val, val)
    assert {f: (out / f).stat().st_mtime_ns for f in files} == stamps
    monkeypatch.undo()

    calls = []

    def counting(docs, vocab_size):
        calls.append(vocab_size)
        return train_tokenizer(docs, vocab_size)

    monkeypatch.setattr(data, "train_tokenizer", counting)
    prepare_corpus(paths, out, vocab_size=320, val_every=3)  # another vocabulary size
    assert calls == [320]
    assert json.loads((out / "meta.json").read_text())["requested_vocab_size"] == 320
    prepare_corpus(paths, out, vocab_size=320, val_every=4)  # another split
    assert calls == [320, 320]
    write_corpus(tmp_path, docs_b=DOCS_B[:-1] + ["Ten was edited."])  # another text
    prepare_corpus(paths, out, vocab_size=320, val_every=4)
    assert calls == [320, 320, 320]


def test_prepare_corpus_refuses_a_single_document(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("only one document\n")
    with pytest.raises(ValueError, match="at least 2 documents"):
        prepare_corpus([f], tmp_path / "out", vocab_size=300)


def test_prepare_corpus_with_fewer_documents_than_val_every(tmp_path):
    """A corpus shorter than val_every (default 20) still gets a validation split: its last
    document. (It used to write an empty val.bin that could not be memory-mapped.)"""
    paths = write_corpus(tmp_path)  # 10 documents < val_every = 20
    pc = prepare_corpus(paths, tmp_path / "out", vocab_size=300)
    assert len(pc.train) > 0 and len(pc.val) > 0
    tok = pc.load_tokenizer()
    last_doc = read_documents(paths)[-1]
    assert tok.decode(list(pc.val[:-1])) == last_doc and pc.val[-1] == pc.eot_id
    with pytest.raises(ValueError, match="val_every must be >= 2"):
        prepare_corpus(paths, tmp_path / "out2", vocab_size=300, val_every=1)


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
# resolve_text_paths
# ---------------------------------------------------------------------------------------------

def test_resolve_text_paths_default_is_bundled_corpus():
    paths = resolve_text_paths(None)
    assert paths == bundled_corpus()
    assert len(paths) == 6 and all(p.suffix == ".txt" and p.is_file() for p in paths)
    size = sum(p.stat().st_size for p in paths)
    assert 100_000 < size < 1_000_000, size
    assert len(read_documents(paths)) > 100


def test_resolve_text_paths_errors_and_forms(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        resolve_text_paths(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_text_paths(str(tmp_path / "missing"))
    (tmp_path / "b.txt").write_text("x")
    (tmp_path / "a.txt").write_text("y")
    (tmp_path / "c.md").write_text("z")
    assert resolve_text_paths(str(tmp_path)) == [tmp_path / "a.txt", tmp_path / "b.txt"]
    assert resolve_text_paths(str(tmp_path / "c.md")) == [tmp_path / "c.md"]
