#!/usr/bin/env python
"""One-GPU benchmark: attention kernels and a lamda-2b train step, bf16.

Correctness (the kernels against the naive oracle, the model with flex against sdpa) is
tests/test_cuda.py: pytest -m cuda. This script only times:

1. FlexAttention tiles: a few Triton tile settings for the bf16 flex kernel, timed at the train
   shape; the fastest that builds is used for the rest.
2. attention forward + backward per layer at lamda-2b's heads (40 x 64), B x T = 16384 tokens,
   T = 1024, 2048, 4096: flex vs sdpa (materialised bias) vs naive (explicit scores), and
   causal flash attention without any bias as the floor; median ms and peak memory.
3. train step of the lamda-2b preset at T=2048 with PP=1 (plain model, one GPU): bf16 autocast
   over fp32 weights, fused AdamW, variants eager/compiled blocks x flex/sdpa, stepped in
   interleaved rounds; tokens/s and MFU = flops_per_token x tokens/s / the card's bf16 peak
   (lamda_pipe.metrics.PEAK_BF16_TFLOPS), also against the bf16 GEMM rate measured here.

    python bench/gpu.py --json gpu.json          # on a CUDA machine, ~5 min on an H100/H200
    python bench/gpu.py --smoke                   # tiny shapes; runs on CPU too (flex forward only)

Exit status 1 if no flex tile candidate builds (after everything has run and the table is printed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

from lamda_pipe.attention import PositionCache, RelativePositionBias  # noqa: E402
from lamda_pipe.attention_kernels import FLEX_KERNEL_OPTIONS_16BIT, get_kernel  # noqa: E402
from lamda_pipe.config import ModelConfig, flops_per_token, get_preset, param_count  # noqa: E402
from lamda_pipe.metrics import peak_tflops_for  # noqa: E402
from lamda_pipe.model import LaMDA  # noqa: E402

NB, MAXD = 32, 128  # the presets' bucket settings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few steps (CPU or GPU)")
    p.add_argument("--preset", default="lamda-2b")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per attention call and per train step")
    p.add_argument("--train-seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6, help="timed steps per train variant")
    p.add_argument("--variants", nargs="+", default=["eager-flex", "compiled-flex", "compiled-sdpa"])
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing per block")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def time_ms(fn, device, reps: int = 10, warmup: int = 2) -> float:
    """Median wall time of fn in ms, synchronising around each call (events on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# the variants timed
# ---------------------------------------------------------------------------------------------

def attention_variants(device, with_grad: bool):
    """name -> fn(q, k, v, rb, ctx) computing causal biased attention (B, H, T, D); rb is a
    RelativePositionBias (the layer's table), ctx a BenchContext. flex and sdpa are the model's
    kernels (lamda_pipe.attention_kernels); naive writes the scores out."""
    def kernel(name):
        def fn(q, k, v, rb, ctx):
            return get_kernel(name).run(q, k, v, rb.weight, ctx.positions, dropout=0.0, layer_cache={},
                                        options=ctx.flex_options)
        return fn

    def naive(q, k, v, rb, ctx):
        idx, causal = ctx.positions.get(q.shape[2], q.shape[2], device)
        scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1]) + rb.weight.float().t()[:, idx]
        scores = scores.masked_fill(~causal, float("-inf"))
        return (scores.softmax(-1).to(q.dtype) @ v)

    out = {"flex": kernel("flex"), "sdpa": kernel("sdpa"), "naive": naive}
    if device.type != "cuda" and with_grad:
        del out["flex"]  # torch has no flex backward on CPU
    return out


class BenchContext:
    """The positions cache and the flex tiles one timing uses."""

    def __init__(self, flex_options: dict | None):
        self.positions = PositionCache(NB, MAXD)
        self.flex_options = flex_options


def make_bias(table: torch.Tensor, device) -> RelativePositionBias:
    rb = RelativePositionBias(*table.shape).to(device)
    with torch.no_grad():
        rb.weight.copy_(table)
    return rb


def frozen(rb: RelativePositionBias) -> RelativePositionBias:
    """A copy of the bias module whose table needs no gradient, made once per module: made per
    call, its host-to-device copy would sit inside the timed region."""
    if not hasattr(rb, "frozen_copy"):
        rb.frozen_copy = make_bias(rb.weight.detach().cpu(), rb.weight.device).requires_grad_(False)
    return rb.frozen_copy


# ---------------------------------------------------------------------------------------------
# 1. FlexAttention tile sizes
# ---------------------------------------------------------------------------------------------

def flex_candidates() -> dict[str, dict]:
    def opts(fwd, bwd):
        m, n, s, w = fwd
        m1, n1, n2, m2, s2, w2 = bwd
        return {"fwd_BLOCK_M": m, "fwd_BLOCK_N": n, "fwd_num_stages": s, "fwd_num_warps": w,
                "bwd_BLOCK_M1": m1, "bwd_BLOCK_N1": n1, "bwd_BLOCK_M2": m2, "bwd_BLOCK_N2": n2,
                "bwd_num_stages": s2, "bwd_num_warps": w2}
    return {
        "library default": dict(FLEX_KERNEL_OPTIONS_16BIT),
        "fwd 128x64, bwd torch sm90": opts((128, 64, 3, 4), (64, 128, 128, 64, 3, 8)),
        "fwd 64x64, bwd 64 2-stage": opts((64, 64, 3, 4), (64, 64, 64, 64, 2, 4)),
    }


