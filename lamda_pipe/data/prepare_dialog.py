"""Dialog files -> a prepared dialog dir: the examples of data/dialog.py, ready to memory-map.

The dir is a plain prepared dir (prepare.py: built in OUT.tmp-<pid>, meta.json written last,
tokenizer.json copied in) whose meta.json says ``"kind": "dialog"``, with per split:

* ``train.bin``: the examples' token ids, concatenated (each already ends as dialog.py's layout
  says: <|endoftext|>, or the rating token), dtype as plain data (uint16 / uint32);
* ``train.mask.bin``: uint8, one per token, dialog.py's loss mask (1: a training target);
* ``train.idx.bin``: little-endian int64 offsets, examples + 1 of them: example e is
  tokens[idx[e]:idx[e + 1]].

Dialog i (0-based over all input files, in order) goes to validation when
prepare.is_val_document(i, f), with the plain data's fallback: if none does, f > 0 and there
are >= 2 dialogs, the last one does. All examples of a dialog stay in its split.

meta.json adds to the plain keys: "kind": "dialog", "attributes" (the sorted attribute names
rated in the train split), "dialog_tokens" (DialogTokens.to_dict of the tokenizer), and per split
"mask", "index", "examples", "generative", "discriminative"; "documents" counts dialogs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from .dialog import Dialog, DialogTokens, dialog_examples
from .prepare import FORMAT, SPLITS, build_data_dir, check_output, is_val_document, now, token_dtype
from .tokenizer import eot_id, load_tokenizer, tokenizer_sha256, vocab_size as id_space

KIND = "dialog"
INDEX_DTYPE = np.dtype("<i8")
MASK_DTYPE = np.dtype("u1")
SPLIT_KEYS = ("file", "mask", "index", "tokens", "documents", "examples", "generative", "discriminative")


def val_dialogs(n: int, val_fraction: float) -> list[bool]:
    """Which of n dialogs go to validation (the rule above; an evaluation that wants the held-out
    dialogs of a prepared dir selects them with this)."""
    val = [is_val_document(i, val_fraction) for i in range(n)]
    if val_fraction > 0 and n >= 2 and not any(val):
        val[-1] = True
    return val


def prepare_dialog_data(dialogs: Sequence[Dialog], tokenizer_path: str | Path, out_dir: str | Path, *,
                        val_fraction: float = 0.01, force: bool = False, source: str = "",
                        progress: bool = True) -> dict:
    """Encodes already-read dialogs (dialog.read_dialog_files checks them) into out_dir; returns
    meta.json's dict. Encoding runs in this process: dialog corpora are small."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    tok = load_tokenizer(tokenizer_path)
    eot = eot_id(tok, f"--tokenizer {tokenizer_path}")
    ids = DialogTokens.of(tok, f"--tokenizer {tokenizer_path}")
    check_output(out_dir, force)
    if not dialogs:
        raise DataError("the input holds no dialogs; check --input")
    val = val_dialogs(len(dialogs), val_fraction)
    if all(val):
        raise DataError(f"all {len(dialogs)} dialog(s) went to validation (--val-fraction {val_fraction}); lower "
                        f"--val-fraction or add dialogs")
    vocab = id_space(tok)
    dtype = token_dtype(vocab)

    def fill(tmp: Path) -> dict:
        counts, attributes = _write_splits(dialogs, val, tok, ids, dtype, tmp, progress)
        return {"format": FORMAT, "kind": KIND, "dtype": dtype.name, "vocab_size": vocab,
                "tokenizer_sha256": tokenizer_sha256(tok), "eot_id": eot, "source": source,
                "val_fraction": float(val_fraction), "attributes": attributes, "dialog_tokens": ids.to_dict(),
                "splits": {name: {"file": f"{name}.bin", "mask": f"{name}.mask.bin", "index": f"{name}.idx.bin",
                                  **counts[name]} for name in SPLITS},
                "created": now()}

    return build_data_dir(tokenizer_path, out_dir, force, fill)


def _write_splits(dialogs, val, tok, ids, dtype, out: Path, progress: bool) -> tuple[dict, list[str]]:
    from tqdm import tqdm

    counts = {name: {"tokens": 0, "documents": 0, "examples": 0, "generative": 0, "discriminative": 0}
              for name in SPLITS}
    offsets = {name: [0] for name in SPLITS}
    rated = set()
    files = {}
    try:
        for name in SPLITS:
            files[name] = (open(out / f"{name}.bin", "wb", buffering=1 << 20),
                           open(out / f"{name}.mask.bin", "wb", buffering=1 << 20))
        for dialog, is_val in zip(tqdm(dialogs, unit=" dialogs", disable=not progress, file=sys.stderr,
                                       dynamic_ncols=True, desc="encoding"), val):
            name = SPLITS[is_val]
            c = counts[name]
            examples = dialog_examples(tok, ids, dialog)
            f_ids, f_mask = files[name]
            for e in examples:
                f_ids.write(np.asarray(e.ids, dtype=dtype).tobytes())
                f_mask.write(np.asarray(e.mask, dtype=MASK_DTYPE).tobytes())
                c["tokens"] += len(e.ids)
                offsets[name].append(c["tokens"])
                if e.attribute is None:
                    c["generative"] += 1
                else:
                    c["discriminative"] += 1
                    if not is_val:
                        rated.add(e.attribute)
            c["documents"] += 1
            c["examples"] += len(examples)
        for name in SPLITS:
            with open(out / f"{name}.idx.bin", "wb") as f:
                f.write(np.asarray(offsets[name], dtype=INDEX_DTYPE).tobytes())
                f.flush()
                os.fsync(f.fileno())
            for f in files[name]:
                f.flush()
                os.fsync(f.fileno())
    finally:
        for pair in files.values():
            for f in pair:
                f.close()
    return counts, sorted(rated)


def check_dialog_files(d: Path, meta: dict, fix: str) -> None:
    """read_meta's part for dialog dirs: the keys, the mask's and index's sizes, and that the
    index runs from 0 to the token count without going back (the token files are checked there)."""
    meta_path = d / "meta.json"
    missing = [k for k in ("attributes", "dialog_tokens") if k not in meta]
    missing += [f"splits.{s}.{k}" for s in SPLITS for k in SPLIT_KEYS if k not in meta["splits"][s]]
    if missing:
        raise DataError(f"{meta_path}: missing {', '.join(missing)}; {fix}")
    for name in SPLITS:
        info = meta["splits"][name]
        for key, want in (("mask", info["tokens"] * MASK_DTYPE.itemsize),
                          ("index", (info["examples"] + 1) * INDEX_DTYPE.itemsize)):
            path = d / info[key]
            if not path.is_file():
                raise DataError(f"{path} is missing (meta.json lists it); {fix}")
            if path.stat().st_size != want:
                raise DataError(f"{path} holds {path.stat().st_size} bytes, but meta.json says {want} (truncated or "
                                f"modified); {fix}")
        idx = np.fromfile(d / info["index"], dtype=INDEX_DTYPE)
        if idx[0] != 0 or idx[-1] != info["tokens"] or (np.diff(idx) <= 0).any():
            raise DataError(f"{d / info['index']}: the offsets do not run from 0 up to {info['tokens']} tokens "
                            f"(damaged or modified); {fix}")
