"""Seed-style baseline for bench/train_step.py: same shapes and parameter count as lamda_pipe.model.LaMDA.

Written the way the seed repo did it, on purpose:
* separate Q, K and V projections and separate GEGLU value / gate projections (unfused GEMMs);
* every layer rebuilds the relative-position bucket indices from scratch on every forward
  (arange, subtract, log, clamp, where: T5's formula, vectorised with torch) and gathers a
  (H, T, T) bias from its table with a permute;
* explicit attention: Q.K^T / sqrt(d) + bias, a boolean causal mask applied with masked_fill,
  softmax, then @ V (``lamda_pipe.reference.naive_attention``).

``load_from(lamda)`` copies the weights of a lamda_pipe ``LaMDA`` (splitting the fused
matrices), so the two models compute the same function; the bench checks that before timing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lamda_pipe.config import ModelConfig
from lamda_pipe.reference import naive_attention


def naive_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int,
                  device: torch.device | None = None) -> torch.Tensor:
    """(Tq, Tk) long bucket indices, T5 unidirectional: lamda_pipe.reference.naive_bucket, vectorised.

    Deliberately uncached: the seed recomputes this in every layer on every step.
    """
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    rel = k_pos[None, :] - q_pos[:, None]  # key - query
    n = (-rel).clamp(min=0)
    half = num_buckets // 2
    large = half + (torch.log(n.float().clamp(min=1) / half) / math.log(max_distance / half)
                    * (num_buckets - half)).long()
    large = large.clamp(max=num_buckets - 1)
    return torch.where(n < half, n, large)


class NaiveAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.to_q = nn.Linear(cfg.dim, cfg.inner_dim, bias=False)
        self.to_k = nn.Linear(cfg.dim, cfg.inner_dim, bias=False)
        self.to_v = nn.Linear(cfg.dim, cfg.inner_dim, bias=False)
        self.to_out = nn.Linear(cfg.inner_dim, cfg.dim, bias=False)
        self.rel_table = nn.Parameter(torch.zeros(cfg.num_buckets, cfg.heads))  # (buckets, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.cfg.heads
        q, k, v = (proj(x).view(b, t, h, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        idx = naive_buckets(t, t, self.cfg.num_buckets, self.cfg.max_distance, x.device)  # every layer, every step
        bias = self.rel_table[idx].permute(2, 0, 1)  # (H, T, T)
        y = naive_attention(q, k, v, bias)  # scores, bool mask + masked_fill, softmax, @ V
        return self.to_out(y.transpose(1, 2).reshape(b, t, -1))


class NaiveGEGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.to_value = nn.Linear(cfg.dim, cfg.d_ff, bias=False)
        self.to_gate = nn.Linear(cfg.dim, cfg.d_ff, bias=False)
        self.to_out = nn.Linear(cfg.d_ff, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out(F.gelu(self.to_gate(x)) * self.to_value(x))


class NaiveBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = NaiveAttention(cfg)
        self.ff_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ff = NaiveGEGLU(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ff(self.ff_norm(x))


class NaiveLaMDA(nn.Module):
    """tokens (B, T) -> logits (B, T, vocab), tied head; dropout omitted (the bench runs with 0)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(torch.randn(cfg.vocab_size, cfg.dim) * cfg.dim ** -0.5)
        self.blocks = nn.ModuleList(NaiveBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        for name, p in self.blocks.named_parameters():
            if p.dim() == 2 and not name.endswith("rel_table"):
                nn.init.normal_(p, std=p.shape[1] ** -0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = F.embedding(tokens, self.embed)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.t()

    @torch.no_grad()
    def load_from(self, lamda) -> "NaiveLaMDA":
        """Copies the weights of a lamda_pipe.model.LaMDA with the same config."""
        inner, dff = self.cfg.inner_dim, self.cfg.d_ff
        self.embed.copy_(lamda.embed.weight)
        self.norm.weight.copy_(lamda.norm.weight)
        for nb, lb in zip(self.blocks, lamda.blocks):
            nb.attn_norm.weight.copy_(lb.attn_norm.weight)
            nb.ff_norm.weight.copy_(lb.ff_norm.weight)
            wq, wk, wv = lb.attn.qkv.weight.split(inner, dim=0)
            nb.attn.to_q.weight.copy_(wq)
            nb.attn.to_k.weight.copy_(wk)
            nb.attn.to_v.weight.copy_(wv)
            nb.attn.to_out.weight.copy_(lb.attn.out.weight)
            nb.attn.rel_table.copy_(lb.attn.rel_bias.weight)
            value, gate = lb.ff.proj_in.weight.split(dff, dim=0)
            nb.ff.to_value.weight.copy_(value)
            nb.ff.to_gate.weight.copy_(gate)
            nb.ff.to_out.weight.copy_(lb.ff.proj_out.weight)
        return self
