"""Refusals that had no test of their own (docs/errors.md names these tests): each bad flag, damaged
file or unusable model is refused with its message, and nothing is created or changed. In-process
only: the tools' main(argv) (exit status 2, one `error: ...` line on stderr) or the library call
that refuses."""

import json
import re
import shutil
from pathlib import Path

import pytest

from lamda_pipe.errors import CheckpointError, ConfigError, DataError
from tests.helpers import TINY, tiny_model, train_tiny_tokenizer, write_layer_files, write_run_info
from tests.test_preflight import fake_checkpoint, launch_env, plan  # noqa: F401 (launch_env: a fixture)
from tests.test_text_sources import hf_offline  # noqa: F401 (a fixture: HF_HUB_OFFLINE=1, a private cache)

pytestmark = pytest.mark.unit


def files_under(root: Path) -> dict:
    """Every file under root with its bytes: a refusal must leave them as they were."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, (out, err)
    return err


def plain_bpe_tokenizer(path: Path) -> Path:
    """A byte-level BPE with no special tokens at all: no <|endoftext|>, no dialog tokens (a GPT-2
    style tokenizer from elsewhere)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from tests.helpers import CORPUS

    docs = [d for d in CORPUS.read_text().split("\n\n") if d.strip()][:5]
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    t.save(str(path))
    return path


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    return {"tok": train_tiny_tokenizer(root / "tokenizer.json"), "plain": plain_bpe_tokenizer(root / "plain.json")}


def write_checkpoint(tag: Path, cfg, tokenizer: Path | None, dialog: dict | None = None) -> Path:
    """A one-checkpoint run dir: layer files, run record (with `dialog`), tokenizer, `latest`."""
    from lamda_pipe.run_format import RUN_RECORD, RunRecord

    write_layer_files(tiny_model(cfg), tag)
    write_run_info(tag, cfg, 3, tokenizer)
    if dialog is not None:
        record = RunRecord.from_dict(json.loads((tag / RUN_RECORD).read_text()))
        (tag / RUN_RECORD).write_text(RunRecord(**{**record.__dict__, "dialog": dialog}).to_json())
    (tag.parent / "latest").write_text(tag.name)
    return tag.parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory, toks):
    from lamda_pipe.data.tokenizer import load_tokenizer, vocab_size
    from lamda_pipe.export import export_checkpoint

    root = tmp_path_factory.mktemp("models")
    vocab = max(vocab_size(load_tokenizer(toks["tok"])), vocab_size(load_tokenizer(toks["plain"])))
    cfg = TINY.replace(vocab_size=vocab)
    tag = "checkpoints/global_step3"
    run = write_checkpoint(root / "run" / tag, cfg, toks["tok"])
    return {
        "run": run,
        "export": export_checkpoint(run, root / "export"),
        "plain": write_checkpoint(root / "plain" / tag, cfg, toks["plain"]),  # no dialog tokens, no end-of-text
        "rated_plain": write_checkpoint(root / "rated_plain" / tag, cfg, toks["plain"], {"attributes": ["safe"]}),
        "small": write_checkpoint(root / "small" / tag, TINY, None),  # 97 tokens, no tokenizer beside it
    }


# --- Start-up and input: ds_train.py ----------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--max-rollbacks", "-1"], "--max-rollbacks must be >= 0 (0: stop at the first failure), got -1"),
    (["--spike-factor", "1"], "--spike-factor must be > 1 (0: off), got 1.0"),
    (["--spike-factor", "-2"], "--spike-factor must be > 1 (0: off), got -2.0"),
    (["--spike-factor", "nan"], "--spike-factor must be > 1 (0: off), got nan"),
    (["--hang-timeout", "0"], "--hang-timeout must be > 0 seconds, got 0.0"),
    (["--stop-timeout", "-5"], "--stop-timeout must be > 0 seconds, got -5.0"),
    (["--sample-tokens", "-1"], "--sample-tokens must be >= 0, got -1"),
], ids=["max-rollbacks", "spike-factor-1", "spike-factor-negative", "spike-factor-nan", "hang-timeout",
        "stop-timeout", "sample-tokens"])
