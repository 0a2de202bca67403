"""Divergence guards (lamda_pipe/guard.py): non-finite steps skipped on every stage, rollback to
the last checkpoint with an exact, recorded skip of samples, a resume that repeats the healed run,
saves of non-finite weights refused, and a run that keeps diverging stopped with exit status 3
and its last good checkpoint kept.

Faults are real: a loss function that returns inf for chosen samples (found by their tokens, so
the poison follows the data, not the step), weights overwritten with NaN after a step, and a
learning rate that blows the loss up.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lamda_pipe.config import get_preset
from lamda_pipe.guard import Diverged, Fault, Guard, GuardSettings, check_ds_config, finite_or_nan
from lamda_pipe.errors import ConfigError
from lamda_pipe.run_format import RunRecord
from tests.dist_utils import free_port, run_ranks
from tests.test_e2e import tensorboard_tags

ROOT = Path(__file__).resolve().parent.parent
CFG = get_preset("debug")
GLOBAL_BATCH = 16  # cpu.json: 4 x 4 micro-batches, one data-parallel rank
FLAGS = ["--log-every", "1", "--eval-every", "0", "--sample-tokens", "0"]


# --- the decision, without DeepSpeed --------------------------------------------------------------

def feed(guard: Guard, steps) -> list[Fault | None]:
    return [guard.check(step, skipped, scale, loss) for step, (skipped, scale, loss) in enumerate(steps, 1)]


@pytest.mark.unit
def test_streak_of_skipped_steps_triggers_and_a_good_step_resets_it():
    guard = Guard(GuardSettings(skip_streak=3))
    # skipped-step counts as DeepSpeed reports them: +1 on each skipped step
    faults = feed(guard, [(1, 1, None), (2, 1, None), (2, 1, None), (3, 1, None), (4, 1, None), (5, 1, None)])
    assert faults[:5] == [None] * 5
    assert faults[5] == Fault(6, "3 consecutive steps skipped for non-finite loss or gradients")


@pytest.mark.unit
def test_first_step_after_a_resume_is_compared_with_the_resumed_count():
    guard = Guard(GuardSettings(skip_streak=1), last_skipped=7)  # the checkpoint had 7 skipped steps
    assert guard.check(101, 7, 1.0, None) is None
    assert guard.check(102, 8, 1.0, None) is not None


@pytest.mark.unit
def test_loss_spike_against_the_mean_of_the_window():
    guard = Guard(GuardSettings(spike_factor=3.0, spike_window=2))
    assert feed(guard, [(0, 1, 10.0), (0, 1, 2.0), (0, 1, 4.0)]) == [None] * 3  # window now [2, 4]: mean 3
    assert guard.check(4, 0, 1.0, 8.9) is None  # 8.9 < 9; window [4, 8.9]
    fault = guard.check(5, 0, 1.0, 19.5)  # > 3 x 6.45
    assert fault is not None and fault.step == 5 and "loss spike" in fault.reason
    assert guard.check(6, 1, 1.0, math.nan) is None  # non-finite: a skipped step, not a spike
    off = Guard(GuardSettings(spike_factor=0))
    assert feed(off, [(0, 1, 1.0), (0, 1, 1e9)]) == [None, None]


@pytest.mark.unit
def test_fp16_loss_scale_collapse_triggers():
    guard = Guard(GuardSettings(min_loss_scale=1.0, skip_streak=100))
    assert feed(guard, [(1, 4.0, None), (2, 2.0, None)]) == [None, None]
    assert "loss scale collapsed" in guard.check(3, 3, 1.0, None).reason


@pytest.mark.unit
def test_gives_up_after_max_rollbacks_unless_a_checkpoint_passed_the_failure():
    guard = Guard(GuardSettings(max_rollbacks=2))
    guard.admit(Fault(10, "a"))
    guard.admit(Fault(12, "b"))
    guard.saved(12)  # not past step 12: no progress
    with pytest.raises(Diverged, match=r"3 times .* after 2 rollbacks: step 10 \(a\), step 12 \(b\), step 11"):
        guard.admit(Fault(11, "c"))
    progressed = Guard(GuardSettings(max_rollbacks=1))
    progressed.admit(Fault(10, "a"))
    progressed.saved(14)  # a checkpoint past the failure: the count starts again
    progressed.admit(Fault(20, "b"))


@pytest.mark.unit
def test_finite_loss_is_unchanged_bit_for_bit_and_a_nonfinite_one_gives_nan_gradients():
    w = torch.tensor([0.3, -1.7], requires_grad=True)
    plain = (w * 3.1).pow(2).sum()
    plain.backward()
    g_plain = w.grad.clone()
    w.grad = None
    guarded = finite_or_nan(lambda x: (x * 3.1).pow(2).sum())(w)
    guarded.backward()
    assert torch.equal(guarded, plain.detach()) and torch.equal(w.grad, g_plain)
    w.grad = None
    # an inf loss whose gradient alone would be finite (the inf does not depend on w)
    bad = finite_or_nan(lambda x: (x * 3.1).sum() + torch.tensor(math.inf))(w)
    bad.backward()
    assert torch.isnan(bad) and torch.isnan(w.grad).all()


@pytest.mark.unit
def test_configs_the_guard_cannot_protect_are_refused():
    for name in ("cpu.json", "gpu_bf16.json", "gpu_fp16.json"):
        check_ds_config(json.loads((ROOT / "lamda_pipe" / "ds_configs" / name).read_text()))
    with pytest.raises(ConfigError, match="stage 0"):
        check_ds_config({"zero_optimization": {"stage": 0}})
    with pytest.raises(ConfigError, match="compute_grad_norm"):
        check_ds_config({"zero_optimization": {"stage": 1, "compute_grad_norm": False}})
    with pytest.raises(ConfigError, match="check_grad_overflow"):
        check_ds_config({"bf16": {"enabled": True, "check_grad_overflow": False}})


@pytest.mark.unit
def test_skipped_samples_round_trip_and_default_to_none():
    rec = RunRecord(model_preset="debug", model_config=CFG, pipe_stages=2, data_parallel=1, global_steps=6,
                    samples_consumed=112, skipped_samples=((96, 112),))
    assert RunRecord.from_dict(json.loads(rec.to_json())) == rec
    d = json.loads(rec.to_json())
    del d["skipped_samples"]  # written before the field existed
    assert RunRecord.from_dict(d).skipped_samples == ()


@pytest.mark.unit
def test_trainer_refuses_an_unguardable_deepspeed_config_before_any_work(tmp_path, capsys):
    from lamda_pipe.train import main

    ds = json.loads((ROOT / "lamda_pipe" / "ds_configs" / "cpu.json").read_text())
    ds["zero_optimization"]["stage"] = 0
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    assert main(["--run-dir", str(tmp_path / "run"), "--deepspeed_config", str(tmp_path / "ds.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ds_train.py: error: with fp32" in err and '"stage": 1' in err
    assert not (tmp_path / "run").exists()


# --- real ranks ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from lamda_pipe.data.loader import prepare_bundled

    return prepare_bundled(tmp_path_factory.mktemp("guard") / "data", CFG.vocab_size)


def sample_rows(data_dir: Path, slots) -> np.ndarray:
    """The labels rows (sample[1:]) of the training stream's slots, as the trainer draws them."""
    from lamda_pipe.data.loader import MicroBatchStream, open_sources

    source = open_sources(str(data_dir), model_vocab=CFG.vocab_size, seq_len=CFG.max_seq_len)[0]
    stream = MicroBatchStream([source.tokens("train")], CFG.max_seq_len, 4, seed=1234, shuffle=True)
    return np.stack([stream.slot_sample(s)[1:] for s in slots])


