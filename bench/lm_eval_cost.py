#!/usr/bin/env python
"""What in-training lm-evaluation-harness runs (ds_train.py --lm-eval) cost the training.

    .venv/bin/python bench/lm_eval_cost.py                        # debug preset, 120 steps, a checkpoint every 40
    .venv/bin/python bench/lm_eval_cost.py --model readme --seq-len 256 --steps 60 --save-every 20 --json out.json

Two runs through the `deepspeed` launcher (2 ranks, 2 stages, gloo, CPU), the same flags but
for `--lm-eval`: `base` without it, `lm_eval` with `--lm-eval TASKS` on every checkpoint.
Reported:
* per evaluation: its wall time (lm_eval_seconds, from the child's start to its report);
* training throughput of the lm_eval run's steps that ran while a child was running, of its
  other steps, and of the base run (medians of metrics.jsonl's tokens/s; each step's interval
  ends at its record's time, so a step overlaps a child when the intervals meet);
* the training wall time of each run (ds_train.py's "trained to step N in X s") and the time
  from that line to the launcher's exit (the lm_eval run waits there for its last evaluation);
* the cost of starting a child on rank 0 (BackgroundEval.after_save: Popen), timed in this
  process on the lm_eval run's last checkpoint, the child stopped at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.dist_utils import free_port  # noqa: E402


def launch(run_dir: Path, args, extra: list[str]) -> tuple[float, float]:
    """(training seconds as ds_train.py reports them, seconds from that line to the launcher's exit)."""
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "ds_train.py"), "--run-dir", str(run_dir), "--model", args.model, "--steps", str(args.steps),
           "--save-every", str(args.save_every), "--log-every", "1", "--eval-every", "0", "--sample-tokens", "0",
           *(["--seq-len", str(args.seq_len)] if args.seq_len else []), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trained_at, trained_s, lines = None, None, []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"trained to step \d+ in ([\d.]+)s", line)
        if m:
            trained_at, trained_s = time.perf_counter(), float(m.group(1))
    if proc.wait() != 0 or trained_s is None:
        raise SystemExit(f"launch failed ({proc.returncode}):\n{''.join(lines[-40:])}")
    return trained_s, time.perf_counter() - trained_at


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def spawn_cost(run_dir: Path, argv: list[str], repeats: int = 5) -> float:
    """Median seconds of BackgroundEval.after_save starting a real child (stopped right after)."""
    from lamda_pipe.background_eval import BackgroundEval

    tag = max((run_dir / "checkpoints").glob("global_step*"), key=lambda p: int(p.name.removeprefix("global_step")))
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            evals = BackgroundEval(Path(tmp), argv, 1, enabled=True, report=lambda *a: None, log=lambda m: None)
            t0 = time.perf_counter()
            evals.after_save(1, 0, tag)
            times.append(time.perf_counter() - t0)
            evals.close()
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="debug")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--save-every", type=int, default=40)
    p.add_argument("--tasks", default="demo")
    p.add_argument("--lm-eval-args", default="", help="more lamda-eval flags, e.g. '--limit 50'")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    from lamda_pipe.background_eval import child_args

    argv = child_args(args.tasks, args.lm_eval_args)
    with tempfile.TemporaryDirectory() as tmp:
        base_dir, eval_dir = Path(tmp) / "base", Path(tmp) / "lm_eval"
        base_train, base_wait = launch(base_dir, args, [])
        eval_train, waited = launch(eval_dir, args, ["--lm-eval", args.tasks, "--lm-eval-args=" + args.lm_eval_args])
        base = records(base_dir)
        run = records(eval_dir)
        evals = [r for r in run if "lm_eval" in r]
        spans = [(r["time"] - r["lm_eval_seconds"], r["time"]) for r in evals]
        steps = [r for r in run if "loss" in r]
        during, outside = [], []
        for prev, r in zip(steps, steps[1:]):  # the first step's interval is unknown
            overlaps = any(prev["time"] < end and r["time"] > start for start, end in spans)
            (during if overlaps else outside).append(r["tokens_per_s"])
        spawn = spawn_cost(eval_dir, argv)
    median = statistics.median
    base_tps = median(r["tokens_per_s"] for r in base[1:] if "loss" in r)
    result = {
        "model": args.model, "seq_len": args.seq_len, "steps": args.steps, "save_every": args.save_every,
        "tasks": args.tasks, "lm_eval_args": args.lm_eval_args,
        "evaluations": [{"step": r["step"], "seconds": round(r["lm_eval_seconds"], 2)} for r in evals],
        "tokens_per_s": {"base": round(base_tps), "lm_eval_run_during_a_child": round(median(during)) if during else None,
                         "lm_eval_run_otherwise": round(median(outside)) if outside else None},
        "steps_during_a_child": len(during), "steps_otherwise": len(outside),
        "train_seconds": {"base": base_train, "lm_eval": eval_train},
        "end_wait_seconds": {"base": round(base_wait, 2), "lm_eval": round(waited, 2)},
        "spawn_ms": round(spawn * 1e3, 2),
    }
    if during:
        result["throughput_during_a_child_vs_base"] = round(median(during) / base_tps, 3)
    result["train_time_ratio"] = round(eval_train / base_train, 3)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
