"""A prepared dir written in parts: `lamda-prepare-data --shard i/N`, one task per slice of the
input (a Slurm array: scripts/slurm/prepare.sbatch), each resumable on its own.

Layout (text data only):

    OUT/parts.json                   the plan: N, tokenizer sha256, options, the input's document
                                     count; written once, by the first task, and checked by every
                                     later one (another N, tokenizer or option is refused)
    OUT/tokenizer.json               the tokenizer every task used
    OUT/parts/00003-of-00016/        shard 3: train.bin, val.bin and meta.json, as in a plain dir
    OUT/parts/00003-of-00016.tmp-PID a task at work (or killed): never read, removed on a rerun

Shard i of N holds documents [i*D//N, (i+1)*D//N) of the D documents of the input (the same
documents, in the same order, as a one-process prepare reads): contiguous slices of equal
document count, so the parts concatenated in shard order are the one-process token files, byte
for byte. A document goes to validation by its index in the whole input (prepare.py's rule),
and only the last shard can apply the at-least-one-validation-document rule, so it does. Every
task first counts the input's documents (reading, not tokenizing, everything), then reads up to
the end of its slice.

A part is built in a temporary dir with meta.json written last, then renamed into place: a part
dir under its final name is complete, and a killed task leaves only a `.tmp-PID` dir, which the
shard's next run removes. A complete part is skipped on a rerun.

Training reads the dir as one source (`read_parts_meta`, `PartTokens`): the parts' token files
as one sequence, so windows run across part boundaries exactly as they run across documents, and
the window count, the k-th sample and the validation split are those of the one-process dir. A
dir with a part missing or incomplete is refused, naming the shards to (re)run.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..distributed import pid_alive
from ..errors import DataError
from .prepare import FORMAT, OWNER_FILE, SPLITS, _encoded_batches, _write_synced, now, token_dtype
from .tokenizer import eot_id, load_tokenizer, tokenizer_sha256, vocab_size as id_space

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


def _read_json(path: Path, what: str, fix: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(value, dict) or value.get("format") != what:
        found = value.get("format") if isinstance(value, dict) else None
        raise DataError(f"{path}: format {found!r}, expected {what!r} (written by another version?); {fix}")
    return value


def check_parts_out(out: Path, plan: dict) -> dict | None:
    """Before any work: whether `out` can take parts of this plan. Returns the plan already
    there (None for a new dir); DataError for anything else, nothing touched."""
    other = "pick another --out"
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory; {other}")
    if (out / "meta.json").exists():
        raise DataError(f"--out {out} holds a complete prepared dir, not parts of one; --shard never replaces data: "
                        f"{other}")
    if not (out / PLAN_FILE).is_file():
        # a task racing to write the plan has its temporary copy there (_create_once)
        if out.exists() and any(not p.name.startswith(f".{PLAN_FILE}.tmp-") for p in out.iterdir()):
            raise DataError(f"--out {out} is a non-empty directory without {PLAN_FILE}, not a dir of parts; "
                            f"{other}")
        return None
    there = _read_json(out / PLAN_FILE, PLAN_FORMAT, f"remove {out} or {other}")
    if there.get("num_shards") != plan["num_shards"]:
        raise DataError(f"--out {out} was started with {there.get('num_shards')} shards, this task says "
                        f"--shard i/{plan['num_shards']}; run --shard i/{there.get('num_shards')} (every task the "
                        f"same N), or {other}")
    if there.get("tokenizer_sha256") != plan["tokenizer_sha256"]:
        raise DataError(f"--out {out} was started with another tokenizer (sha256 "
                        f"{str(there.get('tokenizer_sha256'))[:16]}..., this --tokenizer is "
                        f"{plan['tokenizer_sha256'][:16]}...); pass --tokenizer {out / 'tokenizer.json'} (the one the "
                        f"other shards used), or {other}")
    for key in PLAN_KEYS[2:]:
        if there.get(key) != plan[key]:
            raise DataError(f"--out {out} was started with {key} {there.get(key)!r}, this task has {plan[key]!r}; "
                            f"give every task the same input and options, or {other}")
    return there


def _create_once(path: Path, data: bytes) -> bool:
    """Writes `path` atomically unless it exists (tasks race to write it); whether we did."""
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    _write_synced(tmp, data)
    try:
        os.link(tmp, path)  # fails if it exists: the first task's copy stays
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _part_meta(part: Path, fix: str) -> dict:
    """A part dir's meta.json after checking its files; DataError if it is not complete."""
    meta = _read_json(part / "meta.json", PART_FORMAT, fix) if (part / "meta.json").is_file() else None
    if meta is None:
        raise DataError(f"{part}: no meta.json (incomplete); {fix}")
    for name in SPLITS:
        info = meta["splits"][name]
        path, want = part / info["file"], info["tokens"] * np.dtype(meta["dtype"]).itemsize
        if not path.is_file() or path.stat().st_size != want:
            raise DataError(f"{path}: missing or not {want} bytes as meta.json says (truncated?); {fix}")
    return meta


