"""Unit tests of lamda_pipe.config (presets, parameter and FLOP counts) and lamda_pipe.ds_config
(loading and checking the DeepSpeed JSON). Single process, CPU, nothing large allocated."""

import copy
import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lamda_pipe import LaMDA, ModelConfig, flops_per_token, param_count
from lamda_pipe.config import get_preset
from lamda_pipe.ds_config import (CONFIG_DIR, BatchShape, ConfigError, check_run, default_config_path,
                                  fill_run_values, load_config, resolve_batch)
from tests.helpers import TINY

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Presets and parameter counts
# ---------------------------------------------------------------------------------------------

def test_presets_exist():
    for name in ("debug", "readme", "lamda-2b", "lamda-8b", "lamda-137b"):
        assert isinstance(get_preset(name), ModelConfig)
    with pytest.raises(ValueError, match="lamda-137b"):  # the message lists the choices
        get_preset("lamda-999b")


# LaMDA paper, Table 27 (layers, d_model, heads) and section 3 for 137B (d_ff 65536, d_k 128);
# 2B/8B: d_k = d_model / heads, d_ff = 8 d_model (see /work/shared/notes/reference-facts.md).
PAPER = {
    # name: (layers, d_model, heads, d_k, d_ff, (low, high) bounds of the rounded count)
    "lamda-2b": (10, 2560, 40, 64, 20480, (1.8e9, 2.2e9)),
    "lamda-8b": (16, 4096, 64, 64, 32768, (7.2e9, 8.8e9)),
    "lamda-137b": (64, 8192, 128, 128, 65536, (136e9, 139e9)),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_large_preset_non_embedding_counts_match_paper_formula(name):
    layers, d, h, dk, dff, (low, high) = PAPER[name]
    cfg = get_preset(name)
    assert (cfg.depth, cfg.dim, cfg.heads, cfg.dim_head, cfg.d_ff) == (layers, d, h, dk, dff)
    # per layer: Q, K, V, O projections 4 d (h d_k); GEGLU value, gate and down 3 d d_ff
    expect = layers * (4 * d * (h * dk) + 3 * d * dff)
    got = param_count(cfg, embedding=False)
    # the library also counts the RMSNorm scales and the relative bias tables: tiny extras
    assert got >= expect
    assert abs(got - expect) / expect < 0.005, (got, expect)
    assert low <= got <= high, got


def test_137b_is_137b():
    # 64 * (4 * 8192 * 16384 + 3 * 8192 * 65536) = 64 * 2_147_483_648 = 137_438_953_472
    assert round(param_count(get_preset("lamda-137b"), embedding=False) / 1e9) == 137


def test_readme_preset_equals_seed_constructor():
    seed_cfg = LaMDA(num_tokens=20000, dim=512, dim_head=64, depth=12, heads=8).config
    readme = get_preset("readme")
    assert readme.replace(max_seq_len=seed_cfg.max_seq_len) == seed_cfg


# ---------------------------------------------------------------------------------------------
# FLOPs per token against a FLOP counter
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seq_len", [32, 64])
def test_flops_per_token_against_flop_counter(seq_len, monkeypatch):
    """FlopCounterMode counts the matrix multiplies of one forward pass: the Linear layers, the
    tied head and attention. Attention takes the masked SDPA path pinned to its math backend,
    which decomposes into two bmm's over all T x T query/key pairs (like the formula, which
    counts the causal half too); the fused CPU flash kernel, which the model uses otherwise,
    is invisible to FlopCounterMode. Forward x 3 = forward + backward.

    flops_per_token's N also holds the RMSNorm scales and the relative-bias tables, which take
    part in no matrix multiply: that is the only difference, 6 * T * (their count) FLOPs."""
    import lamda_pipe.attention_kernels

    monkeypatch.setattr(lamda_pipe.attention_kernels, "HAS_CPU_FLASH", False)
    cfg = TINY
    torch.manual_seed(0)
    model = LaMDA(config=cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, seq_len))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens)
    forward = counter.get_total_flops()
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    assert {"aten.mm", "aten.bmm"} <= ops, ops  # linear layers and attention both counted
    predicted = flops_per_token(cfg, seq_len) * seq_len
    assert abs(3 * forward - predicted) / predicted < 0.02, (3 * forward, predicted)
    # exactly, once the parameters outside any matrix multiply are accounted for
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    not_in_matmul = sum(p.numel() for n, p in model.named_parameters()
                        if id(p) not in linear_weights and not n.startswith("embed."))
    assert predicted - 3 * forward == 6 * seq_len * not_in_matmul


# ---------------------------------------------------------------------------------------------
# DeepSpeed config checks
# ---------------------------------------------------------------------------------------------

DEBUG = get_preset("debug")  # depth 4, max_seq_len 128


def base_ds(**changes) -> dict:
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
          "zero_optimization": {"stage": 1}}
    ds.update(changes)
    return ds


def run(ds, *, pipe_stages=2, world_size=2, cuda_available=False):
    return check_run(ds, pipe_stages=pipe_stages, world_size=world_size, cuda_available=cuda_available)


def test_check_run_accepts_a_good_config():
    assert run(base_ds(), pipe_stages=2, world_size=4) == BatchShape(4, 2, 2)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_2_and_3_refused_with_pipeline(stage):
    with pytest.raises(ConfigError) as e:
        run(base_ds(zero_optimization={"stage": stage}), pipe_stages=2)
    msg = str(e.value)
    assert f"ZeRO stage {stage}" in msg and "use ZeRO-1 with pipeline parallelism" in msg
    assert '"stage": 1' in msg  # the fix, as it is written in the JSON


