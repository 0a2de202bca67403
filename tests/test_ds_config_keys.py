"""Unknown DeepSpeed config keys are named before any work, with the closest key DeepSpeed
knows (its own parser is the list of known keys), instead of being silently ignored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lamda_pipe.ds_config import CONFIG_DIR, load_config
from lamda_pipe.errors import ConfigError

pytestmark = pytest.mark.unit


def write(tmp_path, **changes) -> Path:
    ds = json.loads((CONFIG_DIR / "cpu.json").read_text())
    ds.update(changes)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return path


@pytest.mark.parametrize("name", ["cpu.json", "gpu_bf16.json", "gpu_fp16.json"])
def test_shipped_configs_have_only_known_keys(name):
    load_config(CONFIG_DIR / name)


def test_keys_the_readme_shows_are_known(tmp_path):
    load_config(write(tmp_path, csv_monitor={"enabled": True, "job_name": "csv"},
                      wandb={"enabled": True, "project": "lamda-pipe"}, wall_clock_breakdown=False,
                      activation_checkpointing={"partition_activations": False},
                      checkpoint={"load_universal": False}))


@pytest.mark.parametrize("changes, message", [
    ({"gradient_clippping": 1.0}, "unknown key 'gradient_clippping', which DeepSpeed would ignore; "
                                  "did you mean 'gradient_clipping'?"),
    ({"train_micro_batch_size_per_gpus": 4}, "did you mean 'train_micro_batch_size_per_gpu'?"),
    ({"zero_optimization": {"stage": 1, "stagee": 1}}, "unknown key 'zero_optimization.stagee'; "
                                                       "did you mean zero_optimization.stage?"),
    ({"fp16": {"enabled": False, "loss_scale_windw": 100}}, "did you mean fp16.loss_scale_window?"),
    ({"tensorboard": {"enabled": True, "job_nam": "x"}}, "did you mean tensorboard.job_name?"),
    ({"bf16": {"enabled": "maybe"}}, "bf16.enabled: Input should be a valid boolean"),
])
def test_unknown_or_bad_keys_are_named_with_the_closest_known_one(tmp_path, changes, message):
    path = write(tmp_path, **changes)
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace(".", r"\.")) as e:
        load_config(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_misspelt_key_stops_the_run_before_anything_is_created(tmp_path, monkeypatch):
    from lamda_pipe.run_config import RunConfig
    from lamda_pipe.train import preflight

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="did you mean 'gradient_clipping'"):
        preflight(RunConfig.from_argv(["--run-dir", str(tmp_path / "run"), "--deepspeed_config",
                                       str(write(tmp_path, gradient_clippping=1.0))]))
    assert not (tmp_path / "run").exists()
