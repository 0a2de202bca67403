"""Which models have discriminators (the run record's and export's `dialog`), lamda-chat, and
lamda-generate's ranked decoding, on a tiny random model with a tokenizer that has the dialog
tokens (CPU, fp32, in-process CLI calls).

Oracles: the library calls the tools are built from (fit_prompt, generate_and_rank) replayed
with the same seed; the record and export files written by hand.
"""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from lamda_pipe import LaMDA
from lamda_pipe.data.dialog import DialogTokens, encode_prompt, fit_prompt
from lamda_pipe.data.tokenizer import ATTRIBUTES, DIALOG_TOKENS, load_tokenizer, train_tokenizer, vocab_size
from lamda_pipe.export import ModelDialog, dialog_at, export_checkpoint, load_model
from lamda_pipe.generation import AutoregressiveWrapper
from lamda_pipe.ranking import generate_and_rank
from lamda_pipe.run_format import RUN_RECORD, RunRecord, resolve_model
from lamda_pipe.tools.generate import NO_DISCRIMINATORS
from tests import helpers

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]

SENTENCES = ["User: hello there, how are you today?", "Bot: I am well, thank you for asking.",
             "User: what is the weather like where you are?", "Bot: it is sunny and warm here.",
             "The quick brown fox jumps over the lazy dog.", "In the beginning God created the heaven and the earth."]
CFG = helpers.TINY_FEW_BUCKETS  # max_seq_len 64


def write_checkpoint(tag, cfg, tok_file, dialog):
    helpers.write_layer_files(helpers.tiny_model(cfg, 0, bias_std=0.5), tag)
    record = RunRecord(model_preset="test", model_config=cfg, pipe_stages=1, data_parallel=1, global_steps=3,
                       samples_consumed=0, dialog=dialog)
    (tag / RUN_RECORD).write_text(record.to_json())
    (tag / "tokenizer.json").write_bytes(tok_file.read_bytes())
    (tag.parent / "latest").write_text(tag.name)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tok_file = root / "tok.json"
    train_tokenizer(SENTENCES * 20, vocab_size=400).save(str(tok_file))
    cfg = CFG.replace(vocab_size=vocab_size(load_tokenizer(tok_file)))
    write_checkpoint(root / "run" / "checkpoints" / "global_step3", cfg, tok_file, {"attributes": list(ATTRIBUTES)})
    write_checkpoint(root / "plain" / "checkpoints" / "global_step3", cfg, tok_file, None)
    # the same vocabulary without the dialog tokens (a tokenizer from before them, or from elsewhere)
    spec = json.loads(tok_file.read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in DIALOG_TOKENS]
    spec["model"]["vocab"] = {k: v for k, v in spec["model"]["vocab"].items() if k not in DIALOG_TOKENS}
    old_tok = root / "old_tok.json"
    old_tok.write_text(json.dumps(spec))
    write_checkpoint(root / "old" / "checkpoints" / "global_step3", cfg, old_tok, None)
    return {"root": root, "tok": tok_file, "old_tok": old_tok, "run": root / "run", "old": root / "old",
            "export": export_checkpoint(root / "run", root / "export"),
            "plain": export_checkpoint(root / "plain", root / "plain_export")}


# --- which models have discriminators -------------------------------------------------------------

def test_export_records_the_dialog_and_every_loader_reads_it(models):
    tok = load_tokenizer(models["tok"])
    expected = ModelDialog(DialogTokens.of(tok), ATTRIBUTES)
    config = json.loads((models["export"] / "config.json").read_text())
    assert config["format"] == "lamda-pipe-export/2"
    assert config["dialog"] == {"tokens": DialogTokens.of(tok).to_dict(), "attributes": list(ATTRIBUTES)}
    assert LaMDA.from_pretrained(models["export"]).dialog == expected
    for path in (models["run"], models["export"]):
        src = resolve_model(path)
        assert dialog_at(src) == dialog_at(src, tok) == expected
        assert load_model(src, LaMDA.from_pretrained(models["export"]).config).dialog == expected
    # a model trained without discriminators: the ids, no attributes
    assert json.loads((models["plain"] / "config.json").read_text())["dialog"]["attributes"] == []
    assert LaMDA.from_pretrained(models["plain"]).dialog == ModelDialog(DialogTokens.of(tok), ())
    assert dialog_at(resolve_model(models["old"])) is None  # no dialog tokens: not a dialog model


