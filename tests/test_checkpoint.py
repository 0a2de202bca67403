"""lamda_pipe.checkpoint: commit order, keep-last, and validation of damaged checkpoints."""

import json

import pytest
import torch

import dataclasses

from lamda_pipe.checkpoint import begin_save, commit_save, files_to_verify, validate
from lamda_pipe.config import ModelConfig
from lamda_pipe.errors import CheckpointError
from lamda_pipe.metrics import drop_partial_last_line
from lamda_pipe.run_format import COMPLETE, RUN_RECORD, RunRecord, latest_tag_dir

pytestmark = pytest.mark.unit

INFO = RunRecord(model_preset="debug", model_config=ModelConfig(depth=2), pipe_stages=2, data_parallel=1,
                 global_steps=0, samples_consumed=0)


def fake_save(ckpt_dir, step, tmp_path, commit=True, keep_last=None, pinned=()):
    """A checkpoint folder with every file DeepSpeed would write (small real torch archives)."""
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    tag = f"global_step{step}"
    begin_save(ckpt_dir / tag, dataclasses.replace(INFO, global_steps=step), tok)
    for name in INFO.expected_files():
        torch.save({"x": torch.arange(100) + step}, ckpt_dir / tag / name)
    return commit_save(ckpt_dir, tag, keep_last, pinned) if commit else []


def test_expected_files_of_a_two_stage_checkpoint():
    assert INFO.expected_files() == [
        "layer_00-model_states.pt", "layer_01-model_states.pt", "layer_02-model_states.pt",
        "layer_03-model_states.pt", "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_01_optim_states.pt"]
    assert dataclasses.replace(INFO, bf16=True).expected_files()[-1] == "bf16_zero_pp_rank_0_mp_rank_01_optim_states.pt"


def test_latest_moves_only_on_commit(tmp_path):
    ckpt = tmp_path / "checkpoints"
    fake_save(ckpt, 2, tmp_path)
    fake_save(ckpt, 4, tmp_path, commit=False)  # killed before every rank had written
    assert latest_tag_dir(ckpt) == ckpt / "global_step2"
    assert validate(ckpt / "global_step2").global_steps == 2
    with pytest.raises(CheckpointError, match="incomplete"):
        validate(ckpt / "global_step4")


def test_keep_last_deletes_only_older_complete_checkpoints(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4):
        fake_save(ckpt, step, tmp_path)
    fake_save(ckpt, 5, tmp_path, commit=False)  # an interrupted save: left alone
    deleted = fake_save(ckpt, 6, tmp_path, keep_last=2)
    assert [d.name for d in deleted] == ["global_step2"]
    assert sorted(d.name for d in ckpt.iterdir() if d.is_dir()) == ["global_step4", "global_step5", "global_step6"]
    assert (ckpt / "latest").read_text() == "global_step6"


def test_keep_last_spares_pinned_checkpoints_until_a_later_prune(tmp_path):
    """A checkpoint an in-training evaluation reads (pinned) outlives --keep-last until it is
    free; then the next prune deletes it, and never the one `latest` names."""
    from lamda_pipe.checkpoint import prune_checkpoints

    ckpt = tmp_path / "checkpoints"
    fake_save(ckpt, 2, tmp_path, keep_last=1)
    assert fake_save(ckpt, 4, tmp_path, keep_last=1, pinned={"global_step2"}) == []
    deleted = fake_save(ckpt, 6, tmp_path, keep_last=1, pinned={"global_step4"})
    assert [d.name for d in deleted] == ["global_step2"]
    assert sorted(d.name for d in ckpt.iterdir() if d.is_dir()) == ["global_step4", "global_step6"]
    (ckpt / "latest").write_text("global_step4")  # `latest` is never pruned, whatever is newer
    assert prune_checkpoints(ckpt, 1) == []
    (ckpt / "latest").write_text("global_step6")
    assert [d.name for d in prune_checkpoints(ckpt, 1)] == ["global_step4"]
    assert prune_checkpoints(ckpt, None) == []


