"""Checkpoints you can trust: atomic saves, validation before loading, keep-last-N, resume.

A checkpoint directory (RUN_DIR/checkpoints; names in run_format.py) holds one folder per save,
named by step, and a file `latest` naming the newest *complete* one. A save is complete when
every rank has written its DeepSpeed files; only then does rank 0 write the marker
`lamda_complete` into the folder and replace `latest` (write to a temporary name, then rename).
A save killed half-way therefore leaves a folder without the marker that `latest` never points
to and nothing ever loads. Beside DeepSpeed's files each folder holds the run record
(lamda_run.json) and tokenizer.json, so a checkpoint describes itself.

``Checkpointer`` owns this for a training run: when to save (every N steps and the last step),
the save protocol (begin -> barrier -> DeepSpeed -> barrier -> commit -> keep-last), the resume
(through DeepSpeed's universal checkpoint when the layout changed) and the data position, which
is the one number a resumed run needs to continue with the next unseen sample. What a run
resumes from, and whether it may, is decided before any process starts (resume.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection

from .errors import CheckpointError, ConfigError
from .run_format import (COMPLETE, LATEST, RUN_RECORD, TOKENIZER, UNIVERSAL_SUFFIX, RunRecord,
                         complete_checkpoints, read_latest, tag_for)


class NonFiniteWeights(RuntimeError):
    """A save was refused: some rank holds non-finite weights. Nothing was written."""

    def __init__(self, step: int):
        super().__init__("the weights are not finite on some rank; no checkpoint was written")
        self.step = step


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def begin_save(tag_dir: Path, record: RunRecord, tokenizer: Path) -> None:
    """Rank 0, before DeepSpeed writes: the self-description, and no stale completion marker
    (the folder may hold a save of the same step that was killed half-way)."""
    tag_dir.mkdir(parents=True, exist_ok=True)
    (tag_dir / COMPLETE).unlink(missing_ok=True)
    shutil.copyfile(tokenizer, tag_dir / TOKENIZER)
    write_atomic(tag_dir / RUN_RECORD, record.to_json())


def commit_save(ckpt_dir: Path, tag: str, keep_last: int | None, pinned: Collection[str] = ()) -> list[Path]:
    """Rank 0, after a barrier that follows every rank's writes: mark complete, move `latest`,
    then prune. Returns what was deleted."""
    (ckpt_dir / tag / COMPLETE).write_text("")
    write_atomic(ckpt_dir / LATEST, tag)
    return prune_checkpoints(ckpt_dir, keep_last, pinned)


def prune_checkpoints(ckpt_dir: Path, keep_last: int | None, pinned: Collection[str] = ()) -> list[Path]:
    """Rank 0: deletes the complete checkpoints older than the newest `keep_last`, but not
    `latest`'s nor the `pinned` tags (being read: an in-training evaluation), which a later
    prune deletes. Returns what was deleted, oldest first."""
    if not keep_last:
        return []
    keep = set(pinned) | {read_latest(ckpt_dir)}
    doomed = [d for d in reversed(complete_checkpoints(ckpt_dir)[keep_last:]) if d.name not in keep]
    for d in doomed:
        (d / COMPLETE).unlink()  # first: a deletion cut short never leaves a "complete" half
        shutil.rmtree(d)
    return doomed


@contextlib.contextmanager
def write_errors_recorded(engine, failures: list):
    """While DeepSpeed saves: a failed write on this rank (OSError, or torch.save's RuntimeError,
    e.g. 'basic_ios::clear: iostream error' on a full disk) is appended to `failures` and the
    rank's remaining writes are skipped, instead of raising out of save_checkpoint, which would
    leave the other ranks waiting in DeepSpeed's closing barrier."""
    def guarded(write):
        def call(*args, **kwargs):
            if failures:
                return None
            try:
                return write(*args, **kwargs)
            except (OSError, RuntimeError) as e:
                failures.append(e)
                return None
        return call

    ckpt_engine = engine.checkpoint_engine
    saved = ckpt_engine.save, engine._copy_recovery_script  # every file DeepSpeed 0.16-0.19 writes
    ckpt_engine.save, engine._copy_recovery_script = guarded(saved[0]), guarded(saved[1])
    try:
        yield
    finally:
        ckpt_engine.save, engine._copy_recovery_script = saved


