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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
