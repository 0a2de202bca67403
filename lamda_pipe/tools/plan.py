"""lamda-plan: before booking a cluster, does a layout fit, how long will it take, where is the
bottleneck? Memory per pipeline stage and time per step from the shapes alone (no parameter is
allocated, no process started; the model of each term is in lamda_pipe/plan.py).

    lamda-plan --model lamda-2b --device h100-sxm
    lamda-plan --model lamda-137b --device tpu-v3 --gpus 1024 --pipe-stages 16 --batch-tokens 262144 --tokens 2.81e12

`ds_train.py --dry-run` prints the same plan for exactly the run it was given.
"""

from __future__ import annotations

import os
import sys

from .. import plan as P
from ..config import PRESETS, ModelConfig, get_preset, param_count
from ..errors import ConfigError
from . import ArgumentParser, run_cli


def size(n: float) -> str:
    return f"{n / P.GiB:.2f} GiB" if n >= P.GiB else f"{n / 2 ** 20:.1f} MiB"


def count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def describe(cfg: ModelConfig, name: str, layout: P.Layout, stages: list[P.Stage], memory: float | None,
             timing: P.Timing | None, mfu_source: str, tokens: float | None) -> list[str]:
    """The plan as lines of text: layout, one row per stage, bubble, time, verdict."""
    lo = layout
    ckpt = f"activation checkpointing (interval {lo.checkpoint})" if lo.checkpoint else "no activation checkpointing"
    out = [f"model {name}: {count(param_count(cfg))} parameters, seq {lo.seq_len}",
           f"layout: {lo.stages} stage(s) x {lo.data_parallel} data-parallel = {lo.world_size} device(s); "
           f"micro-batch {lo.micro_batch} x {lo.grad_accum} micro-batches x {lo.data_parallel} = {lo.global_batch} "
           f"sequences ({lo.global_batch * lo.seq_len:,} tokens) per step; {lo.precision}, ZeRO-1, {ckpt}",
           "",
           "| stage | layers | blocks | params | weights | grads | optimizer | activations | other | peak | peak in |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []  # [first stage, last stage, layers, the rest of the row]
    for s in stages:
        b = s.bytes
        other = s.peak - b["weights"] - b["gradients"] - b["optimizer"] - (
            b["activations"] if s.peak_in == "backward" else 0)
        rest = (f"{s.blocks} | {count(s.params)} | {size(b['weights'])} | {size(b['gradients'])} | "
                f"{size(b['optimizer'])} | {size(b['activations'])} ({s.in_flight} in flight) | {size(other)} | "
                f"{size(s.peak)} | {s.peak_in} |")
        if rows and rows[-1][3] == rest:  # stages alike in every column share a row
            rows[-1][1], rows[-1][2] = s.index, (rows[-1][2][0], s.layers[1])
        else:
            rows.append([s.index, s.index, s.layers, rest])
    for first, last, layers, rest in rows:
        which = str(first) if first == last else f"{first}-{last}"
        out.append(f"| {which} | [{layers[0]}, {layers[1]}) | {rest}")
    worst = max(stages, key=lambda s: s.peak)
    slowest = max(stages, key=lambda s: s.flops_per_token)
    even = sum(s.flops_per_token for s in stages) / len(stages)
    out += ["", "other: DeepSpeed's pipe buffers, position caches, and the backward's workspace or, at a "
                "reduce/optimizer peak, the flattened gradients (lamda_pipe/plan.py)",
            f"parameters: {count(sum(s.params for s in stages))} over the stages "
            f"({count(param_count(cfg))} in the model; the tied embedding is on both end stages)",
            f"bubble: (P - 1) / (m + P - 1) = {lo.stages - 1}/{lo.grad_accum + lo.stages - 1} = "
            f"{P.bubble(lo.stages, lo.grad_accum):.1%} of each step",
            f"pace: stage {slowest.index} is the slowest, {slowest.flops_per_token / even - 1:.1%} above an even "
            f"share of the FLOPs; every micro-batch slot lasts as long as its work"]
    if timing is None:
        out.append("time: no peak FLOP/s for this device; give --peak-tflops (and --mfu) to predict it")
    else:
        out += [f"FLOPs: {timing.flops_per_step / (lo.global_batch * lo.seq_len):.3g} per token "
                f"(config.flops_per_token), {timing.flops_per_step:.3g} per step",
                f"time: {timing.step_s:.3g} s per step at {timing.mfu:.1%} MFU ({mfu_source}) of "
                f"{timing.peak_tflops:g} TFLOP/s per device -> {timing.tokens_per_s:,.0f} tokens/s, "
                f"{timing.tokens_per_day:.3g} tokens/day"]
        if tokens:
            out.append(f"budget: {tokens:.3g} tokens -> {P.describe_days(timing.days_for(tokens))}")
    if memory is None:
        out.append(f"verdict: largest stage peak {size(worst.peak)} (stage {worst.index}); no device memory "
                   f"given (--device or --device-memory)")
    elif worst.peak <= memory:
        out.append(f"verdict: fits: largest stage peak {size(worst.peak)} (stage {worst.index}, in "
                   f"{worst.peak_in}) of {size(memory)} usable")
    else:
        out.append(f"verdict: does NOT fit: stage {worst.index} needs {size(worst.peak)} (in {worst.peak_in}) of "
                   f"{size(memory)} usable")
    return out


def describe_search(found, memory: float, top: int) -> list[str]:
    out = ["", f"layouts for these devices and this batch, best first (fit in {size(memory)}, then time per step):",
           "", "| P | D | b | m | ckpt | bubble | peak (largest stage) | fits | s per step | tokens/s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for lo, stages, t in found[:top]:
        peak = max(s.peak for s in stages)
        out.append(f"| {lo.stages} | {lo.data_parallel} | {lo.micro_batch} | {lo.grad_accum} | "
                   f"{'on' if lo.checkpoint else 'off'} | {t.bubble:.1%} | {size(peak)} | "
                   f"{'yes' if peak <= memory else 'no'} | {t.step_s:.3g} | {t.tokens_per_s:,.0f} |")
    return out


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="lamda-plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lamda-2b", choices=list(PRESETS), help="model preset (default lamda-2b)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's maximum)")
    p.add_argument("--pipe-stages", type=int, default=1, metavar="P", help="pipeline stages (default 1)")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="devices in all, P x data parallel (default P); the layout search keeps this count and "
                        "the global batch")
    p.add_argument("--batch-tokens", type=float, default=None, metavar="TOKENS",
                   help="global batch in tokens (a multiple of --seq-len); default: micro-batch x grad-accum x D")
    p.add_argument("--micro-batch", type=int, default=1, metavar="B", help="sequences per micro-batch (default 1)")
    p.add_argument("--grad-accum", type=int, default=None, metavar="M",
                   help="micro-batches per step (default: from --batch-tokens, else 4 x P)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                   help="default bf16 on accelerators, fp32 on --device cpu")
    p.add_argument("--checkpoint", type=int, default=None, metavar="INTERVAL",
                   help="activation_checkpoint_interval, 0: off (default as the shipped configs: 1 on "
                        "accelerators, 0 on --device cpu)")
    p.add_argument("--device", default=None, help=f"one of {', '.join(P.devices())}")
    p.add_argument("--device-memory", type=float, default=None, metavar="GIB", help="memory per device in GiB")
    p.add_argument("--peak-tflops", type=float, default=None, metavar="X",
                   help="peak TFLOP/s per device (default: the --device's)")
    p.add_argument("--mfu", type=float, default=None,
                   help=f"model FLOPs utilisation to predict time with (default {P.MEASURED_MFU}: measured, "
                        f"{P.MEASURED_MFU_SOURCE})")
    p.add_argument("--tokens", type=float, default=None, help="token budget: days to train on it")
    p.add_argument("--top", type=int, default=8, help="rows of the layout search (default 8)")
    p.add_argument("--search", action="store_true", help="always search layouts (default: when it does not fit "
                                                         "or the bubble takes over half the step)")
    return p


def machine(args, device: P.Device | None) -> tuple[float | None, float | None]:
    """(usable bytes per device or None, peak TFLOP/s or None) from --device / --device-memory / --peak-tflops."""
    memory = None
    if args.device_memory is not None:
        if not args.device_memory > 0:
            raise ConfigError(f"--device-memory must be > 0 GiB, got {args.device_memory:g}")
        memory = args.device_memory * P.GiB
    elif device is not None and device.memory_gib:
        memory = device.memory_gib * P.GiB
    if memory is not None and (device is None or device.kind == "cuda"):
        memory -= P.GPU_RESERVED_GIB * P.GiB
    peak = args.peak_tflops if args.peak_tflops is not None else (device.peak_tflops if device else None)
    if peak is not None and not peak > 0:
        raise ConfigError(f"--peak-tflops must be > 0, got {peak:g}")
    return memory, peak


def _run(argv) -> int:
    args = parser().parse_args(argv)
    cfg = get_preset(args.model)
    device = P.get_device(args.device) if args.device else None
    kind = device.kind if device else "cuda"
    seq = args.seq_len or cfg.max_seq_len
    p = args.pipe_stages
    from ..pipeline import check_stage_count
    check_stage_count(cfg, p)
    gpus = p if args.gpus is None else args.gpus
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    if gpus % p:
        raise ConfigError(f"--pipe-stages {p} does not divide --gpus {gpus}: use a multiple of {p} devices")
    dp = gpus // p
    if args.batch_tokens is not None:
        sequences, rest = divmod(int(args.batch_tokens), seq)
        if rest or sequences < 1 or args.batch_tokens != int(args.batch_tokens):
            raise ConfigError(f"--batch-tokens {args.batch_tokens:g} is not a whole number of {seq}-token sequences; "
                              f"use a multiple of --seq-len {seq}")
        if sequences % (dp * args.micro_batch):
            raise ConfigError(f"--batch-tokens {args.batch_tokens:g} = {sequences} sequences does not split into "
                              f"{dp} data-parallel replicas x micro-batch {args.micro_batch}; use a multiple of "
                              f"{dp * args.micro_batch * seq} tokens, or other --gpus / --micro-batch")
        m = sequences // (dp * args.micro_batch)
        if args.grad_accum is not None and args.grad_accum != m:
            raise ConfigError(f"--grad-accum {args.grad_accum} disagrees with --batch-tokens (which gives {m}); "
                              f"give one of them")
    else:
        m = args.grad_accum or 4 * p
    precision = args.precision or ("fp32" if kind == "cpu" else "bf16")
    checkpoint = args.checkpoint if args.checkpoint is not None else (0 if kind == "cpu" else 1)
    layout = P.Layout(p, dp, args.micro_batch, m, seq, precision, checkpoint)
    memory, peak = machine(args, device)
    if args.search and (memory is None or peak is None):
        raise ConfigError("--search ranks layouts by fit and time: give --device, or --device-memory GIB and "
                          "--peak-tflops X")
    mfu = args.mfu if args.mfu is not None else P.MEASURED_MFU
    source = "given" if args.mfu is not None else f"measured: {P.MEASURED_MFU_SOURCE}"
    stages = P.plan_stages(cfg, layout, kind)
    timing = P.timing(cfg, layout, stages, peak, mfu) if peak else None
    if args.tokens is not None and not args.tokens > 0:
        raise ConfigError(f"--tokens must be > 0, got {args.tokens:g}")
    lines = describe(cfg, args.model, layout, stages, memory, timing, source, args.tokens)
    too_big = memory is not None and max(s.peak for s in stages) > memory
    if peak and memory is not None and (args.search or too_big or P.bubble(p, m) > 0.5):
        found = P.search(cfg, gpus, layout.global_batch, seq, precision, memory, peak, mfu, kind)
        lines += describe_search(found, memory, args.top)
    print("\n".join(lines))
    return 0


def plan_run(run) -> int:
    """ds_train.py --dry-run: the plan of exactly this run (a RunConfig), printed by rank 0,
    before any process group, run dir or data preparation."""
    import torch

    from ..attention_kernels import check_request
    from ..distributed import launch_env
    from ..ds_config import load_config
    from ..guard import check_ds_config
    from ..metrics import peak_tflops_for
    from ..train import run_ds_path

    cfg, cuda = run.model_config, torch.cuda.is_available()
    check_request(run.attention, "cuda" if cuda else "cpu", cfg.dropout)
    env = launch_env(run.local_rank)
    path = run_ds_path(run, cuda)
    ds = load_config(path)
    check_ds_config(ds)
    layout = P.layout_from_ds(ds, pipe_stages=run.pipe_stages, world_size=env.world_size, seq_len=run.seq_len,
                              partition=run.partition, attention=run.attention, cuda_available=cuda)
    memory, peak = None, run.peak_tflops
    if cuda:
        memory = torch.cuda.get_device_properties(0).total_memory - P.GPU_RESERVED_GIB * P.GiB
        peak = peak or peak_tflops_for(torch.cuda.get_device_name())
    stages = P.plan_stages(cfg, layout, "cuda" if cuda else "cpu")
    timing = P.timing(cfg, layout, stages, peak, P.MEASURED_MFU) if peak else None
    if env.rank == 0:
        print(f"dry run: the plan of this run (DeepSpeed config {path}, world size {env.world_size}); "
              f"nothing was started", flush=True)
        print("\n".join(describe(cfg, run.model, layout, stages, memory, timing,
                                 f"measured: {P.MEASURED_MFU_SOURCE}", None)), flush=True)
    return 0


def main(argv=None) -> int:
    return run_cli(_run, argv, prog="lamda-plan")


def cli() -> int:
    """The console script: a planning process uses no device, so DeepSpeed (imported for the
    trainer's stage partition) is told so instead of probing for one and warning on CPU hosts."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return main()


if __name__ == "__main__":
    sys.exit(cli())