def prepare_shard(make_docs: Callable[[], Iterator[str]], tokenizer_path: str | Path, out_dir: str | Path,
                  shard: Shard, *, val_fraction: float = 0.01, workers: int = 1, source: str = "",
                  limits: dict | None = None, batch_docs: int = 1000, log: Callable[[str], None] = print) -> dict:
    """Prepares shard `shard` of the documents make_docs() yields (called twice: once to count
    them, once to read the slice) into OUT/parts/<i>-of-<N>/; returns its meta.json's dict, with
    "skipped": True when the part was complete already."""
    from .prepare import usable_cores

    out = Path(out_dir)
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    tok = load_tokenizer(tokenizer_path)
    eot = eot_id(tok, f"--tokenizer {tokenizer_path}")
    vocab = id_space(tok)
    dtype = token_dtype(vocab)
    plan = {"format": PLAN_FORMAT, "num_shards": shard.count, "tokenizer_sha256": tokenizer_sha256(tok),
            "val_fraction": float(val_fraction), "source": source, "limits": limits or {}, "dtype": dtype.name,
            "vocab_size": vocab, "eot_id": eot}
    check_parts_out(out, plan)
    part = out / PARTS_DIR / shard.name
    redo = f"it is redone by running --shard {shard} again"
    if (part / "meta.json").is_file():
        try:
            meta = _part_meta(part, redo)
        except DataError as e:
            log(f"shard {shard}: {e}")
        else:
            log(f"shard {shard}: {part} is complete ({meta['documents']:,} documents); skipped")
            return {**meta, "skipped": True}

    total = sum(1 for _ in make_docs())  # the slice bounds need the whole input's count
    if total < shard.count:
        raise DataError(f"the input holds {total:,} document(s), fewer than --shard's {shard.count} slices; use "
                        f"at most {total} shards" if total else
                        "the input holds no documents (every file empty or whitespace); check --input / --dataset "
                        "and --text-field")
    out.mkdir(parents=True, exist_ok=True)
    _create_once(out / PLAN_FILE, json.dumps({**plan, "documents": total, "created": now()}, indent=1).encode())
    there = check_parts_out(out, plan)  # the plan of whichever task wrote it first
    if there.get("documents") != total:
        raise DataError(f"the input holds {total:,} documents, but {out} was started on {there.get('documents')!r} "
                        f"(the input changed?); give every task the same input, or pick another --out")
    if not (out / "tokenizer.json").exists():
        _create_once(out / "tokenizer.json", Path(tokenizer_path).read_bytes())
    (out / PARTS_DIR).mkdir(exist_ok=True)
    _remove_leftovers(out / PARTS_DIR, shard, log)

    first, end = shard.documents(total)
    workers = usable_cores() if workers is None else workers
    tmp = out / PARTS_DIR / f"{shard.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        (tmp / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        docs = itertools.islice(make_docs(), first, end)
        last_shard = shard.index == shard.count - 1
        move_last = last_shard and val_fraction > 0 and total >= 2 and not _any_val(total, val_fraction)
        counts = _write_part(docs, tok, tokenizer_path, plan["tokenizer_sha256"], eot, dtype, tmp, val_fraction,
                             workers, batch_docs, first, move_last)
        meta = {"format": PART_FORMAT, **{k: plan[k] for k in PLAN_KEYS}, "shard": shard.index,
                "dtype": dtype.name, "vocab_size": vocab, "eot_id": eot, "first_document": first,
                "documents": end - first, "total_documents": total,
                "splits": {name: {"file": f"{name}.bin", **counts[name]} for name in SPLITS}, "created": now()}
        (tmp / OWNER_FILE).unlink()
        _write_synced(tmp / "meta.json", json.dumps(meta, indent=1).encode() + b"\n")  # last: marks it complete
        os.rename(tmp, part)
        _fsync_dir(part.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**meta, "skipped": False}


