#!/usr/bin/env python
"""Prints the model presets with their parameter counts and training FLOPs per token.

    python scripts/model_table.py [--seq-len 2048]

Nothing is allocated: the counts come from the shapes (lamda_pipe/config.py).
"""

import argparse

from lamda_pipe.config import PRESETS, flops_per_token, param_count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length for the attention FLOPs")
    args = p.parse_args()
    print(f"| preset | layers | d_model | heads x head dim | d_ff | vocab | params | non-embedding | "
          f"TFLOP per 1M tokens (T={args.seq_len}) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, c in PRESETS.items():
        print(f"| `{name}` | {c.depth} | {c.dim} | {c.heads} x {c.dim_head} | {c.d_ff} | {c.vocab_size} | "
              f"{param_count(c) / 1e6:,.1f}M | {param_count(c, embedding=False) / 1e6:,.1f}M | "
              f"{flops_per_token(c, args.seq_len) * 1e6 / 1e12:,.1f} |")


if __name__ == "__main__":
    main()
