"""The LaMDA model as a DeepSpeed PipelineModule, built from the plain model's parts.

Tensor protocol between stages
------------------------------
What the data feeds in is fixed per run by its BatchFormat (lamda_pipe/data/batches.py, where
the micro-batch layout and the loss weights are defined):

* into stage 0: ``tokens`` (B, T) int64, the first seq_len tokens of each sample; with
  document masks ``(tokens, doc_ids)``, doc_ids (B, T) int64, equal within each document or
  packed example;
* between any two stages: ``hidden`` (B, T, dim), one floating tensor in the activation
  dtype (fp32, fp16 or bf16); with document masks ``(hidden, doc_ids)``: doc_ids travel with
  the hidden state because every block's attention needs them and only stage 0 reads the data
  (B * T integers beside B * T * dim activations). Nothing else crosses a stage boundary;
* into the loss on the last stage: ``logits`` (B, T, vocab) and ``labels`` (B, T) int64, the
  same samples shifted by one token; with loss weights ``(labels, weights)``, weights (B, T)
  float32, and the loss is ``sum(nll * weights)`` (``weighted_lm_loss``).
Relative position buckets are not sent: each stage builds them once per sequence length.

Layer indices (they name the checkpoint files ``layer_XX-model_states.pt``):
0 = embedding (tied), 1..depth = blocks, depth+1 = final norm, depth+2 = head (tied to 0,
no file of its own).

Partitioning: stages balanced by compute
----------------------------------------
Training splits the layers by their training FLOPs per token (``--partition flops``, the
default), not by block count: the embedding is a gather (~0), each block costs
6 * block_param_count + 12 * heads * dim_head * seq_len (as in ``config.flops_per_token``),
the final norm ~0, and the tied head h . E^T costs 6 * vocab * dim (the loss after it is small
and not counted). The head weighs between one and a half and two and a half blocks in the small
presets, so giving each stage the same number of blocks leaves the last stage the slowest
(docs/benchmarks.md, "Pipeline efficiency"). The embedding is folded into the first block's
weight and the norm and head into the last block's, then DeepSpeed's own ``partition_balanced``
splits the blocks, so every stage holds at least one block, the tied embedding stays on the
first stage and the tied head on the last. (``partition_balanced`` minimises the gap between the
heaviest and the lightest stage; for the presets at 2 and 4 stages that is also the split whose
slowest stage is fastest, which tests/test_pipeline.py checks by brute force.) With 2 stages:
``debug`` 3 blocks | 1 block + head, ``readme`` 7 | 5 + head.

The bounds are computed once per run (``stage_bounds``, by a method of ``PARTITIONS``) and
passed to ``build_pipeline``. Because they depend on seq_len, a checkpoint records them
(``stage_bounds`` in lamda_run.json) and a resume with other bounds goes through the universal
checkpoint, as a change of stage count does (ZeRO's optimizer state is stored per stage).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.utils import partition_balanced, partition_uniform
from einops import rearrange
from torch import nn

from .config import ModelConfig, block_param_count
from .data.batches import PLAIN, BatchFormat
from .attention import AttentionSetting, PositionCache
from .attention_kernels import select_kernel
from .errors import ConfigError
from .model import Block, TokenEmbedding, init_block_weights

TIED_KEY = "embed"


class BlockPipe(Block):
    """A block whose single input and output is the hidden state (the stage protocol)."""

    def __init__(self, cfg: ModelConfig, positions: PositionCache, setting: AttentionSetting):
        super().__init__(cfg)
        init_block_weights(self, cfg)
        # shared by the blocks of this stage; neither is a module or parameter
        self._positions, self._attention = positions, setting

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden, self._positions, self._attention)


class PackedBlockPipe(BlockPipe):
    """A block under document masks: (hidden, doc_ids) in, (hidden, doc_ids) out."""

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, doc_ids = inputs
        return Block.forward(self, hidden, self._positions, self._attention, doc_ids=doc_ids), doc_ids


class FinalNorm(nn.RMSNorm):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.dim, eps=cfg.norm_eps)


class PackedFinalNorm(FinalNorm):
    """The final norm under document masks: the head needs no doc_ids, so they end here."""

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return super().forward(inputs[0])


class PackedEmbedding(TokenEmbedding):
    """The embedding under document masks: (tokens, doc_ids) in, (hidden, doc_ids) out. A module
    of its own, not a forward_fn: DeepSpeed saves a layer's file only for a layer that is a
    module in the stage's forward list (the tied head, a forward_fn, has none)."""

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, doc_ids = inputs
        return super().forward(tokens), doc_ids  # (B, T) -> (B, T, D); doc_ids (B, T) passed on