def test_records_and_exports_from_before_dialogs_still_load(models, tmp_path):
    d = json.loads((helpers.Path(__file__).parent / "fixtures" / "release_0.1.0" / "lamda_run.json").read_text())
    assert RunRecord.from_dict(d).dialog is None
    with_dialog = RunRecord.from_dict({**d, "dialog": {"attributes": ["safe"]}})
    assert RunRecord.from_dict(json.loads(with_dialog.to_json())) == with_dialog
    assert json.loads(with_dialog.to_json())["format_version"] == 1
    old = tmp_path / "old_export"
    old.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (old / name).write_bytes((models["export"] / name).read_bytes())
    config = json.loads((models["export"] / "config.json").read_text())
    del config["dialog"]
    (old / "config.json").write_text(json.dumps({**config, "format": "lamda-pipe-export/1"}))
    model = LaMDA.from_pretrained(old)
    assert model.dialog is None
    # the ids then come from the tokenizer beside it, with no discriminators
    assert dialog_at(resolve_model(old)) == ModelDialog(DialogTokens.of(load_tokenizer(models["tok"])), ())


def test_a_damaged_dialog_entry_is_refused_with_the_fix(models, tmp_path):
    from lamda_pipe.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not a usable run record"):
        RunRecord.from_dict({**json.loads(RunRecord.read(resolve_model(models["run"]).path).to_json()),
                             "dialog": ["safe"]})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((models["export"] / "model.safetensors").read_bytes())
    config = json.loads((models["export"] / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "dialog": {**config["dialog"], "attributes": ["funny"]}}))
    with pytest.raises(CheckpointError, match=r"unknown dialog attributes \['funny'\]"):
        dialog_at(resolve_model(bad))


# --- lamda-chat ------------------------------------------------------------------------------------

def chat(capsys, *args):
    from lamda_pipe.tools.chat import main

    rc = main(["--model", *[str(a) for a in args]])
    out, err = capsys.readouterr()
    return rc, out, err


def replay(model_dir, user_turns, seed, n=4, new=8, threshold=0.5):
    """What lamda-chat should answer, turn by turn, from the library calls."""
    model = LaMDA.from_pretrained(model_dir)
    tok = load_tokenizer(model_dir / "tokenizer.json")
    d = model.dialog
    wrapper = AutoregressiveWrapper(model, max_seq_len=model.config.max_seq_len)
    gen = torch.Generator().manual_seed(seed)
    turns, answers = [], []
    for text in user_turns:
        turns.append(("User", text))
        prompt = fit_prompt(turns, tok, d.tokens, model.config.max_seq_len - new - 2)
        j = generate_and_rank(wrapper, torch.tensor(prompt), new, n, d.tokens, d.attributes, 40, 1.0, threshold,
                              generator=gen)
        row = j.tokens.tolist()
        answers.append(tok.decode(row[:row.index(d.tokens.eot)] if d.tokens.eot in row else row))
        turns.append(("Bot", answers[-1]))
    return [" ".join(a.splitlines()) for a in answers]  # as printed: one line each


def test_chat_prompt_answers_with_the_ranked_candidate(models, capsys):
    rc, out, err = chat(capsys, models["export"], "--prompt", "hello there", "--seed", "3", "--num-candidates", "4",
                        "--max-new-tokens", "8", "--device", "cpu")
    assert rc == 0 and "seed 3" in err and "discriminators: sensible, specific, interesting, safe" in err
    assert out.splitlines() == replay(models["export"], ["hello there"], 3)
    assert NO_DISCRIMINATORS not in err


