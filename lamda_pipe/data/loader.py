"""Reading prepared token data in training: sources, mixtures, deterministic micro-batches.

A prepared data dir (written by `lamda-prepare-data`, see lamda_pipe/data/prepare.py) holds
train.bin / val.bin (token ids, each document followed by end-of-text), tokenizer.json and
meta.json. `--data` names one dir or a weighted mixture "DIR_A:0.5,DIR_B:0.125,...". A dir
prepared in parts by `--shard i/N` tasks (data/parts.py) reads as one source, the same as the
dir one process would have written.

Sampling, in three layers, each a pure function of its index so that nothing has to be
communicated or saved except one number, the samples consumed so far:
* slot -> (source, k): the mixture. Slots come in blocks of MIX_BLOCK; each source gets a
  fixed quota of every block (its weight, rounded by largest remainder) in a seeded order,
  so realised proportions match the weights to within 1/MIX_BLOCK at every block boundary.
* (source, k) -> sample: the k-th sample of the source's endless sequence of epochs, each
  epoch a seeded order of its rows (data/order.py: a keyed bijection, computed per position,
  nothing built per epoch): non-overlapping windows of seq_len + 1 tokens of plain text, or
  a dialog dir's examples packed into rows of that length (data/packing.py).
* micro-batch m of data-parallel rank r takes slots offset + (m * dp_size + r) * mbs + j.
  Ranks never share a slot; first and last pipeline stage compute the same micro-batch; a
  resumed run passes offset = samples consumed and continues with the next unseen sample,
  whatever the stage count or micro-batch split, as long as the global batch is unchanged.

Rows become micro-batches in the run's BatchFormat (data/batches.py): plain token tensors, or
with document indices and per-token loss weights (dialog data, --document-mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import DataError
from .batches import PLAIN, BatchFormat, Row, micro_batch, text_doc_ids
from .order import CURRENT, EpochOrder
from .packing import PackedExamples
from .tokenizer import EOT, PAD, UNK  # noqa: F401  (re-exported: the special tokens)

CORPUS_DIR = Path(__file__).parent / "corpus"
MIX_BLOCK = 1024  # slots per mixture block; 1/16 weights (LaMDA's mix) are exact
CHECK_CHUNK = 1 << 26  # tokens per piece of the start-up token-id check


def bundled_corpus() -> list[Path]:
    """The demo corpus shipped with the package: six books of the King James Bible (public
    domain), one document per chapter, documents separated by blank lines."""
    return sorted(CORPUS_DIR.glob("*.txt"))


def parse_data_spec(spec: str) -> list[tuple[Path, float]]:
    """'DIR' or 'DIR_A:0.5,DIR_B:0.125' -> [(path, weight), ...], weights normalised to sum 1."""
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if not entries:
        raise DataError("--data is empty; give a prepared data dir or 'DIR_A:0.5,DIR_B:0.5'")
    out = []
    for entry in entries:
        path, sep, weight = entry.rpartition(":")
        if not sep:
            path, weight = entry, "1" if len(entries) == 1 else ""
        try:
            w = float(weight)
        except ValueError:
            w = math.nan
        if not math.isfinite(w) or w <= 0:
            raise DataError(f"--data: cannot read a positive weight in {entry!r}; write a mixture as "
                                f"'DIR_A:0.5,DIR_B:0.25' (weights > 0, normalised to sum 1)")
        out.append((Path(path), w))
    paths = [p for p, _ in out]
    if len(set(paths)) != len(paths):
        raise DataError(f"--data names a dir twice: {spec!r}; give each dir once with its total weight")
    total = sum(w for _, w in out)
    return [(p, w / total) for p, w in out]


def same_data(spec_a: str, spec_b: str) -> bool:
    """Whether two --data specs name the same dirs with the same weights ('./d' == 'd:1', any
    order, weights normalised)."""
    def identity(spec):
        try:
            return sorted((str(p.resolve()), round(w, 9)) for p, w in parse_data_spec(spec))
        except DataError:
            return [(spec, 1.0)]
    return identity(spec_a) == identity(spec_b)


def is_bundled_data(spec: str, run_dir: Path) -> bool:
    """Whether a run record's data is the bundled corpus, which a run prepares into RUN_DIR/data:
    there, in a dir whose meta.json says so, or (the run dir moved with it) a missing '.../data'."""
    path = Path(spec)
    if path == run_dir / "data":
        return True
    if (path / "parts.json").is_file():  # prepared in parts (data/parts.py): user data
        return False
    meta = path / "meta.json"
    if meta.is_file():
        import json
        try:
            return str(json.loads(meta.read_text()).get("source", "")).startswith("bundled corpus")
        except ValueError:
            return False
    return path.name == "data" and "," not in spec


@dataclass
class DataSource:
    """One prepared data dir, opened lazily (memory-mapped, nothing read up front)."""

    directory: Path
    weight: float
    meta: dict

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / "tokenizer.json"

    def tokens(self, split: str) -> np.ndarray:
        info = self.meta["splits"][split]
        if "parts" in info:  # a dir of parts (data/parts.py): their files as one sequence
            from .parts import part_tokens
            return part_tokens(self.directory, info, self.meta["dtype"])
        if info["tokens"] == 0:
            return np.zeros(0, dtype=self.meta["dtype"])
        return np.memmap(self.directory / info["file"], dtype=self.meta["dtype"], mode="r",
                         shape=(info["tokens"],))

    @property
    def kind(self) -> str:
        """"text" or "dialog" (prepare_dialog.py); dirs without the key predate it and hold text."""
        return self.meta.get("kind", "text")

    @property
    def attributes(self) -> list[str]:
        """The attributes rated in the train split (dialog dirs; [] for text)."""
        return list(self.meta.get("attributes", []))

    def mask(self, split: str) -> np.ndarray:
        """uint8 per token of tokens(split): 1 where the token is a training target."""
        info = self._dialog_split(split, "mask")
        if info["tokens"] == 0:
            return np.zeros(0, dtype=np.uint8)
        return np.memmap(self.directory / info["mask"], dtype=np.uint8, mode="r", shape=(info["tokens"],))

    def example_offsets(self, split: str) -> np.ndarray:
        """int64, examples + 1 entries: example e is tokens(split)[offsets[e]:offsets[e + 1]]."""
        info = self._dialog_split(split, "example offsets")
        return np.memmap(self.directory / info["index"], dtype="<i8", mode="r", shape=(info["examples"] + 1,))

    def split(self, split: str, document_mask: bool = False) -> "TextSplit | DialogSplit":
        """What training reads of one split: dialog examples to pack, or text windows (with
        document indices from <|endoftext|> when document_mask)."""
        if self.kind == "dialog":  # padding is <|endoftext|>: never a target, a document of its own
            return DialogSplit(self.tokens(split), self.mask(split), self.example_offsets(split), self.meta["eot_id"])
        return TextSplit(self.tokens(split), self.meta["eot_id"] if document_mask else None)

    def _dialog_split(self, split: str, what: str) -> dict:
        if self.kind != "dialog":
            raise DataError(f"{self.directory} holds plain text, which has no {what}; prepare dialog data with "
                            f"`lamda-prepare-data --format dialog`")
        return self.meta["splits"][split]


def open_sources(spec: str, *, model_vocab: int, seq_len: int, rank: int = 0, world_size: int = 1) -> list[DataSource]:
    """Opens and checks every dir of a --data spec; refuses, one line each, what cannot train.
    The token-id check reads this rank's share of each split (check_token_ids); the rest is meta."""
    from .prepare import read_meta

    sources = [DataSource(path, w, read_meta(path)) for path, w in parse_data_spec(spec)]
    hashes = {s.meta["tokenizer_sha256"] for s in sources}
    if len(hashes) > 1:
        listing = ", ".join(f"{s.directory} ({s.meta['tokenizer_sha256'][:12]})" for s in sources)
        raise DataError(f"--data mixes dirs prepared with different tokenizers: {listing}; "
                            f"prepare them all with the same tokenizer.json")
    for s in sources:
        if s.vocab_size > model_vocab:
            raise DataError(
                f"{s.directory} was prepared with a {s.vocab_size}-token vocabulary, more than the model's "
                f"{model_vocab}: pass --vocab-size {s.vocab_size} (or a multiple of 64 above it), or prepare "
                f"the data with a tokenizer of at most {model_vocab} tokens")
        check_token_ids(s, model_vocab, rank, world_size)
        train_tokens = s.meta["splits"]["train"]["tokens"]
        if train_tokens < seq_len + 1:
            raise DataError(f"{s.directory} holds {train_tokens} training tokens, fewer than one sample of "
                                f"--seq-len + 1 = {seq_len + 1}; use a shorter --seq-len or more data")
    return sources