def tied_head(embedding: TokenEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    return embedding.logits(hidden)  # (B, T, D) -> (B, T, V)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # The loss is computed in fp32 whatever the activation dtype.
    return F.cross_entropy(rearrange(logits.float(), "b t v -> (b t) v"), rearrange(labels, "b t -> (b t)"))


def weighted_lm_loss(logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """sum(nll * weight): weights are 0 off the targets and normalise over the global batch
    (data/batches.py), so a masked token contributes no loss and no gradient."""
    targets, weights = labels
    nll = F.cross_entropy(rearrange(logits.float(), "b t v -> (b t) v"), rearrange(targets, "b t -> (b t)"),
                          reduction="none")
    return (nll * rearrange(weights, "b t -> (b t)")).sum()


def int_seed_fn(seed) -> None:
    """DeepSpeed's per-layer seeding passes numpy ints for some partition methods, which
    torch.manual_seed refuses on Python >= 3.11; cast first."""
    from deepspeed.runtime.utils import set_random_seed
    set_random_seed(int(seed))


def layer_specs(cfg: ModelConfig, attention: str = "auto", document_mask: bool = False) -> list:
    """attention: the attention kernel, one of ATTENTION_CHOICES (lamda_pipe/attention.py);
    document_mask: the layers pass doc_ids along (the protocol above). Either way the layers
    and their parameters are the same, so checkpoints do not depend on it."""
    positions, setting = PositionCache(cfg.num_buckets, cfg.max_distance), AttentionSetting(attention)
    embed, block, norm = ((PackedEmbedding, PackedBlockPipe, PackedFinalNorm) if document_mask
                          else (TokenEmbedding, BlockPipe, FinalNorm))
    return [
        TiedLayerSpec(TIED_KEY, embed, cfg, tied_weight_attr="weight"),
        *[LayerSpec(block, cfg, positions, setting) for _ in range(cfg.depth)],
        LayerSpec(norm, cfg),
        TiedLayerSpec(TIED_KEY, embed, cfg, forward_fn=tied_head, tied_weight_attr="weight"),
    ]


def layer_flops(cfg: ModelConfig, seq_len: int) -> list[int]:
    """Training FLOPs per token (forward + backward) of each pipeline layer, in layer order:
    embedding (a gather: 0), blocks, final norm (0), tied head. See config.flops_per_token."""
    block = 6 * block_param_count(cfg) + 12 * cfg.heads * cfg.dim_head * seq_len
    return [0, *[block] * cfg.depth, 0, 6 * cfg.vocab_size * cfg.dim]


def _flops_bounds(cfg: ModelConfig, num_stages: int, seq_len: int) -> list:
    weights = layer_flops(cfg, seq_len)
    blocks = weights[1:cfg.depth + 1]
    blocks[0] += weights[0]  # the embedding goes with the first block,
    blocks[-1] += weights[-2] + weights[-1]  # the final norm and the head with the last
    parts = partition_balanced(weights=blocks, num_parts=num_stages)  # over the blocks
    return [0, *[p + 1 for p in parts[1:-1]], cfg.depth + 3]  # block b is layer b + 1


def _block_count_bounds(cfg: ModelConfig, num_stages: int, seq_len: int) -> list:
    # As PipelineModule._partition_layers does for "type:BlockPipe": blocks weigh 1, the rest 0.
    return partition_balanced(weights=[0, *[1] * cfg.depth, 0, 0], num_parts=num_stages)


def _uniform_bounds(cfg: ModelConfig, num_stages: int, seq_len: int) -> list:
    return partition_uniform(num_items=cfg.depth + 3, num_parts=num_stages)


# How layers are split into stages: name -> (cfg, num_stages, seq_len) -> bounds. The first is
# the default; "type:BlockPipe" is DeepSpeed's method of that name, which every checkpoint that
# predates recorded bounds used.
PARTITIONS = {"flops": _flops_bounds, "type:BlockPipe": _block_count_bounds, "uniform": _uniform_bounds}
FLOPS_PARTITION, LEGACY_PARTITION = "flops", "type:BlockPipe"


def check_stage_count(cfg: ModelConfig, num_stages: int) -> None:
    """Every stage needs a block: the one place this rule is checked."""
    if not 1 <= num_stages <= cfg.depth:
        raise ConfigError(f"--pipe-stages {num_stages} for a model of {cfg.depth} blocks: every stage needs at "
                          f"least one block; use 1 <= --pipe-stages <= {cfg.depth}")


def stage_bounds(cfg: ModelConfig, num_stages: int, seq_len: int | None = None,
                 method: str = FLOPS_PARTITION) -> list[int]:
    """The first layer index of each stage, then the layer count (DeepSpeed's ``parts``), by a
    method of PARTITIONS (see the module docstring); seq_len defaults to the model's maximum.
    Computed once per run and passed to build_pipeline; plain ints throughout."""
    check_stage_count(cfg, num_stages)
    if method not in PARTITIONS:
        raise ConfigError(f"unknown partition method {method!r}; choose one of: {', '.join(PARTITIONS)}")
    return [int(b) for b in PARTITIONS[method](cfg, num_stages, cfg.max_seq_len if seq_len is None else seq_len)]


def describe_stages(cfg: ModelConfig, bounds: list[int], seq_len: int) -> str:
    """One line per stage: its layers and its share of the training FLOPs per token."""
    flops = layer_flops(cfg, seq_len)
    names = ["embedding", *[f"block {i}" for i in range(1, cfg.depth + 1)], "final norm", "head + loss"]
    total = sum(flops)
    lines = []
    for stage, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        share = sum(flops[start:stop]) / total
        blocks = [i for i in range(start, stop) if 1 <= i <= cfg.depth]
        parts = [names[0]] if start == 0 else []
        parts.append(f"blocks {blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else f"block {blocks[0]}")
        parts += [names[i] for i in range(max(start, cfg.depth + 1), stop)]
        lines.append(f"  stage {stage}: layers [{start}, {stop}) = {', '.join(parts)}: "
                     f"{share:.1%} of the FLOPs")
    return "\n".join(lines)


class LaMDAPipeline(PipelineModule):
    """A PipelineModule that takes its stage bounds as given instead of computing them.

    PipelineModule.__init__ calls ``_partition_layers`` once, before building any layer; what it
    must leave behind (deepspeed 0.19.8) is ``self.parts`` (read by ``stage_owner`` for the tied
    modules, and by ``partitions()``) and this stage's slice through ``_set_bounds``.
    """

    def __init__(self, *args, stage_bounds: list[int], **kwargs):
        self._given_bounds = [int(b) for b in stage_bounds]  # before PipelineModule.__init__ partitions
        super().__init__(*args, **kwargs)

    def _partition_layers(self, method="uniform"):
        bounds = self._given_bounds
        if (len(bounds) != self.num_stages + 1 or bounds[0] != 0 or bounds[-1] != self._num_layers
                or any(b >= c for b, c in zip(bounds, bounds[1:]))):
            raise ValueError(f"stage bounds {bounds} do not split {self._num_layers} layers into "
                             f"{self.num_stages} non-empty stages")
        self.parts = bounds
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


def build_pipeline(cfg: ModelConfig, bounds: list[int], seed: int, activation_checkpoint_interval: int = 0,
                   attention: str = "auto", fmt: BatchFormat = PLAIN, compile_seq_len: int | None = None
                   ) -> PipelineModule:
    """Assembles the pipeline split at ``bounds`` (from ``stage_bounds``; the stage count is
    len(bounds) - 1). Each layer is built and run under a seed derived from its global index,
    so initialisation and dropout do not depend on the number of stages or where they are cut.
    ``attention`` names the kernel (attention_kernels.ATTENTION_CHOICES); ``fmt`` is the run's
    BatchFormat (the protocol in the module docstring); ``compile_seq_len``: None, or the
    sequence length to compile this stage's blocks for (``compile_blocks``)."""
    module = LaMDAPipeline(
        layers=layer_specs(cfg, attention, fmt.document_mask),
        num_stages=len(bounds) - 1,
        loss_fn=weighted_lm_loss if fmt.loss_weights else lm_loss,
        stage_bounds=bounds,
        seed_layers=True,
        base_seed=seed,
        seed_fn=int_seed_fn,
        activation_checkpoint_interval=activation_checkpoint_interval,
        checkpointable_layers=["BlockPipe", "PackedBlockPipe"],
    )
    # Lets DeepSpeed's ds_to_universal convert checkpoints of this model (changing stage count).
    module.universal_checkpoint_info = universal_checkpoint_info()
    if compile_seq_len is not None:
        compile_blocks(module, compile_seq_len)
    return module


def compile_blocks(module: PipelineModule, seq_len: int) -> int:
    """Compiles this stage's blocks in place (see the module docstring); returns how many.

    Before that, the stage's position cache is filled for seq_len on the blocks' device
    (PipelineModule has moved them there), so that no compiled frame guards on a dict that is
    still changing. Only flex reads the cache inside the compiled region; sdpa and cpu_flash
    run eagerly (attention.py)."""
    blocks = [layer for layer in module.forward_funcs if isinstance(layer, BlockPipe)]
    if not blocks:
        return 0
    first = blocks[0]
    positions, setting, device = first._positions, first._attention, first.attn.qkv.weight.device
    positions.get(seq_len, seq_len, device)
    kernel = select_kernel(setting.kernel, device, seq_len, seq_len, first.attn.dropout > 0,
                           max_distance=positions.max_distance)
    if kernel == "flex":
        positions.get_flex(seq_len, device)
    for block in blocks:
        block.compile()
    return len(blocks)


def check_compile(device_type: str) -> None:
    """Refuses --compile where torch.compile cannot build kernels (compile_unavailable)."""
    why = compile_unavailable(device_type)
    if why is not None:
        raise ConfigError(f"--compile: {why}")


def compile_unavailable(device_type: str) -> str | None:
    """Why torch.compile cannot build kernels on this machine (the fix included), or None.

    Inductor writes C++ for CPU kernels and builds it with the C++ compiler of its
    config.cpp.cxx (the CXX variable, else g++); on CUDA it writes Triton kernels, and Triton
    builds its launcher with a C compiler (CC, else gcc or clang). Without one the first step
    would fail, after start-up, on every rank. Asks inductor's own compiler search (it runs the
    compiler's --version) rather than guessing its rules."""
    import torch

    if not torch._dynamo.is_dynamo_supported():
        return (f"torch {torch.__version__} cannot compile on this Python; drop --compile, or use a Python "
                f"version torch.compile supports")
    if device_type == "cuda":
        import shutil

        from torch.utils._triton import has_triton

        if not has_triton():
            return "torch.compile needs Triton on CUDA and it is not installed; install triton or drop --compile"
        if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
            return ("torch.compile needs a C compiler on CUDA (Triton builds its launcher with one) and none "
                    "was found; install gcc (or set CC) or drop --compile")
        return None
    from torch._inductor import config, exc
    from torch._inductor.cpp_builder import cpp_compiler_search

    search = tuple(config.cpp.cxx) if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
    try:
        cpp_compiler_search(search)
    except exc.InvalidCxxCompiler:
        names = ", ".join(c for c in search if c) or "g++"
        return (f"torch.compile needs a C++ compiler on CPU and none works here (tried: {names}); install g++ "
                f"(e.g. apt-get install g++) or set CXX to one, or drop --compile")
    return None


def universal_checkpoint_info() -> dict:
    return {
        "universal_checkpoint_version": 0.2,
        "pipeline_replicated_parameter_patterns": [rf"tied_modules\.{TIED_KEY}\.weight"],
        "vocabulary_parameter_patterns": [],
        "tp_replicated_parameter_patterns": [],
        "parameter_to_average_patterns": [],
        "parameter_with_row_parallelism_patterns": [],
    }
