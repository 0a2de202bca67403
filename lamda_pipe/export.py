"""A pipeline checkpoint as a model you can use: one safetensors file, its config and tokenizer.

    python scripts/export.py RUN_DIR --out exported/lamda-debug        (or lamda-export)

An export dir holds
* model.safetensors: the plain LaMDA state dict (fp32, or bf16/fp16 with --dtype); the
  embedding is tied to the head, so the state dict, and the file, hold it once;
* config.json: ModelConfig.to_dict() plus "format" (lamda-pipe-export/2), "dtype",
  "source_checkpoint" (the tag dir it came from), "source_step" and, when the tokenizer has
  the dialog tokens, "dialog": {"tokens": DialogTokens.to_dict(), "attributes": [...]}, the
  attributes being those the model was fine-tuned to rate (the run record's `dialog`; [] for
  none): which models can rank their own candidates (ranking.py);
* tokenizer.json: a copy of the checkpoint's, when it has one.
Format 1 (lamda-pipe 0.1.0) is format 2 without "dialog" and still loads. Format 2 exists so
that a reader of format 1, which refuses unknown config keys, says "re-export" instead of
"unknown model config keys ['dialog']". Format 3 (--format hf, hf/hf_files.py) is format 2 plus
what Hugging Face transformers needs to load the dir; its config.json holds transformers' keys
too, which the reader here ignores (it takes the ModelConfig fields), so a dir that
transformers' save_pretrained wrote from it loads here as well.
LaMDA.from_pretrained(DIR) loads it with safetensors alone (the model's `dialog` attribute is
the ModelDialog of its config, or None). Nothing here unpickles: layer files
are read with torch.load(weights_only=True) (weights.py). Which model a path means (a run dir,
its checkpoints dir, one checkpoint or an export) is run_format.resolve_model's answer.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import CheckpointError, UsageError
from .data.dialog import DialogTokens
from .data.tokenizer import ATTRIBUTES
from .hf.hf_files import HF_FORMAT, hf_config, write_hf_files
from .model import LaMDA
from .run_format import (EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_WEIGHTS_INDEX, RUN_RECORD, TOKENIZER, ModelPath,
                         RunRecord, layer_file, num_layer_files, resolve_model)

EXPORT_FORMAT = "lamda-pipe-export/2"
READABLE_FORMATS = ("lamda-pipe-export/1", EXPORT_FORMAT, HF_FORMAT)
FORMATS = ("lamda", "hf")  # lamda-export --format: format 2, or format 3 for transformers
# config.json keys beyond ModelConfig
EXPORT_META_KEYS = ("format", "dtype", "source_checkpoint", "source_step", "dialog")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def read_export_meta(path) -> dict:
    """The config.json of an export dir, checking both files are there and its format."""
    path = Path(path)
    config_file = path / EXPORT_CONFIG
    missing = [f for f in (EXPORT_CONFIG, EXPORT_WEIGHTS) if not (path / f).is_file()
               and not (f == EXPORT_WEIGHTS and (path / EXPORT_WEIGHTS_INDEX).is_file())]
    if missing:
        raise CheckpointError(f"{path} is not an exported model: missing {' and '.join(missing)}; export a "
                              f"checkpoint first (lamda-export RUN_DIR --out {path})")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e}); re-export the model") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found not in READABLE_FORMATS:
        raise CheckpointError(f"{config_file}: format {found!r}, expected one of {', '.join(READABLE_FORMATS)}; "
                              f"re-export the checkpoint with this version's lamda-export")
    return meta


def read_export_config(path) -> ModelConfig:
    """The ModelConfig of an export dir (its config.json), checking both files are there."""
    meta = read_export_meta(path)
    if meta["format"] == HF_FORMAT:  # the rest is transformers' (model_type, auto_map, its own defaults)
        fields = set(ModelConfig().to_dict())
        return ModelConfig.from_dict({k: v for k, v in meta.items() if k in fields})
    return ModelConfig.from_dict({k: v for k, v in meta.items() if k not in EXPORT_META_KEYS})


def read_export_weights(path) -> dict[str, torch.Tensor]:
    """The state dict of an export dir: model.safetensors, or the shards its
    model.safetensors.index.json names (a large model saved by transformers' save_pretrained)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    files = [path / EXPORT_WEIGHTS]
    index = path / EXPORT_WEIGHTS_INDEX
    if not files[0].is_file() and index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is damaged ({type(e).__name__}: {e}); save the model again") from None
        if not all(isinstance(n, str) and Path(n).name == n for n in names):
            raise CheckpointError(f"{index} names shards outside {path}; save the model again")
        files = [path / n for n in names]
    state = {}
    for weights_file in files:
        try:
            state.update(load_file(weights_file, device="cpu"))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{weights_file} is not a readable safetensors file ({e}); re-export the "
                                  f"model") from None
    return state


