"""Killing a 2-stage run through the real launcher at random moments, resuming each time, and
ending where an uninterrupted run ends; starting a new run from trained weights."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.dist_utils import free_port
from tests.test_e2e import DEEPSPEED, DS_TRAIN, ROOT, launch, read_metrics

pytestmark = pytest.mark.launch  # kills and resumes through the deepspeed launcher

STEPS = 10
FLAGS = ["--steps", str(STEPS), "--save-every", "2", "--eval-every", "4", "--eval-iters", "1",
         "--log-every", "1", "--sample-tokens", "0", "--keep-last", "2"]


def start(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), DS_TRAIN, "--run-dir", str(run_dir),
           "--resume", "auto", *FLAGS]
    # own session: one killpg takes the launcher and both ranks
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def final_losses(run_dir: Path) -> dict[int, float]:
    """The last record per step wins: steps replayed after a kill are logged again."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def layer_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(tag_dir.glob("layer_*-model_states.pt")):
        for k, v in torch.load(f, weights_only=True).items():
            out[f"{f.name}:{k}"] = v
    return out


def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    print(f"kill schedule seed {seed}")  # shown on failure, to replay the schedule
    reference = tmp_path / "reference"
    launch(reference, "--resume", "auto", *FLAGS, direct=True)

    run_dir = tmp_path / "killed"
    kills = []
    for _ in range(3):
        low = max(1, last_step(run_dir))
        if low > STEPS - 1:  # a launch got to the end before its kill landed: nothing left to cut
            break
        target = rng.randint(low, STEPS - 1)
        proc = start(run_dir)
        deadline = time.monotonic() + 120
        while last_step(run_dir) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))  # lands anywhere: in a step, an evaluation or a save
        kills.append((target, last_step(run_dir), proc.poll()))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    launch(run_dir, "--resume", "auto", *FLAGS, direct=True)  # the requeued job: same command, to the end

    # at least one kill hit a live run past its target step (a late one may find it finished)
    assert any(seen >= target and alive is None for target, seen, alive in kills), kills
    assert last_step(run_dir) == STEPS, kills
    assert final_losses(run_dir) == final_losses(reference), kills
    ckpt, ref_ckpt = run_dir / "checkpoints", reference / "checkpoints"
    assert (ckpt / "latest").read_text() == f"global_step{STEPS}"
    final, expected = layer_weights(ckpt / f"global_step{STEPS}"), layer_weights(ref_ckpt / f"global_step{STEPS}")
    assert final.keys() == expected.keys() and len(final) > 0
    for k in final:
        assert torch.equal(final[k], expected[k]), k
    # --keep-last 2: only the two newest complete checkpoints remain
    kept = {d.name for d in ckpt.iterdir() if d.is_dir() and (d / "lamda_complete").exists()}
    assert kept == {f"global_step{STEPS - 2}", f"global_step{STEPS}"}


def test_init_from_starts_a_new_run_from_trained_weights(tmp_path):
    source = tmp_path / "source"
    launch(source, "--steps", "4", "--save-every", "4", "--sample-tokens", "0", direct=True)
    fresh = tmp_path / "fresh"
    proc = launch(fresh, "--steps", "2", "--init-from", str(source), "--sample-tokens", "0", direct=True)
    assert "initialised from" in proc.stdout
    steps = [r["step"] for r in read_metrics(fresh) if "loss" in r]
    assert steps == [1, 2]  # a new step count
    info = json.loads((fresh / "checkpoints" / "global_step2" / "lamda_run.json").read_text())
    assert info["global_steps"] == 2 and info["samples_consumed"] == 2 * 16
    # the source's own first step, from scratch on the same data, differs: the weights were loaded
    assert read_metrics(source)[0]["loss"] > read_metrics(fresh)[0]["loss"]
    # the same weights through a --format hf export (a model shared for transformers, fine-tuned
    # here): the same losses, bit for bit
    from lamda_pipe.export import export_checkpoint

    hf = export_checkpoint(source, tmp_path / "hf", fmt="hf")
    from_hf = tmp_path / "from_hf"
    launch(from_hf, "--steps", "2", "--init-from", str(hf), "--sample-tokens", "0", "--data", str(source / "data"),
           direct=True)
    assert [r["loss"] for r in read_metrics(from_hf) if "loss" in r] == [
        r["loss"] for r in read_metrics(fresh) if "loss" in r]
    # and through our own export format: --init-from reads the very tensors of the checkpoint
    # (build_engine copies read_plain_state into the pipeline), so the run would be the same
    from lamda_pipe.run_format import resolve_model
    from lamda_pipe.run_config import RunConfig
    from lamda_pipe.weights import read_plain_state

    cfg = RunConfig().model_config
    export = export_checkpoint(source, tmp_path / "export")
    ours, trained = (read_plain_state(resolve_model(p), cfg) for p in (export, source))
    assert ours.keys() == trained.keys() and all(torch.equal(ours[k], trained[k]) for k in ours)
