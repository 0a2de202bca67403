"""Checkpoints you can trust: atomic saves, validation before loading, keep-last-N.

A checkpoint directory (RUN_DIR/checkpoints) holds one folder per save, named by step, and a
file `latest` naming the newest *complete* one. A save is complete when every rank has written
its DeepSpeed files; only then does rank 0 write the marker `lamda_complete` into the folder and
replace `latest` (write to a temporary name, then rename). A save killed half-way therefore
leaves a folder without the marker that `latest` never points to and nothing ever loads.

Beside DeepSpeed's files each folder holds `lamda_run.json` (model config, layout, data
position, tokenizer hash) and `tokenizer.json`, so a checkpoint describes itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

from .errors import CheckpointError

RUN_INFO = "lamda_run.json"
COMPLETE = "lamda_complete"
TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def begin_save(tag_dir: Path, info: dict, tokenizer: Path) -> None:
    """Rank 0, before DeepSpeed writes: the self-description, and no stale completion marker
    (the folder may hold a save of the same step that was killed half-way)."""
    tag_dir.mkdir(parents=True, exist_ok=True)
    (tag_dir / COMPLETE).unlink(missing_ok=True)
    shutil.copyfile(tokenizer, tag_dir / "tokenizer.json")
    write_atomic(tag_dir / RUN_INFO, json.dumps(info, indent=1))


def commit_save(ckpt_dir: Path, tag: str, keep_last: int | None) -> list[Path]:
    """Rank 0, after a barrier that follows every rank's writes: mark complete, move `latest`,
    then delete complete checkpoints older than the newest `keep_last`. Returns what was deleted."""
    tag_dir = ckpt_dir / tag
    (tag_dir / COMPLETE).write_text("")
    write_atomic(ckpt_dir / "latest", tag)
    if not keep_last:
        return []
    complete = sorted((step, d) for d in ckpt_dir.iterdir()
                      if d.is_dir() and (m := TAG_RE.match(d.name)) and (d / COMPLETE).is_file()
                      for step in [int(m.group(1))])
    doomed = [d for _, d in complete[:-keep_last] if d.name != tag]
    for d in doomed:
        (d / COMPLETE).unlink()  # first: a deletion cut short never leaves a "complete" half
        shutil.rmtree(d)
    return doomed


def latest_tag_dir(ckpt_dir: Path) -> Path | None:
    """The folder `latest` names, or None when there is no `latest` at all."""
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    tag_dir = Path(ckpt_dir) / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"{latest} names {tag!r}, which does not exist in {ckpt_dir}; point `latest` at "
                              f"one of the complete checkpoints there or start a new --run-dir")
    return tag_dir


def expected_files(info: dict) -> list[str]:
    """DeepSpeed's files for a pipeline checkpoint of this layout (names as in deepspeed 0.16+)."""
    depth = info["model_config"]["depth"]
    stages, dp = info["pipe_stages"], info["data_parallel"]
    prefix = "bf16_" if info.get("bf16") else ""
    files = [f"layer_{i:02d}-model_states.pt" for i in range(depth + 2)]  # head is tied: no file
    files += [f"mp_rank_{s:02d}_model_states.pt" for s in range(stages)]
    files += [f"{prefix}zero_pp_rank_{r}_mp_rank_{s:02d}_optim_states.pt" for s in range(stages) for r in range(dp)]
    return files


def read_run_info(tag_dir: Path) -> dict | None:
    """lamda_run.json of a checkpoint folder; None for a checkpoint written by another tool."""
    path = tag_dir / RUN_INFO
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the checkpoint is damaged; resume from an earlier "
                              f"one (edit {tag_dir.parent / 'latest'}) or start a new --run-dir") from None


def validate(tag_dir: Path, deep: bool = True) -> dict | None:
    """Checks a checkpoint folder before any process loads it: complete, every file present and,
    with deep=True, every file a readable archive (CRC-checked). Returns its run info."""
    info = read_run_info(tag_dir)
    if info is None:
        return None
    fix = (f"resume from an earlier checkpoint (write its folder name into {tag_dir.parent / 'latest'}) "
           f"or start a new --run-dir")
    if not (tag_dir / COMPLETE).is_file():
        raise CheckpointError(f"{tag_dir} is incomplete (no {COMPLETE} marker: its save was interrupted); {fix}")
    for name in expected_files(info):
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the checkpoint; {fix}")
        if deep:
            try:
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
            except (zipfile.BadZipFile, OSError) as e:
                raise CheckpointError(f"{path} is damaged ({e}); {fix}") from None
            if bad is not None:
                raise CheckpointError(f"{path} is damaged (bad CRC in {bad}); {fix}")
    return info


def to_universal(tag_dir: Path) -> Path:
    """Converts a checkpoint to DeepSpeed's universal format (once; reused afterwards), which a
    run with another pipeline-stage or data-parallel count can load with the optimizer state,
    step count and LR schedule. No processes or GPUs needed; rank 0 calls it."""
    out = tag_dir.parent / f"{tag_dir.name}_universal"
    if (out / COMPLETE).is_file():
        return out
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    if out.exists():
        shutil.rmtree(out)  # an earlier conversion that did not finish
    ds_to_universal.main(Namespace(input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=1,
                                   num_merge_workers=1, keep_temp_folder=False, strict=True,
                                   inject_missing_state=False))
    (out / COMPLETE).write_text("")
    return out
