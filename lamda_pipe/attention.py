"""Causal self-attention with a T5 relative position bias, plain PyTorch (no DeepSpeed).

The per-model ``RelativePositionBuckets`` caches what every layer needs for a sequence length
(bucket indices, causal mask, FlexAttention block mask) and says which kernel to use (``impl``):

* ``"sdpa"``: ``F.scaled_dot_product_attention``. On CPU, for full sequences without attention
  dropout, its flash kernel with the bias as a constant (``cpu_flash_biased_attention``);
  otherwise (CUDA, dropout, KV-cache decoding with Tq < Tk) a (1, H, Tq, Tk) bias with the
  causal mask folded in as -inf, whose table gradient is summed along diagonals
  (``_CausalBias``). Runs everywhere; the parity path.
* ``"flex"``: FlexAttention (``flex_biased_attention``): the bias read in a ``score_mod``,
  causality as a block mask, nothing of size T x T stored. Compiled to Triton kernels on CUDA.
  Limits (torch's): no attention dropout, no backward on CPU.
* ``"auto"`` (default): flex on CUDA for full sequences (training, eval, prefill) of at least
  FLEX_MIN_SEQ_LEN tokens without attention dropout; sdpa otherwise. bench/gpu.py measures both
  (docs/benchmarks.md): on an H200, forward + backward of one lamda-2b layer over 16K tokens took
  flex 11.1 / 13.2 / 17.5 ms and sdpa 8.4 / 19.0 / 53.2 ms at T = 1024 / 2048 / 4096.

The kernels themselves, and how the bias table's gradient avoids scattering T^2 values, are in
``attention_kernels.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention_kernels import (
    HAS_CPU_FLASH,
    causal,
    cpu_flash_biased_attention,
    flex_biased_attention,
)
from .config import ModelConfig

ATTN_IMPLS = ("auto", "sdpa", "flex")
FLEX_MIN_SEQ_LEN = 2048  # "auto" below this: sdpa (faster at T=1024 on an H200, slower from 2048)


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


class RelativePositionBuckets:
    """Per-model cache of bucket indices, causal masks and block masks per (seq_len, device),
    and the attention kernel choice (``impl``: one of ATTN_IMPLS).

    Built once per sequence length and shared by every layer of a model (or of one
    pipeline stage), so the per-step work of a layer is a single gather from its table.
    """

    max_entries = 8  # training uses one shape; decoding walks through many, keep the latest few

    def __init__(self, num_buckets: int, max_distance: int, impl: str = "auto"):
        if impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attention implementation {impl!r}; choose one of: {', '.join(ATTN_IMPLS)}")
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.impl = impl
        self.flex_kernel_options: dict | None = None  # None: flex_biased_attention's default
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> one query's row
        self._flex: dict[tuple, tuple] = {}  # (T, device) -> (distance buckets, block mask)

    def use_flex(self, device: torch.device, seq_len: int, full_sequence: bool, dropout_active: bool) -> bool:
        """Whether a layer should run FlexAttention for this call (see the module docstring)."""
        if self.impl == "sdpa" or not full_sequence:
            return False  # decoding with a KV cache (Tq < Tk) always takes the sdpa path
        if self.impl == "flex":
            if dropout_active:
                raise ValueError("attention 'flex' has no attention dropout; use attention 'sdpa' or 'auto', "
                                 "or dropout 0")
            return True
        return device.type == "cuda" and not dropout_active and seq_len >= FLEX_MIN_SEQ_LEN

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

    def get_flex(self, seq_len: int, device: torch.device) -> tuple:
        """Returns (bucket of each distance n = 0 .. T-1, (T,) long; causal BlockMask)."""
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


class _CausalBias(torch.autograd.Function):
    """(table (NB, H) fp32, buckets, causal) -> the (H, Tq, Tk) bias table.t()[:, buckets] with
    -inf where causal is False, and a backward that does not scatter H * Tq * Tk gradients into
    NB * H slots one by one.

    Autograd's own gather backward (index_put_ with accumulate) sorts or atomically adds all
    H * Tq * Tk values into NB * H addresses: on CUDA that took ~230 ms per layer at T=2048
    (H=40, B=8), 100x the attention kernel. For a full sequence (Tq == Tk) the bucket of an
    allowed (q, k) depends only on the distance n = q - k, so the gradient is summed along each
    diagonal first (a strided view, one pass), then the T per-distance sums go to their buckets.
    Masked positions get no gradient: the bias there is the constant -inf."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, buckets: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(buckets, causal)
        ctx.num_buckets = table.shape[0]
        return table.t()[:, buckets].masked_fill_(~causal, float("-inf"))  # (H, Tq, Tk)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        buckets, causal = ctx.saved_tensors
        h, tq, tk = grad.shape
        acc = torch.promote_types(grad.dtype, torch.float32)  # sums in fp32 at least
        out = grad.new_zeros(ctx.num_buckets, h, dtype=acc)
        if tq != tk:  # decoding shapes: rare under autograd, plain scatter of the allowed part
            g = grad.to(acc).masked_fill(~causal, 0.0)
            return out.index_add_(0, buckets.flatten(), g.reshape(h, -1).t()), None, None
        t = tq
        # T zero rows padded below, then the view (H, n, k) -> element (q = k + n, k): row n is
        # the diagonal q - k = n; entries with k + n >= T land in the padding. The part above
        # the diagonal (future keys) is never read.
        padded = F.pad(grad, (0, 0, 0, t))  # (H, 2T, T)
        diagonals = padded.as_strided((h, t, t), (2 * t * t, t, t + 1))  # (H, n, k)
        per_distance = diagonals.sum(-1, dtype=acc)  # (H, T)
        return out.index_add_(0, buckets[:, 0], per_distance.t()), None, None  # buckets[n, 0]: distance n


