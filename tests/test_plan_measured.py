"""The planner against real launches: its peak memory per stage against the CPU allocator's
measurement of the DeepSpeed pipeline engine (bench/pipeline.py --part memory, started by
torchrun), for the debug preset at 2 stages, without and with activation checkpointing
(1 stage, the readme preset and 4 stages: bench/plan_vs_measured.py, docs/benchmarks.md, "Planned
against measured memory"); and ds_train.py --dry-run under torchrun."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.launch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "plan_vs_measured.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("plan_vs_measured", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_predicted_peak_per_stage_within_15_percent_of_measured():
    """Two stages (a first stage with the embedding and blocks, a last one with blocks, the
    head and the loss), without and with activation checkpointing."""
    bench = load_bench()
    rows = bench.compare(bench.measure("debug", 128, "2"))
    assert [(r["p"], r["ckpt"], r["stage"]) for r in rows] == [(2, 0, 0), (2, 0, 1), (2, 1, 0), (2, 1, 1)]
    off = {(r["p"], r["ckpt"], r["stage"]): f"{r['error']:+.1%}" for r in rows if abs(r["error"]) > 0.15}
    assert not off, f"predicted peak off by more than 15%:\n{bench.table(rows)}"


def test_dry_run_under_torchrun_plans_the_launched_world_once_and_starts_nothing(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "ds_train.py"), "--dry-run", "--pipe-stages", "1", "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # the world torchrun set up, 2 ranks on 1 stage: 2 replicas of cpu.json's 4 x 4 sequences
    assert proc.stdout.count("dry run: the plan of this run") == 1  # rank 0 alone prints
    assert "1 stage(s) x 2 data-parallel = 2 device(s); micro-batch 4 x 4 micro-batches x 2 = 32 sequences" in proc.stdout
    assert not run_dir.exists()
