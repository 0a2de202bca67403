"""lamda-prepare-data: tokenize raw text into a prepared data dir (train.bin, val.bin, meta.json,
tokenizer.json) for `ds_train.py --data DIR`.

    lamda-prepare-data --input docs/*.txt --tokenizer tokenizer.json --out data/docs --val-fraction 0.02
    lamda-prepare-data --dataset EleutherAI/pile --streaming --tokenizer pile-32k.json --out data/pile
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..data.text_sources import DataError, describe_source, iter_documents
from . import ArgumentParser, add_source_args, run_cli, source_kwargs


def parse_args(argv):
    p = ArgumentParser(prog="lamda-prepare-data", description=__doc__.split("\n\n")[0])
    add_source_args(p)
    p.add_argument("--tokenizer", type=Path, required=True, help="tokenizer.json (needs an <|endoftext|> token)")
    p.add_argument("--out", type=Path, required=True, help="the data dir to write")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    p.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: all cores)")
    p.add_argument("--batch-docs", type=int, default=1000, help="documents per task (default 1000; a task also ends at 1 MiB of text)")
    p.add_argument("--force", action="store_true", help="replace --out if it holds prepared data")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _run(argv) -> int:
    from ..data.prepare import check_output, prepare_data
    from ..data.tokenizer import eot_id, load_tokenizer

    args = parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if (args.workers is not None and args.workers < 1) or args.batch_docs < 1:
        raise DataError("--workers and --batch-docs must be >= 1")
    eot_id(load_tokenizer(args.tokenizer), f"--tokenizer {args.tokenizer}")
    check_output(args.out, args.force)
    kwargs = source_kwargs(args)
    docs = iter_documents(**kwargs)  # checks the input before any tokenizing
    source = describe_source(kwargs["inputs"], kwargs["dataset"], kwargs["config"], kwargs["split"],
                             kwargs["text_field"])
    start = time.perf_counter()
    meta = prepare_data(docs, args.tokenizer, args.out, val_fraction=args.val_fraction, workers=args.workers,
                        force=args.force, source=source, batch_docs=args.batch_docs, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    splits = meta["splits"]
    for name in ("train", "val"):
        print(f"{name}: {splits[name]['tokens']:,} tokens in {splits[name]['documents']:,} documents")
    total = splits["train"]["tokens"] + splits["val"]["tokens"]
    print(f"{total:,} tokens in {seconds:.1f} s: {total / seconds:,.0f} tokens/s")
    print(f"wrote {args.out} ({meta['dtype']}, vocab size {meta['vocab_size']}, tokenizer sha256 "
          f"{meta['tokenizer_sha256'][:16]}...)")
    return 0


def main(argv=None) -> int:
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
