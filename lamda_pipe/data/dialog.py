"""Dialogs as LaMDA fine-tunes on them (paper, section 6.1): the token layout of an example.

The one place that says how a conversation becomes tokens; training data (prepare), decoding
(generation, lamda-chat) and scoring all call these functions, so they cannot drift apart.

Special tokens (in every tokenizer lamda-train-tokenizer writes, tokenizer.DIALOG_TOKENS):
``<|turn|>`` ends a context turn, ``<|response|>`` is the paper's sentinel between context and
response, ``<|sensible|>`` ``<|specific|>`` ``<|interesting|>`` ``<|safe|>`` name an attribute,
``<|yes|>`` / ``<|no|>`` are the ratings 1 / 0. Special tokens never come out of encoding
text, so a user's words cannot forge a sentinel or a rating.

Layouts (``+`` concatenates; ``text(s)`` is the tokenizer's encoding of the string s):

    context        = text("A: hello") + <|turn|> + text("B: hi there") + <|turn|> + ...
    prompt         = context + <|response|>
    generative     = prompt + text(response) + <|endoftext|>
                     loss on text(response) and <|endoftext|>: the model learns when to stop
    discriminative = prompt + text(response) + <|endoftext|> + <|attribute|> + <|yes|>/<|no|>
                     loss on the rating token only

A candidate produced by decoding ends with <|endoftext|> (or is cut there), so scoring an
attribute is one more position after the candidate: P(attribute) is read from the logits at
the ``<|attribute|>`` position, renormalised over {<|yes|>, <|no|>}.

Each encoded example is (ids, mask): mask[i] = 1 where ids[i] is a training target (the label
the model must predict at position i - 1).

The dialog file (``read_dialogs``; ``lamda-prepare-data --format dialog`` prepares it) is JSON
lines, one dialog per line, blank lines skipped::

    {"turns": [{"speaker": "User", "text": "My name is Ada."},
               {"speaker": "Bot", "text": "Nice to meet you, Ada.",
                "ratings": {"sensible": 1, "specific": 1, "interesting": 0, "safe": 1},
                "generate": true,
                "alternatives": [{"text": "I am not sure.", "ratings": {"specific": 0}}]}],
     "responder": "Bot"}

* ``responder`` (optional): whose turns are responses; default the speaker of the last turn.
  Every responder turn with at least one turn before it is a response, its context all turns
  before it. A dialog needs at least one response.
* a turn: ``speaker`` and ``text``, non-empty strings; a response may also have ``ratings``
  (attribute -> 0 or 1, false / true accepted; attributes: tokenizer.ATTRIBUTES, any subset),
  ``generate`` (true / false) and ``alternatives``: other candidate responses to the same
  context, each ``{"text", "ratings"?, "generate"?}``, that train the model but are not part of
  the conversation that follows.
* each candidate (a response or an alternative) gives one generative example unless a rating of
  it is 0 (the generator learns from good responses only, as the paper filters) or it says
  ``"generate": false``; ``"generate": true`` keeps it whatever its ratings. It gives one
  discriminative example per rating. A candidate that gives no example is refused.
* example order: dialogs in file order; in a dialog, responses in turn order, each response
  before its alternatives; per candidate the generative example, then the discriminative ones
  in ATTRIBUTES order.
* a key that is not one of these is refused with the closest known one (a misspelt "ratings"
  would otherwise train an unrated response); so is a repeated key. Every problem is one
  DataError naming file, line and field, e.g.
  ``dialogs.jsonl:7: turns[2].speaker: missing; every turn needs "speaker" and "text" strings``.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

from ..errors import DataError
from .tokenizer import ATTRIBUTES, ATTRIBUTE_TOKENS, EOT, NO, RESPONSE, TURN, YES

# LaMDA's ranking of candidates (section 6.1): sensible counts three times, safety filters.
SSI_WEIGHTS = {"sensible": 3.0, "specific": 1.0, "interesting": 1.0}


@dataclass(frozen=True)
class DialogTokens:
    """The ids of the dialog tokens in one tokenizer."""

    eot: int
    turn: int
    response: int
    yes: int
    no: int
    attributes: dict  # attribute name -> id of its <|name|> token

    @classmethod
    def of(cls, tok, where: str = "the tokenizer") -> "DialogTokens":
        names = {"eot": EOT, "turn": TURN, "response": RESPONSE, "yes": YES, "no": NO}
        ids = {key: tok.token_to_id(name) for key, name in names.items()}
        attrs = {a: tok.token_to_id(t) for a, t in ATTRIBUTE_TOKENS.items()}
        missing = [names[k] for k, v in ids.items() if v is None] + [ATTRIBUTE_TOKENS[a] for a, v in attrs.items()
                                                                      if v is None]
        if missing:
            raise DataError(f"{where} has no dialog tokens ({', '.join(missing)}): it predates them or comes from "
                            f"elsewhere; train one with lamda-train-tokenizer (every tokenizer it writes has them)")
        return cls(attributes=attrs, **ids)

    def to_dict(self) -> dict:
        return {"eot": self.eot, "turn": self.turn, "response": self.response, "yes": self.yes, "no": self.no,
                "attributes": dict(self.attributes)}

    @classmethod
    def from_dict(cls, d: dict) -> "DialogTokens":
        return cls(eot=d["eot"], turn=d["turn"], response=d["response"], yes=d["yes"], no=d["no"],
                   attributes=dict(d["attributes"]))


def _text(tok, s: str) -> list[int]:
    # encode_special_tokens: "<|yes|>" typed by a user is spelled as characters, not the token
    before = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        return tok.encode(s, add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = before


def encode_turn(tok, speaker: str, text: str) -> list[int]:
    return _text(tok, f"{speaker}: {text}")


def encode_context(tok, ids: DialogTokens, turns: Sequence[tuple[str, str]]) -> list[int]:
    """(speaker, text) turns -> context tokens, each turn ended by <|turn|>."""
    out: list[int] = []
    for speaker, text in turns:
        out += encode_turn(tok, speaker, text) + [ids.turn]
    return out


def encode_prompt(tok, ids: DialogTokens, turns: Sequence[tuple[str, str]]) -> list[int]:
    """What decoding starts from: the context and the sentinel."""
    return encode_context(tok, ids, turns) + [ids.response]


def generative_example(tok, ids: DialogTokens, turns, response: str) -> tuple[list[int], list[int]]:
    prompt = encode_prompt(tok, ids, turns)
    target = _text(tok, response) + [ids.eot]
    return prompt + target, [0] * len(prompt) + [1] * len(target)


def discriminative_example(tok, ids: DialogTokens, turns, response: str, attribute: str,
                           rating: int) -> tuple[list[int], list[int]]:
    if attribute not in ATTRIBUTES:
        raise DataError(f"unknown attribute {attribute!r}; the attributes are {', '.join(ATTRIBUTES)}")
    body = encode_prompt(tok, ids, turns) + _text(tok, response) + [ids.eot, ids.attributes[attribute]]
    return body + [ids.yes if rating else ids.no], [0] * len(body) + [1]


def fit_prompt(prompt_turns: Sequence[tuple[str, str]], tok, ids: DialogTokens, budget: int) -> list[int]:
    """The prompt of the latest turns that fits `budget` tokens: whole turns are dropped from
    the oldest on (a turn cut in the middle would read as another speaker's words); if even the
    newest turn alone is too long, its oldest tokens are cut."""
    turns = list(prompt_turns)
    while turns:
        prompt = encode_prompt(tok, ids, turns)
        if len(prompt) <= budget:
            return prompt
        if len(turns) == 1:
            return prompt[len(prompt) - budget:]
        turns.pop(0)
    return [ids.response][:budget]


# --- the dialog file ------------------------------------------------------------------------------

DIALOG_KEYS = ("turns", "responder")
TURN_KEYS = ("speaker", "text", "ratings", "generate", "alternatives")
ALTERNATIVE_KEYS = ("text", "ratings", "generate")
_TURN_NEEDS = 'every turn needs "speaker" and "text" strings'
_FORMAT = 'a dialog file holds one JSON object per line: {"turns": [{"speaker": ..., "text": ...}, ...]}'


@dataclass(frozen=True)
class Candidate:
    """A response or one of its alternatives: its text, ratings (in ATTRIBUTES order) and
    whether it trains the generator (resolved from "generate" and the ratings)."""

    text: str
    ratings: dict
    generate: bool


@dataclass(frozen=True)
class Dialog:
    turns: tuple  # ((speaker, text), ...): the conversation
    candidates: tuple  # ((turn index, Candidate), ...): every response and alternative, in example order
    where: str  # "file:line", for messages


class Example(NamedTuple):
    ids: list
    mask: list
    attribute: str | None  # None: generative; else the attribute a discriminative example rates


def dialog_examples(tok, ids: DialogTokens, dialog: Dialog) -> list[Example]:
    """The examples of one dialog, in the documented order, through the layouts above."""
    out = []
    for i, c in dialog.candidates:
        context = dialog.turns[:i]
        if c.generate:
            out.append(Example(*generative_example(tok, ids, context, c.text), None))
        for attribute, rating in c.ratings.items():
            out.append(Example(*discriminative_example(tok, ids, context, c.text, attribute, rating), attribute))
    return out


def read_dialogs(path: str | Path) -> list[Dialog]:
    """Every dialog of one file, all checked (DataError naming file, line and field)."""
    from .text_sources import _open_text, _utf8_errors

    path = Path(path)
    dialogs = []
    with _utf8_errors(path), _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                dialogs.append(parse_dialog(_json_object(line, f"{path}:{lineno}"), f"{path}:{lineno}"))
    if not dialogs:
        raise DataError(f"{path}: no dialogs (the file is empty or blank); {_FORMAT}")
    return dialogs


def read_dialog_files(paths: Iterable[str | Path]) -> list[Dialog]:
    """The dialogs of every file, in order; all files are read and checked before this returns."""
    return [d for p in paths for d in read_dialogs(p)]


def iter_dialog_examples(paths: Iterable[str | Path], tok) -> Iterator[tuple[int, Example]]:
    """(dialog index, example) of every file; the files are checked when this is called, before
    the first example is encoded."""
    dialogs = read_dialog_files(paths)
    ids = DialogTokens.of(tok)
    return ((n, e) for n, d in enumerate(dialogs) for e in dialog_examples(tok, ids, d))


def _json_object(line: str, where: str) -> dict:
    def no_repeats(pairs):
        keys = [k for k, _ in pairs]
        for k in keys:
            if keys.count(k) > 1:
                raise DataError(f"{where}: key {k!r} appears twice in one object (JSON would keep only the last); "
                                f"write each key once")
        return dict(pairs)

    try:
        obj = json.loads(line, object_pairs_hook=no_repeats)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); {_FORMAT}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: {_kind(obj)}, not a JSON object; {_FORMAT}")
    return obj


def _kind(value) -> str:
    """What a JSON value is, with its article: "a list", "an object", "null"."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
             dict: "an object"}
    return "null" if value is None else names.get(type(value), f"a {type(value).__name__}")