def test_zero_2_refused_with_one_stage_too():
    # ds_train.py always builds a PipelineModule, and DeepSpeed's pipeline engine refuses ZeRO-2/3
    # at any stage count (AssertionError deep in initialize); say so up front.
    with pytest.raises(ConfigError, match="use ZeRO-1 with pipeline parallelism"):
        run(base_ds(zero_optimization={"stage": 2}), pipe_stages=1, world_size=2)
    assert run(base_ds(zero_optimization={"stage": 1}), pipe_stages=1, world_size=2) == BatchShape(4, 2, 2)


def test_batch_sizes_that_do_not_add_up():
    ds = base_ds(train_batch_size=30)  # 4 x 2 x dp 2 = 16 != 30
    with pytest.raises(ConfigError, match="do not add up") as e:
        run(ds, pipe_stages=1, world_size=2)
    assert "30" in str(e.value) and "16" in str(e.value)
    assert "leave train_batch_size out" in str(e.value)
    with pytest.raises(ConfigError, match="do not add up"):
        resolve_batch({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, data_parallel=2)
    with pytest.raises(ConfigError, match="no batch size"):
        resolve_batch({}, data_parallel=1)
    with pytest.raises(ConfigError, match="positive integer"):
        resolve_batch({"train_micro_batch_size_per_gpu": 0, "gradient_accumulation_steps": 1}, 1)


def test_batch_sizes_derived_as_deepspeed_does():
    # tbs = mbs x gas x dp; any two of the three (with dp) give the third
    assert resolve_batch({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 2) == BatchShape(4, 4, 2)
    assert resolve_batch({"train_batch_size": 32, "gradient_accumulation_steps": 4}, 2) == BatchShape(4, 4, 2)
    assert resolve_batch({"train_batch_size": 32}, 2) == BatchShape(16, 1, 2)  # gas defaults to 1
    assert resolve_batch({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4,
                          "gradient_accumulation_steps": 2}, 2).global_batch_size == 16


def test_pipe_stages_must_divide_world_size():
    with pytest.raises(ConfigError, match="does not divide") as e:
        run(base_ds(), pipe_stages=3, world_size=4)
    assert "world size 4" in str(e.value)


def test_fp16_without_cuda_refused():
    with pytest.raises(ConfigError, match="fp16 needs a GPU") as e:
        run(base_ds(fp16={"enabled": True}), cuda_available=False)
    assert "cpu.json" in str(e.value)
    assert run(base_ds(fp16={"enabled": True}), cuda_available=True).micro_batch_size == 4


def test_fp16_and_bf16_refused():
    with pytest.raises(ConfigError, match="both fp16 and bf16"):
        run(base_ds(fp16={"enabled": True}, bf16={"enabled": True}), cuda_available=True)


def test_total_num_steps_in_file_refused():
    ds = base_ds(scheduler={"type": "WarmupCosineLR", "params": {"total_num_steps": 100}})
    with pytest.raises(ConfigError, match="total_num_steps") as e:
        run(ds)
    assert "--steps" in str(e.value)


SHIPPED = {"cpu.json": False, "gpu_fp16.json": True, "gpu_bf16.json": True}  # file: needs CUDA


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_pass_check_run(name):
    ds = load_config(REPO / "ds_configs" / name)
    assert isinstance(ds, dict)
    batch = run(ds, pipe_stages=2, world_size=2, cuda_available=SHIPPED[name])
    assert batch.micro_batch_size == ds["train_micro_batch_size_per_gpu"]
    assert batch.grad_accum_steps == ds["gradient_accumulation_steps"]
    assert ds["scheduler"]["type"] and "total_num_steps" not in ds["scheduler"].get("params", {})
    assert ds["gradient_clipping"] > 0
    assert ds["tensorboard"]["enabled"] is True
    assert ds["zero_optimization"]["stage"] <= 1


def test_shipped_fp16_config_has_dynamic_loss_scaling():
    fp16 = load_config(REPO / "ds_configs" / "gpu_fp16.json")["fp16"]
    assert fp16["enabled"] is True
    assert fp16["loss_scale"] == 0  # 0 = dynamic
    for key in ("initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale"):
        assert key in fp16, key


def test_shipped_cpu_config():
    ds = load_config(REPO / "ds_configs" / "cpu.json")
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert not ds.get("fp16", {}).get("enabled") and not ds.get("bf16", {}).get("enabled")
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):  # and the fp16 one is refused on CPU
        run(load_config(REPO / "ds_configs" / "gpu_fp16.json"), cuda_available=False)


def test_default_config_path_and_load_errors(tmp_path):
    assert CONFIG_DIR.resolve() == (REPO / "ds_configs").resolve()
    assert default_config_path(False, False).name == "cpu.json"
    assert default_config_path(True, True).name == "gpu_bf16.json"
    assert default_config_path(True, False).name == "gpu_fp16.json"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


def test_fill_run_values_does_not_mutate_its_input(tmp_path):
    ds = load_config(REPO / "ds_configs" / "cpu.json")
    before = copy.deepcopy(ds)
    filled = fill_run_values(ds, steps=123, run_dir=tmp_path / "run")
    assert ds == before
    assert filled["scheduler"]["params"]["total_num_steps"] == 123
    assert filled["tensorboard"]["output_path"] == str(tmp_path / "run")
    # everything else is untouched, and the result is plain JSON
    del filled["scheduler"]["params"]["total_num_steps"], filled["tensorboard"]["output_path"]
    assert filled == before
    json.dumps(fill_run_values(ds, steps=1, run_dir=tmp_path))


def test_fill_run_values_keeps_an_explicit_tensorboard_path(tmp_path):
    ds = base_ds(tensorboard={"enabled": True, "output_path": "/elsewhere"})
    assert fill_run_values(ds, steps=5, run_dir=tmp_path)["tensorboard"]["output_path"] == "/elsewhere"
