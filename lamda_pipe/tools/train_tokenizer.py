"""lamda-train-tokenizer: train a SentencePiece-style BPE tokenizer (as LLaMA's) on raw text.

    lamda-train-tokenizer --input docs/*.txt --vocab-size 32000 --out tokenizer.json
    lamda-train-tokenizer --dataset EleutherAI/pile --streaming --max-bytes 2G --out pile-32k.json
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ..data.text_sources import DataError, iter_documents
from . import ArgumentParser, add_source_args, run_cli, source_kwargs


def parse_args(argv):
    p = ArgumentParser(prog="lamda-train-tokenizer", description=__doc__.split("\n\n")[0])
    add_source_args(p)
    p.add_argument("--vocab-size", type=int, default=32000, help="tokens in the result (default 32000)")
    p.add_argument("--out", type=Path, default=Path("tokenizer.json"), help="tokenizer file to write")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _run(argv) -> int:
    from ..data.tokenizer import MIN_VOCAB_SIZE, tokenizer_sha256, train_tokenizer

    args = parse_args(argv)
    if args.vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"--vocab-size {args.vocab_size} is too small: it must hold 256 byte tokens, 3 special "
                        f"tokens and a character (>= {MIN_VOCAB_SIZE}; 32000 is LLaMA's)")
    if args.out.is_dir():
        raise DataError(f"--out {args.out} is a directory; name the tokenizer file, e.g. {args.out / 'tokenizer.json'}")
    if args.out.exists() and not args.force:
        raise DataError(f"--out {args.out} already exists; pass --force to overwrite it or pick another --out")
    docs = iter_documents(**source_kwargs(args))  # checks the input before any training
    seen = {"docs": 0, "bytes": 0}

    def counted():
        for d in docs:
            seen["docs"] += 1
            seen["bytes"] += len(d.encode("utf-8"))
            yield d

    start = time.perf_counter()
    # the trainer's own bars (indicatif) print only blank lines when stderr is not a terminal
    tok = train_tokenizer(counted(), args.vocab_size, show_progress=not args.no_progress and sys.stderr.isatty())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f"{args.out.name}.tmp-{os.getpid()}")
    try:
        tok.save(str(tmp))
        os.replace(tmp, args.out)  # atomically: a reader never sees half a file
    finally:
        tmp.unlink(missing_ok=True)
    size = tok.get_vocab_size()
    note = "" if size == args.vocab_size else f" (requested {args.vocab_size}: the text allows no more merges)"
    print(f"trained on {seen['docs']:,} documents, {seen['bytes'] / 1e6:,.1f} MB in "
          f"{time.perf_counter() - start:.1f} s")
    print(f"wrote {args.out}: vocab size {size}{note}, sha256 {tokenizer_sha256(tok)}")
    return 0


def main(argv=None) -> int:
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
