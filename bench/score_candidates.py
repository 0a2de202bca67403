#!/usr/bin/env python
"""Scoring 16 candidates on 4 attributes: from decode's KV cache vs recomputed from scratch.

    .venv/bin/python bench/score_candidates.py                      # readme preset, CPU
    .venv/bin/python bench/score_candidates.py --preset debug --prompt-tokens 64 --new-tokens 32

One process, fp32 by default, a randomly initialised model (speed does not depend on the
weights). The candidates are made up, as decoding leaves them: random tokens, each ending with
<|endoftext|> at a random step (a few cut at --new-tokens without one), padded after it; the
cache is the one decode would hold (prompt and every new token but the last), built untimed.
"cached" is ranking.score_cached (the missing last positions, then one attribute position per
candidate and attribute, rows grouped by length); "from scratch" is ranking.score_uncached (one
forward over prompt + candidate + attribute token per candidate, its 4 attributes batched).
The two take turns, in an order that reverses every repeat, after one untimed warm-up of each;
figures are medians, and the two must agree to 1e-4.
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
from lamda_pipe.data.dialog import DialogTokens  # noqa: E402
from lamda_pipe.data.tokenizer import ATTRIBUTES  # noqa: E402
from lamda_pipe.generation import Decoded  # noqa: E402
from lamda_pipe.model import LaMDA  # noqa: E402
from lamda_pipe.ranking import candidate_rows, score_cached, score_uncached  # noqa: E402

# The ids lamda-train-tokenizer gives the dialog tokens (any ids do: the model is random).
TOKENS = DialogTokens(eot=0, turn=3, response=4, yes=9, no=10,
                      attributes={a: 5 + i for i, a in enumerate(ATTRIBUTES)})


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="readme", choices=sorted(PRESETS), help="model preset (default readme)")
    p.add_argument("--candidates", type=int, default=16, help="candidates scored (default 16, as in the paper)")
    p.add_argument("--prompt-tokens", type=int, default=256, help="context length (default 256)")
    p.add_argument("--new-tokens", type=int, default=64, help="longest candidate (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant (default 5)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all usable cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write every timing here")
    args = p.parse_args()
    for flag in ("candidates", "prompt_tokens", "new_tokens", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    cfg = get_preset(args.preset)
    if args.prompt_tokens + args.new_tokens + 2 > cfg.max_seq_len:
        p.error(f"--prompt-tokens + --new-tokens + 2 must fit the preset's max_seq_len {cfg.max_seq_len}")
    return args


def made_up_candidates(n: int, steps: int, vocab: int, gen: torch.Generator) -> Decoded:
    """n rows as decode returns them: an eos at a random step (every 4th row cut without one,
    and one row reaching the last step), padding after it."""
    tokens = torch.randint(11, vocab, (n, steps), generator=gen)
    lengths = torch.randint(1, steps + 1, (n,), generator=gen)
    lengths[0] = steps
    for i in range(n):
        if i % 4 != 3:
            tokens[i, int(lengths[i]) - 1] = TOKENS.eot
        tokens[i, int(lengths[i]):] = TOKENS.eot  # the padding
    return Decoded(tokens, torch.zeros(n, steps), lengths, None)


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cfg = get_preset(args.preset)
    torch.manual_seed(args.seed)
    model = LaMDA(config=cfg).to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(11, cfg.vocab_size, (args.prompt_tokens,), generator=gen).to(device)
    d = made_up_candidates(args.candidates, args.new_tokens, cfg.vocab_size, gen)
    rows = candidate_rows(d, TOKENS.eot)
    caches = [{} for _ in model.blocks]
    with torch.no_grad():  # what decode leaves: prompt + every new token but the last
        seq = torch.cat([prompt[None].expand(args.candidates, -1), d.tokens[:, :-1].to(device)], dim=1)
        model(seq, kv_caches=caches)
    lengths = sorted(len(r) for r in rows)
    print(f"{args.preset}: {param_count(cfg) / 1e6:.2f}M parameters, {args.dtype} on {device}, "
          f"{torch.get_num_threads()} threads; prompt {args.prompt_tokens} tokens, {args.candidates} candidates of "
          f"{lengths[0]}-{lengths[-1]} tokens ({len(set(lengths))} lengths), {len(ATTRIBUTES)} attributes; "
          f"torch {torch.__version__}")

    def run(cached: bool) -> tuple[float, torch.Tensor]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if cached:
            probs = score_cached(model, caches, args.prompt_tokens, rows, TOKENS, ATTRIBUTES)
        else:
            probs = score_uncached(model, prompt, rows, TOKENS, ATTRIBUTES)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, probs.float().cpu()

    for cached in (True, False):  # warm-up: allocator, kernels, bucket caches
        run(cached)
    names = {True: "cached", False: "from scratch"}
    times = {name: [] for name in names.values()}
    outputs = {}
    loads = [os.getloadavg()[0]]
    for r in range(args.repeats):
        for cached in ([True, False] if r % 2 == 0 else [False, True]):
            seconds, probs = run(cached)
            times[names[cached]].append(seconds)
            outputs.setdefault(names[cached], probs)
            loads.append(os.getloadavg()[0])
            print(f"  repeat {r}: {names[cached]:12s} {seconds:8.3f} s", flush=True)
    diff = float((outputs["cached"] - outputs["from scratch"]).abs().max())
    same = diff <= 1e-4
    print(f"largest difference between the two: {diff:.2e} ({'agree' if same else 'DISAGREE'}); "
          f"load average (1 min) {min(loads):.2f}-{max(loads):.2f}")
    med = {k: statistics.median(v) for k, v in times.items()}
    print("| variant | s per scoring, median (min-max) | vs from scratch |")
    print("|---|---|---|")
    for name in ("from scratch", "cached"):
        v = times[name]
        print(f"| {name} | {med[name]:.3f} ({min(v):.3f}-{max(v):.3f}) | {med['from scratch'] / med[name]:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "times": times,
                                         "max_difference": diff, "load_average": loads}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
