"""A pipeline checkpoint as a model you can use: one safetensors file, its config and tokenizer.

    python scripts/export.py RUN_DIR --out exported/lamda-debug        (or lamda-export)

An export dir holds
* model.safetensors: the plain LaMDA state dict (fp32, or bf16/fp16 with --dtype); the
  embedding is tied to the head, so the state dict, and the file, hold it once;
* config.json: ModelConfig.to_dict() plus "format" (lamda-pipe-export/1), "dtype",
  "source_checkpoint" (the tag dir it came from) and "source_step";
* tokenizer.json: a copy of the checkpoint's, when it has one.
LaMDA.from_pretrained(DIR) loads it with safetensors alone. Nothing here unpickles: layer files
are read with torch.load(weights_only=True) (pipeline.load_plain_model).

`resolve` finds a model from any of the paths a user is likely to have at hand: a run dir, its
checkpoints dir, one checkpoint (tag dir), or an export dir.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .model import EXPORT_CONFIG, EXPORT_FORMAT, EXPORT_WEIGHTS, LaMDA, read_export_config

from .checkpoint import RUN_INFO, CheckpointError

# The names train.py writes (kept here rather than imported: train.py pulls in the data stack).
CHECKPOINT_SUBDIR = "checkpoints"
LATEST = "latest"
TOKENIZER = "tokenizer.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def layer_file(layer_idx: int) -> str:
    return f"layer_{layer_idx:02d}-model_states.pt"  # DeepSpeed's per-layer file (pipeline.py)


@dataclass(frozen=True)
class Source:
    kind: str  # "export" or "checkpoint"
    path: Path  # the export dir, or the checkpoint's tag dir

    @property
    def tokenizer(self) -> Path | None:
        p = self.path / TOKENIZER
        return p if p.is_file() else None


def resolve(path) -> Source:
    """An export dir -> itself; a tag dir -> itself; a checkpoints dir -> the tag its `latest`
    names; a run dir -> RUN/checkpoints' latest. Anything else: CheckpointError."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such directory; pass a run dir, its checkpoints/ dir, a checkpoint "
                              f"(e.g. RUN/checkpoints/global_step200) or an export dir")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file; pass the directory that holds it")
    if (p / EXPORT_WEIGHTS).is_file() and (p / EXPORT_CONFIG).is_file():
        return Source("export", p)
    if (p / LATEST).is_file():
        return Source("checkpoint", _latest_tag(p))
    if (p / CHECKPOINT_SUBDIR / LATEST).is_file():
        return Source("checkpoint", _latest_tag(p / CHECKPOINT_SUBDIR))
    if (p / RUN_INFO).is_file() or (p / layer_file(0)).is_file():
        return Source("checkpoint", p)
    if (p / CHECKPOINT_SUBDIR).is_dir():
        raise CheckpointError(f"{p / CHECKPOINT_SUBDIR} has no '{LATEST}' file: no checkpoint of this run was "
                              f"completed; pass a checkpoint dir (e.g. {p / CHECKPOINT_SUBDIR / 'global_step100'})")
    raise CheckpointError(f"{p} holds no model: not a run dir (no {CHECKPOINT_SUBDIR}/{LATEST}), a checkpoints dir "
                          f"(no {LATEST}), a checkpoint ({RUN_INFO}, {layer_file(0)}) or an export "
                          f"({EXPORT_WEIGHTS} + {EXPORT_CONFIG})")


def _latest_tag(ckpt_dir: Path) -> Path:
    tag = (ckpt_dir / LATEST).read_text().strip()
    if not tag or not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"{ckpt_dir / LATEST} names checkpoint {tag!r}, which is not a directory there; pass "
                              f"one of the checkpoint dirs in {ckpt_dir} directly")
    return ckpt_dir / tag


