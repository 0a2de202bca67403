"""Causal self-attention with a T5 relative position bias, and the two kernels that run it.

Plain PyTorch, no DeepSpeed. The per-model ``RelativePositionBuckets`` caches what every layer
needs for a sequence length (bucket indices, causal mask, FlexAttention block mask) and says
which kernel to use (``impl``):

* ``"sdpa"``: gather a (H, Tq, Tk) bias from the cached bucket indices, fold the causal mask in
  as -inf, and pass it to ``F.scaled_dot_product_attention`` as ``attn_mask``. Runs everywhere,
  supports attention dropout and KV-cache decoding (Tq < Tk); the CPU and parity path. It
  materialises the bias (and, in training, its gradient) per layer: O(H T^2) memory, and on
  CUDA it rules out the flash kernel (no mask support), leaving the memory-efficient one.
* ``"flex"``: ``torch.nn.attention.flex_attention``. The bias depends only on the distance
  n = q - k, so a layer's table is expanded to a (H, T) bias-by-distance tensor that a
  ``score_mod`` reads; causality is a ``BlockMask``, so tiles above the diagonal are skipped
  rather than computed and masked. Nothing of size T x T exists, forward or backward. Compiled
  to Triton kernels on CUDA. Limits (torch's): no attention dropout, no backward on CPU.
* ``"auto"`` (default): flex on CUDA for full sequences (training, eval, prefill) of at least
  FLEX_MIN_SEQ_LEN tokens without attention dropout; sdpa otherwise. bench/gpu.py measures both
  (docs/benchmarks.md): on an H200, forward + backward of one lamda-2b layer over 16K tokens took
  flex 11.1 / 13.2 / 17.5 ms and sdpa 8.4 / 19.0 / 53.2 ms at T = 1024 / 2048 / 4096.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import ModelConfig

ATTN_IMPLS = ("auto", "sdpa", "flex")
FLEX_MIN_SEQ_LEN = 2048  # "auto" below this: sdpa (faster at T=1024 on an H200, slower from 2048)

# Triton tile sizes for FlexAttention in bf16/fp16. torch's Hopper defaults for head dim 64
# (forward 128 x 128, 3 stages) need 240 KB of shared memory once our score_mod's bias read is
# fused in, above the H100/H200's 227 KB, and fail to compile; bench/gpu.py measured these.
FLEX_KERNEL_OPTIONS_16BIT = {
    "fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4,
    "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
    "bwd_num_stages": 3, "bwd_num_warps": 4,
}


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


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.cache
def _compiled_flex_attention():
    """flex_attention compiled once per process (Triton kernels on CUDA); eager flex attention
    would materialise the scores. Shapes are static in training, so no dynamic shapes."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def flex_biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                          distance_buckets: torch.Tensor, block_mask, kernel_options: dict | None = None,
                          window: int = 128) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(d) + table[bucket(q - k), h]) v with FlexAttention.

    q, k, v: (B, H, T, D); table: (NB, H); distance_buckets: (T,), the bucket of distance n.
    Distances >= window must all share one bucket (window = max_distance does).
    kernel_options: Triton tiles; None takes FLEX_KERNEL_OPTIONS_16BIT for bf16/fp16 on CUDA.

    The table's gradient does not come from flex's own backward: that one adds every score's
    gradient atomically into the (H, T) bias it read, 0.3 G atomics per layer at T=2048, which
    made flex 30x slower than flash attention on an H200. Flex gets the bias as a constant;
    _BandBiasGrad computes the table's gradient from a band of width `window` (see there).
    """
    if kernel_options is None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        kernel_options = FLEX_KERNEL_OPTIONS_16BIT
    bias = table.detach().float().t()[:, distance_buckets]  # (H, T): bias by distance

    def add_bias(score, b, h, q_idx, kv_idx):
        # Masked (future) positions in partly masked tiles are evaluated too: clamp keeps the
        # read in bounds, the block mask then removes them.
        return score + bias[h, (q_idx - kv_idx).clamp(min=0)]

    from torch.nn.attention.flex_attention import flex_attention
    if q.is_cuda and not torch.compiler.is_compiling():
        flex = _compiled_flex_attention()
    else:  # inside a compiled region it is traced as is; on CPU eager (forward only, parity tests)
        flex = flex_attention
    out, lse = flex(q, k, v, score_mod=add_bias, block_mask=block_mask, kernel_options=kernel_options,
                    return_lse=True)
    if table.requires_grad and torch.is_grad_enabled():
        out = _BandBiasGrad.apply(out, q.detach(), k.detach(), v.detach(), lse.detach(), table,
                                  distance_buckets, window)
    return out


_HAS_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def causal_bias_matrix(by_distance: torch.Tensor, window: int,
                       out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, T) bias per distance n = q - k -> (matrix (H, T, T), shift (H,)) with
    matrix[h, q, k] + shift[h] = by_distance[h, q - k] on and below the diagonal, 0 above it.

    Distances >= window share one value (one bucket). It is taken out as a per-head shift,
    which softmax ignores (a constant added to every key of a row), so the matrix is zero
    except a band of `window` diagonals. That band is written through a strided view; `out`,
    a matrix returned before for the same T and window, is rewritten in place and only the
    band is touched (the rest is still zero).
    """
    h, t = by_distance.shape
    w = min(window, t)
    shift = by_distance[:, -1] if t > window else by_distance.new_zeros(h)
    rel = by_distance[:, :w] - shift[:, None]  # (H, w)
    if out is None:
        out = by_distance.new_zeros(h, t, t)
    # diagonals n = 0 .. w-1 of rows q >= w-1: view[h, m, j] = out[h, j + w-1, j + m], n = w-1-m
    band = out.as_strided((h, w, t - w + 1), (t * t, 1, t + 1), (w - 1) * t)
    band.copy_(rel.flip(-1)[:, :, None].expand(h, w, t - w + 1))
    # the first w-1 rows (their diagonals start before the view's): a small gather, zero above
    q_idx = torch.arange(w - 1, device=out.device)
    n = q_idx[:, None] - q_idx[None, :]  # (w-1, w-1)
    out[:, :w - 1, :w - 1] = rel[:, n.clamp(min=0)].masked_fill(n < 0, 0.0)
    return out, shift