def test_damaged_checkpoints_are_named_and_left_alone(tmp_path):
    ckpt = tmp_path / "checkpoints"
    fake_save(ckpt, 2, tmp_path)
    fake_save(ckpt, 4, tmp_path)
    tag = ckpt / "global_step4"
    optim = tag / "zero_pp_rank_0_mp_rank_01_optim_states.pt"
    data = optim.read_bytes()
    optim.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="zero_pp_rank_0_mp_rank_01_optim_states.pt is damaged"):
        validate(tag)
    optim.write_bytes(data[:-40] + bytes(40))  # same length, end overwritten
    with pytest.raises(CheckpointError, match="optim_states.pt is damaged"):
        validate(tag)
    (tag / "layer_01-model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="layer_01-model_states.pt is missing"):
        validate(tag)
    (tag / RUN_RECORD).write_text("{not json")
    with pytest.raises(CheckpointError, match="lamda_run.json is not valid JSON"):
        validate(tag)
    # the other checkpoint is untouched and still valid
    assert validate(ckpt / "global_step2").global_steps == 2
    (ckpt / "latest").write_text("global_step9")
    with pytest.raises(CheckpointError, match="names checkpoint 'global_step9', which is not a directory"):
        latest_tag_dir(ckpt)


def test_begin_save_clears_a_stale_marker(tmp_path):
    ckpt = tmp_path / "checkpoints"
    fake_save(ckpt, 2, tmp_path)
    assert (ckpt / "global_step2" / COMPLETE).is_file()
    fake_save(ckpt, 2, tmp_path, commit=False)  # the same step saved again, killed half-way
    assert not (ckpt / "global_step2" / COMPLETE).is_file()
    assert json.loads((ckpt / "global_step2" / RUN_RECORD).read_text())["global_steps"] == 2


def test_metrics_file_cut_mid_line_is_repaired(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    drop_partial_last_line(path)
    assert path.read_text() == '{"step": 1}\n'


@pytest.mark.parametrize("stages,dp", [(1, 1), (1, 4), (2, 1), (2, 3), (4, 2)])
def test_each_checkpoint_file_is_verified_by_exactly_one_rank_that_loads_it(stages, dp):
    """The byte-level check is spread over the ranks: together they read each file once, and
    each rank reads only files it will load itself (its stage's files and its own optimizer
    shard, with ranks numbered stage-major as DeepSpeed's pipeline topology numbers them)."""
    import collections

    cfg = ModelConfig(depth=6)
    record = dataclasses.replace(INFO, model_config=cfg, pipe_stages=stages, data_parallel=dp)
    layers = cfg.depth + 3  # embedding, blocks, final norm, tied head
    bounds = tuple(layers * s // stages for s in range(stages)) + (layers,)
    seen = collections.Counter()
    for rank in range(stages * dp):
        stage, replica = rank // dp, rank % dp
        mine = files_to_verify(record, bounds, rank, stages * dp, change_layout=False)
        loads = {f"mp_rank_{stage:02d}_model_states.pt",
                 f"zero_pp_rank_{replica}_mp_rank_{stage:02d}_optim_states.pt",
                 *(f"layer_{i:02d}-model_states.pt" for i in range(bounds[stage], bounds[stage + 1]))}
        assert set(mine) <= loads, (rank, sorted(set(mine) - loads))
        seen.update(mine)
    assert sorted(seen) == sorted(record.expected_files()) and set(seen.values()) == {1}


def test_a_run_that_changes_layout_verifies_everything_on_rank_0_which_converts():
    record = dataclasses.replace(INFO, pipe_stages=2, data_parallel=2)
    bounds = (0, 3, 5)
    assert files_to_verify(record, bounds, 0, 2, change_layout=True) == record.expected_files()
    assert files_to_verify(record, bounds, 1, 2, change_layout=True) == []
    assert files_to_verify(record, bounds, 0, 8, change_layout=False) == record.expected_files()  # another world
