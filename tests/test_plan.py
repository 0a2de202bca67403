"""The dry-run planner (lamda_pipe/plan.py, lamda-plan, ds_train.py --dry-run), against oracles
that are not the planner: hand arithmetic, the published bubble formula, the saved tensors of a
real block's forward, the measured MFU on file. Peak memory against the CPU allocator:
tests/test_plan_measured.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from lamda_pipe import plan as P
from lamda_pipe.config import ModelConfig, get_preset, param_count
from lamda_pipe.tools import plan as tool

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("preset", ["debug", "readme", "lamda-2b", "lamda-8b", "lamda-137b"])
def test_stage_parameters_add_up_to_the_model_plus_one_embedding_past_one_stage(preset):
    cfg = get_preset(preset)
    for p in sorted({1, 2, 4, cfg.depth}):
        stages = P.plan_stages(cfg, P.Layout(p, 1, 1, 4, 64))
        extra = cfg.vocab_size * cfg.dim if p > 1 else 0  # the tied head's copy on the last stage
        assert sum(s.params for s in stages) == param_count(cfg) + extra, (preset, p)
        assert sum(s.blocks for s in stages) == cfg.depth


def test_readme_on_two_stages_by_hand():
    # a block: fused qkv 512 x 1536, out 512 x 512, bias table 32 x 8, GEGLU 512 x 4096 and 2048 x 512,
    # two norms of 512: 786432 + 262144 + 256 + 2097152 + 1048576 + 1024
    block = 4_195_584
    embedding = 20_000 * 512
    s0, s1 = P.plan_stages(get_preset("readme"), P.Layout(2, 1, 1, 4, 256, "fp32"))
    assert (s0.blocks, s1.blocks) == (7, 5)  # the FLOPs partition at seq 256 (docs/scaling.md)
    assert s0.params == embedding + 7 * block == 39_609_088
    assert s1.params == 5 * block + 512 + embedding
    assert s0.bytes["weights"] == 4 * s0.params


def test_bubble_is_the_1f1b_formula():
    # docs/scaling.md's worked example: P = 4 with m = 4, 8, 16
    assert [P.bubble(4, m) for m in (4, 8, 16)] == [3 / 7, 3 / 11, 3 / 19]
    assert P.bubble(1, 7) == 0.0
    assert P.bubble(8, 1) == 7 / 8


def tiny() -> ModelConfig:
    return ModelConfig(vocab_size=10, dim=4, depth=2, heads=1, dim_head=4, ff_mult=1, max_seq_len=8,
                       num_buckets=2, max_distance=2)


def test_zero1_sharding_of_a_tiny_model_by_hand():
    # block: qkv 4 x 12 + out 4 x 4 = 64, bias table 2 x 1 = 2, GEGLU 4 x 8 + 4 x 4 = 48, norms 8: 122
    # model: embedding 10 x 4 = 40, two blocks 244, final norm 4: 288 parameters on one stage
    (s,) = P.plan_stages(tiny(), P.Layout(1, 4, 1, 2, 8, "bf16"))
    assert s.params == 288
    assert s.bytes["weights"] == 2 * 288  # bf16 on every replica
    assert s.bytes["gradients"] == 2 * 288
    assert s.bytes["optimizer"] == 12 * 288 // 4 == 864  # fp32 master + 2 Adam moments, over D = 4
    assert s.bytes["optimizer step"] == 4 * 72 + 2 * 72  # fp32 grad partition + its bf16 flat source
    (f,) = P.plan_stages(tiny(), P.Layout(1, 1, 1, 2, 8, "fp32"))
    assert f.bytes["optimizer"] == 12 * 288 and f.bytes["optimizer step"] == 4 * 288  # no cast in fp32
    (c,) = P.plan_stages(tiny(), P.Layout(1, 4, 1, 2, 8, "bf16", contiguous_gradients=True, reduce_bucket_size=1000))
    assert c.bytes["reduce buckets"] == 2 * 4 * 1000


def test_step_time_tokens_per_day_and_days_by_hand():
    cfg = tiny()
    layout = P.Layout(1, 2, 2, 3, 8, "bf16")  # 2 x 3 x 2 = 12 sequences of 8 tokens per step
    stages = P.plan_stages(cfg, layout)
    t = P.timing(cfg, layout, stages, peak_tflops=100.0, mfu=0.5)
    # 6N + 12 L H Q T with N = 288 blocks + vocab matrix (the embedding gathers, the head multiplies)
    per_token = 6 * 288 + 12 * 2 * 1 * 4 * 8
    assert t.flops_per_step == per_token * 96
    # one replica's share (b x m x T = 48 tokens) at 50% of 100 TFLOP/s, no bubble at P = 1; the
    # stage's FLOPs leave out the final norm's 6 x 4 (pipeline.layer_flops counts norms as free)
    step = (per_token - 6 * 4) * 48 / 50e12
    assert t.step_s == pytest.approx(step, rel=1e-12)
    assert t.tokens_per_s == pytest.approx(96 / step)
    assert t.days_for(1e12) == pytest.approx(1e12 / (96 / step * 86400))


def test_checkpointing_adds_a_recomputed_forward_to_the_time():
    cfg = get_preset("readme")
    off, on = (P.plan_stages(cfg, P.Layout(1, 1, 1, 4, 256, "fp32", c)) for c in (0, 1))
    # one more forward per block: 2 FLOPs per weight and 4 H Q T for the attention products
    assert on[0].flops_per_token - off[0].flops_per_token == 12 * (2 * 4_195_584 + 4 * 8 * 64 * 256)


def test_measured_mfu_is_the_one_on_file():
    results = json.loads((ROOT / "docs/results/gpu-h200-2026-11-28.json").read_text())
    run = next(r for r in results["train"] if r["variant"] == "compiled-flex")
    assert run["tflops"] / results["peak_bf16_tflops"] == pytest.approx(P.MEASURED_MFU, abs=5e-4)


def test_known_devices_carry_the_datasheet_figures():
    d = P.devices()
    assert (d["a100-40gb"].peak_tflops, d["a100-80gb"].peak_tflops) == (312.0, 312.0)
    assert (d["h100-sxm"].peak_tflops, d["h200"].peak_tflops) == (989.4, 989.4)
    assert (d["h200"].memory_gib, d["tpu-v3"].memory_gib, d["tpu-v3"].peak_tflops) == (141, 32, 123.0)


def saved_bytes(cfg: ModelConfig, seq_len: int, batch: int) -> tuple[int, set]:
    """Bytes of distinct storages autograd saves in one Block forward, without the parameters,
    and the storages of the layer's caches (built on a first call, kept across calls)."""
    from lamda_pipe.model import AttentionSetting, Block, PositionCache

    torch.manual_seed(0)
    block, positions = Block(cfg), PositionCache(cfg.num_buckets, cfg.max_distance)
    x = torch.randn(batch, seq_len, cfg.dim, requires_grad=True)
    block(x, positions, AttentionSetting())  # builds the caches
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, positions, AttentionSetting())
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    caches = {t.untyped_storage().data_ptr() for entry in positions._cache.values() for t in entry}
    caches |= {v[0].untyped_storage().data_ptr() for v in block.attn._kernel_cache.values()}
    return sum(n for k, n in seen.items() if k not in params | caches), caches


