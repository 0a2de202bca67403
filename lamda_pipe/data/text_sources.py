"""Raw text in, documents out: local .txt / .jsonl / .parquet files or a Hugging Face dataset.

`iter_documents` checks its whole input up front (files exist, extensions are known, the text
field exists in the first record of every file or in the dataset's columns) and raises one
`DataError` naming the problem and the fix; only then does it return the (lazy) iterator, so a
caller learns about bad input before any heavy work. Documents are streamed: nothing holds a
whole file, and parquet is read in record batches.

Document rules (the same for every source): empty or whitespace-only documents are skipped.
.txt: documents are separated by blank lines ("\\n\\n"), each stripped of edge whitespace; this
is the rule the bundled corpus (lamda_pipe/data/corpus) was written for. .jsonl / .json: one JSON
object per line, the document is obj[text_field]. .parquet: the text_field column.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import DataError

TXT, JSONL, PARQUET = "txt", "jsonl", "parquet"
# suffix(es) -> kind; gzip is read transparently for the line-based formats
EXTENSIONS = {".txt": TXT, ".jsonl": JSONL, ".json": JSONL, ".parquet": PARQUET,
              ".txt.gz": TXT, ".jsonl.gz": JSONL, ".json.gz": JSONL}
READ_CHUNK = 1 << 20  # characters of a .txt file read at a time
PARQUET_BATCH_ROWS = 1024


def supported_extensions() -> str:
    return ", ".join(EXTENSIONS)


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):  # ".jsonl.gz" before ".gz"-less forms
        if name.endswith(ext):
            return EXTENSIONS[ext]
    return None


def resolve_inputs(inputs: Iterable[str | Path]) -> list[tuple[Path, str]]:
    """--input values -> [(file, kind)]. A directory stands for its supported files, sorted."""
    out = []
    for value in inputs:
        p = Path(value)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and _kind(f))
            if not files:
                raise DataError(f"--input {value}: the directory holds no {supported_extensions()} files; "
                                f"pass the files themselves or another directory")
            out.extend((f, _kind(f)) for f in files)
            continue
        if not p.exists():
            raise DataError(f"--input {value}: no such file; check the path (shell globs that match "
                            f"nothing are passed through literally)")
        kind = _kind(p)
        if kind is None:
            hint = " (decompress it first, e.g. `zstd -d`)" if p.suffix.lower() in (".zst", ".xz", ".bz2") else ""
            raise DataError(f"--input {value}: unsupported file type{hint}; supported: {supported_extensions()} "
                            f"(.json/.jsonl: one JSON object per line)")
        out.append((p, kind))
    return out


def _open_text(path: Path):
    # universal newlines, as Path.read_text: "\r\n" files split like "\n" files
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _first_json_object(path: Path) -> dict | None:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                return _parse_json_line(path, lineno, line)
    return None  # an empty file holds no documents; not an error


def _parse_json_line(path: Path, lineno: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); .json/.jsonl inputs must hold one "
                        f"JSON object per line (JSON Lines)") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: a JSON {type(obj).__name__}, not an object; .json/.jsonl inputs "
                        f"must hold one JSON object per line (JSON Lines)")
    return obj


def _missing_field(where: str, field: str, existing: Iterable[str]) -> DataError:
    names = ", ".join(map(str, existing)) or "none"
    return DataError(f"{where} has no field {field!r}; its fields are: {names}; pass --text-field NAME")


def _check_file(path: Path, kind: str, text_field: str) -> None:
    if kind == JSONL:
        with _utf8_errors(path):
            first = _first_json_object(path)
        if first is not None and text_field not in first:
            raise _missing_field(f"{path} (first record)", text_field, first)
    elif kind == PARQUET:
        import pyarrow.parquet as pq
        import pyarrow.types as pat

        try:
            schema = pq.ParquetFile(path).schema_arrow
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet bytes
            raise DataError(f"{path}: cannot read it as parquet ({e}); check the file") from None
        if text_field not in schema.names:
            raise _missing_field(str(path), text_field, schema.names)
        t = schema.field(text_field).type
        is_view = getattr(pat, "is_string_view", lambda _: False)  # pyarrow >= 16
        if not (pat.is_string(t) or pat.is_large_string(t) or is_view(t)):
            raise DataError(f"{path}: column {text_field!r} holds {t}, not text; pass --text-field NAME of a "
                            f"string column")


def _txt_documents(path: Path) -> Iterator[str]:
    # Streaming split on "\n\n": each piece before the last separator found so far is final;
    # the rest is carried into the next chunk, which gives exactly text.split("\n\n").
    carry = ""
    with _open_text(path) as f:
        while chunk := f.read(READ_CHUNK):
            parts = (carry + chunk).split("\n\n")
            carry = parts.pop()
            yield from parts
    yield carry


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = _parse_json_line(path, lineno, line)
            if text_field not in obj:
                raise _missing_field(f"{path}:{lineno}", text_field, obj)
            yield _as_text(obj[text_field], f"{path}:{lineno}", text_field)


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as pf:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
            yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _as_text(value, where: str, text_field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} holds a {type(value).__name__}, not text; "
                        f"pass --text-field NAME of a text field")
    return value


def _load_hf_dataset(name: str, config: str | None, split: str, streaming: bool):
    """datasets.load_dataset, with every way it fails turned into one DataError line."""
    import datasets

    where = f"--dataset {name}" + (f" --config {config}" if config else "") + f" --split {split}"
    local = Path(name).is_dir()
    if not local and name.startswith(("/", "./", "../", "~")):  # a path, not a Hub id: don't ask the Hub
        raise DataError(f"--dataset {name}: no such directory; pass a local dataset directory or a Hub id "
                        f"such as EleutherAI/pile (for data files use --input)")
    try:
        if local and any((Path(name) / f).is_file() for f in ("state.json", "dataset_dict.json")):
            # written by Dataset.save_to_disk, which load_dataset does not read
            ds = datasets.load_from_disk(name)
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except ConnectionError as e:  # includes huggingface_hub's OfflineModeIsEnabled
        raise DataError(f"could not reach dataset {name} on the Hugging Face Hub (offline or no network: "
                        f"{str(e).strip()[:120]}); download it and pass the files with --input, or unset "
                        f"HF_HUB_OFFLINE / check the network") from None
    except KeyError as e:
        raise DataError(f"{where}: no split {e}; pick one of the dataset's splits with --split") from None
    except Exception as e:
        kind = type(e).__name__
        if kind in ("DatasetNotFoundError", "RepositoryNotFoundError", "GatedRepoError", "FileNotFoundError"):
            raise DataError(f"{where}: not found ({str(e).strip()[:200]}); check the name (a local directory, "
                            f"or a Hub id such as EleutherAI/pile; gated datasets need `hf auth login`)") from None
        # unknown split / config names and the like: datasets' own message says what exists
        raise DataError(f"{where}: {kind}: {str(e).strip()[:300]}; fix --config / --split or pass the files "
                        f"with --input") from None


def _hf_columns(ds) -> list[str] | None:
    names = getattr(ds, "column_names", None)
    if names is None:  # a streaming dataset whose features are unknown until the first row
        first = next(iter(ds), None)
        names = list(first) if first is not None else None
    return names


def _hf_documents(ds, text_field: str, where: str) -> Iterator[str]:
    if hasattr(ds, "select_columns"):  # read only the text column (streaming and map-style alike)
        ds = ds.select_columns([text_field])
    for row in ds:
        yield _as_text(row[text_field], where, text_field)


def describe_source(inputs: list[str] | None = None, dataset: str | None = None, config: str | None = None,
                    split: str = "train", text_field: str = "text") -> str:
    """One line for meta.json's "source": what the documents were read from."""
    if dataset is not None:
        return f"dataset {dataset}" + (f" config {config}" if config else "") + f" split {split} field {text_field}"
    names = [str(p) for p in inputs or []]
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} inputs)" if len(names) > 8 else "")
    return f"files {shown}" + (f" field {text_field}" if not all(n.endswith(".txt") for n in names) else "")