def _train_poisoned(rank: int, argv: list[str], poison_rows: np.ndarray) -> int:
    """main() with a loss that is inf for every micro-batch holding one of poison_rows. The inf is
    added, so the gradients stay finite: only the guard's loss wrapper makes DeepSpeed skip the step."""
    import lamda_pipe.pipeline as pipeline
    from lamda_pipe.train import main

    real, rows = pipeline.lm_loss, torch.from_numpy(poison_rows)

    def poisoned(logits, labels):
        loss = real(logits, labels)
        hit = (labels[:, None, :] == rows[None]).all(-1).any()
        return loss + math.inf if hit else loss

    pipeline.lm_loss = poisoned
    return main(argv)


def _train_corrupted(rank: int, argv: list[str], at_step: int) -> int:
    """main() whose weights turn NaN once, right after step at_step (as bad memory or a bad kernel would)."""
    import lamda_pipe.train as train

    real_build = train.build_engine

    def build(plan, rank):
        engine = real_build(plan, rank)
        real_step, done = engine.train_batch, []

        def train_batch(*a, **kw):
            loss = real_step(*a, **kw)
            if engine.global_steps == at_step and not done:
                done.append(True)
                with torch.no_grad():
                    next(engine.module.parameters()).fill_(math.nan)
            return loss
        engine.train_batch = train_batch
        return engine

    train.build_engine = build
    return train.main(argv)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def record(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"global_step{step}" / "lamda_run.json").read_text())


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    tag = run_dir / "checkpoints" / f"global_step{step}"
    return {f"{f.name}:{k}": v for f in sorted(tag.glob("layer_*-model_states.pt"))
            for k, v in torch.load(f, weights_only=True).items()}


POISON = range(80, 112)  # the samples of steps 6 and 7 (16 per step)


