"""lamda_pipe.prepare and lamda-prepare-data: token files equal direct tokenization, are
deterministic, never overwrite without --force, and never look complete after a crash."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lamda_pipe.data.loader import EOT, bundled_corpus
from lamda_pipe.data.prepare import FORMAT, is_val_document, prepare_data, read_meta, token_dtype
from lamda_pipe.data.text_sources import DataError, iter_documents
from lamda_pipe.data.tokenizer import load_tokenizer, tokenizer_sha256, train_tokenizer
from lamda_pipe.tools.prepare_data import main as prepare_main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def docs():
    return list(iter_documents([str(p) for p in bundled_corpus()]))


@pytest.fixture(scope="module")
def tok_path(docs, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(docs, vocab_size=2048).save(str(path))
    return path


def expected(tok, docs, val_fraction):
    """(train ids, val ids) by the documented rule, from tokenizer.encode one document at a time."""
    eot = tok.token_to_id(EOT)
    val = [is_val_document(i, val_fraction) for i in range(len(docs))]
    if val_fraction > 0 and len(docs) >= 2 and not any(val):
        val[-1] = True
    splits = ([], [])
    for d, v in zip(docs, val):
        splits[v].extend(tok.encode(d).ids + [eot])
    return [np.array(s, dtype=np.int64) for s in splits]


def read_split(out, name, meta):
    return np.fromfile(out / meta["splits"][name]["file"], dtype=meta["dtype"]).astype(np.int64)


@pytest.mark.distributed
def test_prepared_tokens_equal_direct_tokenization(docs, tok_path, tmp_path):
    meta = prepare_data(iter(docs), tok_path, tmp_path / "out", val_fraction=0.05, workers=2, batch_docs=7,
                        source="bible", progress=False)
    assert read_meta(tmp_path / "out") == meta
    want_train, want_val = expected(load_tokenizer(tok_path), docs, 0.05)
    assert np.array_equal(read_split(tmp_path / "out", "train", meta), want_train)
    assert np.array_equal(read_split(tmp_path / "out", "val", meta), want_val)
    n_val = sum(is_val_document(i, 0.05) for i in range(len(docs)))
    assert 0 < n_val == meta["splits"]["val"]["documents"] and meta["splits"]["train"]["documents"] == 149 - n_val


@pytest.mark.unit
def test_meta_json(docs, tok_path, tmp_path):
    meta = prepare_data(docs[:30], tok_path, tmp_path / "out", val_fraction=0.1, workers=1, source="first 30",
                        progress=False)
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk == meta
    assert set(meta) == {"format", "dtype", "vocab_size", "tokenizer_sha256", "eot_id", "source", "val_fraction",
                         "splits", "created"}
    tok = load_tokenizer(tok_path)
    assert meta["format"] == FORMAT == "lamda-pipe-tokens/1" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == 2048 and meta["eot_id"] == tok.token_to_id(EOT)
    assert meta["tokenizer_sha256"] == tokenizer_sha256(tok_path) == tokenizer_sha256(tmp_path / "out/tokenizer.json")
    assert meta["source"] == "first 30" and meta["val_fraction"] == 0.1
    for name in ("train", "val"):
        s = meta["splits"][name]
        assert s["file"] == f"{name}.bin" and (tmp_path / "out" / s["file"]).stat().st_size == 2 * s["tokens"]
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 30
    assert meta["created"].endswith("+00:00") and meta["created"][:4].isdigit()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "tokenizer.json", "train.bin",
                                                                   "val.bin"]


@pytest.mark.distributed
def test_deterministic_across_runs_and_worker_counts(docs, tok_path, tmp_path):
    outs = []
    for i, workers in enumerate([1, 2, 2]):
        prepare_data(docs, tok_path, tmp_path / f"o{i}", val_fraction=0.1, workers=workers, batch_docs=5,
                     progress=False)
        outs.append([(tmp_path / f"o{i}" / f).read_bytes() for f in ("train.bin", "val.bin", "tokenizer.json")])
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.distributed
def test_validation_split_rules(tok_path, tmp_path):
    fractions = [sum(is_val_document(i, f) for i in range(10_000)) / 10_000 for f in (0.01, 0.1, 0.5)]
    assert fractions == pytest.approx([0.01, 0.1, 0.5], abs=0.001)  # evenly spread, not just on average
    docs = [f"document number {i}" for i in range(10)]  # 0.01 of 10 hashes none into val
    assert not any(is_val_document(i, 0.01) for i in range(10))
    meta = prepare_data(docs, tok_path, tmp_path / "a", val_fraction=0.01, workers=2, batch_docs=3, progress=False)
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (9, 1)
    want_train, want_val = expected(load_tokenizer(tok_path), docs, 0.01)
    assert np.array_equal(read_split(tmp_path / "a", "train", meta), want_train)
    assert np.array_equal(read_split(tmp_path / "a", "val", meta), want_val)  # the last document
    read_meta(tmp_path / "a")  # sizes still agree after moving it
    meta = prepare_data(docs, tok_path, tmp_path / "b", val_fraction=0.0, progress=False)
    assert meta["splits"]["val"] == {"file": "val.bin", "tokens": 0, "documents": 0}
    with pytest.raises(DataError, match=r"all 1 document\(s\) went to validation"):
        prepare_data(["one"], tok_path, tmp_path / "c", val_fraction=0.9, progress=False)
    with pytest.raises(DataError, match=r"the input holds no documents"):
        prepare_data([], tok_path, tmp_path / "c", progress=False)
    with pytest.raises(DataError, match=r"--val-fraction must be in \[0, 1\)"):
        prepare_data(docs, tok_path, tmp_path / "c", val_fraction=1.0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


@pytest.mark.distributed
def test_token_dtype_follows_vocab_size(docs, tok_path, tmp_path):
    assert token_dtype(65536) == np.dtype("<u2") and token_dtype(65537) == np.dtype("<u4")
    # a tokenizer whose ids need 32 bits: 68000 unused pieces, then an added token (id 70048)
    spec = json.loads(tok_path.read_text(encoding="utf-8"))
    spec["model"]["vocab"].update({f"<extra_{i}>": 2048 + i for i in range(68000)})
    spec["added_tokens"].append({"id": 70048, "content": "<|big|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    (tmp_path / "big.json").write_text(json.dumps(spec), encoding="utf-8")
    big = load_tokenizer(tmp_path / "big.json")
    assert big.token_to_id("<|big|>") == 70048
    text = ["before <|big|> after", docs[0]]
    meta = prepare_data(text, tmp_path / "big.json", tmp_path / "out", val_fraction=0.0, workers=2, progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70049 == big.get_vocab_size()
    ids = np.fromfile(tmp_path / "out" / "train.bin", dtype="<u4")
    assert 70048 in ids and np.array_equal(ids, expected(big, text, 0.0)[0])


@pytest.mark.distributed
def test_refuses_to_overwrite_without_force(docs, tok_path, tmp_path):
    out = tmp_path / "out"
    prepare_data(docs[:10], tok_path, out, progress=False)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    with pytest.raises(DataError, match=r"--out .*out already exists; pass --force"):
        prepare_data(docs[10:20], tok_path, out, progress=False)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    def failing():
        yield from docs[10:20]
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):  # with --force, a failed run keeps the old data
        prepare_data(failing(), tok_path, out, force=True, batch_docs=2, progress=False)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    meta = prepare_data(docs[10:30], tok_path, out, force=True, progress=False)
    assert read_meta(out) == meta and meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .tmp- / .old- left behind
    # --force replaces prepared data only: never a directory of something else
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(DataError, match=r"without meta.json, not prepared data; refusing to replace it"):
        prepare_data(docs[:10], tok_path, tmp_path / "mine", force=True, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("workers", [pytest.param(1, marks=pytest.mark.unit),
                                     pytest.param(2, marks=pytest.mark.distributed)])  # 2: a worker pool
def test_failure_midway_leaves_nothing(docs, tok_path, tmp_path, workers):
    def failing():
        yield from docs[:40]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare_data(failing(), tok_path, tmp_path / "out", workers=workers, batch_docs=4, progress=False)
    assert list(tmp_path.iterdir()) == []


def _children(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.launch
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_sigkill_midway_leaves_no_output_and_no_workers(docs, tok_path, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("\n\n".join(docs * 60), encoding="utf-8")  # ~27 MB: seconds of work
    out = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--input", str(big),
                             "--tokenizer", str(tok_path), "--out", str(out), "--workers", "2", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tmp_dir = tmp_path / f"data.tmp-{proc.pid}"
    workers = []
    try:
        deadline = time.monotonic() + 60
        while not ((tmp_dir / "train.bin").is_file() and (tmp_dir / "train.bin").stat().st_size > 0):
            assert proc.poll() is None, f"finished before it could be killed: {proc.communicate()}"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        workers = _children(proc.pid)  # the 2 workers and multiprocessing's resource tracker
        os.kill(proc.pid, signal.SIGKILL)  # the main process only: its workers must follow by themselves
        proc.wait()
        assert len(workers) >= 2
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, workers))
    finally:
        proc.kill()
        proc.wait()
        for pid in filter(_alive, workers):
            os.kill(pid, signal.SIGKILL)
    assert not out.exists() and tmp_dir.is_dir() and not (tmp_dir / "meta.json").exists()
    with pytest.raises(DataError, match=r"unfinished work dir of a lamda-prepare-data run"):
        read_meta(tmp_dir)
    # the next run cleans up the dead run's leftovers and succeeds
    prepare_data(docs[:10], tok_path, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt", "data"]


@pytest.mark.unit
def test_read_meta_errors(docs, tok_path, tmp_path):
    with pytest.raises(DataError, match=r"missing: no such data dir; prepare it with `lamda-prepare-data"):
        read_meta(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty is not a prepared data dir: no meta.json; prepare it with"):
        read_meta(tmp_path / "empty")
    out = tmp_path / "out"
    meta = prepare_data(docs[:20], tok_path, out, val_fraction=0.2, workers=1, progress=False)
    n = meta["splits"]["val"]["tokens"]
    with open(out / "val.bin", "r+b") as f:
        f.truncate(2 * n - 2)
    with pytest.raises(DataError, match=rf"val.bin holds {2 * n - 2} bytes, but meta.json says {n} tokens x 2"):
        read_meta(out)
    (out / "meta.json").write_text(json.dumps({**meta, "format": "something-else/9"}))
    with pytest.raises(DataError, match=r"format 'something-else/9', expected 'lamda-pipe-tokens/1'"):
        read_meta(out)
    (out / "meta.json").write_text("{broken")
    with pytest.raises(DataError, match=r"meta.json: not valid JSON"):
        read_meta(out)


# --- lamda-prepare-data ----------------------------------------------------------------------------

@pytest.mark.distributed
def test_cli_prepares_a_dir(docs, tok_path, tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:30]))
    out = tmp_path / "data" / "docs"
    assert prepare_main(["--input", str(tmp_path / "a.jsonl"), "--tokenizer", str(tok_path), "--out", str(out),
                         "--val-fraction", "0.1", "--no-progress"]) == 0
    meta = read_meta(out)
    printed = capsys.readouterr().out
    assert f"train: {meta['splits']['train']['tokens']:,} tokens" in printed and "tokens/s" in printed
    assert meta["source"] == f"files {tmp_path / 'a.jsonl'} field text"
    want_train, _ = expected(load_tokenizer(tok_path), docs[:30], 0.1)
    assert np.array_equal(read_split(out, "train", meta), want_train)


@pytest.mark.unit
@pytest.mark.parametrize("extra, message", [
    (["--input", "missing.txt"], "error: --input missing.txt: no such file"),
    (["--input", "a.txt", "--tokenizer", "nope.json"], "error: --tokenizer nope.json: no such file"),
    (["--input", "a.txt", "--val-fraction", "1.5"], "error: --val-fraction must be in [0, 1)"),
    (["--input", "a.txt", "--out", "taken"], "error: --out taken already exists; pass --force"),
    (["--input", "a.txt", "--split", "test"], "error: --split applies to --dataset only"),
    ([], "error: one of the arguments --input --dataset is required"),
])
def test_cli_bad_input_is_one_line_exit_2(tok_path, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("one\n\ntwo")
    (tmp_path / "taken").mkdir()
    args = ["--tokenizer", str(tok_path), "--out", "new"]
    assert prepare_main(args + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "taken"]


@pytest.mark.launch
def test_cli_hub_dataset_offline(tok_path, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "lamda_pipe.tools.prepare_data", "--dataset", "EleutherAI/pile",
                        "--streaming", "--tokenizer", str(tok_path), "--out", str(tmp_path / "pile")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and time.monotonic() - start < 60
    assert r.stderr.startswith("error: could not reach dataset EleutherAI/pile on the Hugging Face Hub")
    assert r.stderr.count("\n") == 1 and "--input" in r.stderr
    assert not (tmp_path / "pile").exists()


@pytest.mark.launch
def test_prepare_and_its_workers_import_no_torch():
    """Each spawned worker imports lamda_pipe.data.prepare (and through it lamda_pipe.distributed,
    for pid_alive): neither may pull in torch or DeepSpeed, seconds of start-up per worker. Nor may
    a --shard task (data/prepare_parts.py), started once per slice of the input."""
    code = ("import sys, lamda_pipe.data.prepare, lamda_pipe.distributed, lamda_pipe.data.prepare_parts; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'numpy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == "['numpy']"  # numpy is needed; it shows the check sees imports
