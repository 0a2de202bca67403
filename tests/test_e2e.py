"""ds_train.py end to end: through the real `deepspeed` launcher (2 processes, 2 stages), and
the refusals that must happen before any process is started."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_utils import free_port, launch_direct

pytestmark = pytest.mark.launch  # the deepspeed launcher, and ds_train.py as a subprocess

ROOT = Path(__file__).resolve().parent.parent
DS_TRAIN = str(ROOT / "ds_train.py")
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
HARNESS = importlib.util.find_spec("lm_eval") is not None  # the hf extra (in test too)


def launch(run_dir: Path, *flags: str, timeout: float = 240, check: bool = True, procs: int = 2,
           direct: bool = False) -> subprocess.CompletedProcess:
    """ds_train.py on `procs` ranks through the deepspeed launcher, or with direct=True started
    as processes without one (tests.dist_utils.launch_direct: the same ranks, 6 s less)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [DS_TRAIN, "--run-dir", str(run_dir), "--log-every", "1", "--eval-every", "3", "--eval-iters", "1",
            "--sample-tokens", "8", *flags]
    if direct:
        proc = launch_direct(args, procs, cwd=ROOT, env=env, timeout=timeout)
    else:
        proc = subprocess.run([DEEPSPEED, "--num_gpus", str(procs), "--master_port", str(free_port()), *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 or not check, f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in run_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    # with lm-evaluation-harness at each checkpoint, in the background (tests/test_background_eval.py)
    lm_eval = ["--lm-eval", "demo", "--lm-eval-args", "--limit 2 --batch-size 4"] if HARNESS else []
    proc = launch(run_dir, "--steps", "6", "--save-every", "3", "--peak-tflops", "0.25", *lm_eval)
    return run_dir, proc


def test_launcher_run_writes_metrics_tensorboard_and_checkpoints(trained):
    run_dir, proc = trained
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]  # only rank 0 logs: no duplicates
    for r in train:
        assert {"step", "loss", "lr", "loss_scale", "tokens_per_s", "tflops", "mfu"} <= r.keys()
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["loss_scale"] == 1.0
        # 2 processes, each against the given 0.25 TFLOP/s peak
        assert r["tflops_per_device"] == pytest.approx(r["tflops"] / 2)
        assert r["mfu"] == pytest.approx(r["tflops"] / (2 * 0.25))
    assert train[-1]["loss"] < train[0]["loss"]
    assert [r["step"] for r in evals] == [3, 6]

    tags = tensorboard_tags(run_dir)
    for name in ("train_loss", "lr", "loss_scale", "tokens_per_s", "tflops_per_device", "mfu", "val_loss"):
        assert f"Train/Samples/{name}" in tags, sorted(tags)

    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "global_step6"
    for step in (3, 6):
        files = {p.name for p in (ckpt / f"global_step{step}").iterdir()}
        assert {"layer_00-model_states.pt", "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= files
    assert "sample: " in proc.stdout


@pytest.mark.skipif(not HARNESS, reason="the hf extra (in test too)")
def test_lm_eval_during_training_gives_lamda_evals_figures_for_each_checkpoint(trained, tmp_path):
    """The background evaluation of each checkpoint reports what lamda-eval, run by hand on the
    same checkpoint with the same flags, prints: the right checkpoint, the whole result."""
    from lamda_pipe.tools.eval_lm import main

    run_dir, proc = trained
    records = [r for r in read_metrics(run_dir) if "lm_eval" in r]
    assert [r["step"] for r in records] == [3, 6], proc.stdout[-3000:]  # the last step's waits for step 3's
    for r in records:
        out = tmp_path / f"step{r['step']}.json"
        assert main(["--model", str(run_dir / "checkpoints" / f"global_step{r['step']}"), "--limit", "2",
                     "--batch-size", "4", "--device", "cpu", "--json", str(out)]) == 0
        by_hand = json.loads(out.read_text())["results"]
        assert set(r["lm_eval"]) == {"lamda_demo_heldout", "lamda_demo_next_sentence"}
        for task, metrics in r["lm_eval"].items():
            assert metrics == {k.removesuffix(",none"): v for k, v in by_hand[task].items()
                               if "," in k and "stderr" not in k}, task
        assert json.loads((run_dir / "lm_eval" / f"step_{r['step']}.json").read_text())["results"] == by_hand
    assert records[1]["lm_eval"] != records[0]["lm_eval"]  # two checkpoints, two sets of figures
    assert "lm_eval/lamda_demo_heldout/bits_per_byte" in " ".join(tensorboard_tags(run_dir))
    assert "lm-eval lamda_demo_next_sentence | acc" in proc.stdout


@pytest.fixture(scope="module")
def resumed(trained):
    run_dir, _ = trained
    return launch(run_dir, "--steps", "8", "--load", str(run_dir / "checkpoints"), direct=True)


def test_load_continues_the_step_count(trained, resumed):
    run_dir, _ = trained
    assert "resumed from" in resumed.stdout and "at step 6, 96 samples consumed" in resumed.stdout
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # appended, continuing from 6
    ckpt = run_dir / "checkpoints" / "global_step8"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "global_step8"
    info = json.loads((ckpt / "lamda_run.json").read_text())
    assert info["samples_consumed"] == 8 * 16 and info["pipe_stages"] == 2  # 16 = 4 x 4 micro-batches x 1
    assert (ckpt / "tokenizer.json").read_bytes() == (run_dir / "data" / "tokenizer.json").read_bytes()


def test_resume_is_exact(trained, resumed, tmp_path):
    """6 steps, stop, resume to 8 == 8 steps in one go: same data position, model, optimizer
    and schedule, so the losses after the resume are bit-identical (fp32, 1 thread per rank)."""
    run_dir, _ = trained
    launch(tmp_path, "--steps", "8", "--save-every", "8", "--sample-tokens", "0", direct=True)
    continuous = {r["step"]: r["loss"] for r in read_metrics(tmp_path) if "loss" in r}
    stitched = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    assert stitched == continuous


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).with_name(name))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def test_mixture_of_prepared_dirs_trains(tmp_path):
    """Tokenizer and data prepared with the console scripts, then a weighted mixture."""
    corpus = ROOT / "lamda_pipe" / "data" / "corpus"
    tok = tmp_path / "tok.json"
    assert run_tool("lamda-train-tokenizer", "--input", *map(str, corpus.glob("*.txt")), "--vocab-size", "1024",
                    "--out", str(tok), "--no-progress").returncode == 0
    for name, books in (("law", ["genesis.txt", "esther.txt"]), ("wisdom", ["job.txt", "proverbs.txt"])):
        proc = run_tool("lamda-prepare-data", "--input", *[str(corpus / b) for b in books], "--tokenizer", str(tok),
                        "--out", str(tmp_path / name), "--val-fraction", "0.1", "--no-progress")
        assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "run"
    data = f"{tmp_path / 'law'}:0.75,{tmp_path / 'wisdom'}:0.25"
    proc = launch(run_dir, "--steps", "3", "--data", data, "--vocab-size", "1024", "--save-every", "3", direct=True)
    assert "law (0.75" in proc.stdout and "wisdom (0.25" in proc.stdout
    evals = [r for r in read_metrics(run_dir) if "val_loss" in r]
    assert evals and set(evals[-1]["val_loss_by_source"]) == {"law", "wisdom"}
    by = evals[-1]["val_loss_by_source"]
    assert evals[-1]["val_loss"] == pytest.approx(0.75 * by["law"] + 0.25 * by["wisdom"])
    assert "val_loss/law" in " ".join(tensorboard_tags(run_dir))