@pytest.fixture(scope="module")
def healed(data_dir, tmp_path_factory) -> Path:
    """9 steps, a checkpoint each; steps 6 and 7 poisoned: two skips make a streak, so step 7
    rolls back to global_step6 and skips samples 96-111 (step 7's)."""
    run_dir = tmp_path_factory.mktemp("healed")
    argv = ["--run-dir", str(run_dir), "--data", str(data_dir), "--steps", "9", "--save-every", "1",
            "--skip-streak", "2", *FLAGS]
    assert run_ranks(_train_poisoned, 2, argv, sample_rows(data_dir, POISON), timeout=240) == [0, 0]
    return run_dir


@pytest.mark.distributed
def test_nonfinite_steps_are_skipped_counted_and_a_streak_rolls_back_past_exact_samples(healed):
    train = [r for r in metrics(healed) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6, 7, 7, 8, 9]  # step 7 again after the rollback
    assert [r["skipped_steps"] for r in train] == [0, 0, 0, 0, 0, 1, 2, 2, 2, 2]
    assert math.isnan(train[5]["loss"]) and math.isnan(train[6]["loss"])
    assert "Train/Samples/skipped_steps" in tensorboard_tags(healed)
    assert all(math.isfinite(r["loss"]) for r in train[7:])  # the poisoned samples were never seen again
    # the skipped step 6 left the weights as step 5 had them; a step that was not skipped changes them
    w4, w5, w6 = weights(healed, 4), weights(healed, 5), weights(healed, 6)
    assert all(torch.equal(w5[k], w6[k]) for k in w5) and not all(torch.equal(w4[k], w5[k]) for k in w4)
    # the rolled-back-to checkpoint and every later one record the skip; the data position is past it
    assert record(healed, 6)["skipped_samples"] == [[96, 112]] and record(healed, 6)["samples_consumed"] == 112
    assert record(healed, 9)["skipped_samples"] == [[96, 112]] and record(healed, 9)["samples_consumed"] == 160
    assert record(healed, 5)["skipped_samples"] == []
    for step in range(1, 10):
        assert all(torch.isfinite(v).all() for v in weights(healed, step).values()), step


@pytest.mark.distributed
def test_resume_after_a_rollback_repeats_the_healed_run(healed, data_dir, tmp_path):
    """A run stopped at step 7 (after its rollback) and resumed from the checkpoint it rolled back
    to, whose rewritten record carries the skip, gives the healed run's losses bit for bit."""
    run_dir = tmp_path / "stopped"
    argv = ["--run-dir", str(run_dir), "--data", str(data_dir), "--save-every", "1", "--skip-streak", "2", *FLAGS]
    assert run_ranks(_train_poisoned, 2, [*argv, "--steps", "7"], sample_rows(data_dir, POISON),
                     timeout=240) == [0, 0]
    ckpts = run_dir / "checkpoints"
    # as if killed right after the rollback, before step 7's save (a resume behind a newer complete
    # checkpoint is refused: its saves would write over it)
    (ckpts / "latest").write_text("global_step6")
    shutil.rmtree(ckpts / "global_step7")
    assert run_ranks(_train_poisoned, 2, [*argv, "--steps", "9", "--resume", "auto"],
                     sample_rows(data_dir, POISON), timeout=240) == [0, 0]
    healed_losses = {r["step"]: r["loss"] for r in metrics(healed) if "loss" in r}  # last record per step
    resumed = [r for r in metrics(run_dir) if "loss" in r][-3:]
    assert [(r["step"], r["loss"]) for r in resumed] == [(s, healed_losses[s]) for s in (7, 8, 9)]
    keys = ("global_steps", "samples_consumed", "skipped_samples", "micro_offset")
    assert [record(run_dir, 9)[k] for k in keys] == [record(healed, 9)[k] for k in keys]


@pytest.mark.distributed
def test_nonfinite_weights_are_never_saved_and_keep_last_keeps_the_good_checkpoint(data_dir, tmp_path):
    run_dir = tmp_path / "corrupt"
    argv = ["--run-dir", str(run_dir), "--data", str(data_dir), "--steps", "8", "--save-every", "2",
            "--keep-last", "1", *FLAGS]
    assert run_ranks(_train_corrupted, 2, argv, 6, timeout=240) == [0, 0]
    # the save at step 6 was refused; the run rolled back to global_step4 (still there despite
    # --keep-last 1) and skipped steps 5 and 6's samples; later saves are finite
    assert record(run_dir, 8)["skipped_samples"] == [[64, 96]]
    assert record(run_dir, 8)["samples_consumed"] == 8 * GLOBAL_BATCH + 32
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("global_step*")) == ["global_step8"]
    assert all(torch.isfinite(v).all() for v in weights(run_dir, 8).values())
    steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]


