"""lamda-prepare-data: tokenize raw text into a prepared data dir (train.bin, val.bin, meta.json,
tokenizer.json) for `ds_train.py --data DIR`.

    lamda-prepare-data --input docs/*.txt --tokenizer tokenizer.json --out data/docs --val-fraction 0.02
    lamda-prepare-data --dataset EleutherAI/pile --streaming --tokenizer pile-32k.json --out data/pile
    lamda-prepare-data --format dialog --input dialogs.jsonl --tokenizer tokenizer.json --out data/dialogs
    lamda-prepare-data --input docs/ --tokenizer tokenizer.json --out data/docs --shard 3/16   # one of 16 slices

--format dialog reads dialog files (JSON lines, lamda_pipe/data/dialog.py) into a dialog dir
(lamda_pipe/data/prepare_dialog.py). The format is never guessed: a text JSONL file with a
"turns" field would otherwise train on the wrong thing without a word.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..data.text_sources import DataError, describe_source, iter_documents
from . import ArgumentParser, add_source_args, run_cli, source_kwargs


def parse_args(argv):
    p = ArgumentParser(prog="lamda-prepare-data", description=__doc__.split("\n\n")[0])
    add_source_args(p)
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.json (needs an <|endoftext|> token); required")
    p.add_argument("--out", type=Path, required=True, help="the data dir to write")
    p.add_argument("--format", choices=("text", "dialog"), default="text",
                   help="text: documents (default); dialog: dialog files, JSON lines (lamda_pipe/data/dialog.py)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    p.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: all cores)")
    p.add_argument("--batch-docs", type=int, default=None,
                   help="documents per task (default 1000; a task also ends at 1 MiB of text)")
    p.add_argument("--force", action="store_true", help="replace --out if it holds prepared data")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--shard", type=_shard, default=None, metavar="i/N",
                   help="prepare only slice i of N of the documents into OUT/parts/ (a Slurm array task: "
                        "scripts/slurm/prepare.sbatch); complete parts are skipped, so rerun freely")
    p.add_argument("--plan-shards", type=int, default=None, metavar="N",
                   help="count the documents once and write the plan for --shard i/N tasks (OUT/parts.json), so "
                        "that each task reads only its own files; run it before the array")
    args = p.parse_args(argv)
    if args.shard is not None and args.plan_shards is not None:
        raise DataError("--plan-shards and --shard are separate steps: plan once, then run each --shard i/N task")
    if args.plan_shards is not None and args.plan_shards < 1:
        raise DataError(f"--plan-shards must be >= 1, got {args.plan_shards}")
    if args.tokenizer is None:
        if args.shard is not None or args.plan_shards is not None:
            step = "--shard" if args.shard is not None else "--plan-shards"
            raise DataError(f"{step} needs --tokenizer: every shard must use the same one; train it once on a sample "
                            "(lamda-train-tokenizer --input ... --max-bytes 2G --out tok.json) and pass --tokenizer "
                            "tok.json to every task")
        p.error("the following arguments are required: --tokenizer")
    return args


def _shard(text: str):
    from ..data.parts import parse_shard

    try:
        return parse_shard(text)
    except DataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _run(argv) -> int:
    from ..data.prepare import check_output, prepare_data
    from ..data.tokenizer import eot_id, load_tokenizer

    args = parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.format == "dialog":
        return _run_dialog(args)
    if args.shard is not None or args.plan_shards is not None:
        return _run_shard(args)
    args.batch_docs = 1000 if args.batch_docs is None else args.batch_docs
    if (args.workers is not None and args.workers < 1) or args.batch_docs < 1:
        raise DataError("--workers and --batch-docs must be >= 1")
    eot_id(load_tokenizer(args.tokenizer), f"--tokenizer {args.tokenizer}")
    check_output(args.out, args.force)
    kwargs = source_kwargs(args)
    _refuse_dialog_files(kwargs["inputs"], kwargs["text_field"])
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


# what only plain text reads: (flag, whether it was given)
TEXT_ONLY = {"--dataset": lambda a: a.dataset is not None, "--config": lambda a: a.config is not None,
             "--split": lambda a: a.split is not None, "--streaming": lambda a: a.streaming,
             "--text-field": lambda a: a.text_field != "text", "--max-docs": lambda a: a.max_docs is not None,
             "--max-bytes": lambda a: a.max_bytes is not None, "--workers": lambda a: a.workers is not None,
             "--batch-docs": lambda a: a.batch_docs is not None, "--shard": lambda a: a.shard is not None,
             "--plan-shards": lambda a: a.plan_shards is not None}


def _run_shard(args) -> int:
    from ..data.parts import parts_status, shard_list
    from ..data.prepare_parts import input_pieces, plan_shards, prepare_shard
    from ..data.tokenizer import eot_id, load_tokenizer

    if args.force:
        raise DataError("--shard never replaces data: drop --force (complete parts are skipped, an interrupted one "
                        "is redone); to start over, remove the --out dir or pick another")
    batch_docs = 1000 if args.batch_docs is None else args.batch_docs
    if (args.workers is not None and args.workers < 1) or batch_docs < 1:
        raise DataError("--workers and --batch-docs must be >= 1")
    eot_id(load_tokenizer(args.tokenizer), f"--tokenizer {args.tokenizer}")
    kwargs = source_kwargs(args)
    _refuse_dialog_files(kwargs["inputs"], kwargs["text_field"])
    iter_documents(**kwargs)  # checks the input before any work
    source = describe_source(kwargs["inputs"], kwargs["dataset"], kwargs["config"], kwargs["split"],
                             kwargs["text_field"])
    limits = {k: kwargs[k] for k in ("max_docs", "max_bytes") if kwargs[k] is not None}
    pieces = input_pieces(kwargs)
    start = time.perf_counter()
    if args.plan_shards is not None:
        plan = plan_shards(pieces, args.tokenizer, args.out, args.plan_shards, val_fraction=args.val_fraction,
                           source=source, limits=limits)
        print(f"plan for {plan['num_shards']} shards: {plan['documents']:,} documents in {len(pieces)} input "
              f"piece(s), counted in {time.perf_counter() - start:.1f} s; now run --shard i/{plan['num_shards']} for i "
              f"in 0..{plan['num_shards'] - 1} (wrote {args.out / 'parts.json'})")
        return 0
    meta = prepare_shard(pieces, args.tokenizer, args.out, args.shard, val_fraction=args.val_fraction,
                         workers=args.workers, source=source, limits=limits, batch_docs=batch_docs,
                         log=lambda line: print(line, flush=True))
    if not meta["skipped"]:
        seconds = time.perf_counter() - start
        splits = meta["splits"]
        total = splits["train"]["tokens"] + splits["val"]["tokens"]
        print(f"shard {args.shard}: documents {meta['first_document']:,} to "
              f"{meta['first_document'] + meta['documents'] - 1:,} of {meta['total_documents']:,}: "
              f"{splits['train']['tokens']:,} train + {splits['val']['tokens']:,} val tokens in {seconds:.1f} s "
              f"({total / seconds:,.0f} tokens/s)")
    plan, todo = parts_status(args.out)
    if todo:
        print(f"{plan['num_shards'] - len(todo)} of {plan['num_shards']} parts complete; still to run: shard(s) "
              f"{shard_list(todo)}")
    else:
        print(f"all {plan['num_shards']} parts complete: {args.out} is ready (ds_train.py --data {args.out})")
    return 0


def _run_dialog(args) -> int:
    from ..data.dialog import DialogTokens, read_dialog_files
    from ..data.prepare import check_output
    from ..data.prepare_dialog import prepare_dialog_data
    from ..data.text_sources import JSONL, resolve_inputs
    from ..data.tokenizer import eot_id, load_tokenizer

    given = [flag for flag, used in TEXT_ONLY.items() if used(args)]
    if given:
        raise DataError(f"{given[0]} applies to --format text only; dialog data is read from --input files, "
                        f"whole, in one process: drop {given[0]}")
    tok = load_tokenizer(args.tokenizer)
    eot_id(tok, f"--tokenizer {args.tokenizer}")
    DialogTokens.of(tok, f"--tokenizer {args.tokenizer}")
    check_output(args.out, args.force)
    files = resolve_inputs(args.input)
    for path, kind in files:
        if kind != JSONL:
            raise DataError(f"--input {path}: a dialog file is JSON lines (.jsonl / .json, optionally .gz), one "
                            f"dialog per line; convert it, or drop --format dialog for plain text")
    dialogs = read_dialog_files(p for p, _ in files)  # every file checked before anything is written
    meta = prepare_dialog_data(dialogs, args.tokenizer, args.out, val_fraction=args.val_fraction, force=args.force,
                               source=_dialog_source(args.input),
                               progress=not args.no_progress)
    for name in ("train", "val"):
        s = meta["splits"][name]
        print(f"{name}: {s['tokens']:,} tokens in {s['examples']:,} examples ({s['generative']:,} generative, "
              f"{s['discriminative']:,} discriminative) from {s['documents']:,} dialogs")
    print(f"wrote {args.out} (dialog data, {meta['dtype']}, attributes {', '.join(meta['attributes']) or 'none'}, "
          f"tokenizer sha256 {meta['tokenizer_sha256'][:16]}...)")
    return 0


def _dialog_source(inputs) -> str:
    names = [str(p) for p in inputs]
    return "dialog files " + ", ".join(names[:8]) + (f", ... ({len(names)} inputs)" if len(names) > 8 else "")


def _refuse_dialog_files(inputs, text_field: str) -> None:
    """A dialog file given as text would train on nothing (no "text" field) or on the wrong thing."""
    import json

    from ..data.text_sources import JSONL, _first_json_object, resolve_inputs

    for path, kind in resolve_inputs(inputs or []):
        if kind != JSONL:
            continue
        try:
            first = _first_json_object(path)
        except (DataError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # iter_documents names these
        if isinstance(first, dict) and "turns" in first and text_field not in first:
            raise DataError(f"--input {path} holds dialogs (its first record has \"turns\", no {text_field!r}); "
                            f"pass --format dialog")


def main(argv=None) -> int:
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
