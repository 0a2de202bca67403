#!/usr/bin/env python
"""Single-process train-step throughput and MFU: lamda_pipe.model.LaMDA vs a seed-style baseline.

One step = zero_grad, forward, next-token cross-entropy, backward, AdamW step (fused for
lamda_pipe, the default per-tensor loop for the baseline); fp32, CPU, no DeepSpeed. For every sequence length the variants are stepped interleaved (round r runs
A, B, ... and round r+1 runs them in reverse order), so machine drift hits all of them alike;
reported step times are medians.

MFU = flops_per_token(cfg, T) * tokens/s / GEMM rate, where the GEMM rate is the median over
short bursts of a square fp32 matmul (--gemm-size) timed throughout this same run (before the
models and after every round), so it sees the same machine state.

    .venv/bin/python bench/train_step.py                      # defaults: readme preset, T=512 and 2048
    .venv/bin/python bench/train_step.py --compile            # adds a torch.compile'd lamda_pipe variant
    .venv/bin/python bench/train_step.py --seq-lens 512 --steps 5 --json /tmp/bench.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/naive_model.py

from lamda_pipe.config import flops_per_token, get_preset, param_count  # noqa: E402
from lamda_pipe.model import LaMDA  # noqa: E402
from naive_model import NaiveLaMDA  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="readme", help="model preset from lamda_pipe.config (default: readme)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048], help="sequence lengths T")
    p.add_argument("--batch-tokens", type=int, default=2048,
                   help="tokens per step; batch = batch_tokens // T (at least 1)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and sequence length")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before timing")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    p.add_argument("--gemm-size", type=int, default=2048, help="n of the n x n @ n x n GEMM calibration")
    p.add_argument("--gemm-reps", type=int, default=3, help="GEMMs per calibration burst")
    p.add_argument("--no-naive", action="store_true", help="skip the seed-style baseline")
    p.add_argument("--compile", action="store_true",
                   help="also time lamda_pipe under torch.compile (compile time is reported separately)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write all results to this JSON file")
    return p.parse_args(argv)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class Gemm:
    """Square fp32 matmul rate, sampled in short bursts throughout the run."""

    def __init__(self, n: int, reps: int):
        self.n, self.reps = n, reps
        g = torch.Generator().manual_seed(1234)
        self.a = torch.randn(n, n, generator=g)
        self.b = torch.randn(n, n, generator=g)
        self.out = torch.empty(n, n)
        torch.mm(self.a, self.b, out=self.out)  # warm up (thread pool, MKL dispatch)
        self.samples: list[float] = []  # GFLOP/s

    def burst(self) -> None:
        for _ in range(self.reps):
            t0 = time.perf_counter()
            torch.mm(self.a, self.b, out=self.out)
            dt = time.perf_counter() - t0
            self.samples.append(2 * self.n ** 3 / dt / 1e9)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


class Variant:
    """A model, its AdamW, and the per-step timings and losses."""

    def __init__(self, name: str, model: torch.nn.Module, lr: float, compiled: bool = False, fused: bool = False):
        self.name = name
        self.model = model.train()
        self.fwd = torch.compile(model, dynamic=False) if compiled else model
        # fused: one kernel over all parameters (what ds_configs/cpu.json asks DeepSpeed for);
        # the seed-style baseline keeps the default per-tensor loop
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                                     fused=fused or None)
        self.warmup_s: list[float] = []
        self.step_s: list[float] = []
        self.losses: list[float] = []

    def step(self, tokens: torch.Tensor) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = lm_loss(self.fwd(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        self.opt.step()
        dt = time.perf_counter() - t0
        return dt, loss.item()


def batch_for_step(step: int, batch: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """(batch, T+1) random tokens, the same for every variant at the same step index."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    return torch.randint(0, vocab, (batch, seq_len + 1), generator=g)


def check_parity(cfg, seed: int) -> float:
    """Max |logit difference| between lamda_pipe and the baseline given the same weights (T=64)."""
    torch.manual_seed(seed)
    lamda = LaMDA(config=cfg).eval()
    naive = NaiveLaMDA(cfg).eval()
    # a non-zero bias table, so the bucket path is exercised too
    with torch.no_grad():
        for blk in lamda.blocks:
            blk.attn.rel_bias.weight.normal_()
    naive.load_from(lamda)
    tokens = torch.randint(0, cfg.vocab_size, (2, 64))
    with torch.no_grad():
        return (lamda(tokens) - naive(tokens)).abs().max().item()


def build_variants(cfg, args, seq_len: int) -> list[Variant]:
    torch.manual_seed(args.seed)
    lamda = LaMDA(config=cfg)
    variants = [Variant("lamda_pipe", lamda, args.lr, fused=True)]
    if not args.no_naive:
        variants.append(Variant("naive", NaiveLaMDA(cfg).load_from(lamda), args.lr))
    if args.compile:
        torch._dynamo.reset()  # a fresh, static-shape compile for each sequence length
        torch.manual_seed(args.seed)
        model = LaMDA(config=cfg)
        # Fill the model's position cache first: otherwise the first compiled step traces the cache
        # miss and the second one recompiles for the hit (a dynamo guard on the cache dict).
        model.positions.get(seq_len, seq_len, torch.device("cpu"))
        variants.append(Variant("lamda_pipe+compile", model, args.lr, compiled=True, fused=True))
    return variants