def test_guard_and_lifecycle_flags_out_of_range_are_refused(flags, message):
    from lamda_pipe.run_config import RunConfig

    with pytest.raises(ConfigError) as e:
        RunConfig.from_argv(flags)
    assert str(e.value) == message
    assert RunConfig.from_argv(["--spike-factor", "0", "--max-rollbacks", "0", "--sample-tokens", "0"])  # the edges


def test_deepspeed_config_that_is_not_an_object_is_refused(tmp_path):
    from lamda_pipe.ds_config import load_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps([{"train_micro_batch_size_per_gpu": 1}]))
    with pytest.raises(ConfigError, match=r"ds\.json holds a JSON list, not an object; see .*cpu\.json"):
        load_config(path)
    path.write_text('"cpu.json"')
    with pytest.raises(ConfigError, match=r"holds a JSON str, not an object"):
        load_config(path)


def test_init_from_a_checkpoint_of_another_model_is_refused(tmp_path, launch_env):
    src = tmp_path / "pretrained"
    fake_checkpoint(src, 2)  # the debug preset
    before = files_under(src)
    run_dir = tmp_path / "finetune"
    with pytest.raises(ConfigError, match=r"--init-from .*pretrained holds a different model \(ModelConfig\("
                                          r"vocab_size=2048.*\) than this run's \(ModelConfig\(vocab_size=20000"
                                          r".*\); pick the matching --model"):
        plan(run_dir, "--model", "readme", "--init-from", str(src))
    assert not run_dir.exists() and files_under(src) == before
    assert plan(run_dir, "--init-from", str(src)).init_from.path == src / "checkpoints" / "global_step2"


# --- Start-up and input: prepared data --------------------------------------------------------------

def test_prepare_data_refuses_an_out_that_is_a_file_and_workers_below_1(toks, tmp_path, capsys):
    from lamda_pipe.tools.prepare_data import main

    (tmp_path / "a.txt").write_text("one document\n\nanother document")
    (tmp_path / "taken").write_text("a file I keep")
    base = ["--input", str(tmp_path / "a.txt"), "--tokenizer", str(toks["tok"]), "--no-progress"]
    for extra, message in [
        (["--out", str(tmp_path / "taken")], f"error: --out {tmp_path / 'taken'} exists and is not a directory; "
                                             f"pick another --out"),
        (["--out", str(tmp_path / "taken"), "--force"], "exists and is not a directory"),
        (["--format", "dialog", "--out", str(tmp_path / "taken"), "--force"], "exists and is not a directory"),
        (["--out", str(tmp_path / "new"), "--workers", "0"], "error: --workers and --batch-docs must be >= 1"),
        (["--out", str(tmp_path / "new"), "--batch-docs", "0"], "error: --workers and --batch-docs must be >= 1"),
    ]:
        assert main(base + extra) == 2, extra
        assert message in one_error_line(capsys), extra
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "taken"]
    assert (tmp_path / "taken").read_text() == "a file I keep"


def _drop_key(key):
    def damage(d: Path):
        meta = json.loads((d / "meta.json").read_text())
        del meta[key]
        (d / "meta.json").write_text(json.dumps(meta))
    return damage


def _set_dtype(d: Path):
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "dtype": "int8"}))


