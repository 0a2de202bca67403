"""A prepared dir written in parts by `lamda-prepare-data --shard i/N` tasks (a Slurm array:
scripts/slurm/prepare.sbatch; the writing is in prepare_parts.py), read in training as one source.

Layout (text data only):

    OUT/parts.json                   the plan: N, tokenizer sha256, options, the input's pieces
                                     (files or row ranges, with sizes) and their document counts;
                                     written once (by --plan-shards, or by the first task) and
                                     checked by every task (another N, tokenizer, option or input
                                     is refused)
    OUT/tokenizer.json               the tokenizer every task used
    OUT/parts/00003-of-00016/        shard 3: train.bin, val.bin and meta.json, as in a plain dir
    OUT/parts/00003-of-00016.tmp-PID a task at work (or killed): never read, removed on a rerun

Shard i of N holds documents [i*D//N, (i+1)*D//N) of the input's D documents, validation decided
by each document's index in the whole input: the parts concatenated in shard order are the token
files a one-process prepare writes, byte for byte. A part dir under its final name is complete
(meta.json is written before the rename that gives it that name).

Training reads the dir as one source (`read_parts_meta`, `PartTokens`): the parts' token files
as one sequence, so windows run across part boundaries exactly as they run across documents, and
the window count, the k-th sample and the validation split are those of the one-process dir,
whatever the order in which the parts were written. A dir with a part missing or incomplete is
refused, naming the shards to (re)run.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import DataError
from .prepare import FORMAT, SPLITS, read_json

PLAN_FILE = "parts.json"
PARTS_DIR = "parts"
PLAN_FORMAT = "lamda-pipe-parts/1"
PART_FORMAT = "lamda-pipe-part/1"
# What every task of one dir must agree on (the plan's keys a task compares with its own).
PLAN_KEYS = ("num_shards", "tokenizer_sha256", "val_fraction", "source", "limits")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def name(self) -> str:
        return part_name(self.index, self.count)

    def documents(self, total: int) -> tuple[int, int]:
        """[first, end) of this shard's documents among `total`."""
        return self.index * total // self.count, (self.index + 1) * total // self.count


