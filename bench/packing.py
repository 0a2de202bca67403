#!/usr/bin/env python
"""Packing efficiency: the share of trained positions that hold real tokens, packed vs one example per row.

    .venv/bin/python bench/packing.py                                  # the demo dialogs, seq 128 and 512
    .venv/bin/python bench/packing.py --dialogs 200 --seq-lens 128     # smoke test

The demo dialog corpus (lamda_pipe/data/dialog_demo.py, --dialogs of seed 0) is turned into its
examples (data/dialog.py) with the demo's tokenizer (the bundled corpus at 2048 tokens, trained
here as prepare_bundled trains it). For each --seq-lens T a row is T + 1 tokens; the figures are:

* fill: example tokens / row positions, packed by data/packing.py (best-fit decreasing) and with
  one example per row (the rest of each row padding);
* targets: the share of row positions that are training targets (data/dialog.py's loss mask):
  what a step actually learns from;
* rows: rows per epoch, i.e. the steps an epoch takes, in each layout;
* pack time: seconds to pack the corpus's examples (best of 3).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lamda_pipe.data.dialog import DialogTokens, dialog_examples, parse_dialog  # noqa: E402
from lamda_pipe.data.dialog_demo import make_dialogs  # noqa: E402
from lamda_pipe.data.loader import bundled_corpus  # noqa: E402
from lamda_pipe.data.packing import pack  # noqa: E402
from lamda_pipe.data.text_sources import iter_documents  # noqa: E402
from lamda_pipe.data.tokenizer import train_tokenizer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dialogs", type=int, default=2000, help="demo dialogs (default 2000, as the demo)")
    p.add_argument("--seq-lens", default="128,512", help="comma-separated sequence lengths (default 128,512)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()

    tok = train_tokenizer(iter_documents([str(f) for f in bundled_corpus()]), 2048)
    ids = DialogTokens.of(tok)
    examples = [e for d in make_dialogs(args.dialogs, seed=0) for e in dialog_examples(tok, ids, parse_dialog(d))]
    lengths = np.array([len(e.ids) for e in examples])
    targets = np.array([sum(e.mask) for e in examples])
    print(f"{len(examples):,} examples from {args.dialogs:,} demo dialogs: {lengths.sum():,} tokens, "
          f"length {lengths.min()}-{lengths.max()} (median {int(np.median(lengths))}), "
          f"{targets.sum():,} targets")
    results = []
    for seq in [int(s) for s in args.seq_lens.split(",")]:
        width = seq + 1
        times = []
        for _ in range(3):
            start = time.perf_counter()
            rows = pack(lengths, width)
            times.append(time.perf_counter() - start)
        kept = np.minimum(lengths, width)
        # a clipped example loses context tokens from its front; its targets are at the end
        kept_targets = np.minimum(targets, kept)
        packed = {"rows": len(rows), "fill": kept.sum() / (len(rows) * width),
                  "targets": kept_targets.sum() / (len(rows) * width)}
        single = {"rows": len(examples), "fill": kept.sum() / (len(examples) * width),
                  "targets": kept_targets.sum() / (len(examples) * width)}
        r = {"seq_len": seq, "packed": packed, "one_per_row": single, "pack_seconds": min(times),
             "clipped": int((lengths > width).sum())}
        results.append(r)
        print(f"seq {seq}: packed {packed['fill']:.1%} fill, {packed['targets']:.1%} targets, {packed['rows']:,} rows | "
              f"one per row {single['fill']:.1%} fill, {single['targets']:.1%} targets, {single['rows']:,} rows | "
              f"{single['rows'] / packed['rows']:.2f}x fewer steps per epoch packed; packing took "
              f"{min(times):.3f}s; {r['clipped']} examples clipped")
    if args.json:
        args.json.write_text(json.dumps({"examples": len(examples), "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
