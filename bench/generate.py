#!/usr/bin/env python
"""Decoding throughput with and without the KV cache (AutoregressiveWrapper.generate).

    .venv/bin/python bench/generate.py                          # readme preset, 512 new tokens, CPU
    .venv/bin/python bench/generate.py --preset debug --new-tokens 100 --repeats 3

One process, fp32 by default, a randomly initialised model (speed does not depend on the
weights), batch 1, top-k 40 sampling without end-of-text, so every run makes exactly
--new-tokens tokens. Both variants use the same seed and therefore sample the same tokens (the
bench checks it). They take turns, in an order that reverses every repeat, after one untimed
warm-up of each; figures are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lamda_pipe.config import PRESETS, get_preset, param_count  # noqa: E402
from lamda_pipe.generation import AutoregressiveWrapper  # noqa: E402
from lamda_pipe.model import LaMDA  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="readme", choices=sorted(PRESETS), help="model preset (default readme)")
    p.add_argument("--new-tokens", type=int, default=512, help="tokens generated per run (default 512)")
    p.add_argument("--prompt-tokens", type=int, default=8, help="random prompt length (default 8)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per variant (default 2)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all usable cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write every timing here")
    args = p.parse_args()
    for flag in ("new_tokens", "prompt_tokens", "repeats", "top_k"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cfg = get_preset(args.preset)
    torch.manual_seed(args.seed)
    model = LaMDA(config=cfg).to(device=device, dtype=dtype).eval()
    wrapper = AutoregressiveWrapper(model, max_seq_len=cfg.max_seq_len)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_tokens), device=device)
    context = args.prompt_tokens + args.new_tokens
    print(f"{args.preset}: {param_count(cfg) / 1e6:.2f}M parameters, {args.dtype} on {device}, "
          f"{torch.get_num_threads()} threads; prompt {args.prompt_tokens} + {args.new_tokens} new tokens, "
          f"batch 1, top-k {args.top_k}; torch {torch.__version__}")
    if context > cfg.max_seq_len:
        print(f"note: the context reaches {context} tokens, beyond max_seq_len {cfg.max_seq_len}: from there the "
              f"cached variant recomputes the last {cfg.max_seq_len} tokens every step, like the uncached one")

    def run(use_cache: bool, n: int) -> tuple[float, torch.Tensor]:
        gen = torch.Generator(device=device).manual_seed(args.seed + 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = wrapper.generate(prompt, n, top_k=args.top_k, use_cache=use_cache, generator=gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    for use_cache in (True, False):  # warm-up: allocator, kernels, bucket caches
        run(use_cache, min(16, args.new_tokens))
    times = {"KV cache": [], "no cache": []}
    outputs = {}
    loads = [os.getloadavg()[0]]
    for r in range(args.repeats):
        order = [True, False] if r % 2 == 0 else [False, True]
        for use_cache in order:
            name = "KV cache" if use_cache else "no cache"
            seconds, out = run(use_cache, args.new_tokens)
            times[name].append(seconds)
            outputs.setdefault(name, out)
            loads.append(os.getloadavg()[0])
            print(f"  repeat {r}: {name:8s} {seconds:8.2f} s  {args.new_tokens / seconds:9.1f} tokens/s", flush=True)
    same = torch.equal(outputs["KV cache"], outputs["no cache"])
    print(f"same tokens sampled by both variants: {same}; load average (1 min) {min(loads):.2f}-{max(loads):.2f}")
    print("| variant | s per run, median (min-max) | tokens/s | vs no cache |")
    print("|---|---|---|---|")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in ("no cache", "KV cache"):
        v = times[name]
        print(f"| {name} | {med[name]:.2f} ({min(v):.2f}-{max(v):.2f}) | {args.new_tokens / med[name]:,.1f} | "
              f"{med['no cache'] / med[name]:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "times": times,
                                         "same_tokens": same, "load_average": loads}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