def parse_shard(text: str) -> Shard:
    """'3/16' -> Shard(3, 16), for --shard; DataError names the form."""
    index, sep, count = text.partition("/")
    if not (sep and index.strip().isdigit() and count.strip().isdigit()) or int(count) < 1 or int(index) >= int(count):
        raise DataError(f"--shard {text!r}: expected i/N with 0 <= i < N (e.g. 3/16: the 4th of 16 slices; under "
                        f"Slurm, $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return Shard(int(index), int(count))


def part_name(index: int, count: int) -> str:
    return f"{index:05d}-of-{count:05d}"


def shard_list(indices: Iterable[int]) -> str:
    """[2, 5, 6, 7] -> '2,5-7' (what `sbatch --array=` takes)."""
    out = []
    for _, run in itertools.groupby(enumerate(sorted(indices)), key=lambda p: p[1] - p[0]):
        run = [i for _, i in run]
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


def part_meta(part: Path, fix: str) -> dict:
    """A part dir's meta.json after checking its files; DataError if it is not complete."""
    meta = read_json(part / "meta.json", PART_FORMAT, fix) if (part / "meta.json").is_file() else None
    if meta is None:
        raise DataError(f"{part}: no meta.json (incomplete); {fix}")
    for name in SPLITS:
        try:
            info = meta["splits"][name]
            path, want = part / info["file"], info["tokens"] * np.dtype(meta["dtype"]).itemsize
        except (KeyError, TypeError):
            raise DataError(f"{part}/meta.json: no {name} split with file and tokens (damaged); {fix}") from None
        if not path.is_file() or path.stat().st_size != want:
            raise DataError(f"{path}: missing or not {want} bytes as meta.json says (truncated?); {fix}")
    return meta


def parts_status(out: Path) -> tuple[dict, list[int]]:
    """(the plan, the shard indices whose part is missing or incomplete)."""
    plan = read_json(out / PLAN_FILE, PLAN_FORMAT, f"remove {out} and prepare it again")
    todo = []
    for i in range(plan["num_shards"]):
        try:
            part_meta(out / PARTS_DIR / part_name(i, plan["num_shards"]), "")
        except DataError:
            todo.append(i)
    return plan, todo


def read_parts_meta(data_dir: str | Path) -> dict:
    """read_meta for a dir of parts: the whole dir's meta (the sums of its parts' counts, with
    "parts": the part dirs in shard order), after checking that every part is there and complete
    and that they are slices of one input; DataError naming the shards to (re)run otherwise."""
    d = Path(data_dir)
    plan, todo = parts_status(d)
    n = plan["num_shards"]
    if todo:
        raise DataError(f"{d} is prepared in {n} parts, and {len(todo)} of them are missing or incomplete: shard(s) "
                        f"{shard_list(todo)}; run `lamda-prepare-data ... --shard i/{n} --out {d}` for each (with "
                        f"scripts/slurm/prepare.sbatch: sbatch --array={shard_list(todo)} with LAMDA_SHARDS={n}; "
                        f"complete parts are skipped)")
    if not (d / "tokenizer.json").is_file():
        raise DataError(f"{d}: tokenizer.json is missing; run any shard again (--shard i/{n}, with the tokenizer the "
                        f"parts were prepared with) to restore it")
    parts = [d / PARTS_DIR / part_name(i, n) for i in range(n)]
    metas = [part_meta(p, "") for p in parts]
    expect = 0
    for i, m in enumerate(metas):
        if any(m.get(k) != plan[k] for k in PLAN_KEYS) or m["first_document"] != expect or \
                m["total_documents"] != plan["documents"]:
            raise DataError(f"{parts[i]} does not belong to {d}'s plan (other options or input, or another shard's "
                            f"slice); remove it and run --shard {i}/{n} again")
        expect += m["documents"]
    splits = {}
    for name in SPLITS:
        infos = [m["splits"][name] for m in metas]
        splits[name] = {"file": f"{PARTS_DIR}/*/{name}.bin", "tokens": sum(i["tokens"] for i in infos),
                        "documents": sum(i["documents"] for i in infos),
                        "parts": [f"{PARTS_DIR}/{p.name}/{i['file']}" for p, i in zip(parts, infos)],
                        "part_tokens": [i["tokens"] for i in infos]}
    return {"format": FORMAT, "kind": "text", **{k: plan[k] for k in ("dtype", "vocab_size", "tokenizer_sha256",
                                                                     "eot_id", "source", "val_fraction")},
            "splits": splits, "created": max(m["created"] for m in metas), "num_shards": n}


class PartTokens:
    """The token files of a split's parts as one read-only sequence: len(), integer and
    slice indexing (a slice across parts is copied together), max(). What ShuffledSamples and
    the start-up checks need of a token array."""

    def __init__(self, arrays: list[np.ndarray], dtype):
        self.arrays = [a for a in arrays if len(a)]
        self.dtype = np.dtype(dtype)
        self.starts = list(itertools.accumulate((len(a) for a in self.arrays), initial=0))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("PartTokens: only contiguous slices")
            pieces = []
            i = bisect.bisect_right(self.starts, start) - 1
            while start < stop and i < len(self.arrays):
                lo = start - self.starts[i]
                hi = min(stop, self.starts[i + 1]) - self.starts[i]
                pieces.append(self.arrays[i][lo:hi])
                start, i = self.starts[i] + hi, i + 1
            if not pieces:
                return np.zeros(0, self.dtype)
            return np.concatenate(pieces) if len(pieces) > 1 else np.asarray(pieces[0])
        k = int(key) + (len(self) if int(key) < 0 else 0)
        if not 0 <= k < len(self):
            raise IndexError(f"index {key} out of range for {len(self)} tokens")
        i = bisect.bisect_right(self.starts, k) - 1
        return self.arrays[i][k - self.starts[i]]

    def max(self):
        return max(a.max() for a in self.arrays)

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate(self.arrays) if self.arrays else np.zeros(0, self.dtype)
        return whole if dtype is None else whole.astype(dtype)


def part_tokens(directory: Path, info: dict, dtype: str) -> PartTokens:
    """A split of a dir of parts (read_parts_meta's `info`) as one sequence of memory maps."""
    return PartTokens([np.memmap(directory / f, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
                       for f, n in zip(info["parts"], info["part_tokens"])], dtype)