def _drop_split(d: Path):
    meta = json.loads((d / "meta.json").read_text())
    del meta["splits"]["val"]
    (d / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, message", [
    (_drop_key("dtype"), r"meta\.json: missing dtype; prepare it with `lamda-prepare-data"),
    (_drop_key("tokenizer_sha256"), r"meta\.json: missing tokenizer_sha256; "),
    (_drop_split, r"meta\.json: missing val; "),
    (_set_dtype, r"meta\.json: dtype 'int8', expected uint16 or uint32; prepare it"),
    (lambda d: (d / "tokenizer.json").unlink(), r"d: tokenizer\.json is missing; prepare it"),
    (lambda d: (d / "train.bin").unlink(), r"d/train\.bin is missing \(meta\.json lists it\); prepare it"),
], ids=["no-dtype", "no-tokenizer-sha256", "no-val-split", "bad-dtype", "no-tokenizer", "no-train-bin"])
def test_damaged_prepared_dir_is_refused_naming_what_is_missing(toks, tmp_path, damage, message):
    from lamda_pipe.data.loader import open_sources
    from lamda_pipe.data.prepare import read_meta
    from tests.test_data import prepared

    d = prepared(tmp_path, "d", tokenizer=toks["tok"])
    read_meta(d)  # whole, it reads
    damage(d)
    before = files_under(d)
    with pytest.raises(DataError, match=message):
        read_meta(d)
    with pytest.raises(DataError, match=message):  # what ds_train.py --data runs before any process starts
        open_sources(str(d), model_vocab=512, seq_len=16)
    assert files_under(d) == before


# --- Start-up and input: dialog data ----------------------------------------------------------------

def test_no_dialogs_or_every_dialog_in_validation_is_refused(toks, tmp_path, capsys):
    from lamda_pipe.data import dialog_demo
    from lamda_pipe.data.prepare_dialog import prepare_dialog_data
    from lamda_pipe.tools.prepare_data import main

    with pytest.raises(DataError, match=r"^the input holds no dialogs; check --input$"):
        prepare_dialog_data([], toks["tok"], tmp_path / "none", progress=False)
    one = dialog_demo.write_dialogs(tmp_path / "one.jsonl", 1)
    assert main(["--format", "dialog", "--input", str(one), "--tokenizer", str(toks["tok"]), "--out",
                 str(tmp_path / "out"), "--val-fraction", "0.9", "--no-progress"]) == 2
    assert one_error_line(capsys) == ("error: all 1 dialog(s) went to validation (--val-fraction 0.9); lower "
                                      "--val-fraction or add dialogs\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl"]


def _drop_dialog_key(key):
    def damage(d: Path):
        meta = json.loads((d / "meta.json").read_text())
        del meta[key]
        (d / "meta.json").write_text(json.dumps(meta))
    return damage


def _drop_split_key(d: Path):
    meta = json.loads((d / "meta.json").read_text())
    del meta["splits"]["train"]["mask"]
    (d / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, message", [
    (_drop_dialog_key("attributes"), r"meta\.json: missing attributes; prepare it"),
    (_drop_dialog_key("dialog_tokens"), r"meta\.json: missing dialog_tokens; prepare it"),
    (_drop_split_key, r"meta\.json: missing splits\.train\.mask; prepare it"),
    (lambda d: (d / "train.mask.bin").unlink(), r"d/train\.mask\.bin is missing \(meta\.json lists it\)"),
    (lambda d: (d / "val.idx.bin").unlink(), r"d/val\.idx\.bin is missing \(meta\.json lists it\)"),
], ids=["no-attributes", "no-dialog-tokens", "no-split-mask", "no-train-mask", "no-val-index"])
def test_damaged_dialog_dir_is_refused_naming_what_is_missing(toks, tmp_path, damage, message):
    from lamda_pipe.data import dialog_demo
    from lamda_pipe.data.dialog import read_dialogs
    from lamda_pipe.data.prepare import read_meta
    from lamda_pipe.data.prepare_dialog import prepare_dialog_data

    dialogs = read_dialogs(dialog_demo.write_dialogs(tmp_path / "d.jsonl", 12, seed=2))
    d = tmp_path / "d"
    prepare_dialog_data(dialogs, toks["tok"], d, val_fraction=0.3, progress=False)
    assert read_meta(d)["kind"] == "dialog"
    damage(d)
    before = files_under(d)
    with pytest.raises(DataError, match=message):
        read_meta(d)
    assert files_under(d) == before


