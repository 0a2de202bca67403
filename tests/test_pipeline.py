"""The pipeline on real DeepSpeed ranks (gloo, CPU, fp32): stage-count invariance, the tied
embedding, and the plain model rebuilt from a pipeline checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lamda_pipe.config import PRESETS, ModelConfig
from lamda_pipe.data.loader import MicroBatchStream
from tests.dist_utils import run_ranks
from tests.helpers import TINY_PIPE

CFG = TINY_PIPE
SEQ, MBS, GAS, STEPS = 16, 2, 4, 5


def ds_config(**over):
    cfg = {
        "train_micro_batch_size_per_gpu": MBS,
        "gradient_accumulation_steps": GAS,
        "gradient_clipping": 1.0,
        "steps_per_print": 10 ** 6,
        "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1, "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 2, "total_num_steps": 20}},
    }
    cfg.update(over)
    return cfg


def token_stream(dp_rank=0, dp_size=1):
    tokens = np.arange(4000) * 7 % CFG.vocab_size  # learnable: each token is the previous + 7
    return MicroBatchStream(tokens, SEQ, MBS, dp_rank, dp_size, seed=7)


def make_engine(stages: int, ckpt_interval: int = 0):
    import deepspeed

    from lamda_pipe.distributed import init_distributed
    from lamda_pipe.pipeline import build_pipeline, stage_bounds

    init_distributed()
    net = build_pipeline(CFG, stage_bounds(CFG, stages), seed=42, activation_checkpoint_interval=ckpt_interval)
    engine, *_ = deepspeed.initialize(model=net, model_parameters=[p for p in net.parameters()],
                                      config=ds_config())
    return engine


def train_losses(rank, stages, ckpt_dir=None):
    engine = make_engine(stages)
    it = token_stream().iterate()
    losses = [engine.train_batch(it).item() for _ in range(STEPS)]
    out = {"losses": losses, "stage": engine.stage_id}
    tied = engine.module.tied_modules
    if "embed" in tied:
        out["embed"] = tied["embed"].weight.detach().clone()
    if ckpt_dir is not None:
        engine.save_checkpoint(ckpt_dir, tag="t")
        nxt = token_stream().micro_batch(STEPS * GAS)
        out["eval_loss"] = engine.eval_batch(iter([nxt] * GAS)).item()
    return out


@pytest.fixture(scope="module")
def one_stage():
    return run_ranks(train_losses, 1, 1)[0]


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    return run_ranks(train_losses, 2, 2, str(ckpt)), ckpt


@pytest.mark.distributed
def test_two_stages_match_one_stage(one_stage, two_stages):
    """Per-layer seeding makes init and dropout independent of the split (dropout is 0.1): without
    it the losses differ by ~1e-2. They agree to float32 rounding, not always bit for bit: the tied
    embedding's gradient is summed in another order (one stage accumulates embedding and head terms
    micro-batch by micro-batch; two stages sum each stage's own, then all-reduce), so whether the
    last bit agrees depends on the CPU's kernels (equal on the machines this was written on; 4.8e-7
    apart at step 4 on an AMD EPYC without AVX-512)."""
    results, _ = two_stages
    assert len(set(one_stage["losses"])) == STEPS  # it trains: the loss changes every step
    assert one_stage["losses"][-1] < one_stage["losses"][0]
    for r in results:
        np.testing.assert_allclose(r["losses"], one_stage["losses"], rtol=2e-7, atol=0)


@pytest.mark.distributed
def test_tied_embedding_identical_on_both_stages(one_stage, two_stages):
    results, _ = two_stages
    first, last = sorted(results, key=lambda r: r["stage"])
    # Both end stages hold a copy of the tied embedding/head; after training they must agree,
    # which needs the tied gradients summed across stages before every step.
    assert torch.equal(first["embed"], last["embed"])
    # Against one stage: equal up to float summation order (one stage adds the embedding's and
    # the head's gradient in autograd, two stages in an all-reduce): ~6e-8 measured.
    torch.testing.assert_close(first["embed"], one_stage["embed"], rtol=0, atol=1e-6)
    init = make_reference_init()
    assert not torch.allclose(first["embed"], init)  # and it did train


def make_reference_init():
    """The embedding as initialised (1 stage, no steps), to show training changed it."""
    def init(rank):
        return make_engine(1).module.tied_modules["embed"].weight.detach().clone()
    return run_ranks(init, 1)[0]


@pytest.mark.distributed
def test_plain_model_from_pipeline_checkpoint_matches_pipeline(two_stages):
    """The per-layer checkpoint files rebuild the plain LaMDA exactly: its loss on the next
    batch equals the 2-stage pipeline's eval loss on that batch."""
    from lamda_pipe.weights import load_plain_model

    results, ckpt = two_stages
    model = load_plain_model(ckpt / "t", CFG).eval()
    inputs, labels = token_stream().micro_batch(STEPS * GAS)
    with torch.no_grad():
        logits = model(inputs)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    for r in results:
        assert loss == pytest.approx(r["eval_loss"], abs=1e-5)


