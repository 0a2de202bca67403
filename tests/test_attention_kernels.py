"""The attention kernel table's selection rules (lamda_pipe.attention_kernels.select_kernel):
every row of the rules in lamda_pipe/attention.py's docstring, and refusals. No kernel runs here;
tests/test_model.py runs the kernels against the naive oracle."""

import pytest
import torch

import lamda_pipe.attention_kernels as kernels_mod
from lamda_pipe import LaMDA
from lamda_pipe.attention import ATTENTION_CHOICES, AttentionSetting
from lamda_pipe.attention_kernels import FLEX_MIN_SEQ_LEN, select_kernel
from tests.helpers import TINY

pytestmark = pytest.mark.unit


CPU, CUDA = torch.device("cpu"), torch.device("cuda")
MAXD = 128  # cpu_flash pays off from T > 2 * MAXD = 256


@pytest.mark.parametrize("asked,device,tq,tk,dropout,has_flash,expect", [
    # "sdpa" (and "auto" off CUDA): cpu_flash for CPU full sequences longer than 2 x max_distance
    ("sdpa", CPU, 257, 257, False, True, "cpu_flash"),
    ("sdpa", CPU, 256, 256, False, True, "sdpa"),  # T = 2 x max_distance: not yet
    ("sdpa", CPU, 4096, 4096, False, False, "sdpa"),  # torch without the CPU flash op
    ("sdpa", CPU, 4096, 4096, True, True, "sdpa"),  # attention dropout
    ("sdpa", CPU, 1, 4096, False, True, "sdpa"),  # KV-cache decoding
    ("sdpa", CPU, 300, 4096, False, True, "sdpa"),  # a chunk against the cache
    ("sdpa", CUDA, 4096, 4096, False, True, "sdpa"),  # CUDA: never flex unless asked or auto
    ("auto", CPU, 257, 257, False, True, "cpu_flash"),
    ("auto", CPU, 256, 256, False, True, "sdpa"),
    ("auto", CPU, 4096, 4096, False, False, "sdpa"),
    # "auto" on CUDA: flex for full sequences from FLEX_MIN_SEQ_LEN on without dropout
    ("auto", CUDA, FLEX_MIN_SEQ_LEN, FLEX_MIN_SEQ_LEN, False, True, "flex"),
    ("auto", CUDA, FLEX_MIN_SEQ_LEN - 1, FLEX_MIN_SEQ_LEN - 1, False, True, "sdpa"),
    ("auto", CUDA, 4096, 4096, True, True, "sdpa"),  # attention dropout
    ("auto", CUDA, 1, 4096, False, True, "sdpa"),  # KV-cache decoding
    ("auto", CUDA, 4096, 8192, False, True, "sdpa"),
    # "flex" asked: every full sequence, any device and length; decoding falls back to the sdpa rules
    ("flex", CPU, 16, 16, False, True, "flex"),
    ("flex", CUDA, 16, 16, False, True, "flex"),
    ("flex", CPU, 1, 16, False, True, "sdpa"),
    ("flex", CPU, 1, 4096, True, True, "sdpa"),  # decoding with dropout: no error, sdpa
    # "cpu_flash" asked: wherever it can run, at any length; sdpa where it cannot
    ("cpu_flash", CPU, 16, 16, False, True, "cpu_flash"),
    ("cpu_flash", CPU, 4096, 4096, False, False, "sdpa"),
    ("cpu_flash", CPU, 300, 300, True, True, "sdpa"),
    ("cpu_flash", CPU, 1, 300, False, True, "sdpa"),
    ("cpu_flash", CUDA, 4096, 4096, False, True, "sdpa"),
])
def test_select_kernel(monkeypatch, asked, device, tq, tk, dropout, has_flash, expect):
    monkeypatch.setattr(kernels_mod, "HAS_CPU_FLASH", has_flash)
    assert select_kernel(asked, device, tq, tk, dropout, max_distance=MAXD) == expect


def test_select_kernel_threshold_follows_max_distance():
    assert select_kernel("sdpa", CPU, 41, 41, False, max_distance=20) == "cpu_flash"
    assert select_kernel("sdpa", CPU, 40, 40, False, max_distance=20) == "sdpa"


def test_check_request_refuses_a_kernel_asked_for_where_it_cannot_run():
    """The one check of what a run asks for (preflight calls it): flex trains on CUDA only and
    has no dropout; "auto" and the others always pass (their rules hand the call on)."""
    from lamda_pipe.attention_kernels import check_request

    with pytest.raises(ValueError, match="--attention flex needs a CUDA GPU .*; use --attention auto or sdpa"):
        check_request("flex", "cpu", 0.0)
    with pytest.raises(ValueError, match="--attention flex has no attention dropout and the model's dropout is 0.1"):
        check_request("flex", "cuda", 0.1)
    check_request("flex", "cuda", 0.0)
    check_request("flex", "cpu", 0.0, training=False)  # forward only: torch runs flex on CPU
    for name in ("auto", "cpu_flash", "sdpa"):
        for device in ("cpu", "cuda"):
            check_request(name, device, 0.1)
    with pytest.raises(ValueError, match="choose one of: auto, flex, cpu_flash, sdpa"):
        check_request("flash", "cuda", 0.0)


def test_select_kernel_refuses_flex_with_dropout_and_unknown_names():
    for device in (CPU, CUDA):
        with pytest.raises(ValueError, match="has no attention dropout"):
            select_kernel("flex", device, 16, 16, True, max_distance=MAXD)
    assert ATTENTION_CHOICES == ("auto", "flex", "cpu_flash", "sdpa")
    message = "choose one of: auto, flex, cpu_flash, sdpa"
    with pytest.raises(ValueError, match=message):
        select_kernel("flash", CPU, 16, 16, False, max_distance=MAXD)
    with pytest.raises(ValueError, match=message):
        AttentionSetting("flash")
    with pytest.raises(ValueError, match=message):
        LaMDA(config=TINY, attention="flash")
    with pytest.raises(ValueError, match=message):
        LaMDA(config=TINY).set_attention("flash2")