def cpu_flash_biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                               distance_buckets: torch.Tensor, window: int, cache: dict | None = None) -> torch.Tensor:
    """The sdpa path on CPU for full sequences without attention dropout.

    With a bias that requires grad, CPU SDPA leaves its flash kernel for the math one, which
    materialises scores, probabilities and their gradients: 1.46 s for one layer's forward and
    backward at T=2048 (8 heads, 1 thread). Here the flash kernel gets the bias as a constant,
    causality as is_causal (tiles above the diagonal are skipped), and returns the logsumexp;
    the table's gradient comes from _BandBiasGrad as on the flex path: 0.26 s + 0.07 s.

    cache (the layer's own dict): the (H, T, T) bias matrix is kept and only its band is
    rewritten, and only when the bias values have changed (compared, not tracked: optimizers
    write weights through .data, which no version counter sees): a fresh 134 MB matrix per
    layer cost 40 ms at T=2048, mostly page faults. Micro-batches of one step all reuse it
    untouched, so a graph that saved it never sees it change before its backward.
    """
    h, t = q.shape[1], q.shape[2]
    by_distance = table.detach().t()[:, distance_buckets].to(q.dtype)  # (H, T)
    key = (t, q.dtype, str(q.device))
    hit = cache.get(key) if cache is not None else None
    if hit is not None and torch.equal(hit[1], by_distance):
        bias, shift = hit[0], hit[2]
    else:
        bias, shift = causal_bias_matrix(by_distance, window, out=None if hit is None else hit[0])
        if cache is not None:
            cache[key] = (bias, by_distance, shift)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, True, attn_mask=bias.unsqueeze(0))[:2]
    if table.requires_grad and torch.is_grad_enabled():
        lse = lse + shift[:, None].to(lse.dtype)  # the logsumexp of the unshifted scores
        out = _BandBiasGrad.apply(out, q.detach(), k.detach(), v.detach(), lse.detach(), table,
                                  distance_buckets, window)
    return out


