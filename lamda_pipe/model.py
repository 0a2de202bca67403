"""LaMDA-style decoder-only transformer in plain PyTorch (no DeepSpeed in this file).

Ordered bottom-up: GEGLU feed-forward, block, the full model (attention is in attention.py,
sampling with the seed-compatible autoregressive wrapper in generation.py).

Choices written down once here:
* Relative positions as in T5's decoder: r = key - query, future keys share bucket 0 and are
  removed by the causal mask. Each layer owns its bias table (num_buckets x heads): a layer
  learns its own positional pattern, the cost is 32 * heads numbers per layer, and no table
  has to be kept in sync across pipeline stages.
* Bias scaling: scores = (q . k) / sqrt(dim_head) + bias. The bias is added to the scaled
  scores, unscaled itself (T5 omits the 1/sqrt(d) and adds the bias to raw q . k; ours is
  T5's with the table divided by sqrt(dim_head)). tests/test_model.py checks it.
* Embedding tied to the head: E ~ N(0, 1/dim), input = E[token], logits = h . E^T.
  With h the output of the final RMSNorm (RMS 1, |h| = sqrt(dim)), every logit starts as
  ~N(0, 1), so the initial loss is ln(vocab) + 1/2. The token's
  own embedding (RMS 1/sqrt(dim)) is small next to the blocks' outputs (RMS ~1) at init, so
  the head does not start out predicting a copy of its input; unscaled logits also learned
  faster than logits scaled by 1/sqrt(dim) on the debug preset.
* RMSNorm pre-norm blocks without biases, as in the T5 family.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import (  # noqa: F401  (re-exported: the model's public names)
    Attention,
    AttentionSetting,
    PositionCache,
    RelativePositionBias,
    relative_position_bucket,
)
from .config import ModelConfig


class GEGLUFeedForward(nn.Module):
    """out = W_down (GELU(x W_gate) * x W_value), with the two input projections fused."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj_in = nn.Linear(cfg.dim, 2 * cfg.d_ff, bias=False)  # [value | gate]
        self.proj_out = nn.Linear(cfg.d_ff, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(F.gelu(gate) * value)


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(Norm(x)), then x + FF(Norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ff_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ff = GEGLUFeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, positions: PositionCache, setting: AttentionSetting,
                kv_cache: dict | None = None, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """doc_ids: None, or (B, T) integers (one per packed example): attention stays within
        an example (Attention.forward)."""
        x = x + self.drop(self.attn(self.attn_norm(x), positions, setting, kv_cache, doc_ids))
        return x + self.drop(self.ff(self.ff_norm(x)))


class TokenEmbedding(nn.Module):
    """The vocabulary matrix, used twice: lookup at the input, h . E^T at the output."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.dim))
        nn.init.normal_(self.weight, std=cfg.dim ** -0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)  # (B, T) -> (B, T, D)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)  # (B, T, D) -> (B, T, V)


def init_block_weights(block: Block, cfg: ModelConfig) -> None:
    """Fan-in scaled normal init; the two residual output projections are further scaled by
    1/sqrt(2 * depth) so the residual stream's variance does not grow with depth."""
    for name, p in block.named_parameters():
        if p.dim() == 2:
            std = p.shape[1] ** -0.5
            if name in ("attn.out.weight", "ff.proj_out.weight"):
                std /= math.sqrt(2 * cfg.depth)
            nn.init.normal_(p, std=std)


def make_block(cfg: ModelConfig) -> Block:
    block = Block(cfg)
    init_block_weights(block, cfg)
    return block


class LaMDA(nn.Module):
    """The full model: tokens (B, T) -> logits (B, T, vocab)."""

    def __init__(self, num_tokens: int | None = None, dim: int | None = None,
                 dim_head: int | None = None, depth: int | None = None, heads: int | None = None,
                 *, config: ModelConfig | None = None, attention: str = "auto", **overrides):
        """attention: the attention kernel, one of ATTENTION_CHOICES (lamda_pipe/attention.py);
        it changes speed and memory, not the function computed."""
        super().__init__()
        if config is None:
            # Keyword form of the seed repo: LaMDA(num_tokens=..., dim=..., dim_head=..., ...)
            given = dict(vocab_size=num_tokens, dim=dim, dim_head=dim_head, depth=depth, heads=heads)
            config = ModelConfig(**{k: v for k, v in given.items() if v is not None}, **overrides)
        elif overrides or any(v is not None for v in (num_tokens, dim, dim_head, depth, heads)):
            raise TypeError("pass either config=ModelConfig(...) or keyword sizes, not both")
        self.config = cfg = config
        self.embed = TokenEmbedding(cfg)
        self.blocks = nn.ModuleList(make_block(cfg) for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.positions = PositionCache(cfg.num_buckets, cfg.max_distance)
        self.attention = AttentionSetting(attention)  # shared by every layer

    def set_attention(self, name: str) -> None:
        """Switches every layer to the attention kernel `name` (one of ATTENTION_CHOICES)."""
        self.attention = AttentionSetting(name, self.attention.flex_options)

    def forward(self, tokens: torch.Tensor, kv_caches: list[dict] | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """doc_ids: None, or (B, T) integers, equal within each example packed into `tokens`:
        each example's logits are then those it gets alone."""
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, self.positions, self.attention, None if kv_caches is None else kv_caches[i], doc_ids)
        return self.embed.logits(self.norm(x))  # tied head

    @classmethod
    def from_pretrained(cls, path, device=None, dtype: torch.dtype | None = None,
                        attention: str = "auto") -> "LaMDA":
        """Loads a directory written by lamda-export (export.py holds the format), in eval mode,
        with safetensors only: no pickle, no DeepSpeed. dtype None keeps the stored dtype."""
        from .export import load_export

        return load_export(path, device=device, dtype=dtype, attention=attention, model_class=cls)
