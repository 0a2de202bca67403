#!/usr/bin/env python
"""Pipeline efficiency and memory per stage of the DeepSpeed pipeline engine, on CPU.

    .venv/bin/python bench/pipeline.py                                  # readme preset, seq 256, ~6 min on 2 cores
    .venv/bin/python bench/pipeline.py --preset debug --seq-len 64      # smoke test, well under a minute
    .venv/bin/python bench/pipeline.py --part memory --json /tmp/mem.json

Each configuration is a real DeepSpeed PipelineEngine started by torchrun (gloo, fp32, ds config
ds_configs/cpu.json with the batch and activation checkpointing overridden), built the way
lamda_pipe/train.py builds it (lamda_pipe.pipeline.build_pipeline, lamda_pipe.distributed).
The data are random tokens: speed and memory do not depend on them.

efficiency: PP=1 (one process) and PP=2 (two processes) at each --micro-batches m, each rank
  with --threads intra-op threads (default 1: PP=2 then uses one core per stage, PP=1 one
  core). Every pipeline instruction (forward, backward, send/recv of activations and grads,
  tied-gradient all-reduce, optimizer step, ...) is timed on every rank. Efficiency is
      T_ideal / T_PP2,  T_ideal = T_PP1 / p * (m + p - 1) / m,
  i.e. measured PP=2 speed-up over PP=1 divided by the ideal speed-up p*m/(m+p-1) of
  DeepSpeed's 1F1B schedule (p = 2). A second figure takes the measured per-micro-batch
  compute of each stage as given: T_sched = (m + p - 1) * max_s(compute per micro-batch).
memory: PP=1 and PP=2, without and with activation checkpointing. Weights, gradients and
  optimizer state are counted from the tensors the engine holds (every live tensor found by
  the garbage collector, deduplicated by storage); the peak during a training step comes
  from the CPU allocator's own live-byte count (torch.profiler with profile_memory=True),
  which sees every tensor allocation, not glibc's caching or the interpreter; the second of
  two profiled steps is measured (peak_from_profile says why).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lamda_pipe.config import PRESETS, get_preset, param_count  # noqa: E402

INSTRUCTIONS = {  # DeepSpeed schedule instruction -> column of the breakdown
    "LoadMicroBatch": "load", "ForwardPass": "fwd", "BackwardPass": "bwd",
    "SendActivation": "send_act", "RecvActivation": "recv_act", "SendGrad": "send_grad",
    "RecvGrad": "recv_grad", "ReduceTiedGrads": "tied_allreduce", "ReduceGrads": "reduce_grads",
    "OptimizerStep": "optimizer",
}
MiB = 1024 * 1024


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="readme", choices=sorted(PRESETS), help="model preset (default readme)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sample (default 256)")
    p.add_argument("--micro-batch", type=int, default=1, help="samples per micro-batch (default 1)")
    p.add_argument("--micro-batches", default="4,8,16", help="m values for the efficiency part (default 4,8,16)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank (default 1)")
    p.add_argument("--partition", default="flops",
                   help="partition: flops (training's default: stages balanced by FLOPs), type:BlockPipe, uniform")
    p.add_argument("--part", choices=["all", "efficiency", "memory"], default="all")
    p.add_argument("--memory-micro-batches", type=int, default=4, help="m for the memory part (default 4)")
    p.add_argument("--stages", default="1,2", help="stage counts of the memory part (default 1,2; the first is the "
                   "baseline of the 'vs PP=1' columns)")
    p.add_argument("--data-parallel", type=int, default=1,
                   help="data-parallel replicas in the memory part: P x D processes per configuration (default 1)")
    p.add_argument("--ckpt-interval", type=int, default=1,
                   help="activation_checkpoint_interval of the checkpointed memory runs (default 1)")
    p.add_argument("--zero", default=None, metavar="JSON",
                   help='merged into zero_optimization of cpu.json, e.g. \'{"contiguous_gradients": false}\'')
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", type=Path, default=None, help="write every measurement here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON spec of one configuration
    args = p.parse_args(argv)
    args.micro_batches = [int(m) for m in args.micro_batches.split(",")]
    args.stages = [int(p) for p in args.stages.split(",")]
    return args


# --------------------------------------------------------------------------------------------
# worker: one configuration, one rank (started by torchrun)
# --------------------------------------------------------------------------------------------

def storage_key(t):
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def tensors_under(obj, depth=4, seen=None):
    """Tensors reachable from obj through containers and object attributes (bounded depth)."""
    import torch

    seen = set() if seen is None else seen
    if id(obj) in seen or depth < 0:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.grad is not None:
            yield obj.grad
        return
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__.split(".")[0] in (
            "deepspeed", "torch"):
        items = list(vars(obj).values())
        if hasattr(obj, "state") and isinstance(getattr(obj, "state"), dict):
            items.append(obj.state)
    else:
        return
    for item in items:
        yield from tensors_under(item, depth - 1, seen)


def state_bytes(engine) -> dict:
    """Bytes of distinct tensor storages alive between steps, by owner."""
    import torch

    gc.collect()
    live = {}
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.device.type == "cpu" and not o.is_meta:
                live[storage_key(o)] = o
        except Exception:  # some objects refuse isinstance checks or storage access
            pass
    weights = {storage_key(p) for p in engine.module.parameters()}
    grads = {storage_key(p.grad) for p in engine.module.parameters() if p.grad is not None}
    opt = {storage_key(t) for t in tensors_under(engine.optimizer)} - weights - grads
    total = sum(k[1] for k in live)
    out = {"weights": sum(k[1] for k in weights), "grads": sum(k[1] for k in grads),
           "optimizer": sum(k[1] for k in opt if k in live)}
    out["other"] = total - out["weights"] - out["grads"] - out["optimizer"]
    out["total"] = total
    out["param_count"] = sum(p.numel() for p in engine.module.parameters())
    return out


class InstructionTimer:
    """Wraps the engine's instruction handlers: (name, start, end) of every instruction."""

    def __init__(self, engine):
        self.events = []
        table = dict(type(engine)._INSTRUCTION_MAP)
        for cls, fn in table.items():
            table[cls] = self._wrap(cls.__name__, fn)
        engine._INSTRUCTION_MAP = table  # instance attribute, read by _exec_schedule

    def _wrap(self, name, fn):
        def timed(engine_self, *a, **kw):
            t0 = time.time_ns()  # the profiler's clock: its event times are Unix time in ns
            try:
                return fn(engine_self, *a, **kw)
            finally:
                self.events.append((name, t0, time.time_ns()))
        return timed