def test_chat_scripted_turns_keep_the_conversation(models, capsys):
    turns = ["hello there", "what is the weather like?", "thank you"]
    rc, out, _ = chat(capsys, models["run"], *[a for t in turns for a in ("--prompt", t)], "--seed", "5",
                      "--num-candidates", "4", "--max-new-tokens", "8")
    assert rc == 0
    assert out.splitlines() == replay(models["export"], turns, 5)  # a checkpoint answers as its export does


def test_show_candidates_prints_every_candidate_with_its_probabilities(models, capsys):
    rc, out, err = chat(capsys, models["export"], "--prompt", "hello", "--seed", "1", "--num-candidates", "5",
                        "--max-new-tokens", "6", "--show-candidates", "--safety-threshold", "0")
    assert rc == 0
    lines = [line for line in err.splitlines() if " candidate " in line]
    assert len(lines) == 5 and all(all(f"{a} 0." in line or f"{a} 1." in line for a in ATTRIBUTES) for line in lines)
    (chosen,) = [line for line in lines if line.startswith("*")]
    assert chosen.endswith(json.dumps(out[:-1])) and "below the safety threshold" not in err


def latest_turns_that_fit(tok, ids, history, budget) -> list[int]:
    """The documented truncation: whole turns dropped from the oldest on."""
    return next((p for i in range(len(history)) if len(p := encode_prompt(tok, ids, history[i:])) <= budget),
                encode_prompt(tok, ids, history[-1:])[-budget:])


def record_answers(monkeypatch) -> list[str]:
    """The answers as the conversation keeps them (printed, a line break becomes a space)."""
    from lamda_pipe.tools.chat import Chat

    answers = []
    real = Chat.respond
    monkeypatch.setattr(Chat, "respond", lambda self, text: answers.append(real(self, text)) or answers[-1])
    return answers


def test_context_is_cut_from_the_oldest_turn(models, capsys, monkeypatch):
    import lamda_pipe.ranking as ranking

    answers = record_answers(monkeypatch)
    prompts = []
    real = ranking.generate_and_rank
    monkeypatch.setattr(ranking, "generate_and_rank", lambda w, p, *a, **k: prompts.append(p.tolist()) or
                        real(w, p, *a, **k))
    turns = ["hello there", "how are you today?", "the quick brown fox jumps over the lazy dog"] * 2
    rc, out, _ = chat(capsys, models["export"], *[a for t in turns for a in ("--prompt", t)], "--seed", "2",
                      "--num-candidates", "2", "--max-new-tokens", "8")
    assert rc == 0 and len(prompts) == len(turns)
    budget = CFG.max_seq_len - 8 - 2
    tok = load_tokenizer(models["tok"])
    ids = DialogTokens.of(tok)
    history, cut = [], []
    assert [" ".join(a.splitlines()) for a in answers] == out.splitlines()
    for text, answer, prompt in zip(turns, answers, prompts):
        history.append(("User", text))
        assert prompt == latest_turns_that_fit(tok, ids, history, budget)
        whole = len(encode_prompt(tok, ids, history))
        cut.append(whole > budget and len(prompt) > len(encode_prompt(tok, ids, history[-1:])))
        history.append(("Bot", answer))
    assert any(cut)  # the premise: some turn dropped the oldest turns and kept more than the newest


