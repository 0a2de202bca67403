"""The LaMDA model as a DeepSpeed PipelineModule, built from the plain model's parts.

Tensor protocol between stages
------------------------------
* into stage 0: ``tokens`` (B, T) int64, the first seq_len tokens of each sample;
* between any two stages: ``hidden`` (B, T, dim), one floating tensor in the activation
  dtype (fp32, fp16 or bf16) — nothing else crosses a stage boundary;
* into the loss on the last stage: ``logits`` (B, T, vocab) and ``labels`` (B, T) int64,
  the same samples shifted by one token.
Relative position buckets are not sent: each stage builds them once per sequence length.

Layer indices (they name the checkpoint files ``layer_XX-model_states.pt``):
0 = embedding (tied), 1..depth = blocks, depth+1 = final norm, depth+2 = head (tied to 0,
no file of its own).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from einops import rearrange
from torch import nn

from .config import ModelConfig
from .attention import RelativePositionBuckets
from .model import Block, LaMDA, TokenEmbedding, init_block_weights

TIED_KEY = "embed"


class BlockPipe(Block):
    """A block whose single input and output is the hidden state (the stage protocol)."""

    def __init__(self, cfg: ModelConfig, buckets: RelativePositionBuckets):
        super().__init__(cfg)
        init_block_weights(self, cfg)
        self._buckets = buckets  # shared by the blocks of this stage; not a module or parameter

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden, self._buckets)


class FinalNorm(nn.RMSNorm):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.dim, eps=cfg.norm_eps)


def tied_head(embedding: TokenEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    return embedding.logits(hidden)  # (B, T, D) -> (B, T, V)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # The loss is computed in fp32 whatever the activation dtype.
    return F.cross_entropy(rearrange(logits.float(), "b t v -> (b t) v"), rearrange(labels, "b t -> (b t)"))


def int_seed_fn(seed) -> None:
    """DeepSpeed's per-layer seeding passes numpy ints for some partition methods, which
    torch.manual_seed refuses on Python >= 3.11; cast first."""
    from deepspeed.runtime.utils import set_random_seed
    set_random_seed(int(seed))


def layer_specs(cfg: ModelConfig, attn_impl: str = "auto") -> list:
    buckets = RelativePositionBuckets(cfg.num_buckets, cfg.max_distance, attn_impl)
    return [
        TiedLayerSpec(TIED_KEY, TokenEmbedding, cfg, tied_weight_attr="weight"),
        *[LayerSpec(BlockPipe, cfg, buckets) for _ in range(cfg.depth)],
        LayerSpec(FinalNorm, cfg),
        TiedLayerSpec(TIED_KEY, TokenEmbedding, cfg, forward_fn=tied_head, tied_weight_attr="weight"),
    ]


def build_pipeline(cfg: ModelConfig, num_stages: int, seed: int, activation_checkpoint_interval: int = 0,
                   partition_method: str = "type:BlockPipe", attn_impl: str = "auto") -> PipelineModule:
    """Assembles the pipeline. Each layer is built and run under a seed derived from its
    global index, so initialisation and dropout do not depend on the number of stages."""
    module = PipelineModule(
        layers=layer_specs(cfg, attn_impl),
        num_stages=num_stages,
        loss_fn=lm_loss,
        partition_method=partition_method,
        seed_layers=True,
        base_seed=seed,
        seed_fn=int_seed_fn,
        activation_checkpoint_interval=activation_checkpoint_interval,
        checkpointable_layers=["BlockPipe"],
    )
    # Lets DeepSpeed's ds_to_universal convert checkpoints of this model (changing stage count).
    module.universal_checkpoint_info = universal_checkpoint_info()
    return module


def universal_checkpoint_info() -> dict:
    return {
        "universal_checkpoint_version": 0.2,
        "pipeline_replicated_parameter_patterns": [rf"tied_modules\.{TIED_KEY}\.weight"],
        "vocabulary_parameter_patterns": [],
        "tp_replicated_parameter_patterns": [],
        "parameter_to_average_patterns": [],
        "parameter_with_row_parallelism_patterns": [],
    }


def layer_file_to_model_prefix(layer_idx: int, depth: int) -> str | None:
    """Maps a pipeline layer index to its parameter prefix in the plain LaMDA model."""
    if layer_idx == 0:
        return "embed."
    if 1 <= layer_idx <= depth:
        return f"blocks.{layer_idx - 1}."
    if layer_idx == depth + 1:
        return "norm."
    return None  # the tied head has no parameters of its own


def load_plain_model(checkpoint_tag_dir, cfg: ModelConfig) -> LaMDA:
    """Builds a plain LaMDA from the per-layer files of a pipeline checkpoint (any stage count).

    Reads with weights_only=True: no pickled code is executed.
    """
    tag_dir = Path(checkpoint_tag_dir)
    state = {}
    for layer_idx in range(cfg.depth + 2):
        path = tag_dir / f"layer_{layer_idx:02d}-model_states.pt"
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {tag_dir} is missing {path.name}")
        prefix = layer_file_to_model_prefix(layer_idx, cfg.depth)
        for name, tensor in torch.load(path, map_location="cpu", weights_only=True).items():
            state[prefix + name] = tensor.float()
    model = LaMDA(config=cfg)
    model.load_state_dict(state)
    return model


def plain_name(pipeline_param: str, depth: int) -> str:
    """'tied_modules.embed.weight' -> 'embed.weight'; '3.attn.qkv.weight' -> 'blocks.2.attn.qkv.weight'."""
    if pipeline_param.startswith("tied_modules."):
        return "embed." + pipeline_param.split(".", 2)[2]
    idx, rest = pipeline_param.split(".", 1)
    return layer_file_to_model_prefix(int(idx), depth) + rest


def load_plain_state(net: PipelineModule, state: dict, depth: int) -> None:
    """Copies a plain LaMDA state dict into this stage's part of the pipeline (before the engine
    is built, so the optimizer starts from these weights)."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(state[plain_name(name, depth)])


def read_plain_state(path: Path, cfg: ModelConfig) -> dict:
    """Weights of an export dir (model.safetensors) or of a checkpoint folder (layer files)."""
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file
        return load_file(str(path / "model.safetensors"))
    return load_plain_model(path, cfg).state_dict()