@pytest.mark.parametrize("seq_len,kernel", [(128, "sdpa"), (384, "cpu_flash")])
def test_block_activations_are_what_autograd_saves(one_thread, seq_len, kernel):
    # dim != inner_dim != d_ff, so a term counted with the wrong width shows
    cfg = ModelConfig(vocab_size=100, dim=96, depth=2, heads=4, dim_head=16, ff_mult=4, max_seq_len=512)
    assert P.attention_kernel(cfg, seq_len, "cpu") == kernel
    measured, _ = saved_bytes(cfg, seq_len, batch=2)
    assert P.block_activations(cfg, 2 * seq_len, seq_len, kernel, 4) == measured


def test_plans_137b_on_1024_devices_quickly_without_allocating():
    cfg = get_preset("lamda-137b")
    start = time.perf_counter()
    stages = P.plan_stages(cfg, P.Layout(16, 64, 1, 2, 2048, "bf16", 1))
    found = P.search(cfg, 1024, 128, 2048, "bf16", 32 * P.GiB, 123.0, P.MEASURED_MFU)
    assert time.perf_counter() - start < 5
    assert sum(s.params for s in stages) == param_count(cfg) + cfg.vocab_size * cfg.dim
    assert found and all(lo.world_size == 1024 and lo.global_batch == 128 for lo, _, _ in found)
    fits = [max(s.peak for s in st) <= 32 * P.GiB for _, st, _ in found]
    assert fits == sorted(fits, reverse=True)  # every layout that fits comes first


