"""Document masking (doc_ids: several examples packed into one sequence, attention never crosses
an example's boundary) in every attention kernel, against lamda_pipe.reference's naive oracle.

The T5 bias depends only on q - k, so each packed example must get exactly the logits it gets
alone. Examples are shorter and longer than 2 x max_distance (and one longer than a 128-wide
flex tile), so that the band and the far bucket of the band gradient, cpu_flash's band matrix
and flex's partly masked tiles all meet document boundaries.
"""

import inspect
import math

import pytest
import torch

import lamda_pipe.attention as attention_mod
import lamda_pipe.attention_kernels as kernels_mod
from lamda_pipe.attention import AttentionSetting, PositionCache, relative_position_bucket
from lamda_pipe.attention_kernels import KERNELS, _BandBiasGrad, get_kernel, select_kernel
from lamda_pipe.model import Attention
from lamda_pipe.reference import naive_attention, naive_bias
from tests.helpers import TINY_FEW_BUCKETS, tiny_model

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]  # one_thread: see tests/conftest.py

CFG = TINY_FEW_BUCKETS.replace(max_seq_len=256)  # 8 buckets, max_distance 20: band gradient from T > 40
NB, MAXD = CFG.num_buckets, CFG.max_distance
# sdpa and flex gather the bias from the table in fp32 (by design: summed in fp32 in backward),
# so in float64 they agree with the oracle to fp32 rounding of the bias; cpu_flash to float64's.
TOL = {"sdpa": 1e-6, "flex": 1e-6, "cpu_flash": 1e-10, "naive": 1e-10}

# (lengths of the examples in each row, their doc ids in each row, dtype of doc_ids)
PACKINGS = {
    # 13 < max_distance < 30 < 2 x max_distance < 57: T = 100
    "T100": ([[13, 57, 30], [30, 13, 57]], [[5, 2, 9], [0, 1, 3]], torch.int64),
    # a 150-token example spans two flex tiles and reaches the far bucket: T = 220
    "T220": ([[150, 13, 57], [57, 150, 13]], [[1, 0, 2], [7, -3, 4]], torch.int16),
}


def packed(name: str, vocab: int, seed: int = 0):
    """(tokens (2, T), doc_ids (2, T), the examples: (row, start, length) each)."""
    lengths, ids, dtype = PACKINGS[name]
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths[0])
    tokens = torch.randint(vocab, (len(lengths), t), generator=g)
    doc_ids = torch.empty(len(lengths), t, dtype=dtype)
    examples = []
    for row, (lens, docs) in enumerate(zip(lengths, ids)):
        start = 0
        for n, doc in zip(lens, docs):
            doc_ids[row, start:start + n] = doc
            examples.append((row, start, n))
            start += n
    return tokens, doc_ids, examples


def naive_logits(model, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The model's forward with the attention done by the oracle (naive_bias, naive_attention)."""
    b, t = tokens.shape
    x = model.embed(tokens)
    for block in model.blocks:
        attn = block.attn
        h, d = attn.heads, attn.dim_head
        q, k, v = (block.attn_norm(x) @ attn.qkv.weight.t()).view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)  # (B, H, T, D)
        y = naive_attention(q, k, v, naive_bias(attn.rel_bias.weight, t, t, NB, MAXD), doc_ids)
        x = x + y.permute(0, 2, 1, 3).reshape(b, t, h * d) @ attn.out.weight.t()
        x = x + block.ff(block.ff_norm(x))
    return model.embed.logits(model.norm(x))


@pytest.fixture
def chosen(monkeypatch):
    """Records every select_kernel call Attention makes: (its doc_masked flag, the kernel)."""
    calls = []

    def recording(*args, **kwargs):
        name = select_kernel(*args, **kwargs)
        calls.append((kwargs.get("doc_masked", False), name))
        return name

    monkeypatch.setattr(attention_mod, "select_kernel", recording)
    return calls


