"""The dry-run planner: memory per pipeline stage, time per step, and the layouts that fit,
computed from the shapes alone (no parameter, no process, no device).

Used by `lamda-plan` (lamda_pipe/tools/plan.py) and by `ds_train.py --dry-run`, which plans
exactly the run it was given. Parameters come from config.block_param_count / param_count and
the split from pipeline.stage_bounds (the partition the trainer uses); FLOPs from
pipeline.layer_flops, whose sum is config.flops_per_token.

Memory of one stage (bytes; w = bytes of a weight, gradient and activation: 4 in fp32, 2 in
bf16/fp16; n = the stage's parameters; D = data-parallel replicas), in DeepSpeed 0.19.8's
ZeRO-1 with the pipeline engine:

  between steps (held for the whole run)
    weights            w * n       the module's parameters (flattened into ZeRO's buffer)
    optimizer state    12 * n / D  fp32 master copy (a clone even in fp32), exp_avg and
                                   exp_avg_sq, each sharded over the D replicas
    pipe buffers       DeepSpeed keeps max(2, k) slots of stage inputs and outputs (k, the
                       micro-batches in flight, below) and they still hold the last step's
                       tensors: outputs are (b, T, dim) hidden states, on the last stage the
                       logits (b, T, vocab); inputs are received hidden states (stage > 0),
                       plus one receive buffer and one gradient buffer of (b, T, dim)
    position caches    T^2 bucket indices (int64) and the causal mask (bool), once per stage;
                       cpu_flash also keeps an (H, T, T) bias matrix per block
  inside a step, on top
    gradients          w * n       param.grad, accumulated over the m micro-batches
    activations        k = min(P - s, m) micro-batches in flight on stage s under 1F1B, each
                       holding what autograd saved (block_activations) or, for a run of
                       blocks under activation checkpointing (checkpointed_runs), the run's
                       input; on the last stage also the
                       final norm's and the loss' fp32 log-softmax
    backward workspace the larger of: a block's backward (the run of blocks recomputed, with
                       checkpointing, and the feed-forward's input gradients) and, on the last
                       stage, the loss' two fp32 (b, T, vocab) gradients
    gradient reduction w * min(n, reduce_bucket_size): the gradients flattened into one
                       bucket for the data-parallel all-reduce (done at D = 1 too)
    optimizer step     4 * n / D   the fp32 gradient partition ZeRO builds for the step (from
                       a flattened copy of the w-byte gradients when w < 4); these two come
                       after the last backward, while the gradients still exist
    reduce buckets     2 * reduce_bucket_size fp32 elements with contiguous_gradients (one
                       in setup_buckets, one in reduce_gradients); the shipped configs turn it off

The tied embedding sits on both end stages with its gradient and optimizer state.
Step time: the slowest stage's FLOPs per micro-batch (recomputed forwards included) at a
stated MFU of the device's peak, times (m + P - 1) micro-batch slots of 1F1B.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

from .config import ModelConfig, block_param_count, flops_per_token
from .errors import ConfigError

GiB = 1024 ** 3

# What this project measured: lamda-2b, one H200, per-block torch.compile with flex attention,
# bf16: 513.9 TFLOP/s of 989.4 (docs/results/gpu-h200-2026-11-28.json, variant compiled-flex).
MEASURED_MFU = 0.519
MEASURED_MFU_SOURCE = "lamda-2b on one H200, compiled + flex (docs/results/gpu-h200-2026-11-28.json)"

# Memory the framework cannot use on a GPU: the CUDA context and the allocator's slack.
GPU_RESERVED_GIB = 1.0


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    peak_tflops: float | None  # dense bf16/fp16; None: a CPU, no stated peak
    kind: str  # "cuda", "cpu" or "tpu": which attention kernel the plan assumes


def _gpu(name: str, memory_gib: float, key: str) -> Device:
    from .metrics import peak_tflops_for  # the one table of GPU peaks
    return Device(name, memory_gib, peak_tflops_for(key), "cuda")


def devices() -> dict[str, Device]:
    """Known accelerators: memory from the datasheets; GPU peaks from metrics.PEAK_BF16_TFLOPS."""
    return {d.name: d for d in (
        _gpu("a100-40gb", 40, "A100"), _gpu("a100-80gb", 80, "A100"),
        _gpu("h100-sxm", 80, "H100"), _gpu("h200", 141, "H200"),
        # Cloud TPU v3 (LaMDA's accelerator): 123 TFLOP/s bf16 and 32 GiB HBM per chip
        # (2 TensorCores of 16 GiB). Planned as if it ran the CUDA code paths.
        Device("tpu-v3", 32, 123.0, "tpu"),
        Device("cpu", 0, None, "cpu"),
    )}


def get_device(name: str) -> Device:
    known = devices()
    if name.lower() not in known:
        raise ConfigError(f"unknown device {name!r}; choose one of: {', '.join(known)}, or give --device-memory GIB")
    return known[name.lower()]


@dataclass(frozen=True)
class Layout:
    """One run's shape: what ds_train.py gets from --pipe-stages, the world size and the DS JSON."""
    stages: int  # P
    data_parallel: int  # D
    micro_batch: int  # b, sequences per micro-batch
    grad_accum: int  # m, micro-batches per step
    seq_len: int  # T
    precision: str = "bf16"  # fp32, bf16 or fp16 (fp32 master weights with the last two)
    checkpoint: int = 0  # activation_checkpoint_interval; 0: off
    contiguous_gradients: bool = False  # these two as in the shipped configs
    reduce_bucket_size: int = 50_000_000
    partition: str = "flops"
    attention: str = "auto"  # the kernel asked for (--attention); the planned one follows its rules

    @property
    def world_size(self) -> int:
        return self.stages * self.data_parallel

    @property
    def global_batch(self) -> int:  # sequences per optimizer step
        return self.micro_batch * self.grad_accum * self.data_parallel

    @property
    def bytes_per_value(self) -> int:
        return 4 if self.precision == "fp32" else 2


