"""Data prepared in parts (`lamda-prepare-data --shard i/N`, lamda_pipe/data/parts.py): the parts,
concatenated in shard order, are the one-process prepare's token files; training reads them as one
source with the same samples; complete parts are skipped, interrupted ones redone; a dir with a
missing part, or a task with another N, tokenizer or option, is refused before any work.
The real Slurm array (kill and rerun) is in tests/test_slurm_prepare.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lamda_pipe.data.loader import DataSource, MicroBatchStream, bundled_corpus, open_sources
from lamda_pipe.data.parts import PartTokens, Shard, parse_shard, shard_list
from lamda_pipe.data.prepare_parts import InputPiece, input_pieces, plan_shards, prepare_shard
from lamda_pipe.data.prepare import prepare_data, read_meta
from lamda_pipe.data.text_sources import DataError, iter_documents
from lamda_pipe.data.tokenizer import train_tokenizer
from lamda_pipe.tools.prepare_data import main as prepare_main

pytestmark = pytest.mark.unit

FILES = [str(p) for p in bundled_corpus()]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(list(iter_documents(FILES)), vocab_size=2048).save(str(path))
    return path


@pytest.fixture(scope="module")
def other_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok2") / "tokenizer.json"
    train_tokenizer(list(iter_documents(FILES))[:40], vocab_size=1024).save(str(path))
    return path


def pieces(files=FILES):
    return input_pieces({"inputs": files, "dataset": None, "text_field": "text", "max_docs": None, "max_bytes": None})


def shard(tok, out, i, n, val_fraction=0.05, log=None, parts=None):
    return prepare_shard(parts or pieces(), tok, out, Shard(i, n), val_fraction=val_fraction, workers=1,
                         batch_docs=7, log=log or (lambda line: None))


def whole(source: DataSource, split: str) -> np.ndarray:
    return np.asarray(source.tokens(split)).astype(np.int64)


@pytest.mark.parametrize("n, val_fraction", [(1, 0.05), (3, 0.05), (7, 0.2), (4, 0.0001), (5, 0.0)])
def test_parts_equal_the_one_process_prepare(tok_path, tmp_path, n, val_fraction):
    """The oracle: the same tokens, in the same document order, split the same way, the same
    samples. Shards written in reverse order. 0.0001 hashes no document into validation: the
    last shard applies the at-least-one rule."""
    one = prepare_data(iter_documents(FILES), tok_path, tmp_path / "one", val_fraction=val_fraction, workers=1,
                       progress=False)
    for i in reversed(range(n)):
        shard(tok_path, tmp_path / "parts", i, n, val_fraction)
    meta = read_meta(tmp_path / "parts")
    a, b = DataSource(tmp_path / "one", 1.0, one), DataSource(tmp_path / "parts", 1.0, meta)
    for split in ("train", "val"):
        assert np.array_equal(whole(a, split), whole(b, split))
        assert {k: meta["splits"][split][k] for k in ("tokens", "documents")} == \
            {k: one["splits"][split][k] for k in ("tokens", "documents")}
    assert (val_fraction == 0) == (meta["splits"]["val"]["tokens"] == 0)
    for document_mask in (False, True):
        sa = a.split("train", document_mask).samples(37, seed=5, shuffle=True)
        sb = b.split("train", document_mask).samples(37, seed=5, shuffle=True)
        assert sa.num_samples == sb.num_samples
        for k in range(0, 2 * sa.num_samples, 7):
            ra, rb = sa.row(k), sb.row(k)
            assert np.array_equal(ra.tokens, rb.tokens)
            assert (ra.doc is None and rb.doc is None) or np.array_equal(ra.doc, rb.doc)


def test_a_parts_dir_trains_as_one_source(tok_path, tmp_path):
    prepare_data(iter_documents(FILES), tok_path, tmp_path / "one", val_fraction=0.05, workers=1, progress=False)
    for i in range(3):
        shard(tok_path, tmp_path / "parts", i, 3)
    streams = []
    for d in ("one", "parts"):
        (src,) = open_sources(str(tmp_path / d), model_vocab=2048, seq_len=64)
        streams.append(MicroBatchStream([src.split("train")], 64, 4, dp_rank=1, dp_size=2, seed=3))
    for m in (0, 1, 50, 999):
        (xa, ya), (xb, yb) = streams[0].micro_batch(m, 17), streams[1].micro_batch(m, 17)
        assert xa.equal(xb) and ya.equal(yb)


def test_part_tokens_slices_across_parts():
    arrays = [np.arange(0, 5), np.zeros(0, np.int64), np.arange(5, 8), np.arange(8, 20)]
    t, ref = PartTokens(arrays, np.int64), np.arange(20)
    assert len(t) == 20 and t.max() == 19 and t[7] == 7 and t[-1] == 19
    for lo in range(21):
        for hi in range(lo, 22):
            assert np.array_equal(t[lo:hi], ref[lo:hi]), (lo, hi)


def test_complete_parts_are_skipped_and_say_so(tok_path, tmp_path):
    out = tmp_path / "parts"
    first = shard(tok_path, out, 1, 3)
    part = out / "parts" / "00001-of-00003"
    stamp = {p.name: p.stat().st_mtime_ns for p in part.iterdir()}
    lines = []
    unread = [InputPiece(p.name, p.size, lambda: pytest.fail("the input was read")) for p in pieces()]
    again = shard(tok_path, out, 1, 3, log=lines.append, parts=unread)
    assert again["skipped"] and not first["skipped"]
    assert lines == [f"shard 1/3: {part} is complete ({first['documents']:,} documents); skipped"]
    assert {p.name: p.stat().st_mtime_ns for p in part.iterdir()} == stamp
    # a damaged meta.json: the part is redone (a lost tokenizer.json comes back with any shard)
    for i in (0, 2):
        shard(tok_path, out, i, 3)
    (out / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="tokenizer.json is missing; run any shard again"):
        read_meta(out)
    (part / "meta.json").write_text(json.dumps({"format": "lamda-pipe-part/1"}))
    lines.clear()
    assert not shard(tok_path, out, 1, 3, log=lines.append)["skipped"]
    assert lines[0] == f"shard 1/3: {part}/meta.json: no train split with file and tokens (damaged); it is redone by " \
                       f"running --shard 1/3 again"
    assert lines[1:] == ["shard 1/3: removing 00001-of-00003, incomplete"]
    (out / "tokenizer.json").unlink()
    assert shard(tok_path, out, 1, 3)["skipped"]
    assert read_meta(out)["num_shards"] == 3


def test_an_interrupted_part_looks_incomplete_and_is_redone(tok_path, tmp_path):
    out = tmp_path / "parts"
    shard(tok_path, out, 0, 2)

    def failing():
        yield from iter_documents(FILES[-1], max_docs=3)
        raise RuntimeError("disk gone")

    broken = pieces()
    broken[-1] = InputPiece(broken[-1].name, broken[-1].size, failing)
    with pytest.raises(RuntimeError, match="disk gone"):
        shard(tok_path, out, 1, 2, parts=broken)
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["00000-of-00002"]
    with pytest.raises(DataError, match=r"1 of them are missing or incomplete: shard\(s\) 1; run"):
        read_meta(out)
    # What a SIGKILL leaves: a .tmp dir with data and the dead task's owner line (another host's here).
    left = out / "parts" / "00001-of-00002.tmp-999999"
    left.mkdir()
    (left / "train.bin").write_bytes(b"\0" * 100)
    (left / ".owner").write_text("another-host 12345\n")
    lines = []
    shard(tok_path, out, 1, 2, log=lines.append)
    assert lines == ["shard 1/2: removing 00001-of-00002.tmp-999999, left by an interrupted run"]
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["00000-of-00002", "00001-of-00002"]
    assert read_meta(out)["splits"]["train"]["documents"] > 0


def test_missing_parts_are_named_before_training(tok_path, tmp_path):
    out = tmp_path / "parts"
    for i in (0, 3, 4):
        shard(tok_path, out, i, 8)
    message = (f"{out} is prepared in 8 parts, and 5 of them are missing or incomplete: shard(s) 1-2,5-7; run "
               f"`lamda-prepare-data ... --shard i/8 --out {out}` for each (with scripts/slurm/prepare.sbatch: "
               f"sbatch --array=1-2,5-7 with LAMDA_SHARDS=8; complete parts are skipped)")
    with pytest.raises(DataError) as e:
        open_sources(str(out), model_vocab=2048, seq_len=16)
    assert str(e.value) == message
    # a truncated part counts as incomplete
    for i in (1, 2, 5, 6, 7):
        shard(tok_path, out, i, 8)
    assert read_meta(out)["num_shards"] == 8
    train = out / "parts" / "00006-of-00008" / "train.bin"
    train.write_bytes(train.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"1 of them are missing or incomplete: shard\(s\) 6;"):
        read_meta(out)


@pytest.mark.parametrize("case, message", [
    ("count", "--out OUT was started with 4 shards, this task says --shard i/3; run --shard i/4 (every task the "
              "same N), or pick another --out"),
    ("tokenizer", "--out OUT was started with another tokenizer (sha256 "),
    ("val", "--out OUT was started with val_fraction 0.05, this task has 0.1; give every task the same input and "
            "options, or pick another --out"),
    ("files", "the input differs from the one OUT was started on: 6 input pieces then, 2 now; give every task the "
              "same input (unchanged while the dir is prepared), or pick another --out"),
])
def test_a_task_that_disagrees_with_the_dir_is_refused(tok_path, other_tok, tmp_path, case, message):
    out = tmp_path / "parts"
    shard(tok_path, out, 0, 4)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = {"tok": tok_path, "out": out, "i": 1, "n": 4, **{
        "count": dict(n=3), "tokenizer": dict(tok=other_tok), "val": dict(val_fraction=0.1),
        "files": dict(parts=pieces(FILES[:2]))}[case]}
    with pytest.raises(DataError) as e:
        shard(**args)
    assert str(e.value).startswith(message.replace("OUT", str(out)))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_changed_input_is_refused(tok_path, tmp_path):
    files = [tmp_path / f"{k}.txt" for k in range(3)]
    for k, f in enumerate(files):
        f.write_text("\n\n".join(f"document {k}.{j}" for j in range(5)))
    out = tmp_path / "parts"
    shard(tok_path, out, 0, 2, parts=pieces(files))
    with files[1].open("a") as f:
        f.write("\n\none more")
    with pytest.raises(DataError, match=rf"^the input differs from the one {out} was started on: {files[1]} \(size 68 "
                                        rf"then, 78 now\); give every task the same input"):
        shard(tok_path, out, 1, 2, parts=pieces(files))
    assert not (out / "parts" / "00001-of-00002").exists()


def test_tasks_racing_on_a_changed_input_are_refused(tok_path, tmp_path):
    """Input that is one piece (a dataset, or --max-docs): no file sizes to compare, so a task that
    counted differently from the task that wrote the plan is refused (the other task is simulated
    by writing the plan while this one counts)."""
    out = tmp_path / "parts"
    whole = InputPiece("the whole input", None, lambda: iter_documents(FILES))

    def fewer():
        plan_shards([whole], tok_path, out, 2, val_fraction=0.05)  # the other task wins the race
        yield from iter_documents(FILES, max_docs=100)

    with pytest.raises(DataError, match=rf"^the input holds 100 documents, but {out} was started on 149 \(the input "
                                        rf"changed\?\)"):
        shard(tok_path, out, 1, 2, parts=[InputPiece("the whole input", None, fewer)])
    assert sorted(p.name for p in out.iterdir()) == ["parts.json", "tokenizer.json"]  # the other task's


def test_with_a_plan_a_task_reads_only_the_files_of_its_slice(tok_path, tmp_path):
    out = tmp_path / "parts"
    plan = plan_shards(pieces(), tok_path, out, 3, val_fraction=0.05)
    assert plan["documents"] == 149 and sum(plan["piece_documents"]) == 149 and len(plan["piece_documents"]) == 6
    opened = []

    def recording(piece):
        return InputPiece(piece.name, piece.size, lambda: (opened.append(piece.name), piece.documents())[1])

    starts = np.cumsum([0] + plan["piece_documents"])
    for i in range(3):
        opened.clear()
        shard(tok_path, out, i, 3, parts=[recording(p) for p in pieces()])
        lo, hi = Shard(i, 3).documents(149)
        assert opened == [p.name for p, a, b in zip(pieces(), starts, starts[1:]) if a < hi and b > lo]
        assert len(opened) < 6
    one = prepare_data(iter_documents(FILES), tok_path, tmp_path / "one", val_fraction=0.05, workers=1,
                       progress=False)
    assert read_meta(out)["splits"]["train"]["tokens"] == one["splits"]["train"]["tokens"]


def test_shard_spec():
    assert parse_shard("3/16") == Shard(3, 16) and Shard(3, 16).name == "00003-of-00016"
    for bad in ("16/16", "3", "-1/4", "a/b", "1/0"):
        with pytest.raises(DataError, match="expected i/N with 0 <= i < N"):
            parse_shard(bad)
    assert shard_list([7, 1, 2, 5, 6]) == "1-2,5-7" and shard_list([0]) == "0"
    assert [Shard(i, 3).documents(10) for i in range(3)] == [(0, 3), (3, 6), (6, 10)]


@pytest.mark.parametrize("extra, message", [
    (["--shard", "1/2"], "error: --shard needs --tokenizer: every shard must use the same one; train it once"),
    (["--shard", "2/2", "--tokenizer", "TOK"], "error: argument --shard: --shard '2/2': expected i/N"),
    (["--shard", "0/2", "--tokenizer", "TOK", "--force"], "error: --shard never replaces data: drop --force"),
    (["--shard", "0/2", "--tokenizer", "TOK", "--format", "dialog"],
     "error: --shard applies to --format text only; dialog data is read from --input files, whole, in one process"),
    (["--shard", "0/2", "--tokenizer", "TOK", "--out", "done"],
     "error: --out done holds a complete prepared dir, not parts of one; --shard never replaces data"),
    (["--shard", "0/2", "--tokenizer", "TOK", "--out", "other"],
     "error: --out other is a non-empty directory without parts.json, not a dir of parts; pick another --out"),
    (["--shard", "0/3", "--tokenizer", "TOK"],
     "error: the input holds 2 document(s), fewer than 3 shards; use at most 2 shards"),
    ([], "error: the following arguments are required: --tokenizer"),
    (["--plan-shards", "2"], "error: --plan-shards needs --tokenizer: every shard must use the same one"),
    (["--plan-shards", "2", "--shard", "0/2", "--tokenizer", "TOK"],
     "error: --plan-shards and --shard are separate steps: plan once, then run each --shard i/N task"),
    (["--plan-shards", "0", "--tokenizer", "TOK"], "error: --plan-shards must be >= 1, got 0"),
])
def test_cli_shard_refusals_are_one_line_exit_2(tok_path, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("one\n\ntwo")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "meta.json").write_text("{}")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    args = ["--input", "a.txt", "--out", "new", "--no-progress"] + [str(tok_path) if a == "TOK" else a for a in extra]
    assert prepare_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_cli_shard_reports_progress(tok_path, tmp_path, capsys):
    out = tmp_path / "parts"
    base = ["--input", *FILES, "--tokenizer", str(tok_path), "--out", str(out), "--workers", "1", "--no-progress"]
    assert prepare_main(base + ["--shard", "1/2"]) == 0
    printed = capsys.readouterr().out
    assert "shard 1/2: documents 74 to 148 of 149:" in printed and "tokens/s" in printed
    assert printed.endswith("1 of 2 parts complete; still to run: shard(s) 0\n")
    assert prepare_main(base + ["--shard", "0/2"]) == 0
    assert capsys.readouterr().out.endswith(f"all 2 parts complete: {out} is ready (ds_train.py --data {out})\n")
    assert prepare_main(base + ["--shard", "0/2"]) == 0
    assert "shard 0/2: " + str(out / "parts" / "00000-of-00002") + " is complete" in capsys.readouterr().out
    assert json.loads((out / "parts.json").read_text())["documents"] == 149


def test_cli_plan_shards_counts_once(tok_path, tmp_path, capsys):
    out = tmp_path / "parts"
    base = ["--input", *FILES, "--tokenizer", str(tok_path), "--out", str(out), "--workers", "1", "--no-progress"]
    assert prepare_main(base + ["--plan-shards", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("plan for 2 shards: 149 documents in 6 input piece(s), counted in ")
    assert printed.endswith(f"now run --shard i/2 for i in 0..1 (wrote {out / 'parts.json'})\n")
    assert sorted(p.name for p in out.iterdir()) == ["parts.json", "tokenizer.json"]
    assert prepare_main(base + ["--plan-shards", "3"]) == 2
    assert "was started with 2 shards, this task says --shard i/3" in capsys.readouterr().err
    for i in range(2):
        assert prepare_main(base + ["--shard", f"{i}/2"]) == 0
    assert read_meta(out)["splits"]["train"]["documents"] + read_meta(out)["splits"]["val"]["documents"] == 149


def test_a_shard_being_prepared_now_on_this_host_is_not_touched(tok_path, tmp_path):
    """Its work dir's owner is a live process here (this test's parent stands in for it)."""
    import socket

    out = tmp_path / "parts"
    shard(tok_path, out, 0, 2)
    busy = out / "parts" / "00001-of-00002.tmp-4242"
    busy.mkdir()
    (busy / ".owner").write_text(f"{socket.gethostname()} {os.getppid()}\n")
    (busy / "train.bin").write_bytes(b"\1\2")
    with pytest.raises(DataError, match=rf"^shard 1/2 is being prepared right now by process {os.getppid()} "
                                        rf"\({busy}\); wait for it, or stop it and run this again$"):
        shard(tok_path, out, 1, 2, parts=[InputPiece(p.name, p.size, lambda: pytest.fail("the input was read"))
                                          for p in pieces()])
    assert (busy / "train.bin").read_bytes() == b"\1\2"


def test_a_part_from_another_dir_is_refused(tok_path, tmp_path):
    import shutil

    for name, val_fraction in (("a", 0.05), ("b", 0.1)):
        for i in range(2):
            shard(tok_path, tmp_path / name, i, 2, val_fraction)
    part = tmp_path / "a" / "parts" / "00001-of-00002"
    message = (f"{part} does not belong to {tmp_path / 'a'}'s plan (other options or input, or another shard's "
               f"slice); remove it and run --shard 1/2 again")
    for source in (tmp_path / "b" / "parts" / "00001-of-00002", tmp_path / "a" / "parts" / "00000-of-00002"):
        saved = tmp_path / "saved"
        shutil.move(part, saved)
        shutil.copytree(source, part)
        with pytest.raises(DataError) as e:
            read_meta(tmp_path / "a")
        assert str(e.value) == message
        shutil.rmtree(part)
        shutil.move(saved, part)
    assert read_meta(tmp_path / "a")["num_shards"] == 2


def test_a_dir_of_parts_named_data_is_not_taken_for_the_bundled_corpus(tok_path, tmp_path):
    """A resume compares data by name; a dir named 'data' without meta.json would otherwise look
    like a moved demo run's bundled corpus (loader.is_bundled_data)."""
    from lamda_pipe.data.loader import is_bundled_data

    data = tmp_path / "shared" / "data"
    assert is_bundled_data(str(data), tmp_path / "run")  # a missing '.../data': a moved demo run's
    shard(tok_path, data, 0, 1)
    assert not is_bundled_data(str(data), tmp_path / "run")