def random_batches(cfg, micro_batch, seq_len, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    while True:  # first and last stage draw the same sequence: same micro-batch on both
        tokens = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), generator=g)
        yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def peak_from_profile(prof, instr_events, since_ns: int = 0) -> dict:
    """Peak live bytes allocated during the profiled step that starts at since_ns, from the
    allocator's own records: over the whole step, and while a forward or backward pass runs
    (where activations live). The profiler records no free of a block allocated before it
    started, so the step measured is the second one profiled: every tensor it frees (the
    previous step's pipe buffers among them) was allocated while profiling."""
    from torch._C._profiler import _EventType

    def walk(evs):
        for e in evs:
            yield e
            yield from walk(e.children)

    allocs = sorted((e for e in walk(prof.profiler.kineto_results.experimental_event_tree())
                     if e.tag == _EventType.Allocation and e.start_time_ns >= since_ns), key=lambda e: e.start_time_ns)
    passes = [(s, e) for name, s, e in instr_events if name in ("ForwardPass", "BackwardPass")]
    live = peak = fb_peak = 0
    peak_ns = None
    for a in allocs:
        live += a.extra_fields.alloc_size
        if live > peak:
            peak, peak_ns = live, a.start_time_ns
        if live > fb_peak and any(s <= a.start_time_ns <= e for s, e in passes):
            fb_peak = live
    phase = None  # the instruction running at the peak (both clocks are Unix time in ns)
    for name, s, e in instr_events:
        if peak_ns is not None and s <= peak_ns <= e:
            phase = name
    return {"transient_peak": peak, "fwd_bwd_peak": fb_peak, "end_delta": live, "alloc_events": len(allocs),
            "peak_phase": phase}


