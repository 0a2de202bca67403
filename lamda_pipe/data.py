"""Text -> tokenizer -> packed token samples -> deterministic micro-batches.

What the trainer needs from this module is small: a tokenizer file, a vocabulary size and,
per split, a ``MicroBatchStream`` whose micro-batch number m is a pure function of
(seed, m, data-parallel rank). That makes the first and last pipeline stage read the same
micro-batch without talking to each other, and makes the data position after a resume
simply ``global_steps * gradient_accumulation_steps``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

EOT = "<|endoftext|>"
PAD = "<pad>"
UNK = "<unk>"
SPECIAL_TOKENS = [EOT, PAD, UNK]

CORPUS_DIR = Path(__file__).parent / "corpus"


def bundled_corpus() -> list[Path]:
    """The demo corpus shipped with the package: six books of the King James Bible (public
    domain), one document per chapter."""
    return sorted(CORPUS_DIR.glob("*.txt"))


def read_documents(paths: list[Path]) -> list[str]:
    """Plain text files; documents are separated by blank lines."""
    docs = []
    for path in paths:
        text = Path(path).read_text(encoding="utf-8")
        docs.extend(d.strip() for d in text.split("\n\n") if d.strip())
    return docs


def resolve_text_paths(data: str | None) -> list[Path]:
    if data is None:
        return bundled_corpus()
    p = Path(data)
    if p.is_dir():
        paths = sorted(p.glob("*.txt"))
        if not paths:
            raise FileNotFoundError(f"--data {data}: the directory holds no .txt files")
        return paths
    if p.is_file():
        return [p]
    raise FileNotFoundError(f"--data {data}: no such file or directory")


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE (no unknown characters possible) with end-of-text, pad and unk tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class PreparedCorpus:
    directory: Path
    vocab_size: int  # of the tokenizer
    eot_id: int
    train: np.ndarray  # 1-D token ids, documents separated by end-of-text
    val: np.ndarray

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / "tokenizer.json"

    def load_tokenizer(self):
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(self.tokenizer_path))


def prepare_corpus(paths: list[Path], out_dir: Path, vocab_size: int, val_every: int = 20) -> PreparedCorpus:
    """Tokenizes text files into out_dir (tokenizer.json, train.bin, val.bin, meta.json).

    Reuses an earlier result when the sources and vocabulary size are unchanged. Every
    `val_every`-th document (at least one) is held out for validation. Files are written under temporary
    names and renamed, meta.json last, so an interrupted run is never taken as complete.
    """
    out_dir = Path(out_dir)
    if val_every < 2:
        raise ValueError(f"val_every must be >= 2 (every val_every-th document is held out), got {val_every}")
    docs = read_documents(paths)
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents (separated by blank lines) to split train/val, "
                         f"found {len(docs)} in {[str(p) for p in paths]}")
    source_hash = hashlib.sha256("\x00".join(docs).encode()).hexdigest()[:16]
    meta_path = out_dir / "meta.json"
    want = {"source_sha256": source_hash, "requested_vocab_size": vocab_size, "val_every": val_every}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in want.items()):
            return _load_prepared(out_dir, meta)

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(docs, vocab_size)
    eot = tok.token_to_id(EOT)
    dtype = np.uint16 if tok.get_vocab_size() <= 2 ** 16 else np.uint32
    # Every val_every-th document is held out; a corpus shorter than that holds out its last one.
    val_ids = {i for i in range(len(docs)) if i % val_every == val_every - 1} or {len(docs) - 1}
    splits = {"train": [], "val": []}
    for i, enc in enumerate(tok.encode_batch(docs)):
        splits["val" if i in val_ids else "train"].append(enc.ids + [eot])
    tmp_tok = out_dir / f"tokenizer.json.tmp{os.getpid()}"
    tok.save(str(tmp_tok))
    os.replace(tmp_tok, out_dir / "tokenizer.json")
    counts = {}
    for name, seqs in splits.items():
        arr = np.fromiter((t for s in seqs for t in s), dtype=dtype)
        _atomic_write_bytes(out_dir / f"{name}.bin", arr.tobytes())
        counts[name] = {"tokens": int(arr.size), "documents": len(seqs)}
    meta = {**want, "vocab_size": tok.get_vocab_size(), "eot_id": eot, "dtype": np.dtype(dtype).name,
            "splits": counts, "sources": [str(p) for p in paths]}
    _atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())
    return _load_prepared(out_dir, meta)


def _load_prepared(out_dir: Path, meta: dict) -> PreparedCorpus:
    def load(name):
        return np.memmap(out_dir / f"{name}.bin", dtype=meta["dtype"], mode="r")
    return PreparedCorpus(out_dir, meta["vocab_size"], meta["eot_id"], load("train"), load("val"))


class MicroBatchStream:
    """Micro-batches of (inputs, labels), each (micro_batch_size, seq_len) int64.

    Samples are non-overlapping windows of seq_len + 1 tokens. Sample slot s (counted over all
    data-parallel ranks) is taken from a permutation of the samples seeded by (seed, epoch),
    epoch = s // num_samples, so an epoch boundary starts a new order. Micro-batch m of
    data-parallel rank r holds slots (m * dp_size + r) * mbs ... + mbs - 1: ranks never share
    a slot, and the stream is a pure function of m.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.tokens, self.seq_len, self.mbs = tokens, seq_len, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.num_samples = (len(tokens) - 1) // seq_len
        if self.num_samples < 1:
            raise ValueError(
                f"the data holds {len(tokens)} tokens, fewer than one sample of seq_len+1 = "
                f"{seq_len + 1}; use a shorter --seq-len or more data")
        self._perm: tuple[int, torch.Tensor] | None = None  # (epoch, order), the latest only

    def _sample_index(self, slot: int) -> int:
        epoch, pos = divmod(slot, self.num_samples)
        if not self.shuffle:
            return pos
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.num_samples, generator=g))
        return int(self._perm[1][pos])

    def sample(self, slot: int) -> np.ndarray:
        start = self._sample_index(slot) * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)

    def micro_batch(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = (m * self.dp_size + self.dp_rank) * self.mbs
        batch = torch.from_numpy(np.stack([self.sample(first + j) for j in range(self.mbs)]))
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # (B, T) inputs, (B, T) labels

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        m = start
        while True:
            yield self.micro_batch(m)
            m += 1
