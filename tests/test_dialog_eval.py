"""Unit tests of lamda_pipe/dialog_eval.py: ROC AUC against counting pairs, and the discriminator
metrics tie each rated candidate's score to its own rating (a stub network whose P(yes) is known)."""

from __future__ import annotations

import itertools

import pytest
import torch

from lamda_pipe.data.dialog import DialogTokens, _text, parse_dialog
from lamda_pipe.data.tokenizer import load_tokenizer
from lamda_pipe.dialog_eval import discriminator_metrics, roc_auc
from tests.helpers import train_tiny_tokenizer

pytestmark = pytest.mark.unit


def pair_count_auc(scores, labels):
    """The definition: over every (rated 1, rated 0) pair, 1 if the first scores higher, 1/2 on a tie."""
    pairs = [(p, n) for p, n in itertools.product([s for s, y in zip(scores, labels) if y],
                                                   [s for s, y in zip(scores, labels) if not y])]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_is_the_share_of_pairs_ordered_right(seed):
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randint(0, 6, (40,), generator=g) / 5).tolist()  # many ties
    labels = torch.randint(0, 2, (40,), generator=g).tolist()
    assert roc_auc(scores, labels) == pytest.approx(pair_count_auc(scores, labels), abs=1e-12)


def test_roc_auc_extremes_and_one_class():
    assert roc_auc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert roc_auc([0.1, 0.2, 0.9], [1, 1, 0]) == 0.0
    assert roc_auc([0.5, 0.5], [1, 0]) == 0.5
    assert roc_auc([0.1, 0.7], [1, 1]) is None


class KnownJudge(torch.nn.Module):
    """A stand-in network: P(yes) at the last position is 0.9 when the sequence holds the token
    `good`, else 0.2, whatever the attribute."""

    def __init__(self, vocab: int, tokens: DialogTokens, good: int):
        super().__init__()
        self.vocab, self.tokens, self.good = vocab, tokens, good
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, seqs):
        logits = torch.zeros(*seqs.shape, self.vocab)
        p = torch.where((seqs == self.good).any(dim=1), 0.9, 0.2)
        logits[:, -1, self.tokens.yes] = torch.log(p)
        logits[:, -1, self.tokens.no] = torch.log(1 - p)
        return logits


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def test_discriminator_metrics_score_each_candidate_against_its_own_rating(tok):
    ids = DialogTokens.of(tok)
    others = {t for text in ("User: Is it so?", "maybe", "never") for t in _text(tok, text)}
    good = next(t for t in _text(tok, "Zion") if t not in others)  # a token only the "Zion" answers hold
    # "Zion" answers are rated 1 on sensible and the stub gives them P 0.9; other answers 0 / P 0.2;
    # "safe" ratings are the opposite of the stub's view: accuracy 0 there
    dialogs = [parse_dialog({"turns": [
        {"speaker": "User", "text": "Is it so?"},
        {"speaker": "Bot", "text": "Zion", "ratings": {"sensible": 1, "safe": 0},
         "alternatives": [{"text": "maybe", "ratings": {"sensible": 0, "safe": 1}},
                          {"text": "never", "ratings": {"sensible": 0}}]}]}, f"d{i}") for i in range(3)]
    model = KnownJudge(tok.get_vocab_size(), ids, good)
    out = discriminator_metrics(model, tok, ids, dialogs, ["sensible", "safe", "specific"], max_seq_len=64)
    assert set(out) == {"sensible", "safe"}  # nothing is rated "specific"
    assert out["sensible"].rated == 9 and out["sensible"].positive == 3
    assert out["sensible"].accuracy == 1.0 and out["sensible"].auc == 1.0
    assert out["safe"].rated == 6 and out["safe"].accuracy == 0.0 and out["safe"].auc == 0.0


@pytest.mark.parametrize("args, says", [
    (["--modes", "greedy,fast"], "--modes fast: choose among greedy, sample, rank"),
    (["--limit", "0"], "--limit must be >= 1, got 0"),
    (["--num-candidates", "0"], "--num-candidates must be >= 1"),
])
def test_eval_dialog_refuses_bad_flags_in_one_line(tmp_path, capsys, args, says):
    from lamda_pipe.tools.eval_dialog import main

    assert main(["--model", str(tmp_path), "--dialogs", str(tmp_path / "d.jsonl"), *args]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1


def test_eval_dialog_checks_the_dialog_file_before_reading_any_model(tmp_path, capsys):
    from lamda_pipe.tools.eval_dialog import main

    bad = tmp_path / "held.jsonl"
    bad.write_text('{"turns": [{"speaker": "User", "text": "hi"}, {"speaker": "Bot"}]}\n')
    assert main(["--model", str(tmp_path / "no-such-model"), "--dialogs", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1: turns[1].text: missing" in err and "no-such-model" not in err
