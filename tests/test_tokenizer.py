"""lamda_pipe.tokenizer and lamda-train-tokenizer: SentencePiece-style BPE with byte fallback,
its identity hash, and tokenizer files trained elsewhere (GPT-2-style byte-level BPE)."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lamda_pipe.data.loader import EOT, PAD, UNK, bundled_corpus
from lamda_pipe.data.prepare import prepare_data
from lamda_pipe.data.text_sources import DataError, iter_documents
from lamda_pipe.data.tokenizer import (BYTE_TOKENS, eot_id, load_tokenizer, special_ids, tokenizer_sha256,
                                  train_tokenizer)
from lamda_pipe.tools.train_tokenizer import main as train_main

UNICODE = "naïve café — 東京 🙂 Ünïcödé  two  spaces\nnewline"
UNSEEN = "∑ ж ✓ \u00a0 \t tabs 𝔘𝔫𝔦 ﷽ 🙂🙃 \x00\x7f"


@pytest.fixture(scope="module")
def corpus_docs():
    return list(iter_documents([str(p) for p in bundled_corpus()]))


@pytest.fixture(scope="module")
def tok(corpus_docs):
    return train_tokenizer(corpus_docs, vocab_size=2048)


@pytest.mark.unit
def test_round_trip_is_exact_on_non_ascii_text(tok, corpus_docs):
    for text in (UNICODE, UNSEEN, "trailing spaces  ", "a\n\n\nb", corpus_docs[3], "x" * 500):
        assert tok.decode(tok.encode(text).ids) == text


@pytest.mark.unit
def test_unseen_characters_fall_back_to_bytes_not_unk(tok):
    enc = tok.encode(UNSEEN)
    assert special_ids(tok)["unk"] not in enc.ids
    assert "<0xE2>" in enc.tokens  # the first byte of ∑ (U+2211), absent from the corpus
    model_vocab = tok.get_vocab(with_added_tokens=False)
    assert all(b in model_vocab for b in BYTE_TOKENS)  # in the BPE model, where byte fallback looks


@pytest.mark.unit
def test_special_tokens_present_and_distinct(tok):
    ids = special_ids(tok)
    assert set(ids) == {"eot", "pad", "unk"}
    assert None not in ids.values() and len(set(ids.values())) == 3
    assert ids == {"eot": tok.token_to_id(EOT), "pad": tok.token_to_id(PAD), "unk": tok.token_to_id(UNK)}
    # the end-of-text marker in text is the one special token, not spelled out in pieces
    assert tok.encode(f"a{EOT}b").ids.count(ids["eot"]) == 1


@pytest.mark.unit
def test_vocab_size_is_exact_when_the_text_allows(tok, corpus_docs):
    assert tok.get_vocab_size() == 2048
    assert max(tok.get_vocab().values()) == 2047  # ids 0..2047, no gaps
    small = train_tokenizer(corpus_docs, vocab_size=300)  # alphabet (72 chars) capped to fit
    assert small.get_vocab_size() == 300
    assert small.decode(small.encode(UNICODE).ids) == UNICODE
    big = train_tokenizer(corpus_docs[:3], vocab_size=32000)  # 3 chapters cannot fill 32000 tokens
    assert 256 + 3 < big.get_vocab_size() < 32000


@pytest.mark.unit
def test_invalid_training_input():
    with pytest.raises(DataError, match=r"--vocab-size 200 is too small.*>= 268"):
        train_tokenizer(["some text"], vocab_size=200)
    with pytest.raises(DataError, match=r"no documents to train the tokenizer on"):
        train_tokenizer(iter([]), vocab_size=300)


@pytest.mark.unit
def test_hash_is_stable_across_save_and_load(tok, corpus_docs, tmp_path):
    h = tokenizer_sha256(tok)
    tok.save(str(tmp_path / "pretty.json"), pretty=True)
    tok.save(str(tmp_path / "compact.json"), pretty=False)
    spec = json.loads((tmp_path / "pretty.json").read_text(encoding="utf-8"))
    reordered = {k: spec[k] for k in reversed(list(spec))}
    (tmp_path / "reordered.json").write_text(json.dumps(reordered, indent=4), encoding="utf-8")
    assert (tmp_path / "pretty.json").read_bytes() != (tmp_path / "compact.json").read_bytes()
    for name in ("pretty.json", "compact.json", "reordered.json"):
        assert tokenizer_sha256(tmp_path / name) == h
        assert tokenizer_sha256(load_tokenizer(tmp_path / name)) == h
    assert tokenizer_sha256(train_tokenizer(corpus_docs, vocab_size=2047)) != h
    assert tokenizer_sha256(train_tokenizer(corpus_docs, vocab_size=2048)) == h  # training is deterministic


@pytest.mark.unit
def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match=r"--tokenizer .*nope\.json: no such file"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match=r"bad\.json: not a Hugging Face tokenizers file"):
        load_tokenizer(tmp_path / "bad.json")


def gpt2_style_tokenizer(docs) -> Tokenizer:
    """Byte-level BPE as GPT-2's: end-of-text is its only special token; no pad, no unk."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=400, special_tokens=[EOT], show_progress=False,
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return t


