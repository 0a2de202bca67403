"""Resuming with another pipeline layout through DeepSpeed's universal checkpoint: 2 stages -> 1,
2 stages -> 2 stages x 2 data parallel, 1 stage -> 2, and 2 stages split otherwise (the blocks
2 | 2 of a checkpoint from before the FLOP-balanced split -> 3 | 1), each continuing the
optimizer, step count, LR schedule and data position of the run it resumes (fp32: losses
within 1e-6)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.dist_utils import launch_direct
from tests.test_e2e import DS_TRAIN, ROOT, read_metrics

pytestmark = pytest.mark.launch  # the deepspeed launcher and universal-checkpoint conversion

BASE_STEPS, STEPS = 4, 6
COMMON = ["--save-every", str(BASE_STEPS), "--eval-every", "0", "--log-every", "1", "--sample-tokens", "0"]


def run(run_dir, procs, stages, steps, *extra, config=None):
    """ds_train.py's ranks started without a launcher (tests.dist_utils.launch_direct): the
    layouts are the subject here, and test_e2e runs the deepspeed launcher itself."""
    args = [DS_TRAIN, "--run-dir", str(run_dir), "--pipe-stages", str(stages), "--steps", str(steps), *COMMON, *extra]
    if config is not None:
        args += ["--deepspeed_config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = launch_direct(args, procs, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("universal")
    run(root / "reference", 2, 2, STEPS)
    # split as every run was before the FLOP-balanced partition: debug's 4 blocks 2 | 2
    run(root / "two_stages", 2, 2, BASE_STEPS, "--partition", "type:BlockPipe")
    info_path = root / "two_stages" / "checkpoints" / f"global_step{BASE_STEPS}" / "lamda_run.json"
    info = json.loads(info_path.read_text())
    assert info["stage_bounds"] == [0, 3, 7]  # what DeepSpeed's own type:BlockPipe chose
    del info["stage_bounds"], info["partition"]  # as written before the bounds were recorded
    info_path.write_text(json.dumps(info))
    run(root / "one_stage", 1, 1, BASE_STEPS)
    return root


def resume_copy(runs, base, name, procs, stages, config=None):
    target = runs / name
    shutil.copytree(runs / base, target)
    proc = run(target, procs, stages, STEPS, "--resume", "auto", config=config)
    assert "universal checkpoint" in proc.stdout
    (target / "out.txt").write_text(proc.stdout)
    return target


def check_continues(runs, resumed):
    ref, got = losses(runs / "reference"), losses(resumed)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(BASE_STEPS + 1, STEPS + 1):  # the steps after the layout change
        assert abs(got[step] - ref[step]) <= 1e-6, (step, got[step], ref[step])
    info = json.loads((resumed / "checkpoints" / f"global_step{STEPS}" / "lamda_run.json").read_text())
    assert info["global_steps"] == STEPS and info["samples_consumed"] == STEPS * 16
    lr_ref = {r["step"]: r["lr"] for r in read_metrics(runs / "reference") if "lr" in r}
    lr_got = {r["step"]: r["lr"] for r in read_metrics(resumed) if "lr" in r}
    assert lr_got[STEPS] == pytest.approx(lr_ref[STEPS], rel=1e-9)  # the schedule went on, not restarted
    return info


def test_two_stages_to_one(runs):
    info = check_continues(runs, resume_copy(runs, "two_stages", "to_one", procs=1, stages=1))
    assert info["pipe_stages"] == 1


def test_two_stages_to_two_by_two_data_parallel(runs, tmp_path):
    # 4 processes; 2 micro-batches of 4 per rank keep the global batch at 16 samples
    config = json.loads((ROOT / "ds_configs" / "cpu.json").read_text())
    config["gradient_accumulation_steps"] = 2
    path = tmp_path / "dp2.json"
    path.write_text(json.dumps(config))
    info = check_continues(runs, resume_copy(runs, "two_stages", "to_dp2", procs=4, stages=2, config=path))
    assert (info["pipe_stages"], info["data_parallel"]) == (2, 2)


def test_one_stage_to_two(runs):
    info = check_continues(runs, resume_copy(runs, "one_stage", "to_two", procs=2, stages=2))
    assert info["pipe_stages"] == 2


def test_other_stage_bounds_converted(runs):
    """Same stage and data-parallel count, other bounds: ZeRO-1's per-stage optimizer state
    cannot be loaded directly (DeepSpeed stops with a parameter-alignment error), so the resume
    goes through the universal checkpoint. The checkpoint records no bounds (older format), so
    they are taken to be type:BlockPipe's [0, 3, 7]; this run's are [0, 4, 7]."""
    resumed = resume_copy(runs, "two_stages", "to_flops", procs=2, stages=2)
    out = (resumed / "out.txt").read_text()
    assert "stage bounds [0, 3, 7]) to a universal checkpoint for 2 x 1, stage bounds [0, 4, 7]" in out
    info = check_continues(runs, resumed)
    assert (info["pipe_stages"], info["stage_bounds"], info["partition"]) == (2, [0, 4, 7], "flops")


def plan_for(run_dir, *flags, monkeypatch):
    """What ds_train.py decides before starting any process, for a 2-process launch."""
    from lamda_pipe.run_config import RunConfig
    from lamda_pipe.train import preflight

    for var in ("RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    return preflight(RunConfig.from_argv(["--run-dir", str(run_dir), "--resume", "auto", *flags]))


def test_resume_converts_exactly_when_the_bounds_differ(runs, monkeypatch):
    reference = plan_for(runs / "reference", monkeypatch=monkeypatch)  # recorded [0, 4, 7]
    assert (reference.resume.saved_layout.stage_bounds, reference.resume.change_layout) == ((0, 4, 7), False)
    other = plan_for(runs / "reference", "--partition", "type:BlockPipe", monkeypatch=monkeypatch)
    assert (other.bounds, other.resume.change_layout) == ((0, 3, 7), True)
    old = plan_for(runs / "two_stages", "--partition", "type:BlockPipe", monkeypatch=monkeypatch)
    # the checkpoint recorded no bounds: they are type:BlockPipe's
    assert (old.resume.saved_layout.stage_bounds, old.resume.change_layout) == ((0, 3, 7), False)
    assert plan_for(runs / "two_stages", monkeypatch=monkeypatch).resume.change_layout
