"""lamda-pipe: LaMDA-style language models pre-trained with DeepSpeed pipeline parallelism."""

from .config import PRESETS, ModelConfig, flops_per_token, get_preset, param_count
from .model import AutoregressiveWrapper, LaMDA, relative_position_bucket

__all__ = ["LaMDA", "AutoregressiveWrapper", "ModelConfig", "PRESETS", "get_preset", "param_count",
           "flops_per_token", "relative_position_bucket"]
__version__ = "0.1.0"
