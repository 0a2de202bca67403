"""A resume with dropout on: Checkpointer.resume restores DeepSpeed's dropout-seed counter, so the
resumed run draws the masks the uninterrupted run drew (the launch-tier resume tests run the
demo presets, whose dropout is 0, and cannot see this)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dist_utils import run_ranks
from tests.helpers import TINY_PIPE
from tests.test_pipeline import GAS, MBS, ds_config, token_stream

CFG = TINY_PIPE.replace(dropout=0.1)
STEPS, SAVE_AT = 6, 3
pytestmark = pytest.mark.distributed


def _checkpointer(ckpt_dir: Path, bounds):
    import torch.distributed as dist

    from lamda_pipe.checkpoint import Checkpointer
    from lamda_pipe.run_format import RunRecord

    record = RunRecord(model_preset="test", model_config=CFG, pipe_stages=2, data_parallel=1, global_steps=0,
                       samples_consumed=0, stage_bounds=tuple(bounds))
    tokenizer = ckpt_dir.parent / "tokenizer.json"
    if dist.get_rank() == 0:
        tokenizer.write_text("{}")
    return Checkpointer(ckpt_dir, every=SAVE_AT, keep_last=None, global_batch=MBS * GAS, record=record,
                        tokenizer=tokenizer, rank=dist.get_rank(), barrier=dist.barrier, log=lambda m: None)


def train(rank, ckpt_dir: str, resume: bool, restore_seed_counter: bool = True):
    import deepspeed

    from lamda_pipe.checkpoint import Layout, ResumePoint
    from lamda_pipe.distributed import init_distributed
    from lamda_pipe.pipeline import build_pipeline, stage_bounds
    from lamda_pipe.run_format import RunRecord, latest_tag_dir

    init_distributed()
    bounds = stage_bounds(CFG, 2)
    net = build_pipeline(CFG, bounds, seed=42)
    engine, *_ = deepspeed.initialize(model=net, model_parameters=list(net.parameters()), config=ds_config())
    checkpointer = _checkpointer(Path(ckpt_dir), bounds)
    point = None
    if resume:
        tag_dir = latest_tag_dir(Path(ckpt_dir))
        point = ResumePoint(tag_dir, RunRecord.read(tag_dir), Layout(2, 1, tuple(bounds)), change_layout=False)
    checkpointer.resume(engine, point)
    if not restore_seed_counter:
        engine.module.micro_offset = 0  # the fault: a resume that forgets the counter
    batches = token_stream().iterate(slot_offset=checkpointer.samples_consumed(engine.global_steps))
    losses = {}
    while engine.global_steps < STEPS:
        loss = engine.train_batch(batches).item()
        losses[engine.global_steps] = loss
        checkpointer.save(engine, engine.global_steps, last_step=engine.global_steps == STEPS)
    return losses


def test_resume_with_dropout_repeats_the_uninterrupted_losses(tmp_path):
    (tmp_path / "a").mkdir()
    ckpt = tmp_path / "a" / "checkpoints"
    continuous = run_ranks(train, 2, str(ckpt), False)[1]  # the last stage holds the loss
    (ckpt / "latest").write_text(f"global_step{SAVE_AT}")  # back to the middle of the run
    resumed = run_ranks(train, 2, str(ckpt), True)[1]
    assert list(resumed) == list(range(SAVE_AT + 1, STEPS + 1))
    assert resumed == {s: continuous[s] for s in resumed}  # bit for bit
    # The same resume without the dropout-seed counter draws other masks: the check above can fail.
    forgetful = run_ranks(train, 2, str(ckpt), True, False)[1]
    assert all(forgetful[s] != continuous[s] for s in forgetful)
