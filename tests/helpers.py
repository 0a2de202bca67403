"""Small things the tests share: tiny model configs and models, a tiny tokenizer, and a checkpoint
dir laid out as train.py writes one. Configs that differ on purpose stay in their test files."""

from __future__ import annotations

from pathlib import Path

import torch

from lamda_pipe.config import ModelConfig

# Two blocks, 4 heads of 8: the unit tests' model (test_model, test_attention_kernels, test_config).
TINY = ModelConfig(vocab_size=97, dim=32, depth=2, heads=4, dim_head=8, max_seq_len=64)
# Few buckets and a short max distance so a 40-token sequence reaches every kind of bucket:
# exact (0..3), log-spaced (4..7) and the saturated last one (distance >= 20).
TINY_FEW_BUCKETS = TINY.replace(num_buckets=8, max_distance=20)
# Four blocks, dropout on: the 2-stage pipeline tests' model (test_pipeline, test_export).
TINY_PIPE = ModelConfig(vocab_size=211, dim=32, depth=4, heads=4, dim_head=8, max_seq_len=32, dropout=0.1)


def tiny_model(cfg: ModelConfig = TINY, seed: int = 0, bias_std: float | None = None):
    """LaMDA(cfg) in eval mode, initialised from `seed`. The relative-bias tables start at zero;
    bias_std draws them from N(0, bias_std^2) instead, so that positions matter."""
    from lamda_pipe.model import LaMDA

    torch.manual_seed(seed)
    model = LaMDA(config=cfg).eval()
    if bias_std is not None:
        with torch.no_grad():
            for block in model.blocks:
                block.attn.rel_bias.weight.normal_(std=bias_std)
    return model


CORPUS = Path(__file__).resolve().parent.parent / "lamda_pipe" / "data" / "corpus" / "genesis.txt"


def train_tiny_tokenizer(path: Path, vocab: int = 300) -> Path:
    from lamda_pipe.data.tokenizer import train_tokenizer

    docs = [d for d in CORPUS.read_text().split("\n\n") if d.strip()]
    train_tokenizer(docs, vocab_size=vocab).save(str(path))
    return path


def write_run_info(tag_dir: Path, cfg: ModelConfig, step: int, tokenizer: Path | None) -> None:
    """The run record and tokenizer.json, as the trainer puts them beside DeepSpeed's files."""
    from lamda_pipe.run_format import RUN_RECORD, RunRecord

    tag_dir.mkdir(parents=True, exist_ok=True)
    record = RunRecord(model_preset="test", model_config=cfg, pipe_stages=2, data_parallel=1, global_steps=step,
                       samples_consumed=0)
    (tag_dir / RUN_RECORD).write_text(record.to_json())
    if tokenizer is not None:
        (tag_dir / "tokenizer.json").write_bytes(tokenizer.read_bytes())


def write_layer_files(model, tag_dir: Path) -> None:
    """The per-layer files DeepSpeed's pipeline writes (layer_XX-model_states.pt, one state dict
    per layer), from a plain model; pipeline.py's docstring gives the layer indices."""
    depth = model.config.depth
    state = model.state_dict()
    prefixes = {0: "embed.", depth + 1: "norm.", **{i: f"blocks.{i - 1}." for i in range(1, depth + 1)}}
    tag_dir.mkdir(parents=True, exist_ok=True)
    for idx, prefix in prefixes.items():
        layer = {k[len(prefix):]: v.clone() for k, v in state.items() if k.startswith(prefix)}
        torch.save(layer, tag_dir / f"layer_{idx:02d}-model_states.pt")
