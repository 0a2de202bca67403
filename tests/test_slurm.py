"""scripts/slurm/*.sbatch against a real Slurm: munged, slurmctld and slurmd started on this
machine with a private config (tests/hosts.py), jobs submitted with `sbatch`, polled with
`scontrol show job`. Both launch paths train a 2-stage pipeline on the one node (2 tasks), save,
and continue: the srun script through a second submission, the DeepSpeed-launcher script through
a requeue triggered the way the time limit triggers it (USR1 to the batch shell).

Skips (with the reason) where Slurm cannot be installed or run; CI (.ci/run) installs it.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.dist_utils import free_port, launch_direct
from tests.hosts import SlurmCluster, running_slurm, sbatch_env

pytestmark = pytest.mark.launch  # a real Slurm

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts" / "slurm"
JOB_TIMEOUT = 180


@pytest.fixture(scope="module")
def slurm(request):
    yield from running_slurm(request)


def submit(slurm: SlurmCluster, script: str, run_dir: Path, log: Path, steps: int) -> int:
    # One node, 2 tasks of one core each: 2 ranks, one pipeline stage each.
    env = sbatch_env(run_dir, steps, LAMDA_MASTER_PORT=str(free_port()))
    return slurm.sbatch("--job-name", "lamda-test", "--output", str(log), "--nodes", "1", "--ntasks-per-node", "2",
                        "--cpus-per-task", "1", str(SCRIPTS / script), env=env, cwd=ROOT)


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def test_srun_script_trains_then_a_second_submission_resumes(slurm, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job1.out"
    job = submit(slurm, "pretrain_srun.sbatch", run_dir, log, steps=4)
    text = slurm.wait_ok(job, log, JOB_TIMEOUT)
    assert f"job {job} (restart 0) on 1 node(s)" in text
    assert "ranks: 2 per node x 1 = 2 | 1 thread(s) each | accelerator cpu" in text
    assert "+ srun --kill-on-bad-exit=1" in text and "--resume auto" in text
    assert "2 stages x 1 data parallel" in text and "trained to step 4" in text
    assert [r["step"] for r in train_records(run_dir)] == [1, 2, 3, 4]
    assert latest(run_dir) == "global_step4"
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= {
        p.name for p in (run_dir / "checkpoints" / "global_step4").iterdir()}

    log2 = tmp_path / "job2.out"
    job2 = submit(slurm, "pretrain_srun.sbatch", run_dir, log2, steps=6)
    text2 = slurm.wait_ok(job2, log2, JOB_TIMEOUT)
    assert "at step 4, 64 samples consumed" in text2  # 64 = 4 steps x 16 samples
    assert [r["step"] for r in train_records(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert latest(run_dir) == "global_step6"


def usr1_requeue_resume(slurm: SlurmCluster, script: str, run_dir: Path, log: Path, steps: int) -> tuple[int, str]:
    """Submits `script`, sends USR1 to its batch shell (what #SBATCH --signal=B:USR1@300 does before
    the time limit) once it trains, releases the requeued job and waits for it to finish. No
    checkpoint by cadence exists (every 1000 steps): the only one mid-run is the one saved on USR1."""
    env = sbatch_env(run_dir, steps, LAMDA_MASTER_PORT=str(free_port()))
    env["LAMDA_SAVE_EVERY"] = "1000"
    job = slurm.sbatch("--job-name", "lamda-test", "--output", str(log), "--nodes", "1", "--ntasks-per-node", "2",
                       "--cpus-per-task", "1", str(SCRIPTS / script), env=env, cwd=ROOT)

    deadline = time.monotonic() + JOB_TIMEOUT
    while not ((run_dir / "metrics.jsonl").is_file() and len(train_records(run_dir)) >= 3):
        info = slurm.job(job)
        assert info["JobState"] in ("PENDING", "RUNNING") and time.monotonic() < deadline, (
            f"no training step while the job ran: {info.get('JobState')}\n"
            + (log.read_text(errors='replace')[-5000:] if log.exists() else ""))
        time.sleep(0.1)
    slurm.cmd("scancel", "--signal=USR1", "--batch", str(job), check=True)

    # The requeued job waits for a begin time Slurm sets about 2 minutes ahead: release it, but
    # only once the node has cleaned up and the clock has moved past the second in which the
    # first attempt's credential was revoked (slurmd compares whole seconds: a relaunch within
    # that second fails with "Job credential revoked").
    while True:
        info = slurm.job(job)
        if info["JobState"] == "PENDING" and int(info.get("Restarts", 0)) >= 1:
            while slurm.cmd("sinfo", "-h", "-o", "%t").strip() != "idle" and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(2)
            slurm.cmd("scontrol", "update", f"JobId={job}", "StartTime=now", check=True)
            break
        assert info["JobState"] != "COMPLETED", "the job finished before USR1 could requeue it\n" + log.read_text()
        assert time.monotonic() < deadline, f"job {job} not requeued: {info}\n{log.read_text()}"
        time.sleep(0.1)
    text = slurm.wait_ok(job, log, JOB_TIMEOUT)

    assert f"USR1: time limit near, asking job {job}'s ranks to save and stop" in text
    stopped_at = int(text.split("stopping at step ")[1].split(":")[0])
    assert "SIGUSR1 on rank" in text.split("stopping at step ")[1].splitlines()[0]
    assert re.search(rf"training saved a complete checkpoint and stopped on request \(status \d+\): requeueing job {job}",
                     text)
    assert f"job {job} (restart 0) on 1 node(s)" in text and f"job {job} (restart 1) on 1 node(s)" in text
    # The rerun resumed from the checkpoint saved on USR1, and no step was run twice.
    second_attempt = text.split(f"job {job} (restart 1)")[1]
    resumed_at = int(second_attempt.split("resumed from ")[1].split(" at step ")[1].split(",")[0])
    assert resumed_at == stopped_at and 3 <= stopped_at < steps
    assert [r["step"] for r in train_records(run_dir)] == list(range(1, steps + 1))
    assert latest(run_dir) == f"global_step{steps}"
    return job, text


def test_deepspeed_launcher_script_saves_on_usr1_requeues_and_resumes_bit_identically(slurm, tmp_path):
    """One node: the DeepSpeed launcher starts both ranks locally (no hostfile, no ssh); the script
    passes USR1 to the launcher's children. The resumed run has an uninterrupted run's losses."""
    steps = 30
    run_dir = tmp_path / "run"
    job, text = usr1_requeue_resume(slurm, "pretrain.sbatch", run_dir, tmp_path / "job.out", steps)
    assert "stopped on request (status 75)" in text  # DeepSpeed's launcher passes the ranks' status on
    launcher_lines = [line for line in text.splitlines() if line.startswith("+ ")]
    assert len(launcher_lines) == 2 and all("--num_gpus 2" in line and "ds_train.py" in line for line in launcher_lines)
    assert text.count("nnodes=1, num_local_procs=2") == 2  # DeepSpeed's launch.py, once per attempt

    # The same run without interruption (2 ranks, the same thread count; started without a
    # launcher, which does not change a loss) has the same losses.
    reference = tmp_path / "reference"
    proc = launch_direct(["ds_train.py", "--run-dir", str(reference), "--steps", str(steps), "--save-every", "1000",
                          "--log-every", "1", "--eval-every", "0", "--sample-tokens", "0"], 2, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["loss"] for r in train_records(run_dir)] == [r["loss"] for r in train_records(reference)]


def test_srun_script_saves_on_usr1_and_requeues(slurm, tmp_path):
    """srun passes the batch shell's USR1 on to every task."""
    job, text = usr1_requeue_resume(slurm, "pretrain_srun.sbatch", tmp_path / "run", tmp_path / "job.out", 30)
    assert text.count("+ srun --kill-on-bad-exit=1") == 2