@dataclass
class Stage:
    index: int
    layers: tuple[int, int]  # [first, stop) pipeline layer indices
    blocks: int
    params: int
    in_flight: int  # micro-batches whose activations the stage holds at once
    bytes: dict = field(default_factory=dict)  # term -> bytes (weights, optimizer, ... as above)
    peak: int = 0
    peak_in: str = ""  # "backward" or "reduce/optimizer": where the peak falls
    flops_per_token: int = 0  # training FLOPs per token of this stage, recomputation included


def attention_kernel(cfg: ModelConfig, seq_len: int, device_kind: str, asked: str = "auto") -> str:
    """The kernel training runs at this length when `asked` is asked for (attention_kernels' own rules)."""
    from .attention_kernels import select_kernel
    where = SimpleNamespace(type="cpu" if device_kind == "cpu" else "cuda")
    return select_kernel(asked, where, seq_len, seq_len, cfg.dropout > 0, max_distance=cfg.max_distance)


def block_activations(cfg: ModelConfig, tokens: int, seq_len: int, kernel: str, w: int) -> int:
    """Bytes autograd keeps for one block's backward, for `tokens` = b * T tokens.

    Per token, in w-byte values (read off the saved-tensor hooks of Block.forward, CPU):
      6 * dim   the block input; each RMSNorm's x * rsqrt and its scaled output (x2 norms);
                the residual sum between attention and feed-forward is the second norm's input
      4 * d_ff  GEGLU: proj_in's output (value | gate, 2 d_ff), GELU(gate), and the product
                that proj_out reads
      attention, by kernel:
        sdpa (math path: a bias that needs a gradient): q and k scaled, v and the output made
                contiguous (4 * inner_dim) and the softmax probabilities (heads * T)
        cpu_flash / flex: q, k, v (views of one 3 * inner_dim output), the attention output and
                its copy for the output projection (5 * inner_dim), and the fp32 logsumexp
                (heads; cpu_flash keeps a second one, shifted by the bias it left out)
    plus two fp32 rsqrt values per token (the norms). This is the eager forward; a block under
    torch.compile may recompute some of it in backward instead of keeping it.
    """
    d, ff, inner, h = cfg.dim, cfg.d_ff, cfg.inner_dim, cfg.heads
    per_token = w * (6 * d + 4 * ff) + 4 * 2
    if kernel == "sdpa":
        per_token += w * (4 * inner + h * seq_len)
    else:
        per_token += w * 5 * inner + 4 * h * (2 if kernel == "cpu_flash" else 1)
    return tokens * per_token


def stage_params(cfg: ModelConfig, bounds: list[int]) -> list[int]:
    """Parameters of each stage: layer 0 the embedding, 1..depth the blocks, depth+1 the final
    norm, depth+2 the tied head (a second copy of the embedding when it is on another stage)."""
    sizes = [cfg.vocab_size * cfg.dim, *[block_param_count(cfg)] * cfg.depth, cfg.dim, cfg.vocab_size * cfg.dim]
    out = []
    for start, stop in zip(bounds, bounds[1:]):
        n = sum(sizes[start:stop])
        if start == 0 and stop == len(sizes):  # one stage: the head is the embedding itself
            n -= sizes[-1]
        out.append(n)
    return out


