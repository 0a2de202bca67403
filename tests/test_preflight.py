"""What ds_train.py refuses or decides before any process group starts, run in-process
(preflight): checkpoints without a usable `latest`, unwritable run dirs, and every resume checked
against the data it was trained on, whichever flags were given or left out."""

from __future__ import annotations

import dataclasses
import os
import subprocess

import pytest
import torch

from lamda_pipe.checkpoint import begin_save, commit_save
from lamda_pipe.config import get_preset
from lamda_pipe.errors import CheckpointError, ConfigError
from lamda_pipe.run_config import RunConfig
from lamda_pipe.run_format import COMPLETE, RunRecord
from tests.test_data import DOCS, prepared

pytestmark = pytest.mark.unit


@pytest.fixture
def launch_env(monkeypatch):
    """The environment a 2-process launch gives each rank (no process group is started)."""
    for var in ("RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")


def plan(run_dir, *flags):
    from lamda_pipe.train import preflight
    return preflight(RunConfig.from_argv(["--run-dir", str(run_dir), *flags]))


def fake_checkpoint(run_dir, step, *, commit=True, data=None, tokenizer_sha256=None, document_mask=False):
    """A checkpoint of the debug model as a 2-stage run writes it (tiny real torch archives)."""
    ckpt = run_dir / "checkpoints"
    record = RunRecord(model_preset="debug", model_config=get_preset("debug"), pipe_stages=2, data_parallel=1,
                       global_steps=step, samples_consumed=16 * step, stage_bounds=(0, 4, 7), partition="flops",
                       seq_len=128, data=data or str(run_dir / "data"), tokenizer_sha256=tokenizer_sha256,
                       document_mask=document_mask)
    tok = run_dir.parent / "tokenizer.json"
    tok.write_text("{}")
    begin_save(ckpt / f"global_step{step}", record, tok)
    for name in record.expected_files():
        torch.save({"x": torch.arange(4) + step}, ckpt / f"global_step{step}" / name)
    if commit:
        commit_save(ckpt, f"global_step{step}", None)
    return ckpt / f"global_step{step}"