def _any_val(total: int, val_fraction: float, chunk: int = 1 << 20) -> bool:
    """Whether any of documents 0..total-1 hashes into validation (is_val_document's rule)."""
    for lo in range(0, total, chunk):
        i = np.arange(lo + 1, min(lo + chunk, total) + 1, dtype=np.uint64)
        if np.any((i * np.uint64(0x9E3779B1) % np.uint64(2 ** 32)) / 2 ** 32 < val_fraction):
            return True
    return False


def _write_part(docs, tok, tok_path, sha, eot, dtype, tmp, val_fraction, workers, batch_docs, first, move_last):
    counts = {name: {"tokens": 0, "documents": 0} for name in SPLITS}
    last_train = last = None
    with open(tmp / "train.bin", "wb", buffering=1 << 20) as f_train, \
            open(tmp / "val.bin", "wb", buffering=1 << 20) as f_val:
        files = {"train": f_train, "val": f_val}
        for arrays, per_split, last_doc in _encoded_batches(docs, tok, tok_path, sha, eot, dtype, val_fraction,
                                                            workers, batch_docs, start=first):
            for name, arr, n in zip(SPLITS, arrays, per_split):
                files[name].write(memoryview(arr))
                counts[name]["tokens"] += int(arr.size)
                counts[name]["documents"] += n
            if arrays[0].size:
                last_train = arrays[0]
            last = last_doc
        if move_last:  # no document of the whole input hashed into validation: the last one goes there
            n = last[1]
            f_val.write(memoryview(last_train[-n:]))
            f_train.flush()
            f_train.truncate(f_train.tell() - n * dtype.itemsize)
            counts["train"] = {"tokens": counts["train"]["tokens"] - n, "documents": counts["train"]["documents"] - 1}
            counts["val"] = {"tokens": n, "documents": 1}
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    return counts


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_leftovers(parts: Path, shard: Shard, log) -> None:
    """Removes what an interrupted run of this shard left: its `.tmp-PID` dirs, and a part dir
    under the final name that is not complete (only hand-made damage leaves one). A `.tmp` dir of
    a live process on this host means the shard is running now: refused. One task per shard at a
    time is assumed across hosts (a Slurm array runs each index once)."""
    host = socket.gethostname()
    for d in sorted(parts.glob(f"{shard.name}.tmp-*")):
        try:
            owner_host, pid = (d / OWNER_FILE).read_text().split()
            live = owner_host == host and int(pid) != os.getpid() and pid_alive(int(pid))
        except (OSError, ValueError):
            live = False  # no owner file: the run was past writing its data, or the dir is damaged
        if live:
            raise DataError(f"shard {shard} is being prepared right now by process {pid} ({d}); wait for it, "
                            f"or stop it and run this again")
        log(f"shard {shard}: removing {d.name}, left by an interrupted run")
        shutil.rmtree(d)
    part = parts / shard.name
    if part.exists():
        log(f"shard {shard}: removing {part.name}, incomplete")
        shutil.rmtree(part)


def parts_status(out: Path) -> tuple[dict, list[int]]:
    """(the plan, the shard indices whose part is missing or incomplete)."""
    plan = _read_json(out / PLAN_FILE, PLAN_FORMAT, f"remove {out} and prepare it again")
    todo = []
    for i in range(plan["num_shards"]):
        try:
            _part_meta(out / PARTS_DIR / part_name(i, plan["num_shards"]), "")
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
        raise DataError(f"{d}: tokenizer.json is missing; run any shard again (--shard i/{n}) to restore it")
    parts = [d / PARTS_DIR / part_name(i, n) for i in range(n)]
    metas = [_part_meta(p, "") for p in parts]
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