def _unknown_keys(obj: dict, known: Sequence[str], where: str, prefix: str, what: str) -> None:
    for key in obj:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise DataError(f"{where}: {prefix}{key}: unknown key; {hint}{what} has the keys {', '.join(known)}")


def _string(obj: dict, key: str, where: str, field: str, needs: str) -> str:
    if key not in obj:
        raise DataError(f"{where}: {field}: missing; {needs}")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {field}: {_kind(value)}, not a string; {needs}")
    if not value.strip():
        raise DataError(f"{where}: {field}: empty; {needs} (not empty)")
    return value


def _candidate(obj: dict, where: str, field: str, text: str) -> Candidate:
    ratings = obj.get("ratings", {})
    if not isinstance(ratings, dict):
        raise DataError(f"{where}: {field}.ratings: {_kind(ratings)}, not an object; write ratings as "
                        f'{{"sensible": 1, "safe": 0, ...}}')
    for attribute, value in ratings.items():
        if attribute not in ATTRIBUTES:
            close = difflib.get_close_matches(attribute, ATTRIBUTES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise DataError(f"{where}: {field}.ratings.{attribute}: unknown attribute; {hint}the attributes are "
                            f"{', '.join(ATTRIBUTES)}")
        if not (isinstance(value, bool) or (type(value) is int and value in (0, 1))):
            raise DataError(f"{where}: {field}.ratings.{attribute}: {json.dumps(value)} is not a rating; ratings "
                            f"are 0 or 1 (or false / true)")
    ordered = {a: int(ratings[a]) for a in ATTRIBUTES if a in ratings}
    generate = obj.get("generate")
    if generate is not None and not isinstance(generate, bool):
        raise DataError(f"{where}: {field}.generate: {json.dumps(generate)} is not true or false; leave it out to "
                        f"train the generator on this response unless a rating is 0")
    if generate is None:
        generate = all(ordered.values())
    if not generate and not ordered:
        raise DataError(f'{where}: {field}: "generate": false and no ratings, so it trains nothing; drop '
                        f'"generate": false or add ratings')
    return Candidate(text, ordered, generate)


def parse_dialog(obj: dict, where: str = "dialog") -> Dialog:
    """One dialog object (a line of a dialog file) -> Dialog; DataError naming `where` and the field."""
    _unknown_keys(obj, DIALOG_KEYS, where, "", "a dialog")
    turns = obj.get("turns")
    if not isinstance(turns, list) or not turns:
        problem = "missing" if "turns" not in obj else ("an empty list" if turns == [] else
                                                       f"{_kind(turns)}, not a list")
        raise DataError(f"{where}: turns: {problem}; {_FORMAT}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turns[{i}]: {_kind(turn)}, not an object; {_TURN_NEEDS}")
        _unknown_keys(turn, TURN_KEYS, where, f"turns[{i}].", "a turn")
    pairs = tuple((_string(t, "speaker", where, f"turns[{i}].speaker", _TURN_NEEDS),
                   _string(t, "text", where, f"turns[{i}].text", _TURN_NEEDS)) for i, t in enumerate(turns))
    speakers = list(dict.fromkeys(s for s, _ in pairs))
    if "responder" in obj:
        responder = obj["responder"]
        if not isinstance(responder, str):
            raise DataError(f"{where}: responder: {_kind(responder)}, not a string; name the speaker whose "
                            f"turns are responses, or leave it out (the last turn's speaker)")
        if responder not in speakers:
            close = difflib.get_close_matches(responder, speakers, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise DataError(f"{where}: responder: {responder!r} speaks no turn; {hint}the speakers are "
                            f"{', '.join(speakers)}")
    else:
        responder = pairs[-1][0]
    candidates = []
    for i, turn in enumerate(turns):
        field = f"turns[{i}]"
        if i == 0 or pairs[i][0] != responder:
            extra = [k for k in ("ratings", "generate", "alternatives") if k in turn]
            if extra:
                raise DataError(f"{where}: {field}.{extra[0]}: this turn is not a response (responses are the "
                                f"turns of the responder {responder!r} after the first turn); move it to a "
                                f"response or set \"responder\"")
            continue
        candidates.append((i, _candidate(turn, where, field, pairs[i][1])))
        alternatives = turn.get("alternatives", [])
        if not isinstance(alternatives, list):
            raise DataError(f"{where}: {field}.alternatives: {_kind(alternatives)}, not a list; write "
                            f'[{{"text": ..., "ratings": {{...}}}}, ...]')
        for j, alt in enumerate(alternatives):
            alt_field = f"{field}.alternatives[{j}]"
            needs = 'every alternative needs a "text" string'
            if not isinstance(alt, dict):
                raise DataError(f"{where}: {alt_field}: {_kind(alt)}, not an object; {needs}")
            _unknown_keys(alt, ALTERNATIVE_KEYS, where, f"{alt_field}.", "an alternative")
            candidates.append((i, _candidate(alt, where, alt_field, _string(alt, "text", where, f"{alt_field}.text",
                                                                             needs))))
    if not candidates:
        raise DataError(f"{where}: turns: no response (no turn of the responder {responder!r} has a turn before "
                        f"it); add the context before the responder's turn, or set \"responder\"")
    return Dialog(pairs, tuple(candidates), where)
