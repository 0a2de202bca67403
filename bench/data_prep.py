#!/usr/bin/env python
"""Data-preparation throughput: prepare_data (pool of worker processes, token files written) against
raw Tokenizer.encode_batch (Rust threads, all cores, results left in memory) on the same text.

The text is the bundled corpus repeated to --mb megabytes; the tokenizer is trained on the corpus
with --vocab-size (or as many tokens as it reaches). Variants run interleaved, the order reversed
every round; reported times are medians. Tokens counted are the documents' tokens, without the
end-of-text ids prepare_data adds, so both sides count the same thing.

    .venv/bin/python bench/data_prep.py                      # ~10 MB, 5 rounds
    .venv/bin/python bench/data_prep.py --mb 20 --repeats 7 --json /tmp/data_prep.json
    .venv/bin/python bench/data_prep.py --workers 1 2 4      # how one machine scales with workers

The rate of a Slurm array of `--shard` tasks: bench/data_prep_slurm.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # explicit: no fork warning after raw runs

import tokenizers  # noqa: E402

from lamda_pipe.data.prepare import prepare_data, usable_cores  # noqa: E402
from lamda_pipe.data.text_sources import iter_documents  # noqa: E402
from lamda_pipe.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=10.0, help="megabytes of text (bundled corpus repeated)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per variant")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="prepare_data worker counts, one pair of variants each (default: all cores)")
    p.add_argument("--batch-docs", type=int, default=1000)
    p.add_argument("--json", type=Path, default=None, help="write the results to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    worker_counts = args.workers or [usable_cores()]
    # Imported here, not at the top: prepare_data's spawned workers re-import this script, and
    # lamda_pipe.data brings in torch (~2-4 s per worker, which would be timed as prepare_data's).
    from lamda_pipe.data.loader import bundled_corpus

    corpus = list(iter_documents([str(p) for p in bundled_corpus()]))
    reps = max(1, round(args.mb * 1e6 / sum(len(d.encode()) for d in corpus)))
    docs = corpus * reps
    text_bytes = sum(len(d.encode()) for d in docs)
    work = Path(tempfile.mkdtemp(prefix="bench-data-prep-"))
    try:
        tok_path = work / "tokenizer.json"
        train_tokenizer(corpus, args.vocab_size).save(str(tok_path))
        tok = load_tokenizer(tok_path)
        txt = work / "corpus.txt"
        txt.write_text("\n\n".join(docs), encoding="utf-8")

        def raw():
            return sum(len(e.ids) for e in tok.encode_batch(docs))

        def raw_fast():  # what prepare_data calls: the same ids, no offsets
            return sum(len(e.ids) for e in tok.encode_batch_fast(docs))

        def prepared(source, workers, threads=True):
            def run():
                # workers=1 encodes in this process, where encode_batch_fast runs on the tokenizer's
                # own threads (all cores) unless its parallelism is off; pool workers turn it off.
                os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads else "false"
                meta = prepare_data(source(), tok_path, work / "out", workers=workers, force=True,
                                    batch_docs=args.batch_docs, progress=False)
                s = meta["splits"]
                return s["train"]["tokens"] + s["val"]["tokens"] - s["train"]["documents"] - s["val"]["documents"]
            return run

        variants = {
            "raw encode_batch": raw,
            "raw encode_batch_fast": raw_fast,
        }
        for w in worker_counts:
            variants[f"prepare_data, {w} workers"] = prepared(lambda: docs, w)
            variants[f"prepare_data, {w} workers, from .txt"] = prepared(lambda: iter_documents([str(txt)]), w)
            if w == 1:
                variants["prepare_data, 1 worker, 1 thread, from .txt"] = prepared(
                    lambda: iter_documents([str(txt)]), 1, threads=False)
        times = {name: [] for name in variants}
        tokens = {}
        for name, fn in variants.items():  # warm-up: page cache, tokenizer caches, lazy imports
            tokens[name] = fn()
        if len(set(tokens.values())) != 1:
            raise SystemExit(f"token counts differ: {tokens}")
        for r in range(args.repeats):
            for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
                t = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - t)
                os.environ["TOKENIZERS_PARALLELISM"] = "true"
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n_tokens = next(iter(tokens.values()))
    base = statistics.median(times["raw encode_batch"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": name, "median_s": med, "min_s": min(ts), "max_s": max(ts),
                     "tokens_per_s": n_tokens / med, "vs_raw": base / med})
    info = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
            "tokenizers": tokenizers.__version__, "cores": usable_cores(), "workers": worker_counts,
            "text_mb": text_bytes / 1e6, "documents": len(docs), "tokens": n_tokens,
            "vocab_size": tok.get_vocab_size(), "repeats": args.repeats, "batch_docs": args.batch_docs}
    print(f"{info['date']}, {platform.node()}, {info['text_mb']:.1f} MB, {len(docs):,} documents, {n_tokens:,} "
          f"tokens, vocab {info['vocab_size']}, {info['cores']} cores, load average {os.getloadavg()[0]:.2f}, "
          f"tokenizers {info['tokenizers']}, medians of {args.repeats}")
    print(f"{'variant':<46} {'s (min-max)':>20} {'tokens/s':>12} {'vs raw':>7}")
    for row in rows:
        spread = f"{row['median_s']:.2f} ({row['min_s']:.2f}-{row['max_s']:.2f})"
        print(f"{row['variant']:<46} {spread:>20} {row['tokens_per_s']:>12,.0f} {row['vs_raw']:>6.0%}")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