def run_seq_len(cfg, seq_len: int, args, gemm: Gemm) -> dict:
    batch = max(1, args.batch_tokens // seq_len)
    tokens_per_step = batch * seq_len
    variants = build_variants(cfg, args, seq_len)
    fpt = flops_per_token(cfg, seq_len)
    print(f"\n# T={seq_len}: batch {batch} x {seq_len} = {tokens_per_step} tokens/step, "
          f"{fpt / 1e6:.1f} MFLOP/token, variants: {', '.join(v.name for v in variants)}", flush=True)

    for r in range(args.warmup + args.steps):
        order = variants if r % 2 == 0 else variants[::-1]
        tokens = batch_for_step(r, batch, seq_len, cfg.vocab_size, args.seed)
        for v in order:
            dt, loss = v.step(tokens)
            (v.warmup_s if r < args.warmup else v.step_s).append(dt)
            v.losses.append(loss)
            kind = "warmup" if r < args.warmup else "step"
            print(f"  {kind} {r}: {v.name:<20} {dt:7.2f} s  loss {loss:.4f}", flush=True)
        gemm.burst()
        print(f"  gemm: {statistics.median(gemm.samples[-gemm.reps:]):.1f} GFLOP/s", flush=True)

    out = {"seq_len": seq_len, "batch": batch, "tokens_per_step": tokens_per_step,
           "flops_per_token": fpt, "variants": {}}
    for v in variants:
        med = statistics.median(v.step_s)
        out["variants"][v.name] = {
            "step_s": v.step_s, "warmup_s": v.warmup_s, "losses": v.losses,
            "median_step_s": med, "tokens_per_s": tokens_per_step / med,
            "best_tokens_per_s": tokens_per_step / min(v.step_s),
        }
    if "naive" in out["variants"]:
        # same weights, same data: the losses must agree (fp32 summation order only)
        a, b = out["variants"]["lamda_pipe"]["losses"], out["variants"]["naive"]["losses"]
        out["max_loss_diff_lamda_vs_naive"] = max(abs(x - y) for x, y in zip(a, b))
    del variants
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    cfg = get_preset(args.preset)
    if max(args.seq_lens) > cfg.max_seq_len:
        cfg = cfg.replace(max_seq_len=max(args.seq_lens))
    t_start = time.perf_counter()

    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model_name(), "cores": usable_cores(), "threads": threads,
        "torch": torch.__version__, "python": platform.python_version(),
        "load_avg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "preset": args.preset, "params": param_count(cfg), "args": {k: str(v) for k, v in vars(args).items()},
    }
    print(f"{args.preset}: {info['params'] / 1e6:.2f}M params, fp32, {threads} threads, "
          f"torch {torch.__version__}, CPU {info['cpu']}", flush=True)

    if not args.no_naive:
        diff = check_parity(cfg, args.seed)
        info["parity_max_abs_logit_diff"] = diff
        print(f"parity lamda_pipe vs naive (same weights, T=64): max |logit diff| = {diff:.2e}", flush=True)
        if diff > 1e-3:
            raise SystemExit("the baseline does not compute the same function as lamda_pipe: fix it first")

    gemm = Gemm(args.gemm_size, args.gemm_reps)
    gemm.burst()
    print(f"gemm {args.gemm_size}^3 fp32: {gemm.median:.1f} GFLOP/s", flush=True)

    results = [run_seq_len(cfg, t, args, gemm) for t in args.seq_lens]

    peak = gemm.median * 1e9
    for res in results:
        for v in res["variants"].values():
            v["mfu"] = res["flops_per_token"] * v["tokens_per_s"] / peak
            # fastest step against the fastest GEMM: what a quiet machine gets, roughly
            v["best_mfu"] = res["flops_per_token"] * v["best_tokens_per_s"] / (max(gemm.samples) * 1e9)
        base = res["variants"].get("naive")
        for v in res["variants"].values():
            v["speedup_vs_naive"] = v["tokens_per_s"] / base["tokens_per_s"] if base else None

    info["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    info["wall_s"] = time.perf_counter() - t_start
    info["gemm"] = {"n": args.gemm_size, "gflops_median": gemm.median, "gflops_min": min(gemm.samples),
                    "gflops_max": max(gemm.samples), "samples": gemm.samples}

    print(f"\nGEMM {args.gemm_size}x{args.gemm_size} fp32: median {gemm.median:.1f} GFLOP/s "
          f"(min {min(gemm.samples):.1f}, max {max(gemm.samples):.1f}, {len(gemm.samples)} samples)")
    print("median step time and median GEMM; 'best' = fastest step and fastest GEMM")
    print(f"{'T':>5} {'variant':<20} {'tokens/s':>9} {'step s (min..max)':>22} {'MFU':>6} {'vs naive':>9}"
          f" {'best tok/s':>10} {'best MFU':>8}")
    for res in results:
        for name, v in res["variants"].items():
            rng = f"{v['median_step_s']:.2f} ({min(v['step_s']):.2f}..{max(v['step_s']):.2f})"
            sp = f"{v['speedup_vs_naive']:.2f}x" if v["speedup_vs_naive"] else "-"
            print(f"{res['seq_len']:>5} {name:<20} {v['tokens_per_s']:>9.1f} {rng:>22} {v['mfu']:>6.1%} {sp:>9}"
                  f" {v['best_tokens_per_s']:>10.1f} {v['best_mfu']:>8.1%}")
            if v["warmup_s"] and "compile" in name:
                print(f"{'':>5} {'':<20} first step incl. compile: {v['warmup_s'][0]:.1f} s")
        if "max_loss_diff_lamda_vs_naive" in res:
            print(f"{'':>5} loss agreement lamda_pipe vs naive over {len(res['variants']['naive']['losses'])} "
                  f"steps: max |diff| {res['max_loss_diff_lamda_vs_naive']:.1e}")
    print(f"load average start {info['load_avg_start']}, end {info['load_avg_end']}; wall {info['wall_s']:.0f} s")

    report = {"info": info, "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
