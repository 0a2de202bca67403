"""Documents -> memory-mappable token files: the prepared data dir the trainer reads.

A prepared dir holds train.bin and val.bin (raw little-endian token ids, uint16 when the
vocabulary fits, else uint32; every document followed by the end-of-text id), a copy of the
tokenizer as tokenizer.json, and meta.json (schema: `prepare_data`). It is built in a sibling
OUT.tmp-<pid> and renamed into place with meta.json already written, so a dir named OUT that
has a meta.json is complete; an interrupted run leaves at most an OUT.tmp-<pid>. A dir can also
be written in parts, one slice of the input per task (`--shard i/N`: parts.py, prepare_parts.py).

Dialog dirs (meta.json "kind": "dialog", written by prepare_dialog.py) add a loss mask and an
example index per split; a dir without "kind" holds plain text.

Document i (0-based, in input order) goes to validation when `is_val_document(i, f)`: a
multiplicative (Fibonacci) hash of i+1 below f, which spreads validation documents evenly
through the input. If that picks none, f > 0 and there are >= 2 documents, the last document
goes to validation instead.
"""

from __future__ import annotations

import collections
import datetime
import functools
import itertools
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..distributed import pid_alive
from ..errors import DataError
from .tokenizer import eot_id, load_tokenizer, tokenizer_sha256, vocab_size as id_space

FORMAT = "lamda-pipe-tokens/1"
SPLITS = ("train", "val")
META_KEYS = ("format", "dtype", "vocab_size", "tokenizer_sha256", "eot_id", "source", "val_fraction", "splits",
             "created")
_GOLDEN = 0x9E3779B1  # 2**32 / golden ratio
BATCH_CHARS = 1 << 20  # a batch also ends at this many characters: even load, bounded memory
OWNER_FILE = ".owner"  # "host pid" of the run building an OUT.tmp-<pid>, for stale-dir cleanup


