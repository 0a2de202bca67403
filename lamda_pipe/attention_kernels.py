"""Kernels for causal attention whose bias depends only on the distance q - k (T5 buckets),
and the table that names them.

* ``flex_biased_attention`` (kernel ``flex``, CUDA): FlexAttention, the bias read in a
  ``score_mod`` from a (H, T) bias-by-distance tensor, causality as a ``BlockMask`` (tiles above
  the diagonal are skipped). Nothing of size T x T exists, forward or backward.
* ``cpu_flash_biased_attention`` (kernel ``cpu_flash``, CPU): the SDPA flash kernel with
  ``is_causal`` and the bias as a constant (H, T, T) matrix, built as a band
  (``causal_bias_matrix``) and kept per layer.
* ``sdpa_biased_attention`` (kernel ``sdpa``, everywhere): ``F.scaled_dot_product_attention``
  with a (1, H, Tq, Tk) bias that has the causal mask folded in as -inf (``_CausalBias``). The
  only kernel for KV-cache decoding (Tq < Tk) and attention dropout; the parity path.

Neither flex nor cpu_flash computes the bias table's gradient itself: flex's would add every
score's gradient atomically into the bias it read, and CPU SDPA leaves its flash kernel for the
math one when the bias requires grad. ``_BandBiasGrad`` computes it instead from a band of width
max_distance (``band_bias_grad``), exact because every softmax-gradient row sums to zero.

The table (``KERNELS``, at the end) gives every kernel one call signature
``run(q, k, v, table, positions, *, dropout, layer_cache, options, doc_ids=None)`` and one
selection rule; ``select_kernel`` walks it in order and returns the first kernel whose rule
takes the call. doc_ids (document masking, lamda_pipe/attention.py) reaches every kernel.
Adding a kernel: one function with that signature, one ``Kernel`` entry, one rule.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .errors import ConfigError

# Triton tile sizes for FlexAttention in bf16/fp16. torch's Hopper defaults for head dim 64
# (forward 128 x 128, 3 stages) need more shared memory than an H100/H200 has once our
# score_mod's bias read is fused in, and fail to compile; bench/gpu.py times the candidates.
FLEX_KERNEL_OPTIONS_16BIT = {
    "fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4,
    "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
    "bwd_num_stages": 3, "bwd_num_warps": 4,
}


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def causal_same_doc(doc_ids: torch.Tensor):
    """FlexAttention mask_mod: causal, and query and key in the same document (doc_ids (B, T))."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
    return mask_mod


