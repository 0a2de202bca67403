"""The training entry point behind ds_train.py (and the `lamda-train` console script).

Order of work: parse flags -> check everything that can be checked without processes ->
start the process group -> data -> pipeline engine -> (resume) -> train/eval/save -> sample.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from .config import PRESETS, ModelConfig, flops_per_token, get_preset, param_count
from .attention_kernels import ATTENTION_CHOICES
from .data.loader import open_sources
from .checkpoint import latest_tag_dir, validate
from .errors import EXIT_BAD_INPUT, ConfigError, UsageError
from .ds_config import BatchShape, check_run, default_config_path, fill_run_values, load_config
from .distributed import launch_env, set_cpu_threads

CHECKPOINT_SUBDIR = "checkpoints"
SAMPLE_MAX_PARAMS = 2_000_000_000  # above this, gathering the model on rank 0 for a sample is skipped


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Pre-train a LaMDA-style model with DeepSpeed pipeline parallelism. "
                    "Launch with deepspeed, torchrun or srun; the defaults train the `debug` "
                    "preset on the bundled corpus with 2 pipeline stages.")
    p.add_argument("--model", default="debug", choices=sorted(PRESETS), help="model preset")
    p.add_argument("--pipe-stages", type=int, default=2, help="pipeline stages (divides the world size)")
    p.add_argument("--partition", default="flops", choices=["flops", "type:BlockPipe", "uniform"],
                   help="how layers are split into stages: flops (balance training FLOPs per token at --seq-len), "
                        "type:BlockPipe (as many blocks per stage; the split before flops) or uniform (DeepSpeed's)")
    p.add_argument("--steps", type=int, default=200, help="train until this many optimizer steps in total")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the preset's max)")
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"),
                   help="metrics.jsonl, TensorBoard events, checkpoints/ and data cache go here")
    p.add_argument("--data", default=None,
                   help="a dir written by lamda-prepare-data, or a mixture 'DIR_A:0.5,DIR_B:0.25'; "
                        "default: the bundled corpus, prepared into RUN_DIR/data")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="override the preset's vocabulary size (e.g. to fit an existing tokenizer)")
    p.add_argument("--load", type=Path, default=None,
                   help="resume from the latest checkpoint in this directory (e.g. RUN_DIR/checkpoints)")
    p.add_argument("--resume", choices=["auto"], default=None,
                   help="auto: resume from RUN_DIR/checkpoints if it holds a checkpoint, else start; "
                        "a requeued job just reruns the same command")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start a new run from the weights of a checkpoint (dir) or an export, with a fresh "
                        "optimizer and step count: the basis of fine-tuning")
    p.add_argument("--save-every", type=int, default=100, help="save a checkpoint every N steps (and at the end)")
    p.add_argument("--keep-last", type=int, default=None, help="keep only the newest N checkpoints")
    p.add_argument("--eval-every", type=int, default=50, help="validation loss every N steps (0: never)")
    p.add_argument("--eval-iters", type=int, default=2, help="batches per validation")
    p.add_argument("--log-every", type=int, default=10, help="log training metrics every N steps")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto",
                   help="attention kernel: sdpa (materialised bias), flex (FlexAttention, CUDA, no attention "
                        "dropout) or auto (flex on CUDA from 2048 tokens); see lamda_pipe/attention.py")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s of one device, for the MFU in the logs (default: the bf16 peak of a "
                        "known GPU: A100, H100, H200; none on CPU)")
    p.add_argument("--sample-prompt", default="And God said", help="prompt for the sample printed at the end")
    p.add_argument("--sample-tokens", type=int, default=48, help="tokens to sample at the end (0: no sample)")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    import deepspeed
    return deepspeed.add_config_arguments(p)


@dataclass
class Plan:
    """Everything decided before any process group starts."""

    cfg: ModelConfig
    ds: dict
    batch: BatchShape
    sources: list | None  # None: the bundled demo corpus, prepared after start-up
    resume_dir: Path | None = None  # checkpoint folder to resume from
    resume_info: dict | None = None
    stage_bounds: list[int] | None = None  # first layer of each stage, then the layer count
    change_layout: bool = False  # resume through a universal checkpoint (other stage/DP count or bounds)
    resume_bounds: list[int] | None = None  # the stage bounds the checkpoint was written with


def preflight(args) -> Plan:
    """Every check that needs no process group: bad input fails here, before any work."""
    import torch

    cfg = get_preset(args.model)
    if args.vocab_size is not None:
        cfg = cfg.replace(vocab_size=args.vocab_size)
    if args.seq_len is None:
        args.seq_len = cfg.max_seq_len
    for flag in ("steps", "save_every", "log_every", "eval_iters"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.keep_last is not None and args.keep_last < 1:
        raise ConfigError(f"--keep-last must be >= 1, got {args.keep_last}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise ConfigError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if args.attention == "flex" and cfg.dropout > 0:
        raise ConfigError(f"--attention flex has no attention dropout and the model's dropout is {cfg.dropout}; "
                          f"use --attention auto or sdpa")
    cuda = torch.cuda.is_available()
    if args.attention == "flex" and not cuda:
        raise ConfigError("--attention flex needs a CUDA GPU (torch has no FlexAttention backward on CPU); "
                          "use --attention auto or sdpa")
    path = args.deepspeed_config or default_config_path(cuda, cuda and torch.cuda.is_bf16_supported())
    ds = load_config(path)
    world = launch_env(args.local_rank).world_size
    batch = check_run(ds, cfg, pipe_stages=args.pipe_stages, world_size=world, seq_len=args.seq_len,
                      cuda_available=cuda)
    sources = None
    if args.data is not None:
        sources = open_sources(args.data, model_vocab=cfg.vocab_size, seq_len=args.seq_len)
    from .pipeline import stage_bounds
    plan = Plan(cfg, fill_run_values(ds, steps=args.steps, run_dir=args.run_dir), batch, sources,
                stage_bounds=stage_bounds(cfg, args.pipe_stages, args.seq_len, method=args.partition))

    ckpt_dir = args.run_dir / CHECKPOINT_SUBDIR
    if args.load is not None and args.resume:
        raise ConfigError("give either --load DIR or --resume auto, not both")
    if args.init_from is not None and (args.load is not None or args.resume):
        raise ConfigError("--init-from starts a new run; it cannot be combined with --load or --resume")
    if args.resume == "auto" and (ckpt_dir / "latest").is_file():
        args.load = ckpt_dir
    if args.load is not None:
        plan.resume_dir = latest_tag_dir(args.load)
        if plan.resume_dir is None:
            raise ConfigError(f"--load {args.load}: no 'latest' file there, so no checkpoint to resume; "
                              f"point --load at a directory written by a run (RUN_DIR/{CHECKPOINT_SUBDIR})")
        plan.resume_info = validate(plan.resume_dir)
        if plan.resume_info is not None:
            check_compatible(plan.resume_info, plan.resume_dir, cfg, args.model, sources)
            plan.resume_bounds = recorded_bounds(plan.resume_info)
            # ZeRO-1 keeps each stage's optimizer state as one flat buffer over that stage's layers:
            # another split of the layers (stage count, or bounds moved by --seq-len or the
            # partitioner) cannot load it directly, only through the universal checkpoint.
            plan.change_layout = (plan.resume_info["pipe_stages"], plan.resume_info["data_parallel"],
                                  plan.resume_bounds) != (args.pipe_stages, batch.data_parallel, plan.stage_bounds)
    elif (ckpt_dir / "latest").is_file():
        raise ConfigError(f"--run-dir {args.run_dir} already holds checkpoints; to continue that run pass "
                          f"--resume auto (or --load {ckpt_dir}), or choose a new --run-dir (nothing was changed)")
    if args.init_from is not None:
        check_init_source(args.init_from, cfg)
    args.deepspeed_config = None  # the loaded dict is passed to deepspeed.initialize instead
    return plan


def recorded_bounds(info: dict) -> list[int]:
    """The stage bounds a checkpoint was written with. Checkpoints from before they were
    recorded were all partitioned by DeepSpeed's "type:BlockPipe" (same blocks per stage)."""
    from .pipeline import LEGACY_PARTITION, stage_bounds

    if info.get("stage_bounds") is not None:
        return [int(b) for b in info["stage_bounds"]]
    return stage_bounds(ModelConfig.from_dict(info["model_config"]), info["pipe_stages"], method=LEGACY_PARTITION)


