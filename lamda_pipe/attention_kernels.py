"""Kernels for causal attention whose bias depends only on the distance q - k (T5 buckets).

* ``flex_biased_attention`` (CUDA): FlexAttention, the bias read in a ``score_mod`` from a
  (H, T) bias-by-distance tensor, causality as a ``BlockMask`` (tiles above the diagonal are
  skipped). Nothing of size T x T exists, forward or backward.
* ``cpu_flash_biased_attention`` (CPU): the SDPA flash kernel with ``is_causal`` and the bias as
  a constant (H, T, T) matrix, built as a band (``causal_bias_matrix``) and kept per layer.

Neither kernel computes the bias table's gradient itself: flex's would add every score's
gradient atomically into the bias it read, and CPU SDPA leaves its flash kernel for the math one
when the bias requires grad. ``_BandBiasGrad`` computes it instead from a band of width
max_distance (``band_bias_grad``), exact because every softmax-gradient row sums to zero.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# Triton tile sizes for FlexAttention in bf16/fp16. torch's Hopper defaults for head dim 64
# (forward 128 x 128, 3 stages) need 240 KB of shared memory once our score_mod's bias read is
# fused in, above the H100/H200's 227 KB, and fail to compile; bench/gpu.py measured these.
FLEX_KERNEL_OPTIONS_16BIT = {
    "fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4,
    "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
    "bwd_num_stages": 3, "bwd_num_warps": 4,
}


def causal(b, h, q_idx, kv_idx):
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

    from torch.nn.attention import flex_attention as flex_module
    from torch.nn.attention.flex_attention import flex_attention

    AuxRequest = getattr(flex_module, "AuxRequest", None)
    if q.is_cuda and not torch.compiler.is_compiling():
        flex = _compiled_flex_attention()
    else:  # inside a compiled region it is traced as is; on CPU eager (forward only, parity tests)
        flex = flex_attention
    if AuxRequest is not None:  # torch >= 2.9; return_lse is deprecated there
        out, aux = flex(q, k, v, score_mod=add_bias, block_mask=block_mask, kernel_options=kernel_options,
                        return_aux=AuxRequest(lse=True))
        lse = aux.lse
    else:
        out, lse = flex(q, k, v, score_mod=add_bias, block_mask=block_mask, kernel_options=kernel_options,
                        return_lse=True)
    if table.requires_grad and torch.is_grad_enabled():
        out = _BandBiasGrad.apply(out, q.detach(), k.detach(), v.detach(), lse.detach(), table,
                                  distance_buckets, window)
    return out


HAS_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


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