def test_a_tokenizer_without_dialog_tokens_is_refused_for_dialog_data(toks, tmp_path, capsys):
    from lamda_pipe.data import dialog_demo
    from lamda_pipe.data.dialog import DialogTokens
    from lamda_pipe.data.tokenizer import load_tokenizer
    from lamda_pipe.tools.prepare_data import main

    plain = load_tokenizer(toks["plain"])
    with pytest.raises(DataError, match=r"^the tokenizer has no dialog tokens \(<\|endoftext\|>, <\|turn\|>, .*<\|safe\|>\): "
                                        r"it predates them or comes from elsewhere; train one with "
                                        r"lamda-train-tokenizer"):
        DialogTokens.of(plain)
    # the same tokenizer with an end-of-text token added (else that is refused first)
    spec = json.loads(toks["plain"].read_text())
    n = max(spec["model"]["vocab"].values()) + 1
    spec["added_tokens"] = [{"id": n, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}]
    eot_only = tmp_path / "eot_only.json"
    eot_only.write_text(json.dumps(spec))
    assert load_tokenizer(eot_only).token_to_id("<|endoftext|>") == n
    src = dialog_demo.write_dialogs(tmp_path / "d.jsonl", 5)
    assert main(["--format", "dialog", "--input", str(src), "--tokenizer", str(eot_only), "--out",
                 str(tmp_path / "out")]) == 2
    assert one_error_line(capsys).startswith(f"error: --tokenizer {eot_only} has no dialog tokens (<|turn|>")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["--out", "d.jsonl"], ["--prepare", "demo", "--tokenizer", "TOK"]],
                         ids=["out", "prepare"])
def test_dialog_demo_refuses_fewer_than_one_dialog(toks, tmp_path, capsys, monkeypatch, argv):
    from lamda_pipe.data import dialog_demo

    monkeypatch.chdir(tmp_path)
    argv = [str(toks["tok"]) if a == "TOK" else a for a in argv]
    assert dialog_demo.main([*argv, "--dialogs", "0"]) == 2
    assert one_error_line(capsys) == "error: --dialogs must be >= 1, got 0\n"
    assert list(tmp_path.iterdir()) == []


# --- Start-up and input: raw text -------------------------------------------------------------------

