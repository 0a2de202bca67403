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
from pathlib import Path

from .config import PRESETS, ModelConfig, flops_per_token, get_preset, param_count
from .data import resolve_text_paths
from .ds_config import ConfigError, check_run, default_config_path, fill_run_values, load_config
from .distributed import launch_env, set_cpu_threads

CHECKPOINT_SUBDIR = "checkpoints"
RUN_INFO = "lamda_run.json"  # model config and layout, beside DeepSpeed's files in each checkpoint
SAMPLE_MAX_PARAMS = 2_000_000_000  # above this, gathering the model on rank 0 for a sample is skipped


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Pre-train a LaMDA-style model with DeepSpeed pipeline parallelism. "
                    "Launch with deepspeed, torchrun or srun; the defaults train the `debug` "
                    "preset on the bundled corpus with 2 pipeline stages.")
    p.add_argument("--model", default="debug", choices=sorted(PRESETS), help="model preset")
    p.add_argument("--pipe-stages", type=int, default=2, help="pipeline stages (divides the world size)")
    p.add_argument("--steps", type=int, default=200, help="train until this many optimizer steps in total")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the preset's max)")
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"),
                   help="metrics.jsonl, TensorBoard events, checkpoints/ and data cache go here")
    p.add_argument("--data", default=None,
                   help="a .txt file or a directory of .txt files (documents separated by blank lines); "
                        "default: the bundled corpus")
    p.add_argument("--load", type=Path, default=None,
                   help="resume from the latest checkpoint in this directory (e.g. RUN_DIR/checkpoints)")
    p.add_argument("--save-every", type=int, default=100, help="save a checkpoint every N steps (and at the end)")
    p.add_argument("--eval-every", type=int, default=50, help="validation loss every N steps (0: never)")
    p.add_argument("--eval-iters", type=int, default=2, help="batches per validation")
    p.add_argument("--log-every", type=int, default=10, help="log training metrics every N steps")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--sample-prompt", default="And God said", help="prompt for the sample printed at the end")
    p.add_argument("--sample-tokens", type=int, default=48, help="tokens to sample at the end (0: no sample)")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    import deepspeed
    return deepspeed.add_config_arguments(p)