def check_token_ids(source: DataSource, model_vocab: int, rank: int = 0, world_size: int = 1) -> None:
    """Every token id of every split is below the model's vocabulary (an id beyond it would be an
    IndexError deep in the embedding, after start-up). A max over the memory map, at disk speed
    (docs/benchmarks.md, "Input checks at start-up"); each of world_size ranks reads its own
    slice of each split, so a start reads the data once in all, not once per rank. A rank that
    finds a bad id refuses before any process group work, and the launcher ends the others."""
    for split, info in source.meta["splits"].items():
        tokens = source.tokens(split)
        start, end = share(len(tokens), rank, world_size)
        if end <= start:
            continue
        # in pieces: a slice of a dir of parts that crosses parts is a copy (data/parts.py)
        top = max(int(tokens[i:min(i + CHECK_CHUNK, end)].max()) for i in range(start, end, CHECK_CHUNK))
        if top >= model_vocab:
            own = (f"; the data's own tokenizer has only {source.vocab_size} ids, so the file is damaged or "
                   f"was written by another tool: prepare it again" if top >= source.vocab_size else "")
            raise DataError(f"{source.directory}: {info['file']} holds token id {top}, beyond the model's vocabulary "
                            f"of {model_vocab} (ids 0..{model_vocab - 1}); pass --vocab-size {top + 1} or more{own}")


