"""The run format: the run record (versioned, read back from what 0.1.0 wrote), the resolver of
"which model is at this path", and the checkpointer's and evaluator's cadence (no DeepSpeed)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lamda_pipe.checkpoint import Checkpointer
from lamda_pipe.config import get_preset
from lamda_pipe.errors import CheckpointError
from lamda_pipe.evaluate import Evaluator
from lamda_pipe.run_format import (CHECKPOINTS, LATEST, RUN_RECORD, RunRecord, resolve_model, step_of, tag_for)

pytestmark = pytest.mark.unit

RELEASE_0_1_0 = Path(__file__).resolve().parent / "fixtures" / "release_0.1.0"


def test_record_written_by_release_0_1_0_reads_as_version_1():
    """lamda_run.json exactly as ds_train.py 0.1.0 wrote it (no format_version key)."""
    record = RunRecord.from_dict(json.loads((RELEASE_0_1_0 / "lamda_run.json").read_text()))
    assert record.model_config == get_preset("debug")
    assert (record.pipe_stages, record.stage_bounds, record.data_parallel) == (2, (0, 4, 7), 1)
    assert (record.global_steps, record.samples_consumed, record.micro_offset) == (200, 3200, 832)
    assert record.ds_config["zero_optimization"]["stage"] == 1


def test_record_round_trips_with_its_version(tmp_path):
    record = RunRecord.from_dict(json.loads((RELEASE_0_1_0 / "lamda_run.json").read_text()))
    assert record.data_order == 1  # 0.1.0's runs drew their samples in the randperm order
    (tmp_path / RUN_RECORD).write_text(record.to_json())
    assert json.loads((tmp_path / RUN_RECORD).read_text())["format_version"] == 1  # still readable by 0.1.0
    assert RunRecord.read(tmp_path) == record


def test_a_record_with_the_new_data_order_is_version_2_which_a_version_1_reader_refuses(tmp_path):
    """A version-1 reader ignores keys it does not know: it would resume a data-order-2 run in the
    randperm order, with other samples. Version 2 makes it refuse instead."""
    record = dataclasses.replace(RunRecord.from_dict(json.loads((RELEASE_0_1_0 / "lamda_run.json").read_text())),
                                 data_order=2)
    (tmp_path / RUN_RECORD).write_text(record.to_json())
    written = json.loads((tmp_path / RUN_RECORD).read_text())
    assert (written["format_version"], written["data_order"]) == (2, 2)
    assert RunRecord.read(tmp_path) == record

    class VersionOneReader(RunRecord):
        VERSION = 1

    with pytest.raises(CheckpointError, match="format_version 2, newer than this lamda-pipe reads"):
        VersionOneReader.from_dict(written)


def test_a_newer_or_broken_record_is_refused_with_the_fix(tmp_path):
    d = json.loads((RELEASE_0_1_0 / "lamda_run.json").read_text())
    with pytest.raises(CheckpointError, match="newer than this lamda-pipe reads .* upgrade lamda-pipe"):
        RunRecord.from_dict({**d, "format_version": RunRecord.VERSION + 1})
    with pytest.raises(CheckpointError, match="not a usable run record"):
        RunRecord.from_dict({k: v for k, v in d.items() if k != "model_config"})
    (tmp_path / RUN_RECORD).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON list, not an object"):
        RunRecord.read(tmp_path)


def test_export_config_written_by_release_0_1_0_still_reads(tmp_path):
    from lamda_pipe.export import model_config_at

    (tmp_path / "config.json").write_text((RELEASE_0_1_0 / "export_config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"")
    source = resolve_model(tmp_path)
    assert source.kind == "export"
    assert model_config_at(source) == (get_preset("debug"), 200)


def test_tags_and_steps():
    assert tag_for(12) == "global_step12" and step_of("global_step12") == 12
    assert step_of("global_step12_universal") is None and step_of(LATEST) is None


def test_resolver_takes_every_path_a_user_has(tmp_path):
    tag = tmp_path / "run" / CHECKPOINTS / tag_for(4)
    tag.mkdir(parents=True)
    (tag / RUN_RECORD).write_text((RELEASE_0_1_0 / "lamda_run.json").read_text())
    (tag.parent / LATEST).write_text(tag.name)
    for path in (tmp_path / "run", tag.parent, tag):
        assert resolve_model(path) == resolve_model(tag) and resolve_model(path).kind == "checkpoint"
    (tag.parent / LATEST).write_text("global_step9")
    with pytest.raises(CheckpointError, match="names checkpoint 'global_step9', which is not a directory"):
        resolve_model(tmp_path / "run")


class _Recorded(Checkpointer):
    """The real cadence; the write (DeepSpeed's collective save) replaced by a note of the step."""

    def _write(self, engine, step):
        self.written.append((step, self.samples_consumed(step)))


def test_checkpointer_cadence_every_n_and_the_last_step_once():
    record = RunRecord.from_dict(json.loads((RELEASE_0_1_0 / "lamda_run.json").read_text()))
    ckpt = _Recorded(Path("unused"), every=3, keep_last=None, global_batch=16, record=record, tokenizer=Path("t"),
                     rank=0, barrier=lambda: None)
    ckpt.written = []
    for step in range(1, 8):
        ckpt.save(None, step, last_step=step == 7)
    ckpt.save(None, 7, last_step=True)  # the final save after the loop: already done
    assert ckpt.written == [(3, 48), (6, 96), (7, 112)]


def test_a_resumed_run_does_not_save_the_step_it_resumed_at_again():
    record = RunRecord.from_dict(json.loads((RELEASE_0_1_0 / "lamda_run.json").read_text()))
    ckpt = _Recorded(Path("unused"), every=100, keep_last=None, global_batch=16, record=record, tokenizer=Path("t"),
                     rank=0, barrier=lambda: None)
    ckpt.written = []
    ckpt.resumed_at(200, 3200)  # what resume() records after loading global_step200
    ckpt.save(None, 200, last_step=True)  # --steps 200 again: nothing to train, nothing to save
    assert ckpt.written == [] and ckpt.samples_consumed(203) == 3248


def test_checkpointer_writes_the_record_on_rank_0(tmp_path):
    """begin_save + commit_save as Checkpointer._write calls them: the record lands with the data position."""
    from lamda_pipe.checkpoint import begin_save, commit_save

    record = RunRecord.from_dict(json.loads((RELEASE_0_1_0 / "lamda_run.json").read_text()))
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    tag_dir = tmp_path / CHECKPOINTS / tag_for(7)
    begin_save(tag_dir, dataclasses.replace(record, global_steps=7, samples_consumed=112), tok)
    commit_save(tag_dir.parent, tag_dir.name, keep_last=None)
    assert (tmp_path / CHECKPOINTS / LATEST).read_text() == "global_step7"
    assert RunRecord.read(tag_dir) == dataclasses.replace(record, global_steps=7, samples_consumed=112)


def test_evaluator_cadence():
    streams = {"a": (1.0, None)}
    assert [s for s in range(1, 11) if Evaluator(streams, every=4, iters=1).should_evaluate(s)] == [4, 8]
    assert not any(Evaluator(streams, every=0, iters=1).should_evaluate(s) for s in range(1, 11))
    assert not Evaluator({}, every=4, iters=1).should_evaluate(4)  # no val split: nothing to evaluate


def test_evaluator_weights_the_sources():
    class Engine:
        def eval_batch(self, batches):
            import torch
            return torch.tensor(float(next(batches)))

    class Stream:
        def __init__(self, loss):
            self.loss = loss

        def iterate(self, offset):
            while True:
                yield self.loss

    ev = Evaluator({"a": (0.75, Stream(2.0)), "b": (0.25, Stream(6.0))}, every=1, iters=2)
    assert ev.evaluate(Engine()) == (3.0, {"a": 2.0, "b": 6.0})
    assert Evaluator({"a": (1.0, Stream(2.0))}, every=1, iters=1).evaluate(Engine()) == (2.0, None)


TINY_0_1_0 = RELEASE_0_1_0 / "tiny"  # written by 0.1.0's code: tests/fixtures/release_0.1.0/tiny/make_fixture.py


def expected_0_1_0():
    import torch
    return torch.load(TINY_0_1_0 / "expected_logits.pt", weights_only=True)


def test_a_checkpoint_and_an_export_written_by_release_0_1_0_load_with_their_weights(tmp_path):
    """The weights, not only the metadata: what 0.1.0 wrote computes, through today's loaders, the
    logits 0.1.0 computed (to float32 rounding: the attention kernels changed since)."""
    import torch

    from lamda_pipe.export import export_checkpoint, load_model, model_config_at
    from lamda_pipe.model import LaMDA
    from lamda_pipe.weights import read_plain_state

    want = expected_0_1_0()
    ckpt = resolve_model(TINY_0_1_0 / "checkpoints")
    export = resolve_model(TINY_0_1_0 / "export")
    assert (ckpt.kind, ckpt.path.name, export.kind) == ("checkpoint", "global_step3", "export")
    cfg, step = model_config_at(ckpt)
    assert model_config_at(export) == (cfg, 3) and step == 3
    models = {"checkpoint": load_model(ckpt, cfg), "export": LaMDA.from_pretrained(export.path)}
    again = export_checkpoint(TINY_0_1_0 / "checkpoints", tmp_path / "re-export")  # today's lamda-export
    models["re-export"] = LaMDA.from_pretrained(again)
    for name, model in models.items():
        with torch.no_grad():
            logits = model.eval()(want["tokens"])
        torch.testing.assert_close(logits, want["logits"], rtol=0, atol=1e-5, msg=name)
    # --init-from reads the same weights from either
    a, b = read_plain_state(ckpt, cfg), read_plain_state(export, cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