def is_val_document(i: int, val_fraction: float) -> bool:
    return ((i + 1) * _GOLDEN % 2 ** 32) / 2 ** 32 < val_fraction


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2 ** 16 else np.dtype("<u4")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_output(out_dir: str | Path, force: bool) -> None:
    """Refuses (DataError) an output that exists, unless force and it is a data dir (or empty)."""
    out = Path(out_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory; pick another --out")
    if not force:
        raise DataError(f"--out {out} already exists; pass --force to replace it (the old data stays until the "
                        f"new data is complete) or pick another --out")
    if not (out / "meta.json").is_file() and any(out.iterdir()):
        raise DataError(f"--out {out} is a non-empty directory without meta.json, not prepared data; refusing to "
                        f"replace it even with --force; pick another --out")


def prepare_data(docs: Iterable[str], tokenizer_path: str | Path, out_dir: str | Path, *,
                 val_fraction: float = 0.01, workers: int | None = None, force: bool = False, source: str = "",
                 batch_docs: int = 1000, progress: bool = True) -> dict:
    """Tokenizes `docs` (streamed, in parallel, output in input order) into out_dir; returns meta.json's dict:

    {"format": "lamda-pipe-tokens/1", "dtype": "uint16" | "uint32", "vocab_size": int,
     "tokenizer_sha256": str, "eot_id": int, "source": str, "val_fraction": float,
     "splits": {"train": {"file": "train.bin", "tokens": int, "documents": int},
                "val": {"file": "val.bin", "tokens": int, "documents": int}},
     "created": ISO-8601 str}

    vocab_size is one more than the tokenizer's largest id. workers=1 encodes in this process;
    more start a pool of processes that each load the tokenizer once.
    """
    out = Path(out_dir)
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    workers = usable_cores() if workers is None else workers
    if workers < 1 or batch_docs < 1:
        raise DataError(f"--workers and batch size must be >= 1, got {workers} and {batch_docs}")
    tok = load_tokenizer(tokenizer_path)
    eot = eot_id(tok, f"--tokenizer {tokenizer_path}")
    check_output(out, force)
    vocab = id_space(tok)
    dtype = token_dtype(vocab)
    sha = tokenizer_sha256(tok)

    def fill(tmp: Path) -> dict:
        counts = _write_splits(docs, tok, tmp / "tokenizer.json", sha, eot, dtype, tmp, val_fraction, workers,
                               batch_docs, progress)
        return {"format": FORMAT, "dtype": dtype.name, "vocab_size": vocab, "tokenizer_sha256": sha,
                "eot_id": eot, "source": source, "val_fraction": float(val_fraction),
                "splits": {name: {"file": f"{name}.bin", **counts[name]} for name in SPLITS}, "created": now()}

    return build_data_dir(tokenizer_path, out, force, fill)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def build_data_dir(tokenizer_path: str | Path, out_dir: str | Path, force: bool, fill) -> dict:
    """The crash-safe protocol of every prepared dir (text or dialog): fill(tmp) writes the data
    files into OUT.tmp-<pid>, which already holds tokenizer.json, and returns meta.json's dict;
    meta.json is written last and the dir renamed into place. Returns the meta."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(out)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)  # our pid in its name: a dead run's (pid reuse), or ours from a crash
    tmp.mkdir()
    try:
        (tmp / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        meta = fill(tmp)
        (tmp / OWNER_FILE).unlink()
        _write_synced(tmp / "meta.json", json.dumps(meta, indent=1).encode() + b"\n")  # last: marks it complete
        _move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _write_splits(docs, tok, tok_path, sha, eot, dtype, out, val_fraction, workers, batch_docs, progress) -> dict:
    counts = write_token_files(docs, tok, tok_path, sha, eot, dtype, out, val_fraction, workers, batch_docs,
                               progress=progress)
    total_docs = counts["train"]["documents"] + counts["val"]["documents"]
    if total_docs == 0:
        raise DataError("the input holds no documents (every file empty or whitespace); check --input / --dataset "
                        "and --text-field")
    if counts["train"]["documents"] == 0:
        raise DataError(f"all {total_docs} document(s) went to validation (--val-fraction {val_fraction}); lower "
                        f"--val-fraction or add documents")
    return counts


def write_token_files(docs, tok, tok_path, sha, eot, dtype, out, val_fraction, workers, batch_docs, *,
                      start: int = 0, move_last: bool | None = None, progress: bool = False) -> dict:
    """train.bin and val.bin of `out` from the documents (the first has index `start` in the
    whole input, which decides its split); {split: {"tokens", "documents"}}. move_last: whether
    the last document goes to validation because none hashed there; None decides it from these
    documents alone (a whole input; a shard is told, parts.py)."""
    from tqdm import tqdm

    counts = {name: {"tokens": 0, "documents": 0} for name in SPLITS}
    last = None  # (split, tokens) of the latest document, for the at-least-one-val rule
    last_train = None  # the latest non-empty train array: its tail is the latest train document
    t0 = time.perf_counter()
    bar = tqdm(unit=" docs", disable=not progress, file=sys.stderr, dynamic_ncols=True, desc="tokenizing")
    with open(out / "train.bin", "wb", buffering=1 << 20) as f_train, \
            open(out / "val.bin", "wb", buffering=1 << 20) as f_val, bar:
        files = {"train": f_train, "val": f_val}
        for arrays, docs_per_split, last_doc in _encoded_batches(docs, tok, tok_path, sha, eot, dtype, val_fraction,
                                                                 workers, batch_docs, start=start):
            for name, arr, n in zip(SPLITS, arrays, docs_per_split):
                files[name].write(memoryview(arr))
                counts[name]["tokens"] += int(arr.size)
                counts[name]["documents"] += n
            if arrays[0].size:
                last_train = arrays[0]
            last = last_doc
            total_tokens = counts["train"]["tokens"] + counts["val"]["tokens"]
            bar.update(sum(docs_per_split))
            bar.set_postfix_str(f"{total_tokens:,} tokens, "
                                f"{total_tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s", refresh=False)
        if move_last is None:
            move_last = counts["val"]["documents"] == 0 and val_fraction > 0 and counts["train"]["documents"] >= 2
        if move_last:  # nothing hashed into validation: move the last document there (it is the tail of train.bin)
            n = last[1]
            f_val.write(memoryview(last_train[-n:]))
            f_train.flush()
            f_train.truncate(f_train.tell() - n * dtype.itemsize)
            counts["train"]["tokens"] -= n
            counts["train"]["documents"] -= 1
            counts["val"] = {"tokens": n, "documents": 1}
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    return counts


def _batches(docs: Iterable[str], batch_docs: int, start: int = 0) -> Iterator[tuple[int, list[str]]]:
    """(index of the first document, documents), at most batch_docs documents / ~BATCH_CHARS each;
    the first document has index `start` (a shard's place in the whole input, parts.py)."""
    first, batch, chars = start, [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= batch_docs or chars >= BATCH_CHARS:
            yield first, batch
            first, batch, chars = first + len(batch), [], 0
    if batch:
        yield first, batch


def _encoded_batches(docs, tok, tok_path, sha, eot, dtype, val_fraction, workers, batch_docs, start=0):
    tasks = ((first, batch, eot, dtype.str, val_fraction) for first, batch in _batches(docs, batch_docs, start))
    if workers == 1:
        yield from (_encode(tok, *task) for task in tasks)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: forking a parent that already runs threads (tokenizers' pool, torch,
    # a training job's helpers) can deadlock the children or the pool's own handler threads.
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker)
    try:
        # A bounded window of submitted batches: reading the whole input ahead of the workers
        # would hold it all in memory; results are still taken in input order.
        pending = collections.deque()
        for task in tasks:
            pending.append(pool.submit(_pool_task, (str(tok_path), sha), task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _encode(tok, first: int, docs: list[str], eot: int, dtype: str, val_fraction: float):
    """A batch -> ((train ids, val ids), (train docs, val docs), (split of the last doc, its tokens))."""
    split_ids = ([], [])
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # same ids, no offsets (tokenizers >= 0.20)
    for i, enc in enumerate(encode(docs), first):
        ids = enc.ids
        ids.append(eot)
        split_ids[is_val_document(i, val_fraction)].append(ids)
    arrays = tuple(np.fromiter(itertools.chain.from_iterable(s), dtype=dtype, count=sum(map(len, s)))
                   for s in split_ids)
    last_val = is_val_document(first + len(docs) - 1, val_fraction)
    return arrays, tuple(map(len, split_ids)), (SPLITS[last_val], len(split_ids[last_val][-1]))


@functools.lru_cache(maxsize=1)
def _worker_tokenizer(path: str, sha: str):
    # Per worker process: loaded by its first task, reused by the rest (sha in the key: the
    # same tmp path can hold another tokenizer in a later run).
    return load_tokenizer(path)


def _pool_task(tokenizer_key: tuple[str, str], task: tuple):
    return _encode(_worker_tokenizer(*tokenizer_key), *task)


def _exit_with_parent(sentinel) -> None:
    from multiprocessing.connection import wait

    wait([sentinel])  # readable once the parent has exited, however it died
    os._exit(1)


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism: one thread per worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it shuts the pool down)
    import multiprocessing as mp
    import threading

    # A worker blocked on the task queue would outlive a parent killed with SIGKILL: watch it.
    parent = mp.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), daemon=True).start()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    check_output(out, force)  # again: it may have appeared while we worked
    old = out.parent / f"{out.name}.old-{os.getpid()}"
    os.rename(out, old)  # the old data survives until the new is in place
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old)


def _remove_stale_tmp_dirs(out: Path) -> None:
    """Deletes OUT.tmp-<pid> dirs left by killed runs on this host (pid no longer running)."""
    host = socket.gethostname()
    for d in out.parent.glob(f"{out.name}.tmp-*"):
        try:
            owner_host, pid = (d / OWNER_FILE).read_text().split()
            pid = int(pid)
        except (OSError, ValueError):
            continue  # not ours to judge
        if owner_host == host and pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


def read_json(path: Path, what: str, fix: str) -> dict:
    """A JSON object whose "format" is `what` (a data dir's, a part's or a plan's); DataError
    naming the file and the fix otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(value, dict) or value.get("format") != what:
        found = value.get("format") if isinstance(value, dict) else None
        raise DataError(f"{path}: format {found!r}, expected {what!r} (written by another version?); {fix}")
    return value


def read_meta(data_dir: str | Path) -> dict:
    """meta.json of a prepared dir, after checking that the dir is complete; DataError otherwise."""
    d = Path(data_dir)
    if (d / "parts.json").is_file() and not (d / "meta.json").exists():
        from .parts import read_parts_meta  # a dir prepared by `--shard i/N` tasks

        return read_parts_meta(d)
    fix = (f"prepare it with `lamda-prepare-data --input FILE ... --tokenizer tokenizer.json --out {d}`")
    if ".tmp-" in d.name:
        raise DataError(f"{d} is the unfinished work dir of a lamda-prepare-data run (interrupted or still "
                        f"running), not prepared data; use the finished dir, or {fix}")
    if not d.is_dir():
        raise DataError(f"{d}: no such data dir; {fix}")
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{d} is not a prepared data dir: no meta.json; {fix}")
    meta = read_json(meta_path, FORMAT, f"{fix} again")
    missing = [k for k in META_KEYS if k not in meta] + [s for s in SPLITS if s not in meta.get("splits", {})]
    if missing:
        raise DataError(f"{meta_path}: missing {', '.join(missing)}; {fix} again")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{meta_path}: dtype {meta['dtype']!r}, expected uint16 or uint32; {fix} again")
    itemsize = np.dtype(meta["dtype"]).itemsize
    if not (d / "tokenizer.json").is_file():
        raise DataError(f"{d}: tokenizer.json is missing; {fix} again")
    for name in SPLITS:
        info = meta["splits"][name]
        path = d / info["file"]
        want = info["tokens"] * itemsize
        if not path.is_file():
            raise DataError(f"{path} is missing (meta.json lists it); {fix} again")
        size = path.stat().st_size
        if size != want:
            raise DataError(f"{path} holds {size} bytes, but meta.json says {info['tokens']} tokens x {itemsize} = "
                            f"{want} bytes (truncated or modified); {fix} again")
    kind = meta.get("kind", "text")  # dirs written before dialog data have no "kind": text
    if kind == "dialog":
        from .prepare_dialog import check_dialog_files

        check_dialog_files(d, meta, f"{fix} --format dialog again")
    elif kind != "text":
        raise DataError(f"{meta_path}: kind {kind!r}, expected 'text' or 'dialog' (written by another version?); "
                        f"{fix} again")
    return meta
