"""The attention kernels on CUDA against the naive oracle (lamda_pipe.reference, float64 on the
CPU), and the whole model with flex against sdpa. Skipped without a CUDA GPU.

Errors are relative, ||x - ref|| / ||ref||, for the output and the gradients of q, k, v and the
bias table; tolerances 1e-4 in fp32 and 2e-2 in bf16 (naive attention computed in bf16 itself
is ~5e-3 off: docs/benchmarks.md, "One GPU: attention kernels").
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lamda_pipe.attention import PositionCache
from lamda_pipe.attention_kernels import get_kernel
from lamda_pipe.config import ModelConfig
from lamda_pipe.model import LaMDA
from lamda_pipe.reference import naive_attention, naive_bias

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NB, MAXD = 32, 128  # the presets' bucket settings
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(x).all():
        return math.inf
    return ((x - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", ["flex", "sdpa"])
def test_kernel_matches_naive_oracle(kernel, dtype):
    """B=2, H=8, T=300 (past max_distance, so the far bucket and the band's far total count),
    D=64; the kernel's default options (flex: FLEX_KERNEL_OPTIONS_16BIT in bf16)."""
    b, h, t, d = 2, 8, 300, 64
    device = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, gout = (torch.randn(b, h, t, d, generator=g) for _ in range(4))
    table = torch.randn(NB, h, generator=g)
    leaves64 = [x.double().requires_grad_() for x in (q, k, v, table)]
    ref = naive_attention(*leaves64[:3], naive_bias(leaves64[3], t, t, NB, MAXD))
    ref_grads = torch.autograd.grad(ref, leaves64, gout.double())

    leaves = [x.to(device, dtype, copy=True).requires_grad_() for x in (q, k, v)]
    leaves.append(table.to(device).requires_grad_())  # the bias table stays fp32, as in the model
    out = get_kernel(kernel).run(*leaves, PositionCache(NB, MAXD), dropout=0.0, layer_cache={}, options=None)
    grads = torch.autograd.grad(out, leaves, gout.to(device, dtype))
    errors = {"out": rel_err(out, ref)}
    errors.update({f"d{n}": rel_err(gr, r) for n, gr, r in zip(("q", "k", "v", "table"), grads, ref_grads)})
    assert all(e <= TOLERANCE[dtype] for e in errors.values()), errors


def test_model_flex_matches_sdpa():
    """A 2-layer model in fp32 with attention='flex' against 'sdpa': logits and every weight
    gradient, the bias tables non-zero so positions matter."""
    device = torch.device("cuda")
    cfg = ModelConfig(vocab_size=1000, dim=256, depth=2, heads=4, dim_head=64, max_seq_len=256)
    tokens = torch.randint(0, cfg.vocab_size, (2, 257), generator=torch.Generator().manual_seed(1)).to(device)
    out = {}
    for kernel in ("sdpa", "flex"):
        torch.manual_seed(0)
        model = LaMDA(config=cfg, attention=kernel).to(device)
        with torch.no_grad():
            for blk in model.blocks:
                blk.attn.rel_bias.weight.normal_()
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        out[kernel] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    assert rel_err(out["flex"][0], out["sdpa"][0]) <= TOLERANCE[torch.float32]
    worst = max(rel_err(out["flex"][1][n], gr) for n, gr in out["sdpa"][1].items())
    assert worst <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", ["flex", "sdpa"])
def test_doc_masked_kernel_matches_naive_oracle(kernel, dtype):
    """As above with doc_ids: rows packing 3 examples (one past max_distance, one shorter than
    a flex tile), so flex's own backward (q, k, v) and the band gradient of the table both
    meet document boundaries; two different packings through one compiled flex."""
    b, h, t, d = 2, 8, 300, 64
    device = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(1)
    q, k, v, gout = (torch.randn(b, h, t, d, generator=g) for _ in range(4))
    table = torch.randn(NB, h, generator=g)
    for lengths in ([[200, 30, 70], [70, 200, 30]], [[13, 150, 137], [300]]):
        doc_ids = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths])
        leaves64 = [x.double().requires_grad_() for x in (q, k, v, table)]
        ref = naive_attention(*leaves64[:3], naive_bias(leaves64[3], t, t, NB, MAXD), doc_ids)
        ref_grads = torch.autograd.grad(ref, leaves64, gout.double())

        leaves = [x.to(device, dtype, copy=True).requires_grad_() for x in (q, k, v)]
        leaves.append(table.to(device).requires_grad_())
        out = get_kernel(kernel).run(*leaves, PositionCache(NB, MAXD), dropout=0.0, layer_cache={}, options=None,
                                     doc_ids=doc_ids.to(device))
        grads = torch.autograd.grad(out, leaves, gout.to(device, dtype))
        errors = {"out": rel_err(out, ref)}
        errors.update({f"d{n}": rel_err(gr, r) for n, gr, r in zip(("q", "k", "v", "table"), grads, ref_grads)})
        assert all(e <= TOLERANCE[dtype] for e in errors.values()), (lengths, errors)