def run_preflight(tmp_path: Path, *flags: str, world_size: int = 2) -> subprocess.CompletedProcess:
    """ds_train.py without a launcher and without MASTER_ADDR: any process-group work would fail
    or hang, so a clean exit code 2 shows the refusal came first."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK")}
    env.update(WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    return subprocess.run([sys.executable, DS_TRAIN, "--run-dir", str(tmp_path / "run"), *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_zero2_with_two_stages_refused_before_any_work(tmp_path):
    config = json.loads((ROOT / "ds_configs" / "cpu.json").read_text())
    config["zero_optimization"]["stage"] = 2
    path = tmp_path / "zero2.json"
    path.write_text(json.dumps(config))
    proc = run_preflight(tmp_path, "--deepspeed_config", str(path), "--pipe-stages", "2")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "use ZeRO-1 with pipeline parallelism" in errors[0]
    assert not (tmp_path / "run").exists()  # nothing was created


@pytest.mark.skipif(torch.cuda.is_available(), reason="flex is refused only without CUDA")
def test_flex_attention_without_cuda_and_bad_peak_refused(tmp_path):
    proc = run_preflight(tmp_path, "--attention", "flex")
    assert proc.returncode == 2 and "--attention flex needs a CUDA GPU" in proc.stderr
    proc = run_preflight(tmp_path, "--peak-tflops", "0")
    assert proc.returncode == 2 and "--peak-tflops must be > 0" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_existing_checkpoints_not_overwritten_without_load(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "latest").write_text("global_step5")
    proc = run_preflight(tmp_path)
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr and "--load" in proc.stderr
    assert (ckpt / "latest").read_text() == "global_step5"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]


def test_load_with_another_model_or_a_missing_checkpoint_refused(trained, tmp_path):
    run_dir, _ = trained
    ckpt = str(run_dir / "checkpoints")
    proc = run_preflight(tmp_path, "--load", ckpt, "--model", "readme")
    assert proc.returncode == 2 and "resume with --model debug" in proc.stderr
    proc = run_preflight(tmp_path, "--load", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "no 'latest' file" in proc.stderr


def test_a_damaged_file_only_the_last_stage_loads_is_named_by_its_rank_before_any_load(trained, tmp_path):
    """Each rank reads only its share of the checkpoint's bytes at start-up: the damaged file is
    one that only stage 1 loads, so rank 1 names it, and the launcher ends rank 0, which was
    waiting for its peer. Nothing is loaded, trained or written."""
    import shutil

    from lamda_pipe.run_format import RunRecord

    run_dir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    tag = copy / "checkpoints" / (copy / "checkpoints" / "latest").read_text().strip()
    record = RunRecord.read(tag)
    victim = tag / record.stage_files(1, record.stage_bounds)[-1]
    victim.write_bytes(victim.read_bytes()[:100])
    before = {p.name: p.stat().st_mtime_ns for p in (copy / "checkpoints").iterdir()}
    proc = launch(copy, "--resume", "auto", "--steps", "9", check=False, timeout=120)
    assert proc.returncode != 0
    assert f"{victim} is damaged" in proc.stdout + proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "checkpoints").iterdir()} == before
    assert read_metrics(copy) == read_metrics(run_dir)  # not one step more


def test_missing_data_refused_before_any_work(tmp_path):
    proc = run_preflight(tmp_path, "--data", str(tmp_path / "no-such-corpus"))
    assert proc.returncode == 2 and "no such data dir" in proc.stderr and "lamda-prepare-data" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_damaged_checkpoint_named_before_any_work(trained, tmp_path):
    import shutil

    run_dir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    tag = copy / "checkpoints" / (copy / "checkpoints" / "latest").read_text().strip()
    layer = tag / "layer_02-model_states.pt"
    layer.write_bytes(layer.read_bytes()[:100])
    before = sorted(p.name for p in (copy / "checkpoints").iterdir())
    proc = run_preflight(tmp_path, "--resume", "auto")
    assert proc.returncode == 2 and "layer_02-model_states.pt is damaged" in proc.stderr
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == before  # nothing touched
