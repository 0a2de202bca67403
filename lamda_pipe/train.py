"""The training entry point behind ds_train.py (and the `lamda-train` console script).

Order of work: flags -> RunConfig (checked) -> preflight (everything else that can be checked
without processes: DeepSpeed JSON, world size, data, checkpoints) -> process group -> data ->
pipeline engine -> resume -> the training loop -> sample. With --dry-run: RunConfig -> the plan
of the run (tools/plan.py, plan_run) -> exit.

The loop only calls components (built in components.py); each owns its cadence and state: the
metrics logger (when to log, its own clock), the evaluator (when to validate, the weighted mean
over sources), the checkpointer (when to save, the save protocol, resume and the data position)
and, with --lm-eval, rank 0's background harness evaluations of saved checkpoints
(background_eval.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from .background_eval import BackgroundEval, check_harness
from .checkpoint import Layout, ResumePoint, holds_checkpoints
from .components import (data_streams, demo_sources, loss_scale, make_checkpointer, make_logger, record_template,
                         start_lifecycle)
from .config import ModelConfig
from .data.batches import BatchFormat
from .data.loader import open_sources
from .data.order import CURRENT as ORDER_CURRENT
from .distributed import launch_env, set_cpu_threads
from .ds_config import BatchShape, check_run, default_config_path, fill_run_values, load_config
from .errors import EXIT_BAD_INPUT, EXIT_REQUEUE, CheckpointError, ConfigError, UsageError
from .guard import EXIT_DIVERGED, Diverged, Fault, Guard, check_ds_config, finite_or_nan, settings_for
from .resume import check_demo_tokenizer, check_no_overwrite, resume_point
from .run_config import RunConfig
from .run_format import CHECKPOINTS, ModelPath, resolve_model, tag_for
from .run_report import describe_run, print_sample


@dataclass(frozen=True)
class Plan:
    """Everything decided before any process group starts."""

    run: RunConfig
    model: ModelConfig
    ds: dict  # the DeepSpeed config with the run's values filled in
    batch: BatchShape
    bounds: tuple[int, ...]  # first layer of each stage, then the layer count
    sources: list | None  # None: the bundled demo corpus, prepared after start-up
    resume: ResumePoint | None
    init_from: ModelPath | None
    fmt: BatchFormat  # what the micro-batches carry (data/batches.py), from the data and --document-mask
    data_order: int  # data/order.py's version: a resumed run keeps its own, a new one takes the current


def preflight(run: RunConfig) -> Plan:
    """The checks that need the machine or the files; bad input fails here, before any work."""
    import torch

    from .attention_kernels import check_request
    from .pipeline import LEGACY_PARTITION, check_compile, stage_bounds

    cfg = run.model_config
    cuda = torch.cuda.is_available()
    check_request(run.attention, "cuda" if cuda else "cpu", cfg.dropout)
    if run.compile:
        check_compile("cuda" if cuda else "cpu")  # not at the first step, on every rank
    ds = load_config(run_ds_path(run, cuda))
    check_ds_config(ds)
    env = launch_env(run.local_rank)
    batch = check_run(ds, pipe_stages=run.pipe_stages, world_size=env.world_size, cuda_available=cuda)
    # Checks that read data or checkpoint bytes take this rank's share: a start reads them once in all.
    share = dict(rank=env.rank, world_size=env.world_size)
    sources = None if run.data is None else open_sources(run.data, model_vocab=cfg.vocab_size, seq_len=run.seq_len,
                                                         **share)
    fmt = BatchFormat.for_data([s.kind for s in sources or ()], run.document_mask)
    bounds = tuple(stage_bounds(cfg, run.pipe_stages, run.seq_len, method=run.partition))

    ckpt_dir = run.run_dir / CHECKPOINTS
    # Complete checkpoints count even when `latest` is gone: a new run never starts over on top of them.
    load = ckpt_dir if run.resume == "auto" and holds_checkpoints(ckpt_dir) else run.load
    resume = None
    if load is not None:
        template = record_template(run, cfg, ds, batch, bounds, sources)
        resume = resume_point(load, preset=run.model, record_template=template,
                              layout=Layout(run.pipe_stages, batch.data_parallel, bounds),
                              legacy_bounds=lambda r: stage_bounds(r.model_config, r.pipe_stages,
                                                                   method=LEGACY_PARTITION),
                              demo_data=run.data is None, **share)
    elif holds_checkpoints(ckpt_dir):
        raise ConfigError(f"--run-dir {run.run_dir} already holds checkpoints; to continue that run pass "
                          f"--resume auto (or --load {ckpt_dir}), or choose a new --run-dir (nothing was changed)")
    check_no_overwrite(ckpt_dir, run.load, resume.tag_dir if resume else None)
    # A fine-tuning job that is requeued reruns its command: once the run has a checkpoint, that
    # checkpoint (weights, optimizer, data position) is where it continues, not --init-from.
    init_from = None if run.init_from is None or resume is not None else check_init_source(run.init_from, cfg)
    if run.lm_eval is not None:
        check_harness(run.lm_eval_argv)
    data_order = resume.record.data_order if resume is not None and resume.record is not None else ORDER_CURRENT
    check_writable(run.run_dir)  # last: every refusal above leaves no trace
    return Plan(run, cfg, fill_run_values(ds, steps=run.steps, run_dir=run.run_dir), batch, bounds, sources,
                resume, init_from, fmt, data_order)


def run_ds_path(run: RunConfig, cuda: bool) -> Path:
    """The run's DeepSpeed JSON: --deepspeed_config, else the shipped one for this hardware."""
    import torch

    return run.deepspeed_config or default_config_path(cuda, cuda and torch.cuda.is_bf16_supported())