def losses_with(rank, stages, ds_overrides, model_cfg, steps=STEPS, patch_fp16=False):
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from lamda_pipe.distributed import init_distributed
    from lamda_pipe.pipeline import build_pipeline, stage_bounds

    if patch_fp16:
        # CPUs without AVX512-FP16 report no fp16 support; pretend, to run DeepSpeed's real
        # dynamic loss scaler on the shipped fp16 config. Test only: never for users.
        acc = get_accelerator()
        acc.is_fp16_supported = lambda: True
        acc.supported_dtypes = lambda: [torch.float, torch.half, torch.bfloat16]
    init_distributed()
    config = {**ds_config(), **ds_overrides}
    net = build_pipeline(model_cfg, stage_bounds(model_cfg, stages), seed=42,
                         activation_checkpoint_interval=config.get("pipeline", {}).get("activation_checkpoint_interval", 0))
    engine, *_ = deepspeed.initialize(model=net, model_parameters=list(net.parameters()), config=config)
    it = token_stream().iterate()
    losses, scales = [], []
    for _ in range(steps):
        losses.append(engine.train_batch(it).item())
        scales.append(engine._get_optimizer_loss_scale() if engine.fp16_enabled() else None)
    return {"losses": losses, "scales": scales, "skipped": engine.skipped_steps, "parts": list(net.parts)}


@pytest.mark.distributed
def test_activation_checkpointing_gives_the_same_losses():
    """Recomputing blocks in the backward pass must not change the result (dropout 0: with
    dropout, DeepSpeed seeds checkpointed layers differently)."""
    cfg = CFG.replace(dropout=0.0)
    plain = run_ranks(losses_with, 2, 2, {}, cfg)[0]["losses"]
    ckpt = run_ranks(losses_with, 2, 2, {"pipeline": {"activation_checkpoint_interval": 1,
                                                       "use_reentrant": False}}, cfg)[0]["losses"]
    assert ckpt == plain


def shipped_config(name, **extra):
    """A shipped DeepSpeed config with the test's batch shape and torch's AdamW (no C++ build)."""
    from lamda_pipe.ds_config import CONFIG_DIR, fill_run_values, load_config

    config = fill_run_values(load_config(CONFIG_DIR / name), steps=20, run_dir=Path("unused"))
    config.update(train_micro_batch_size_per_gpu=MBS, gradient_accumulation_steps=GAS, **extra)
    config["optimizer"]["params"]["torch_adam"] = True
    config["optimizer"]["params"]["lr"] = 3e-3
    config["scheduler"]["params"]["warmup_num_steps"] = 2
    config.pop("tensorboard", None)
    return config


@pytest.mark.distributed
def test_bf16_config_trains_two_stages():
    result = run_ranks(losses_with, 2, 2, shipped_config("gpu_bf16.json"), CFG.replace(dropout=0.0), 8)[0]
    assert all(np.isfinite(result["losses"]))
    assert result["losses"][-1] < result["losses"][0] - 0.5


@pytest.mark.distributed
def test_fp16_dynamic_loss_scale_backs_off_on_overflow():
    """gpu_fp16.json with a start scale of 2^32: fp16 gradients overflow, DeepSpeed skips those
    steps and halves the scale (hysteresis 1) until steps go through."""
    config = shipped_config("gpu_fp16.json")
    config["fp16"].update(initial_scale_power=32, hysteresis=1)
    assert config["fp16"]["loss_scale"] == 0  # dynamic
    result = run_ranks(losses_with, 2, 2, config, CFG.replace(dropout=0.0), 8, True)[0]
    scales = result["scales"]
    assert result["skipped"] > 0
    assert scales[0] < 2 ** 32 and all(b <= a for a, b in zip(scales, scales[1:]))
    assert all(np.isfinite(result["losses"]))


# --- partitioning by training FLOPs -------------------------------------------------------------

def hand_block_flops(cfg: ModelConfig, seq_len: int) -> int:
    """One block's training FLOPs per token, from the shapes: 6 x parameters + attention."""
    inner = cfg.heads * cfg.dim_head
    params = (4 * cfg.dim * inner  # q, k, v and output projections
              + cfg.num_buckets * cfg.heads  # T5 bias table
              + 3 * cfg.dim * cfg.ff_mult * cfg.dim  # GEGLU value, gate, down
              + 2 * cfg.dim)  # two RMSNorm scales
    return 6 * params + 12 * cfg.heads * cfg.dim_head * seq_len


def hand_two_stage_bounds(cfg: ModelConfig, seq_len: int) -> list[int]:
    """Stage 0 = embedding (free) + k blocks, stage 1 = the rest + norm (free) + head (6 V D):
    the k whose slower stage is fastest."""
    block, head = hand_block_flops(cfg, seq_len), 6 * cfg.vocab_size * cfg.dim
    k = min(range(1, cfg.depth), key=lambda k: max(k * block, (cfg.depth - k) * block + head))
    return [0, k + 1, cfg.depth + 3]