class RelativePositionBias(nn.Module):
    """A learned (num_buckets, heads) table turned into an additive attention bias."""

    def __init__(self, num_buckets: int, heads: int):
        super().__init__()
        # Zero start: position-agnostic apart from causality; the table learns quickly.
        self.weight = nn.Parameter(torch.zeros(num_buckets, heads))

    def forward(self, buckets: torch.Tensor, causal: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Returns the bias with the causal mask folded in: (1, H, Tq, Tk) in `dtype`.

        Gathered from the fp32 table and cast after, so that in backward the (H, Tq, Tk)
        gradient is summed into the table in fp32: summed in bf16 its error was ~5% (bench/gpu.py).
        """
        bias = _CausalBias.apply(self.weight.float(), buckets, causal)  # (H, Tq, Tk)
        return bias.to(dtype).unsqueeze(0)


class Attention(nn.Module):
    """Multi-head causal self-attention with a per-layer T5 relative position bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.dim_head = cfg.heads, cfg.dim_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.inner_dim, bias=False)  # fused Q, K, V projections
        self.out = nn.Linear(cfg.inner_dim, cfg.dim, bias=False)
        self.rel_bias = RelativePositionBias(cfg.num_buckets, cfg.heads)
        self._bias_cache: dict = {}  # CPU flash path: this layer's bias matrix per shape (not state)

    def forward(self, x: torch.Tensor, buckets: RelativePositionBuckets,
                kv_cache: dict | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling() and not buckets.use_flex(x.device, x.shape[1], kv_cache is None,
                                                                   self.training and self.dropout > 0):
            # Inside torch.compile the sdpa paths run eagerly: with their custom autograd
            # functions traced, inductor crashed (CPU, torch 2.13: munmap_chunk, corrupted view
            # metadata). The rest of the block stays compiled; flex is traced as is.
            return self._forward_eager(x, buckets, kv_cache)
        return self._forward(x, buckets, kv_cache)

    @torch.compiler.disable
    def _forward_eager(self, x, buckets, kv_cache):
        return self._forward(x, buckets, kv_cache)

    def _forward(self, x: torch.Tensor, buckets: RelativePositionBuckets, kv_cache: dict | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        if kv_cache is not None:  # decoding: append this step's keys and values
            if "k" in kv_cache:
                k = torch.cat([kv_cache["k"], k], dim=2)
                v = torch.cat([kv_cache["v"], v], dim=2)
            kv_cache["k"], kv_cache["v"] = k, v
        dropout = self.dropout if self.training else 0.0
        if buckets.use_flex(x.device, t, t == k.shape[2], dropout > 0):
            distance_buckets, block_mask = buckets.get_flex(t, x.device)
            y = flex_biased_attention(q, k, v, self.rel_bias.weight, distance_buckets, block_mask,
                                      buckets.flex_kernel_options, window=buckets.max_distance)
        elif (x.device.type == "cpu" and t == k.shape[2] and dropout == 0 and HAS_CPU_FLASH
              and t > 2 * buckets.max_distance):
            # From 2 x max_distance on, the flash kernel + band gradient wins (readme preset,
            # fp32, 2 threads: 7.88 vs 8.78 s per step at T=512); below it the band costs about
            # as much as causal attention itself and the masked path is faster (7.73 vs 7.11 s
            # at T=256; 112 vs 78 ms for the debug preset at T=128).
            y = cpu_flash_biased_attention(q, k, v, self.rel_bias.weight, buckets.distance_buckets(t, x.device),
                                           window=buckets.max_distance, cache=self._bias_cache)
        else:
            idx, causal = buckets.get(t, k.shape[2], x.device)
            mask = self.rel_bias(idx, causal, q.dtype)  # (1, H, Tq, Tk) bias + causal mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out(rearrange(y, "b h t d -> b t (h d)"))