def check_writable(run_dir: Path) -> None:
    """Refuses a --run-dir that cannot be written (a file on the path, no permission, a read-only
    or full file system) before any process group starts. Probes by creating and removing a
    file in the deepest folder that exists (checkpoints/ if there), so nothing is left behind;
    missing folders are created later by the run."""
    probe_dir = run_dir / CHECKPOINTS
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise CheckpointError(f"--run-dir {run_dir}: {probe_dir} is a file, not a folder; pick another --run-dir")
    probe = probe_dir / f".lamda-write-probe-{os.getpid()}-{launch_env().rank}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)  # a block, so that a full file system shows here
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise CheckpointError(f"--run-dir {run_dir}: cannot write in {probe_dir} ({e.strerror}); pick a "
                              f"writable --run-dir (or free space / fix its permissions)") from None
    finally:
        with contextlib.suppress(OSError):  # nothing was created where writing failed
            probe.unlink()


def check_init_source(path: Path, cfg: ModelConfig) -> ModelPath:
    """--init-from: an export or a checkpoint of the same model."""
    from .export import model_config_at

    source = resolve_model(path)
    saved, _ = model_config_at(source)
    if saved != cfg:
        raise ConfigError(f"--init-from {path} holds a different model ({saved}) than this run's ({cfg}); "
                          f"pick the matching --model")
    return source


def main(argv: list[str] | None = None) -> int:
    from .lifecycle import watch_from_start

    job = watch_from_start()  # before the slow start-up: a launcher that dies meanwhile is noticed
    try:
        run = RunConfig.from_argv(argv)
        if run.dry_run:
            from .tools.plan import plan_run
            return plan_run(run)
        plan = preflight(run)
    except UsageError as e:
        error_line(f"ds_train.py: error: {e}")
        return EXIT_BAD_INPUT
    if plan.resume is not None and launch_env(plan.run.local_rank).rank == 0:
        if plan.resume.note:
            print(f"note: {plan.resume.note}", flush=True)
        if plan.run.init_from is not None:
            print(f"note: resuming from {plan.resume.tag_dir}; --init-from {plan.run.init_from} only starts a run "
                  f"whose --run-dir holds no checkpoint", flush=True)
    set_cpu_threads(launch_env(plan.run.local_rank).local_world_size)
    try:
        status = train(plan, job)
    except UsageError as e:  # found after start-up by every rank alike: a save that could not complete (full
        # disk), or the demo data's tokenizer against the checkpoint's
        error_line(f"ds_train.py: error: {e}")
        status = EXIT_BAD_INPUT
    close_process_groups()
    return status