def run_tool(capsys, *argv) -> tuple[int, str, str]:
    status = tool.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_plan_prints_stages_time_and_verdict(capsys):
    status, out, err = run_tool(capsys, "--model", "lamda-137b", "--device", "tpu-v3", "--gpus", "1024",
                                "--pipe-stages", "16", "--batch-tokens", "262144", "--tokens", "2.81e12")
    assert status == 0 and err == ""
    assert "\n| 0 | [0, 5) | 4 | 8.85B |" in out  # embedding + 4 blocks
    assert "\n| 1-14 | [5, 61) | 4 | 8.59B |" in out  # stages alike share a row
    assert "\n| 15 | [61, 67) | 4 | 8.85B |" in out  # 4 blocks + norm + head
    assert "bubble: (P - 1) / (m + P - 1) = 15/17" in out
    assert "51.9% MFU (measured: lamda-2b on one H200" in out
    assert "does NOT fit" in out and "best first" in out


@pytest.mark.parametrize("argv,problem", [
    (["--device", "b200"], "unknown device 'b200'"),
    (["--pipe-stages", "3", "--gpus", "8"], "--pipe-stages 3 does not divide --gpus 8"),
    (["--pipe-stages", "11"], "--pipe-stages 11 for a model of 10 blocks"),
    (["--batch-tokens", "1000"], "is not a whole number of 2048-token sequences"),
    (["--gpus", "3", "--batch-tokens", "8192"], "does not split into 3 data-parallel replicas"),
    (["--batch-tokens", "8192", "--grad-accum", "2"], "--grad-accum 2 disagrees with --batch-tokens"),
    (["--mfu", "51.9", "--device", "h200"], "--mfu 51.9 is not a fraction"),
    (["--device-memory", "0"], "--device-memory must be > 0"),
    (["--device", "h200", "--peak-tflops", "-1"], "--peak-tflops must be > 0"),
    (["--seq-len", "4096"], "--seq-len 4096 is outside 1..2048"),
    (["--gpus", "0"], "--gpus must be >= 1"),
    (["--search", "--device-memory", "80"], "--search ranks layouts by fit and time: give --device"),
])
def test_bad_input_is_one_line_naming_the_problem(capsys, argv, problem):
    status, out, err = run_tool(capsys, *argv)
    assert status == 2 and out == ""
    assert err.startswith("lamda-plan: error: ") and err.count("\n") == 1 and problem in err


def test_dry_run_prints_the_plan_and_starts_nothing(capsys, tmp_path, monkeypatch):
    from lamda_pipe.train import main

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    run_dir = tmp_path / "run"
    assert main(["--dry-run", "--model", "readme", "--pipe-stages", "2", "--seq-len", "256",
                 "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    # cpu.json: micro-batch 4, 4 micro-batches; 4 ranks over 2 stages: 2 replicas
    assert "2 stage(s) x 2 data-parallel = 4 device(s); micro-batch 4 x 4 micro-batches x 2 = 32 sequences" in out
    assert "| 0 | [0, 8) | 7 | 39.61M |" in out
    assert not run_dir.exists()
    import torch.distributed as dist
    assert not dist.is_initialized()


def test_dry_run_refuses_a_zero_stage_it_does_not_model(capsys, tmp_path, monkeypatch):
    from lamda_pipe.train import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    config = tmp_path / "zero0.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
                                  "bf16": {"enabled": True}, "zero_optimization": {"stage": 0},
                                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}))
    assert main(["--dry-run", "--deepspeed_config", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("ds_train.py: error: the planner models ZeRO stage 1") and captured.err.count("\n") == 1
    assert "dry run" not in captured.out and not (tmp_path / "run").exists()


def test_checkpointed_runs_are_runs_of_blocks_only():
    debug, readme = get_preset("debug"), get_preset("readme")  # layers: 0 embedding, 1..depth blocks, norm, head
    assert P.checkpointed_runs(debug, 0, 7, 0) == []
    assert P.checkpointed_runs(debug, 0, 7, 1) == [1, 1, 1, 1]
    assert P.checkpointed_runs(debug, 0, 7, 2) == [2]  # [0 1] [2 3] [4 5] [6]: one run of blocks alone
    assert P.checkpointed_runs(readme, 0, 8, 3) == [3, 2]  # [0 1 2] [3 4 5] [6 7]
    assert P.checkpointed_runs(readme, 8, 15, 5) == [5]  # [8..12] blocks, then [13 14]: norm and head
