"""lamda-eval: the model as lm-evaluation-harness' LM (lamda_pipe/harness.py) and the tool.

Oracles: log-probabilities computed one continuation token at a time, each from its own
forward pass over exactly the context it sees (no batching, padding or slicing of a batch's
logits); the tokenizer for the context/continuation split; the bundled corpus' text for the
multiple-choice set; and the harness' own `hf` model on the `lamda-export --format hf` dir of
the same weights, an independent model implementation and tokenization path. The harness runs
`git` for its own records, so the tests that run it whole are in the launch tier."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from lamda_pipe.data.tokenizer import EOT, load_tokenizer
from lamda_pipe.export import load_model
from lamda_pipe.run_format import resolve_model
from tests.helpers import TINY_FEW_BUCKETS, tiny_model, train_tiny_tokenizer, write_layer_files, write_run_info

lm_eval = pytest.importorskip("lm_eval", reason="the hf extra (in test too)")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A run dir with one checkpoint of a tiny model whose window (512) holds every multiple-choice
    item whole, and its transformers export."""
    from lamda_pipe.data.tokenizer import vocab_size
    from lamda_pipe.export import export_checkpoint

    root = tmp_path_factory.mktemp("harness")
    tok = train_tiny_tokenizer(root / "tok.json")
    cfg = TINY_FEW_BUCKETS.replace(vocab_size=vocab_size(load_tokenizer(tok)), max_seq_len=512)
    tag = root / "run" / "checkpoints" / "global_step3"
    write_layer_files(tiny_model(cfg, seed=3, bias_std=2.0), tag)
    write_run_info(tag, cfg, 3, tok)
    (tag.parent / "latest").write_text(tag.name)
    return {"run": root / "run", "cfg": cfg, "tok": tok, "hf": export_checkpoint(root / "run", root / "hf", fmt="hf")}


@pytest.fixture(scope="module")
def lm(source):
    from lamda_pipe.harness import LamdaLM

    tok = load_tokenizer(source["tok"])
    model = load_model(resolve_model(source["run"]), source["cfg"])
    return LamdaLM(model, tok, tok.token_to_id(EOT), torch.device("cpu"), batch_size=3)


def oracle(lm, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Each scored token from its own forward pass over the tokens before it in the window of
    max_len + 1 (a continuation longer than that is scored on the tokens that fit)."""
    row = (ctx + cont)[-(lm.max_len + 1):]
    total, greedy = 0.0, True
    with torch.no_grad():
        for q in range(max(len(row) - len(cont), 1), len(row)):
            logp = lm.model(torch.tensor([row[:q]]))[0, -1].double().log_softmax(-1)
            total += float(logp[row[q]])
            greedy &= int(logp.argmax()) == row[q]
    return total, greedy


@pytest.mark.unit
def test_loglikelihood_equals_one_forward_per_token(lm):
    """Pairs of many lengths in batches of 3 (right-padded rows), one whose context is longer
    than the model's window, and one with no context (scored after <|endoftext|>)."""
    texts = ["In the beginning God created the heaven and the earth.", "And the earth was without form",
             "and void", "", "Let there be light: and there was light. " * 60]
    pairs = [(a, " " + b) for a in texts for b in ("and darkness", "was upon the face of the deep")]
    requests = [SimpleNamespace(args=p) for p in pairs]
    got = lm.loglikelihood(requests)
    assert any(len(lm._pair(*p)[0]) + len(lm._pair(*p)[1]) > lm.max_len + 1 for p in pairs)
    for p, (ll, greedy) in zip(pairs, got):
        want, want_greedy = oracle(lm, *lm._pair(*p))
        assert ll == pytest.approx(want, abs=1e-4) and greedy == want_greedy, p
    assert lm._pair("", "abc")[0] == [lm.eot]


@pytest.mark.unit
def test_the_continuation_is_scored_as_the_tokenizer_splits_the_whole_text(lm):
    ctx, cont = lm._pair("And God said ", "Let there be light")
    assert ctx + cont == lm._ids("And God said Let there be light")
    assert ctx == lm._ids("And God said")  # the trailing space went with the continuation


@pytest.mark.unit
def test_rolling_loglikelihood_of_a_short_document_is_its_log_probability_after_endoftext(lm):
    text = "And God saw the light, that it was good."
    ids = lm._ids(text)
    assert len(ids) <= lm.max_len
    want, _ = oracle(lm, [lm.eot], ids)
    assert lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])[0] == pytest.approx(want, abs=1e-4)