def test_a_line_that_is_not_json_is_named_with_file_and_line(tmp_path, capsys):
    from lamda_pipe.data.text_sources import iter_documents
    from lamda_pipe.tools.train_tokenizer import main

    bad_first = tmp_path / "a.jsonl"
    bad_first.write_text('{"text": "one"\n{"text": "two"}\n')
    out = tmp_path / "tok.json"
    assert main(["--input", str(bad_first), "--vocab-size", "300", "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: {bad_first}:1: not valid JSON (Expecting ',' delimiter); .json/.jsonl inputs "
                          f"must hold one JSON object per line (JSON Lines)")
    assert not out.exists()
    bad_third = tmp_path / "b.jsonl"
    bad_third.write_text('{"text": "one"}\n\n{"text": two}\n')
    docs = iter_documents([str(bad_third)])  # the first record is checked up front, later ones as read
    with pytest.raises(DataError, match=r"b\.jsonl:3: not valid JSON \(Expecting value\)"):
        list(docs)


def test_an_empty_text_field_is_refused(tmp_path, capsys):
    from lamda_pipe.tools.train_tokenizer import main

    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n')
    out = tmp_path / "tok.json"
    assert main(["--input", str(tmp_path / "a.jsonl"), "--text-field", "", "--vocab-size", "300", "--out",
                 str(out)]) == 2
    assert one_error_line(capsys) == ("error: --text-field is empty; name the field that holds the text "
                                      "(default: text)\n")
    assert not out.exists()


def test_a_split_a_saved_dataset_does_not_have_is_refused(tmp_path, hf_offline):
    from lamda_pipe.data.text_sources import iter_documents

    dd = tmp_path / "dd"
    hf_offline.DatasetDict({"train": hf_offline.Dataset.from_dict({"text": ["a", "b"]})}).save_to_disk(str(dd))
    before = files_under(dd)
    with pytest.raises(DataError, match=rf"^--dataset {re.escape(str(dd))} --split validation: no split "
                                        rf"'validation'; pick one of the dataset's splits with --split$"):
        iter_documents(dataset=str(dd), split="validation")
    assert files_under(dd) == before
    assert list(iter_documents(dataset=str(dd))) == ["a", "b"]


# --- Tokenizer and hosts ----------------------------------------------------------------------------

def test_train_tokenizer_out_that_is_a_directory_is_refused(tmp_path, capsys):
    from lamda_pipe.tools.train_tokenizer import main

    (tmp_path / "a.txt").write_text("one document\n\nanother")
    out = tmp_path / "tokdir"
    out.mkdir()
    assert main(["--input", str(tmp_path / "a.txt"), "--out", str(out), "--vocab-size", "300", "--force"]) == 2
    assert one_error_line(capsys) == (f"error: --out {out} is a directory; name the tokenizer file, e.g. "
                                      f"{out / 'tokenizer.json'}\n")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("hostfile, extra, message", [
    ("# only a comment\n\n   \n", [], "names no host; write one line 'HOST slots=N' per node"),
    ("", [], "names no host; write one line 'HOST slots=N' per node"),
    ("localhost slots=1\n", ["--timeout", "0"], "--timeout must be > 0, got 0.0"),
    ("localhost slots=1\n", ["--timeout", "-1"], "--timeout must be > 0, got -1.0"),
], ids=["comments-only", "empty", "timeout-0", "timeout-negative"])
def test_check_hosts_refuses_an_empty_hostfile_and_a_timeout_below_0(tmp_path, capsys, monkeypatch, hostfile,
                                                                     extra, message):
    from lamda_pipe.tools import check_hosts

    probed = []
    monkeypatch.setattr(check_hosts, "probe", lambda *a: probed.append(a))
    path = tmp_path / "hostfile"
    path.write_text(hostfile)
    assert check_hosts.main(["--hostfile", str(path), *extra]) == 2
    err = one_error_line(capsys)
    assert message in err
    if "names no host" in message:
        assert err == f"error: --hostfile {path} {message}\n"
    assert probed == []  # refused before any host is asked


# --- Export, generation and chat --------------------------------------------------------------------

def _write_config(change):
    def damage(d: Path):
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(change(config)))
    return damage


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "config.json").write_text("{broken"), r"export/config\.json is not valid JSON \(.*\); "
                                                          r"re-export the model"),
    (_write_config(lambda c: {**c, "format": "lamda-pipe-export/9"}),
     r"config\.json: format 'lamda-pipe-export/9', expected one of lamda-pipe-export/1, lamda-pipe-export/2, "
     r"lamda-pipe-export/3; "
     r"re-export the checkpoint"),
    (_write_config(lambda c: [c]), r"config\.json: format None, expected one of "),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not-it}"),
     r"model\.safetensors is not a readable safetensors file \(.*\); re-export the model"),
    (_write_config(lambda c: {**c, "depth": c["depth"] + 1}),  # weights of 2 blocks, a config of 3
     r"model\.safetensors does not match its config\.json \(Error\(s\) in loading state_dict .*\); re-export the model"),
], ids=["config-not-json", "config-other-format", "config-a-list", "weights-not-safetensors", "weights-not-config"])
def test_a_damaged_export_is_refused_naming_the_file(models, tmp_path, capsys, damage, message):
    from lamda_pipe import LaMDA
    from lamda_pipe.export import load_export
    from lamda_pipe.tools.generate import main as generate

    d = tmp_path / "export"
    shutil.copytree(models["export"], d)
    assert LaMDA.from_pretrained(d).config.depth == TINY.depth
    damage(d)
    before = files_under(d)
    with pytest.raises(CheckpointError, match=message):
        load_export(d)
    assert generate(["--model", str(d), "--prompt", "And", "--max-new-tokens", "2", "--device", "cpu"]) == 2
    assert one_error_line(capsys).startswith("error: --model ")
    assert files_under(d) == before


