"""The planner's peak memory per stage against the CPU allocator's measurement of the real
DeepSpeed pipeline engine (bench/pipeline.py --part memory, started by torchrun), for the debug
preset at 1 and 2 stages, without and with activation checkpointing. The readme preset and 4
stages: bench/plan_vs_measured.py, docs/benchmarks.md ("Planned against measured memory")."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.launch

BENCH = Path(__file__).resolve().parent.parent / "bench" / "plan_vs_measured.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("plan_vs_measured", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_predicted_peak_per_stage_within_15_percent_of_measured():
    bench = load_bench()
    rows = bench.compare(bench.measure("debug", 128, "1,2"))
    assert [(r["p"], r["ckpt"], r["stage"]) for r in rows] == [(1, 0, 0), (2, 0, 0), (2, 0, 1),
                                                               (1, 1, 0), (2, 1, 0), (2, 1, 1)]
    off = {(r["p"], r["ckpt"], r["stage"]): f"{r['error']:+.1%}" for r in rows if abs(r["error"]) > 0.15}
    assert not off, f"predicted peak off by more than 15%:\n{bench.table(rows)}"
