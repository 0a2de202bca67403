"""The training loop's components, built from the run's Plan (train.py): the run record the
checkpointer fills in, the lifecycle (signals, watchdog), the demo data, the checkpointer, the
training stream and the evaluator, and the metrics logger."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import ModelConfig
from .data.loader import open_sources
from .data.order import CURRENT as ORDER_CURRENT
from .ds_config import BatchShape
from .guard import weights_finite
from .run_config import RunConfig
from .run_format import CHECKPOINTS, RunRecord

if TYPE_CHECKING:
    from .train import Plan


def record_template(run: RunConfig, cfg: ModelConfig, ds: dict, batch: BatchShape, bounds, sources,
                    data_order: int = ORDER_CURRENT) -> RunRecord:
    """This run's record with the step fields zero; the checkpointer fills them in at each save."""
    return RunRecord(model_preset=run.model, model_config=cfg, pipe_stages=run.pipe_stages,
                     data_parallel=batch.data_parallel, global_steps=0, samples_consumed=0,
                     stage_bounds=tuple(bounds), partition=run.partition,
                     bf16=bool(ds.get("bf16", {}).get("enabled", False)), seq_len=run.seq_len,
                     data=run.data or str(run.run_dir / "data"),
                     tokenizer_sha256=sources[0].meta["tokenizer_sha256"] if sources else None, ds_config=ds,
                     dialog=dialog_record(sources), document_mask=run.document_mask, data_order=data_order)


def dialog_record(sources) -> dict | None:
    """The run record's `dialog`: the attributes the dialog data teaches the model to rate."""
    attributes = sorted({a for s in sources or () for a in s.attributes})
    return {"attributes": attributes} if attributes else None


def start_lifecycle(plan: Plan, engine, rank: int, job=None):
    """Stop requests, the launcher watch and the hang watchdog (lamda_pipe/lifecycle.py), with a
    gloo group of its own: the per-step stop agreement is a CPU all-reduce, never a device sync."""
    import torch.distributed as dist

    from .lifecycle import Lifecycle

    group = dist.new_group(backend="gloo")
    return Lifecycle(plan.run.run_dir, rank, engine.stage_id, hang_timeout=plan.run.hang_timeout,
                     stop_timeout=plan.run.stop_timeout, group=group,
                     log=lambda msg: print(msg, flush=True), job=job).start()


def demo_sources(run: RunConfig, cfg: ModelConfig, rank: int, barrier) -> list:
    """The demo's data: rank 0 prepares the bundled corpus into RUN_DIR/data (or finds it cached)."""
    from .data.loader import prepare_bundled

    data_dir = run.run_dir / "data"
    if rank == 0:
        prepare_bundled(data_dir, cfg.vocab_size)
    barrier()
    return open_sources(str(data_dir), model_vocab=cfg.vocab_size, seq_len=run.seq_len)


def make_checkpointer(plan: Plan, sources, rank: int, barrier, progress, pinned=set):
    from .checkpoint import Checkpointer

    run = plan.run
    record = record_template(run, plan.model, plan.ds, plan.batch, plan.bounds, sources, plan.data_order)
    return Checkpointer(run.run_dir / CHECKPOINTS, every=run.save_every, keep_last=run.keep_last,
                        global_batch=plan.batch.global_batch_size, record=record,
                        tokenizer=sources[0].tokenizer_path, rank=rank, barrier=barrier,
                        log=lambda msg: print(msg, flush=True), weights_finite=weights_finite, progress=progress,
                        pinned=pinned)


def data_streams(plan: Plan, sources, engine, progress=lambda: None):
    """The training stream (batches from a data position: .iterate(slot_offset=...)) and the
    evaluator over the val splits (progress: called after each validation batch)."""
    from .data.loader import MicroBatchStream
    from .evaluate import Evaluator

    run, batch = plan.run, plan.batch
    dp_rank, dp_size = engine.grid.get_data_parallel_rank(), engine.grid.get_data_parallel_world_size()

    def stream(splits, shuffle, weights=None):
        return MicroBatchStream(splits, run.seq_len, batch.micro_batch_size, dp_rank, dp_size, seed=run.seed,
                                shuffle=shuffle, weights=weights, fmt=plan.fmt, accum=batch.grad_accum_steps,
                                order=plan.data_order)

    def split(source, name):
        return source.split(name, document_mask=run.document_mask)

    train_stream = stream([split(s, "train") for s in sources], True, [s.weight for s in sources])
    val_streams = {s.name: (s.weight, stream([split(s, "val")], False)) for s in sources if has_val(s, run.seq_len)}
    return train_stream, Evaluator(val_streams, every=run.eval_every, iters=run.eval_iters, progress=progress)


def has_val(source, seq_len: int) -> bool:
    """Whether a source's val split gives at least one row: a dialog example, or seq_len + 1 tokens."""
    if source.kind == "dialog":
        return source.meta["splits"]["val"]["examples"] > 0
    return len(source.tokens("val")) > seq_len


def make_logger(plan: Plan, engine, rank: int, world_size: int):
    import torch

    from .config import flops_per_token
    from .metrics import MetricsLogger, peak_tflops_for, run_sinks

    run = plan.run
    peak = run.peak_tflops
    if peak is None and torch.cuda.is_available():
        peak = peak_tflops_for(torch.cuda.get_device_name())
    return MetricsLogger(run_sinks(run.run_dir, enabled=rank == 0, monitor=engine.monitor),
                         tokens_per_step=plan.batch.global_batch_size * run.seq_len,
                         flops_per_token=flops_per_token(plan.model, run.seq_len),
                         monitor_writes_loss_scale=engine.fp16_enabled(), devices=world_size, peak_tflops=peak,
                         log_every=run.log_every,
                         peak_memory=torch.cuda.max_memory_allocated if torch.cuda.is_available() else None)


def loss_scale(engine) -> float:
    scale = engine._get_optimizer_loss_scale() if engine.fp16_enabled() else 1.0  # DeepSpeed has no public getter
    return float(scale or 1.0)
