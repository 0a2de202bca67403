"""scripts/slurm/prepare.sbatch on a real Slurm (tests/hosts.py): the tokenizer-and-plan job, then
the array of `lamda-prepare-data --shard i/N` tasks chained to it with --dependency, one task killed
mid-way (SIGKILL: what a lost node leaves), the array submitted again. Complete parts are skipped,
the killed one is redone, and the dir opens as one source equal, token for token and sample for
sample, to a one-process prepare of the same files with the same tokenizer."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from lamda_pipe.data.loader import MicroBatchStream, bundled_corpus, open_sources
from lamda_pipe.data.prepare import prepare_data, read_meta
from lamda_pipe.data.text_sources import DataError, iter_documents
from tests.hosts import SlurmCluster, running_slurm, sbatch_env

pytestmark = pytest.mark.launch  # a real Slurm

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "slurm" / "prepare.sbatch"
TIMEOUT = 180
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL")


@pytest.fixture(scope="module")
def slurm(request):
    yield from running_slurm(request)


def write_inputs(d: Path, mb: float) -> list[Path]:
    """The bundled corpus, each copy's chapters marked with the copy number, in four files."""
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


def task_states(slurm: SlurmCluster, job: int) -> dict[str, str]:
    """Array task id (or a pending range such as '2-3') -> JobState."""
    states = {}
    for line in slurm.cmd("scontrol", "show", "job", "-o", str(job)).splitlines():
        info = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "ArrayTaskId" in info:
            states[info["ArrayTaskId"]] = info["JobState"]
    return states


