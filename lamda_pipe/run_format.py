"""What a run leaves on disk, named once: the checkpoint layout, the run record, and the one
answer to "which model is at this path".

    RUN_DIR/
      checkpoints/                   CHECKPOINTS
        latest                       LATEST: the tag of the newest complete checkpoint
        global_step200/              tag_for(200)
          lamda_complete             COMPLETE: written once every rank has saved
          lamda_run.json             RUN_RECORD: a RunRecord, the checkpoint's self-description
          tokenizer.json             TOKENIZER
          layer_00-model_states.pt   layer_file(i): DeepSpeed's per-layer weights
          mp_rank_00_model_states.pt, ..._optim_states.pt   DeepSpeed's per-stage state
        global_step200_universal/    the same converted for another layout (checkpoint.py)
      metrics.jsonl, TensorBoard events, data/

An export dir (export.py) holds model.safetensors, config.json and tokenizer.json (a dir that
transformers' save_pretrained sharded: model.safetensors.index.json and the shards it names).

The run record is versioned. Version 1 is the layout lamda-pipe 0.1.0 wrote without a version
key; version 2 adds a data order (data/order.py) that version-1 readers do not know. A record
is written with the lowest version that describes it, a reader accepts every version up to its
own and refuses a newer one with a message, so an old trainer never half-reads a record it
does not understand (nor resumes a run with other samples than it would have seen).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig
from .errors import CheckpointError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "lamda_complete"
RUN_RECORD = "lamda_run.json"
TOKENIZER = "tokenizer.json"
UNIVERSAL_SUFFIX = "_universal"
EXPORT_CONFIG, EXPORT_WEIGHTS = "config.json", "model.safetensors"
# What transformers' save_pretrained writes instead of model.safetensors when it shards a large
# model (of a --format hf export): the shards' names per tensor.
EXPORT_WEIGHTS_INDEX = "model.safetensors.index.json"

_TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> int | None:
    """The step a checkpoint folder name stands for; None for anything else (e.g. _universal)."""
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def layer_file(layer_idx: int) -> str:
    """DeepSpeed's per-layer weights file; pipeline.py's docstring gives the layer indices."""
    return f"layer_{layer_idx:02d}-model_states.pt"


def stage_states_file(stage: int) -> str:
    """DeepSpeed's per-stage engine state (no weights in a pipeline checkpoint)."""
    return f"mp_rank_{stage:02d}_model_states.pt"


def num_layer_files(cfg: ModelConfig) -> int:
    return cfg.depth + 2  # embedding, blocks, final norm; the tied head has no file of its own


@dataclass(frozen=True)
class RunRecord:
    """A checkpoint's self-description (lamda_run.json): enough to check a resume before any
    process starts, to rebuild the plain model, and to continue the data where it stopped."""

    VERSION = 2  # class constant, not a field: the newest version this code writes and reads

    model_preset: str
    model_config: ModelConfig
    pipe_stages: int
    data_parallel: int
    global_steps: int
    samples_consumed: int  # the data position: the next sample is this one
    stage_bounds: tuple[int, ...] | None = None  # None: written before bounds were recorded
    partition: str | None = None
    bf16: bool = False
    seq_len: int | None = None
    micro_offset: int = 0  # forward passes so far: DeepSpeed's per-layer dropout seeds follow it
    data: str | None = None
    tokenizer_sha256: str | None = None
    ds_config: dict | None = None
    # Sample ranges [start, end) that rollbacks skipped (guard.py); the data position already
    # lies past them, so they are a record of what the run never trained on. Absent: none.
    skipped_samples: tuple[tuple[int, int], ...] = ()
    # Dialog fine-tuning: {"attributes": [...]}, the attributes the model learned to rate
    # (data/dialog.py's discriminative examples), which decoding ranks candidates by
    # (ranking.py, export.dialog_at). Absent: not fine-tuned to rate anything. Optional, so a
    # record without it is still version 1 and an older reader simply does not rank.
    dialog: dict | None = None
    # Attention kept within documents on plain text (--document-mask); dialog data always is.
    # Absent: off, as every run before the flag.
    document_mask: bool = False
    # The data order's version (data/order.py), kept for the whole run so that a resume sees
    # exactly the samples an uninterrupted run would. Absent: 1, the order every run used before.
    data_order: int = 1

    @property
    def format_version(self) -> int:
        """The lowest version that describes this record: 2 only when its data order is one a
        version-1 reader would not follow (it would resume with other samples); else 1."""
        return 2 if self.data_order >= 2 else 1

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["model_config"] = self.model_config.to_dict()
        d["stage_bounds"] = None if self.stage_bounds is None else list(self.stage_bounds)
        d["skipped_samples"] = [list(r) for r in self.skipped_samples]
        return json.dumps({"format_version": self.format_version, **d}, indent=1)

    @classmethod
    def from_dict(cls, d: dict, where: str = RUN_RECORD) -> "RunRecord":
        fix = "the checkpoint was not written by lamda-pipe's trainer, or is damaged; use an earlier one"
        if not isinstance(d, dict):
            raise CheckpointError(f"{where} holds a JSON {type(d).__name__}, not an object; {fix}")
        d = dict(d)
        version = d.pop("format_version", 1)  # 0.1.0 wrote no version: that layout is version 1
        if not isinstance(version, int) or version > cls.VERSION:
            raise CheckpointError(f"{where} has format_version {version!r}, newer than this lamda-pipe reads "
                                  f"({cls.VERSION}); upgrade lamda-pipe to load it")
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}  # keys a newer minor writer added
        try:
            d["model_config"] = ModelConfig.from_dict(d["model_config"])
            if d.get("stage_bounds") is not None:
                d["stage_bounds"] = tuple(int(b) for b in d["stage_bounds"])
            d["skipped_samples"] = tuple((int(a), int(b)) for a, b in d.get("skipped_samples") or ())
            if d.get("dialog") is not None and not isinstance(d["dialog"], dict):
                raise TypeError(f"dialog must be an object like {{\"attributes\": [...]}}, got {d['dialog']!r}")
            return cls(**d)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where} is not a usable run record ({type(e).__name__}: {e}); {fix}") from None

    @classmethod
    def read(cls, tag_dir: Path) -> "RunRecord | None":
        """The record of a checkpoint folder; None when there is none (another tool's checkpoint)."""
        path = Path(tag_dir) / RUN_RECORD
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
        except ValueError as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}): the checkpoint is damaged; resume from an "
                                  f"earlier one (edit {Path(tag_dir).parent / LATEST}) or start a new "
                                  f"--run-dir") from None
        return cls.from_dict(d, where=str(path))

    def expected_files(self) -> list[str]:
        """DeepSpeed's files for a pipeline checkpoint of this layout (names as in deepspeed 0.16+)."""
        files = [layer_file(i) for i in range(num_layer_files(self.model_config))]
        files += [stage_states_file(s) for s in range(self.pipe_stages)]
        files += [self.optimizer_file(s, r) for s in range(self.pipe_stages) for r in range(self.data_parallel)]
        return files

    def optimizer_file(self, stage: int, dp_rank: int) -> str:
        """One data-parallel rank's ZeRO-1 shard of one stage's optimizer state."""
        return f"{'bf16_' if self.bf16 else ''}zero_pp_rank_{dp_rank}_mp_rank_{stage:02d}_optim_states.pt"

    def stage_files(self, stage: int, bounds: tuple[int, ...]) -> list[str]:
        """What every rank of one stage loads besides its own optimizer shard: the stage's engine
        state and the weights of its layers (bounds: first layer of each stage, then the count;
        the tied head past the last file has none of its own)."""
        layers = range(bounds[stage], min(bounds[stage + 1], num_layer_files(self.model_config)))
        return [stage_states_file(stage)] + [layer_file(i) for i in layers]


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The step folders that carry the completion marker, newest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(step, d) for d in ckpt_dir.iterdir()
             if (step := step_of(d.name)) is not None and (d / COMPLETE).is_file()]
    return [d for _, d in sorted(found, reverse=True)]