def discard_unfinished(ckpt_dir: Path, tag: str) -> None:
    """Rank 0, after a failed save: the folder goes (freeing what it took) unless `latest` names it."""
    if read_latest(ckpt_dir) == tag:
        return
    (ckpt_dir / tag / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def save_failure(ckpt_dir: Path, step: int, failures: list) -> str:
    """One line: why the save at `step` failed, and that the previous checkpoint is intact."""
    if failures:
        e = failures[0]
        full = getattr(e, "errno", None) == errno.ENOSPC or _free_bytes(ckpt_dir) < 1 << 20
        cause = (f"the disk holding {ckpt_dir} is full ({_free_bytes(ckpt_dir) / 2**20:.1f} MiB free)" if full
                 else f"writing it failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    else:
        cause = "another rank could not write its part (its log says why: a full disk, most likely)"
    previous = read_latest(ckpt_dir)
    if previous == tag_for(step):  # only keep-last's deletion of older checkpoints failed
        return (f"the checkpoint at step {step} is complete and `latest` names it, but deleting older checkpoints "
                f"failed: {cause}; delete them yourself and rerun with --resume auto")
    kept = (f"the previous checkpoint {previous} and `latest` are intact" if previous
            else "no earlier checkpoint exists")
    return (f"the checkpoint at step {step} was not completed (removed): {cause}; {kept}; free space (or pass "
            f"--keep-last N) and rerun with --resume auto")


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62


def validate(tag_dir: Path, deep: bool = True) -> RunRecord | None:
    """Checks a checkpoint folder before any process loads it: complete, every file present and,
    with deep=True, every file a readable archive (CRC-checked). Returns its run record (None for
    a checkpoint without one, written by another tool). A multi-rank start checks structure with
    deep=False on every rank and spreads the byte-level check: verify_archives(files_to_verify())."""
    record = RunRecord.read(tag_dir)
    if record is None:
        return None
    if not (tag_dir / COMPLETE).is_file():
        raise CheckpointError(f"{tag_dir} is incomplete (no {COMPLETE} marker: its save was interrupted); "
                              f"{_resume_fix(tag_dir)}")
    for name in record.expected_files():
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the checkpoint; {_resume_fix(tag_dir)}")
    if deep:
        verify_archives(tag_dir, record.expected_files())
    return record


def _resume_fix(tag_dir: Path) -> str:
    return (f"resume from an earlier checkpoint (write its folder name into {tag_dir.parent / LATEST}) "
            f"or start a new --run-dir")


def verify_archives(tag_dir: Path, names: list[str]) -> None:
    """Reads every byte of these files of a checkpoint and checks each archive member's CRC, so
    that a damaged file is named before DeepSpeed unpickles it (deep in its load, as an
    unreadable pickle or a size mismatch)."""
    for name in names:
        path = tag_dir / name
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{path} is damaged ({e}); {_resume_fix(tag_dir)}") from None
        if bad is not None:
            raise CheckpointError(f"{path} is damaged (bad CRC in {bad}); {_resume_fix(tag_dir)}")


def files_to_verify(record: RunRecord, bounds: tuple[int, ...], rank: int, world_size: int,
                    change_layout: bool) -> list[str]:
    """This rank's share of the byte-level check, so that a start reads the checkpoint once in
    all, not once per rank. Ranks are numbered stage-major (rank = stage * D + replica, as
    DeepSpeed's pipeline topology does): each checks its own optimizer shard, and the files that
    all D replicas of its stage load are dealt out among them. Every file falls to exactly one
    rank. A run that changes the layout loads through the universal conversion, which rank 0
    runs over every file: rank 0 checks them all first."""
    if change_layout or world_size != record.pipe_stages * record.data_parallel:
        return record.expected_files() if rank == 0 else []
    stage, replica = divmod(rank, record.data_parallel)
    return (record.stage_files(stage, bounds)[replica::record.data_parallel]
            + [record.optimizer_file(stage, replica)])


def to_universal(tag_dir: Path) -> Path:
    """Converts a checkpoint to DeepSpeed's universal format (once; reused afterwards), which a
    run with another pipeline-stage or data-parallel count can load with the optimizer state,
    step count and LR schedule. No processes or GPUs needed; rank 0 calls it."""
    out = tag_dir.parent / f"{tag_dir.name}{UNIVERSAL_SUFFIX}"
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


@dataclass(frozen=True)
class Layout:
    """How a run is split: what a checkpoint's ZeRO-1 optimizer state is tied to."""

    pipe_stages: int
    data_parallel: int
    stage_bounds: tuple[int, ...]


@dataclass(frozen=True)
class ResumePoint:
    tag_dir: Path
    record: RunRecord | None  # None: a checkpoint another tool wrote (loaded as is, unchecked)
    saved_layout: Layout | None
    change_layout: bool  # load through the universal checkpoint
    note: str | None = None  # why this is not the checkpoint `latest` names, to print at start-up


def holds_checkpoints(ckpt_dir: Path) -> bool:
    """Whether a run wrote anything here that a new run must not start over on top of."""
    return (Path(ckpt_dir) / LATEST).is_file() or bool(complete_checkpoints(ckpt_dir))


def unusable_latest(ckpt_dir: Path) -> str | None:
    """Why `latest` cannot be followed (missing, empty, naming a missing or incomplete folder),
    or None when it names a completed checkpoint."""
    latest = Path(ckpt_dir) / LATEST
    tag = read_latest(ckpt_dir)
    if tag is None:
        return f"{latest} is missing"
    if not tag:
        return f"{latest} is empty"
    if not (Path(ckpt_dir) / tag).is_dir():
        return f"{latest} names {tag!r}, which is not a folder there"
    if not (Path(ckpt_dir) / tag / COMPLETE).is_file():
        return f"{latest} names {tag!r}, whose save never completed"
    return None


def choose_checkpoint(ckpt_dir: Path) -> tuple[Path, str | None]:
    """The folder to resume from: the one `latest` names, or, when `latest` is unusable, the
    newest complete step folder that validates (with a note saying so). A complete folder that
    `latest` names but that is damaged is refused by validate(), never silently skipped."""
    why = unusable_latest(ckpt_dir)
    if why is None:
        return Path(ckpt_dir) / read_latest(ckpt_dir), None
    rejected = []
    for tag_dir in complete_checkpoints(ckpt_dir):
        try:
            validate(tag_dir, deep=False)
        except CheckpointError as e:
            rejected.append(str(e).split(";")[0])
            continue
        skipped = f" (skipped: {'; '.join(rejected)})" if rejected else ""
        return tag_dir, f"{why}: resuming from the newest complete checkpoint, {tag_dir.name}{skipped}"
    if rejected:
        raise CheckpointError(f"{why} and no complete checkpoint in {ckpt_dir} is usable ({'; '.join(rejected)}); "
                              f"start a new --run-dir")
    raise ConfigError(f"--load {ckpt_dir}: no '{LATEST}' file and no complete checkpoint there, so nothing to "
                      f"resume; point --load at a directory written by a run (RUN_DIR/checkpoints)")


class Checkpointer:
    """The checkpoints of one training run, on every rank (rank 0 writes the markers)."""

    def __init__(self, ckpt_dir: Path, *, every: int, keep_last: int | None, global_batch: int,
                 record: RunRecord, tokenizer: Path, rank: int, barrier: Callable[[], None],
                 log: Callable[[str], None] = print, weights_finite: Callable[[object], bool] | None = None,
                 progress: Callable[[], None] = lambda: None, pinned: Callable[[], Collection[str]] = set):
        """record: this run's record with its step fields unset; filled in at every save.
        weights_finite(engine): collective, the same answer on every rank; a save of weights it
        rejects raises NonFiniteWeights before anything is written. progress: called after each
        save phase (the hang watchdog's sign of life). pinned(): tags --keep-last must not delete
        yet (rank 0: BackgroundEval.pinned)."""
        self.dir = Path(ckpt_dir)
        self.every, self.keep_last = every, keep_last
        self.global_batch = global_batch
        self.record, self.tokenizer = record, tokenizer
        self.rank, self.barrier, self.log = rank, barrier, log
        self.weights_finite, self.progress, self.pinned = weights_finite, progress, pinned
        self._start = (0, 0)  # (step, samples consumed) where this process started
        self._saved_at: int | None = None

    # The data position: samples consumed before this process plus one global batch per step since.
    def samples_consumed(self, step: int) -> int:
        step0, samples0 = self._start
        return samples0 + (step - step0) * self.global_batch

    def should_save(self, step: int, last_step: bool = False) -> bool:
        if step == self._saved_at:
            return False  # already saved at this step (e.g. a resume at the last step)
        return last_step or step % self.every == 0

    def save(self, engine, step: int, last_step: bool = False) -> bool:
        """Saves if the cadence says so; returns whether it did. Collective: call on every rank."""
        if not self.should_save(step, last_step):
            return False
        self._write(engine, step)
        self._saved_at = step
        return True

    def _write(self, engine, step: int) -> None:
        """begin -> every rank writes -> commit, each phase ending with every rank agreeing that it
        succeeded (an all-reduce, where a barrier would do): a rank whose write failed (a full
        disk) makes all of them stop together, none waits in a barrier for it, and nothing is
        marked complete. Raises CheckpointError saying what was kept."""
        if self.weights_finite is not None and not self.weights_finite(engine):
            raise NonFiniteWeights(step)  # never written, never complete, so keep-last deletes nothing
        tag = tag_for(step)
        record = dataclasses.replace(self.record, global_steps=step, samples_consumed=self.samples_consumed(step),
                                     micro_offset=engine.module.micro_offset)
        failures: list[BaseException] = []
        if self.rank == 0:
            try:
                begin_save(self.dir / tag, record, self.tokenizer)
            except OSError as e:
                failures.append(e)
        if self._all_ok(not failures):
            with write_errors_recorded(engine, failures):
                engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)  # the record is ours, above
        # every rank has written its files: only now is the checkpoint complete
        ok = self._all_ok(not failures)
        if ok and self.rank == 0:
            try:
                for old in commit_save(self.dir, tag, self.keep_last, self.pinned()):
                    self.log(f"deleted old checkpoint {old}")
            except OSError as e:
                failures.append(e)
        if not self._all_ok(ok and not failures):
            message = save_failure(self.dir, step, failures)
            if self.rank == 0:
                discard_unfinished(self.dir, tag)
            raise CheckpointError(message)

    def prune(self) -> None:
        """Rank 0: --keep-last once more, for checkpoints it spared while pinned (the end of a run)."""
        if self.rank == 0:
            for old in prune_checkpoints(self.dir, self.keep_last, self.pinned()):
                self.log(f"deleted old checkpoint {old}")

    def _all_ok(self, ok: bool) -> bool:
        """Whether every rank says ok: an all-reduce (MIN) of one flag, a barrier in one process."""
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            self.barrier()
        else:
            from deepspeed.accelerator import get_accelerator

            flag = torch.tensor([int(ok)], dtype=torch.int32, device=get_accelerator().current_device_name())
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = bool(flag.item())
        self.progress()  # a phase every rank finished
        return ok

    def resumed_at(self, step: int, samples_consumed: int) -> None:
        """Where the loaded checkpoint left off: the data position, and a save that exists."""
        self._start = (step, samples_consumed)
        self._saved_at = step

    def resume(self, engine, point: ResumePoint | None) -> None:
        """Loads `point` into the engine (converting it first if the layout changed) and restores
        the data position and the dropout-seed counter. Collective: call on every rank."""
        step = engine.global_steps
        if point is None:
            self._start = (step, 0)
            return
        load_dir = point.tag_dir
        if point.change_layout:
            if self.rank == 0:
                s = point.saved_layout
                self.log(f"converting {load_dir} ({s.pipe_stages} stages x {s.data_parallel} data parallel, "
                         f"stage bounds {list(s.stage_bounds)}) to a universal checkpoint for "
                         f"{self.record.pipe_stages} x {self.record.data_parallel}, stage bounds "
                         f"{list(self.record.stage_bounds)}")
                to_universal(load_dir)
            self.barrier()
            load_dir = load_dir.parent / f"{load_dir.name}{UNIVERSAL_SUFFIX}"
        # DeepSpeed reads the universal switch from its config at load time; it must be on for
        # this load only (a later ordinary checkpoint of this run loads without it).
        engine._config.load_universal_checkpoint = point.change_layout
        try:
            path, _ = engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name)
        finally:
            engine._config.load_universal_checkpoint = False
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load a checkpoint from {point.tag_dir}")
        step = engine.global_steps
        # A checkpoint without our record (another tool's) can only be assumed to have read
        # one global batch per step from the start, with the default dropout-seed counter.
        samples = point.record.samples_consumed if point.record else step * self.global_batch
        # Dropout seeds derive from the count of forward passes (DeepSpeed's per-layer seeding):
        # restoring it makes a resumed run draw the masks the uninterrupted run would have.
        engine.module.micro_offset = point.record.micro_offset if point.record else 0
        if point.record:
            self.record = dataclasses.replace(self.record, skipped_samples=point.record.skipped_samples)
        self.resumed_at(step, samples)
        if self.rank == 0:
            self.log(f"resumed from {path} at step {step}, {samples} samples consumed")

    def rollback(self, engine, failed_step: int) -> tuple[int, int]:
        """Reloads the checkpoint `latest` names and skips every sample consumed from it up to
        and including failed_step: returns that range [start, end). The range goes into the
        reloaded checkpoint's record (rewritten atomically, its data position moved to `end`)
        and into every later save, so a resume from either continues past it, as this run does.
        Collective: call on every rank. Raises CheckpointError when there is no checkpoint."""
        tag_dir = choose_checkpoint(self.dir)[0] if holds_checkpoints(self.dir) else None
        record = None if tag_dir is None else RunRecord.read(tag_dir)
        if record is None:
            raise CheckpointError(f"no checkpoint of this run in {self.dir} to roll back to; save more often "
                                  f"(--save-every) or fix the cause (learning rate, warmup, data)")
        skip = (record.samples_consumed, self.samples_consumed(failed_step))
        record = dataclasses.replace(record, samples_consumed=skip[1],
                                     skipped_samples=(*record.skipped_samples, skip))
        self.barrier()  # every rank has read the old record
        if self.rank == 0:
            write_atomic(tag_dir / RUN_RECORD, record.to_json())
        # A run resumed onto another layout may roll back to a checkpoint of the old one: resume
        # handles that (through the universal checkpoint), the data position and dropout seeds.
        layout = Layout(record.pipe_stages, record.data_parallel, tuple(record.stage_bounds or ()))
        ours = Layout(self.record.pipe_stages, self.record.data_parallel, tuple(self.record.stage_bounds or ()))
        skipped_steps = engine.skipped_steps  # the count covers the whole run, rolled-back steps too
        self.resume(engine, ResumePoint(tag_dir, record, layout, layout != ours))
        engine.skipped_steps = skipped_steps
        if self.rank == 0:
            self.log(f"rolled back from step {failed_step} to {tag_dir.name}; samples {skip[0]}-{skip[1] - 1} "
                     f"will not be trained on")
        self.barrier()
        return skip
