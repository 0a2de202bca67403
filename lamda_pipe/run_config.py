"""The flags of ds_train.py as one typed, frozen configuration.

Each field carries its flag's help text and, where the values come from a registry, the
registry itself (presets, partition methods, attention kernels), so the command line, the
defaults and the checks cannot drift apart. ``RunConfig.from_argv`` parses once; every rule
that needs only the flags (and the preset they name) is checked in ``__post_init__``, one
place per rule. Rules that need the machine or the files (GPU present, world size, DeepSpeed
JSON, data dirs, checkpoints) are checked by ``train.preflight``, still before any process
group starts.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .config import PRESETS, ModelConfig, get_preset
from .errors import ConfigError


def _flag(default, help: str, *, type=None, choices=None, metavar=None, name: str | None = None):
    """A field that is also a command-line flag (--field-name unless `name` is given)."""
    return field(default=default, metadata={"help": help, "type": type, "choices": choices, "metavar": metavar,
                                            "name": name})


def _partitions() -> tuple[str, ...]:
    from .pipeline import PARTITIONS  # imports DeepSpeed, as parsing does anyway
    return tuple(PARTITIONS)


def _attention_kernels() -> tuple[str, ...]:
    from .attention_kernels import ATTENTION_CHOICES
    return tuple(ATTENTION_CHOICES)


@dataclass(frozen=True)
class RunConfig:
    model: str = _flag("debug", "model preset (lamda_pipe/config.py)", choices=lambda: tuple(PRESETS))
    pipe_stages: int = _flag(2, "pipeline stages (divides the world size)", type=int)
    partition: str = _flag("flops", "how layers are split into stages: flops (balance training FLOPs per token at "
                           "--seq-len), type:BlockPipe (as many blocks per stage) or uniform (DeepSpeed's)",
                           choices=_partitions)
    steps: int = _flag(200, "train until this many optimizer steps in total", type=int)
    seq_len: int | None = _flag(None, "tokens per sample (default: the preset's max)", type=int)
    run_dir: Path = _flag(Path("runs/demo"), "metrics.jsonl, TensorBoard events, checkpoints/ and data cache go here",
                          type=Path, metavar="DIR")
    data: str | None = _flag(None, "a dir written by lamda-prepare-data, or a mixture 'DIR_A:0.5,DIR_B:0.25'; "
                             "default: the bundled corpus, prepared into RUN_DIR/data", metavar="DIR|MIX")
    vocab_size: int | None = _flag(None, "override the preset's vocabulary size (e.g. to fit an existing tokenizer)",
                                   type=int)
    load: Path | None = _flag(None, "resume from the latest checkpoint in this directory (e.g. RUN_DIR/checkpoints)",
                              type=Path, metavar="DIR")
    resume: str | None = _flag(None, "auto: resume from RUN_DIR/checkpoints if it holds a checkpoint, else start; "
                               "a requeued job just reruns the same command", choices=lambda: ("auto",))
    init_from: Path | None = _flag(None, "start a new run from the weights of a checkpoint (dir) or an export, with "
                                   "a fresh optimizer and step count: the basis of fine-tuning; with --resume auto "
                                   "only while RUN_DIR holds no checkpoint (a requeued job reruns the same command)",
                                   type=Path, metavar="PATH")
    save_every: int = _flag(100, "save a checkpoint every N steps (and at the end)", type=int)
    keep_last: int | None = _flag(None, "keep only the newest N checkpoints", type=int)
    eval_every: int = _flag(50, "validation loss every N steps (0: never)", type=int)
    eval_iters: int = _flag(2, "batches per validation", type=int)
    lm_eval: str | None = _flag(None, "lm-evaluation-harness tasks (comma-separated; demo: the project's own) that rank "
                                "0 runs on saved checkpoints in a background process while training goes on "
                                "(lamda_pipe/background_eval.py; needs the hf extra)", metavar="TASKS")
    lm_eval_every: int | None = _flag(None, "evaluate with --lm-eval the checkpoint of every N-th step, a multiple of "
                                      "--save-every (default: every checkpoint; the last step's always)", type=int)
    lm_eval_args: str = _flag("", "more lamda-eval flags for --lm-eval, one string (e.g. \"--limit 200 --device "
                              "cuda:7\"; default device: cpu)", metavar="FLAGS")
    log_every: int = _flag(10, "log training metrics every N steps", type=int)
    skip_streak: int = _flag(8, "roll back to the last checkpoint after N consecutive steps skipped for a non-finite "
                             "loss or gradient", type=int)
    spike_factor: float = _flag(3.0, "roll back when a logged loss exceeds X times the mean of the last "
                                "--spike-window logged losses (0: off)", type=float, metavar="X")
    spike_window: int = _flag(10, "logged losses in the moving window of --spike-factor", type=int)
    max_rollbacks: int = _flag(3, "stop (exit status 3) after N rollbacks without a checkpoint past the failing step",
                               type=int)
    hang_timeout: float = _flag(1800.0, "seconds without progress (a step, a save phase, a validation batch; armed "
                                "after the first step) before a rank dumps every thread's stack to RUN_DIR/stacks "
                                "and ends the job", type=float, metavar="S")
    stop_timeout: float = _flag(300.0, "seconds a rank may take, after a stop request (SIGTERM, SIGINT, SIGUSR1 or its "
                                "launcher gone), to reach the next step boundary and save before it exits without "
                                "saving", type=float, metavar="S")
    document_mask: bool = _flag(False, "keep attention within each document of plain-text data (a document ends "
                                 "at <|endoftext|>); dialog data is packed with document masks whatever this says",
                                 type=bool)
    seed: int = _flag(1234, "model init, dropout and data order", type=int)
    attention: str = _flag("auto", "attention kernel (lamda_pipe/attention.py): auto picks per device and length",
                           choices=_attention_kernels)
    compile: bool = _flag(False, "compile each transformer block with torch.compile (inductor), in place: the same "
                          "checkpoints with or without it. Expected to pay on CUDA (docs/benchmarks.md, bench/gpu.py); "
                          "not yet measured inside the engine, hence off by default. The first steps take longer "
                          "while the blocks compile; needs a C++ compiler on CPU", type=bool)
    peak_tflops: float | None = _flag(None, "peak TFLOP/s of one device, for the MFU in the logs (default: the bf16 "
                                      "peak of a known GPU: A100, H100, H200; none on CPU)", type=float, metavar="X")
    sample_prompt: str = _flag("And God said", "prompt for the sample printed at the end", metavar="TEXT")
    sample_tokens: int = _flag(48, "tokens to sample at the end (0: no sample)", type=int)
    dry_run: bool = _flag(False, "print the plan of this run (memory per stage, time per step, as lamda-plan) and "
                          "exit, before any process group, run dir or data preparation", type=bool)
    deepspeed_config: Path | None = _flag(None, "DeepSpeed JSON (default: lamda_pipe/ds_configs/ by hardware)",
                                          type=Path, name="--deepspeed_config", metavar="FILE")
    local_rank: int = _flag(-1, "set by the deepspeed launcher", type=int, name="--local_rank")

    def __post_init__(self):
        cfg = self.model_config  # an unknown preset or a bad --vocab-size fails here
        if self.seq_len is None:
            object.__setattr__(self, "seq_len", cfg.max_seq_len)  # resolved once, at construction
        for name in ("steps", "save_every", "log_every", "eval_iters", "skip_streak", "spike_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ConfigError(f"--eval-every must be >= 0 (0: never), got {self.eval_every}")
        self._check_lm_eval()
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(f"--keep-last must be >= 1, got {self.keep_last}")
        if self.max_rollbacks < 0:
            raise ConfigError(f"--max-rollbacks must be >= 0 (0: stop at the first failure), got {self.max_rollbacks}")
        if not self.spike_factor == 0 and not self.spike_factor > 1:
            raise ConfigError(f"--spike-factor must be > 1 (0: off), got {self.spike_factor}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"--peak-tflops must be > 0, got {self.peak_tflops}")
        for name in ("hang_timeout", "stop_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0 seconds, got {getattr(self, name)}")
        if self.sample_tokens < 0:
            raise ConfigError(f"--sample-tokens must be >= 0, got {self.sample_tokens}")
        if not 1 <= self.seq_len <= cfg.max_seq_len:
            raise ConfigError(f"--seq-len {self.seq_len} is outside 1..{cfg.max_seq_len}, the model's maximum; "
                              f"use --seq-len <= {cfg.max_seq_len} or a preset with a longer max_seq_len")
        if self.load is not None and self.resume:
            raise ConfigError("give either --load DIR or --resume auto, not both")
        if self.init_from is not None and self.load is not None:
            raise ConfigError("--init-from starts a new run and --load continues one; give one of them (with "
                              "--resume auto, --init-from is used only while RUN_DIR holds no checkpoint)")
        from .pipeline import check_stage_count
        check_stage_count(cfg, self.pipe_stages)

    def _check_lm_eval(self) -> None:
        if self.lm_eval is None:
            for name in ("lm_eval_every", "lm_eval_args"):
                if getattr(self, name):
                    raise ConfigError(f"--{name.replace('_', '-')} applies to --lm-eval TASKS; add --lm-eval or drop it")
            return
        every = self.lm_eval_every
        if every is not None and (every < 1 or every % self.save_every):
            raise ConfigError(f"--lm-eval-every {every} must be a multiple of --save-every {self.save_every}: it "
                              f"evaluates saved checkpoints")
        self.lm_eval_argv  # bad tasks or flags fail here

    @property
    def lm_eval_argv(self) -> list[str] | None:
        """lamda-eval's flags for each in-training evaluation (background_eval.child_args), None without --lm-eval."""
        from .background_eval import child_args

        return None if self.lm_eval is None else child_args(self.lm_eval, self.lm_eval_args)

    @property
    def model_config(self) -> ModelConfig:
        cfg = get_preset(self.model)
        return cfg if self.vocab_size is None else cfg.replace(vocab_size=self.vocab_size)

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(
            prog="ds_train.py",
            description="Pre-train a LaMDA-style model with DeepSpeed pipeline parallelism. Launch with deepspeed, "
                        "torchrun or srun; the defaults train the `debug` preset on the bundled corpus with 2 "
                        "pipeline stages.")
        for f in dataclasses.fields(cls):
            m = f.metadata
            kwargs = {"default": f.default, "help": m["help"]}
            if m["type"] is bool:  # a switch: present means True
                p.add_argument(m["name"] or f"--{f.name.replace('_', '-')}", dest=f.name, action="store_true",
                               **kwargs)
                continue
            if m["type"] is not None:
                kwargs["type"] = m["type"]
            if m["choices"] is not None:
                kwargs["choices"] = m["choices"]()
            elif m["type"] is int:
                kwargs["metavar"] = "N"
            elif m["metavar"] is not None:
                kwargs["metavar"] = m["metavar"]
            p.add_argument(m["name"] or f"--{f.name.replace('_', '-')}", dest=f.name, **kwargs)
        # DeepSpeed's own launcher conventions (--deepspeed, --deepscale...): accepted, unused.
        p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
        return p

    @classmethod
    def from_argv(cls, argv: list[str] | None = None) -> "RunConfig":
        ns = vars(cls.parser().parse_args(argv))
        ns.pop("deepspeed")
        return cls(**ns)
