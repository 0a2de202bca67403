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
    (tmp_path / RUN_RECORD).write_text(record.to_json())
    assert json.loads((tmp_path / RUN_RECORD).read_text())["format_version"] == RunRecord.VERSION
    assert RunRecord.read(tmp_path) == record


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


class _Engine:
    """Only what Checkpointer.save reads and calls; records the saves."""

    def __init__(self):
        self.module = type("M", (), {"micro_offset": 0})()
        self.saved = []

    def save_checkpoint(self, path, tag, client_state, save_latest):
        self.saved.append((tag, client_state["samples_consumed"]))


def test_checkpointer_cadence_every_n_and_the_last_step_once(tmp_path):
    record = RunRecord.from_dict(json.loads((RELEASE_0_1_0 / "lamda_run.json").read_text()))
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    ckpt = Checkpointer(tmp_path / CHECKPOINTS, every=3, keep_last=None, global_batch=16, record=record,
                        tokenizer=tok, rank=0, barrier=lambda: None, log=lambda m: None)
    engine = _Engine()
    for step in range(1, 8):
        ckpt.save(engine, step, last_step=step == 7)
    ckpt.save(engine, 7, last_step=True)  # the final save after the loop: already done
    assert engine.saved == [("global_step3", 48), ("global_step6", 96), ("global_step7", 112)]
    assert (tmp_path / CHECKPOINTS / LATEST).read_text() == "global_step7"
    written = RunRecord.read(tmp_path / CHECKPOINTS / "global_step7")
    assert written == dataclasses.replace(record, global_steps=7, samples_consumed=112, micro_offset=0)


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
