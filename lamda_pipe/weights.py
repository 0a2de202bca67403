"""Model weights between their two forms: the plain LaMDA state dict (model.py, exports) and the
pipeline's (DeepSpeed's per-layer checkpoint files and PipelineModule parameter names).

Layer indices as in pipeline.py: 0 = embedding (tied to the head), 1..depth = blocks,
depth + 1 = final norm; the head has no parameters of its own. Nothing here imports DeepSpeed
or unpickles code: layer files are read with torch.load(weights_only=True).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelConfig
from .errors import CheckpointError
from .run_format import ModelPath, layer_file, num_layer_files


def layer_prefix(layer_idx: int, depth: int) -> str | None:
    """A pipeline layer's parameter prefix in the plain model; None for the tied head."""
    if layer_idx == 0:
        return "embed."
    if 1 <= layer_idx <= depth:
        return f"blocks.{layer_idx - 1}."
    if layer_idx == depth + 1:
        return "norm."
    return None


def plain_name(pipeline_param: str, depth: int) -> str:
    """'tied_modules.embed.weight' -> 'embed.weight'; '3.attn.qkv.weight' -> 'blocks.2.attn.qkv.weight'."""
    if pipeline_param.startswith("tied_modules."):
        return "embed." + pipeline_param.split(".", 2)[2]
    idx, rest = pipeline_param.split(".", 1)
    return layer_prefix(int(idx), depth) + rest


def read_layer_files(tag_dir, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The plain state dict (fp32) from a pipeline checkpoint's per-layer files, whatever its
    stage count."""
    tag_dir = Path(tag_dir)
    state = {}
    for layer_idx in range(num_layer_files(cfg)):
        path = tag_dir / layer_file(layer_idx)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {tag_dir} is incomplete: {path.name} is missing (an interrupted "
                                  f"save?); use an earlier checkpoint of the run")
        prefix = layer_prefix(layer_idx, cfg.depth)
        for name, tensor in torch.load(path, map_location="cpu", weights_only=True).items():
            state[prefix + name] = tensor.float()
    return state


def load_plain_model(tag_dir, cfg: ModelConfig):
    """A plain LaMDA (train mode, fp32) with the weights of a pipeline checkpoint."""
    from .model import LaMDA

    model = LaMDA(config=cfg)
    model.load_state_dict(read_layer_files(tag_dir, cfg))
    return model


def read_plain_state(src: ModelPath, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Weights of the model at src (run_format.resolve_model): an export's model.safetensors (or its shards), or a
    checkpoint's layer files."""
    if src.kind == "export":
        from .export import read_export_weights
        return read_export_weights(src.path)
    return read_layer_files(src.path, cfg)


def copy_into_pipeline(net, state: dict[str, torch.Tensor], depth: int) -> None:
    """Copies a plain state dict into this stage's part of a pipeline (before the engine is
    built, so the optimizer starts from these weights)."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(state[plain_name(name, depth)])
