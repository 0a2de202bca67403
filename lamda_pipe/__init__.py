"""lamda-pipe: LaMDA-style language models pre-trained with DeepSpeed pipeline parallelism."""

from .config import PRESETS, ModelConfig, flops_per_token, get_preset, param_count

__all__ = ["LaMDA", "AutoregressiveWrapper", "ModelConfig", "PRESETS", "get_preset", "param_count",
           "flops_per_token", "relative_position_bucket"]
__version__ = "0.1.0"

_LAZY_NAMES = {"LaMDA": "model", "relative_position_bucket": "model", "AutoregressiveWrapper": "generation"}


def __getattr__(name):
    # The model (and torch) load on first use: data-preparation worker processes import this
    # package and never need them.
    if name in _LAZY_NAMES:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