def worker(args) -> None:
    spec = json.loads(args.worker)
    import torch

    torch.set_num_threads(spec["threads"])
    import warnings

    import deepspeed
    import torch.distributed as dist

    from lamda_pipe.distributed import init_distributed
    from lamda_pipe.ds_config import CONFIG_DIR, check_run, fill_run_values, load_config
    from lamda_pipe.pipeline import build_pipeline, stage_bounds

    warnings.filterwarnings("ignore", message="c10d::broadcast_: an autograd kernel was not registered")
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = get_preset(spec["preset"])
    ds = load_config(CONFIG_DIR / "cpu.json")
    ds["train_micro_batch_size_per_gpu"] = spec["micro_batch"]
    ds["gradient_accumulation_steps"] = spec["m"]
    ds.pop("train_batch_size", None)
    ds["tensorboard"] = {"enabled": False}
    ds["steps_per_print"] = 10**9
    ds.setdefault("pipeline", {})["activation_checkpoint_interval"] = spec["ckpt"]
    if spec["zero"]:
        ds["zero_optimization"] = {**ds.get("zero_optimization", {}), **json.loads(spec["zero"])}
    check_run(ds, pipe_stages=spec["p"], world_size=world, cuda_available=False)
    ds = fill_run_values(ds, steps=1000, run_dir=Path(tempfile.gettempdir()))
    bounds = stage_bounds(cfg, spec["p"], spec["seq_len"], method=spec["partition"])
    net = build_pipeline(cfg, bounds, spec["seed"], activation_checkpoint_interval=spec["ckpt"])
    engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=[p for p in net.parameters()
                                                                        if p.requires_grad], config=ds)
    stage = engine.stage_id
    timer = InstructionTimer(engine)
    data = random_batches(cfg, spec["micro_batch"], spec["seq_len"], spec["seed"])
    result = {"rank": rank, "stage": stage, "replica": engine.grid.get_data_parallel_rank(),
              "layers": [int(x) for x in net.parts], "threads": torch.get_num_threads()}

    for _ in range(spec["warmup"]):
        engine.train_batch(data)
    if spec["mode"] == "time":
        steps = []
        for _ in range(spec["steps"]):
            dist.barrier()
            timer.events.clear()
            t0 = time.perf_counter()
            loss = engine.train_batch(data)
            t1 = time.perf_counter()
            by = defaultdict(float)
            count = defaultdict(int)
            for name, s, e in timer.events:
                by[INSTRUCTIONS[name]] += (e - s) / 1e9
                count[INSTRUCTIONS[name]] += 1
            by["other"] = (t1 - t0) - sum(by.values())
            steps.append({"step_s": t1 - t0, "loss": float(loss), "by": dict(by), "count": dict(count)})
        result["steps"] = steps
    else:
        from torch.profiler import ProfilerActivity, profile

        rss_before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            engine.train_batch(data)  # allocates, under the profiler, what the measured step frees
            before = state_bytes(engine)
            timer.events.clear()
            mark = time.time_ns()
            engine.train_batch(data)
        result["state"] = before
        result["peak"] = peak_from_profile(prof, list(timer.events), since_ns=mark)
        result["rss_before"] = rss_before
        result["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # gradients exist only inside a step here (DeepSpeed frees them after the optimizer
        # step); their size equals the fp32 weights of the stage
        result["grad_bytes_in_step"] = sum(p.numel() * p.element_size() for p in engine.module.parameters())
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps(gathered))
    dist.barrier()


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------

