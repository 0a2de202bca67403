"""A SentencePiece-style BPE tokenizer (as LLaMA's): training, loading, identity.

The model is BPE over characters with byte fallback: a character the vocabulary lacks is
spelled as its UTF-8 bytes ("<0x00>".."<0xFF>"), so no text ever becomes <unk> and
encode/decode round-trips exactly (two exceptions inherent to the "▁" scheme: a literal U+2581
"▁" decodes as a space, and one leading space of a text is dropped). Spaces become "▁" and a
"▁" is prepended to the first word, as SentencePiece does; there is no normalizer.

Any tokenizer.json with an end-of-text token works with the rest of lamda_pipe, e.g. GPT-2's
byte-level BPE: `special_ids` reports what a tokenizer has, `eot_id` insists on what data
preparation needs.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from ..errors import DataError

EOT = "<|endoftext|>"
PAD = "<pad>"
UNK = "<unk>"
# Dialog tokens (data/dialog.py has the layouts): the end of a context turn, the sentinel before a
# response, an attribute's name before its rating, and the two ratings.
TURN = "<|turn|>"
RESPONSE = "<|response|>"
ATTRIBUTES = ("sensible", "specific", "interesting", "safe")
ATTRIBUTE_TOKENS = {a: f"<|{a}|>" for a in ATTRIBUTES}
YES, NO = "<|yes|>", "<|no|>"
DIALOG_TOKENS = [TURN, RESPONSE, *ATTRIBUTE_TOKENS.values(), YES, NO]
SPECIAL_TOKENS = [EOT, PAD, UNK, *DIALOG_TOKENS]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
MIN_VOCAB_SIZE = len(BYTE_TOKENS) + len(SPECIAL_TOKENS) + 1
MAX_ALPHABET = 1000  # characters kept as base symbols; rarer ones fall back to bytes (as HF's SentencePieceBPE)
# Training splits longer runs without whitespace into pieces of this many characters: the BPE
# trainer's time grows far faster than a word's length (docs/benchmarks.md, "Tokenizer training on
# pathological input"), and no useful token is that long. Only training sees the split; encoding is
# unchanged.
MAX_WORD_CHARS = 64


def train_tokenizer(docs: Iterable[str], vocab_size: int = 32000, show_progress: bool = False) -> Tokenizer:
    """Trains the BPE on `docs` (any iterable, consumed once, streamed).

    The result has exactly vocab_size tokens when the text allows that many merges (fewer
    otherwise, never more): the 3 special tokens (ids 0..2), up to MAX_ALPHABET characters, the
    merges, then the 256 byte tokens.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"--vocab-size {vocab_size} is too small: it must hold {len(BYTE_TOKENS)} byte tokens, "
                        f"{len(SPECIAL_TOKENS)} special tokens and at least one character "
                        f"(>= {MIN_VOCAB_SIZE}; 32000 is LLaMA's)")
    tok = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    # The trainer's vocab_size counts the special tokens and the alphabet; the byte tokens are
    # added afterwards, so they are left out here and the alphabet must fit what remains.
    budget = vocab_size - len(BYTE_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=budget, special_tokens=SPECIAL_TOKENS, show_progress=show_progress,
                                  limit_alphabet=min(MAX_ALPHABET, budget - len(SPECIAL_TOKENS)))
    counted = _Counter(docs)
    metaspace = tok.pre_tokenizer
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        metaspace, pre_tokenizers.Split(Regex(rf"[\s\S]{{1,{MAX_WORD_CHARS}}}"), behavior="isolated")])
    _interruptible(lambda: tok.train_from_iterator(counted, trainer=trainer))
    tok.pre_tokenizer = metaspace
    if counted.docs == 0:
        raise DataError("no documents to train the tokenizer on (every input was empty); check --input / "
                        "--dataset and --text-field")
    return _with_byte_tokens(tok)


def _interruptible(work) -> None:
    """Runs work() in a helper thread while this thread waits in Python: the trainer runs in
    native code, where SIGTERM's and SIGINT's Python handlers would wait for it to finish; the
    waiting thread runs them at once (and the helper, a daemon, ends with the process)."""
    if threading.current_thread() is not threading.main_thread():  # signals are the main thread's
        work()
        return
    failed: list[BaseException] = []

    def run():
        try:
            work()
        except BaseException as e:  # noqa: BLE001  handed to the waiting thread
            failed.append(e)

    helper = threading.Thread(target=run, name="tokenizer-training", daemon=True)
    helper.start()
    while helper.is_alive():
        helper.join(0.1)
    if failed:
        raise failed[0]


class _Counter:
    """Passes documents through, counting them (the trainer does not say how many it saw)."""

    def __init__(self, docs: Iterable[str]):
        self.it, self.docs = iter(docs), 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        doc = next(self.it)
        self.docs += 1
        return doc


def _with_byte_tokens(tok: Tokenizer) -> Tokenizer:
    # Byte fallback looks "<0xNN>" up in the BPE model's vocabulary (not among added tokens),
    # and the trainer cannot be told to keep them, so they are appended to the model here.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    next_id = max([*vocab.values(), *(t["id"] for t in spec["added_tokens"])]) + 1
    for token in BYTE_TOKENS:
        if token not in vocab:  # a learned token spelled "<0x41>" would already stand for it
            vocab[token] = next_id
            next_id += 1
    return Tokenizer.from_str(json.dumps(spec))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Tokenizer.from_file, with a DataError naming the file when it is missing or unreadable."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--tokenizer {path}: no such file; train one with lamda-train-tokenizer or pass a "
                        f"tokenizer.json")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise DataError(f"--tokenizer {path}: not a Hugging Face tokenizers file ({str(e)[:200]}); pass a "
                        f"tokenizer.json (e.g. written by lamda-train-tokenizer)") from None


def tokenizer_sha256(path_or_tokenizer: str | Path | Tokenizer) -> str:
    """sha256 of the canonical JSON: the same tokenizer hashes the same however it was saved
    (pretty-printed or not, any key order)."""
    tok = path_or_tokenizer if isinstance(path_or_tokenizer, Tokenizer) else load_tokenizer(path_or_tokenizer)
    canonical = json.dumps(json.loads(tok.to_str()), sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def special_ids(tok: Tokenizer) -> dict:
    """{"eot": id, "pad": id, "unk": id}, None for a token the tokenizer lacks."""
    return {"eot": tok.token_to_id(EOT), "pad": tok.token_to_id(PAD), "unk": tok.token_to_id(UNK)}


def eot_id(tok: Tokenizer, where: str = "the tokenizer") -> int:
    """The end-of-text id that separates documents in prepared data; DataError if missing."""
    i = tok.token_to_id(EOT)
    if i is None:
        raise DataError(f"{where} has no end-of-text token {EOT!r}, which separates documents in prepared data; "
                        f"use a tokenizer that has it (lamda-train-tokenizer adds it; GPT-2's has it)")
    return i


def vocab_size(tok: Tokenizer) -> int:
    """Size of the id space: one more than the largest id (equal to get_vocab_size() unless the
    file's ids have gaps), which is what an embedding table must hold."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1
