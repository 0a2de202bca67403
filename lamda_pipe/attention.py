"""Causal self-attention with a T5 relative position bias, plain PyTorch (no DeepSpeed).

Design: three objects, each with one job.

* ``PositionCache`` (one per model, or per pipeline stage): what every layer needs for a
  sequence length, positions only (bucket indices, causal masks, FlexAttention block masks),
  built once per (length, device) and shared by the layers.
* ``AttentionSetting`` (one per model, shared by its layers like the cache): which kernel the
  user asked for (``kernel``, one of ``ATTENTION_CHOICES``) and the kernels' tuning options.
  ``LaMDA.set_attention`` changes it for every layer at once.
* ``Attention`` (per layer): projections and the bias table; for each call it asks
  ``select_kernel`` (``attention_kernels.py``) which kernel runs and calls it.

The kernels and their selection rules are one table, ``attention_kernels.KERNELS``:

* ``"sdpa"``: ``F.scaled_dot_product_attention`` with a (1, H, Tq, Tk) bias that has the causal
  mask folded in. Runs everywhere; the only kernel for KV-cache decoding (Tq < Tk) and attention
  dropout; the parity path. Asked for on CPU, full sequences without attention dropout longer
  than 2 x max_distance run ``cpu_flash`` instead (the same function, computed faster there).
* ``"cpu_flash"``: CPU SDPA's flash kernel with the bias as a constant band matrix. Asked for
  explicitly it runs wherever it can (CPU, full sequence, no dropout, torch has the op) at any
  length, and falls back to sdpa elsewhere (CUDA, decoding, dropout).
* ``"flex"``: FlexAttention: the bias read in a ``score_mod``, causality as a block mask,
  nothing of size T x T stored. Compiled to Triton kernels on CUDA. Asked for, it runs every
  full sequence (an error with attention dropout, which it lacks; on CPU forward only, torch
  has no flex backward there) and decoding falls back to sdpa.
* ``"auto"`` (default): flex on CUDA for full sequences (training, eval, prefill) of at least
  FLEX_MIN_SEQ_LEN tokens without attention dropout; the sdpa rules otherwise. Why these
  thresholds: docs/benchmarks.md ("One GPU: attention kernels", "Single-process train step on
  CPU").

Every kernel computes the same function; the choice changes speed and memory only. How the
kernels avoid scattering T^2 gradients into the bias table is in ``attention_kernels.py``.

Document masking (packed fine-tuning sequences): ``Attention.forward(..., doc_ids=...)``, a
(B, T) integer per position, equal within one example; a query attends to key k only if k is
not in its future and has the same id. The bias depends on q - k alone, so every example of a
packed sequence gets exactly the outputs it would get alone. Every kernel takes it (sdpa and
cpu_flash as -inf in their additive mask, flex in its block mask); doc_ids=None is the plain
causal call, unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from .attention_kernels import (  # noqa: F401  (FLEX_MIN_SEQ_LEN, ATTENTION_CHOICES: re-exported)
    ATTENTION_CHOICES,
    FLEX_MIN_SEQ_LEN,
    causal,
    causal_bias,
    causal_same_doc,
    check_attention_name,
    get_kernel,
    select_kernel,
)
from .config import ModelConfig


@dataclass
class AttentionSetting:
    """The attention kernel asked for (one of ATTENTION_CHOICES) and kernel tuning options
    (flex_options: FlexAttention's Triton tiles, None for flex_biased_attention's default)."""

    kernel: str = "auto"
    flex_options: dict | None = None

    def __post_init__(self):
        check_attention_name(self.kernel)


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """T5's unidirectional bucket of relative_position = key - query (integer tensor).

    Future keys (r > 0) map to bucket 0. For n = -r: 0 <= n < B/2 is its own bucket;
    larger distances are log-spaced onto B/2 .. B-1, and n >= max_distance is B-1.
    """
    n = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # log-spaced part; clamp n to 1 inside the log so exact distances do not produce -inf
    val_large = max_exact + (
        torch.log(n.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).long()
    val_large = val_large.clamp(max=num_buckets - 1)
    return torch.where(is_small, n, val_large)


class PositionCache:
    """Per-model cache of bucket indices, causal masks and block masks per (seq_len, device).

    Built once per sequence length and shared by every layer of a model (or of one
    pipeline stage), so the per-step work of a layer is a single gather from its table.
    """

    max_entries = 8  # training uses one shape; decoding walks through many, keep the latest few

    def __init__(self, num_buckets: int, max_distance: int):
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> one query's row
        self._flex: dict[tuple, tuple] = {}  # (T, device) -> (distance buckets, block mask)

    def get(self, q_len: int, k_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (buckets (Tq, Tk) long, causal (Tq, Tk) bool: True where attention is allowed).

        Queries are the last q_len of k_len positions (q_len < k_len when decoding with a cache).
        """
        if q_len == 1:
            return self._last_row(k_len, device)
        key = (q_len, k_len, str(device))
        hit = self._cache.get(key)
        if hit is None:
            q_pos = torch.arange(k_len - q_len, k_len, device=device)
            k_pos = torch.arange(k_len, device=device)
            rel = k_pos[None, :] - q_pos[:, None]  # (Tq, Tk) key - query
            hit = (relative_position_bucket(rel, self.num_buckets, self.max_distance), rel <= 0)
            if len(self._cache) >= self.max_entries:
                self._cache.pop(next(iter(self._cache)))  # the oldest
            self._cache[key] = hit
        return hit

    def distance_buckets(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """(T,) bucket of each distance n = q - k = 0 .. T-1: column 0 of the (T, T) buckets."""
        return self.get(seq_len, seq_len, device)[0][:, 0]

    def get_flex(self, seq_len: int, device: torch.device, doc_ids: torch.Tensor | None = None) -> tuple:
        """Returns (bucket of each distance n = 0 .. T-1, (T,) long; causal BlockMask).

        With doc_ids (B, T) the BlockMask is also per document, built for this call (not
        cached: the documents change with every batch)."""
        if doc_ids is not None:
            from torch.nn.attention.flex_attention import create_block_mask
            return (self.distance_buckets(seq_len, device),
                    create_block_mask(causal_same_doc(doc_ids), doc_ids.shape[0], None, seq_len, seq_len,
                                      device=device))
        key = (seq_len, str(device))
        hit = self._flex.get(key)
        if hit is None:
            from torch.nn.attention.flex_attention import create_block_mask
            hit = (self.distance_buckets(seq_len, device),
                   create_block_mask(causal, None, None, seq_len, seq_len, device=device))
            if len(self._flex) >= self.max_entries:
                self._flex.pop(next(iter(self._flex)))
            self._flex[key] = hit
        return hit

    def _last_row(self, k_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """One query against k_len keys: cached decoding asks for a new k_len every token. Served
        as a view of one row per device (r = -(n-1) .. 0), grown by doubling, so decoding neither
        rebuilds buckets per token nor evicts the prefill's entry from the dict."""
        row = self._rows.get(str(device))
        if row is None or row[0].shape[1] < k_len:
            n = max(k_len, 2 * row[0].shape[1] if row is not None else 256)
            rel = torch.arange(-(n - 1), 1, device=device)[None]  # (1, n) key - query
            row = (relative_position_bucket(rel, self.num_buckets, self.max_distance),
                   torch.ones(1, n, dtype=torch.bool, device=device))  # every key is in the past
            self._rows[str(device)] = row
        return row[0][:, -k_len:], row[1][:, -k_len:]  # (1, Tk) views


def check_doc_ids(doc_ids: torch.Tensor, x: torch.Tensor, kv_cache: dict | None) -> None:
    """Refuses doc_ids that cannot mean one document per position of x (B, T, dim)."""
    if kv_cache is not None:
        raise ValueError("doc_ids with a KV cache: document masking is for full sequences; "
                         "decode each example on its own")
    if doc_ids.shape != x.shape[:2] or doc_ids.is_floating_point() or doc_ids.is_complex() \
            or doc_ids.dtype == torch.bool or doc_ids.device != x.device:
        raise ValueError(f"doc_ids must be a (B, T) = {tuple(x.shape[:2])} integer tensor on {x.device}, "
                         f"got {tuple(doc_ids.shape)} {doc_ids.dtype} on {doc_ids.device}")


class RelativePositionBias(nn.Module):
    """A learned (num_buckets, heads) table turned into an additive attention bias."""

    def __init__(self, num_buckets: int, heads: int):
        super().__init__()
        # Zero start: position-agnostic apart from causality; the table learns quickly.
        self.weight = nn.Parameter(torch.zeros(num_buckets, heads))

    def forward(self, buckets: torch.Tensor, causal: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Returns the bias with the causal mask folded in: (1, H, Tq, Tk) in `dtype`
        (attention_kernels.causal_bias: summed into the table in fp32 in backward)."""
        return causal_bias(self.weight, buckets, causal, dtype)


class Attention(nn.Module):
    """Multi-head causal self-attention with a per-layer T5 relative position bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.dim_head = cfg.heads, cfg.dim_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.inner_dim, bias=False)  # fused Q, K, V projections
        self.out = nn.Linear(cfg.inner_dim, cfg.dim, bias=False)
        self.rel_bias = RelativePositionBias(cfg.num_buckets, cfg.heads)
        self._kernel_cache: dict = {}  # the kernels' per-layer cache (cpu_flash: its bias matrix); not state

    def forward(self, x: torch.Tensor, positions: PositionCache, setting: AttentionSetting,
                kv_cache: dict | None = None, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, dim). doc_ids: None, or (B, T) integers, one value per packed example: a
        query then attends only to earlier keys with its own value (full sequences only)."""
        t = x.shape[1]
        if doc_ids is not None:
            check_doc_ids(doc_ids, x, kv_cache)
        k_len = t + (kv_cache["k"].shape[2] if kv_cache is not None and "k" in kv_cache else 0)
        dropout = self.dropout if self.training else 0.0
        kernel = get_kernel(select_kernel(setting.kernel, x.device, t, k_len, dropout > 0,
                                          max_distance=positions.max_distance, doc_masked=doc_ids is not None))
        if torch.compiler.is_compiling() and not kernel.compilable:
            # Inside torch.compile the sdpa paths run eagerly: with their custom autograd
            # functions traced, inductor crashed (CPU, torch 2.13: munmap_chunk, corrupted view
            # metadata). The rest of the block stays compiled; flex is traced as is.
            return self._forward_eager(x, positions, setting, kv_cache, kernel.run, dropout, doc_ids)
        return self._forward(x, positions, setting, kv_cache, kernel.run, dropout, doc_ids)

    @torch.compiler.disable
    def _forward_eager(self, x, positions, setting, kv_cache, run, dropout, doc_ids):
        return self._forward(x, positions, setting, kv_cache, run, dropout, doc_ids)

    def _forward(self, x: torch.Tensor, positions: PositionCache, setting: AttentionSetting,
                 kv_cache: dict | None, run, dropout: float, doc_ids: torch.Tensor | None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        if kv_cache is not None:  # decoding: append this step's keys and values
            if "k" in kv_cache:
                k = torch.cat([kv_cache["k"], k], dim=2)
                v = torch.cat([kv_cache["v"], v], dim=2)
            kv_cache["k"], kv_cache["v"] = k, v
        y = run(q, k, v, self.rel_bias.weight, positions, dropout=dropout, layer_cache=self._kernel_cache,
                options=setting.flex_options, doc_ids=doc_ids)  # (B, H, T, D)
        return self.out(rearrange(y, "b h t d -> b t (h d)"))
