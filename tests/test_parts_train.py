"""Dirs prepared in parts by separate `lamda-prepare-data --shard i/N` processes: tasks started
together without a plan agree on one (they race to write it); the dir trains (2 ranks, 2 stages,
started without a launcher) with exactly the losses (train and validation) of the dir one process
prepares from the same files with the same tokenizer; with a part missing,
ds_train.py refuses before any work, naming the shard to run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lamda_pipe.data.loader import DataSource, bundled_corpus
from lamda_pipe.data.prepare import read_meta
from lamda_pipe.data.text_sources import iter_documents
from lamda_pipe.data.tokenizer import train_tokenizer
from tests.dist_utils import launch_direct

pytestmark = pytest.mark.launch  # console tools and ds_train.py as subprocesses, the deepspeed launcher

ROOT = Path(__file__).resolve().parent.parent
FILES = [str(p) for p in bundled_corpus()]


def prepare(tok: Path, out: Path, *extra: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "lamda_pipe.tools.prepare_data", "--input", *FILES, "--tokenizer",
                           str(tok), "--out", str(out), "--val-fraction", "0.05", "--no-progress", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def train(data: Path, run_dir: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = launch_direct(["ds_train.py", "--run-dir", str(run_dir), "--data", str(data), "--steps", "4", "--log-every",
                          "1", "--eval-every", "2", "--eval-iters", "2", "--sample-tokens", "0", "--save-every", "1000"],
                         2, cwd=ROOT, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "loss", "val_loss") if k in r} for r in records if "loss" in r or "val_loss" in r]


def test_parts_from_separate_processes_train_with_the_one_process_losses(tmp_path):
    tok = tmp_path / "tok.json"
    train_tokenizer(list(iter_documents(FILES)), vocab_size=2048).save(str(tok))
    parts = tmp_path / "parts"
    for i in (2, 0):
        prepare(tok, parts, "--shard", f"{i}/3", "--workers", "2")

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK")}
    env.update(WORLD_SIZE="2", LOCAL_RANK="0")  # no launcher: any process-group work would fail or hang
    proc = subprocess.run([sys.executable, "ds_train.py", "--run-dir", str(tmp_path / "refused"), "--data", str(parts)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "1 of them are missing or incomplete: shard(s) 1; run" in proc.stderr, proc.stderr
    assert not (tmp_path / "refused").exists()

    assert prepare(tok, parts, "--shard", "1/3", "--workers", "1").endswith(
        f"all 3 parts complete: {parts} is ready (ds_train.py --data {parts})\n")
    prepare(tok, tmp_path / "one")
    ours, reference = train(parts, tmp_path / "run-parts"), train(tmp_path / "one", tmp_path / "run-one")
    assert [r["step"] for r in ours if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in ours if "val_loss" in r] == [2, 4]
    assert ours == reference


def test_tasks_started_together_without_a_plan_agree_on_one(tmp_path):
    tok = tmp_path / "tok.json"
    train_tokenizer(list(iter_documents(FILES)), vocab_size=2048).save(str(tok))
    out = tmp_path / "parts"
    procs = [subprocess.Popen([sys.executable, "-m", "lamda_pipe.tools.prepare_data", "--input", *FILES, "--tokenizer",
                               str(tok), "--out", str(out), "--val-fraction", "0.05", "--no-progress", "--workers", "1",
                               "--shard", f"{i}/6"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(6)]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _, _ in results), results
    assert sum("all 6 parts complete" in stdout for _, stdout, _ in results) >= 1
    prepare(tok, tmp_path / "one")
    a, b = (DataSource(d, 1.0, read_meta(d)) for d in (tmp_path / "one", out))
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(a.tokens(split)), np.asarray(b.tokens(split)))
