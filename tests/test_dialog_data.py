"""Dialog data: the dialog file format (every refusal names file, line and field), prepared dialog
dirs (their files decode to exactly dialog.py's examples), plain dirs unchanged, the demo corpus
(deterministic, right answers) and lamda-prepare-data --format dialog."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from lamda_pipe.data import dialog_demo
from lamda_pipe.data.dialog import (DialogTokens, dialog_examples, discriminative_example, generative_example,
                                    iter_dialog_examples, parse_dialog, read_dialog_files, read_dialogs)
from lamda_pipe.data.loader import DataSource, bundled_corpus, check_token_ids, open_sources
from lamda_pipe.data.prepare import is_val_document, prepare_data, read_meta
from lamda_pipe.data.prepare_dialog import prepare_dialog_data, val_dialogs
from lamda_pipe.data.text_sources import iter_documents
from lamda_pipe.data.tokenizer import ATTRIBUTES, load_tokenizer, train_tokenizer
from lamda_pipe.errors import DataError
from lamda_pipe.tools.prepare_data import main as prepare_main
from tests.helpers import train_tiny_tokenizer

pytestmark = pytest.mark.unit

ADA = {"turns": [{"speaker": "User", "text": "My name is Ada."},
                 {"speaker": "Bot", "text": "Nice to meet you, Ada.",
                  "ratings": {"sensible": 1, "specific": 1, "interesting": 0, "safe": 1}},
                 {"speaker": "User", "text": "What is my name?"},
                 {"speaker": "Bot", "text": "Your name is Ada.", "ratings": {"safe": True, "sensible": 1},
                  "alternatives": [{"text": "I am not sure.", "ratings": {"specific": 0, "sensible": 1}},
                                   {"text": "Your name is Bob.", "ratings": {"sensible": 0}, "generate": True}]}],
       "responder": "Bot"}
SUM = {"turns": [{"speaker": "A", "text": "What is 3 plus 4?"}, {"speaker": "B", "text": "3 plus 4 is 7."}]}
NO_GEN = {"turns": [{"speaker": "B", "text": "Hello."}, {"speaker": "A", "text": "Hi."},
                    {"speaker": "B", "text": "Bye.", "generate": False, "ratings": {"interesting": 1}}],
          "responder": "B"}
DIALOGS = [ADA, SUM, NO_GEN]


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def tok(tok_path):
    return load_tokenizer(tok_path)


def test_format_responses_candidates_and_the_generate_rule(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [ADA, "", "  ", SUM, NO_GEN])
    ada, total, no_gen = read_dialogs(path)
    assert ada.where == f"{path}:1" and total.where == f"{path}:4" and no_gen.where == f"{path}:5"
    assert ada.turns[0] == ("User", "My name is Ada.") and len(ada.turns) == 4
    # (turn, text, ratings in ATTRIBUTES order, generate)
    got = [(i, c.text, list(c.ratings.items()), c.generate) for i, c in ada.candidates]
    assert got == [(1, "Nice to meet you, Ada.", [("sensible", 1), ("specific", 1), ("interesting", 0), ("safe", 1)],
                    False),
                   (3, "Your name is Ada.", [("sensible", 1), ("safe", 1)], True),
                   (3, "I am not sure.", [("sensible", 1), ("specific", 0)], False),
                   (3, "Your name is Bob.", [("sensible", 0)], True)]
    # responder defaults to the last turn's speaker; an unrated response trains the generator
    assert [(i, c.ratings, c.generate) for i, c in total.candidates] == [(1, {}, True)]
    # the responder's first turn has no context: not a response
    assert [(i, c.generate) for i, c in no_gen.candidates] == [(2, False)]
    assert read_dialog_files([path, path])[3].turns == ada.turns


BAD_LINES = [  # (line 2 of the file, field, what the message says)
    ("{not json", None, "not valid JSON"),
    ("[1, 2]", None, "a list, not a JSON object"),
    ('{"turns": [], "turns": []}', None, "key 'turns' appears twice"),
    ({"turn": []}, "turn", "unknown key; did you mean 'turns'?"),
    ({"responder": "Bot"}, "turns", "missing"),
    ({"turns": []}, "turns", "an empty list"),
    ({"turns": "hi"}, "turns", "a string, not a list"),
    ({"turns": [{"speaker": "A", "text": "hi"}, "B: hi"]}, "turns[1]", "a string, not an object"),
    ({"turns": [{"speaker": "A", "text": "hi"}, {"speaker": "B", "text": "x"}, {"text": "y"}]}, "turns[2].speaker",
     'missing; every turn needs "speaker" and "text" strings'),
    ({"turns": [{"speaker": "A", "text": "hi"}, {"speaker": "B", "text": 3}]}, "turns[1].text",
     "a number, not a string"),
    ({"turns": [{"speaker": "A", "text": "hi"}, {"speaker": "B", "text": "  "}]}, "turns[1].text", "empty"),
    ({"turns": [{"speaker": "A", "text": "hi"}, {"spekaer": "B", "text": "x"}]}, "turns[1].spekaer",
     "unknown key; did you mean 'speaker'?"),
    ({"turns": [{"speaker": "A", "text": "hi"}, {"speaker": "B", "text": "x", "rating": {}}]}, "turns[1].rating",
     "unknown key; did you mean 'ratings'?"),
    ({"turns": [{"speaker": "A", "text": "hi"}, {"speaker": "B", "text": "x", "ratings": [1]}]}, "turns[1].ratings",
     "a list, not an object"),
    ({"turns": [{"speaker": "A", "text": "hi"}, {"speaker": "B", "text": "x", "ratings": {"sensable": 1}}]},
     "turns[1].ratings.sensable", "unknown attribute; did you mean 'sensible'?"),
    ({"turns": [{"speaker": "A", "text": "hi"}, {"speaker": "B", "text": "x", "ratings": {"safe": 2}}]},
     "turns[1].ratings.safe", "2 is not a rating; ratings are 0 or 1"),
    ({"turns": [{"speaker": "A", "text": "hi"}, {"speaker": "B", "text": "x", "ratings": {"safe": "1"}}]},
     "turns[1].ratings.safe", '"1" is not a rating'),
    ({"turns": [{"speaker": "A", "text": "hi"}, {"speaker": "B", "text": "x", "ratings": {"safe": 1.0}}]},
     "turns[1].ratings.safe", "1.0 is not a rating"),
    ({"turns": [{"speaker": "A", "text": "hi"}, {"speaker": "B", "text": "x", "generate": "yes"}]},
     "turns[1].generate", '"yes" is not true or false'),
    ({"turns": [{"speaker": "A", "text": "hi"}, {"speaker": "B", "text": "x", "generate": False}]}, "turns[1]",
     '"generate": false and no ratings, so it trains nothing'),
    ({"turns": [{"speaker": "A", "text": "hi"}, {"speaker": "B", "text": "x"}], "responder": 1}, "responder",
     "a number, not a string"),
    ({"turns": [{"speaker": "A", "text": "hi"}, {"speaker": "Bot", "text": "x"}], "responder": "Bott"}, "responder",
     "'Bott' speaks no turn; did you mean 'Bot'? the speakers are A, Bot"),
    ({"turns": [{"speaker": "A", "text": "hi", "ratings": {"safe": 1}}, {"speaker": "B", "text": "x"}]},
     "turns[0].ratings", "this turn is not a response"),
    ({"turns": [{"speaker": "A", "text": "hi"}, {"speaker": "B", "text": "x"}], "responder": "A"}, "turns",
     "no response"),
    ({"turns": [{"speaker": "A", "text": "hi"}]}, "turns", "no response"),
    ({"turns": [{"speaker": "A", "text": "hi"}, {"speaker": "B", "text": "x", "alternatives": {}}]},
     "turns[1].alternatives", "an object, not a list"),
    ({"turns": [{"speaker": "A", "text": "hi"}, {"speaker": "B", "text": "x", "alternatives": [{"txt": "y"}]}]},
     "turns[1].alternatives[0].txt", "unknown key; did you mean 'text'?"),
    ({"turns": [{"speaker": "A", "text": "hi"}, {"speaker": "B", "text": "x", "alternatives": [{"ratings": {}}]}]},
     "turns[1].alternatives[0].text", 'missing; every alternative needs a "text" string'),
]


@pytest.mark.parametrize("line, field, says", BAD_LINES, ids=[f"{i}-{c[2][:24]}" for i, c in enumerate(BAD_LINES)])
def test_each_bad_line_is_one_error_naming_file_line_and_field(tmp_path, line, field, says):
    path = write_lines(tmp_path / "dialogs.jsonl", [SUM, line, SUM])
    with pytest.raises(DataError) as e:
        read_dialogs(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:2: " + (f"{field}: " if field else "")), msg
    assert says in msg and "\n" not in msg


def test_empty_blank_and_non_utf8_files_are_refused(tmp_path):
    for name, content in (("empty.jsonl", b""), ("blank.jsonl", b"\n  \n"), ("latin1.jsonl", b'{"t": "\xe9"}\n')):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=re.escape(str(tmp_path / name)) + ": (no dialogs|not UTF-8)"):
            read_dialogs(tmp_path / name)
    # the files are all checked before the first example is encoded
    write_lines(tmp_path / "good.jsonl", [SUM])
    with pytest.raises(DataError, match="empty.jsonl: no dialogs"):
        iter_dialog_examples([tmp_path / "good.jsonl", tmp_path / "empty.jsonl"], None)


def expected_examples(tok, ids):
    """Each dialog's examples written out call by call from the documented rule (not through
    dialog_examples), in the documented order."""
    ctx = [("User", "My name is Ada."), ("Bot", "Nice to meet you, Ada."), ("User", "What is my name?")]
    d = lambda turns, text, a, r: discriminative_example(tok, ids, turns, text, a, r)  # noqa: E731
    ada = [d(ctx[:1], "Nice to meet you, Ada.", "sensible", 1), d(ctx[:1], "Nice to meet you, Ada.", "specific", 1),
           d(ctx[:1], "Nice to meet you, Ada.", "interesting", 0), d(ctx[:1], "Nice to meet you, Ada.", "safe", 1),
           generative_example(tok, ids, ctx, "Your name is Ada."),
           d(ctx, "Your name is Ada.", "sensible", 1), d(ctx, "Your name is Ada.", "safe", 1),
           d(ctx, "I am not sure.", "sensible", 1), d(ctx, "I am not sure.", "specific", 0),
           generative_example(tok, ids, ctx, "Your name is Bob."), d(ctx, "Your name is Bob.", "sensible", 0)]
    total = [generative_example(tok, ids, [("A", "What is 3 plus 4?")], "3 plus 4 is 7.")]
    no_gen = [d([("B", "Hello."), ("A", "Hi.")], "Bye.", "interesting", 1)]
    return [ada, total, no_gen]


def test_prepared_dir_decodes_to_exactly_the_examples(tok, tok_path, tmp_path):
    dialogs = read_dialogs(write_lines(tmp_path / "d.jsonl", DIALOGS * 3))  # 9 dialogs: both splits hold some
    val = val_dialogs(len(dialogs), 0.3)
    assert val == [is_val_document(i, 0.3) for i in range(9)] and 0 < sum(val) < 9
    meta = prepare_dialog_data(dialogs, tok_path, tmp_path / "out", val_fraction=0.3, source="hand", progress=False)
    assert read_meta(tmp_path / "out") == meta == json.loads((tmp_path / "out/meta.json").read_text())
    assert meta["kind"] == "dialog" and meta["dtype"] == "uint16" and meta["source"] == "hand"
    assert meta["dialog_tokens"] == DialogTokens.of(tok).to_dict()
    want = expected_examples(tok, DialogTokens.of(tok)) * 3
    assert [[(list(i), list(m)) for i, m in w] for w in want] == \
        [[(e.ids, e.mask) for e in dialog_examples(tok, DialogTokens.of(tok), x)] for x in dialogs]
    source = DataSource(tmp_path / "out", 1.0, meta)
    assert source.kind == "dialog" and source.attributes == sorted(ATTRIBUTES) == meta["attributes"]
    for split, in_split in (("train", False), ("val", True)):
        examples = [e for w, v in zip(want, val) if v == in_split for e in w]
        tokens, mask, idx = source.tokens(split), source.mask(split), source.example_offsets(split)
        assert mask.dtype == np.uint8 and idx.dtype == np.dtype("<i8") and len(idx) == len(examples) + 1
        got = [(tokens[a:b].tolist(), mask[a:b].tolist()) for a, b in zip(idx[:-1], idx[1:])]
        assert got == [(list(i), list(m)) for i, m in examples]
        info = meta["splits"][split]
        assert info == {"file": f"{split}.bin", "mask": f"{split}.mask.bin", "index": f"{split}.idx.bin",
                        "tokens": int(idx[-1]), "documents": sum(v == in_split for v in val),
                        "examples": len(examples), "generative": sum(sum(m) > 1 for _, m in examples),
                        "discriminative": sum(sum(m) == 1 for _, m in examples)}
    check_token_ids(source, meta["vocab_size"])
    assert open_sources(str(tmp_path / "out"), model_vocab=meta["vocab_size"], seq_len=16)[0].kind == "dialog"


def test_attributes_are_those_rated_in_train(tok_path, tmp_path):
    dialogs = read_dialogs(write_lines(tmp_path / "d.jsonl", [NO_GEN, SUM, ADA]))
    assert val_dialogs(3, 0.01) == [False, False, True]  # none hashed to validation: the last dialog goes there
    meta = prepare_dialog_data(dialogs, tok_path, tmp_path / "out", val_fraction=0.01, progress=False)
    assert meta["attributes"] == ["interesting"] and meta["splits"]["val"]["examples"] == 11
    meta = prepare_dialog_data(dialogs, tok_path, tmp_path / "none", val_fraction=0.0, progress=False)
    assert meta["attributes"] == sorted(ATTRIBUTES) and meta["splits"]["val"]["examples"] == 0
    assert DataSource(tmp_path / "none", 1.0, meta).example_offsets("val").tolist() == [0]


def test_damaged_dialog_dirs_are_refused_at_open(tok_path, tmp_path):
    dialogs = read_dialogs(write_lines(tmp_path / "d.jsonl", DIALOGS))
    prepare_dialog_data(dialogs, tok_path, tmp_path / "out", val_fraction=0.0, progress=False)
    out = tmp_path / "out"
    mask = (out / "train.mask.bin").read_bytes()
    (out / "train.mask.bin").write_bytes(mask[:-1])
    with pytest.raises(DataError, match=r"train\.mask\.bin holds .* bytes, but meta\.json says"):
        read_meta(out)
    (out / "train.mask.bin").write_bytes(mask)
    idx = np.fromfile(out / "train.idx.bin", dtype="<i8")
    idx[[1, 2]] = idx[[2, 1]]  # same size, offsets out of order
    idx.tofile(out / "train.idx.bin")
    with pytest.raises(DataError, match=r"train\.idx\.bin: the offsets do not run from 0 up to"):
        read_meta(out)
    idx[[1, 2]] = idx[[2, 1]]
    idx.tofile(out / "train.idx.bin")
    meta = read_meta(out)
    ids = np.fromfile(out / "train.bin", dtype="<u2")
    ids[5] = 299
    ids.tofile(out / "train.bin")
    with pytest.raises(DataError, match="train.bin holds token id 299, beyond the model's vocabulary of 299"):
        check_token_ids(DataSource(out, 1.0, meta), 299)
    meta_json = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta_json, "kind": "chat"}))
    with pytest.raises(DataError, match="kind 'chat', expected 'text' or 'dialog'"):
        read_meta(out)


def test_plain_dirs_load_as_text_unchanged(tok_path, tmp_path):
    docs = list(iter_documents([str(bundled_corpus()[0])]))[:12]
    meta = prepare_data(docs, tok_path, tmp_path / "plain", val_fraction=0.2, workers=1, progress=False)
    assert "kind" not in meta and "attributes" not in meta and read_meta(tmp_path / "plain") == meta
    (source,) = open_sources(str(tmp_path / "plain"), model_vocab=meta["vocab_size"], seq_len=16)
    assert source.kind == "text" and source.attributes == []
    assert len(source.tokens("train")) == meta["splits"]["train"]["tokens"]
    for accessor in (source.mask, source.example_offsets):
        with pytest.raises(DataError, match="holds plain text, which has no .*--format dialog"):
            accessor("train")


def test_demo_is_deterministic_and_parses(tmp_path):
    a = dialog_demo.make_dialogs(200, seed=3)
    assert a == dialog_demo.make_dialogs(200, seed=3) and a[:50] == dialog_demo.make_dialogs(50, seed=3)
    assert a != dialog_demo.make_dialogs(200, seed=4)
    p1 = dialog_demo.write_dialogs(tmp_path / "a.jsonl", 200, seed=3)
    p2 = dialog_demo.write_dialogs(tmp_path / "b.jsonl", 200, seed=3)
    assert p1.read_bytes() == p2.read_bytes() and len(read_dialogs(p1)) == 200
    with pytest.raises(DataError, match="already exists; pass --force"):
        dialog_demo.write_dialogs(p1, 5)
    assert p1.read_bytes() == p2.read_bytes()
    dialog_demo.write_dialogs(p1, 5, force=True)
    assert len(read_dialogs(p1)) == 5


def independent_answer(turns) -> str:
    """The right last answer, worked out from the text of the earlier turns alone."""
    question = turns[-1][1]
    said = " ".join(t for s, t in turns if s == "User")
    if m := re.fullmatch(r"What is (\d+) (plus|minus) (\d+)\?", question):
        a, op, b = int(m[1]), m[2], int(m[3])
        return f"{a} {op} {b} is {a + b if op == 'plus' else a - b}."
    if m := re.fullmatch(r"And (plus|minus) (\d+)\?", question):
        a = int(re.fullmatch(r".* is (\d+)\.", turns[-2][1])[1])
        op, b = m[1], int(m[2])
        return f"{a} {op} {b} is {a + b if op == 'plus' else a - b}."
    topic = {"What is my name?": "name", "And my name?": "name", "What is my favourite colour?": "colour",
             "And my colour?": "colour", "What pet do I have?": "pet", "And my pet?": "pet",
             "Where do I live?": "place", "And where do I live?": "place"}[question]
    fact = {"name": r"My name is (\w+)\.", "colour": r"My favourite colour is (\w+)\.", "pet": r"I have a (\w+)\.",
            "place": r"I live in (\w+)\."}[topic]
    value = re.search(fact, said)[1]
    return {"name": f"Your name is {value}.", "colour": f"Your favourite colour is {value}.",
            "pet": f"You have a {value}.", "place": f"You live in {value}."}[topic]


def test_demo_answers_are_right_and_every_attribute_has_both_ratings():
    dialogs = dialog_demo.make_dialogs(400, seed=0)
    pairs = dialog_demo.evaluation_pairs(dialogs)
    assert len(pairs) == 400
    seen = {a: set() for a in ATTRIBUTES}
    kinds = set()
    for d, (prompt, expected) in zip(dialogs, pairs):
        assert d["turns"][-1]["speaker"] == "Bot" and prompt[-1][0] == "User"
        assert expected == independent_answer(prompt), (prompt, expected)
        kinds.add(prompt[-1][1].split()[0] + (" sum" if any(c.isdigit() for c in prompt[-1][1]) else ""))
        parsed = parse_dialog(d)
        for i, c in parsed.candidates:
            for a, r in c.ratings.items():
                seen[a].add(r)
        for turn in d["turns"]:
            for alt in turn.get("alternatives", []):  # the alternatives train the discriminators only
                assert 0 in alt["ratings"].values() and "generate" not in alt
        # every answer to a question (and only those) is rated; all correct responses train the generator
        for before, turn in zip(d["turns"], d["turns"][1:]):
            if turn["speaker"] == "Bot":
                assert ("ratings" in turn) == before["text"].endswith("?"), turn
        assert all(c.generate for i, c in parsed.candidates if c.text == parsed.turns[i][1])
    assert seen == {a: {0, 1} for a in ATTRIBUTES}
    assert {"What", "What sum", "And", "And sum", "Where"} <= kinds


def test_demo_examples_fit_seq_len_128_with_the_demo_tokenizer():
    # the tokenizer prepare_bundled(out, 2048) trains: the bundled corpus at 2048 tokens
    tok = train_tokenizer(iter_documents([str(p) for p in bundled_corpus()]), 2048)
    ids = DialogTokens.of(tok)
    lengths = [len(e.ids) for d in dialog_demo.make_dialogs(300, seed=0)
               for e in dialog_examples(tok, ids, parse_dialog(d))]
    assert max(lengths) <= 128, max(lengths)


def test_cli_prepares_dialogs_and_refuses_what_does_not_apply(tok_path, tmp_path, capsys):
    src = dialog_demo.write_dialogs(tmp_path / "demo.jsonl", 40, seed=1)
    out = tmp_path / "out"
    base = ["--input", str(src), "--tokenizer", str(tok_path), "--no-progress"]
    assert prepare_main(["--format", "dialog", *base, "--out", str(out), "--val-fraction", "0.1"]) == 0
    meta = read_meta(out)
    assert meta["kind"] == "dialog" and meta["source"] == f"dialog files {src}"
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 40
    assert "train:" in capsys.readouterr().out
    refusals = [
        (["--format", "dialog", *base, "--out", str(out)], "already exists; pass --force"),
        (["--format", "dialog", *base, "--out", str(tmp_path / "x"), "--text-field", "t"],
         "--text-field applies to --format text only"),
        (["--format", "dialog", *base, "--out", str(tmp_path / "x"), "--workers", "2"],
         "--workers applies to --format text only"),
        (["--format", "dialog", "--input", str(bundled_corpus()[0]), "--tokenizer", str(tok_path), "--out",
          str(tmp_path / "x")], "a dialog file is JSON lines"),
        ([*base, "--out", str(tmp_path / "x")], "holds dialogs (its first record has \"turns\", no 'text'); pass "
                                                "--format dialog"),
    ]
    for argv, says in refusals:
        assert prepare_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists() and read_meta(out) == meta


def test_cli_bad_line_in_a_later_file_writes_nothing(tok_path, tmp_path, capsys):
    good = write_lines(tmp_path / "good.jsonl", DIALOGS)
    bad = write_lines(tmp_path / "bad.jsonl", [SUM, SUM, {"turns": [{"speaker": "A", "text": "hi"}, {"text": "x"}]}])
    out = tmp_path / "out"
    argv = ["--format", "dialog", "--input", str(good), str(bad), "--tokenizer", str(tok_path), "--out", str(out)]
    assert prepare_main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {bad}:3: turns[1].speaker: missing; every turn needs \"speaker\" and \"text\" "
                   f"strings\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl"]


def test_demo_prepare_writes_the_corpus_the_held_out_dialogs_and_the_data(tok_path, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--prepare", str(out), "--tokenizer", str(tok_path), "--dialogs", "30", "--seed", "4"]
    assert dialog_demo.main(argv) == 0
    lines = [json.loads(x) for x in (out / "dialogs.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (out / "heldout.jsonl").read_text().splitlines()]
    assert lines == dialog_demo.make_dialogs(30, 4)
    assert held == dialog_demo.make_dialogs(dialog_demo.HELDOUT, 5)  # another seed: not trained on
    meta = read_meta(out / "data")
    assert meta["kind"] == "dialog"
    assert sum(meta["splits"][s]["documents"] for s in ("train", "val")) == 30
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert dialog_demo.main(argv) == 2  # nothing is replaced without --force
    assert "already holds dialogs.jsonl, heldout.jsonl, data; pass --force" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert dialog_demo.main(["--prepare", str(tmp_path / "other")]) == 2
    assert "--prepare needs --tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