def test_chat_reads_turns_from_stdin_with_reset_and_quit(models, capsys, monkeypatch):
    import lamda_pipe.ranking as ranking

    answers = record_answers(monkeypatch)
    prompts = []
    real = ranking.generate_and_rank
    monkeypatch.setattr(ranking, "generate_and_rank", lambda w, p, *a, **k: prompts.append(p.tolist()) or
                        real(w, p, *a, **k))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n\nhow are you?\n/reset\nhi again\n/quit\nnever\n"))
    rc, out, err = chat(capsys, models["export"], "--seed", "4", "--num-candidates", "2", "--max-new-tokens", "6",
                        "--user-name", "Alice", "--bot-name", "Eve")
    assert rc == 0 and len(out.splitlines()) == 3 and "(context cleared)" in err
    tok = load_tokenizer(models["tok"])
    ids = DialogTokens.of(tok)
    first = answers[0]
    budget = CFG.max_seq_len - 6 - 2
    assert prompts[0] == encode_prompt(tok, ids, [("Alice", "hello there")])
    assert prompts[1] == latest_turns_that_fit(tok, ids, [("Alice", "hello there"), ("Eve", first),
                                                          ("Alice", "how are you?")], budget)
    assert prompts[2] == encode_prompt(tok, ids, [("Alice", "hi again")])  # after /reset: that turn alone


def test_chat_without_discriminators_says_how_it_ranks(models, capsys):
    rc, out, err = chat(capsys, models["plain"], "--prompt", "hello", "--seed", "1", "--num-candidates", "3",
                        "--max-new-tokens", "6")
    assert rc == 0 and out.count("\n") == 1 and err.count(NO_DISCRIMINATORS) == 1
    assert "discriminators: none" in err


@pytest.mark.parametrize("which, args, message", [
    ("missing", [], "no such directory"),
    ("old", [], "its tokenizer has no dialog tokens"),
    ("export", ["--tokenizer", "OLD_TOK"], "does not have the dialog token ids the model was exported with"),
    ("export", ["--max-new-tokens", "62"], "--max-new-tokens 62 leaves no room"),
    ("export", ["--num-candidates", "0"], "--num-candidates must be >= 1"),
    ("export", ["--safety-threshold", "1.5"], "--safety-threshold must be between 0 and 1"),
    ("export", ["--bot-name", " "], "--bot-name must be a non-empty name"),
])
def test_chat_bad_input_is_one_line_and_exit_2(models, capsys, which, args, message):
    model = models["root"] / "nothing" if which == "missing" else models[which]
    args = [str(models["old_tok"]) if a == "OLD_TOK" else a for a in args]
    rc, out, err = chat(capsys, model, "--prompt", "hello", *args)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


# --- lamda-generate --num-candidates -----------------------------------------------------------------

def generate(capsys, *args):
    from lamda_pipe.tools.generate import main

    rc = main(["--model", *[str(a) for a in args]])
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_ranks_by_the_discriminators_when_the_model_has_them(models, capsys):
    rc, out, err = generate(capsys, models["export"], "--prompt", "hello there", "--num-candidates", "4",
                            "--max-new-tokens", "8", "--seed", "6")
    assert rc == 0 and NO_DISCRIMINATORS not in err
    assert len([line for line in err.splitlines() if " candidate " in line and "safe 0." in line]) == 4
    model = LaMDA.from_pretrained(models["export"])
    tok = load_tokenizer(models["tok"])
    d = model.dialog
    ids = tok.encode("hello there").ids
    j = generate_and_rank(AutoregressiveWrapper(model, max_seq_len=model.config.max_seq_len), torch.tensor(ids), 8,
                          4, d.tokens, d.attributes, generator=torch.Generator().manual_seed(6))
    row = j.tokens.tolist()
    row = row[:row.index(d.tokens.eot)] if d.tokens.eot in row else row
    assert "hello there" + out.splitlines()[-1] == tok.decode(ids + row)


def test_generate_without_discriminators_falls_back_and_says_so(models, capsys):
    rc, out, err = generate(capsys, models["plain"], "--prompt", "hello there", "--num-candidates", "4",
                            "--max-new-tokens", "8", "--seed", "6")
    assert rc == 0 and err.count(NO_DISCRIMINATORS) == 1 and err.count("mean log-prob") == 4
    rc, _, err = generate(capsys, models["plain"], "--prompt", "hello there", "--max-new-tokens", "4")
    assert rc == 0 and NO_DISCRIMINATORS not in err  # one candidate: nothing is ranked