@pytest.mark.parametrize("damage, message", [
    (lambda d: {**d, "attributes": "safe"},
     r"config\.json: dialog attributes must be a list of names, got 'safe'; fix or re-export the model"),
    (lambda d: {**d, "attributes": ["safe", 1]}, r"dialog attributes must be a list of names, got \['safe', 1\]"),
    (lambda d: {"attributes": ["safe"]},
     r"config\.json: its \"dialog\" entry is damaged \(KeyError: 'tokens'\); re-export the model"),
    (lambda d: "safe", r"its \"dialog\" entry is damaged \(TypeError: "),
], ids=["attributes-a-string", "attributes-not-names", "no-tokens", "not-an-object"])
def test_a_damaged_dialog_entry_of_an_export_is_refused(models, tmp_path, damage, message):
    from lamda_pipe.export import dialog_at, load_export
    from lamda_pipe.run_format import resolve_model

    d = tmp_path / "export"
    shutil.copytree(models["export"], d)
    config = json.loads((d / "config.json").read_text())
    assert dialog_at(resolve_model(d)).tokens.to_dict() == config["dialog"]["tokens"]
    (d / "config.json").write_text(json.dumps({**config, "dialog": damage(config["dialog"])}))
    before = files_under(d)
    with pytest.raises(CheckpointError, match=message):
        dialog_at(resolve_model(d))
    with pytest.raises(CheckpointError, match=message):
        load_export(d)
    assert files_under(d) == before


def test_a_record_naming_discriminators_without_dialog_tokens_is_refused(models):
    from lamda_pipe.export import dialog_at
    from lamda_pipe.run_format import resolve_model

    src = resolve_model(models["rated_plain"])
    with pytest.raises(CheckpointError, match=r"global_step3/lamda_run\.json names the discriminators safe but the "
                                              r"tokenizer has no dialog tokens; use the tokenizer the model was "
                                              r"fine-tuned with"):
        dialog_at(src)
    (src.path / "tokenizer.json").rename(src.path / "tokenizer.json.away")
    try:
        with pytest.raises(CheckpointError, match=r"names the discriminators safe but no tokenizer is given"):
            dialog_at(resolve_model(models["rated_plain"]))
    finally:
        (src.path / "tokenizer.json.away").rename(src.path / "tokenizer.json")
    assert dialog_at(resolve_model(models["plain"])) is None  # no attributes: simply not a dialog model


@pytest.mark.parametrize("which, message", [
    ("file", "{p} is a file; pass the directory that holds it"),
    ("empty_checkpoints", "{p}/checkpoints has no 'latest' file: no checkpoint of this run was completed; pass a "
                          "checkpoint dir (e.g. {p}/checkpoints/global_step100)"),
    ("no_record", "checkpoint {p} has no lamda_run.json, so its model configuration is unknown (it was not "
                  "written by lamda-pipe's trainer); resume the run with ds_train.py"),
    ("latest_lost", "{p}/checkpoints has no 'latest' file, but holds complete checkpoints; pass one, e.g. the "
                    "newest: {p}/checkpoints/global_step4"),
], ids=["a-file", "checkpoints-without-latest", "checkpoint-without-run-record", "latest-lost"])
def test_export_refuses_a_path_without_a_usable_model(tmp_path, capsys, which, message):
    from lamda_pipe.tools.export import main

    if which == "file":
        p = tmp_path / "model.safetensors"
        p.write_bytes(b"weights")
    elif which == "empty_checkpoints":
        p = tmp_path / "run"
        (p / "checkpoints").mkdir(parents=True)
    elif which == "latest_lost":  # complete checkpoints at steps 2 and 4, `latest` deleted
        p = tmp_path / "run"
        for step in (2, 4):
            fake_checkpoint(p, step)
        (p / "checkpoints" / "latest").unlink()
    else:
        p = tmp_path / "global_step5"
        write_layer_files(tiny_model(TINY), p)  # DeepSpeed's files, no run record
    before = files_under(tmp_path)
    out = tmp_path / "exported"
    assert main([str(p), "--out", str(out)]) == 2
    assert one_error_line(capsys).startswith("error: " + message.format(p=p))
    assert not out.exists() and files_under(tmp_path) == before


