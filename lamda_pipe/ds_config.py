"""Loading the DeepSpeed JSON config and checking it against the run before any engine work.

The JSON stays DeepSpeed's own format; this module only fills in the values that belong
to the run rather than to the file (the monitors' directories and the schedule length, from
--run-dir and --steps) and refuses combinations that would fail later, deep inside DeepSpeed.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "ds_configs"  # shipped with the package


def default_config_path(cuda_available: bool, bf16_supported: bool) -> Path:
    if not cuda_available:
        name = "cpu.json"
    else:
        name = "gpu_bf16.json" if bf16_supported else "gpu_fp16.json"
    return CONFIG_DIR / name


def load_config(path: str | Path) -> dict:
    """The JSON, checked: valid, an object, and every key one DeepSpeed reads (check_keys)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist; pass --deepspeed_config with a file "
                          f"such as {CONFIG_DIR / 'cpu.json'}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"DeepSpeed config {path} holds a JSON {type(ds).__name__}, not an object; see "
                          f"{CONFIG_DIR / 'cpu.json'}")
    check_keys(ds, path)
    return ds


class _AskedFor(dict):
    """A config dict that records every key looked up in it (present or not), as DeepSpeed's
    config parser reads it. A copy shares the record; nested dicts record as well."""

    def __init__(self, d: dict, asked: set, path: tuple = ()):
        super().__init__({k: _AskedFor(v, asked, path + (k,)) if isinstance(v, dict) else v for k, v in d.items()})
        self._asked, self._path = asked, path

    def _ask(self, key):
        self._asked.add(self._path + (key,))

    def __getitem__(self, key):
        self._ask(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._ask(key)
        return super().get(key, default)

    def __contains__(self, key):
        self._ask(key)
        return super().__contains__(key)

    def setdefault(self, key, default=None):
        self._ask(key)
        return super().setdefault(key, default)

    def pop(self, key, *default):
        self._ask(key)
        return super().pop(key, *default)

    def keys(self):  # `key in d.keys()` is a lookup too
        return _Keys(self)

    def __iter__(self):  # a section read whole (e.g. "pipeline") knows every key in it
        for key in dict.keys(self):
            self._ask(key)
        return super().__iter__()

    def items(self):
        for key in dict.keys(self):
            self._ask(key)
        return super().items()

    def __copy__(self):  # DeepSpeed copies the dict first; copying is no lookup
        new = _AskedFor.__new__(_AskedFor)
        dict.update(new, dict.items(self))
        new._asked, new._path = self._asked, self._path
        return new


class _Keys:
    def __init__(self, d: _AskedFor):
        self.d = d

    def __contains__(self, key):
        return key in self.d

    def __iter__(self):
        return iter(self.d)

    def __len__(self):
        return len(self.d)


def check_keys(ds: dict, path: str | Path) -> None:
    """Names a key DeepSpeed would silently ignore, with the closest key it knows. DeepSpeed's
    own parser is the list of known keys: the config is parsed (no engine, no process group) and
    every top-level key it looked up counts as known; its validated sections (zero_optimization,
    fp16, bf16, the monitors, ...) refuse unknown keys themselves and are reported the same way."""
    import difflib

    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
    from pydantic import ValidationError

    class Parse(DeepSpeedConfig):  # the key reading only: batch and sanity checks need the world size
        def _configure_train_batch_size(self):
            pass

        def _do_sanity_check(self):
            pass

    asked: set = set()
    try:
        Parse(_AskedFor(ds, asked))
    except ValidationError as e:
        raise ConfigError(_describe_validation_error(e, ds, path)) from None
    except DeepSpeedConfigError as e:
        raise ConfigError(f"DeepSpeed config {path}: {e}") from None
    except Exception:  # noqa: BLE001  a value DeepSpeed reads differently: the engine will say; keys unchecked
        return
    known = sorted(k[0] for k in asked if len(k) == 1)
    for key in ds:
        if (key,) not in asked:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"DeepSpeed config {path}: unknown key {key!r}, which DeepSpeed would ignore; "
                              f"{hint}remove or correct it")


def _describe_validation_error(e, ds: dict, path) -> str:
    """One line for pydantic's error about a DeepSpeed config section."""
    import difflib

    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    err = e.errors()[0]
    loc = [str(part) for part in err["loc"]]
    # the top-level section the model was read from (its errors' locations start inside it)
    sections = [k for k, v in ds.items() if isinstance(v, dict) and loc and loc[0] in v]
    section = next((k for k in sections if ds[k][loc[0]] == err.get("input")), sections[0] if sections else None)
    where = ".".join(([section] if section else []) + loc)
    if err["type"] != "extra_forbidden":
        return f"DeepSpeed config {path}: {where}: {err['msg']}"
    model = _subclass_named(DeepSpeedConfigModel, e.title)
    for part in loc[:-1]:  # nested models, e.g. DeepSpeedMonitorConfig -> tensorboard
        field = model.model_fields.get(part) if model is not None else None
        model = field.annotation if field is not None and isinstance(field.annotation, type) else None
    fields = [] if model is None or not hasattr(model, "model_fields") else \
        [*model.model_fields, *(f.alias for f in model.model_fields.values() if f.alias)]
    close = difflib.get_close_matches(loc[-1], fields, n=1)
    hint = f"did you mean {where.rsplit('.', 1)[0]}.{close[0]}? " if close and "." in where else \
        (f"did you mean {close[0]}? " if close else "")
    return f"DeepSpeed config {path}: unknown key {where!r}; {hint}remove or correct it"


