"""Command-line tools: `lamda-train-tokenizer`, `lamda-prepare-data`, `lamda-export`,
`lamda-generate`, `lamda-chat` and `lamda-plan`.

Shared here: the input options (--input / --dataset ...) and the error convention: bad input
is one line `error: ...` on stderr and exit code 2, before any heavy work, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
import threading

from ..data.text_sources import supported_extensions
from ..errors import EXIT_BAD_INPUT, DataError, UsageError


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        # instead of usage + message + SystemExit: one line, and main() returns 2 like for any bad input
        raise DataError(f"{message} (see {self.prog} --help)")


def byte_size(text: str) -> int:
    """'1000', '64M', '2G' (powers of 1024, optional B) -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1000000, 64M, 2G)")
    return int(m.group(1)) * 1024 ** ("KMGT".find(m.group(2).upper()) + 1) if m.group(2) else int(m.group(1))


def add_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input (exactly one of --input and --dataset)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", metavar="FILE",
                     help=f"local files or directories of them ({supported_extensions()}; .json/.jsonl: one "
                          f"object per line; .txt: documents separated by blank lines)")
    src.add_argument("--dataset", metavar="NAME",
                     help="a Hugging Face dataset: Hub id (e.g. EleutherAI/pile) or a local dataset directory")
    g.add_argument("--config", default=None, help="dataset config name (--dataset only)")
    g.add_argument("--split", default=None, help="dataset split (--dataset only; default train)")
    g.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it first")
    g.add_argument("--text-field", default="text", help="field / column holding the text (default: text)")
    g.add_argument("--max-docs", type=int, default=None, metavar="N", help="stop after N documents")
    g.add_argument("--max-bytes", type=byte_size, default=None, metavar="SIZE",
                   help="stop once SIZE bytes of text were read (e.g. 2G), e.g. to train a tokenizer on a sample")


def source_kwargs(args: argparse.Namespace) -> dict:
    if args.input and args.split is not None:
        raise DataError("--split applies to --dataset only; drop it for --input files")
    return {"inputs": args.input, "dataset": args.dataset, "config": args.config, "split": args.split or "train",
            "text_field": args.text_field, "streaming": args.streaming, "max_docs": args.max_docs,
            "max_bytes": args.max_bytes}


def run_cli(body, argv, prog: str | None = None) -> int:
    """Runs body(argv), turning UsageError into `error: ...` (`PROG: error: ...` given a prog)
    + exit 2 and Ctrl-C / SIGTERM into a clean exit (partial outputs are removed by the code
    that writes them)."""
    with _sigterm_as_exit():
        try:
            return body(argv)
        except UsageError as e:
            print(f"{prog + ': ' if prog else ''}error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


@contextlib.contextmanager
def _sigterm_as_exit():
    if threading.current_thread() is not threading.main_thread():  # signals are the main thread's
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
