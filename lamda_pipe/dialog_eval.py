"""How a dialog model does on held-out dialogs: its discriminators and its responses.

* Discriminators: every rated candidate (a response or an alternative) of the dialogs is scored
  as decoding scores it (ranking.score_uncached: P(attribute) at the ``<|attribute|>`` position
  after the candidate and its ``<|endoftext|>``) and compared with its rating: accuracy at the
  yes/no boundary (P >= 0.5) and ROC AUC (the probability that a candidate rated 1 scores above
  one rated 0, ties counting one half), per attribute.
* Responses: the last turn of each dialog is the reference; the model answers the turns before
  it and the answer counts when its text equals the reference exactly (surrounding spaces
  ignored). Three ways to answer: ``greedy`` (top-k 1), ``sample`` (one top-k draw) and ``rank``
  (LaMDA's generate-then-rank over N top-k candidates, ranking.generate_and_rank; a model without
  discriminators ranks by mean log-likelihood).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .data.dialog import DialogTokens, _text, encode_prompt, fit_prompt
from .generation import AutoregressiveWrapper
from .ranking import generate_and_rank, score_uncached

MODES = ("greedy", "sample", "rank")


class AttributeResult(NamedTuple):
    rated: int  # candidates rated on this attribute
    positive: int  # of them rated 1
    accuracy: float
    auc: float | None  # None when every rating is the same


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Mann-Whitney: the share of (rated 1, rated 0) pairs the scores order right, ties 1/2."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    s = torch.tensor(scores, dtype=torch.float64)
    ranks = torch.empty_like(s)
    order = torch.argsort(s, stable=True)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    for value in torch.unique(s):  # tied scores share their mean rank
        tied = s == value
        ranks[tied] = ranks[tied].mean()
    rank_sum = float(ranks[torch.tensor([bool(y) for y in labels])].sum())
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


@torch.no_grad()
def discriminator_metrics(model, tok, tokens: DialogTokens, dialogs, attributes: Sequence[str],
                          max_seq_len: int) -> dict[str, AttributeResult]:
    """Per attribute of `attributes`: how the model's P(attribute) agrees with the ratings of
    every rated candidate in `dialogs` (data/dialog.py Dialog objects)."""
    device = next(model.parameters()).device
    scored: dict[str, list[tuple[float, int]]] = {a: [] for a in attributes}
    for dialog in dialogs:
        for i, cand in dialog.candidates:
            rated = [a for a in attributes if a in cand.ratings]
            if not rated:
                continue
            prompt = torch.tensor(encode_prompt(tok, tokens, dialog.turns[:i]), dtype=torch.long, device=device)
            row = _text(tok, cand.text) + [tokens.eot]
            probs = score_uncached(model, prompt, [row], tokens, rated, max_seq_len)[0]
            for a, p in zip(rated, probs.tolist()):
                scored[a].append((p, cand.ratings[a]))
    out = {}
    for a, pairs in scored.items():
        if pairs:
            ps, ys = [p for p, _ in pairs], [y for _, y in pairs]
            out[a] = AttributeResult(len(pairs), sum(ys), sum((p >= 0.5) == bool(y) for p, y in pairs) / len(pairs),
                                     roc_auc(ps, ys))
    return out


@torch.no_grad()
def answer(wrapper: AutoregressiveWrapper, tok, tokens: DialogTokens, attributes: Sequence[str],
           turns: Sequence[tuple[str, str]], mode: str, *, num_candidates: int = 16, max_new_tokens: int = 32,
           top_k: int = 40, generator: torch.Generator | None = None) -> str:
    """The model's response to `turns` (the conversation so far) by one of MODES."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    budget = wrapper.max_seq_len - max_new_tokens - 2  # room for the response, its eos, an attribute
    device = next(wrapper.net.parameters()).device
    prompt = torch.tensor(fit_prompt(turns, tok, tokens, budget), dtype=torch.long, device=device)
    if mode == "rank":
        judged = generate_and_rank(wrapper, prompt, max_new_tokens, num_candidates, tokens, attributes, top_k,
                                   generator=generator)
        return response_text(tok, judged.tokens.tolist(), tokens.eot)
    d = wrapper.decode(prompt[None], max_new_tokens, 1 if mode == "greedy" else top_k, 1.0, tokens.eot,
                       generator=generator)
    return response_text(tok, d.tokens[0, :int(d.lengths[0])].tolist(), tokens.eot)


def response_text(tok, ids: list[int], eot: int) -> str:
    return tok.decode(ids[:ids.index(eot)] if eot in ids else ids)


def exact_match(wrapper: AutoregressiveWrapper, tok, tokens: DialogTokens, attributes: Sequence[str], dialogs,
                mode: str, **kwargs) -> tuple[int, int]:
    """(right, total): answers to each dialog's turns but the last that equal the last turn's text."""
    right = 0
    for dialog in dialogs:
        said = answer(wrapper, tok, tokens, attributes, dialog.turns[:-1], mode, **kwargs)
        right += said.strip() == dialog.turns[-1][1].strip()
    return right, len(dialogs)