def read_latest(ckpt_dir: Path) -> str | None:
    """The tag `latest` names ("" when it is empty), or None when there is no `latest` file."""
    latest = Path(ckpt_dir) / LATEST
    return latest.read_text().strip() if latest.is_file() else None


def latest_tag_dir(ckpt_dir: Path) -> Path | None:
    """The folder `latest` names, or None when there is no `latest` at all."""
    latest = Path(ckpt_dir) / LATEST
    tag = read_latest(ckpt_dir)
    if tag is None:
        return None
    if not tag or not (Path(ckpt_dir) / tag).is_dir():
        raise CheckpointError(f"{latest} names checkpoint {tag!r}, which is not a directory in {ckpt_dir}; point "
                              f"`latest` at one of the complete checkpoints there (or pass one directly), or "
                              f"start a new --run-dir")
    return Path(ckpt_dir) / tag


@dataclass(frozen=True)
class ModelPath:
    """Where a model is: an export dir or one checkpoint (tag dir)."""

    kind: str  # "export" or "checkpoint"
    path: Path

    @property
    def tokenizer(self) -> Path | None:
        p = self.path / TOKENIZER
        return p if p.is_file() else None


def resolve_model(path) -> ModelPath:
    """The model a user means by a path: an export dir or a checkpoint (tag) dir -> itself; a
    checkpoints dir -> the tag its `latest` names; a run dir -> its checkpoints' latest.
    Used by --init-from, lamda-export and lamda-generate."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such directory; pass a run dir, its {CHECKPOINTS}/ dir, a checkpoint "
                              f"(e.g. RUN/{CHECKPOINTS}/{tag_for(200)}) or an export dir")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file; pass the directory that holds it")
    if ((p / EXPORT_WEIGHTS).is_file() or (p / EXPORT_WEIGHTS_INDEX).is_file()) and (p / EXPORT_CONFIG).is_file():
        return ModelPath("export", p)
    for ckpt_dir in (p, p / CHECKPOINTS):
        tag_dir = latest_tag_dir(ckpt_dir)
        if tag_dir is not None:
            return ModelPath("checkpoint", tag_dir)
    if (p / RUN_RECORD).is_file() or (p / layer_file(0)).is_file():
        return ModelPath("checkpoint", p)
    for ckpt_dir in (p / CHECKPOINTS, p):
        complete = complete_checkpoints(ckpt_dir)
        if complete:  # `latest` lost: name what is there rather than say nothing was saved
            raise CheckpointError(f"{ckpt_dir} has no '{LATEST}' file, but holds complete checkpoints; pass one, e.g. "
                                  f"the newest: {complete[0]}")
    if (p / CHECKPOINTS).is_dir():
        raise CheckpointError(f"{p / CHECKPOINTS} has no '{LATEST}' file: no checkpoint of this run was "
                              f"completed; pass a checkpoint dir (e.g. {p / CHECKPOINTS / tag_for(100)})")
    raise CheckpointError(f"{p} holds no model: not a run dir (no {CHECKPOINTS}/{LATEST}), a checkpoints dir "
                          f"(no {LATEST}), a checkpoint ({RUN_RECORD}, {layer_file(0)}) or an export "
                          f"({EXPORT_WEIGHTS} + {EXPORT_CONFIG})")
