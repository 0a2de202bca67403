"""lamda-eval-dialog: a dialog model on held-out dialogs — its discriminators and its answers.

    lamda-eval-dialog --model runs/chat --dialogs heldout.jsonl
    lamda-eval-dialog --model exports/chat --dialogs heldout.jsonl --modes greedy,rank --json eval.json

Per attribute the model rates: accuracy and ROC AUC of P(attribute) against every rated
candidate's rating. Then exact match of the last turn of each dialog, answered from the turns
before it, by each of --modes: greedy, sample (one top-k draw), rank (LaMDA's generate-then-rank
over --num-candidates; lamda_pipe/dialog_eval.py). The dialog file is the format of
lamda-prepare-data --format dialog; give dialogs the model was not trained on.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..data.text_sources import DataError
from . import ArgumentParser, run_cli
from .generate import add_model_args, open_dialog, open_model, open_source


def parse_args(argv):
    from ..dialog_eval import MODES

    p = ArgumentParser(prog="lamda-eval-dialog", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--dialogs", type=Path, required=True, metavar="FILE",
                   help="held-out dialogs (JSON lines, the dialog file format); the last turn of each is the "
                        "reference answer")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"how to answer, comma-separated among {', '.join(MODES)} (default: all)")
    p.add_argument("--num-candidates", type=int, default=16, help="candidates of the rank mode (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer at most (default 32)")
    p.add_argument("--top-k", type=int, default=40, help="top-k of sample and rank (default 40)")
    p.add_argument("--limit", type=int, default=None, help="use the first N dialogs only")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling modes (default 0)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results here")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        raise DataError(f"--modes {','.join(bad) or '(empty)'}: choose among {', '.join(MODES)}")
    for flag, value in (("--num-candidates", args.num_candidates), ("--max-new-tokens", args.max_new_tokens),
                        ("--top-k", args.top_k), ("--limit", 1 if args.limit is None else args.limit)):
        if value < 1:
            raise DataError(f"{flag} must be >= 1, got {value}")
    return args


def _run(argv) -> int:
    import torch

    from ..data.dialog import read_dialogs
    from ..dialog_eval import discriminator_metrics, exact_match
    from ..generation import AutoregressiveWrapper

    args = parse_args(argv)
    dialogs = read_dialogs(args.dialogs)[:args.limit]  # checked before the model is read
    src = open_source(args)
    dialog = open_dialog(src)
    if dialog is None:
        raise DataError(f"--model {args.model}: its tokenizer has no dialog tokens, so it cannot be evaluated on "
                        f"dialogs; use a model trained with a tokenizer from lamda-train-tokenizer")
    model = open_model(src, args.attention)
    results = {"model": str(src.source.path), "step": src.step, "dialogs": len(dialogs),
               "attributes": {}, "exact_match": {}}
    if dialog.attributes:
        for a, r in discriminator_metrics(model, src.tok, dialog.tokens, dialogs, dialog.attributes,
                                          src.cfg.max_seq_len).items():
            results["attributes"][a] = r._asdict()
            auc = "n/a (one rating only)" if r.auc is None else f"{r.auc:.3f}"
            print(f"{a:<12} {r.rated:5d} rated ({r.positive} yes): accuracy {r.accuracy:.3f}, AUC {auc}")
    else:
        print("the model has no discriminators (not fine-tuned on rated dialogs): attributes not evaluated")
    wrapper = AutoregressiveWrapper(model, max_seq_len=src.cfg.max_seq_len, pad_value=dialog.tokens.eot)
    for mode in args.modes:
        start = time.perf_counter()
        generator = torch.Generator(device=src.device).manual_seed(args.seed)
        right, total = exact_match(wrapper, src.tok, dialog.tokens, dialog.attributes, dialogs, mode,
                                   num_candidates=args.num_candidates, max_new_tokens=args.max_new_tokens,
                                   top_k=args.top_k, generator=generator)
        results["exact_match"][mode] = {"right": right, "total": total, "accuracy": right / total}
        print(f"exact match, {mode:<6}: {right}/{total} = {right / total:.3f} ({time.perf_counter() - start:.1f}s)")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def main(argv=None) -> int:
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