@pytest.mark.unit
@pytest.mark.parametrize("seq_len", [256, 2048])
def test_flops_partition_of_readme_at_two_stages(seq_len):
    """readme: a block is 6 x 4,195,584 + 12 x 8 x 64 x T FLOPs (26.8M at T=256, 37.8M at 2048),
    the head 6 x 20000 x 512 = 61.4M, i.e. 2.3 or 1.6 blocks: 7 blocks | 5 blocks + head."""
    from lamda_pipe.pipeline import stage_bounds

    cfg = PRESETS["readme"]
    assert hand_block_flops(cfg, 2048) == 6 * 4_195_584 + 12 * 8 * 64 * 2048
    assert hand_two_stage_bounds(cfg, seq_len) == [0, 8, 15]
    assert stage_bounds(cfg, 2, seq_len) == [0, 8, 15]
    assert stage_bounds(cfg, 2) == [0, 8, 15]  # seq_len defaults to the preset's 2048


@pytest.mark.unit
def test_flops_partition_of_debug_at_two_stages():
    """debug at seq 128: a block is 6 x 65,792 + 12 x 4 x 16 x 128 = 493,056 FLOPs, the head
    6 x 2048 x 64 = 786,432 (1.6 blocks): 3 blocks | 1 block + head (1.48M vs 1.28M; 2 | 2
    would be 0.99M vs 1.77M). The old type:BlockPipe split was 2 | 2."""
    from lamda_pipe.pipeline import stage_bounds

    cfg = PRESETS["debug"]
    assert hand_block_flops(cfg, 128) == 493_056
    assert hand_two_stage_bounds(cfg, 128) == [0, 4, 7]
    assert stage_bounds(cfg, 2, 128) == [0, 4, 7]
    assert stage_bounds(cfg, 2, 128, method="type:BlockPipe") == [0, 3, 7]
    assert stage_bounds(cfg, 1, 128) == [0, 7]


@pytest.mark.unit
@pytest.mark.parametrize("preset", ["debug", "readme", "lamda-2b", "lamda-8b"])
@pytest.mark.parametrize("stages", [2, 4])
def test_every_stage_gets_a_block_and_the_slowest_stage_is_as_fast_as_it_can_be(preset, stages):
    import itertools

    from lamda_pipe.pipeline import layer_flops, stage_bounds

    cfg = PRESETS[preset]
    seq_len = cfg.max_seq_len
    bounds = stage_bounds(cfg, stages, seq_len)
    assert all(type(b) is int for b in bounds)
    assert len(bounds) == stages + 1 and bounds[0] == 0 and bounds[-1] == cfg.depth + 3
    for start, stop in zip(bounds, bounds[1:]):
        assert any(1 <= i <= cfg.depth for i in range(start, stop)), bounds  # >= 1 block
    # the slowest stage, against every split of the blocks (hand FLOP formula, brute force)
    block, head = hand_block_flops(cfg, seq_len), 6 * cfg.vocab_size * cfg.dim
    assert layer_flops(cfg, seq_len) == [0, *[block] * cfg.depth, 0, head]

    def slowest(cuts):  # cuts: blocks before each inner bound
        sizes = [b - a for a, b in zip((0, *cuts), (*cuts, cfg.depth))]
        return max(n * block + (head if i == stages - 1 else 0) for i, n in enumerate(sizes))

    best = min(slowest(c) for c in itertools.combinations(range(1, cfg.depth), stages - 1))
    assert slowest([b - 1 for b in bounds[1:-1]]) == best


@pytest.mark.unit
def test_seq_len_can_move_a_bound():
    """Attention grows with T, the head does not: readme at 4 stages splits 4 | 4 | 3 | 1 + head
    at seq 256 but 4 | 3 | 3 | 2 + head at 2048. Such a change is a change of layout on resume."""
    from lamda_pipe.pipeline import stage_bounds

    cfg = PRESETS["readme"]
    assert stage_bounds(cfg, 4, 256) == [0, 5, 9, 12, 15]
    assert stage_bounds(cfg, 4, 2048) == [0, 5, 8, 11, 15]


@pytest.mark.distributed
def test_uneven_split_still_matches_one_stage_bit_for_bit():
    """With a large vocabulary the head outweighs blocks: the split is 3 | 1 + head, and the
    losses still equal one stage's (seeds follow the global layer index, dropout is 0.1)."""
    cfg = CFG.replace(vocab_size=2048)
    two = run_ranks(losses_with, 2, 2, {}, cfg, 3)
    one = run_ranks(losses_with, 1, 1, {}, cfg, 3)[0]
    assert two[0]["parts"] == [0, 4, 7]
    assert len(set(one["losses"])) == 3
    for r in two:
        assert r["losses"] == one["losses"]