def wait_array(slurm: SlurmCluster, job: int, n: int) -> dict[int, str]:
    """Waits for the n tasks of an array to end; task id -> JobState."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        states = task_states(slurm, job)
        if len(states) == n and all(s in FINAL for s in states.values()):
            return {int(k): s for k, s in states.items()}
        if time.monotonic() > deadline:
            slurm.cmd("scancel", str(job))
            raise TimeoutError(f"array {job} not done after {TIMEOUT}s: {states}\n{slurm.logs()}")
        time.sleep(0.2)


def submit_array(slurm: SlurmCluster, env: dict, logs: Path, indices: str, *extra: str) -> int:
    # One core per task: the node's two cores run two tasks at a time.
    return slurm.sbatch("--array", indices, "--cpus-per-task", "1", "--output", str(logs / "prep-%A_%a.out"),
                        *extra, str(SCRIPT), env=env, cwd=ROOT)


def log_of(logs: Path, job: int, task: int) -> str:
    path = logs / f"prep-{job}_{task}.out"
    return path.read_text(errors="replace") if path.exists() else "(no output file)"


def test_array_prepares_parts_a_killed_task_is_redone_and_the_dir_equals_a_one_process_prepare(slurm, tmp_path):
    n = 4
    inputs = write_inputs(tmp_path, mb=20)
    tok, out, logs = tmp_path / "tok.json", tmp_path / "data", tmp_path / "logs"
    logs.mkdir()
    env = sbatch_env(tmp_path / "unused", 1, LAMDA_PREP_ARGS="--input " + " ".join(map(str, inputs)),
                     LAMDA_TOKENIZER=str(tok), LAMDA_DATA_OUT=str(out))

    # Step 1, once: the tokenizer, then the plan; the array waits for it (the chain in
    # scripts/slurm/README.md).
    py = env["PYTHON"]
    plan_job = slurm.sbatch("--job-name", "lamda-plan", "--output", str(logs / "plan.out"), "--wrap", f"""set -e
        {py} -m lamda_pipe.tools.train_tokenizer --input {inputs[0]} --max-bytes 1M --vocab-size 2048 \\
            --out {tok} --no-progress
        {py} -m lamda_pipe.tools.prepare_data {env['LAMDA_PREP_ARGS']} --tokenizer {tok} --out {out} --plan-shards 4""",
                            env=env, cwd=ROOT)
    job = submit_array(slurm, env, logs, "0-3", "--dependency", f"afterok:{plan_job}")

    # Kill task 2 once it is writing its part, with SIGKILL: no clean-up runs, as on a lost node or
    # an out-of-memory kill (scancel sends SIGTERM first, on which the task removes its work dir).
    # The task execs the tool, whose PID its work dir's owner file names.
    deadline = time.monotonic() + TIMEOUT
    while not any(f.stat().st_size > 0 for f in (out / "parts").glob("00002-of-00004.tmp-*/train.bin")):
        assert time.monotonic() < deadline and task_states(slurm, job).get("2") != "COMPLETED", (
            f"task 2 never seen at work: {task_states(slurm, job)}\n{log_of(logs, job, 2)}")
        time.sleep(0.01)
    (owner,) = (out / "parts").glob("00002-of-00004.tmp-*/.owner")
    os.kill(int(owner.read_text().split()[1]), signal.SIGKILL)
    states = wait_array(slurm, job, n)
    assert states == {0: "COMPLETED", 1: "COMPLETED", 2: "FAILED", 3: "COMPLETED"}, (states, log_of(logs, job, 2))
    assert "plan for 4 shards: " in (logs / "plan.out").read_text()
    parts = out / "parts"
    left = sorted(p.name for p in parts.iterdir())
    assert "00002-of-00004" not in left and any(name.startswith("00002-of-00004.tmp-") for name in left), (
        left, log_of(logs, job, 2))
    with pytest.raises(DataError, match=r"1 of them are missing or incomplete: shard\(s\) 2; run .* sbatch --array=2 "
                                        r"with LAMDA_SHARDS=4"):
        read_meta(out)
    stamps = {p: p.stat().st_mtime_ns for p in parts.glob("0000[013]-of-00004/*")}

    # The same array again: three parts skipped, the killed one redone from scratch.
    job2 = submit_array(slurm, env, logs, "0-3")
    assert wait_array(slurm, job2, n) == {i: "COMPLETED" for i in range(n)}, [log_of(logs, job2, i) for i in range(n)]
    for i in (0, 1, 3):
        assert re.search(rf"shard {i}/4: \S+/0000{i}-of-00004 is complete \([\d,]+ documents\); skipped",
                         log_of(logs, job2, i)), log_of(logs, job2, i)
    redone = log_of(logs, job2, 2)
    assert re.search(r"shard 2/4: removing 00002-of-00004\.tmp-\d+, left by an interrupted run", redone), redone
    assert re.search(r"shard 2/4: documents [\d,]+ to [\d,]+ of [\d,]+: ", redone), redone
    assert {p: p.stat().st_mtime_ns for p in parts.glob("0000[013]-of-00004/*")} == stamps
    assert sorted(p.name for p in parts.iterdir()) == [f"0000{i}-of-00004" for i in range(n)]

    # A rerun of some indices needs the dir's N: without it the script stops, naming the fix.
    job3 = submit_array(slurm, env, logs, "1-2")
    assert wait_array(slurm, job3, 2) == {1: "FAILED", 2: "FAILED"}
    assert "prepare.sbatch: error: the array 1-2 is not 0..N-1 (2 tasks): set LAMDA_SHARDS to the dir's shard " \
           "count" in log_of(logs, job3, 1)
    job4 = submit_array(slurm, {**env, "LAMDA_SHARDS": "4"}, logs, "1-2")
    assert wait_array(slurm, job4, 2) == {1: "COMPLETED", 2: "COMPLETED"}
    assert "shard 2/4: " in log_of(logs, job4, 2) and "is complete" in log_of(logs, job4, 2)

    # The oracle: one process, the same files and tokenizer.
    one = prepare_data(iter_documents([str(p) for p in inputs]), tok, tmp_path / "one", val_fraction=0.01,
                       workers=2, progress=False)
    a, b = (open_sources(str(d), model_vocab=2048, seq_len=128)[0] for d in (tmp_path / "one", out))
    assert b.meta["splits"]["train"]["documents"] + b.meta["splits"]["val"]["documents"] == \
        one["splits"]["train"]["documents"] + one["splits"]["val"]["documents"]
    for split in ("train", "val"):
        assert b.meta["splits"][split]["tokens"] == one["splits"][split]["tokens"]
        assert np.array_equal(np.asarray(a.tokens(split)), np.asarray(b.tokens(split)))
    sa, sb = (MicroBatchStream([s.split("train")], 128, 8, seed=1) for s in (a, b))
    assert sa.num_samples == sb.num_samples
    for m in range(0, sa.num_samples // 8, 97):
        (xa, ya), (xb, yb) = sa.micro_batch(m), sb.micro_batch(m)
        assert xa.equal(xb) and ya.equal(yb)