def band_bias_grad(q, k, v, out, dout, lse, bias_by_distance, window: int, block: int = 64) -> torch.Tensor:
    """Sum of the score gradients dS over all (b, q, k) at each distance n = q - k, fp32 (or
    float64 for float64 inputs), for causal attention with a distance bias, from a band only.

    dS = P * (dP - delta) with P = exp(S - lse), dP = dout . v, delta = rowsum(dout * out).
    Distances n < window are summed exactly: queries in blocks of `block`, each against the
    window + block keys before and at it (a strided view): O(T * (window + block)) work instead
    of the O(T^2) of the full scores (block 64 was the fastest of 16..128 on CPU at T=512, 2048). Every row of dS sums to zero (softmax), so
    all distances >= window together sum to minus the band's total.

    Returns (H, T) for T <= window, else (H, window + 1): entry `window` is the far total (the
    far distances share one bucket).
    """
    b, h, t, d = q.shape
    w, s = window, block
    nb = -(-t // s)
    pad = nb * s - t
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 for 16-bit inputs, float64 stays

    def query_blocks(x):  # (B, H, T, D) -> (B, H, nb, S, D), zero padded at the end
        return F.pad(x.to(acc), (0, 0, 0, pad)).view(b, h, nb, s, -1)

    def key_windows(x):  # keys q0 - W .. q0 + S - 1 of each query block -> (B, H, nb, D, W + S) view
        return F.pad(x.to(acc), (0, 0, w, pad)).unfold(2, w + s, s)

    a = torch.arange(s, device=q.device)
    c = torch.arange(w + s, device=q.device)
    n = a[:, None] + w - c[None, :]  # (S, W+S): distance q - k of query a against key c
    blk = torch.arange(nb, device=q.device)
    q_pos = blk[:, None] * s + a[None, :]  # (nb, S)
    k_pos = blk[:, None] * s - w + c[None, :]  # (nb, W+S)
    valid = (n >= 0) & (n < w) & (q_pos[:, :, None] < t) & (k_pos[:, None, :] >= 0)  # (nb, S, W+S)
    scores = query_blocks(q) @ key_windows(k) * d ** -0.5 + bias_by_distance.to(acc)[:, n.clamp(0, t - 1)][:, None]
    lse_b = F.pad(lse.to(acc), (0, pad)).view(b, h, nb, s)
    delta = F.pad((dout.to(acc) * out.to(acc)).sum(-1), (0, pad)).view(b, h, nb, s)
    ds = torch.exp(scores - lse_b[..., None]) * (query_blocks(dout) @ key_windows(v) - delta[..., None])
    m = ds.masked_fill_(~valid, 0.0).sum(dim=(0, 2))  # (H, S, W+S)
    dist = torch.arange(w, device=q.device)
    per_distance = m[:, a[None, :], a[None, :] + w - dist[:, None]].sum(-1)  # (H, W): sum_a m[h, a, a+W-n]
    far = -per_distance.sum(-1, keepdim=True)  # (H, 1): distances >= W
    return torch.cat([per_distance, far], dim=1) if t > w else per_distance[:, :t]


class _BandBiasGrad(torch.autograd.Function):
    """Identity on the attention output; in backward, the table's gradient from band_bias_grad,
    while dout flows on unchanged into flex's own backward for q, k and v."""

    @staticmethod
    def forward(ctx, out, q, k, v, lse, table, distance_buckets, window):
        ctx.save_for_backward(out, q, k, v, lse, table, distance_buckets)
        ctx.window = window
        return out.clone()

    @staticmethod
    def backward(ctx, dout):
        out, q, k, v, lse, table, distance_buckets = ctx.saved_tensors
        t, w = q.shape[2], ctx.window
        with torch.no_grad():
            bias = table.t()[:, distance_buckets]
            sums = band_bias_grad(q, k, v, out, dout, lse, bias, w)  # (H, min(T, W) [+ 1])
            grad = torch.zeros(table.shape, device=table.device, dtype=sums.dtype)
            idx = distance_buckets[:min(t, w)]
            if t > w:
                idx = torch.cat([idx, distance_buckets[w:w + 1]])
            grad.index_add_(0, idx, sums.t())
        return dout, None, None, None, None, grad.to(table.dtype), None, None


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
                   create_block_mask(_causal, None, None, seq_len, seq_len, device=device))
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
        elif x.device.type == "cpu" and t == k.shape[2] and dropout == 0 and _HAS_CPU_FLASH:
            y = cpu_flash_biased_attention(q, k, v, self.rel_bias.weight, buckets.distance_buckets(t, x.device),
                                           window=buckets.max_distance, cache=self._bias_cache)
        else:
            idx, causal = buckets.get(t, k.shape[2], x.device)
            mask = self.rel_bias(idx, causal, q.dtype)  # (1, H, Tq, Tk) bias + causal mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out(rearrange(y, "b h t d -> b t (h d)"))
