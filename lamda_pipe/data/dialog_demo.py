"""A demo dialog corpus whose right answers can be checked by exact match.

    python scripts/make_dialog_demo.py --out data/dialogs.jsonl --dialogs 2000 --seed 0
    lamda-prepare-data --format dialog --input data/dialogs.jsonl --tokenizer tokenizer.json --out data/dialogs
    python scripts/make_dialog_demo.py --prepare runs/dialogs --tokenizer runs/demo/data/tokenizer.json  # both

Each dialog (a line of the dialog file format, data/dialog.py) is between "User" and "Bot":

1. the user states one to three facts about themselves, each acknowledged by the bot: a name
   ("My name is Noah." -> "Nice to meet you, Noah."), a favourite colour, a pet, a home;
2. sometimes a sum or difference of one-digit numbers ("What is 3 plus 4?" -> "3 plus 4 is 7."),
   sometimes with a follow-up on the previous answer ("And plus 2?" -> "7 plus 2 is 9.");
3. a question about a stated fact ("What is my name?" -> "Your name is Noah.") or a sum, maybe
   followed by "And my pet?" for a second fact. The last turn of every dialog is the correct
   answer to the question before it: `evaluation_pairs` returns (prompt turns, that answer).

Ratings: acknowledgements are unrated (generative examples only). Every answer to a question
is a correct response, rated sensible 1, specific 1, safe 1 and interesting 1 exactly when
answering needs an earlier exchange (a fact the user stated before, or the previous answer of a
follow-up); a first sum is interesting 0 and carries "generate": true, so the generator still
learns it. Every answer also has one rated alternative (discriminative only: it has a 0 rating),
one of: a wrong answer (sensible 0, specific 0, interesting 0, safe 1), a generic "I am not
sure." (1, 0, 0, 1), an off-topic remark (0, 0, 0, 1), the right answer with an insult
(1, 1, 0, safe 0). So every attribute is rated both 0 and 1, and the rule is the same everywhere.

Deterministic: dialog i depends only on (seed, i), so the first n dialogs of a larger corpus
are the corpus of n. The words are few and regular (a 0.4M-parameter model can learn them) and
chosen to be short in the demo tokenizer (trained on the bundled Bible corpus): a dialog's
longest example is under 128 tokens there.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Iterable

USER, BOT = "User", "Bot"
NAMES = ("Adam", "Noah", "Sarah", "Isaac", "Jacob", "Esau", "Leah", "Rachel", "Joseph", "Boaz", "Job", "Esther",
         "Abraham", "Laban", "Benjamin", "Judah")
COLOURS = ("red", "blue", "green", "white", "black", "brown")
PETS = ("dog", "horse", "goat", "sheep", "ox", "cat", "camel", "dove")
PLACES = ("Egypt", "Moab", "Canaan", "Sodom", "Bethel", "Edom", "Eden", "Haran")
GENERIC = ("I am not sure.", "I do not know.")
OFF_TOPIC = ("I like to walk in the field.", "The sun is warm today.", "Let us sing a song.")
INSULT = ", you fool."
MAX_EXCHANGES = 5  # user turn + bot turn pairs: keeps a dialog's examples within 128 demo tokens

# fact kind -> (values, statement, acknowledgement, question, follow-up question, answer)
FACTS = {
    "name": (NAMES, "My name is {}.", "Nice to meet you, {}.", "What is my name?", "And my name?",
             "Your name is {}."),
    "colour": (COLOURS, "My favourite colour is {}.", "I like {} too.", "What is my favourite colour?",
               "And my colour?", "Your favourite colour is {}."),
    "pet": (PETS, "I have a {}.", "I like your {}.", "What pet do I have?", "And my pet?", "You have a {}."),
    "place": (PLACES, "I live in {}.", "{} is a fine place.", "Where do I live?", "And where do I live?",
              "You live in {}."),
}
GOOD = {"sensible": 1, "specific": 1, "interesting": 1, "safe": 1}
ALTERNATIVE_RATINGS = {
    "wrong": {"sensible": 0, "specific": 0, "interesting": 0, "safe": 1},
    "generic": {"sensible": 1, "specific": 0, "interesting": 0, "safe": 1},
    "off_topic": {"sensible": 0, "specific": 0, "interesting": 0, "safe": 1},
    "rude": {"sensible": 1, "specific": 1, "interesting": 0, "safe": 0},
}


def _bot(text: str, interesting: bool, alternatives: list | None = None) -> dict:
    turn = {"speaker": BOT, "text": text, "ratings": {**GOOD, "interesting": int(interesting)}}
    if not interesting:
        turn["generate"] = True  # a correct response; only its interesting rating is 0
    if alternatives:
        turn["alternatives"] = alternatives
    return turn


def _alternative(rng: random.Random, answer: str, wrong: str) -> list[dict]:
    kind = rng.choice(sorted(ALTERNATIVE_RATINGS))
    text = {"wrong": wrong, "generic": rng.choice(GENERIC), "off_topic": rng.choice(OFF_TOPIC),
            "rude": answer.rstrip(".") + INSULT}[kind]
    return [{"text": text, "ratings": dict(ALTERNATIVE_RATINGS[kind])}]


def _sum(rng: random.Random, a: int | None = None) -> tuple[str, int, int, int]:
    """(op, a, b, result): b has one digit, the result is never negative."""
    a = rng.randint(1, 9) if a is None else a
    if rng.random() < 0.5 or a == 0:
        b = rng.randint(1, 9)
        return "plus", a, b, a + b
    b = rng.randint(1, min(a, 9))
    return "minus", a, b, a - b


def _wrong_number(rng: random.Random, right: int) -> int:
    return right + rng.choice([d for d in (-2, -1, 1, 2) if right + d >= 0])


def _arithmetic(rng: random.Random, turns: list, follow_up: bool) -> None:
    op, a, b, r = _sum(rng)
    answer = f"{a} {op} {b} is {r}."
    turns += [{"speaker": USER, "text": f"What is {a} {op} {b}?"},
              _bot(answer, False, _alternative(rng, answer, f"{a} {op} {b} is {_wrong_number(rng, r)}."))]
    if follow_up and rng.random() < 0.5:  # a question that only makes sense with the previous answer
        op, _, c, t = _sum(rng, r)
        answer = f"{r} {op} {c} is {t}."
        turns += [{"speaker": USER, "text": f"And {op} {c}?"},
                  _bot(answer, True, _alternative(rng, answer, f"{r} {op} {c} is {_wrong_number(rng, t)}."))]


def make_dialog(seed: int, index: int) -> dict:
    """Dialog `index` of the corpus of `seed`, as a JSON-ready dict of the dialog file format."""
    rng = random.Random(seed * 1_000_003 + index)
    kinds = rng.sample(sorted(FACTS), rng.randint(1, 3))
    facts = {k: rng.choice(FACTS[k][0]) for k in kinds}
    turns: list = []
    for k in kinds:
        _, statement, ack, *_ = FACTS[k]
        turns += [{"speaker": USER, "text": statement.format(facts[k])},
                  {"speaker": BOT, "text": ack.format(facts[k])}]  # unrated: generative only
    ends_on_sum = rng.random() < 0.25
    if ends_on_sum or (len(kinds) < 3 and rng.random() < 0.5):  # at most 5 exchanges: under 128 tokens
        _arithmetic(rng, turns, follow_up=len(kinds) == 1 or (ends_on_sum and len(kinds) == 2))
    if ends_on_sum:
        return {"turns": turns, "responder": BOT}
    asked = rng.sample(kinds, min(len(kinds), rng.randint(1, 2), MAX_EXCHANGES - len(turns) // 2))
    for n, k in enumerate(asked):
        values, _, _, question, follow_up, answer = FACTS[k]
        right = answer.format(facts[k])
        wrong = answer.format(rng.choice([v for v in values if v != facts[k]]))
        turns += [{"speaker": USER, "text": follow_up if n else question},
                  _bot(right, True, _alternative(rng, right, wrong))]
    return {"turns": turns, "responder": BOT}


def make_dialogs(n: int, seed: int = 0) -> list[dict]:
    return [make_dialog(seed, i) for i in range(n)]


def evaluation_pairs(dialogs: Iterable[dict]) -> list[tuple[list[tuple[str, str]], str]]:
    """(prompt turns as (speaker, text), the expected response) per dialog: every turn before the
    last, and the last turn's text, the correct answer to compare by exact match. Feed the
    prompt to dialog.encode_prompt / fit_prompt; take held-out dialogs with
    prepare_dialog.val_dialogs (the split of the prepared dir)."""
    return [([(t["speaker"], t["text"]) for t in d["turns"][:-1]], d["turns"][-1]["text"]) for d in dialogs]


def write_dialogs(path: str | Path, n: int, seed: int = 0, force: bool = False) -> Path:
    """Writes make_dialogs(n, seed) as JSON lines; an existing file is kept unless force."""
    from ..errors import DataError

    path = Path(path)
    if n < 1:
        raise DataError(f"--dialogs must be >= 1, got {n}")
    if path.exists() and (path.is_dir() or not force):
        raise DataError(f"--out {path} already exists; " + ("pick a file name" if path.is_dir() else
                                                             "pass --force to replace it, or pick another --out"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for d in make_dialogs(n, seed):
                f.write(json.dumps(d) + "\n")
        os.replace(tmp, path)  # whole or not at all: a half-written corpus would prepare without a word
    finally:
        tmp.unlink(missing_ok=True)
    return path


HELDOUT = 100  # dialogs of the held-out file that --prepare writes


def prepare_demo(out: Path, tokenizer: Path, n: int, seed: int, force: bool = False) -> dict:
    """The fine-tuning demo's data in one dir: OUT/dialogs.jsonl (n dialogs of `seed`),
    OUT/heldout.jsonl (HELDOUT dialogs of seed + 1, for lamda-eval-dialog) and OUT/data, the
    dialogs prepared with `tokenizer` (the pre-trained model's). Returns data's meta.json."""
    from .dialog import read_dialogs
    from .prepare_dialog import prepare_dialog_data

    out = Path(out)
    data = out / "data"
    existing = [p for p in (out / "dialogs.jsonl", out / "heldout.jsonl", data) if p.exists()]
    if existing and not force:
        from ..errors import DataError
        raise DataError(f"--prepare {out} already holds {', '.join(p.name for p in existing)}; pass --force to "
                        f"replace them, or pick another dir")
    write_dialogs(out / "dialogs.jsonl", n, seed, force=True)
    write_dialogs(out / "heldout.jsonl", HELDOUT, seed + 1, force=True)
    return prepare_dialog_data(read_dialogs(out / "dialogs.jsonl"), tokenizer, data, val_fraction=0.05,
                               force=force, source=f"dialog demo, {n} dialogs, seed {seed}", progress=False)


def main(argv=None) -> int:
    from ..errors import DataError
    from ..tools import ArgumentParser, run_cli

    def body(argv) -> int:
        p = ArgumentParser(prog="make_dialog_demo.py", description=__doc__.split("\n\n")[0])
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--out", type=Path, help="the dialog file to write (JSON lines)")
        where.add_argument("--prepare", type=Path, metavar="DIR",
                           help="write DIR/dialogs.jsonl, DIR/heldout.jsonl (100 dialogs of seed + 1) and DIR/data, "
                                "the dialogs prepared with --tokenizer: everything fine-tuning needs")
        p.add_argument("--tokenizer", type=Path, help="with --prepare: the pre-trained model's tokenizer.json")
        p.add_argument("--dialogs", type=int, default=2000, help="how many dialogs (default 2000)")
        p.add_argument("--seed", type=int, default=0, help="which corpus (default 0)")
        p.add_argument("--force", action="store_true", help="replace what --out / --prepare would write")
        args = p.parse_args(argv)
        if args.prepare is None:
            write_dialogs(args.out, args.dialogs, args.seed, args.force)
            print(f"wrote {args.dialogs:,} dialogs (seed {args.seed}) to {args.out}")
            return 0
        if args.tokenizer is None:
            raise DataError("--prepare needs --tokenizer: the tokenizer.json of the model to fine-tune (the demo's "
                            "is runs/demo/data/tokenizer.json)")
        meta = prepare_demo(args.prepare, args.tokenizer, args.dialogs, args.seed, args.force)
        train = meta["splits"]["train"]
        print(f"wrote {args.prepare}: dialogs.jsonl ({args.dialogs:,} dialogs), heldout.jsonl ({HELDOUT}), data/ "
              f"({train['examples']:,} training examples, {train['tokens']:,} tokens)")
        return 0

    return run_cli(body, argv)


if __name__ == "__main__":
    sys.exit(main())