def share(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank's contiguous slice [start, end) of n items split over world_size ranks: the slices
    are disjoint, cover [0, n), and differ in length by at most one."""
    return n * rank // world_size, n * (rank + 1) // world_size


class ShuffledSamples:
    """Sample k of an endless sequence of epochs over one token array's seq_len+1 windows."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, shuffle: bool = True, eot: int | None = None,
                 order: int = CURRENT):
        """eot: the end-of-text id, to give rows document indices (--document-mask); None: no doc.
        order: the data order's version (data/order.py)."""
        self.tokens, self.seq_len, self.eot = tokens, seq_len, eot
        self.num_samples = (len(tokens) - 1) // seq_len
        if self.num_samples < 1:
            raise ValueError(f"the data holds {len(tokens)} tokens, fewer than one sample of seq_len+1 = "
                             f"{seq_len + 1}; use a shorter --seq-len or more data")
        self.order = EpochOrder(self.num_samples, seed, shuffle, order)

    def window(self, k: int) -> int:
        return self.order.index(k)

    def __getitem__(self, k: int) -> np.ndarray:
        start = self.window(k) * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)

    def row(self, k: int) -> Row:
        tokens = self[k]
        return Row(tokens, None, None if self.eot is None else text_doc_ids(tokens, self.eot))

    def targets(self, k: int) -> int:
        return self.seq_len  # every label of a text window is a target


@dataclass(frozen=True)
class TextSplit:
    """A split of plain text: windows of seq_len + 1 tokens. eot set: rows carry document indices."""

    tokens: np.ndarray
    eot: int | None = None

    def samples(self, seq_len: int, seed: int, shuffle: bool, order: int = CURRENT) -> ShuffledSamples:
        return ShuffledSamples(self.tokens, seq_len, seed, shuffle, self.eot, order)


@dataclass(frozen=True)
class DialogSplit:
    """A split of a prepared dialog dir: its examples packed into rows (data/packing.py)."""

    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    pad_id: int

    def samples(self, seq_len: int, seed: int, shuffle: bool, order: int = CURRENT):
        return PackedExamples(self.tokens, self.mask, self.offsets, seq_len, self.pad_id, seed, shuffle, order)


class Mixture:
    """Global slot -> (source index, k-th sample of that source), exact quotas per block."""

    def __init__(self, weights: Sequence[float], seed: int, block: int = MIX_BLOCK):
        raw = [w * block for w in weights]
        quotas = [int(r) for r in raw]
        # largest remainder; ties to the earlier source
        for i in sorted(range(len(raw)), key=lambda i: (quotas[i] - raw[i], i))[:block - sum(quotas)]:
            quotas[i] += 1
        if min(quotas) == 0:
            raise DataError(f"a mixture weight is below 1/{block}: each source needs at least one sample "
                                f"in every {block}; raise the smallest weight")
        self.quotas, self.block, self.seed = quotas, block, seed
        self._pattern = np.repeat(np.arange(len(quotas)), quotas)
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None or self._cache[0] != b:
            g = torch.Generator().manual_seed(self.seed * 7_919 + b)
            src = self._pattern[torch.randperm(self.block, generator=g).numpy()]
            rank = np.empty(self.block, dtype=np.int64)  # position of each slot among its source's
            for i, q in enumerate(self.quotas):
                rank[src == i] = np.arange(q)
            self._cache = (b, src, rank)
        return self._cache[1], self._cache[2]

    def locate(self, slot: int) -> tuple[int, int]:
        if len(self.quotas) == 1:
            return 0, slot
        b, o = divmod(slot, self.block)
        src, rank = self._block(b)
        i = int(src[o])
        return i, b * self.quotas[i] + int(rank[o])