def test_a_dataset_is_counted_in_row_ranges_and_gives_the_one_process_tokens(tok_path, tmp_path, monkeypatch):
    """A Hugging Face dataset that is not streamed: pieces of rows (empty rows skipped as
    iter_documents skips them); streamed, the whole dataset is one piece."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    texts = [d if i % 10 else "  " for i, d in enumerate(iter_documents(FILES))]
    (tmp_path / "ds").mkdir()
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "ds" / "train.parquet"))
    source = {"inputs": None, "dataset": str(tmp_path / "ds"), "config": None, "split": "train", "text_field": "text",
              "streaming": False, "max_docs": None, "max_bytes": None}
    rows = input_pieces(source)
    assert [(p.name, p.size) for p in rows[:2]] == [("rows 0-0", 1), ("rows 1-1", 1)] and len(rows) == 149
    assert [p.name for p in input_pieces({**source, "streaming": True})] == ["the whole input"]
    out = tmp_path / "parts"
    plan = plan_shards(rows, tok_path, out, 3, val_fraction=0.05)
    assert plan["documents"] == 149 - 15 and plan["piece_documents"][:11] == [0] + [1] * 9 + [0]
    for i in range(3):
        prepare_shard(rows, tok_path, out, Shard(i, 3), val_fraction=0.05, workers=1, log=lambda line: None)
    one = prepare_data(iter_documents(dataset=str(tmp_path / "ds")), tok_path, tmp_path / "one", val_fraction=0.05,
                       workers=1, progress=False)
    a, b = DataSource(tmp_path / "one", 1.0, one), DataSource(out, 1.0, read_meta(out))
    for split in ("train", "val"):
        assert np.array_equal(whole(a, split), whole(b, split))
