#!/usr/bin/env python
"""Throughput cost of the divergence guard (lamda_pipe/guard.py), guard on vs off in one run.

Every rank builds the trainer's pipeline engine (lamda_pipe.train.build_engine) and trains the
same stream of batches in blocks of --steps optimizer steps, alternating guard on and off
(on/off in even rounds, off/on in odd ones, so machine drift hits both alike):
  on:  the guarded loss (finite_or_nan) and Guard.check after every step, as the trainer runs;
  off: the bare loss function, no check.
A block is timed between barriers; reported are the median step times and their ratio (and
the ratio of the fastest blocks). The
non-finite-weights check runs once per save, so it is timed on its own (median of --saves calls).
On a shared machine the block medians carry its noise; the cost of the wrapper alone (its extra
forward and backward ops on a scalar loss, timed over many calls) bounds the per-step cost too.

    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --master_port 29510 bench/guard.py --run-dir /tmp/bench-guard
    (on a GPU machine: deepspeed --num_gpus 2 bench/guard.py --model readme --run-dir /tmp/bench-guard)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lamda_pipe.distributed import init_distributed, launch_env, set_cpu_threads  # noqa: E402
from lamda_pipe.guard import Guard, finite_or_nan, settings_for, weights_finite  # noqa: E402
from lamda_pipe.run_config import RunConfig  # noqa: E402
from lamda_pipe.train import build_engine, data_streams, demo_sources, loss_scale, preflight  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="debug")
    p.add_argument("--run-dir", type=Path, default=Path("/tmp/bench-guard"))
    p.add_argument("--rounds", type=int, default=6, help="rounds of (on, off) blocks")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per block")
    p.add_argument("--saves", type=int, default=5, help="timed calls of the weights check")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--local_rank", type=int, default=-1)
    return p.parse_args(argv)


def wrapper_cost(wrap, calls: int = 2000) -> float:
    """Seconds per call that the guard's wrapper adds to a scalar loss's forward and backward."""
    import torch

    x = torch.ones(8, requires_grad=True)
    fns = {"bare": lambda t: t.sum(), "guarded": wrap(lambda t: t.sum())}
    best = {}
    for name, fn in list(fns.items()) * 2:  # twice, the better of two
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(x).backward()
        best[name] = min(best.get(name, math.inf), (time.perf_counter() - t0) / calls)
    return best["guarded"] - best["bare"]


def main(argv=None) -> None:
    import torch
    import torch.distributed as dist

    args = parse_args(argv)
    plan = preflight(RunConfig.from_argv(["--model", args.model, "--run-dir", str(args.run_dir),
                                          "--local_rank", str(args.local_rank)]))
    set_cpu_threads(launch_env(args.local_rank).local_world_size)
    init_distributed()
    rank = dist.get_rank()
    args.run_dir.mkdir(parents=True, exist_ok=True)
    sources = plan.sources or demo_sources(plan.run, plan.model, rank, dist.barrier)
    engine = build_engine(plan, rank)
    guarded = engine.module.loss_fn
    bare = guarded.__wrapped__
    assert guarded is not bare  # build_engine installed the guard
    stream, _ = data_streams(plan, sources, engine)
    batches = stream.iterate()
    guard = Guard(settings_for(plan.run, plan.ds), last_skipped=engine.skipped_steps)

    def block(on: bool) -> float:
        engine.module.loss_fn = guarded if on else bare
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.train_batch(batches)
            if on:
                guard.check(engine.global_steps, engine.skipped_steps, loss_scale(engine), None)
        dist.barrier()
        return (time.perf_counter() - t0) / args.steps

    block(True), block(False)  # warm-up, untimed
    times = {True: [], False: []}
    for r in range(args.rounds):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            times[on].append(block(on))
    wrapper = wrapper_cost(finite_or_nan)
    checks = []
    for _ in range(args.saves):
        dist.barrier()
        t0 = time.perf_counter()
        weights_finite(engine)
        checks.append(time.perf_counter() - t0)
    if rank == 0:
        on, off = statistics.median(times[True]), statistics.median(times[False])
        result = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
                  "processor": platform.processor() or platform.machine(),
                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  "world_size": dist.get_world_size(), "model": args.model, "steps_per_block": args.steps,
                  "rounds": args.rounds, "step_s_on": on, "step_s_off": off, "ratio_on_off": on / off,
                  "ratio_of_fastest_blocks": min(times[True]) / min(times[False]),
                  "blocks_on": times[True], "blocks_off": times[False],
                  "weights_check_s": statistics.median(checks), "wrapper_s_per_micro_batch": wrapper,
                  "micro_batches_per_step": engine.gradient_accumulation_steps(), "skipped_steps": engine.skipped_steps}
        print(json.dumps(result, indent=1))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
