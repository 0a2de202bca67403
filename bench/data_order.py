#!/usr/bin/env python
"""Memory and first-sample latency of the data order (lamda_pipe/data/order.py), per version.

    .venv/bin/python bench/data_order.py                         # n = 1.4B windows (needs ~12 GB free for version 1)
    .venv/bin/python bench/data_order.py --n 100000000 --json /tmp/order.json

n = 1.4B is LaMDA's 2.81T pre-training tokens in windows of 2048 + 1. Each version runs in a
fresh process (so one's memory cannot hide the other's): it builds the order of a training
source (EpochOrder, as ShuffledSamples does), then times the first sample of an epoch, the
first sample of the next epoch (version 1 builds a new permutation there), and the mean of
10,000 further positions. Memory is the process's peak resident set (ru_maxrss) minus the
resident set before the order was made.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_version(n: int, version: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from lamda_pipe.data.order import EpochOrder

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    order = EpochOrder(n, seed=1234, version=version)
    order.index(0)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    order.index(n)  # the first sample of epoch 1
    next_epoch = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k in range(1, 10_001):
        order.index(n + k * 104_729 % n)
    per_sample = (time.perf_counter() - t0) / 10_000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"version": version, "n": n, "first_sample_s": first, "next_epoch_first_sample_s": next_epoch,
            "per_sample_us": per_sample * 1e6, "extra_peak_rss_bytes": peak - before}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_400_000_000, help="samples in an epoch (default 1.4B)")
    p.add_argument("--versions", default="2,1", help="order versions to run, in this order (default 2,1)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--_one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one is not None:
        print(json.dumps(one_version(args.n, args._one)))
        return 0
    results = []
    for v in (int(x) for x in args.versions.split(",")):
        out = subprocess.run([sys.executable, __file__, "--n", str(args.n), "--_one", str(v)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"version {v}: failed ({out.stderr.strip().splitlines()[-1:]})")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"version {v}: n={r['n']:,}  first sample {r['first_sample_s']:.3f} s  first sample of the next "
              f"epoch {r['next_epoch_first_sample_s']:.3f} s  then {r['per_sample_us']:.1f} us/sample  "
              f"extra peak RSS {r['extra_peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
