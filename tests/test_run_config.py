"""RunConfig: ds_train.py's flags as one frozen, checked configuration; the README's flag list."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from lamda_pipe.errors import ConfigError
from lamda_pipe.run_config import RunConfig

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_resolve_seq_len_from_the_preset_and_the_config_is_frozen():
    run = RunConfig.from_argv([])
    assert (run.model, run.pipe_stages, run.seq_len) == ("debug", 2, 128)
    assert RunConfig.from_argv(["--model", "readme"]).seq_len == 2048
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.steps = 5


def test_flags_parse_to_typed_fields():
    run = RunConfig.from_argv(["--steps", "7", "--run-dir", "/tmp/x", "--peak-tflops", "1.5", "--local_rank=1",
                               "--deepspeed_config", "a.json", "--deepspeed"])
    assert run.steps == 7 and run.run_dir == Path("/tmp/x") and run.peak_tflops == 1.5
    assert run.local_rank == 1 and run.deepspeed_config == Path("a.json")


def test_choices_come_from_the_registries():
    from lamda_pipe.config import PRESETS
    from lamda_pipe.pipeline import PARTITIONS

    actions = {a.dest: a for a in RunConfig.parser()._actions}
    assert tuple(actions["model"].choices) == tuple(PRESETS)
    assert tuple(actions["partition"].choices) == tuple(PARTITIONS)
    assert "auto" in actions["attention"].choices and "sdpa" in actions["attention"].choices


@pytest.mark.parametrize("flags,message", [
    (["--pipe-stages", "5"], "every stage needs at least one block; use 1 <= --pipe-stages <= 4"),  # debug: 4 blocks
    (["--pipe-stages", "0"], "use 1 <= --pipe-stages <= 4"),
    (["--seq-len", "129"], "use --seq-len <= 128"),
    (["--seq-len", "0"], "outside 1..128"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--save-every", "0"], "--save-every must be >= 1"),
    (["--eval-every", "-1"], "--eval-every must be >= 0"),
    (["--keep-last", "0"], "--keep-last must be >= 1"),
    (["--peak-tflops", "0"], "--peak-tflops must be > 0"),
    (["--load", "x", "--resume", "auto"], "either --load DIR or --resume auto"),
    (["--init-from", "x", "--load", "y"], "--init-from starts a new run and --load continues one"),
    (["--vocab-size", "0"], "vocab_size must be positive"),
])
def test_each_rule_refuses_with_the_fix(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.from_argv(flags)


def test_the_stage_count_rule_lives_in_one_place():
    """RunConfig and stage_bounds apply the same function; ds_config no longer checks it."""
    from lamda_pipe.config import get_preset
    from lamda_pipe.ds_config import check_run
    from lamda_pipe.pipeline import stage_bounds

    with pytest.raises(ConfigError, match="every stage needs at least one block"):
        stage_bounds(get_preset("debug"), 5)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
    assert check_run(ds, pipe_stages=5, world_size=5, cuda_available=False).data_parallel == 1


def readme_flags() -> set[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## `ds_train.py`", 1)[1].split("```", 2)[1]
    return set(re.findall(r"^(--[\w-]+)", block, re.MULTILINE))


def test_readme_lists_every_flag_of_help_and_nothing_else():
    help_flags = {a.option_strings[0] for a in RunConfig.parser()._actions
                  if a.option_strings and a.help != "==SUPPRESS==" and a.dest != "help"}
    documented = readme_flags()
    assert help_flags - documented == set(), "flags missing from README's ds_train.py list"
    assert documented - help_flags == set(), "README lists flags ds_train.py does not have"