def _train_fp16_poisoned(rank: int, argv: list[str], poison_rows: np.ndarray) -> int:
    """fp16 on CPU, for the overflow path only (never for users): DeepSpeed's accelerator is told
    it supports fp16 and the trainer's "fp16 needs a GPU" check is passed over."""
    from deepspeed.accelerator import get_accelerator

    import lamda_pipe.train as train

    accel = get_accelerator()
    accel.is_fp16_supported = lambda: True
    accel.supported_dtypes = lambda: [torch.float, torch.half, torch.bfloat16]
    real_check = train.check_run
    train.check_run = lambda ds, **kw: real_check(ds, **{**kw, "cuda_available": True})
    return _train_poisoned(rank, argv, poison_rows)


@pytest.mark.distributed
def test_fp16_loss_scaler_skips_an_injected_inf_and_a_collapse_rolls_back(data_dir, tmp_path):
    ds = json.loads((ROOT / "lamda_pipe" / "ds_configs" / "cpu.json").read_text())
    poison = sample_rows(data_dir, range(80, 96))  # step 6's samples

    def run(name: str, min_scale: int) -> Path:
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "hysteresis": 1,
                      "loss_scale_window": 1000, "min_loss_scale": min_scale}
        (tmp_path / f"{name}.json").write_text(json.dumps(ds))
        argv = ["--run-dir", str(tmp_path / name), "--data", str(data_dir), "--deepspeed_config",
                str(tmp_path / f"{name}.json"), "--steps", "8", "--save-every", "1", *FLAGS]
        assert run_ranks(_train_fp16_poisoned, 2, argv, poison, timeout=240) == [0, 0]
        return tmp_path / name

    # DeepSpeed's dynamic loss scaling is the first line: the step is skipped, the scale halved
    scaler = run("scaler", 1)
    train = [r for r in metrics(scaler) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["skipped_steps"] for r in train] == [0] * 5 + [1] * 3
    assert [r["loss_scale"] for r in train] == [256.0] * 5 + [128.0] * 3 and math.isnan(train[5]["loss"])
    w5, w6 = weights(scaler, 5), weights(scaler, 6)
    assert all(torch.equal(w5[k], w6[k]) for k in w5)
    # a scale that falls to min_loss_scale is a collapse: roll back to step 5, skip step 6's samples
    collapsed = run("collapsed", 128)
    train = [r for r in metrics(collapsed) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6, 6, 7, 8]
    assert [r["loss_scale"] for r in train] == [256.0] * 5 + [128.0] + [256.0] * 3
    assert record(collapsed, 8)["skipped_samples"] == [[80, 96]]


def hot_config(tmp_path: Path) -> Path:
    """cpu.json with a learning rate that blows the loss up from step 4 on."""
    ds = json.loads((ROOT / "lamda_pipe" / "ds_configs" / "cpu.json").read_text())
    ds["optimizer"]["params"]["lr"] = 30.0
    (tmp_path / "hot.json").write_text(json.dumps(ds))
    return tmp_path / "hot.json"


def _train(rank: int, argv: list[str]) -> int:
    from lamda_pipe.train import main

    return main(argv)


@pytest.mark.distributed
def test_divergence_before_the_first_checkpoint_stops_with_exit_3_and_saves_nothing(data_dir, tmp_path, capfd):
    run_dir = tmp_path / "run"
    argv = ["--run-dir", str(run_dir), "--data", str(data_dir), "--deepspeed_config", str(hot_config(tmp_path)),
            "--steps", "20", "--save-every", "10", *FLAGS]
    assert run_ranks(_train, 2, argv, timeout=240) == [3, 3]
    assert "stopped at step 4: no checkpoint of this run" in capfd.readouterr().err
    assert not list(run_dir.glob("checkpoints/global_step*"))


@pytest.mark.launch
def test_learning_rate_that_blows_up_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tmp_path):
    """The issue's worst case: the loss diverges; no diverged checkpoint is marked complete or
    named by `latest`, and --keep-last deletes nothing good."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "ds_train.py"), "--run-dir", str(run_dir), "--deepspeed_config", str(hot_config(tmp_path)),
           "--steps", "24", "--save-every", "2", "--keep-last", "1", *FLAGS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stopped at step 4: training failed 4 times" in proc.stderr and "lower learning rate" in proc.stderr
    assert proc.stdout.count("rolled back from step 4 to global_step2") == 3
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step2" and (ckpts / "global_step2" / "lamda_complete").is_file()
    assert sorted(p.name for p in ckpts.glob("global_step*")) == ["global_step2"]
    assert all(torch.isfinite(v).all() for v in weights(run_dir, 2).values())
    assert record(run_dir, 2)["skipped_samples"] == [[32, 64], [64, 96], [96, 128]]