def check_compatible(info: dict, tag_dir: Path, cfg: ModelConfig, preset: str, sources) -> None:
    """The checkpoint must hold this model and have been trained on this tokenizer."""
    if ModelConfig.from_dict(info["model_config"]) != cfg:
        raise ConfigError(f"--load {tag_dir} holds a different model (preset {info['model_preset']!r}) than "
                          f"--model {preset}; resume with --model {info['model_preset']}")
    tok_hash = info.get("tokenizer_sha256")
    if sources and tok_hash and sources[0].meta["tokenizer_sha256"] != tok_hash:
        raise ConfigError(f"--load {tag_dir} was trained on data tokenized with another tokenizer "
                          f"(sha256 {tok_hash[:12]}) than --data ({sources[0].meta['tokenizer_sha256'][:12]}); "
                          f"prepare the data with the run's tokenizer ({tag_dir / 'tokenizer.json'})")


def check_init_source(path: Path, cfg: ModelConfig) -> None:
    """--init-from: an export (config.json + model.safetensors) or a checkpoint of the same model."""
    if (path / "config.json").is_file():
        saved = ModelConfig.from_dict({k: v for k, v in json.loads((path / "config.json").read_text()).items()
                                       if k in ModelConfig.__dataclass_fields__})
    else:
        tag_dir = latest_tag_dir(path / CHECKPOINT_SUBDIR) or latest_tag_dir(path) or path
        info = validate(tag_dir, deep=False)
        if info is None:
            raise ConfigError(f"--init-from {path}: neither an export (config.json) nor a lamda-pipe checkpoint "
                              f"(lamda_run.json); give a run dir, a checkpoint folder or an export dir")
        saved = ModelConfig.from_dict(info["model_config"])
    if saved != cfg:
        raise ConfigError(f"--init-from {path} holds a different model ({saved}) than this run's ({cfg}); "
                          f"pick the matching --model")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = preflight(args)
    except UsageError as e:
        print(f"ds_train.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    env = launch_env(args.local_rank)
    set_cpu_threads(env.local_world_size)
    return train(args, plan)


def train(args, plan: Plan) -> int:
    import deepspeed
    import torch
    import torch.distributed as dist

    from .data.loader import MicroBatchStream, prepare_bundled
    from .distributed import init_distributed
    from .metrics import MetricsLogger, peak_tflops_for
    from .checkpoint import begin_save, commit_save, tag_for, to_universal
    from .pipeline import build_pipeline, describe_stages, load_plain_state, read_plain_state

    cfg, ds, batch, sources = plan.cfg, plan.ds, plan.batch, plan.sources

    # DeepSpeed's tied-weight broadcast triggers this on the first backward; it is harmless.
    warnings.filterwarnings("ignore", message="c10d::broadcast_: an autograd kernel was not registered")
    init_distributed()
    rank = dist.get_rank()
    args.run_dir.mkdir(parents=True, exist_ok=True)

    if sources is None:  # the demo: rank 0 prepares the bundled corpus (or finds it cached)
        data_dir = args.run_dir / "data"
        if rank == 0:
            prepare_bundled(data_dir, cfg.vocab_size)
        dist.barrier()
        sources = open_sources(str(data_dir), model_vocab=cfg.vocab_size, seq_len=args.seq_len)

    net = build_pipeline(cfg, args.pipe_stages, args.seed, attention=args.attention, seq_len=args.seq_len,
                         partition_method=args.partition,
                         activation_checkpoint_interval=ds.get("pipeline", {}).get("activation_checkpoint_interval", 0))
    if list(net.parts) != plan.stage_bounds:  # preflight decided resume conversion on these bounds
        raise SystemExit(f"ds_train.py: error: the pipeline was split {list(net.parts)}, "
                         f"preflight expected {plan.stage_bounds}")
    if rank == 0:
        print(f"pipeline stages by --partition {args.partition} (stage bounds {plan.stage_bounds}; training "
              f"FLOPs per token at seq {args.seq_len}):\n{describe_stages(cfg, plan.stage_bounds, args.seq_len)}",
              flush=True)
    if args.init_from is not None:  # new run from trained weights: fresh optimizer, step 0
        init_dir = args.init_from
        if not (init_dir / "model.safetensors").is_file():
            init_dir = latest_tag_dir(init_dir / CHECKPOINT_SUBDIR) or latest_tag_dir(init_dir) or init_dir
        load_plain_state(net, read_plain_state(init_dir, cfg), cfg.depth)
        if rank == 0:
            print(f"initialised from {init_dir}", flush=True)
    engine, _, _, _ = deepspeed.initialize(
        args=args, model=net, model_parameters=[p for p in net.parameters() if p.requires_grad], config=ds)

    ckpt_dir = args.run_dir / CHECKPOINT_SUBDIR
    tokens_per_step = batch.global_batch_size * args.seq_len
    # Samples consumed before this run's first step: the data position, saved in every checkpoint.
    samples_at_start = 0
    if plan.resume_dir is not None:
        load_dir = plan.resume_dir
        if plan.change_layout:
            if rank == 0:
                info = plan.resume_info
                print(f"converting {load_dir} ({info['pipe_stages']} stages x {info['data_parallel']} data "
                      f"parallel, stage bounds {plan.resume_bounds}) to a universal checkpoint for "
                      f"{args.pipe_stages} x {batch.data_parallel}, stage bounds {plan.stage_bounds}", flush=True)
                to_universal(load_dir)
            dist.barrier()
            load_dir = load_dir.parent / f"{load_dir.name}_universal"
            engine._config.load_universal_checkpoint = True  # for this load only
        path, client_state = engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name)
        engine._config.load_universal_checkpoint = False
        if path is None:
            raise SystemExit(f"ds_train.py: error: could not load a checkpoint from {plan.resume_dir}")
        client_state = client_state or {}
        samples_at_start = client_state.get("samples_consumed", engine.global_steps * batch.global_batch_size)
        # Dropout seeds derive from the count of forward passes (DeepSpeed's per-layer seeding):
        # restoring it makes a resumed run draw the masks the uninterrupted run would have.
        engine.module.micro_offset = client_state.get("micro_offset", 0)
        if rank == 0:
            print(f"resumed from {path} at step {engine.global_steps}, {samples_at_start} samples consumed",
                  flush=True)
    step_at_start = engine.global_steps

    def samples_consumed() -> int:
        return samples_at_start + (engine.global_steps - step_at_start) * batch.global_batch_size

    dp_rank, dp_size = engine.grid.get_data_parallel_rank(), engine.grid.get_data_parallel_world_size()

    def stream(tokens, shuffle, weights=None):
        return MicroBatchStream(tokens, args.seq_len, batch.micro_batch_size, dp_rank, dp_size,
                                seed=args.seed, shuffle=shuffle, weights=weights)

    train_stream = stream([s.tokens("train") for s in sources], True, [s.weight for s in sources])
    train_iter = train_stream.iterate(slot_offset=samples_at_start)
    val_streams = {s.name: (s.weight, stream(s.tokens("val"), False)) for s in sources
                   if len(s.tokens("val")) > args.seq_len}

    peak = args.peak_tflops
    if peak is None and torch.cuda.is_available():
        peak = peak_tflops_for(torch.cuda.get_device_name())
    logger = MetricsLogger(args.run_dir, enabled=rank == 0, tokens_per_step=tokens_per_step,
                           flops_per_token=flops_per_token(cfg, args.seq_len), monitor=engine.monitor,
                           monitor_writes_loss_scale=engine.fp16_enabled(), devices=dist.get_world_size(),
                           peak_tflops=peak)
    if rank == 0:
        mix = ", ".join(f"{s.directory} ({s.weight:.3g}: {len(s.tokens('train')):,} train / "
                        f"{len(s.tokens('val')):,} val tokens)" for s in sources)
        print(f"model {args.model}: {param_count(cfg) / 1e6:.2f}M parameters | {args.pipe_stages} stages x "
              f"{dp_size} data parallel | micro batch {batch.micro_batch_size} x {batch.grad_accum_steps} "
              f"micro-batches x seq {args.seq_len} = {tokens_per_step} tokens/step\ndata: {mix}", flush=True)
        if sources[0].vocab_size < cfg.vocab_size:
            print(f"note: the data's tokenizer has {sources[0].vocab_size} tokens, the model {cfg.vocab_size}: "
                  f"the extra embedding rows are never used", flush=True)
        if not val_streams:
            print("no validation: no data dir has a val split longer than --seq-len", flush=True)

    def evaluate() -> dict[str, float]:
        """Mean loss over the first --eval-iters batches of each source's val split (same every time)."""
        out = {}
        for name, (_, vs) in val_streams.items():
            it = vs.iterate(0)
            out[name] = sum(engine.eval_batch(it).item() for _ in range(args.eval_iters)) / args.eval_iters
        return out

    def save() -> None:
        tag = tag_for(engine.global_steps)
        info = {"model_preset": args.model, "model_config": cfg.to_dict(), "pipe_stages": args.pipe_stages,
                "stage_bounds": plan.stage_bounds, "partition": args.partition, "data_parallel": dp_size,
                "bf16": engine.bfloat16_enabled(), "seq_len": args.seq_len,
                "global_steps": engine.global_steps, "samples_consumed": samples_consumed(),
                "micro_offset": engine.module.micro_offset, "data": args.data or str(args.run_dir / "data"),
                "tokenizer_sha256": sources[0].meta["tokenizer_sha256"], "ds_config": ds}
        if rank == 0:
            begin_save(ckpt_dir / tag, info, sources[0].tokenizer_path)
        dist.barrier()
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=info, save_latest=False)
        dist.barrier()  # every rank has written its files: only now is the checkpoint complete
        if rank == 0:
            for old in commit_save(ckpt_dir, tag, args.keep_last):
                print(f"deleted old checkpoint {old}", flush=True)
        dist.barrier()

    logger.start(engine.global_steps)
    saved_at = engine.global_steps if plan.resume_dir is not None else None
    t_start = time.perf_counter()
    while engine.global_steps < args.steps:
        loss = engine.train_batch(train_iter)
        step = engine.global_steps
        if step % args.log_every == 0 or step == args.steps:
            scale = engine._get_optimizer_loss_scale() if engine.fp16_enabled() else 1.0
            logger.log_train(step, engine.global_samples, loss.item(), engine.get_lr()[0], float(scale or 1.0))
        if args.eval_every and val_streams and step % args.eval_every == 0:
            by_source = evaluate()
            total = sum(val_streams[n][0] for n in by_source)
            mean = sum(val_streams[n][0] * v for n, v in by_source.items()) / total
            logger.log_eval(step, engine.global_samples, mean, by_source if len(by_source) > 1 else None)
            logger.start(step)
        if step % args.save_every == 0 or step == args.steps:
            save()
            saved_at = step
            logger.start(step)
    if saved_at != engine.global_steps:
        save()
    if rank == 0:
        print(f"trained to step {engine.global_steps} in {time.perf_counter() - t_start:.1f}s; "
              f"checkpoints in {ckpt_dir}", flush=True)
        if args.sample_tokens > 0:
            print_sample(ckpt_dir, cfg, sources[0], args)
    logger.close()
    dist.barrier()
    return 0


def print_sample(ckpt_dir: Path, cfg: ModelConfig, source, args) -> None:
    """Rebuilds the plain model from the checkpoint just written and samples from it."""
    import torch

    from .generation import AutoregressiveWrapper
    from .pipeline import load_plain_model

    if param_count(cfg) > SAMPLE_MAX_PARAMS:
        print("sample skipped: the model is too large to gather on one process", flush=True)
        return
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())
    tag = (ckpt_dir / "latest").read_text().strip()
    model = load_plain_model(ckpt_dir / tag, cfg).to(device)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(source.tokenizer_path))
    prompt = torch.tensor(tok.encode(args.sample_prompt).ids, dtype=torch.long, device=device)
    torch.manual_seed(args.seed)
    new = AutoregressiveWrapper(model, max_seq_len=cfg.max_seq_len).generate(
        prompt, args.sample_tokens, top_k=40, eos_token=source.meta["eot_id"])
    print(f"sample: {args.sample_prompt}{tok.decode(new.cpu().tolist())}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
