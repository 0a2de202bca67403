"""Writing one part of a dir of parts (layout and reading: parts.py): `lamda-prepare-data
--shard i/N`, one task per slice of the input, each resumable on its own.

The slice bounds depend on the input's document count, so the documents are counted once, per
input piece (a file; a range of a Hugging Face dataset's rows; the whole input for a streamed
dataset or with --max-docs / --max-bytes), and recorded in the plan, OUT/parts.json: by `--plan-shards N` before the array
(a plan job), or else by the first task that finds no plan. A task with the plan reads only the
pieces its slice overlaps, from the first of them up to the end of its slice. A document goes to
validation by its index in the whole input (prepare.py's rule); only the last shard can apply
the at-least-one-validation-document rule, so it does.

A part is built in OUT/parts/<name>.tmp-PID with meta.json written last, then renamed into place:
a killed task leaves only its work dir, which the shard's next run removes. A complete part is
skipped on a rerun. The plan and tokenizer.json are each created atomically (a hard link that
fails if another task won); every task compares its own plan (N, tokenizer, options, the input's
pieces and their sizes) with the one there before any work.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..distributed import pid_alive
from ..errors import DataError
from .parts import PARTS_DIR, PLAN_FILE, PLAN_FORMAT, PLAN_KEYS, PART_FORMAT, Shard, part_meta
from .prepare import (_GOLDEN as VAL_HASH, OWNER_FILE, SPLITS, _write_synced, now, read_json, token_dtype, usable_cores,
                      write_token_files)
from .tokenizer import eot_id, load_tokenizer, tokenizer_sha256, vocab_size as id_space


@dataclass(frozen=True)
class InputPiece:
    """A piece of the input whose documents are counted on their own: one file, or the whole input."""

    name: str
    size: int | None  # a file's bytes: a changed file is noticed without reading it
    documents: Callable[[], Iterator[str]]


def input_pieces(source: dict) -> list[InputPiece]:
    """lamda_pipe.tools.source_kwargs(args) -> the pieces, which yield in order what iter_documents
    yields: one per file; for a Hugging Face dataset that is not streamed, up to ROW_PIECES ranges
    of rows; the whole input where nothing smaller can be counted on its own (a streamed dataset;
    --max-docs / --max-bytes, which count across files)."""
    from .text_sources import iter_documents, resolve_inputs

    if source.get("max_docs") is not None or source.get("max_bytes") is not None or \
            (source.get("dataset") is not None and source.get("streaming")):
        return [InputPiece("the whole input", None, functools.partial(iter_documents, **source))]
    if source.get("dataset") is not None:
        return _row_pieces(source)
    return [InputPiece(str(path), path.stat().st_size,
                       functools.partial(iter_documents, inputs=[str(path)], text_field=source["text_field"]))
            for path, _ in resolve_inputs(source["inputs"])]


ROW_PIECES = 1024  # a dataset's rows are counted in at most this many ranges (the plan lists each)


def _row_pieces(source: dict) -> list[InputPiece]:
    from .text_sources import _load_hf_dataset

    ds = _load_hf_dataset(source["dataset"], source.get("config"), source.get("split", "train"), False)
    rows = len(ds)
    step = max(1, -(-rows // ROW_PIECES))
    return [InputPiece(f"rows {a}-{min(a + step, rows) - 1}", min(a + step, rows) - a,
                       functools.partial(_row_documents, ds, a, min(a + step, rows), source["text_field"],
                                         f"--dataset {source['dataset']}"))
            for a in range(0, rows, step)]


def _row_documents(ds, first: int, end: int, text_field: str, where: str) -> Iterator[str]:
    # iter_documents' rules (text checked, empty documents skipped) on rows [first, end)
    from .text_sources import _hf_documents, _limited

    return _limited(_hf_documents(ds.select(range(first, end)), text_field, where), None, None)


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
    there = read_json(out / PLAN_FILE, PLAN_FORMAT, f"remove {out} or {other}")
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
    theirs, ours = [tuple(p) for p in there.get("pieces", [])], [tuple(p) for p in plan["pieces"]]
    if theirs != ours:
        diff = next((f"{a[0]} (size {a[1]} then, {b[1]} now)" if a[0] == b[0] else f"{a[0]}, now {b[0]}"
                     for a, b in zip(theirs, ours) if a != b), f"{len(theirs)} input pieces then, {len(ours)} now")
        raise DataError(f"the input differs from the one {out} was started on: {diff}; give every task the same "
                        f"input (unchanged while the dir is prepared), or pick another --out")
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


def _plan(pieces: list[InputPiece], tokenizer_path: str | Path, num_shards: int, val_fraction: float, source: str,
          limits: dict | None):
    """(the tokenizer, this task's plan without the counts)."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    tok = load_tokenizer(tokenizer_path)
    eot = eot_id(tok, f"--tokenizer {tokenizer_path}")
    vocab = id_space(tok)
    return tok, {"format": PLAN_FORMAT, "num_shards": num_shards, "tokenizer_sha256": tokenizer_sha256(tok),
                 "val_fraction": float(val_fraction), "source": source, "limits": limits or {},
                 "dtype": token_dtype(vocab).name, "vocab_size": vocab, "eot_id": eot,
                 "pieces": [[p.name, p.size] for p in pieces]}


def _ensure_plan(out: Path, plan: dict, pieces: list[InputPiece], tokenizer_path, there: dict | None) -> dict:
    """The plan with its document counts: the one there, or counted now and written."""
    if there is None:
        counts = [sum(1 for _ in p.documents()) for p in pieces]  # reads (not tokenizes) every piece
        total = sum(counts)
        if total < plan["num_shards"]:
            raise DataError(f"the input holds {total:,} document(s), fewer than {plan['num_shards']} shards; use at "
                            f"most {total} shards" if total else
                            "the input holds no documents (every file empty or whitespace); check --input / "
                            "--dataset and --text-field")
        out.mkdir(parents=True, exist_ok=True)
        _create_once(out / PLAN_FILE, json.dumps({**plan, "piece_documents": counts, "documents": total,
                                                  "created": now()}, indent=1).encode())
        there = check_parts_out(out, plan)  # the plan of whichever task wrote it first
        if there.get("piece_documents") != counts:
            raise DataError(f"the input holds {total:,} documents, but {out} was started on {there.get('documents')!r} "
                            f"(the input changed?); give every task the same input, or pick another --out")
    if not (out / "tokenizer.json").exists():
        _create_once(out / "tokenizer.json", Path(tokenizer_path).read_bytes())
    return there


def plan_shards(pieces: list[InputPiece], tokenizer_path: str | Path, out_dir: str | Path, num_shards: int, *,
                val_fraction: float = 0.01, source: str = "", limits: dict | None = None) -> dict:
    """Counts the documents once and writes the plan (OUT/parts.json) for num_shards tasks, so that
    none of them has to read the whole input; returns it. A plan already there is checked, kept."""
    out = Path(out_dir)
    _, plan = _plan(pieces, tokenizer_path, num_shards, val_fraction, source, limits)
    return _ensure_plan(out, plan, pieces, tokenizer_path, check_parts_out(out, plan))


def _slice(pieces: list[InputPiece], counts: list[int], first: int, end: int) -> Iterator[str]:
    """Documents [first, end) of the pieces, opening only those the range overlaps."""
    start = 0
    for piece, n in zip(pieces, counts):
        lo, hi = max(first - start, 0), min(end - start, n)
        if lo < hi:
            yield from itertools.islice(piece.documents(), lo, hi)
        start += n


def prepare_shard(pieces: list[InputPiece], tokenizer_path: str | Path, out_dir: str | Path, shard: Shard, *,
                  val_fraction: float = 0.01, workers: int | None = 1, source: str = "", limits: dict | None = None,
                  batch_docs: int = 1000, log: Callable[[str], None] = print) -> dict:
    """Prepares shard `shard` of the input's documents into OUT/parts/<i>-of-<N>/; returns its
    meta.json's dict, with "skipped": True when the part was complete already."""
    out = Path(out_dir)
    tok, plan = _plan(pieces, tokenizer_path, shard.count, val_fraction, source, limits)
    there = check_parts_out(out, plan)
    part = out / PARTS_DIR / shard.name
    if (part / "meta.json").is_file():
        try:
            meta = part_meta(part, f"it is redone by running --shard {shard} again")
        except DataError as e:
            log(f"shard {shard}: {e}")
        else:
            log(f"shard {shard}: {part} is complete ({meta['documents']:,} documents); skipped")
            if not (out / "tokenizer.json").exists():  # the plan's hash is this tokenizer's (checked above)
                _create_once(out / "tokenizer.json", Path(tokenizer_path).read_bytes())
            return {**meta, "skipped": True}

    refuse_if_running(out / PARTS_DIR, shard)
    there = _ensure_plan(out, plan, pieces, tokenizer_path, there)
    total, dtype = there["documents"], np.dtype(plan["dtype"])
    (out / PARTS_DIR).mkdir(exist_ok=True)
    _remove_leftovers(out / PARTS_DIR, shard, log)

    first, end = shard.documents(total)
    workers = usable_cores() if workers is None else workers
    tmp = out / PARTS_DIR / f"{shard.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        (tmp / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        docs = _slice(pieces, there["piece_documents"], first, end)
        last_shard = shard.index == shard.count - 1
        move_last = last_shard and val_fraction > 0 and total >= 2 and not _any_val(total, val_fraction)
        counts = write_token_files(docs, tok, tokenizer_path, plan["tokenizer_sha256"], plan["eot_id"], dtype, tmp,
                                   val_fraction, workers, batch_docs, start=first, move_last=move_last)
        meta = {"format": PART_FORMAT, **{k: plan[k] for k in PLAN_KEYS}, "shard": shard.index,
                "dtype": dtype.name, "vocab_size": plan["vocab_size"], "eot_id": plan["eot_id"],
                "first_document": first, "documents": end - first, "total_documents": total,
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
        if np.any((i * np.uint64(VAL_HASH) % np.uint64(2 ** 32)) / 2 ** 32 < val_fraction):
            return True
    return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def refuse_if_running(parts: Path, shard: Shard) -> None:
    """DataError if a live process on this host is preparing this shard (its work dir's owner)."""
    for d in sorted(parts.glob(f"{shard.name}.tmp-*")):
        try:
            owner_host, pid = (d / OWNER_FILE).read_text().split()
            live = owner_host == socket.gethostname() and int(pid) != os.getpid() and pid_alive(int(pid))
        except (OSError, ValueError):
            live = False  # no owner file: the run was past writing its data, or the dir is damaged
        if live:
            raise DataError(f"shard {shard} is being prepared right now by process {pid} ({d}); wait for it, "
                            f"or stop it and run this again")


def _remove_leftovers(parts: Path, shard: Shard, log) -> None:
    """Removes what an interrupted run of this shard left: its `.tmp-PID` dirs, and a part dir
    under the final name that is not complete (only hand-made damage leaves one). A `.tmp` dir of
    a live process on this host means the shard is running now: refused. One task per shard at a
    time is assumed across hosts (a Slurm array runs each index once)."""
    refuse_if_running(parts, shard)
    for d in sorted(parts.glob(f"{shard.name}.tmp-*")):
        log(f"shard {shard}: removing {d.name}, left by an interrupted run")
        shutil.rmtree(d)
    part = parts / shard.name
    if part.exists():
        log(f"shard {shard}: removing {part.name}, incomplete")
        shutil.rmtree(part)