def test_generate_refuses_a_tokenizer_larger_than_the_model(models, toks, capsys):
    from lamda_pipe.tools.generate import main

    assert main(["--model", str(models["small"]), "--tokenizer", str(toks["tok"]), "--prompt", "And"]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: --tokenizer {toks['tok']} has 300 tokens but the model only {TINY.vocab_size}; "
                          f"use the tokenizer the model was trained with")


def test_generate_refuses_an_empty_prompt_without_an_end_of_text_token(models, capsys, monkeypatch):
    from lamda_pipe.export import load_model
    from lamda_pipe.tools import generate

    loaded = []
    monkeypatch.setattr("lamda_pipe.export.load_model", lambda *a, **k: loaded.append(a) or load_model(*a, **k))
    assert generate.main(["--model", str(models["plain"]), "--prompt", "", "--device", "cpu"]) == 2
    assert one_error_line(capsys) == ("error: --prompt is empty and the tokenizer has no end-of-text token to start "
                                      "a document with; give a prompt\n")
    assert loaded == []  # refused before any weights are read
    assert generate.main(["--model", str(models["run"]), "--prompt", "", "--max-new-tokens", "2", "--device",
                          "cpu", "--seed", "1"]) == 0  # with one, '' starts a document
    capsys.readouterr()


def test_eval_dialog_refuses_a_model_without_dialog_tokens(models, tmp_path, capsys):
    from lamda_pipe.data import dialog_demo
    from lamda_pipe.tools.eval_dialog import main

    dialogs = dialog_demo.write_dialogs(tmp_path / "heldout.jsonl", 3)
    out = tmp_path / "eval.json"
    assert main(["--model", str(models["plain"]), "--dialogs", str(dialogs), "--json", str(out), "--device",
                 "cpu"]) == 2
    assert one_error_line(capsys) == (f"error: --model {models['plain']}: its tokenizer has no dialog tokens, so it "
                                      f"cannot be evaluated on dialogs; use a model trained with a tokenizer from "
                                      f"lamda-train-tokenizer\n")
    assert not out.exists()


# --- Checkpoints and disk ---------------------------------------------------------------------------

def test_no_usable_complete_checkpoint_without_latest_is_refused(tmp_path, launch_env):
    from lamda_pipe.checkpoint import choose_checkpoint

    run_dir = tmp_path / "run"
    for step in (2, 4):
        tag = fake_checkpoint(run_dir, step)
        (tag / "layer_01-model_states.pt").unlink()  # both complete, both damaged
    ckpt = run_dir / "checkpoints"
    (ckpt / "latest").unlink()
    before = files_under(run_dir)
    c = re.escape(str(ckpt))
    with pytest.raises(CheckpointError, match=rf"^{c}/latest is missing and no complete checkpoint in {c} is "
                                              rf"usable \({c}/global_step4/layer_01-model_states\.pt is missing "
                                              rf"from the checkpoint; {c}/global_step2/layer_01-model_states\.pt "
                                              rf"is missing from the checkpoint\); start a new --run-dir$"):
        choose_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=r"is missing and no complete checkpoint in .* is usable"):
        plan(run_dir, "--resume", "auto")  # ds_train.py's preflight, before any process group
    assert files_under(run_dir) == before
