"""What a run resumes from, decided before any process starts.

``resume_point`` takes the checkpoint a directory offers (the one `latest` names, else the newest
complete one; checkpoint.choose_checkpoint), validates it, and checks it against this run: the
same model, data from the same tokenizer, the same data dirs and weights whichever flags were
given or left out, and whether the layout changed (then the load goes through DeepSpeed's
universal checkpoint). Every refusal is a ConfigError or CheckpointError naming the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .checkpoint import (Layout, ResumePoint, choose_checkpoint, complete_checkpoints, files_to_verify, holds_checkpoints,
                         validate, verify_archives)
from .errors import CheckpointError, ConfigError
from .run_format import TOKENIZER, RunRecord, step_of


def check_same_data(theirs: str | None, ours: str | None, tag_dir: Path, ours_is_demo: bool) -> None:
    """A resume reads the same data the run was trained on, whether --data was given or left out.
    The demo's data lives in its run dir (RUN_DIR/data), which may have moved with the run: the
    bundled corpus and the model's vocabulary (checked) determine it."""
    if theirs is None:
        return  # a record written before the data was recorded
    from .data.loader import is_bundled_data, same_data

    if not ours_is_demo and same_data(theirs, ours):
        return  # the same dirs and weights, whatever they hold (the bundled corpus passed as --data too)
    theirs_demo = is_bundled_data(theirs, tag_dir.parent.parent)
    if ours_is_demo and theirs_demo:
        return
    if ours_is_demo:
        raise ConfigError(f"--load {tag_dir} was trained on --data {theirs}, but this run gives no --data (the bundled "
                          f"corpus); pass --data {theirs}")
    if theirs_demo:
        raise ConfigError(f"--load {tag_dir} was trained on the bundled corpus, but this run gives --data {ours}; "
                          f"leave out --data to continue it, or start a new --run-dir (or --init-from) for new data")
    if not same_data(theirs, ours):
        raise ConfigError(f"--load {tag_dir} was trained on --data {theirs}, not {ours}; pass --data {theirs} "
                          f"(the same dirs and weights), or start a new --run-dir (or --init-from) for new data")


def resume_point(load_dir: Path, *, preset: str, record_template: RunRecord, layout: Layout,
                 legacy_bounds: Callable[[RunRecord], list[int]], demo_data: bool = False, rank: int = 0,
                 world_size: int = 1) -> ResumePoint:
    """Checks the checkpoint to resume in load_dir against this run, before any process starts:
    complete and undamaged (this rank reads its share of the bytes, checkpoint.files_to_verify),
    the same model, the same data (dirs, weights and tokenizer; with
    demo_data the run gives no --data). Without a usable `latest`, the newest complete
    checkpoint is taken (ResumePoint.note says so). legacy_bounds gives the stage bounds of a
    record written before they were recorded."""
    tag_dir, note = choose_checkpoint(Path(load_dir))
    record = validate(tag_dir, deep=False)  # structure on every rank; the bytes below, spread over the ranks
    if record is None:
        return ResumePoint(tag_dir, None, None, False, note)
    if record.model_config != record_template.model_config:
        raise ConfigError(f"--load {tag_dir} holds a different model (preset {record.model_preset!r}) than "
                          f"--model {preset}; resume with --model {record.model_preset}")
    theirs, ours = record.tokenizer_sha256, record_template.tokenizer_sha256
    if theirs and ours and theirs != ours:
        raise ConfigError(f"--load {tag_dir} was trained on data tokenized with another tokenizer "
                          f"(sha256 {theirs[:12]}) than --data ({ours[:12]}); "
                          f"prepare the data with the run's tokenizer ({tag_dir / TOKENIZER})")
    check_same_data(record.data, record_template.data, tag_dir, demo_data)
    if record.document_mask != record_template.document_mask:
        flag = "with --document-mask" if record.document_mask else "without --document-mask"
        raise ConfigError(f"--load {tag_dir} was trained {flag}; resume {flag} (attention within documents changes "
                          f"what the model learns), or start a new --run-dir (or --init-from)")
    bounds = record.stage_bounds if record.stage_bounds is not None else tuple(legacy_bounds(record))
    saved = Layout(record.pipe_stages, record.data_parallel, tuple(bounds))
    # ZeRO-1 keeps each stage's optimizer state as one flat buffer over that stage's layers:
    # another split (stage count, data parallel, or bounds moved by --seq-len or the
    # partitioner) cannot load it directly, only through the universal checkpoint.
    change_layout = saved != layout
    verify_archives(tag_dir, files_to_verify(record, saved.stage_bounds, rank, world_size, change_layout))
    return ResumePoint(tag_dir, record, saved, change_layout, note)


def check_no_overwrite(ckpt_dir: Path, load: Path | None, resumed: Path | None) -> None:
    """A run writes its checkpoints into ckpt_dir (RUN_DIR/checkpoints) at the steps after the one
    it resumes; refuses, before any work, when that would write over complete checkpoints there:
    --load from elsewhere into a run dir that has its own, or a resume behind newer complete
    checkpoints (e.g. `latest` pointed back by hand)."""
    ckpt_dir = Path(ckpt_dir)
    if load is not None and Path(load).resolve() != ckpt_dir.resolve() and holds_checkpoints(ckpt_dir):
        raise CheckpointError(f"--run-dir {ckpt_dir.parent} already holds checkpoints of its own, which continuing "
                              f"--load {load} there would write over; continue {load} in a new --run-dir, or resume "
                              f"this one with --resume auto (nothing was changed)")
    if resumed is None or Path(resumed).parent.resolve() != ckpt_dir.resolve():
        return
    step = step_of(Path(resumed).name)
    newer = [d.name for d in complete_checkpoints(ckpt_dir) if step is not None and step_of(d.name) > step]
    if newer:
        raise CheckpointError(f"{ckpt_dir} holds complete checkpoints newer than {Path(resumed).name}, the one this run "
                              f"resumes from ({', '.join(sorted(newer, key=step_of))}): its next saves would write "
                              f"over them; move them out of {ckpt_dir} to keep them, or point `latest` at the newest "
                              f"(nothing was changed)")


def check_demo_tokenizer(resume: ResumePoint, sources) -> None:
    """The bundled corpus is prepared after start-up (RUN_DIR/data), so a resume without --data
    checks its tokenizer here, on every rank alike: a run trained on other data whose dir has
    moved would otherwise continue on the bundled corpus."""
    theirs = resume.record.tokenizer_sha256 if resume.record is not None else None
    ours = sources[0].meta["tokenizer_sha256"]
    if theirs and theirs != ours:
        raise ConfigError(f"--load {resume.tag_dir} was trained on data tokenized with another tokenizer "
                          f"(sha256 {theirs[:12]}) than the bundled corpus this run gives without --data "
                          f"({ours[:12]}); pass the run's --data ({resume.record.data})")