class MicroBatchStream:
    """Micro-batches (inputs, labels) in a BatchFormat (data/batches.py); plain: two
    (micro_batch_size, seq_len) int64 tensors.

    `splits` is one split or a list of them (a mixture, with `weights`): a TextSplit or
    DialogSplit, or a bare token array (plain text). `accum` (micro-batches per optimizer step)
    is needed for loss weights only: they normalise over the step's global batch. `order` is the
    data order's version (data/order.py): a resumed run passes the one its record names.
    """

    def __init__(self, splits, seq_len: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True, weights: Sequence[float] | None = None,
                 fmt: BatchFormat = PLAIN, accum: int = 1, order: int = CURRENT):
        splits = list(splits) if isinstance(splits, (list, tuple)) else [splits]
        splits = [TextSplit(s) if isinstance(s, np.ndarray) else s for s in splits]
        weights = list(weights) if weights is not None else [1.0 / len(splits)] * len(splits)
        if len(weights) != len(splits):
            raise ValueError(f"{len(splits)} token arrays but {len(weights)} weights")
        self.sources = [s.samples(seq_len, seed + 104_729 * i, shuffle, order) for i, s in enumerate(splits)]
        self.mixture = Mixture(weights, seed)
        self.seq_len, self.mbs, self.dp_rank, self.dp_size = seq_len, micro_batch_size, dp_rank, dp_size
        self.fmt, self.accum = fmt, accum
        self._targets: tuple[int, int] | None = None  # (first slot of a step, its target tokens)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.sources)

    def slot_row(self, slot: int) -> Row:
        i, k = self.mixture.locate(slot)
        return self.sources[i].row(k)

    def slot_sample(self, slot: int) -> np.ndarray:
        return self.slot_row(slot).tokens

    def step_targets(self, first_slot: int) -> int:
        """Target tokens in the global batch of the step whose first slot is first_slot."""
        if self._targets is None or self._targets[0] != first_slot:
            n = sum(self.sources[i].targets(k) for i, k in
                    map(self.mixture.locate, range(first_slot, first_slot + self.accum * self.dp_size * self.mbs)))
            self._targets = (first_slot, n)
        return self._targets[1]

    def micro_batch(self, m: int, slot_offset: int = 0):
        first = slot_offset + (m * self.dp_size + self.dp_rank) * self.mbs
        rows = [self.slot_row(first + j) for j in range(self.mbs)]
        weight = 1.0
        if self.fmt.loss_weights:
            step_first = slot_offset + (m // self.accum) * self.accum * self.dp_size * self.mbs
            weight = self.accum * self.dp_size / max(self.step_targets(step_first), 1)
        return micro_batch(rows, self.fmt, weight)

    def iterate(self, start: int = 0, slot_offset: int = 0) -> Iterator:
        m = start
        while True:
            yield self.micro_batch(m, slot_offset)
            m += 1


def prepare_bundled(out_dir: Path, vocab_size: int) -> Path:
    """The demo data: the bundled corpus with a tokenizer trained on it, prepared through the
    same code as user data. Reused while it matches; rebuilt (replacing only this cache) when
    the corpus or the vocabulary size changes."""
    import hashlib

    from .prepare import prepare_data, read_meta
    from .text_sources import iter_documents
    from .tokenizer import train_tokenizer

    files = bundled_corpus()
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:16]
    source = f"bundled corpus {digest}, tokenizer trained to {vocab_size} tokens"
    try:
        if read_meta(out_dir)["source"] == source:
            return out_dir
    except DataError:
        pass
    docs = list(iter_documents(inputs=[str(p) for p in files]))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tok_path = out_dir.parent / f".{out_dir.name}-tokenizer.json"
    train_tokenizer(docs, vocab_size).save(str(tok_path))
    prepare_data(docs, tok_path, out_dir, val_fraction=0.05, workers=1, force=True, source=source,
                 progress=False)
    tok_path.unlink()
    return out_dir