# ---------------------------------------------------------------------------------------------
# 1. A packed sequence gives every example the logits it gets alone
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("packing", sorted(PACKINGS))
@pytest.mark.parametrize("kernel", ["sdpa", "cpu_flash", "flex", "naive"])
def test_packed_examples_match_each_alone(monkeypatch, chosen, kernel, packing):
    """Each example of a packed batch, run alone through the oracle (no doc_ids), against the
    packed batch with doc_ids through `kernel` (naive: the oracle's own doc mask). float64."""
    if kernel == "sdpa":  # asked for on CPU, T > 2 x max_distance would run cpu_flash instead
        monkeypatch.setattr(kernels_mod, "HAS_CPU_FLASH", False)
    model = tiny_model(CFG, bias_std=1.0).double()
    model.set_attention("sdpa" if kernel == "naive" else kernel)
    tokens, doc_ids, examples = packed(packing, CFG.vocab_size)
    with torch.no_grad():
        got = naive_logits(model, tokens, doc_ids) if kernel == "naive" else model(tokens, doc_ids=doc_ids)
        for row, start, n in examples:
            alone = naive_logits(model, tokens[row:row + 1, start:start + n])[0]
            torch.testing.assert_close(got[row, start:start + n], alone, atol=TOL[kernel], rtol=TOL[kernel],
                                       msg=lambda m: f"example at row {row}, {start}..{start + n}: {m}")
    if kernel != "naive":
        assert chosen == [(True, kernel)] * CFG.depth  # every layer ran `kernel`, doc-masked


# ---------------------------------------------------------------------------------------------
# 2. Gradients of q, k, v and the bias table
# ---------------------------------------------------------------------------------------------

