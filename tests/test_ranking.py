"""Generate-then-rank (lamda_pipe/ranking.py): attribute scores from decode's KV cache, and the
paper's choice among candidates (CPU, fp32).

Oracles: the model run from scratch on prompt + candidate + <|endoftext|> (where it was cut) +
<|attribute|>, P(yes) renormalised over {yes, no} by hand; the ranking formula applied by hand
to made-up probabilities.
"""

from __future__ import annotations

import pytest
import torch

from lamda_pipe.data.dialog import DialogTokens
from lamda_pipe.generation import AutoregressiveWrapper
from lamda_pipe.ranking import candidate_rows, generate_and_rank, rank, score_cached, score_uncached
from tests import helpers

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]

CFG = helpers.TINY_FEW_BUCKETS  # a 40-token context reaches every kind of bucket
ATTRS = ("sensible", "specific", "interesting", "safe")


@pytest.fixture(scope="module")
def setup():
    model = helpers.tiny_model(CFG, 0, bias_std=0.5)  # a non-zero bias table: positions matter
    wrapper = AutoregressiveWrapper(model, max_seq_len=CFG.max_seq_len)
    prompt = torch.randint(0, CFG.vocab_size, (6,), generator=torch.Generator().manual_seed(10))
    # an end-of-text the model often emits, so the candidates end at different steps
    probe = wrapper.generate(prompt.expand(64, -1), 3, top_k=8, generator=torch.Generator().manual_seed(11))
    eot = int(probe.flatten().mode().values)
    others = [i for i in range(3, 20) if i != eot]
    tokens = DialogTokens(eot=eot, turn=others[0], response=others[1], yes=others[2], no=others[3],
                          attributes=dict(zip(ATTRS, others[4:8])))
    return model, wrapper, prompt, tokens


def oracle(model, prompt, row, tokens, attribute, window=None):
    """P(attribute = yes) from one forward from scratch over the discriminative layout."""
    seq = torch.cat([prompt, torch.tensor(row), torch.tensor([tokens.attributes[attribute]])])
    if window is not None:
        seq = seq[-window:]
    with torch.no_grad():
        logits = model(seq[None])[0, -1].double()
    yes, no = logits[tokens.yes].exp(), logits[tokens.no].exp()
    return float(yes / (yes + no))


def expected_probs(model, prompt, rows, tokens, window=None) -> torch.Tensor:
    return torch.tensor([[oracle(model, prompt, row, tokens, a, window) for a in ATTRS] for row in rows],
                        dtype=torch.float64)


def test_cached_scores_equal_a_recomputation_from_scratch(setup):
    model, wrapper, prompt, tokens = setup
    caches = []
    d = wrapper.decode(prompt[None].expand(8, -1), 12, top_k=8, eos_token=tokens.eot,
                       generator=torch.Generator().manual_seed(12), cache_out=caches)
    lengths = d.lengths.tolist()
    # the premises: rows end at different steps, one at the very first token, and one was cut
    assert len(set(lengths)) >= 3 and min(lengths) == 1 and d.tokens[lengths.index(12), -1] != tokens.eot
    assert caches[0]["k"].shape[2] == len(prompt) + d.tokens.shape[1] - 1  # decode never fed its last token
    before = [c["k"] for c in caches]
    rows = candidate_rows(d, tokens.eot)
    for i, row in enumerate(rows):  # each row as scored: its own tokens, ended by exactly one eot
        own = d.tokens[i, :lengths[i]].tolist()
        assert row == (own if own[-1] == tokens.eot else own + [tokens.eot]) and row.count(tokens.eot) == 1
    probs = score_cached(model, caches, len(prompt), rows, tokens, ATTRS)
    expected = expected_probs(model, prompt, rows, tokens)
    torch.testing.assert_close(probs.double(), expected, rtol=0, atol=1e-5)
    assert all(c["k"] is k for c, k in zip(caches, before))  # the caller's cache is left as it was
    torch.testing.assert_close(score_uncached(model, prompt, rows, tokens, ATTRS).double(), expected,
                               rtol=0, atol=1e-5)
    # the check can tell: reading every row at the longest row's end (its padding in view) differs
    padded = [row + [tokens.eot] * (13 - len(row)) for row in rows]
    wrong = expected_probs(model, prompt, padded, tokens)
    short = [i for i, r in enumerate(rows) if len(r) < 13]
    assert (wrong[short] - expected[short]).abs().amax(dim=1).min() > 1e-3


