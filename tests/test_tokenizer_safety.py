"""The tokenizer trainer on pathological input: long runs without whitespace cost bounded time
(training splits them into MAX_WORD_CHARS pieces), and SIGTERM / SIGINT stop it promptly while
the native trainer runs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lamda_pipe.data.tokenizer import MAX_WORD_CHARS, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.unit
def test_long_runs_without_whitespace_are_cut_into_bounded_pieces_for_training_only():
    text = "a" * 20_000 + " ordinary words " + "xy" * 5_000
    start = time.perf_counter()
    tok = train_tokenizer([text, "more ordinary words"], vocab_size=600)
    took = time.perf_counter() - start
    longest = max(len(t.lstrip("▁")) for t in tok.get_vocab())
    assert longest <= MAX_WORD_CHARS  # uncapped, BPE learns 'a' x 128, 256, ... from the one long word
    assert json.loads(tok.to_str())["pre_tokenizer"]["type"] == "Metaspace"  # encoding as before
    assert tok.decode(tok.encode(text).ids) == text
    assert took < 10  # 0.01 s here; the uncapped trainer needs 2 s for 80k 'a's, 12-20 s for 160k


def random_words_text() -> str:
    """~3.4 MB of random words: seconds of native BPE merging at 100000 tokens."""
    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 12)))
             for _ in range(200_000)]
    return "\n\n".join(" ".join(rng.choice(words) for _ in range(2000)) for _ in range(200))


@pytest.mark.launch
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_tokenizer_training_promptly(tmp_path, sig, status):
    # The input is a named pipe, so the test knows when the trainer has read it all: from the
    # writer's close on, the trainer is merging in native code, whatever this machine's speed.
    text = random_words_text()
    fifo = tmp_path / "words.txt"
    os.mkfifo(fifo)
    out = tmp_path / "tok.json"
    proc = subprocess.Popen([sys.executable, "-m", "lamda_pipe.tools.train_tokenizer", "--input", str(fifo),
                             "--out", str(out), "--vocab-size", "100000", "--no-progress"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # SIGINT as a terminal leaves it: a suite started in the background of a
                            # script inherits it ignored, and so would the tool
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        with open(fifo, "w") as writer:  # blocks until the tool opens it for reading
            writer.write(text)
        time.sleep(0.3)  # the last pipe buffer read, the merges under way
        assert proc.poll() is None, proc.communicate()
        sent = time.perf_counter()
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    reaction = time.perf_counter() - sent
    _, err = proc.communicate()
    assert proc.returncode == status, err
    # without the waiting thread the handler runs only when the merges end, seconds later
    assert reaction < 1.5, f"took {reaction:.2f} s to stop"
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["words.txt"]