def load_export(path, device=None, dtype: torch.dtype | None = None, attention: str = "auto",
                model_class=LaMDA) -> LaMDA:
    """The model of an export dir, in eval mode (LaMDA.from_pretrained)."""
    cfg = read_export_config(path)
    state = read_export_weights(path)
    weights_file = Path(path) / EXPORT_WEIGHTS
    if not weights_file.is_file():
        weights_file = Path(path) / EXPORT_WEIGHTS_INDEX  # sharded: name the index in a mismatch
    with torch.device("meta"):
        model = model_class(config=cfg, attention=attention)  # shapes only: the weights are replaced next
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:300]  # torch's message spans lines; the refusal is one
        raise CheckpointError(f"{weights_file} does not match its {EXPORT_CONFIG} ({first}); re-export the model") \
            from None
    model.dialog = _export_dialog(read_export_meta(path), Path(path) / EXPORT_CONFIG)
    return model.to(device=device, dtype=dtype).eval()


def model_config_at(src: ModelPath) -> tuple[ModelConfig, int | None]:
    """(model config, training step) without loading weights; for a checkpoint, also checks
    that every layer file is there."""
    if src.kind == "export":
        cfg = read_export_config(src.path)
        return cfg, json.loads((src.path / EXPORT_CONFIG).read_text()).get("source_step")
    record = RunRecord.read(src.path)
    if record is None:
        raise CheckpointError(f"checkpoint {src.path} has no {RUN_RECORD}, so its model configuration is unknown "
                              f"(it was not written by lamda-pipe's trainer); resume the run with ds_train.py "
                              f"for one more step (--load ... --steps N+1) to get a checkpoint that has it")
    for i in range(num_layer_files(record.model_config)):
        if not (src.path / layer_file(i)).is_file():
            raise CheckpointError(f"checkpoint {src.path} is incomplete: {layer_file(i)} is missing (an interrupted "
                                  f"save?); use an earlier checkpoint of the run")
    return record.model_config, record.global_steps


@dataclass(frozen=True)
class ModelDialog:
    """What a model knows of dialogs: the ids of its dialog tokens (data/dialog.py), and the
    attributes it was fine-tuned to rate, its discriminators (empty: none, ranking falls back
    to the likelihood)."""

    tokens: DialogTokens
    attributes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"tokens": self.tokens.to_dict(), "attributes": list(self.attributes)}


def _attributes(names, where: str) -> tuple[str, ...]:
    if not isinstance(names, (list, tuple)) or not all(isinstance(a, str) for a in names):
        raise CheckpointError(f"{where}: dialog attributes must be a list of names, got {names!r}; "
                              f"fix or re-export the model")
    unknown = [a for a in names if a not in ATTRIBUTES]
    if unknown:
        raise CheckpointError(f"{where}: unknown dialog attributes {unknown}; this lamda-pipe knows "
                              f"{', '.join(ATTRIBUTES)} (a newer version wrote it? upgrade lamda-pipe)")
    return tuple(names)


def _export_dialog(meta: dict, where) -> ModelDialog | None:
    d = meta.get("dialog")
    if d is None:
        return None  # exported before dialogs, or a tokenizer without dialog tokens
    try:
        return ModelDialog(DialogTokens.from_dict(d["tokens"]), _attributes(d.get("attributes", []), str(where)))
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{where}: its \"dialog\" entry is damaged ({type(e).__name__}: {e}); re-export "
                              f"the model") from None


def _tokens_of(tok) -> DialogTokens | None:
    try:
        return DialogTokens.of(tok)
    except UsageError:
        return None


