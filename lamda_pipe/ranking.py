"""LaMDA's generate-then-rank decoding (paper, section 6.1): the model judges its own candidates.

    judged = generate_and_rank(wrapper, prompt, 64, 16, tokens, ("sensible", "specific", "interesting", "safe"))

1. Sample N candidates of one prompt with top-k (k = 40) in one batch (decode, KV cache).
2. Score every candidate on the model's attributes: P(attribute) is read from the logits at an
   ``<|attribute|>`` token placed right after the candidate's ``<|endoftext|>`` (data/dialog.py's
   discriminative layout), renormalised over {<|yes|>, <|no|>}. A candidate cut at the token
   budget gets the ``<|endoftext|>`` it lacks, so every scored sequence has the layout the
   discriminators were trained on.
3. rank: drop candidates whose P(safe) is below the safety threshold, rank the rest by
   3 * P(sensible) + P(specific) + P(interesting) (dialog.SSI_WEIGHTS).

Scoring reuses decode's KV cache (score_cached): it holds the prompt and the candidate of every
row, so an attribute costs one position per candidate, not a forward over the whole context.
Rows end at different steps and the model has no per-row positions under a cache (its query is
always the last key; document masks are refused with a cache), so rows are grouped by length:
a group's cache is cut right after its own ``<|endoftext|>``. Keys are causal, so what decode
fed after a row's eos (padding) only ever sits past that cut and never reaches a score.

Which attributes a model has is its run record's (export config's) ``dialog`` entry, read by
export.dialog_at. A subset ranks by what it has: without ``safe`` nothing is filtered; without any
of sensible, specific, interesting the order is mean log-likelihood per token (sample_and_rank's
score); with neither, this is plain sample-and-rank.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .data.dialog import SSI_WEIGHTS, DialogTokens
from .generation import AutoregressiveWrapper, Decoded

# The discriminator's own decision boundary: P(yes) >= P(no). The paper filters "below a
# threshold" without giving its value.
SAFETY_THRESHOLD = 0.5


class Ranking(NamedTuple):
    best: int  # the chosen row
    scores: torch.Tensor  # (N,) SSI score (or mean log-prob without SSI attributes)
    passed: torch.Tensor  # (N,) bool: kept by the safety filter (all True without "safe")
    note: str | None  # why the choice is not the formula's: every candidate was filtered


class Judged(NamedTuple):
    tokens: torch.Tensor  # (L,) the chosen candidate as decoded, its eos included, no padding
    best: int
    attributes: tuple[str, ...]
    probs: torch.Tensor  # (N, A) P(attribute) of every candidate, columns in `attributes` order
    scores: torch.Tensor  # (N,)
    passed: torch.Tensor  # (N,) bool
    mean_logprobs: torch.Tensor  # (N,) mean log-prob per generated token (sample_and_rank's score)
    note: str | None
    candidates: Decoded


def candidate_rows(d: Decoded, eot: int) -> list[list[int]]:
    """Each candidate as it is scored: its tokens up to and including its eos; a row cut at the
    budget gets the eos appended."""
    rows = []
    for i in range(d.tokens.shape[0]):
        row = d.tokens[i, :int(d.lengths[i])].tolist()
        rows.append(row if row and row[-1] == eot else row + [eot])
    return rows


def _check_attributes(tokens: DialogTokens, attributes: Sequence[str]) -> torch.Tensor:
    unknown = [a for a in attributes if a not in tokens.attributes]
    if unknown:
        raise ValueError(f"attributes {unknown} have no token; known: {sorted(tokens.attributes)}")
    return torch.tensor([tokens.attributes[a] for a in attributes], dtype=torch.long)


def _yes_probability(logits: torch.Tensor, tokens: DialogTokens) -> torch.Tensor:
    """(R, V) logits at attribute positions -> (R,) P(yes) renormalised over {yes, no}, fp32."""
    return torch.softmax(logits.float()[:, [tokens.yes, tokens.no]], dim=-1)[:, 0]


@torch.no_grad()
def score_cached(net, caches: list[dict], prompt_len: int, rows: list[list[int]], tokens: DialogTokens,
                 attributes: Sequence[str]) -> torch.Tensor:
    """(N, A) P(attribute) of every row, from decode's cache (cache_out) over prompt + rows.

    The cache layout is attention.py's: per block {"k", "v"} of shape (N, heads, positions, dim).
    The caller's cache is left as it was (new positions go into copies of its dicts).
    """
    attr_ids = _check_attributes(tokens, attributes)
    n, a = len(rows), len(attr_ids)
    device = caches[0]["k"].device
    if n == 0 or a == 0:
        return torch.zeros(n, a, device=device)
    was_training = net.training
    net.eval()
    try:
        caches = [dict(c) for c in caches]
        longest = max(len(r) for r in rows)
        fed = caches[0]["k"].shape[2] - prompt_len  # candidate positions the cache already holds
        if longest > fed:  # decode never fed its last token, and cut rows lack their eos
            grid = torch.tensor([r + [tokens.eot] * (longest - len(r)) for r in rows], device=device)
            net(grid[:, fed:], kv_caches=caches)  # one call for every row; its logits are not needed
        probs = torch.empty(n, a, device=device)
        attr_ids = attr_ids.to(device)
        for length in sorted({len(r) for r in rows}):
            idx = torch.tensor([i for i, r in enumerate(rows) if len(r) == length], device=device)
            end = prompt_len + length  # the cut: right after this group's own eos
            group = [{"k": c["k"][idx, :, :end].repeat_interleave(a, dim=0),
                      "v": c["v"][idx, :, :end].repeat_interleave(a, dim=0)} for c in caches]
            step = attr_ids.repeat(len(idx))[:, None]  # (G * A, 1): row g's attributes in order
            probs[idx] = _yes_probability(net(step, kv_caches=group)[:, -1], tokens).view(len(idx), a)
    finally:
        net.train(was_training)
    return probs


@torch.no_grad()
def score_uncached(net, prompt: torch.Tensor, rows: list[list[int]], tokens: DialogTokens,
                   attributes: Sequence[str], max_seq_len: int | None = None) -> torch.Tensor:
    """(N, A) P(attribute), each from a forward over prompt + row + <|attribute|> from scratch
    (the last max_seq_len tokens, as decoding sees them past its window). The fallback where
    decode kept no cache, and the reference the cached scores are measured against."""
    attr_ids = _check_attributes(tokens, attributes).to(prompt.device)
    a = len(attr_ids)
    probs = torch.zeros(len(rows), a, device=prompt.device)
    if a == 0:
        return probs
    was_training = net.training
    net.eval()
    try:
        for i, row in enumerate(rows):
            body = torch.cat([prompt, torch.tensor(row, dtype=torch.long, device=prompt.device)])
            seqs = torch.cat([body[None].expand(a, -1), attr_ids[:, None]], dim=1)
            if max_seq_len is not None:
                seqs = seqs[:, -max_seq_len:]
            probs[i] = _yes_probability(net(seqs)[:, -1], tokens)
    finally:
        net.train(was_training)
    return probs


def rank(probs: torch.Tensor, attributes: Sequence[str], safety_threshold: float = SAFETY_THRESHOLD,
         fallback_scores: torch.Tensor | None = None) -> Ranking:
    """The paper's choice among candidates with probs (N, A) over `attributes`: P(safe) below
    safety_threshold is filtered, the rest ranked by the SSI_WEIGHTS sum over the attributes
    present (fallback_scores, e.g. mean log-likelihood, when none is). When every candidate is
    filtered the safest one is chosen and `note` says so. Ties go to the lower row."""
    attributes = list(attributes)
    ssi = [x for x in SSI_WEIGHTS if x in attributes]
    if ssi:
        scores = sum(SSI_WEIGHTS[x] * probs[:, attributes.index(x)].float() for x in ssi)
    elif fallback_scores is not None:
        scores = fallback_scores.float()
    else:
        raise ValueError(f"none of {', '.join(SSI_WEIGHTS)} among the attributes {attributes}: "
                         f"pass fallback_scores to rank by")
    if "safe" not in attributes:
        return Ranking(int(scores.argmax()), scores, torch.ones_like(scores, dtype=torch.bool), None)
    safe = probs[:, attributes.index("safe")].float()
    passed = safe >= safety_threshold
    if passed.any():
        return Ranking(int(scores.masked_fill(~passed, float("-inf")).argmax()), scores, passed, None)
    best = int(safe.argmax())
    note = (f"every candidate has P(safe) below the safety threshold {safety_threshold:g} (highest "
            f"{float(safe[best]):.3f}): chose the safest, candidate {best}")
    return Ranking(best, scores, passed, note)


@torch.no_grad()
def generate_and_rank(wrapper: AutoregressiveWrapper, prompt: torch.Tensor, seq_len: int, num_candidates: int,
                      tokens: DialogTokens, attributes: Sequence[str], top_k: int = 40, temperature: float = 1.0,
                      safety_threshold: float = SAFETY_THRESHOLD, *, use_cache: bool = True,
                      generator: torch.Generator | None = None) -> Judged:
    """Samples num_candidates continuations of prompt (T,) stopping at tokens.eot, scores them on
    `attributes` and returns the one rank() picks, with every candidate's probabilities.

    The draws are sample_and_rank's for the same generator: only the choice differs. Scoring
    uses decode's cache when the scored sequences fit the model's window (prompt + candidate +
    its eos + the attribute token <= max_seq_len); otherwise it recomputes each candidate."""
    if prompt.dim() != 1 or num_candidates < 1 or seq_len < 1:
        raise ValueError("generate_and_rank takes one prompt (T,), num_candidates >= 1 and seq_len >= 1")
    attributes = tuple(attributes)
    caches: list[dict] = []
    d = wrapper.decode(prompt[None].expand(num_candidates, -1), seq_len, top_k, temperature, tokens.eot,
                       use_cache=use_cache, generator=generator, cache_out=caches)
    rows = candidate_rows(d, tokens.eot)
    mean_logprobs = d.logprobs.sum(dim=1) / d.lengths
    if caches and len(prompt) + max(len(r) for r in rows) + 1 <= wrapper.max_seq_len:
        probs = score_cached(wrapper.net, caches, len(prompt), rows, tokens, attributes)
    else:
        probs = score_uncached(wrapper.net, prompt, rows, tokens, attributes, wrapper.max_seq_len)
    del caches
    r = rank(probs, attributes, safety_threshold, fallback_scores=mean_logprobs)
    return Judged(d.tokens[r.best, :int(d.lengths[r.best])], r.best, attributes, probs, r.scores, r.passed,
                  mean_logprobs, r.note, d)