def error_line(text: str) -> None:
    """One write of the line and its newline: the ranks share the launcher's stderr, and with
    PYTHONUNBUFFERED print() writes the newline separately, so two ranks' lines could run together."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def close_process_groups() -> None:
    """Every rank ended together (finished, stopped on request, diverged, or a failed save): the
    process groups are taken down here, not by the interpreter's exit, where the order in which
    gloo's threads are destroyed is left to chance and can abort the process."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def train(plan: Plan, job=None) -> int:
    """job: lifecycle.watch_from_start()'s record of the launcher chain (default: taken now)."""
    import torch.distributed as dist

    from .distributed import init_distributed

    run, cfg = plan.run, plan.model
    # DeepSpeed's tied-weight broadcast triggers this on the first backward; it is harmless.
    warnings.filterwarnings("ignore", message="c10d::broadcast_: an autograd kernel was not registered")
    init_distributed()
    rank = dist.get_rank()
    run.run_dir.mkdir(parents=True, exist_ok=True)
    sources = plan.sources or demo_sources(run, cfg, rank, dist.barrier)
    if plan.resume is not None and plan.sources is None:
        check_demo_tokenizer(plan.resume, sources)
    engine = build_engine(plan, rank)
    lifecycle = start_lifecycle(plan, engine, rank, job)
    logger = make_logger(plan, engine, rank, dist.get_world_size())
    lm_evals = BackgroundEval(run.run_dir, run.lm_eval_argv, run.lm_eval_every or run.save_every, enabled=rank == 0,
                              report=logger.log_lm_eval, log=lambda msg: print(msg, flush=True))
    checkpointer = make_checkpointer(plan, sources, rank, dist.barrier, lifecycle.progress, lm_evals.pinned)
    checkpointer.resume(engine, plan.resume)
    train_stream, evaluator = data_streams(plan, sources, engine, lifecycle.progress)
    train_iter = train_stream.iterate(slot_offset=checkpointer.samples_consumed(engine.global_steps))
    guard = Guard(settings_for(run, plan.ds), last_skipped=engine.skipped_steps)
    if rank == 0:
        describe_run(plan, sources, evaluator, train_stream)

    logger.start(engine.global_steps)
    t_start = time.perf_counter()
    while engine.global_steps < run.steps:
        loss = engine.train_batch(train_iter)
        step = engine.global_steps
        last_step = step == run.steps
        value = loss.item() if logger.should_log(step, last_step) else None  # the loss is read only here
        if value is not None:
            logger.log_train(step, engine.global_samples, value, engine.get_lr()[0], loss_scale(engine),
                             engine.skipped_steps)
        fault = guard.check(step, engine.skipped_steps, loss_scale(engine), value)
        if fault is None and evaluator.should_evaluate(step):
            logger.log_eval(step, engine.global_samples, *evaluator.evaluate(engine))
            logger.start(step)  # evaluation time is not training throughput
        if fault is None:
            saved, fault = save_or_fault(checkpointer, guard, engine, step, last_step)
            if saved:
                lm_evals.after_save(step, engine.global_samples, checkpointer.dir / tag_for(step), last_step)
                logger.start(step)
        if fault is not None:
            train_iter = heal(fault, guard, checkpointer, engine, train_stream, rank)
            if train_iter is None:
                for component in (lifecycle, lm_evals, logger):
                    component.close()
                return EXIT_DIVERGED
            logger.start(engine.global_steps)
        lm_evals.poll()  # rank 0 reports an evaluation that has ended
        if lifecycle.should_stop(step):  # a signal or a lost launcher on any rank, agreed by all
            break
    checkpointer.save(engine, engine.global_steps, last_step=True)  # no-op when the loop just saved
    lifecycle.close()
    if engine.global_steps < run.steps:  # stopped on request, with a complete checkpoint: requeue me
        lm_evals.close()
        logger.close()
        return EXIT_REQUEUE

    if rank == 0:
        print(f"trained to step {engine.global_steps} in {time.perf_counter() - t_start:.1f}s; "
              f"checkpoints in {checkpointer.dir}", flush=True)
        if run.sample_tokens > 0:
            print_sample(checkpointer.dir, cfg, sources[0], run)
    dist.barrier()
    lm_evals.finish()  # rank 0, after the barrier: the other ranks need not wait for it
    checkpointer.prune()  # what --keep-last spared while an evaluation read it
    logger.close()
    return 0