def source_config(src: Source) -> tuple[ModelConfig, int | None]:
    """(model config, training step) without loading weights; for a checkpoint, also checks
    that every layer file is there."""
    if src.kind == "export":
        try:
            cfg = read_export_config(src.path)
        except (FileNotFoundError, ValueError) as e:
            raise CheckpointError(str(e)) from None
        return cfg, json.loads((src.path / EXPORT_CONFIG).read_text()).get("source_step")
    info_file = src.path / RUN_INFO
    if not info_file.is_file():
        raise CheckpointError(f"checkpoint {src.path} has no {RUN_INFO}, so its model configuration is unknown "
                              f"(an older ds_train.py did not write one); resume the run with the current ds_train.py "
                              f"for one more step (--load ... --steps N+1) to get a checkpoint that has it")
    try:
        info = json.loads(info_file.read_text())
        cfg = ModelConfig.from_dict(info["model_config"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{info_file} has no usable model_config ({e}); the checkpoint was not written by "
                              f"lamda-pipe's ds_train.py") from None
    for i in range(cfg.depth + 2):  # embedding, blocks, final norm; the tied head has no file
        if not (src.path / layer_file(i)).is_file():
            raise CheckpointError(f"checkpoint {src.path} is incomplete: {layer_file(i)} is missing (an interrupted "
                                  f"save?); use an earlier checkpoint of the run")
    step = info.get("global_steps")
    if step is None:
        m = re.fullmatch(r"global_step(\d+)", src.path.name)
        step = int(m.group(1)) if m else None
    return cfg, step


def load_model(src: Source, cfg: ModelConfig, device=None, dtype: torch.dtype | None = None) -> LaMDA:
    """The plain model of an export dir or checkpoint, in eval mode (checkpoints load as fp32)."""
    if src.kind == "export":
        try:
            return LaMDA.from_pretrained(src.path, device=device, dtype=dtype)
        except (FileNotFoundError, ValueError) as e:
            raise CheckpointError(str(e)) from None
    from .pipeline import load_plain_model  # imports DeepSpeed: only for checkpoints

    try:
        model = load_plain_model(src.path, cfg)
    except Exception as e:  # torch.load's and load_state_dict's errors do not name the checkpoint
        raise CheckpointError(f"could not rebuild the model from checkpoint {src.path} with the model_config of "
                              f"its {RUN_INFO}: {str(e)[:500]}") from None
    return model.to(device=device, dtype=dtype).eval()


def check_out(out: Path, force: bool) -> None:
    """Refuses an existing --out without force, and anything but an earlier export even with it."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise CheckpointError(f"--out {out} already exists; pass --force to replace it, or choose another --out "
                              f"(nothing was changed)")
    is_export = (out / EXPORT_CONFIG).is_file() and not out.is_symlink()
    if is_export:
        try:
            is_export = json.loads((out / EXPORT_CONFIG).read_text()).get("format") == EXPORT_FORMAT
        except (ValueError, AttributeError):
            is_export = False
    empty_dir = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
    if not (is_export or empty_dir):
        raise CheckpointError(f"--out {out} exists and is not a lamda-pipe export; --force only replaces an earlier "
                              f"export or an empty dir, so choose another --out (nothing was changed)")


def export_checkpoint(src, out_dir, force: bool = False, dtype: str = "fp32") -> Path:
    """Writes the model at `src` (run, checkpoints, checkpoint or export dir) to out_dir as
    model.safetensors + config.json (+ tokenizer.json); returns out_dir. Written to a temporary
    dir beside out_dir and renamed at the end: out_dir is never half-written."""
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    source = resolve(src)
    check_out(out, force)
    cfg, step = source_config(source)  # before loading anything: an incomplete checkpoint fails here
    provenance = str(source.path.resolve())
    if source.kind == "export":  # re-exporting (e.g. to another dtype) keeps the original source
        meta = json.loads((source.path / EXPORT_CONFIG).read_text())
        provenance = meta.get("source_checkpoint", provenance)
    model = load_model(source, cfg)
    # Every tensor its own contiguous storage (safetensors refuses shared ones); the head has none.
    state = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    del model
    config = {"format": EXPORT_FORMAT, **cfg.to_dict(), "dtype": dtype, "source_checkpoint": provenance,
              "source_step": step}

    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier crash of this same pid only
    tmp.mkdir()
    try:
        (tmp / EXPORT_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
        save_file(state, str(tmp / EXPORT_WEIGHTS), metadata={"format": EXPORT_FORMAT})
        shutil.copymode(tmp / EXPORT_CONFIG, tmp / EXPORT_WEIGHTS)  # safetensors creates it 0600; follow the umask
        if source.tokenizer is not None:
            shutil.copyfile(source.tokenizer, tmp / TOKENIZER)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_in(tmp: Path, out: Path) -> None:
    """Renames tmp to out; an existing out (an earlier export, checked by check_out) is moved
    aside first and deleted only once the new one is in place."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