def checkpointed_runs(cfg: ModelConfig, start: int, stop: int, interval: int) -> list[int]:
    """Blocks in each run of layers [start, stop) that DeepSpeed checkpoints: PipelineModule
    walks a stage's layers in runs of `interval` and checkpoints a run only if every layer in it
    is a block (build_pipeline's checkpointable_layers), so a run that also holds the
    embedding, the final norm or the head runs as usual."""
    if not interval:
        return []
    layers = range(start, stop)
    runs = [layers[i:i + interval] for i in range(0, len(layers), interval)]
    return [len(r) for r in runs if all(1 <= i <= cfg.depth for i in r)]


def check_layout(cfg: ModelConfig, layout: Layout) -> None:
    if layout.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision {layout.precision!r}: choose fp32, bf16 or fp16")
    for name in ("data_parallel", "micro_batch", "grad_accum"):
        if getattr(layout, name) < 1:
            raise ConfigError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(layout, name)}")
    if not 1 <= layout.seq_len <= cfg.max_seq_len:
        raise ConfigError(f"--seq-len {layout.seq_len} is outside 1..{cfg.max_seq_len}, the model's maximum; "
                          f"use --seq-len <= {cfg.max_seq_len}")
    if layout.checkpoint < 0:
        raise ConfigError(f"activation_checkpoint_interval must be >= 0, got {layout.checkpoint}")


def plan_stages(cfg: ModelConfig, layout: Layout, device_kind: str = "cuda") -> list[Stage]:
    """Memory and FLOPs of every stage of `layout` (see the module docstring for each term)."""
    from .pipeline import layer_flops, stage_bounds

    check_layout(cfg, layout)
    p, dp, m, w = layout.stages, layout.data_parallel, layout.grad_accum, layout.bytes_per_value
    t, tok = layout.seq_len, layout.micro_batch * layout.seq_len
    bounds = stage_bounds(cfg, p, t, method=layout.partition)
    kernel = attention_kernel(cfg, t, device_kind, layout.attention)
    block_act = block_activations(cfg, tok, t, kernel, w)
    hidden, logits = w * tok * cfg.dim, w * tok * cfg.vocab_size
    flops = layer_flops(cfg, t)
    recompute = 2 * block_param_count(cfg) + 4 * cfg.heads * cfg.dim_head * t  # a block's forward again
    stages = []
    for s, (n, (start, stop)) in enumerate(zip(stage_params(cfg, bounds), zip(bounds, bounds[1:]))):
        blocks = sum(1 for i in range(start, stop) if 1 <= i <= cfg.depth)
        last = s == p - 1
        k = min(p - s, m)
        stage = Stage(s, (start, stop), blocks, n, k)
        runs = checkpointed_runs(cfg, start, stop, layout.checkpoint)
        stage.flops_per_token = sum(flops[start:stop]) + sum(runs) * recompute
        out_bytes = logits if last else hidden
        in_bytes = hidden if s > 0 else 8 * tok  # tokens (int64) on stage 0
        b = stage.bytes
        b["weights"] = w * n
        b["optimizer"] = 12 * n // dp
        labels = 8 * tok if last else 0  # int64 targets, kept by the last stage's slots
        b["pipe buffers"] = (max(2, k) * (out_bytes + in_bytes + labels) + (hidden if s > 0 else 0)
                             + (hidden if not last else 0))
        b["caches"] = 9 * t * t + (blocks * cfg.heads * t * t * w if kernel == "cpu_flash" else 0)
        b["gradients"] = w * n
        # a checkpointed run keeps only its input per micro-batch in flight, and is recomputed
        # (one run at a time) in backward; blocks outside such runs keep everything
        per_mb = len(runs) * hidden + (blocks - sum(runs)) * block_act
        recomputed = max(runs, default=0) * block_act
        if last:  # final norm (x * rsqrt and output) and the fp32 log-softmax the loss keeps
            per_mb += 2 * hidden + 4 * tok * cfg.vocab_size
        b["activations"] = k * per_mb
        # A block's backward: the recomputed block (checkpointing) and the gradients of the
        # GEGLU's value|gate and of its product. The loss' backward, before any block's, holds
        # two fp32 (b, T, vocab) gradients (and their cast to w bytes when w < 4). The larger
        # of the two is the workspace.
        ws = recomputed + w * tok * 3 * cfg.d_ff
        if last:
            ws = max(ws, (8 + (w if w != 4 else 0)) * tok * cfg.vocab_size)
        b["backward workspace"] = ws
        # After the last backward, while the gradients still exist: the all-reduce of the
        # gradients flattens them into buckets of up to reduce_bucket_size elements (also at
        # D = 1), then the optimizer step builds the fp32 gradient partition.
        b["gradient reduction"] = w * min(n, layout.reduce_bucket_size)
        b["optimizer step"] = 4 * n // dp + (w * n // dp if w != 4 else 0)
        b["reduce buckets"] = 2 * 4 * layout.reduce_bucket_size if layout.contiguous_gradients else 0
        static = b["weights"] + b["optimizer"] + b["pipe buffers"] + b["caches"] + b["reduce buckets"]
        fwd_bwd = static + b["gradients"] + b["activations"] + b["backward workspace"]
        after = static + b["gradients"] + max(b["gradient reduction"], b["optimizer step"])
        stage.peak, stage.peak_in = (fwd_bwd, "backward") if fwd_bwd >= after else (after, "reduce/optimizer")
        stages.append(stage)
    return stages