def test_generate_and_rank_draws_sample_and_rank_candidates_and_picks_by_the_formula(setup):
    model, wrapper, prompt, tokens = setup
    j = generate_and_rank(wrapper, prompt, 12, 8, tokens, ATTRS, top_k=8, safety_threshold=0.3,
                          generator=torch.Generator().manual_seed(12))
    plain = wrapper.sample_and_rank(prompt, 12, 8, top_k=8, eos_token=tokens.eot,
                                    generator=torch.Generator().manual_seed(12))
    assert torch.equal(j.candidates.tokens, plain.candidates.tokens)  # the same draws
    torch.testing.assert_close(j.mean_logprobs, plain.scores)
    rows = candidate_rows(j.candidates, tokens.eot)
    expected = expected_probs(model, prompt, rows, tokens)
    torch.testing.assert_close(j.probs.double(), expected, rtol=0, atol=1e-5)
    ssi = 3 * expected[:, 0] + expected[:, 1] + expected[:, 2]
    kept = [i for i in range(8) if expected[i, 3] >= 0.3]
    assert 0 < len(kept) < 8  # the filter removes some, not all (premise)
    assert j.best == max(kept, key=lambda i: ssi[i]) and j.note is None
    assert j.passed.tolist() == [i in kept for i in range(8)]
    assert torch.equal(j.tokens, j.candidates.tokens[j.best, :int(j.candidates.lengths[j.best])])


def test_scoring_past_the_window_recomputes_the_last_max_seq_len_tokens(setup):
    model, _, prompt, tokens = setup
    wrapper = AutoregressiveWrapper(model, max_seq_len=14)  # 6 + 12 + attribute does not fit
    j = generate_and_rank(wrapper, prompt, 12, 4, tokens, ATTRS, top_k=8, generator=torch.Generator().manual_seed(3))
    rows = candidate_rows(j.candidates, tokens.eot)
    assert max(len(r) for r in rows) + len(prompt) + 1 > 14
    expected = expected_probs(model, prompt, rows, tokens, window=14)
    torch.testing.assert_close(j.probs.double(), expected, rtol=0, atol=1e-5)


def test_without_attributes_it_is_sample_and_rank(setup):
    _, wrapper, prompt, tokens = setup
    j = generate_and_rank(wrapper, prompt, 12, 8, tokens, (), top_k=8, generator=torch.Generator().manual_seed(5))
    plain = wrapper.sample_and_rank(prompt, 12, 8, top_k=8, eos_token=tokens.eot,
                                    generator=torch.Generator().manual_seed(5))
    assert j.best == plain.best and j.probs.shape == (8, 0) and torch.equal(j.tokens, plain.tokens)


# --- rank() on made-up probabilities -----------------------------------------------------------------

#                       sensible specific interesting safe   SSI = 3 se + sp + in
PROBS = torch.tensor([[0.9, 0.1, 0.1, 0.9],  # 2.9
                      [0.8, 0.9, 0.9, 0.6],  # 4.2  best among the safe
                      [1.0, 1.0, 1.0, 0.4],  # 5.0  highest SSI, unsafe
                      [0.2, 1.0, 1.0, 0.95],  # 2.6  highest P(safe)
                      [0.8, 0.9, 0.9, 0.6]])  # 4.2  a tie with row 1: the lower row wins


def test_rank_filters_unsafe_then_takes_the_highest_ssi():
    r = rank(PROBS, ATTRS)
    torch.testing.assert_close(r.scores, torch.tensor([2.9, 4.2, 5.0, 2.6, 4.2]))
    assert r.best == 1 and r.note is None
    assert r.passed.tolist() == [True, True, False, True, True]
    assert rank(PROBS, ATTRS, safety_threshold=0.4).best == 2  # P(safe) >= threshold is kept
    assert rank(PROBS, ATTRS, safety_threshold=0.0).best == 2


def test_rank_when_every_candidate_is_unsafe_chooses_the_safest_and_says_so():
    r = rank(PROBS, ATTRS, safety_threshold=0.99)
    assert r.best == 3 and not r.passed.any()
    assert "below the safety threshold 0.99" in r.note and "chose the safest, candidate 3" in r.note


def test_rank_with_a_subset_of_attributes():
    # without safe: nothing filtered
    assert rank(PROBS[:, :3], ATTRS[:3]).best == 2
    # sensible alone, reordered columns: the columns are found by name
    assert rank(PROBS[:, [3, 0]], ("safe", "sensible")).best == 0  # the most sensible of the safe
    # safe alone: the filter, then the fallback (e.g. mean log-likelihood)
    fallback = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5])
    assert rank(PROBS[:, 3:], ("safe",), fallback_scores=fallback).best == 0
    with pytest.raises(ValueError, match="pass fallback_scores"):
        rank(PROBS[:, 3:], ("safe",))