def preflight(args) -> tuple[ModelConfig, dict, object, list[Path]]:
    """Every check that needs no process group: bad input fails here, before any work."""
    import torch

    cfg = get_preset(args.model)
    if args.seq_len is None:
        args.seq_len = cfg.max_seq_len
    for flag in ("steps", "save_every", "log_every", "eval_iters"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    cuda = torch.cuda.is_available()
    path = args.deepspeed_config or default_config_path(cuda, cuda and torch.cuda.is_bf16_supported())
    ds = load_config(path)
    world = launch_env(args.local_rank).world_size
    batch = check_run(ds, cfg, pipe_stages=args.pipe_stages, world_size=world, seq_len=args.seq_len,
                      cuda_available=cuda)
    ckpt_dir = args.run_dir / CHECKPOINT_SUBDIR
    if args.load is not None:
        check_resume(args.load, args.model, cfg, args.pipe_stages)
    elif (ckpt_dir / "latest").is_file():
        raise ConfigError(f"--run-dir {args.run_dir} already holds checkpoints; to continue that run pass "
                          f"--load {ckpt_dir}, or choose a new --run-dir (nothing was changed)")
    text_paths = resolve_text_paths(args.data)
    args.deepspeed_config = None  # the loaded dict is passed to deepspeed.initialize instead
    return cfg, fill_run_values(ds, steps=args.steps, run_dir=args.run_dir), batch, text_paths


def write_run_info(tag_dir: Path, info: dict) -> None:
    tag_dir.mkdir(parents=True, exist_ok=True)
    tmp = tag_dir / (RUN_INFO + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, tag_dir / RUN_INFO)


def check_resume(load_dir: Path, preset: str, cfg: ModelConfig, pipe_stages: int) -> None:
    """The checkpoint must exist and match the model and stage layout of this run."""
    latest = load_dir / "latest"
    if not latest.is_file():
        raise ConfigError(f"--load {load_dir}: no 'latest' file there, so no checkpoint to resume; "
                          f"point --load at a directory written by a run (RUN_DIR/{CHECKPOINT_SUBDIR})")
    tag_dir = load_dir / latest.read_text().strip()
    if not tag_dir.is_dir():
        raise ConfigError(f"--load {load_dir}: 'latest' names {tag_dir.name}, which does not exist")
    info_path = tag_dir / RUN_INFO
    if not info_path.is_file():
        return  # written by another tool: DeepSpeed's own checks apply
    info = json.loads(info_path.read_text())
    if ModelConfig.from_dict(info["model_config"]) != cfg:
        raise ConfigError(f"--load {tag_dir} holds a different model (preset {info['model_preset']!r}) than "
                          f"--model {preset}; resume with --model {info['model_preset']}")
    if info["pipe_stages"] != pipe_stages:
        raise ConfigError(f"--load {tag_dir} was saved with {info['pipe_stages']} pipeline stages; resume with "
                          f"--pipe-stages {info['pipe_stages']} (changing the stage count on resume is not "
                          f"supported yet)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, ds, batch, text_paths = preflight(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"ds_train.py: error: {e}", file=sys.stderr)
        return 2
    env = launch_env(args.local_rank)
    set_cpu_threads(env.local_world_size)
    return train(args, cfg, ds, batch, text_paths)


def train(args, cfg: ModelConfig, ds: dict, batch, text_paths: list[Path]) -> int:
    import deepspeed
    import torch.distributed as dist

    from .data import MicroBatchStream, prepare_corpus
    from .distributed import init_distributed
    from .metrics import MetricsLogger
    from .pipeline import build_pipeline

    # DeepSpeed's tied-weight broadcast triggers this on the first backward; it is harmless.
    warnings.filterwarnings("ignore", message="c10d::broadcast_: an autograd kernel was not registered")
    init_distributed()
    rank = dist.get_rank()
    args.run_dir.mkdir(parents=True, exist_ok=True)

    # Data: rank 0 tokenizes (or finds the cached result), then everyone reads it.
    data_dir = args.run_dir / "data"
    if rank == 0:
        corpus = prepare_corpus(text_paths, data_dir, cfg.vocab_size)
    dist.barrier()
    if rank != 0:
        corpus = prepare_corpus(text_paths, data_dir, cfg.vocab_size)
    if corpus.vocab_size > cfg.vocab_size:
        raise SystemExit(f"ds_train.py: error: the tokenizer has {corpus.vocab_size} tokens, more than the "
                         f"model's vocab_size {cfg.vocab_size}")

    net = build_pipeline(cfg, args.pipe_stages, args.seed,
                         activation_checkpoint_interval=ds.get("pipeline", {}).get("activation_checkpoint_interval", 0))
    engine, _, _, _ = deepspeed.initialize(
        args=args, model=net, model_parameters=[p for p in net.parameters() if p.requires_grad], config=ds)

    ckpt_dir = args.run_dir / CHECKPOINT_SUBDIR
    if args.load is not None:
        path, _ = engine.load_checkpoint(str(args.load))
        if path is None:
            raise SystemExit(f"ds_train.py: error: could not load a checkpoint from {args.load}")
        if rank == 0:
            print(f"resumed from {path} at step {engine.global_steps}", flush=True)

    dp_rank, dp_size = engine.grid.get_data_parallel_rank(), engine.grid.get_data_parallel_world_size()

    def stream(tokens, shuffle):
        return MicroBatchStream(tokens, args.seq_len, batch.micro_batch_size, dp_rank, dp_size,
                                seed=args.seed, shuffle=shuffle)

    train_stream, val_stream = stream(corpus.train, True), stream(corpus.val, False)
    # Deterministic by micro-batch index: resuming continues with the next unseen micro-batch.
    train_iter = train_stream.iterate(start=engine.global_steps * batch.grad_accum_steps)

    tokens_per_step = batch.global_batch_size * args.seq_len
    logger = MetricsLogger(args.run_dir, enabled=rank == 0, tokens_per_step=tokens_per_step,
                           flops_per_token=flops_per_token(cfg, args.seq_len), monitor=engine.monitor,
                           monitor_writes_loss_scale=engine.fp16_enabled())
    if rank == 0:
        print(f"model {args.model}: {param_count(cfg) / 1e6:.2f}M parameters | {args.pipe_stages} stages x "
              f"{dp_size} data parallel | micro batch {batch.micro_batch_size} x {batch.grad_accum_steps} "
              f"micro-batches x seq {args.seq_len} = {tokens_per_step} tokens/step | "
              f"train {len(corpus.train)} tokens, val {len(corpus.val)}", flush=True)

    def evaluate() -> float:
        it = val_stream.iterate(0)
        losses = [engine.eval_batch(it).item() for _ in range(args.eval_iters)]
        return sum(losses) / len(losses)

    def save() -> None:
        tag = f"global_step{engine.global_steps}"
        info = {"model_preset": args.model, "model_config": cfg.to_dict(), "pipe_stages": args.pipe_stages,
                "data_parallel": dp_size, "seq_len": args.seq_len, "global_steps": engine.global_steps,
                "data_micro_batches": engine.global_steps * batch.grad_accum_steps}
        if rank == 0:  # written before DeepSpeed's files, so `latest` never points at a tag without it
            write_run_info(ckpt_dir / tag, info)
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=info)
        dist.barrier()

    logger.start(engine.global_steps)
    saved_at = engine.global_steps if args.load is not None else None
    t_start = time.perf_counter()
    while engine.global_steps < args.steps:
        loss = engine.train_batch(train_iter)
        step = engine.global_steps
        if step % args.log_every == 0 or step == args.steps:
            scale = engine._get_optimizer_loss_scale() if engine.fp16_enabled() else 1.0
            logger.log_train(step, engine.global_samples, loss.item(), engine.get_lr()[0], float(scale or 1.0))
        if args.eval_every and step % args.eval_every == 0:
            logger.log_eval(step, engine.global_samples, evaluate())
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
            print_sample(ckpt_dir, cfg, corpus, args)
    logger.close()
    dist.barrier()
    return 0


def print_sample(ckpt_dir: Path, cfg: ModelConfig, corpus, args) -> None:
    """Rebuilds the plain model from the checkpoint just written and samples from it."""
    import torch

    from .model import AutoregressiveWrapper
    from .pipeline import load_plain_model

    if param_count(cfg) > SAMPLE_MAX_PARAMS:
        print("sample skipped: the model is too large to gather on one process", flush=True)
        return
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())
    tag = (ckpt_dir / "latest").read_text().strip()
    model = load_plain_model(ckpt_dir / tag, cfg).to(device)
    tok = corpus.load_tokenizer()
    prompt = torch.tensor(tok.encode(args.sample_prompt).ids, dtype=torch.long, device=device)
    torch.manual_seed(args.seed)
    new = AutoregressiveWrapper(model, max_seq_len=cfg.max_seq_len).generate(
        prompt, args.sample_tokens, top_k=40, eos_token=corpus.eot_id)
    print(f"sample: {args.sample_prompt}{tok.decode(new.cpu().tolist())}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