@dataclass
class Timing:
    mfu: float
    peak_tflops: float
    step_s: float
    tokens_per_step: int
    flops_per_step: float  # model FLOPs (config.flops_per_token), no recomputation
    bubble: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def tokens_per_day(self) -> float:
        return self.tokens_per_s * 86400

    def days_for(self, tokens: float) -> float:
        return tokens / (self.tokens_per_s * 86400)


def bubble(stages: int, micro_batches: int) -> float:
    """Idle share of a 1F1B step: (P - 1) / (m + P - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def timing(cfg: ModelConfig, layout: Layout, stages: list[Stage], peak_tflops: float, mfu: float) -> Timing:
    """Each micro-batch slot lasts as long as the slowest stage's work on one micro-batch at
    `mfu` of the peak; a step is m + P - 1 slots (fill, m, drain)."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu} is not a fraction in (0, 1]; e.g. --mfu 0.5 for 50%")
    tok = layout.micro_batch * layout.seq_len
    slot = max(s.flops_per_token for s in stages) * tok / (peak_tflops * 1e12 * mfu)
    step = slot * (layout.grad_accum + layout.stages - 1)
    tokens = layout.global_batch * layout.seq_len
    return Timing(mfu, peak_tflops, step, tokens, flops_per_token(cfg, layout.seq_len) * tokens,
                  bubble(layout.stages, layout.grad_accum))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(cfg: ModelConfig, gpus: int, batch_sequences: int, seq_len: int, precision: str, memory_bytes: float,
           peak_tflops: float, mfu: float, device_kind: str = "cuda", max_micro_batch: int = 64,
           **layout_extra) -> list[tuple[Layout, list[Stage], Timing]]:
    """Every P x D x b x checkpointing that uses `gpus` devices at this global batch, best first:
    those that fit `memory_bytes`, then by predicted time per step."""
    found = []
    for p, ckpt in itertools.product(divisors(gpus), (0, 1)):
        dp = gpus // p
        if p > cfg.depth or batch_sequences % dp:
            continue
        per_replica = batch_sequences // dp
        for b in divisors(per_replica):
            if b > max_micro_batch:
                break
            layout = Layout(p, dp, b, per_replica // b, seq_len, precision, ckpt, **layout_extra)
            st = plan_stages(cfg, layout, device_kind)
            found.append((layout, st, timing(cfg, layout, st, peak_tflops, mfu)))
    found.sort(key=lambda x: (max(s.peak for s in x[1]) > memory_bytes, x[2].step_s))
    return found


def describe_days(days: float) -> str:
    return f"{days:,.1f} days" if math.isfinite(days) else "never"


def layout_from_ds(ds: dict, *, pipe_stages: int, world_size: int, seq_len: int, partition: str = "flops",
                   attention: str = "auto", cuda_available: bool = True) -> Layout:
    """The Layout a DeepSpeed JSON gives at this stage count and world size, checked as ds_train.py
    checks it (ds_config.check_run: divisibility, ZeRO stage, precision, batch arithmetic)."""
    from .ds_config import check_run

    batch = check_run(ds, pipe_stages=pipe_stages, world_size=world_size, cuda_available=cuda_available)
    zero = ds.get("zero_optimization", {})
    if zero.get("stage", 0) != 1:
        raise ConfigError(f"the planner models ZeRO stage 1 (the shipped configs) and this DeepSpeed config has "
                          f"stage {zero.get('stage', 0)}; plan it with \"zero_optimization\": {{\"stage\": 1}}")
    precision = ("bf16" if ds.get("bf16", {}).get("enabled") else
                 "fp16" if ds.get("fp16", {}).get("enabled") else "fp32")
    return Layout(pipe_stages, batch.data_parallel, batch.micro_batch_size, batch.grad_accum_steps, seq_len,
                  precision, int(ds.get("pipeline", {}).get("activation_checkpoint_interval", 0)),
                  contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
                  reduce_bucket_size=int(zero.get("reduce_bucket_size", 500_000_000)), partition=partition,
                  attention=attention)