def save_or_fault(checkpointer, guard: Guard, engine, step: int, last_step: bool):
    """(saved, fault): saves on the checkpointer's cadence; a save refused for non-finite
    weights is a fault to roll back from. A save past every failure resets the rollback count."""
    from .checkpoint import NonFiniteWeights

    try:
        saved = checkpointer.save(engine, step, last_step=last_step)
    except NonFiniteWeights as e:
        return False, Fault(step, str(e))
    if saved:
        guard.saved(step)
    return saved, None


def heal(fault: Fault, guard: Guard, checkpointer, engine, train_stream, rank: int):
    """Rolls back to the last checkpoint, skipping the samples since; returns the training
    batches from there, or None when the run must stop (said on stderr). Every rank alike."""
    if rank == 0:
        print(f"step {fault.step}: {fault.reason}", flush=True)
    try:
        guard.admit(fault)
        checkpointer.rollback(engine, fault.step)
    except (Diverged, CheckpointError) as e:
        if rank == 0:
            error_line(f"ds_train.py: stopped at step {fault.step}: {e}")
        return None
    guard.restart(engine.skipped_steps)
    return train_stream.iterate(slot_offset=checkpointer.samples_consumed(engine.global_steps))


def build_engine(plan: Plan, rank: int):
    """The pipeline, initialised from --init-from's weights if given, wrapped by DeepSpeed."""
    import deepspeed

    from .pipeline import build_pipeline, describe_stages
    from .weights import copy_into_pipeline, read_plain_state

    run, cfg = plan.run, plan.model
    net = build_pipeline(cfg, list(plan.bounds), run.seed, attention=run.attention, fmt=plan.fmt,
                         activation_checkpoint_interval=plan.ds.get("pipeline", {}).get(
                             "activation_checkpoint_interval", 0),
                         compile_seq_len=run.seq_len if run.compile else None)
    if rank == 0:
        if run.compile:
            print("--compile: each block compiled in place with torch.compile (the first steps compile)", flush=True)
        print(f"pipeline stages by --partition {run.partition} (stage bounds {list(plan.bounds)}; training "
              f"FLOPs per token at seq {run.seq_len}):\n{describe_stages(cfg, list(plan.bounds), run.seq_len)}",
              flush=True)
    if plan.init_from is not None:  # new run from trained weights: fresh optimizer, step 0
        copy_into_pipeline(net, read_plain_state(plan.init_from, cfg), cfg.depth)
        if rank == 0:
            print(f"initialised from {plan.init_from.path}", flush=True)
    net.loss_fn = finite_or_nan(net.loss_fn)  # a non-finite loss skips the step (guard.py)
    engine, _, _, _ = deepspeed.initialize(
        model=net, model_parameters=[p for p in net.parameters() if p.requires_grad], config=plan.ds)
    return engine


def cli() -> None:
    """The command (ds_train.py, lamda-train): main(), then the process ends without the
    interpreter's teardown. By then every rank has finished together and closed what it wrote
    (checkpoints, metrics.jsonl, the monitors' files, flushed as written); Python's exit
    handlers still run and the standard streams are flushed. What is skipped is the teardown of
    torch's and DeepSpeed's native state, seconds per process at the end of every job (NCCL's
    destructors are known to hang there). An exception takes the ordinary way out."""
    import atexit

    status = main()
    atexit._run_exitfuncs()  # CPython's own exit-handler runner: what a normal exit calls first
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli()
