"""Helpers shared by test_export.py and test_generate.py: a tiny tokenizer and a checkpoint dir
laid out as train.py writes one."""

from __future__ import annotations

from pathlib import Path

import torch

from lamda_pipe.config import ModelConfig

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