def dialog_at(src: ModelPath, tok=None) -> ModelDialog | None:
    """The ModelDialog of the model at src, None for a model whose tokenizer has no dialog tokens.

    tok: the tokenizer generation will use (default: the one beside the model). The attributes
    are the run record's `dialog` (a checkpoint) or config.json's (an export); the ids are the
    tokenizer's, and an export's recorded ids must agree with it."""
    if src.kind == "export":
        where = src.path / EXPORT_CONFIG
        recorded = _export_dialog(read_export_meta(src.path), where)
        attributes = recorded.attributes if recorded is not None else ()
    else:
        where, recorded = src.path / RUN_RECORD, None
        record = RunRecord.read(src.path)
        attributes = _attributes(((record.dialog if record else None) or {}).get("attributes", []), str(where))
    if tok is None and src.tokenizer is not None:
        from .data.tokenizer import load_tokenizer
        tok = load_tokenizer(src.tokenizer)
    tokens = _tokens_of(tok) if tok is not None else None
    if recorded is not None:
        if tok is not None and tokens != recorded.tokens:
            raise CheckpointError(f"the tokenizer does not have the dialog token ids the model was exported with "
                                  f"({where}): use the model's own tokenizer.json")
        return recorded
    if tokens is None:
        if attributes:
            lack = "no tokenizer is given" if tok is None else "the tokenizer has no dialog tokens"
            raise CheckpointError(f"{where} names the discriminators {', '.join(attributes)} but {lack}; use the "
                                  f"tokenizer the model was fine-tuned with")
        return None
    return ModelDialog(tokens, attributes)


def load_model(src: ModelPath, cfg: ModelConfig, device=None, dtype: torch.dtype | None = None,
               attention: str = "auto") -> LaMDA:
    """The plain model of an export dir or checkpoint, in eval mode (checkpoints load as fp32)."""
    if src.kind == "export":
        return load_export(src.path, device=device, dtype=dtype, attention=attention)
    from .weights import load_plain_model

    try:
        model = load_plain_model(src.path, cfg)
        model.set_attention(attention)
    except Exception as e:  # torch.load's and load_state_dict's errors do not name the checkpoint
        raise CheckpointError(f"could not rebuild the model from checkpoint {src.path} with the model_config of "
                              f"its {RUN_RECORD}: {str(e)[:500]}") from None
    model.dialog = dialog_at(src) if src.tokenizer is not None else None
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
            is_export = json.loads((out / EXPORT_CONFIG).read_text()).get("format") in READABLE_FORMATS
        except (ValueError, AttributeError):
            is_export = False
    empty_dir = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
    if not (is_export or empty_dir):
        raise CheckpointError(f"--out {out} exists and is not a lamda-pipe export; --force only replaces an earlier "
                              f"export or an empty dir, so choose another --out (nothing was changed)")


def export_checkpoint(src, out_dir, force: bool = False, dtype: str = "fp32", fmt: str = "lamda") -> Path:
    """Writes the model at `src` (run, checkpoints, checkpoint or export dir) to out_dir as
    model.safetensors + config.json (+ tokenizer.json; fmt "hf": + transformers' files, see
    hf/hf_files.py); returns out_dir. Written to a temporary dir beside out_dir and renamed at
    the end: out_dir is never half-written."""
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if fmt not in FORMATS:
        raise CheckpointError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    source = resolve_model(src)
    check_out(out, force)
    if fmt == "hf" and source.tokenizer is None:
        raise CheckpointError(f"--format hf needs the model's tokenizer, and {source.path} has no tokenizer.json; "
                              f"copy the tokenizer.json the model was trained with into {source.path} (nothing "
                              f"was written)")
    cfg, step = model_config_at(source)  # before loading anything: an incomplete checkpoint fails here
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
    dialog = dialog_at(source)
    if dialog is not None:
        config["dialog"] = dialog.to_dict()
    tok = None
    if fmt == "hf":
        from .data.tokenizer import load_tokenizer
        tok = load_tokenizer(source.tokenizer)
        config = hf_config(config, dtype, tok)

    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier crash of this same pid only
    tmp.mkdir()
    try:
        (tmp / EXPORT_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
        # transformers reads "pt" as "saved from PyTorch"; our reader goes by config.json alone
        save_file(state, str(tmp / EXPORT_WEIGHTS), metadata={"format": "pt" if tok is not None else EXPORT_FORMAT})
        shutil.copymode(tmp / EXPORT_CONFIG, tmp / EXPORT_WEIGHTS)  # safetensors creates it 0600; follow the umask
        if source.tokenizer is not None:
            shutil.copyfile(source.tokenizer, tmp / TOKENIZER)
        if tok is not None:
            write_hf_files(tmp, tok, cfg.max_seq_len)
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