def _subclass_named(cls, name: str):
    for sub in cls.__subclasses__():
        if sub.__name__ == name:
            return sub
        found = _subclass_named(sub, name)
        if found is not None:
            return found
    return None


@dataclass(frozen=True)
class BatchShape:
    micro_batch_size: int  # per data-parallel rank
    grad_accum_steps: int  # micro-batches per optimizer step (the pipeline's m)
    data_parallel: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.data_parallel


def resolve_batch(ds: dict, data_parallel: int) -> BatchShape:
    """DeepSpeed's rule: train_batch_size = micro_batch * grad_accum * data_parallel; any two
    of the three determine the third."""
    tbs = ds.get("train_batch_size")
    mbs = ds.get("train_micro_batch_size_per_gpu")
    gas = ds.get("gradient_accumulation_steps")
    fix = ("set train_micro_batch_size_per_gpu and gradient_accumulation_steps in the DeepSpeed "
           "config and leave train_batch_size out (it is derived)")
    for key, v in (("train_batch_size", tbs), ("train_micro_batch_size_per_gpu", mbs),
                   ("gradient_accumulation_steps", gas)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ConfigError(f"{key} must be a positive integer, got {v!r}")
    if mbs is not None and gas is not None:
        if tbs is not None and tbs != mbs * gas * data_parallel:
            raise ConfigError(
                f"batch sizes do not add up: train_batch_size {tbs} != micro batch {mbs} x grad accum "
                f"{gas} x data parallel {data_parallel} = {mbs * gas * data_parallel}; {fix}")
        return BatchShape(mbs, gas, data_parallel)
    if tbs is None:
        raise ConfigError(f"the DeepSpeed config gives no batch size; {fix}")
    if mbs is not None:
        gas, rem = divmod(tbs, mbs * data_parallel)
    else:
        gas = gas or 1
        mbs, rem = divmod(tbs, gas * data_parallel)
    if rem or gas < 1 or mbs < 1:
        raise ConfigError(
            f"batch sizes do not add up: train_batch_size {tbs} is not a multiple of "
            f"(micro batch x grad accum x data parallel {data_parallel}); {fix}")
    return BatchShape(mbs, gas, data_parallel)


def check_run(ds: dict, *, pipe_stages: int, world_size: int, cuda_available: bool) -> BatchShape:
    """Refuses, with one line each, what DeepSpeed would reject later or silently get wrong.
    (The flags' own rules, stage count and --seq-len among them, are RunConfig's.)"""
    if world_size % pipe_stages:
        raise ConfigError(f"--pipe-stages {pipe_stages} does not divide the world size {world_size}: "
                          f"launch a multiple of {pipe_stages} processes or change --pipe-stages")
    zero_stage = ds.get("zero_optimization", {}).get("stage", 0)
    # The model is always a PipelineModule, whose engine refuses ZeRO-2/3 even with one stage.
    if zero_stage >= 2:
        raise ConfigError(f"ZeRO stage {zero_stage} cannot be combined with pipeline parallelism "
                          f"({pipe_stages} stage{'s' if pipe_stages > 1 else ''}; the model is always a pipeline): "
                          f'use ZeRO-1 with pipeline parallelism ("zero_optimization": {{"stage": 1}})')
    fp16 = ds.get("fp16", {}).get("enabled", False)
    bf16 = ds.get("bf16", {}).get("enabled", False)
    if fp16 and bf16:
        raise ConfigError("the DeepSpeed config enables both fp16 and bf16: enable one")
    if fp16 and not cuda_available:
        raise ConfigError("fp16 needs a GPU (no CUDA device found): use ds_configs/cpu.json "
                          "(fp32) or a bf16 config on this machine")
    if ds.get("scheduler", {}).get("params", {}).get("total_num_steps") is not None:
        raise ConfigError("the DeepSpeed config sets scheduler.params.total_num_steps; remove it: "
                          "the schedule length is taken from --steps")
    return resolve_batch(ds, world_size // pipe_stages)


def fill_run_values(ds: dict, *, steps: int, run_dir: Path, environ: MutableMapping[str, str] = os.environ) -> dict:
    """A copy of the config with the run's own values filled in: the schedule length, and
    --run-dir as the directory of the TensorBoard and CSV monitors when the JSON gives none.

    With "wandb" enabled, also sets WANDB_DIR in `environ` (the process environment) to
    --run-dir unless it is set already: DeepSpeed's WandbMonitor starts the W&B run without a
    directory, and wandb reads WANDB_DIR (see lamda_pipe/metrics.py)."""
    ds = copy.deepcopy(ds)
    sched = ds.get("scheduler")
    if sched and sched.get("type") in ("WarmupDecayLR", "WarmupCosineLR"):
        sched.setdefault("params", {})["total_num_steps"] = steps
    for key in ("tensorboard", "csv_monitor"):
        monitor = ds.get(key)
        if monitor and monitor.get("enabled") and not monitor.get("output_path"):
            monitor["output_path"] = str(run_dir)
    if ds.get("wandb", {}).get("enabled"):
        environ.setdefault("WANDB_DIR", str(run_dir))
    return ds
