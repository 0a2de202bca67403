"""The model configuration: one dataclass, named presets, parameter and FLOP counts.

DeepSpeed settings (batch sizes, precision, optimizer, LR schedule, ZeRO) live in the
JSON files under ``ds_configs/``; this file holds only what defines the network.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 20000
    dim: int = 512  # d_model
    depth: int = 12  # number of transformer blocks
    heads: int = 8
    dim_head: int = 64  # d_k = d_v; heads * dim_head need not equal dim
    ff_mult: int = 4  # GEGLU inner width d_ff = ff_mult * dim
    max_seq_len: int = 512  # longest sequence trained or sampled; checked before training
    num_buckets: int = 32  # T5 relative position buckets
    max_distance: int = 128  # distances >= this share the last bucket
    dropout: float = 0.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("vocab_size", "dim", "depth", "heads", "dim_head", "ff_mult", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_buckets < 2 or self.num_buckets % 2:
            raise ConfigError(f"ModelConfig.num_buckets must be an even number >= 2, got {self.num_buckets}")
        if self.max_distance <= self.num_buckets // 2:
            raise ConfigError(
                f"ModelConfig.max_distance ({self.max_distance}) must exceed num_buckets/2 "
                f"({self.num_buckets // 2}): the log-spaced buckets start there")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def d_ff(self) -> int:
        return self.ff_mult * self.dim

    @property
    def inner_dim(self) -> int:
        return self.heads * self.dim_head

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# Named presets. `lamda-*` follow Table 27 of the LaMDA paper (layers, d_model, heads), with a
# 32K SentencePiece vocabulary, head dim 64 for 2B/8B (d_model / heads) and 128 for 137B,
# and d_ff = 8 * d_model as the paper gives for 137B (65536 = 8 * 8192).
# The paper does not state a context length; 2048 is our choice for the large presets.
PRESETS: dict[str, ModelConfig] = {
    # Trains on a laptop CPU in seconds; vocab matches the demo tokenizer.
    "debug": ModelConfig(vocab_size=2048, dim=64, depth=4, heads=4, dim_head=16, ff_mult=4,
                         max_seq_len=128),
    # The seed repo's README example: LaMDA(num_tokens=20000, dim=512, dim_head=64, depth=12, heads=8).
    "readme": ModelConfig(vocab_size=20000, dim=512, depth=12, heads=8, dim_head=64, ff_mult=4,
                          max_seq_len=2048),
    "lamda-2b": ModelConfig(vocab_size=32000, dim=2560, depth=10, heads=40, dim_head=64, ff_mult=8,
                            max_seq_len=2048),
    "lamda-8b": ModelConfig(vocab_size=32000, dim=4096, depth=16, heads=64, dim_head=64, ff_mult=8,
                            max_seq_len=2048),
    "lamda-137b": ModelConfig(vocab_size=32000, dim=8192, depth=64, heads=128, dim_head=128,
                              ff_mult=8, max_seq_len=2048),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def block_param_count(cfg: ModelConfig) -> int:
    """Parameters of one transformer block, counted from the shapes (nothing is allocated)."""
    attn = cfg.dim * 3 * cfg.inner_dim + cfg.inner_dim * cfg.dim  # fused QKV + output projection
    rel_bias = cfg.num_buckets * cfg.heads  # per-layer T5 bias table
    ff = cfg.dim * 2 * cfg.d_ff + cfg.d_ff * cfg.dim  # GEGLU: value and gate, then down projection
    norms = 2 * cfg.dim  # two pre-norm RMSNorm scales
    return attn + rel_bias + ff + norms


def param_count(cfg: ModelConfig, embedding: bool = True) -> int:
    """Total parameters. The output head is tied to the embedding, so it adds nothing.

    With ``embedding=False`` this is the "non-embedding" count the LaMDA paper quotes.
    """
    n = cfg.depth * block_param_count(cfg) + cfg.dim  # blocks + final norm
    if embedding:
        n += cfg.vocab_size * cfg.dim
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward), the count MFU is measured against.

    6N + 12 * L * H * Q * T, where
      N  = parameters that take part in a matrix multiply per token: every weight of the
           blocks, plus the vocabulary matrix once, because the tied head multiplies by it
           (the embedding lookup itself is a gather and costs nothing);
      6  = 2 FLOPs per multiply-add in the forward pass, and twice that in the backward pass
           (gradients with respect to both the input and the weight);
      12 * L * H * Q * T = attention scores Q.K^T and the weighted sum with V: each is
           2 * Q FLOPs per head per (query, key) pair in the forward pass, 2 products,
           times 3 for forward + backward, over L layers, H heads of size Q and T keys.
           We count all T keys, not the causal half, like PaLM and torchtitan.
    """
    n = param_count(cfg, embedding=True)  # blocks + tied vocabulary matrix
    return 6 * n + 12 * cfg.depth * cfg.heads * cfg.dim_head * seq_len