def _qkv_table(b, h, t, num_buckets, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v, gout = (torch.randn(b, h, t, 8, generator=g, dtype=torch.float64) for _ in range(4))
    table = torch.randn(num_buckets, h, generator=g, dtype=torch.float64)
    return q, k, v, table, gout


def _doc_ids(t: int, lengths: list[int], dtype=torch.int64) -> torch.Tensor:
    """(2, t): row 0 packs `lengths` in order (ids 0, 1, ...), row 1 in reverse (ids 10, 11, ...)."""
    rows = [torch.cat([torch.full((n,), base + i, dtype=dtype) for i, n in enumerate(lens)])
            for base, lens in ((0, lengths), (10, lengths[::-1]))]
    assert all(len(r) == t for r in rows)
    return torch.stack(rows)


@pytest.mark.parametrize("kernel", ["sdpa", "cpu_flash"])
@pytest.mark.parametrize("t,lengths", [(130, [13, 57, 60]), (40, [25, 15])], ids=["T130", "T40"])
def test_kernel_gradients_match_naive(kernel, t, lengths):
    """Each kernel's run with doc_ids (sdpa: the masked bias's own backward; cpu_flash: the
    band gradient of the table), forward and gradients, against autograd through the oracle."""
    q, k, v, table, gout = _qkv_table(2, 3, t, NB, seed=t)
    doc_ids = _doc_ids(t, lengths, torch.int32)
    inputs = [x.requires_grad_() for x in (q, k, v, table)]
    expect = naive_attention(q, k, v, naive_bias(table, t, t, NB, MAXD), doc_ids)
    grads_expect = torch.autograd.grad(expect, inputs, gout)

    run = get_kernel(kernel).run
    got = run(q, k, v, table, PositionCache(NB, MAXD), dropout=0.0, layer_cache={}, options=None, doc_ids=doc_ids)
    torch.testing.assert_close(got, expect, atol=TOL[kernel], rtol=TOL[kernel])
    grads = torch.autograd.grad(got, inputs, gout)
    for name, g, g_expect in zip("q k v table".split(), grads, grads_expect):
        assert g_expect.abs().max() > 0.1, name
        torch.testing.assert_close(g, g_expect, atol=TOL[kernel], rtol=TOL[kernel],
                                   msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("t,num_buckets,max_distance,lengths", [
    (130, 8, 20, [13, 57, 60]),  # every example but the first reaches the far bucket
    (300, 32, 128, [200, 30, 70]),  # only the 200-token one does; blocks of 64 cross boundaries
    (40, 8, 20, [20, 20]),  # T <= 2 x window, examples exactly window long: no far distance
], ids=["T130-W20", "T300-W128", "T40-W20"])
def test_band_bias_gradient_with_documents_matches_autograd(t, num_buckets, max_distance, lengths):
    """The flex (and cpu_flash) table gradient with doc_ids: band entries across documents
    dropped, far total from the zero row sums, against autograd through the oracle."""
    q, k, v, table, gout = _qkv_table(2, 3, t, num_buckets, seed=t + 1)
    table.requires_grad_()
    doc_ids = _doc_ids(t, lengths)
    bias = naive_bias(table, t, t, num_buckets, max_distance)  # (H, T, T)
    out = naive_attention(q, k, v, bias, doc_ids)
    (expect,) = torch.autograd.grad(out, table, gout)

    allowed = torch.ones(t, t, dtype=torch.bool).tril() & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8) + bias).masked_fill(~allowed, float("-inf"))
    lse = scores.logsumexp(-1).detach()
    distance_buckets = relative_position_bucket(-torch.arange(t), num_buckets, max_distance)
    tapped = _BandBiasGrad.apply(out.detach(), q, k, v, lse, table, distance_buckets, max_distance, doc_ids)
    (got,) = torch.autograd.grad(tapped, table, gout)
    assert expect.abs().max() > 0.1
    torch.testing.assert_close(got, expect, atol=1e-10, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# 3. Selection, doc_ids=None, refusals
# ---------------------------------------------------------------------------------------------

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("asked", ["auto", "sdpa", "cpu_flash", "flex"])
@pytest.mark.parametrize("device", [CPU, CUDA], ids=["cpu", "cuda"])
@pytest.mark.parametrize("tq,tk", [(16, 16), (40, 40), (41, 41), (2048, 2048), (1, 300)])
def test_doc_masked_calls_choose_as_unmasked_ones(asked, device, tq, tk):
    """Every kernel takes doc masks at its usual cost: doc_masked changes no choice, and the
    flag's default (doc_ids=None) is the selection tests/test_attention_kernels.py pins."""
    plain = select_kernel(asked, device, tq, tk, False, max_distance=MAXD)
    assert select_kernel(asked, device, tq, tk, False, max_distance=MAXD, doc_masked=False) == plain
    assert select_kernel(asked, device, tq, tk, False, max_distance=MAXD, doc_masked=True) == plain


@pytest.mark.parametrize("asked,t,expect", [("auto", 40, "sdpa"), ("auto", 64, "cpu_flash"),
                                            ("cpu_flash", 16, "cpu_flash"), ("flex", 64, "flex")])
def test_attention_without_doc_ids_selects_and_caches_as_before(chosen, asked, t, expect):
    """doc_ids=None: Attention asks select_kernel with doc_masked False and gets the kernel it
    got before doc masks existed; flex keeps its cached causal block mask, which a doc-masked
    call neither uses nor replaces."""
    attn = Attention(CFG)
    positions = PositionCache(NB, MAXD)
    x = torch.randn(2, t, CFG.dim)
    with torch.no_grad():
        attn(x, positions, AttentionSetting(asked))
        assert chosen == [(False, expect)]
        if asked == "flex":
            cached = dict(positions._flex)
            assert list(cached) == [(t, "cpu")]
            attn(x, positions, AttentionSetting(asked), doc_ids=torch.zeros(2, t, dtype=torch.long))
            assert chosen[-1] == (True, "flex") and positions._flex == cached
            assert positions._flex[(t, "cpu")][1] is cached[(t, "cpu")][1]


def test_every_kernel_takes_doc_ids():
    for kernel in KERNELS:
        param = inspect.signature(kernel.run).parameters.get("doc_ids")
        assert param is not None and param.default is None, kernel.name


def test_doc_ids_refusals():
    attn = Attention(CFG)
    positions, setting = PositionCache(NB, MAXD), AttentionSetting()
    x = torch.randn(2, 10, CFG.dim)
    with pytest.raises(ValueError, match="KV cache"):
        attn(x, positions, setting, {}, doc_ids=torch.zeros(2, 10, dtype=torch.long))
    for bad in (torch.zeros(2, 9, dtype=torch.long), torch.zeros(10, dtype=torch.long), torch.zeros(2, 10),
                torch.zeros(2, 10, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"doc_ids must be a \(B, T\) = \(2, 10\) integer tensor on cpu"):
            attn(x, positions, setting, doc_ids=bad)