def same_doc(doc_ids: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, Tq, Tk) bool, True where query and key are in the same document; doc_ids (B, Tk),
    the queries are its last q_len positions."""
    return doc_ids[:, -q_len:, None] == doc_ids[:, None, :]


@functools.cache
def _compiled_flex_attention():
    """flex_attention compiled once per process (Triton kernels on CUDA); eager flex attention
    would materialise the scores. Shapes are static in training, so no dynamic shapes."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def flex_biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                          distance_buckets: torch.Tensor, block_mask, kernel_options: dict | None = None,
                          window: int = 128, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(d) + table[bucket(q - k), h]) v with FlexAttention.

    q, k, v: (B, H, T, D); table: (NB, H); distance_buckets: (T,), the bucket of distance n.
    Distances >= window must all share one bucket (window = max_distance does).
    kernel_options: Triton tiles; None takes FLEX_KERNEL_OPTIONS_16BIT for bf16/fp16 on CUDA.
    doc_ids: (B, T) or None; given, block_mask must be causal_same_doc's (the table's gradient
    then leaves out pairs in different documents).

    The table's gradient does not come from flex's own backward: that one adds every score's
    gradient atomically into the (H, T) bias it read (H * T^2 atomics into H * T addresses, the
    bottleneck of the whole layer; docs/benchmarks.md, "One GPU: attention kernels"). Flex gets
    the bias as a constant; _BandBiasGrad computes the table's gradient from a band of width
    `window` (see there).
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
                                  distance_buckets, window, doc_ids)
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
                               distance_buckets: torch.Tensor, window: int, cache: dict | None = None,
                               doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The sdpa path on CPU for full sequences without attention dropout.

    With a bias that requires grad, CPU SDPA leaves its flash kernel for the math one, which
    materialises scores, probabilities and their gradients. Here the flash kernel gets the bias
    as a constant, causality as is_causal (tiles above the diagonal are skipped), and returns
    the logsumexp; the table's gradient comes from _BandBiasGrad as on the flex path.

    cache (the layer's own dict): the (H, T, T) bias matrix is kept and only its band is
    rewritten, and only when the bias values have changed (compared, not tracked: optimizers
    write weights through .data, which no version counter sees): allocating a fresh matrix per
    layer and step is mostly page faults. Micro-batches of one step all reuse it untouched, so
    a graph that saved it never sees it change before its backward. Measurements: docs/
    benchmarks.md, "Single-process train step on CPU".

    doc_ids (B, T): the kept matrix with -inf between documents, a fresh (B, H, T, T) per call
    (the flash kernel takes one additive mask); the shift is still one constant per row.
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
    mask = bias.unsqueeze(0)  # (1, H, T, T)
    if doc_ids is not None:
        mask = torch.where(same_doc(doc_ids, t)[:, None], mask, float("-inf"))  # (B, H, T, T)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, True, attn_mask=mask)[:2]
    if table.requires_grad and torch.is_grad_enabled():
        lse = lse + shift[:, None].to(lse.dtype)  # the logsumexp of the unshifted scores
        out = _BandBiasGrad.apply(out, q.detach(), k.detach(), v.detach(), lse.detach(), table,
                                  distance_buckets, window, doc_ids)
    return out


def band_bias_grad(q, k, v, out, dout, lse, bias_by_distance, window: int, block: int = 64,
                   doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the score gradients dS over all (b, q, k) at each distance n = q - k, fp32 (or
    float64 for float64 inputs), for causal attention with a distance bias, from a band only.

    dS = P * (dP - delta) with P = exp(S - lse), dP = dout . v, delta = rowsum(dout * out).
    Distances n < window are summed exactly: queries in blocks of `block`, each against the
    window + block keys before and at it (a strided view): O(T * (window + block)) work instead
    of the O(T^2) of the full scores (block 64: the fastest of 16..128 on CPU). Every row of dS
    sums to zero (softmax), so all distances >= window together sum to minus the band's total.
    doc_ids (B, T): pairs in different documents are left out of the band; the far total stays
    exact, since their P = 0 makes their dS = 0, so each row's allowed dS still sum to zero.

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
    if doc_ids is not None:  # the padding's ids never count: valid is False there
        doc_q = F.pad(doc_ids, (0, pad)).view(b, nb, s)[:, None, :, :, None]  # (B, 1, nb, S, 1)
        doc_k = F.pad(doc_ids, (w, pad)).unfold(1, w + s, s)[:, None, :, None, :]  # (B, 1, nb, 1, W+S)
        valid = valid & (doc_q == doc_k)  # (B, 1, nb, S, W+S)
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
    def forward(ctx, out, q, k, v, lse, table, distance_buckets, window, doc_ids=None):
        ctx.save_for_backward(out, q, k, v, lse, table, distance_buckets, doc_ids)
        ctx.window = window
        return out.clone()

    @staticmethod
    def backward(ctx, dout):
        out, q, k, v, lse, table, distance_buckets, doc_ids = ctx.saved_tensors
        t, w = q.shape[2], ctx.window
        with torch.no_grad():
            bias = table.t()[:, distance_buckets]
            sums = band_bias_grad(q, k, v, out, dout, lse, bias, w, doc_ids=doc_ids)  # (H, min(T, W) [+ 1])
            grad = torch.zeros(table.shape, device=table.device, dtype=sums.dtype)
            idx = distance_buckets[:min(t, w)]
            if t > w:
                idx = torch.cat([idx, distance_buckets[w:w + 1]])
            grad.index_add_(0, idx, sums.t())
        return dout, None, None, None, None, grad.to(table.dtype), None, None, None


class _CausalBias(torch.autograd.Function):
    """(table (NB, H) fp32, buckets, causal) -> the (H, Tq, Tk) bias table.t()[:, buckets] with
    -inf where causal is False, and a backward that does not scatter H * Tq * Tk gradients into
    NB * H slots one by one.

    Autograd's own gather backward (index_put_ with accumulate) sorts or atomically adds all
    H * Tq * Tk values into NB * H addresses; on CUDA that dwarfed the attention kernel itself
    (docs/benchmarks.md, "One GPU: attention kernels"). For a full sequence (Tq == Tk) the bucket
    of an allowed (q, k) depends only on the distance n = q - k, so the gradient is summed along
    each diagonal first (a strided view, one pass), then the T per-distance sums go to their
    buckets. Masked positions get no gradient: the bias there is the constant -inf."""

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


def causal_bias(table: torch.Tensor, buckets: torch.Tensor, causal: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (1, H, Tq, Tk) bias in `dtype` with the causal mask folded in as -inf.

    Gathered from the fp32 table and cast after, so that in backward the (H, Tq, Tk) gradient
    is summed into the table in fp32: summed in bf16, T^2 terms lose too much precision (the bf16
    check in tests/test_cuda.py)."""
    return _CausalBias.apply(table.float(), buckets, causal).to(dtype).unsqueeze(0)


# ---------------------------------------------------------------------------------------------
# The kernel table. Every kernel runs as
#   run(q, k, v, table, positions, *, dropout, layer_cache, options, doc_ids=None) -> (B, H, Tq, D)
# q (B, H, Tq, D), k/v (B, H, Tk, D); table (NB, H), the layer's bias weights; positions, the
# model's lamda_pipe.attention.PositionCache; dropout, the attention dropout probability;
# layer_cache, a dict the calling layer keeps for the kernel; options, the model's kernel
# tuning options (AttentionSetting.flex_options), None for the defaults; doc_ids, None or the
# (B, Tk) document of each key (queries: the last Tq), attention only within a document.
# ---------------------------------------------------------------------------------------------

FLEX_MIN_SEQ_LEN = 2048  # "auto" takes flex from here on (docs/benchmarks.md, "One GPU: attention kernels")


def _run_flex(q, k, v, table, positions, *, dropout, layer_cache, options, doc_ids=None):
    distance_buckets, block_mask = positions.get_flex(q.shape[2], q.device, doc_ids)
    return flex_biased_attention(q, k, v, table, distance_buckets, block_mask, options,
                                 window=positions.max_distance, doc_ids=doc_ids)


def _run_cpu_flash(q, k, v, table, positions, *, dropout, layer_cache, options, doc_ids=None):
    return cpu_flash_biased_attention(q, k, v, table, positions.distance_buckets(q.shape[2], q.device),
                                      window=positions.max_distance, cache=layer_cache, doc_ids=doc_ids)


def sdpa_biased_attention(q, k, v, table, positions, *, dropout, layer_cache, options, doc_ids=None):
    idx, causal_mask = positions.get(q.shape[2], k.shape[2], q.device)
    mask = causal_bias(table, idx, causal_mask, q.dtype)  # (1, H, Tq, Tk) bias + causal mask
    if doc_ids is not None:  # masked entries get P = 0, hence no gradient into the table
        mask = torch.where(same_doc(doc_ids, q.shape[2])[:, None], mask, float("-inf"))  # (B, H, Tq, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


# Selection rules: rule(asked, device, q_len, k_len, dropout_active, max_distance, doc_masked)
# -> whether this kernel takes the call (doc_masked: doc_ids given). select_kernel tries them
# in table order; sdpa takes every call.

def _flex_limits(device_type: str, dropout: float, training: bool) -> str | None:
    if training and device_type != "cuda":
        return "needs a CUDA GPU (torch has no FlexAttention backward on CPU)"
    if dropout > 0:
        return f"has no attention dropout and the model's dropout is {dropout}"
    return None


def _flex_rule(asked, device, q_len, k_len, dropout_active, max_distance, doc_masked) -> bool:
    if q_len != k_len:
        return False  # KV-cache decoding: flex has no Tq < Tk path here
    if asked == "flex":
        if dropout_active:
            raise ConfigError("attention 'flex' has no attention dropout; use attention 'sdpa' or 'auto', "
                             "or dropout 0")
        return True
    # Below FLEX_MIN_SEQ_LEN the masked sdpa path is faster on CUDA; on CPU torch has no flex backward.
    return asked == "auto" and device.type == "cuda" and not dropout_active and q_len >= FLEX_MIN_SEQ_LEN


def _cpu_flash_rule(asked, device, q_len, k_len, dropout_active, max_distance, doc_masked) -> bool:
    if not (device.type == "cpu" and q_len == k_len and not dropout_active and HAS_CPU_FLASH):
        return False  # where it cannot run, every choice (cpu_flash included) falls to sdpa
    # Below 2 x max_distance the band gradient costs about as much as causal attention itself
    # and the masked sdpa path is faster (docs/benchmarks.md, "Single-process train step on CPU").
    # A doc mask (doc_masked) adds the same (B, H, T, T) mask to both paths: the same rule.
    return asked == "cpu_flash" or q_len > 2 * max_distance


def _sdpa_rule(asked, device, q_len, k_len, dropout_active, max_distance, doc_masked) -> bool:
    return True  # the universal fallback


def _no_limits(device_type: str, dropout: float, training: bool) -> str | None:
    return None  # where it cannot run, its rule hands the call to another kernel


class Kernel(NamedTuple):
    name: str
    run: Callable[..., torch.Tensor]  # the one call signature above
    rule: Callable[..., bool]  # whether it takes a call, given what was asked (rules above)
    compilable: bool  # traced by torch.compile; the others run eagerly inside a compiled region
    # (device type, dropout, training) -> why it cannot be asked for there, or None
    limits: Callable[[str, float, bool], str | None] = _no_limits


KERNELS = (  # in the order select_kernel tries them; sdpa, which takes every call, last
    Kernel("flex", _run_flex, _flex_rule, compilable=True, limits=_flex_limits),
    Kernel("cpu_flash", _run_cpu_flash, _cpu_flash_rule, compilable=False),
    Kernel("sdpa", sdpa_biased_attention, _sdpa_rule, compilable=False),
)
ATTENTION_CHOICES = ("auto", *(k.name for k in KERNELS))  # what a user may ask for


def check_attention_name(name: str) -> str:
    if name not in ATTENTION_CHOICES:
        raise ConfigError(f"unknown attention kernel {name!r}; choose one of: {', '.join(ATTENTION_CHOICES)}")
    return name


def check_request(asked: str, device_type: str, dropout: float, training: bool = True) -> None:
    """Refuses a kernel asked for by name where it cannot run (its `limits`): the one place a run,
    a tool or a layer checks what was asked; "auto" is always possible."""
    check_attention_name(asked)
    for kernel in KERNELS:
        why = kernel.name == asked and kernel.limits(device_type, dropout, training)
        if why:
            raise ConfigError(f"--attention {asked} {why}; use --attention auto or sdpa")


def select_kernel(asked: str, device: torch.device, q_len: int, k_len: int, dropout_active: bool, *,
                  max_distance: int, doc_masked: bool = False) -> str:
    """The kernel (a name in KERNELS) that runs a call, given the kernel asked for (one of
    ATTENTION_CHOICES): the first in KERNELS whose rule takes it.

    q_len < k_len is decoding with a KV cache. max_distance (the model's) sets where cpu_flash
    starts to pay off. doc_masked: the call has doc_ids (attention within documents only).
    Raises ValueError for an unknown name and for flex asked with dropout.
    """
    check_attention_name(asked)
    for kernel in KERNELS:
        if kernel.rule(asked, device, q_len, k_len, dropout_active, max_distance, doc_masked):
            return kernel.name
    raise AssertionError("unreachable: the sdpa rule takes every call")


def get_kernel(name: str) -> Kernel:
    for kernel in KERNELS:
        if kernel.name == name:
            return kernel
    raise ValueError(f"unknown attention kernel {name!r}; the kernels are: {', '.join(k.name for k in KERNELS)}")