def launch(args, mode, p, m, ckpt=0, seed_offset=0, dp=1) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        spec = {"mode": mode, "p": p, "m": m, "ckpt": ckpt, "preset": args.preset, "seq_len": args.seq_len,
                "micro_batch": args.micro_batch, "threads": args.threads, "partition": args.partition,
                "zero": args.zero, "seed": args.seed + seed_offset,
                "warmup": args.warmup, "steps": args.steps, "out": str(out)}
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), DS_ACCELERATOR="cpu",
                   PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(p * dp),
               str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise SystemExit(f"bench/pipeline.py: the {mode} run p={p} m={m} ckpt={ckpt} failed "
                             f"(exit {proc.returncode})")
        ranks = json.loads(out.read_text())
        print(f"  {mode:6s} p={p} d={dp} m={m:2d} ckpt={ckpt}: {time.perf_counter() - t0:5.1f}s wall, "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        return ranks


def median_step(ranks) -> float:
    # a step ends on every rank at about the same time (the loss is broadcast at the end);
    # take the slowest rank per step, then the median over steps
    n = len(ranks[0]["steps"])
    return statistics.median(max(r["steps"][i]["step_s"] for r in ranks) for i in range(n))


def mean_by(rank) -> dict:
    keys = set().union(*(s["by"] for s in rank["steps"]))
    return {k: statistics.mean(s["by"].get(k, 0.0) for s in rank["steps"]) for k in keys}


def efficiency(args, report) -> None:
    p = 2
    rows = []
    for m in args.micro_batches:
        pp1 = launch(args, "time", 1, m)
        pp2 = launch(args, "time", p, m)
        t1, t2 = median_step(pp1), median_step(pp2)
        ideal = t1 / p * (m + p - 1) / m
        stages = sorted(pp2, key=lambda r: r["stage"])
        per_stage = [mean_by(r) for r in stages]
        compute = [(b.get("fwd", 0) + b.get("bwd", 0) + b.get("load", 0)) / m for b in per_stage]
        sched = (m + p - 1) * max(compute)
        rows.append({"m": m, "pp1_step_s": t1, "pp2_step_s": t2, "ideal_step_s": ideal,
                     "speedup": t1 / t2, "ideal_speedup": p * m / (m + p - 1), "efficiency": ideal / t2,
                     "sched_step_s": sched, "sched_efficiency": sched / t2,
                     "compute_per_micro_batch_s": compute, "pp1_breakdown": mean_by(pp1[0]),
                     "pp2_breakdown": per_stage, "layers": stages[0]["layers"], "raw_pp1": pp1, "raw_pp2": pp2})
    report["efficiency"] = rows

    print(f"\nPipeline efficiency: {args.preset}, seq {args.seq_len}, micro-batch {args.micro_batch}, "
          f"{args.threads} thread(s) per rank, partition {args.partition} (layers {rows[0]['layers']})")
    print("| m | PP=1 step s | PP=2 step s | speed-up | ideal p·m/(m+p-1) | efficiency | vs measured stage compute |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['m']} | {r['pp1_step_s']:.2f} | {r['pp2_step_s']:.2f} | {r['speedup']:.2f}× | "
              f"{r['ideal_speedup']:.2f}× | {100 * r['efficiency']:.1f}% | {100 * r['sched_efficiency']:.1f}% |")
    cols = ["fwd", "bwd", "load", "send_act", "recv_act", "send_grad", "recv_grad", "tied_allreduce",
            "reduce_grads", "optimizer", "other"]
    print("\nWhere the time goes (s per step, mean of timed steps; recv includes waiting for the other stage)")
    print("| m | rank | " + " | ".join(cols) + " | step |")
    print("|---|---|" + "---|" * (len(cols) + 1))
    for r in rows:
        for label, b in [("PP=1", r["pp1_breakdown"])] + [(f"stage {i}", b) for i, b in enumerate(r["pp2_breakdown"])]:
            step = sum(b.values())
            print(f"| {r['m']} | {label} | " + " | ".join(f"{b.get(c, 0):.3f}" for c in cols) + f" | {step:.2f} |")


def memory(args, report) -> None:
    m = args.memory_micro_batches
    rows = []
    for ckpt in (0, args.ckpt_interval):
        for p in args.stages:
            ranks = launch(args, "memory", p, m, ckpt, dp=args.data_parallel)
            for r in sorted(ranks, key=lambda r: (r["stage"], r["replica"])):
                st = r["state"]
                peak = st["total"] + r["peak"]["transient_peak"]
                rows.append({"p": p, "dp": args.data_parallel, "replica": r["replica"], "ckpt": ckpt,
                             "stage": r["stage"], "params": st["param_count"],
                             "weights": st["weights"], "optimizer": st["optimizer"], "other_static": st["other"],
                             "grads": r["grad_bytes_in_step"], "static_total": st["total"],
                             "transient_peak": r["peak"]["transient_peak"],
                             "act_and_temp": r["peak"]["transient_peak"] - r["grad_bytes_in_step"],
                             "fwd_bwd_peak": st["total"] + r["peak"]["fwd_bwd_peak"],
                             "activations": r["peak"]["fwd_bwd_peak"] - r["grad_bytes_in_step"],
                             "peak": peak, "peak_phase": r["peak"]["peak_phase"],
                             "end_delta": r["peak"]["end_delta"], "rss_before": r["rss_before"],
                             "maxrss": r["maxrss"], "layers": r["layers"]})
    p0 = args.stages[0]
    base = {ckpt: next(x["peak"] for x in rows if x["p"] == p0 and x["ckpt"] == ckpt) for ckpt in (0, args.ckpt_interval)}
    fb_base = {ckpt: next(x["fwd_bwd_peak"] for x in rows if x["p"] == p0 and x["ckpt"] == ckpt)
               for ckpt in (0, args.ckpt_interval)}
    for x in rows:
        x["vs_pp1"] = x["peak"] / base[x["ckpt"]]
        x["fwd_bwd_vs_pp1"] = x["fwd_bwd_peak"] / fb_base[x["ckpt"]]
    report["memory"] = rows
    print(f"\nMemory per stage: {args.preset}, seq {args.seq_len}, micro-batch {args.micro_batch}, m={m} "
          f"(MiB; activations = peak live bytes during forward/backward passes above the between-step state, "
          f"minus gradients; temp = the same over the whole step)")
    print("| PP | ckpt | stage | params | weights | grads | optimizer | other | activations | fwd/bwd peak "
          "| vs PP=1 | temp | step peak | vs PP=1 | step peak in | max RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['p']} | {x['ckpt'] or 'off'} | {x['stage']} | {x['params'] / 1e6:.2f}M | {x['weights'] / MiB:.0f} | "
              f"{x['grads'] / MiB:.0f} | {x['optimizer'] / MiB:.0f} | {x['other_static'] / MiB:.0f} | "
              f"{x['activations'] / MiB:.0f} | {x['fwd_bwd_peak'] / MiB:.0f} | {100 * x['fwd_bwd_vs_pp1']:.1f}% | "
              f"{x['act_and_temp'] / MiB:.0f} | {x['peak'] / MiB:.0f} | {100 * x['vs_pp1']:.1f}% | "
              f"{x['peak_phase']} | {x['maxrss'] / MiB:.0f} |")


def main() -> int:
    args = parse_args()
    if args.worker is not None:
        worker(args)
        return 0
    cfg = get_preset(args.preset)
    print(f"model {args.preset}: {param_count(cfg) / 1e6:.2f}M parameters, seq {args.seq_len}, "
          f"micro-batch {args.micro_batch}; load average {os.getloadavg()}", flush=True)
    report = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "load_before": os.getloadavg(), "cpus": len(os.sched_getaffinity(0))}
    t0 = time.perf_counter()
    if args.part in ("all", "efficiency"):
        efficiency(args, report)
    if args.part in ("all", "memory"):
        memory(args, report)
    report["load_after"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - t0
    print(f"\nwall {report['wall_s']:.0f}s; load average after {report['load_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
