#!/usr/bin/env python
"""Start-up checks against checkpoint size and rank count: every rank reading everything
(before) against each rank reading its share (now).

    .venv/bin/python bench/startup.py                          # readme-sized and 4x checkpoints, 1, 2, 4 ranks
    .venv/bin/python bench/startup.py --scales 1 --ranks 1,2 --json /tmp/startup.json
    .venv/bin/python bench/startup.py --launch --ranks 1,2,4     # real resumes: time to the first step

A synthetic checkpoint of the `readme` preset's real file layout (RunRecord.expected_files for
P stages x D replicas) is written with file sizes from the shapes: each layer file holds its
layer's fp32 weights, each optimizer shard 12 bytes (fp32 master weights and two Adam moments)
per parameter of its stage / D, each stage's engine state a few KB; --scales multiplies every
size. W = P x D processes then start at once, as a launcher starts them, and each runs the
checkpoint checks of a resume before any process group work:
  before: checkpoint.validate(deep=True), every file's every byte in every rank (the code before
          the checks were spread);
  now:    validate(deep=False) everywhere, then verify_archives(files_to_verify(...)).
The token-id check is measured the same way on a synthetic uint16 split (--tokens): a full scan
in every rank against each rank's slice (loader.check_token_ids). Files are in the page cache
(written just before), so the time is the CRC / max computation, and "bytes read" is what a
shared file system would serve.

--launch: real resumes through the `deepspeed` launcher (gloo, CPU) of the `readme` preset at
seq 256 on the bundled corpus, for each rank count (1 rank: 1 stage; else 2 stages x W/2):
one step is trained and saved, then a second launch resumes from it, and the time from
starting the launcher to its first logged step is reported (stdout lines time-stamped as they
arrive), with the first step's tokens/s from metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lamda_pipe.checkpoint import files_to_verify, validate, verify_archives  # noqa: E402
from lamda_pipe.config import block_param_count, get_preset  # noqa: E402
from lamda_pipe.pipeline import stage_bounds  # noqa: E402
from lamda_pipe.run_format import COMPLETE, RunRecord, layer_file  # noqa: E402


def layouts(world: int) -> tuple[int, int]:
    """(P, D) for a rank count: two stages once there are two ranks, the rest data parallel."""
    return (1, 1) if world == 1 else (2, world // 2)


def write_checkpoint(tag: Path, world: int, scale: float) -> tuple[RunRecord, tuple[int, ...]]:
    cfg = get_preset("readme")
    stages, dp = layouts(world)
    bounds = tuple(stage_bounds(cfg, stages, 256))
    record = RunRecord(model_preset="readme", model_config=cfg, pipe_stages=stages, data_parallel=dp,
                       global_steps=1, samples_consumed=1, stage_bounds=bounds, seq_len=256)
    layer_params = [cfg.vocab_size * cfg.dim] + [block_param_count(cfg)] * cfg.depth + [cfg.dim]
    tag.mkdir(parents=True)

    def archive(name: str, nbytes: int):
        torch.save({"x": torch.randint(0, 255, (max(int(nbytes * scale), 1),), dtype=torch.uint8)}, tag / name)

    for i, n in enumerate(layer_params):
        archive(layer_file(i), 4 * n)
    for s in range(stages):
        archive(f"mp_rank_{s:02d}_model_states.pt", 4096)
        params = sum(layer_params[bounds[s]:min(bounds[s + 1], len(layer_params))])
        if s == stages - 1 and stages > 1:
            params += layer_params[0]  # the tied embedding's state sits on the last stage too
        for r in range(dp):
            archive(record.optimizer_file(s, r), 12 * params // dp)
    (tag / "lamda_run.json").write_text(record.to_json())
    (tag / COMPLETE).write_text("")
    return record, bounds


def rank_checks(tag: str, bounds, rank: int, world: int, mode: str, tokens: str, n_tokens: int, out):
    torch.set_num_threads(1)
    tag_dir = Path(tag)
    t0 = time.perf_counter()
    if mode == "before":
        record = validate(tag_dir, deep=True)
        names = record.expected_files()
    else:
        record = validate(tag_dir, deep=False)
        names = files_to_verify(record, bounds, rank, world, change_layout=False)
        verify_archives(tag_dir, names)
    t_ckpt = time.perf_counter() - t0
    ckpt_bytes = sum((tag_dir / n).stat().st_size for n in names)
    t0 = time.perf_counter()
    data = np.memmap(tokens, dtype=np.uint16, mode="r", shape=(n_tokens,))
    start, end = (0, n_tokens) if mode == "before" else (n_tokens * rank // world, n_tokens * (rank + 1) // world)
    int(data[start:end].max())
    t_tokens = time.perf_counter() - t0
    out.put((rank, t_ckpt, ckpt_bytes, t_tokens, 2 * (end - start)))


def run_world(tag: Path, bounds, world: int, mode: str, tokens: Path, n_tokens: int) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=rank_checks, args=(str(tag), bounds, r, world, mode, str(tokens), n_tokens, out))
             for r in range(world)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    return {"ranks": world, "mode": mode, "wall_s": wall,
            "ckpt_s_max": max(r[1] for r in results), "ckpt_bytes_total": sum(r[2] for r in results),
            "tokens_s_max": max(r[3] for r in results), "token_bytes_total": sum(r[4] for r in results)}


def launch_times(world: int, root: Path) -> dict:
    import os
    import subprocess

    stages, _ = layouts(world)
    run_dir = root / f"run-{world}"
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(world), "--master_port",
           str(29700 + world), str(ROOT / "ds_train.py"), "--model", "readme", "--seq-len", "256",
           "--pipe-stages", str(stages), "--run-dir", str(run_dir), "--log-every", "1", "--eval-every", "0",
           "--sample-tokens", "0", "--save-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    subprocess.run(cmd + ["--steps", "1"], env=env, cwd=ROOT, check=True, capture_output=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd + ["--steps", "2", "--resume", "auto"], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = None
    for line in proc.stdout:
        if first is None and "step      2 | loss" in line:
            first = time.perf_counter() - t0
    proc.wait()
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in records if r.get("step") == 2 and "loss" in r][-1]
    ckpt = run_dir / "checkpoints" / "global_step1"
    return {"ranks": world, "stages": stages, "ckpt_bytes": sum(f.stat().st_size for f in ckpt.iterdir()),
            "to_first_step_s": first, "tokens_per_s": step["tokens_per_s"], "returncode": proc.returncode}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1,2,4", help="rank counts (default 1,2,4)")
    p.add_argument("--scales", default="1,4", help="checkpoint size multipliers of the readme preset (default 1,4)")
    p.add_argument("--tokens", type=int, default=500_000_000, help="tokens in the synthetic split (default 500M)")
    p.add_argument("--launch", action="store_true", help="real resumes through the deepspeed launcher instead")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = []
    if args.launch:
        with tempfile.TemporaryDirectory(prefix="lamda-startup-") as tmp:
            for world in (int(w) for w in args.ranks.split(",")):
                r = launch_times(world, Path(tmp))
                rows.append(r)
                print(f"{world} ranks ({r['stages']} stages), checkpoint {r['ckpt_bytes'] / 2**30:.2f} GiB: "
                      f"first step logged {r['to_first_step_s']:.1f} s after the launch", flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return 0
    with tempfile.TemporaryDirectory(prefix="lamda-startup-") as tmp:
        tokens = Path(tmp) / "train.bin"
        np.random.default_rng(0).integers(0, 20000, size=args.tokens, dtype=np.uint16).tofile(tokens)
        for scale in (float(s) for s in args.scales.split(",")):
            for world in (int(w) for w in args.ranks.split(",")):
                tag = Path(tmp) / f"ckpt-{scale}-{world}" / "global_step1"
                _, bounds = write_checkpoint(tag, world, scale)
                size = sum(f.stat().st_size for f in tag.iterdir())
                for mode in ("before", "now"):
                    r = {"scale": scale, "ckpt_bytes": size, **run_world(tag, bounds, world, mode, tokens, args.tokens)}
                    rows.append(r)
                    print(f"checkpoint {size / 2**30:.2f} GiB, {world} ranks, {mode:6s}: checkpoint check "
                          f"{r['ckpt_s_max']:.2f} s (slowest rank), {r['ckpt_bytes_total'] / 2**30:.2f} GiB read in all; "
                          f"token check {r['tokens_s_max']:.2f} s, {r['token_bytes_total'] / 2**30:.2f} GiB read; "
                          f"wall {r['wall_s']:.2f} s", flush=True)
                for f in tag.iterdir():
                    f.unlink()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