@pytest.mark.unit
def test_the_next_sentence_set_is_built_from_held_out_chapters(tmp_path):
    from lamda_pipe.harness import heldout_chapters, sentences, write_demo_tasks

    configs = write_demo_tasks(tmp_path, items=40)
    assert [c["task"] for c in configs] == ["lamda_demo_heldout", "lamda_demo_next_sentence"]
    chapters = heldout_chapters()
    assert [json.loads(x)["text"] for x in (tmp_path / "heldout.jsonl").read_text().splitlines()] == chapters
    follows = {(a, b) for c in chapters for a, b in zip(sentences(c), sentences(c)[1:])}
    items = [json.loads(x) for x in (tmp_path / "next_sentence.jsonl").read_text().splitlines()]
    assert len(items) == 40 and {i["answer"] for i in items} == {0, 1, 2, 3}
    for item in items:
        truth = [k for k, c in enumerate(item["choices"]) if (item["sentence"], c.strip()) in follows]
        assert truth == [item["answer"]], item


@pytest.mark.launch
def test_lamda_eval_matches_the_harness_hf_model_on_the_export(source, tmp_path, capsys):
    """The demo tasks through lamda-eval (our model, our adapter) and through the harness' own
    `hf` model on the transformers export of the same weights: the same figures."""
    from lm_eval import simple_evaluate

    from lamda_pipe.harness import write_demo_tasks
    from lamda_pipe.tools.eval_lm import main

    out = tmp_path / "ours.json"
    assert main(["--model", str(source["run"]), "--limit", "6", "--json", str(out), "--device", "cpu"]) == 0
    ours = json.loads(out.read_text())["results"]
    printed = capsys.readouterr().out
    assert re.search(r"lamda_demo_next_sentence: acc [01]\.\d{4}", printed)

    theirs = simple_evaluate(model="hf", model_args={"pretrained": str(source["hf"]), "trust_remote_code": True,
                                                     "max_length": source["cfg"].max_seq_len, "device": "cpu",
                                                     "dtype": "float32"},
                             tasks=write_demo_tasks(tmp_path / "tasks"), limit=6, log_samples=False,
                             bootstrap_iters=0)["results"]
    for task, metric in (("lamda_demo_heldout", "word_perplexity,none"), ("lamda_demo_heldout", "bits_per_byte,none"),
                         ("lamda_demo_next_sentence", "acc,none"), ("lamda_demo_next_sentence", "acc_norm,none")):
        assert math.isfinite(ours[task][metric])
        assert ours[task][metric] == pytest.approx(theirs[task][metric], rel=1e-4), (task, metric)


@pytest.mark.launch
def test_unknown_tasks_and_bad_flags_are_refused_before_the_model_is_read(tmp_path, capsys):
    from lamda_pipe.tools.eval_lm import main

    missing = tmp_path / "no-model"
    assert main(["--model", str(missing), "--tasks", "demo,no_such_task_xyz"]) == 2
    assert "--tasks no_such_task_xyz: no such lm-evaluation-harness task" in capsys.readouterr().err
    assert main(["--model", str(missing), "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err
    assert main(["--model", str(missing), "--include-path", str(tmp_path / "nope")]) == 2
    assert "no such directory of task YAML files" in capsys.readouterr().err
