#!/usr/bin/env python
"""Data-preparation rate of a Slurm array of `lamda-prepare-data --shard i/N` tasks
(scripts/slurm/prepare.sbatch) on the test suite's private single-node Slurm (tests/hosts.py: needs
root, slurm-wlm and munge), against one `lamda-prepare-data` process on the same input and cores,
in the same run.

Input: the bundled corpus, every copy's chapters marked with the copy number, repeated to --mb
megabytes in four .txt files. Tokenizer: trained on the first MB (--vocab-size). Each round runs,
in an order that alternates, into fresh dirs:
- "array, planned": `--plan-shards N` (one process, as the plan job would), then the array
  (--tasks tasks, one core each: the node runs as many at a time as it has cores), timed from the
  plan's start to the end of the array's last task;
- "array, no plan": the array alone, every task of the first wave counting the whole input;
- "one process": the one-process CLI with one worker per core.
Tokens are all tokens written (end-of-text ids included), the same count for every variant.
Times are medians.

    .venv/bin/python bench/data_prep_slurm.py                          # 4 tasks, 20 MB, 3 rounds
    .venv/bin/python bench/data_prep_slurm.py --tasks 8 --mb 40 --json /tmp/bench/prep_slurm.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.hosts import SlurmCluster, sbatch_env, slurm_unavailable  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=4, help="array tasks (shards)")
    p.add_argument("--mb", type=float, default=20.0, help="megabytes of text")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def write_inputs(d: Path, mb: float) -> list[Path]:
    from lamda_pipe.data.loader import bundled_corpus
    from lamda_pipe.data.text_sources import iter_documents

    docs = list(iter_documents([str(p) for p in bundled_corpus()]))
    files, size, copy = [[] for _ in range(4)], 0, 0
    while size < mb * 1e6:
        for i, doc in enumerate(docs):
            files[copy % 4].append(f"Copy {copy}, chapter {i}.\n{doc}")
            size += len(files[copy % 4][-1])
        copy += 1
    paths = [d / f"in{k}.txt" for k in range(4)]
    for path, chunk in zip(paths, files):
        path.write_text("\n\n".join(chunk) + "\n")
    return paths


def run_array(slurm: SlurmCluster, env: dict, tasks: int, logs: Path) -> None:
    job = slurm.sbatch("--array", f"0-{tasks - 1}", "--cpus-per-task", "1", "--output", str(logs / "p-%A_%a.out"),
                       str(ROOT / "scripts" / "slurm" / "prepare.sbatch"), env=env, cwd=ROOT)
    while True:
        states = [dict(kv.split("=", 1) for kv in line.split() if "=" in kv).get("JobState")
                  for line in slurm.cmd("scontrol", "show", "job", "-o", str(job)).splitlines()]
        if len(states) == tasks and all(s not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING") for s in states):
            break
        time.sleep(0.05)
    if set(states) != {"COMPLETED"}:
        raise SystemExit(f"array {job}: {states}\n" + "\n".join(p.read_text() for p in logs.glob(f"p-{job}_*")))


def task_seconds(logs: Path) -> list[float]:
    """Each task's own time (reading, counting if it has no plan, tokenizing), from its log."""
    return [float(m.group(1)) for p in logs.glob("p-*") for m in re.finditer(r" tokens in ([\d.]+) s ", p.read_text())]


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = slurm_unavailable()
    if reason:
        raise SystemExit(f"no test Slurm here: {reason}")
    from lamda_pipe.data.prepare import read_meta, usable_cores
    from lamda_pipe.data.text_sources import iter_documents
    from lamda_pipe.data.tokenizer import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-prep-slurm-"))
    slurm = SlurmCluster()
    try:
        inputs = write_inputs(work, args.mb)
        tok = work / "tok.json"
        train_tokenizer(iter_documents([str(p) for p in inputs], max_bytes=1 << 20), args.vocab_size).save(str(tok))
        slurm.start()
        cores = usable_cores()
        names = ["array, planned", "array, no plan", "one process"]
        times = {name: [] for name in names}
        tokens, per_task, plan_s = {}, {name: [] for name in names[:2]}, []
        for r in range(args.repeats):
            for k, name in enumerate(names if r % 2 == 0 else names[::-1]):
                out, logs = work / f"out-{r}-{k}", work / f"logs-{r}-{k}"
                logs.mkdir()
                if name.startswith("array"):
                    env = sbatch_env(work, 1, LAMDA_PREP_ARGS="--input " + " ".join(map(str, inputs)),
                                     LAMDA_TOKENIZER=str(tok), LAMDA_DATA_OUT=str(out))
                    t = time.perf_counter()
                    if name == "array, planned":
                        subprocess.run([sys.executable, "-m", "lamda_pipe.tools.prepare_data", "--input",
                                        *map(str, inputs), "--tokenizer", str(tok), "--out", str(out), "--plan-shards",
                                        str(args.tasks)], check=True, capture_output=True, cwd=ROOT)
                        plan_s.append(time.perf_counter() - t)
                    run_array(slurm, env, args.tasks, logs)
                    times[name].append(time.perf_counter() - t)  # the plan included
                    per_task[name] += task_seconds(logs)
                else:
                    t = time.perf_counter()
                    subprocess.run([sys.executable, "-m", "lamda_pipe.tools.prepare_data", "--input", *map(str, inputs),
                                    "--tokenizer", str(tok), "--out", str(out), "--workers", str(cores),
                                    "--no-progress"], check=True, capture_output=True, cwd=ROOT,
                                   env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                    times[name].append(time.perf_counter() - t)
                s = read_meta(out)["splits"]
                tokens[name] = s["train"]["tokens"] + s["val"]["tokens"]
                shutil.rmtree(out)
        if len(set(tokens.values())) != 1:
            raise SystemExit(f"token counts differ: {tokens}")
    finally:
        slurm.close()
        shutil.rmtree(work, ignore_errors=True)

    n = next(iter(tokens.values()))
    info = {"date": datetime.date.today().isoformat(), "host": platform.node(), "cores": cores,
            "tasks": args.tasks, "text_mb": args.mb, "tokens": n, "vocab_size": args.vocab_size,
            "repeats": args.repeats, "load_average": os.getloadavg()[0]}
    rows = [{"variant": name, "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
             "tokens_per_s": n / statistics.median(ts)} for name, ts in times.items()]
    print(f"{info['date']}, {info['host']}, {cores} cores, {args.mb:.0f} MB, {n:,} tokens, arrays of {args.tasks} tasks "
          f"(1 core each), medians of {args.repeats}, load average {info['load_average']:.2f} at the end")
    for row in rows:
        print(f"{row['variant']:<16} {row['median_s']:6.2f} s ({row['min_s']:.2f}-{row['max_s']:.2f}) "
              f"{row['tokens_per_s']:>12,.0f} tokens/s")
    print(f"plan (--plan-shards, one process): median {statistics.median(plan_s):.2f} s")
    for name, ts in per_task.items():
        print(f"{name}: the tasks' own time: median {statistics.median(ts):.2f} s, max {max(ts):.2f} s")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "results": rows, "task_seconds": per_task,
                                         "plan_seconds": plan_s}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