def snapshot(root):
    """Every entry, and each file's content and mtime (folders' mtimes move with the write probe)."""
    return {str(p.relative_to(root)): p.is_file() and (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize("latest", [None, "", "global_step9", "global_step6"],
                         ids=["missing", "empty", "names-a-missing-folder", "names-an-incomplete-save"])
def test_resume_auto_without_a_usable_latest_takes_the_newest_complete_checkpoint(tmp_path, launch_env, latest):
    run_dir = tmp_path / "run"
    for step in (2, 4):
        fake_checkpoint(run_dir, step)
    fake_checkpoint(run_dir, 6, commit=False)  # a save cut short: never resumed from
    latest_file = run_dir / "checkpoints" / "latest"
    latest_file.unlink()
    if latest is not None:
        latest_file.write_text(latest)
    before = snapshot(run_dir)
    p = plan(run_dir, "--resume", "auto")
    assert p.resume.tag_dir == run_dir / "checkpoints" / "global_step4"
    assert "resuming from the newest complete checkpoint, global_step4" in p.resume.note
    assert snapshot(run_dir) == before  # deciding changes nothing


def test_a_plain_run_refuses_complete_checkpoints_without_latest(tmp_path, launch_env):
    run_dir = tmp_path / "run"
    fake_checkpoint(run_dir, 2)
    (run_dir / "checkpoints" / "latest").unlink()
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match="already holds checkpoints; to continue that run pass --resume auto"):
        plan(run_dir)
    assert snapshot(run_dir) == before


def test_only_incomplete_saves_and_no_latest_start_a_new_run(tmp_path, launch_env):
    run_dir = tmp_path / "run"
    fake_checkpoint(run_dir, 2, commit=False)
    assert plan(run_dir, "--resume", "auto").resume is None
    with pytest.raises(ConfigError, match="no 'latest' file and no complete checkpoint"):
        plan(tmp_path / "other", "--load", str(run_dir / "checkpoints"))


def test_a_damaged_checkpoint_latest_names_is_refused_not_skipped(tmp_path, launch_env):
    run_dir = tmp_path / "run"
    fake_checkpoint(run_dir, 2)
    tag = fake_checkpoint(run_dir, 4)
    (tag / "layer_01-model_states.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="layer_01-model_states.pt is damaged"):
        plan(run_dir, "--resume", "auto")


def test_run_dir_that_is_a_file_or_under_one_is_refused(tmp_path, launch_env):
    (tmp_path / "afile").write_text("x")
    for run_dir in (tmp_path / "afile", tmp_path / "afile" / "run"):
        with pytest.raises(CheckpointError, match=f"--run-dir {run_dir}: .*afile is a file, not a folder"):
            plan(run_dir)
    assert (tmp_path / "afile").read_text() == "x"
    plan(tmp_path / "new" / "deeper" / "run")  # missing parents are fine: the run creates them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # and the probe left nothing


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only file system (a tmpfs remounted ro); root ignores permission bits, not this."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    try:
        os_mount = __import__("ctypes").CDLL(None, use_errno=True).mount
        MS_RDONLY = 1
        if os_mount(b"tmpfs", str(mnt).encode(), b"tmpfs", MS_RDONLY, b"size=1m") != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here (errno {__import__('ctypes').get_errno()}): "
                        f"needs root (CAP_SYS_ADMIN)")
        yield mnt
    finally:
        __import__("ctypes").CDLL(None).umount2(str(mnt).encode(), 2)


def test_unwritable_run_dir_is_refused_before_any_work(tmp_path, launch_env, read_only_dir):
    with pytest.raises(CheckpointError, match=r"--run-dir .*/ro/run: cannot write in .*/ro \(Read-only file system\)"):
        plan(read_only_dir / "run")


def test_resume_without_data_of_a_run_trained_on_data_is_refused(tmp_path, launch_env):
    run_dir = tmp_path / "run"
    corpus = prepared(tmp_path, "corpus")
    fake_checkpoint(run_dir, 2, data=str(corpus))
    with pytest.raises(ConfigError, match=f"was trained on --data {corpus}, but this run gives no --data .*"
                                          f"pass --data {corpus}$"):
        plan(run_dir, "--resume", "auto")


def test_resume_with_other_data_or_weights_is_refused_and_the_same_data_resumes(tmp_path, launch_env):
    run_dir = tmp_path / "run"
    a, b = prepared(tmp_path, "a"), prepared(tmp_path, "b")
    from lamda_pipe.data.loader import open_sources
    sha = open_sources(str(a), model_vocab=2048, seq_len=16)[0].meta["tokenizer_sha256"]
    fake_checkpoint(run_dir, 2, data=f"{a}:0.5,{b}:0.5", tokenizer_sha256=sha)
    with pytest.raises(ConfigError, match=f"was trained on --data {a}:0.5,{b}:0.5, not {b}; pass --data"):
        plan(run_dir, "--resume", "auto", "--seq-len", "16", "--data", str(b))
    with pytest.raises(ConfigError, match="not .*:0.75"):
        plan(run_dir, "--resume", "auto", "--seq-len", "16", "--data", f"{a}:0.25,{b}:0.75")
    with pytest.raises(ConfigError, match="was trained on --data"):
        plan(run_dir, "--resume", "auto", "--seq-len", "16")  # --data left out
    same = plan(run_dir, "--resume", "auto", "--seq-len", "16", "--data", f"{b}:1,{a}:1")  # order, scale
    assert same.resume.tag_dir.name == "global_step2"


def test_resume_on_data_from_another_tokenizer_is_refused(tmp_path, launch_env):
    """The tokenizer check runs on every resume (a copy of the code that skipped it passed every
    other test)."""
    run_dir = tmp_path / "run"
    a = prepared(tmp_path, "a")
    fake_checkpoint(run_dir, 2, data=str(a), tokenizer_sha256="0" * 64)
    with pytest.raises(ConfigError, match="another tokenizer .*sha256 000000000000"):
        plan(run_dir, "--resume", "auto", "--seq-len", "16", "--data", str(a))


@pytest.mark.parametrize("trained_with", [True, False])
def test_resume_with_another_document_mask_setting_is_refused(tmp_path, launch_env, trained_with):
    run_dir = tmp_path / "run"
    fake_checkpoint(run_dir, 2, document_mask=trained_with)
    flag = ["--document-mask"] if trained_with else []
    with pytest.raises(ConfigError, match=f"was trained {'with' if trained_with else 'without'} --document-mask; "
                                          f"resume {'with' if trained_with else 'without'} --document-mask"):
        plan(run_dir, "--resume", "auto", *([] if trained_with else ["--document-mask"]))
    assert plan(run_dir, "--resume", "auto", *flag).resume.tag_dir.name == "global_step2"


def test_resume_of_the_demo_in_a_moved_run_dir_is_not_refused(tmp_path, launch_env):
    run_dir = tmp_path / "moved"
    fake_checkpoint(run_dir, 2, data=str(tmp_path / "original" / "data"))  # where it was trained
    assert plan(run_dir, "--resume", "auto").resume.tag_dir.name == "global_step2"
    with pytest.raises(ConfigError, match="was trained on the bundled corpus, but this run gives --data"):
        plan(run_dir, "--resume", "auto", "--seq-len", "16", "--data", str(prepared(tmp_path, "a")))


def test_token_ids_beyond_the_model_vocabulary_are_named_at_open(tmp_path, launch_env):
    import json

    import numpy as np

    a = prepared(tmp_path, "a")
    meta = json.loads((a / "meta.json").read_text())
    val = np.memmap(a / meta["splits"]["val"]["file"], dtype=meta["dtype"], mode="r+")
    val[3] = 5000  # beyond both the tokenizer's 300 ids and the model's 2048
    val.flush()
    del val
    with pytest.raises(Exception, match=f"{a}: val.bin holds token id 5000, beyond the model's vocabulary of 2048 "
                                        r"\(ids 0..2047\); pass --vocab-size 5001 or more; the data's own tokenizer "
                                        "has only 300 ids") as e:
        plan(tmp_path / "run", "--seq-len", "16", "--data", str(a))
    assert isinstance(e.value, ValueError) and type(e.value).__name__ == "DataError"
    assert not (tmp_path / "run").exists()
    plan(tmp_path / "run", "--seq-len", "16", "--data", str(a), "--vocab-size", "5056")  # the fix it names


def test_validation_reads_only_the_val_split(tmp_path, launch_env):
    """The evaluator's batches are windows of each source's val.bin, in order, and never of its
    train.bin (the seed drew validation batches from the training split; no test noticed)."""
    from types import SimpleNamespace

    import numpy as np

    from lamda_pipe.train import data_streams

    a, b = prepared(tmp_path, "a"), prepared(tmp_path, "b", docs=[d.upper() for d in DOCS])
    p = plan(tmp_path / "run", "--seq-len", "16", "--data", f"{a}:0.5,{b}:0.5", "--eval-iters", "3")
    grid = SimpleNamespace(get_data_parallel_rank=lambda: 0, get_data_parallel_world_size=lambda: 1)
    _, evaluator = data_streams(p, p.sources, SimpleNamespace(grid=grid))
    assert set(evaluator.streams) == {"a", "b"}
    mbs, seq = p.batch.micro_batch_size, 16
    for source in p.sources:
        _, stream = evaluator.streams[source.name]
        val, train = np.asarray(source.tokens("val")), np.asarray(source.tokens("train"))
        batches = stream.iterate(0)
        for m in range(evaluator.iters):
            inputs, labels = next(batches)
            want = np.stack([val[k * seq:k * seq + seq + 1] for k in range(m * mbs, (m + 1) * mbs)])
            from_train = np.stack([train[k * seq:k * seq + seq + 1] for k in range(m * mbs, (m + 1) * mbs)])
            assert np.array_equal(inputs.numpy(), want[:, :-1]) and np.array_equal(labels.numpy(), want[:, 1:])
            assert not np.array_equal(inputs.numpy(), from_train[:, :-1])


def test_load_into_a_run_dir_that_has_its_own_checkpoints_is_refused(tmp_path, launch_env):
    """--load A/checkpoints --run-dir B would save B's next steps over B's own checkpoints."""
    a, b = tmp_path / "a", tmp_path / "b"
    fake_checkpoint(a, 2)
    fake_checkpoint(b, 4)
    before = snapshot(b)
    with pytest.raises(CheckpointError, match=f"--run-dir {b} already holds checkpoints of its own, which continuing "
                                              f"--load {a / 'checkpoints'} there would write over"):
        plan(b, "--load", str(a / "checkpoints"))
    assert snapshot(b) == before
    # into a new run dir, or its own checkpoints: accepted
    assert plan(tmp_path / "c", "--load", str(a / "checkpoints")).resume.tag_dir.name == "global_step2"
    assert plan(b, "--load", str(b / "checkpoints")).resume.tag_dir.name == "global_step4"


def test_resume_behind_newer_complete_checkpoints_is_refused(tmp_path, launch_env):
    """`latest` pointed back by hand: the run's next saves would overwrite global_step4 and 6."""
    run_dir = tmp_path / "run"
    for step in (2, 4, 6):
        fake_checkpoint(run_dir, step)
    (run_dir / "checkpoints" / "latest").write_text("global_step2")
    before = snapshot(run_dir)
    with pytest.raises(CheckpointError, match="newer than global_step2, the one this run resumes from "
                                              r"\(global_step4, global_step6\): its next saves would write over"):
        plan(run_dir, "--resume", "auto")
    assert snapshot(run_dir) == before
    (run_dir / "checkpoints" / "latest").write_text("global_step6")
    assert plan(run_dir, "--resume", "auto").resume.tag_dir.name == "global_step6"


def test_a_resumed_run_keeps_the_data_order_it_started_with_and_a_new_run_takes_the_current(tmp_path, launch_env):
    """Runs from before data order 2 (records without the key) resume in the randperm order, so
    they see exactly the samples an uninterrupted run would; new runs use the keyed bijection."""
    from types import SimpleNamespace

    import numpy as np

    from lamda_pipe.data.order import CURRENT, FeistelPermutation, epoch_key
    from lamda_pipe.train import data_streams

    a = prepared(tmp_path, "a")
    old, new = tmp_path / "old", tmp_path / "new"
    fake_checkpoint(old, 2, data=str(a))  # RunRecord's default: a record without data_order
    grid = SimpleNamespace(get_data_parallel_rank=lambda: 0, get_data_parallel_world_size=lambda: 1)
    seq, tokens = 16, None
    for run_dir, flags, version in ((old, ["--resume", "auto"], 1), (new, [], CURRENT)):
        p = plan(run_dir, "--seq-len", str(seq), "--data", str(a), "--seed", "5", *flags)
        assert p.data_order == version
        stream, _ = data_streams(p, p.sources, SimpleNamespace(grid=grid))
        tokens = np.asarray(p.sources[0].tokens("train"))
        n = (len(tokens) - 1) // seq
        if version == 1:  # the order as 0.1.0 drew it: one torch.randperm per epoch, seeded seed * 1_000_003 + epoch
            windows = torch.randperm(n, generator=torch.Generator().manual_seed(5 * 1_000_003)).tolist()
        else:
            windows = [FeistelPermutation(n, epoch_key(5, 0))(k) for k in range(n)]
        inputs, _ = stream.micro_batch(0)
        mbs = p.batch.micro_batch_size
        assert np.array_equal(inputs.numpy(), np.stack([tokens[w * seq:w * seq + seq] for w in windows[:mbs]]))


def test_each_rank_verifies_its_own_share_of_checkpoint_and_data_bytes(tmp_path, launch_env, monkeypatch):
    """Rank 0 of 2 (stage 0) passes a checkpoint whose stage-1 layer file is damaged, since it
    never loads that file; rank 1 (stage 1) names it before any process group work. The same
    for a bad token id in the second half of a split: only the rank whose slice holds it reads it."""
    import json

    import numpy as np

    run_dir = tmp_path / "run"
    tag = fake_checkpoint(run_dir, 2)
    record = RunRecord.read(tag)
    victim = record.stage_files(1, record.stage_bounds)[-1]
    assert victim.startswith("layer_")
    (tag / victim).write_bytes(b"garbage")
    p = plan(run_dir, "--resume", "auto")
    assert not p.resume.change_layout
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(CheckpointError, match=f"{victim} is damaged"):
        plan(run_dir, "--resume", "auto")

    a = prepared(tmp_path, "a")
    meta = json.loads((a / "meta.json").read_text())
    train = np.memmap(a / meta["splits"]["train"]["file"], dtype=meta["dtype"], mode="r+")
    train[-2] = 5000
    train.flush()
    del train
    with pytest.raises(ValueError, match="train.bin holds token id 5000"):
        plan(tmp_path / "new", "--seq-len", "16", "--data", str(a))
    monkeypatch.setenv("RANK", "0")
    plan(tmp_path / "new", "--seq-len", "16", "--data", str(a))