@pytest.mark.distributed
def test_gpt2_style_tokenizer_works_with_prepare_data(corpus_docs, tmp_path):
    g = gpt2_style_tokenizer(corpus_docs[:20])
    g.save(str(tmp_path / "gpt2.json"))
    assert special_ids(g) == {"eot": g.token_to_id(EOT), "pad": None, "unk": None}
    docs = corpus_docs[:12] + [UNICODE]
    meta = prepare_data(docs, tmp_path / "gpt2.json", tmp_path / "out", val_fraction=0.0, workers=2, batch_docs=3,
                        progress=False)
    assert meta["eot_id"] == eot_id(g) and meta["vocab_size"] == g.get_vocab_size() == 400
    want = np.array([t for d in docs for t in g.encode(d).ids + [eot_id(g)]], dtype=np.uint16)
    assert np.array_equal(np.fromfile(tmp_path / "out" / "train.bin", dtype="<u2"), want)
    assert tokenizer_sha256(tmp_path / "out" / "tokenizer.json") == tokenizer_sha256(g)


@pytest.mark.unit
def test_a_tokenizer_without_end_of_text_is_refused(corpus_docs, tmp_path):
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator(corpus_docs[:5], trainers.BpeTrainer(vocab_size=300, show_progress=False))
    t.save(str(tmp_path / "no-eot.json"))
    with pytest.raises(DataError, match=r"no end-of-text token '<\|endoftext\|>'"):
        prepare_data(corpus_docs[:5], tmp_path / "no-eot.json", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# --- lamda-train-tokenizer -----------------------------------------------------------------------

@pytest.mark.unit
def test_cli_trains_and_refuses_to_overwrite(tmp_path, capsys, corpus_docs):
    out = tmp_path / "sub" / "tok.json"
    inputs = [str(p) for p in bundled_corpus()]
    assert train_main(["--input", *inputs, "--vocab-size", "1024", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    tok = load_tokenizer(out)
    assert tok.get_vocab_size() == 1024
    assert f"sha256 {tokenizer_sha256(out)}" in printed and "149 documents" in printed
    before = out.read_bytes()
    assert train_main(["--input", *inputs, "--vocab-size", "512", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --out") and "--force" in err
    assert out.read_bytes() == before
    assert train_main(["--input", inputs[0], "--vocab-size", "512", "--out", str(out), "--force",
                       "--max-docs", "5", "--no-progress"]) == 0
    assert load_tokenizer(out).get_vocab_size() <= 512 and out.read_bytes() != before
    assert not list(tmp_path.glob("sub/*.tmp-*"))


@pytest.mark.unit
@pytest.mark.parametrize("args, message", [
    (["--input", "missing.txt"], "error: --input missing.txt: no such file"),
    (["--dataset", "x", "--input", "y.txt"], "error: argument --input: not allowed with argument --dataset"),
    (["--input", "x.txt", "--max-bytes", "lots"], "error: argument --max-bytes: not a size"),
    (["--vocab-size", "100", "--input", "x.txt"], "error: --vocab-size 100 is too small"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert train_main(args + ["--out", "t.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "t.json").exists()
