#!/usr/bin/env python
"""Peak memory per pipeline stage: the planner's prediction (lamda_pipe/plan.py) against the
CPU allocator's measurement (bench/pipeline.py --part memory), without and with activation
checkpointing.

    .venv/bin/python bench/plan_vs_measured.py --preset debug --seq-len 128 --stages 1,2,4   # ~1 min on 2 cores
    .venv/bin/python bench/plan_vs_measured.py --stages 1,2,4                                # readme, seq 256: minutes
    .venv/bin/python bench/plan_vs_measured.py --from-json /tmp/mem.json                     # a measurement made before

The prediction is made for the configuration the measurement ran: ds_configs/cpu.json (fp32,
ZeRO-1) with its batch and activation checkpointing overridden as bench/pipeline.py does, one
data-parallel replica, through plan.layout_from_ds (the path ds_train.py --dry-run takes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lamda_pipe.config import get_preset  # noqa: E402
from lamda_pipe.ds_config import CONFIG_DIR, load_config  # noqa: E402
from lamda_pipe.plan import layout_from_ds, plan_stages  # noqa: E402

MiB = 2 ** 20


def measure(preset: str, seq_len: int, stages: str, extra: list[str] = ()) -> dict:
    """Runs bench/pipeline.py --part memory (one torchrun per stage count and checkpointing)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mem.json"
        cmd = [sys.executable, str(ROOT / "bench" / "pipeline.py"), "--part", "memory", "--preset", preset,
               "--seq-len", str(seq_len), "--stages", stages, "--json", str(out), *extra]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench/pipeline.py failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
                               f"{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def compare(report: dict) -> list[dict]:
    """One row per measured stage: measured and predicted peak bytes and where each falls."""
    a = report["args"]
    cfg = get_preset(a["preset"])
    rows = []
    for r in report["memory"]:
        ds = load_config(CONFIG_DIR / "cpu.json")
        ds.pop("train_batch_size", None)
        ds["train_micro_batch_size_per_gpu"] = a["micro_batch"]
        ds["gradient_accumulation_steps"] = a["memory_micro_batches"]
        ds["pipeline"]["activation_checkpoint_interval"] = r["ckpt"]
        if a.get("zero"):
            ds["zero_optimization"] = {**ds["zero_optimization"], **json.loads(a["zero"])}
        dp = r.get("dp", 1)
        layout = layout_from_ds(ds, pipe_stages=r["p"], world_size=r["p"] * dp, seq_len=a["seq_len"],
                                partition=a["partition"], cuda_available=False)
        stage = plan_stages(cfg, layout, "cpu")[r["stage"]]
        rows.append({"preset": a["preset"], "p": r["p"], "dp": dp, "replica": r.get("replica", 0), "ckpt": r["ckpt"],
                     "stage": r["stage"],
                     "measured": r["peak"], "predicted": stage.peak, "error": stage.peak / r["peak"] - 1,
                     "measured_in": r["peak_phase"], "predicted_in": stage.peak_in,
                     "static_measured": r["static_total"],
                     "static_predicted": sum(stage.bytes[k] for k in ("weights", "optimizer", "pipe buffers",
                                                                      "caches", "reduce buckets"))})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| preset | P x D | ckpt | stage (replica) | measured peak MiB | predicted MiB | error | peak in (measured / predicted) "
             "| between steps: measured / predicted MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        replica = f" ({r['replica']})" if r["dp"] > 1 else ""
        lines.append(f"| {r['preset']} | {r['p']} x {r['dp']} | {r['ckpt'] or 'off'} | {r['stage']}{replica} | "
                     f"{r['measured'] / MiB:.1f} | "
                     f"{r['predicted'] / MiB:.1f} | {r['error']:+.1%} | {r['measured_in']} / {r['predicted_in']} | "
                     f"{r['static_measured'] / MiB:.1f} / {r['static_predicted'] / MiB:.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="readme")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--stages", default="1,2,4")
    p.add_argument("--data-parallel", type=int, default=1, help="replicas per configuration (P x D processes)")
    p.add_argument("--from-json", type=Path, default=None, help="compare a bench/pipeline.py --json report")
    p.add_argument("--json", type=Path, default=None, help="write the measurement here")
    args = p.parse_args()
    report = (json.loads(args.from_json.read_text()) if args.from_json
              else measure(args.preset, args.seq_len, args.stages, ["--data-parallel", str(args.data_parallel)]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    rows = compare(report)
    print(table(rows))
    worst = max(rows, key=lambda r: abs(r["error"]))
    print(f"\nlargest error {worst['error']:+.1%} (P={worst['p']}, ckpt {worst['ckpt']}, stage {worst['stage']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