def check_source(inputs: list[str] | None = None, dataset: str | None = None, config: str | None = None,
                 split: str = "train", text_field: str = "text", streaming: bool = False,
                 max_docs: int | None = None, max_bytes: int | None = None) -> None:
    """Raises DataError for bad input; reads only file headers / the first record (a non-streaming
    Hugging Face dataset is downloaded: that is what checking it takes)."""
    iter_documents(inputs, dataset, config, split, text_field, streaming, max_docs, max_bytes)


def iter_documents(inputs: list[str] | None = None, dataset: str | None = None, config: str | None = None,
                   split: str = "train", text_field: str = "text", streaming: bool = False,
                   max_docs: int | None = None, max_bytes: int | None = None) -> Iterator[str]:
    """Documents from local files (in the given order) or a Hugging Face dataset.

    Checks everything first (raising DataError), then returns a lazy iterator. max_docs stops
    after that many documents; max_bytes stops once the documents returned hold at least that
    many UTF-8 bytes (the last one may cross the limit): a sample for tokenizer training.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if (not inputs) == (dataset is None):
        raise DataError("give either --input FILE [FILE ...] or --dataset NAME (exactly one of them)")
    for name, limit in (("--max-docs", max_docs), ("--max-bytes", max_bytes)):
        if limit is not None and limit < 1:
            raise DataError(f"{name} must be a positive number, got {limit}")
    if not text_field:
        raise DataError("--text-field is empty; name the field that holds the text (default: text)")
    if dataset is not None:
        ds = _load_hf_dataset(dataset, config, split, streaming)
        columns = _hf_columns(ds)
        if columns is not None and text_field not in columns:
            raise _missing_field(f"--dataset {dataset} (split {split})", text_field, columns)
        docs = _hf_documents(ds, text_field, f"--dataset {dataset}")
    else:
        if config is not None or streaming:
            raise DataError("--config and --streaming apply to --dataset only; drop them for --input files")
        files = resolve_inputs(inputs)
        for path, kind in files:
            _check_file(path, kind, text_field)
        docs = _file_documents(files, text_field)
    return _limited(docs, max_docs, max_bytes)


def _file_documents(files: list[tuple[Path, str]], text_field: str) -> Iterator[str]:
    for path, kind in files:
        with _utf8_errors(path):
            if kind == TXT:
                yield from (d.strip() for d in _txt_documents(path))
            elif kind == JSONL:
                yield from _jsonl_documents(path, text_field)
            else:
                yield from _parquet_documents(path, text_field)


@contextlib.contextmanager
def _utf8_errors(path: Path):
    try:
        yield
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); convert it to UTF-8 "
                        f"(e.g. iconv -t utf-8)") from None


def _limited(docs: Iterator[str], max_docs: int | None, max_bytes: int | None) -> Iterator[str]:
    docs = (d for d in docs if d and not d.isspace())
    if max_docs is not None:
        docs = itertools.islice(docs, max_docs)
    if max_bytes is None:
        yield from docs
        return
    total = 0
    for d in docs:
        yield d
        total += len(d.encode("utf-8"))
        if total >= max_bytes:
            return