def sweep_flex_options(device, heads, dim_head, t, tokens) -> tuple[dict | None, list[dict]]:
    """Times flex forward + backward (bf16) with each candidate; returns the fastest that builds."""
    rows = []
    b = max(1, tokens // t)
    q, k, v = (torch.randn(b, heads, t, dim_head, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    gout = torch.randn_like(q)
    rb = make_bias(torch.randn(NB, heads), device)
    flex = attention_variants(device, with_grad=True)["flex"]
    for name, options in flex_candidates().items():
        ctx = BenchContext(options)
        row = {"candidate": name, "options": options, "T": t, "B": b}
        try:
            row["ms"] = time_ms(lambda: torch.autograd.grad(flex(q, k, v, rb, ctx), (q, k, v, rb.weight), gout),
                                device, reps=10)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        print("flex tiles", json.dumps(row), flush=True)
    ok = [r for r in rows if "ms" in r]
    return (min(ok, key=lambda r: r["ms"])["options"] if ok else None), rows


# ---------------------------------------------------------------------------------------------
# 2. attention timing
# ---------------------------------------------------------------------------------------------

def time_attention(device, dtype, heads, dim_head, seq_lens, tokens, flex_options) -> list[dict]:
    rows = []
    variants = attention_variants(device, with_grad=device.type == "cuda")
    if "flex" in variants:  # the flex kernel alone: the table as a constant, so no band gradient
        variants["flex, table frozen"] = lambda q, k, v, rb, ctx: variants["flex"](q, k, v, frozen(rb), ctx)
    variants["flash, no bias (floor)"] = lambda q, k, v, rb, ctx: F.scaled_dot_product_attention(
        q, k, v, is_causal=True)
    for t in seq_lens:
        b = max(1, tokens // t)
        ctx = BenchContext(flex_options)
        grad = device.type == "cuda"  # no flex backward on CPU: forward only there
        q, k, v = (torch.randn(b, heads, t, dim_head, device=device, dtype=dtype, requires_grad=grad)
                   for _ in range(3))
        rb = make_bias(torch.randn(NB, heads), device)
        gout = torch.randn(b, heads, t, dim_head, device=device, dtype=dtype)
        for name, fn in variants.items():
            def step():
                out = fn(q, k, v, rb, ctx)
                if grad:
                    wrt = (q, k, v) if "floor" in name or "frozen" in name else (q, k, v, rb.weight)
                    torch.autograd.grad(out, wrt, gout)
            row = {"T": t, "B": b, "variant": name}
            try:
                step()  # compile / build caches outside the measurement
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                row["ms"] = time_ms(step, device, reps=10 if device.type == "cuda" else 2)
                if device.type == "cuda":
                    row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
            except Exception as e:  # noqa: BLE001 - an OOM in one variant must not stop the others
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print("attention", json.dumps(row), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# 3. train step
# ---------------------------------------------------------------------------------------------

def gemm_tflops(device, dtype, n: int) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = time_ms(lambda: a @ b, device, reps=20, warmup=3)
    return 2 * n ** 3 / (ms / 1e3) / 1e12


def train_steps(device, cfg: ModelConfig, seq_len: int, tokens: int, steps: int, variants: list[str],
                checkpoint: bool, flex_options) -> list[dict]:
    from torch.utils.checkpoint import checkpoint as ckpt

    b = max(1, tokens // seq_len)
    with torch.device(device):
        torch.manual_seed(0)
        model = LaMDA(config=cfg, attention="flex")
    model.attention.flex_options = flex_options
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    amp = torch.autocast(device.type, dtype=torch.bfloat16)
    data = torch.Generator(device="cpu").manual_seed(1)

    def head_loss(x, labels):
        logits = model.embed.logits(model.norm(x))  # (B, T, V) tied head
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    compiled_blocks = [torch.compile(blk) for blk in model.blocks]
    compiled_head = torch.compile(head_loss)

    def make_step(variant: str):
        compiled = variant.startswith("compiled")
        impl = variant.split("-")[1]
        blocks = compiled_blocks if compiled else list(model.blocks)
        head = compiled_head if compiled else head_loss

        def step():
            model.set_attention(impl)
            batch = torch.randint(0, cfg.vocab_size, (b, seq_len + 1), generator=data).to(device)
            with amp:
                x = model.embed(batch[:, :-1])
                for blk in blocks:
                    x = (ckpt(blk, x, model.positions, model.attention, use_reentrant=False) if checkpoint
                         else blk(x, model.positions, model.attention))
                loss = head(x, batch[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return step

    # Fill the caches before anything is compiled, so no compiled frame guards on a changing dict.
    model.positions.get(seq_len, seq_len, device)
    model.positions.get_flex(seq_len, device)
    rows, fns = {}, {}
    for v in variants:
        rows[v] = {"variant": v, "B": b, "T": seq_len, "times": [], "losses": []}
        try:
            t0 = time.perf_counter()
            fns[v] = make_step(v)
            for _ in range(2):  # warm-up: compilation, autotuning, allocator
                rows[v]["losses"].append(fns[v]().item())
            rows[v]["warmup_s"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            rows[v]["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            traceback.print_exc()
            fns.pop(v, None)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print("warmed", v, json.dumps({k: x for k, x in rows[v].items() if k != "times"}), flush=True)
    order = list(fns)
    for r in range(steps):  # interleaved rounds, order reversed every round
        for v in (order if r % 2 == 0 else order[::-1]):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            loss = fns[v]().item()  # .item() synchronises: the step is complete
            rows[v]["times"].append(time.perf_counter() - t0)
            rows[v]["losses"].append(loss)
            if device.type == "cuda":
                rows[v]["peak_gib"] = max(rows[v].get("peak_gib", 0), torch.cuda.max_memory_allocated() / 2**30)
    fpt = flops_per_token(cfg, seq_len)
    for v, row in rows.items():
        if row["times"]:
            row["step_s"] = statistics.median(row["times"])
            row["tokens_per_s"] = b * seq_len / row["step_s"]
            row["tflops"] = row["tokens_per_s"] * fpt / 1e12
    return list(rows.values())


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch._dynamo.config.cache_size_limit = 64  # several shapes per process in this bench
    if args.smoke:
        args.preset, args.seq_lens, args.tokens, args.train_seq_len, args.steps = "debug", [128, 256], 512, 128, 2
        if device.type != "cuda":
            args.variants = ["eager-sdpa"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = peak_tflops_for(name) if device.type == "cuda" else None
    result = {"date": datetime.date.today().isoformat(), "device": name, "torch": torch.__version__,
              "peak_bf16_tflops": peak, "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"device {name}, torch {torch.__version__}, bf16 peak {peak} TFLOP/s", flush=True)
    failures = []

    cfg = get_preset(args.preset)
    flex_options = None
    if device.type == "cuda":
        flex_options, result["flex_tiles"] = sweep_flex_options(device, cfg.heads, cfg.dim_head,
                                                                args.train_seq_len, args.tokens)
        if flex_options is None:
            failures.append("no FlexAttention tile candidate compiled")
    result["flex_options"] = flex_options

    act = torch.bfloat16 if device.type == "cuda" else torch.float32
    result["attention"] = time_attention(device, act, cfg.heads, cfg.dim_head, args.seq_lens, args.tokens,
                                         flex_options)

    result["gemm_bf16_tflops"] = gemm_tflops(device, act, 8192 if device.type == "cuda" else 512)
    print(f"GEMM {result['gemm_bf16_tflops']:.1f} TFLOP/s", flush=True)
    result["train"] = train_steps(device, cfg, args.train_seq_len, args.tokens, args.steps, args.variants,
                                  args.checkpoint, flex_options)
    result["train_model"] = {"preset": args.preset, "params": param_count(cfg),
                             "flops_per_token": flops_per_token(cfg, args.train_seq_len)}

    # summary tables last: the tail of the output is what a remote run returns
    print(f"\n== {name}, torch {torch.__version__}, peak {peak} TFLOP/s bf16, "
          f"GEMM 8192^3 measured {result['gemm_bf16_tflops']:.0f} TFLOP/s")
    for r in result.get("flex_tiles", []):
        print(f"flex tiles {r['candidate']:<28} T={r['T']} B={r['B']}: "
              + (f"{r['ms']:.2f} ms fwd+bwd" if "ms" in r else r["error"][:120]))
    print(f"flex tiles chosen: {flex_options}")
    print(f"\n{'T':>5} {'B':>3} {'attention fwd+bwd':<24} {'ms':>8} {'peak GiB':>9}")
    for r in result["attention"]:
        print(f"{r['T']:>5} {r['B']:>3} {r['variant']:<24} {r.get('ms', float('nan')):>8.2f} "
              f"{r.get('peak_extra_gib', float('nan')):>9.2f} {r.get('error', '')}")
    print(f"\n{args.preset} train step, T={args.train_seq_len}, {param_count(cfg) / 1e9:.3f}B params")
    for r in result["train"]:
        if "step_s" not in r:
            print(f"{r['variant']:<15} {r.get('error', 'no timed steps')}")
            continue
        mfu = f"{r['tflops'] / peak:.1%}" if peak else "n/a"
        print(f"{r['variant']:<15} B={r['B']} step {r['step_s'] * 1e3:8.1f} ms  {r['tokens_per_s']:9.0f} tok/s  "
              f"{r['tflops']:7.1f} TFLOP/s  MFU {mfu} (of GEMM {r['tflops'] / result['gemm_bf16_tflops']:.1%})  "
              f"peak {r.get('peak_gib', float('nan')):.1f} GiB  warm-up {r['warmup_s']:.0f} s  "
              f"loss {r['losses'][0]:.3f}->{r['losses'][-1]:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
