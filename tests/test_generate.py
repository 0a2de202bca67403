"""Decoding with the KV cache, top-k, sample-and-rank and the lamda-generate CLI (CPU, fp32).

Oracles: a full uncached forward of the whole sequence (causality makes position t's logits the
distribution the decoder sampled step t from), and greedy decoding written out by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lamda_pipe.attention as attention_mod
from lamda_pipe import AutoregressiveWrapper, LaMDA, ModelConfig
from lamda_pipe.export import export_checkpoint
from lamda_pipe.data.tokenizer import load_tokenizer, special_ids, vocab_size
from tests import helpers
from tests.helpers import train_tiny_tokenizer, write_layer_files, write_run_info

TINY = helpers.TINY_FEW_BUCKETS  # a 40-token context reaches every kind of bucket


pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]  # one_thread: see tests/conftest.py


def tiny_model(cfg: ModelConfig = TINY, seed: int = 0) -> LaMDA:
    return helpers.tiny_model(cfg, seed, bias_std=0.5)  # a non-zero bias table: positions matter in every check


def full_logits(model: LaMDA, prompt: torch.Tensor, new: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(B, S, V): the uncached distribution of every new token; with a window, each step sees
    only the last `window` tokens."""
    seq = torch.cat([prompt, new], dim=1)
    t0 = prompt.shape[1]
    with torch.no_grad():
        if window is None:
            return model(seq)[:, t0 - 1:-1].float()
        return torch.stack([model(seq[:, max(0, t - window):t])[:, -1] for t in range(t0, seq.shape[1])], dim=1)


@pytest.mark.parametrize("use_cache", [True, False])
def test_decode_logits_match_the_uncached_forward_at_every_step(use_cache):
    model = tiny_model()
    wrapper = AutoregressiveWrapper(model, max_seq_len=TINY.max_seq_len)
    prompt = torch.randint(0, TINY.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
    d = wrapper.decode(prompt, 20, top_k=40, use_cache=use_cache, keep_logits=True,
                       generator=torch.Generator().manual_seed(2))
    assert d.tokens.shape == (3, 20) and len(d.logits) == 20
    oracle = full_logits(model, prompt, d.tokens)
    torch.testing.assert_close(torch.stack(d.logits, dim=1), oracle, rtol=0, atol=1e-5)


def test_cached_decoding_past_max_seq_len_recomputes_the_window():
    """12-token window, 5-token prompt, 20 new tokens: after 7 steps every step sees the last 12."""
    model = tiny_model()
    wrapper = AutoregressiveWrapper(model, max_seq_len=12)
    prompt = torch.randint(0, TINY.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    d = wrapper.decode(prompt, 20, top_k=40, keep_logits=True, generator=torch.Generator().manual_seed(4))
    oracle = full_logits(model, prompt, d.tokens, window=12)
    torch.testing.assert_close(torch.stack(d.logits, dim=1), oracle, rtol=0, atol=1e-5)
    # and the window matters: the unwindowed distribution differs once the context exceeds 12
    assert not torch.allclose(full_logits(model, prompt, d.tokens)[:, -1], oracle[:, -1], atol=1e-3)


def test_cached_decoding_builds_buckets_once_and_keeps_the_cache_bounded(monkeypatch):
    calls = []
    real = attention_mod.relative_position_bucket
    monkeypatch.setattr(attention_mod, "relative_position_bucket", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_model()
    wrapper = AutoregressiveWrapper(model, max_seq_len=TINY.max_seq_len)
    wrapper.generate(torch.zeros(1, 4, dtype=torch.long), 50, generator=torch.Generator().manual_seed(5))
    assert len(calls) == 2  # the prompt's (4, 4) buckets, then one row that serves all 49 steps
    assert len(model.positions._cache) == 1 and len(model.positions._rows) == 1


def greedy_by_hand(model, prompt, steps, eos=None):
    out = prompt
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(out)[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=-1)
            if eos is not None and nxt.item() == eos:
                break
    return out[:, prompt.shape[1]:]


def test_only_top_k_tokens_are_ever_sampled():
    model = tiny_model()
    wrapper = AutoregressiveWrapper(model, max_seq_len=TINY.max_seq_len)
    prompt = torch.randint(0, TINY.vocab_size, (1, 6), generator=torch.Generator().manual_seed(6)).expand(150, -1)
    k = 5
    # temperature 3 flattens the top k, and would let other tokens through if the filter leaked
    new = wrapper.generate(prompt, 8, top_k=k, temperature=3.0, generator=torch.Generator().manual_seed(7))
    top = full_logits(model, prompt, new).topk(k, dim=-1).indices  # (B, S, k)
    assert (new[..., None] == top).any(-1).all()
    assert set(new[:, 0].tolist()) == set(top[0, 0].tolist())  # it samples, among all k
    # without the filter, tokens outside the top k do appear: the check above can fail
    loose = wrapper.generate(prompt, 8, top_k=TINY.vocab_size, temperature=3.0,
                             generator=torch.Generator().manual_seed(7))
    top_loose = full_logits(model, prompt, loose).topk(k, dim=-1).indices
    assert not (loose[..., None] == top_loose).any(-1).all()


def test_eos_stops_generation_and_pads_finished_rows():
    model = tiny_model()
    wrapper = AutoregressiveWrapper(model, max_seq_len=TINY.max_seq_len, pad_value=0)
    # prompts whose greedy continuations do not collapse at once (a random model repeats itself)
    prompts = torch.cat([torch.randint(0, TINY.vocab_size, (1, 5), generator=torch.Generator().manual_seed(s))
                         for s in (22, 9)])
    greedy = greedy_by_hand(model, prompts, 12).tolist()
    eos = greedy[0][2]
    stop = greedy[0].index(eos)
    assert stop == 2 and eos not in greedy[1] and 0 not in greedy[0] + greedy[1]  # the test's premises
    out = wrapper.generate(prompts[:1], 12, top_k=1, eos_token=eos)
    assert out[0].tolist() == greedy[0][:stop + 1]  # up to and including the first eos, then stop
    # two rows, the first stops early: it is padded while the other goes on to the end
    both = wrapper.generate(prompts, 12, top_k=1, eos_token=eos).tolist()
    assert both[0] == greedy[0][:stop + 1] + [0] * (11 - stop)
    assert both[1] == greedy[1]


def test_sample_and_rank_returns_the_highest_mean_log_likelihood():
    model = tiny_model()
    wrapper = AutoregressiveWrapper(model, max_seq_len=TINY.max_seq_len)
    prompt = torch.randint(0, TINY.vocab_size, (6,), generator=torch.Generator().manual_seed(10))
    # an eos the model often emits, so the candidates have different lengths
    probe = wrapper.generate(prompt.expand(64, -1), 3, top_k=8, generator=torch.Generator().manual_seed(11))
    eos = int(probe.flatten().mode().values)
    # scored at temperature 1 without top-k, whatever the sampling used
    ranked = wrapper.sample_and_rank(prompt, 12, 8, top_k=8, temperature=1.5, eos_token=eos,
                                     generator=torch.Generator().manual_seed(12))
    cands = ranked.candidates
    assert len(set(cands.lengths.tolist())) > 1
    # independent recomputation: one full forward per candidate over prompt + its own tokens
    means, sums = [], []
    for i in range(8):
        toks = cands.tokens[i, :int(cands.lengths[i])]
        with torch.no_grad():
            logp = F.log_softmax(model(torch.cat([prompt, toks])[None])[0].float(), dim=-1)
        lp = logp[len(prompt) - 1:-1].gather(-1, toks[:, None])[:, 0]
        means.append(lp.mean().item())
        sums.append(lp.sum().item())
    torch.testing.assert_close(ranked.scores, torch.tensor(means), rtol=0, atol=1e-5)
    best = max(range(8), key=means.__getitem__)
    assert ranked.best == best
    assert torch.equal(ranked.tokens, cands.tokens[best, :int(cands.lengths[best])])
    assert max(range(8), key=sums.__getitem__) != best  # the plain sum would pick another one


# ---------------------------------------------------------------------------------------------
# The CLI, on an export of a tiny model with a tiny tokenizer
# ---------------------------------------------------------------------------------------------

PROMPT = "In the beginning God"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tok_file = train_tiny_tokenizer(root / "tok.json")
    cfg = TINY.replace(vocab_size=vocab_size(load_tokenizer(tok_file)))
    tag = root / "run" / "checkpoints" / "global_step7"
    write_layer_files(tiny_model(cfg), tag)
    write_run_info(tag, cfg, 7, tok_file)
    (tag.parent / "latest").write_text(tag.name)
    return export_checkpoint(root / "run", root / "export")


def run_cli(capsys, *args):
    from lamda_pipe.tools.generate import main

    rc = main(["--model", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def expected_text(tok, prompt_ids, new):
    eot = special_ids(tok)["eot"]
    new = new.tolist()
    new = new[:new.index(eot)] if eot in new else new
    return tok.decode(prompt_ids + new)


def test_cli_prints_the_sampled_text_last(export_dir, capsys):
    rc, out, err = run_cli(capsys, str(export_dir), "--prompt", PROMPT, "--max-new-tokens", "12", "--seed", "3",
                           "--device", "cpu")
    assert rc == 0 and "seed 3" in err
    tok = load_tokenizer(export_dir / "tokenizer.json")
    ids = tok.encode(PROMPT).ids
    model = LaMDA.from_pretrained(export_dir)
    new = AutoregressiveWrapper(model, max_seq_len=model.config.max_seq_len).generate(
        torch.tensor(ids), 12, top_k=40, eos_token=special_ids(tok)["eot"], generator=torch.Generator().manual_seed(3))
    last = out.splitlines()[-1]
    assert PROMPT + last == expected_text(tok, ids, new)
    assert len(last.strip()) > 0


def test_cli_top_k_1_is_greedy_and_ignores_the_seed(export_dir, capsys):
    lines = []
    for seed in ("1", "2"):
        rc, out, _ = run_cli(capsys, str(export_dir), "--prompt", PROMPT, "--max-new-tokens", "10", "--top-k", "1",
                             "--seed", seed)
        assert rc == 0
        lines.append(out.splitlines()[-1])
    assert lines[0] == lines[1]
    tok = load_tokenizer(export_dir / "tokenizer.json")
    ids = tok.encode(PROMPT).ids
    greedy = greedy_by_hand(LaMDA.from_pretrained(export_dir), torch.tensor([ids]), 10, special_ids(tok)["eot"])[0]
    assert PROMPT + lines[0] == expected_text(tok, ids, greedy)
    # sampling with k=40 is not greedy here, so the equality above says something
    rc, out, _ = run_cli(capsys, str(export_dir), "--prompt", PROMPT, "--max-new-tokens", "10", "--seed", "1")
    assert out.splitlines()[-1] != lines[0]


def test_cli_sample_and_rank_prints_the_best_candidate(export_dir, capsys):
    rc, out, err = run_cli(capsys, str(export_dir), "--prompt", PROMPT, "--max-new-tokens", "8",
                           "--num-candidates", "4", "--seed", "5")
    assert rc == 0 and err.count("candidate") == 4
    tok = load_tokenizer(export_dir / "tokenizer.json")
    ids = tok.encode(PROMPT).ids
    model = LaMDA.from_pretrained(export_dir)
    ranked = AutoregressiveWrapper(model, max_seq_len=model.config.max_seq_len).sample_and_rank(
        torch.tensor(ids), 8, 4, top_k=40, eos_token=special_ids(tok)["eot"],
        generator=torch.Generator().manual_seed(5))
    assert PROMPT + out.splitlines()[-1] == expected_text(tok, ids, ranked.tokens)


def test_cli_attention_kernels_give_the_same_text(export_dir, capsys, monkeypatch):
    """--attention reaches the model (the kernel asked for is what the layers see) and changes
    speed only: sdpa and auto sample the same text for the same seed."""
    from lamda_pipe.generation import AutoregressiveWrapper as wrapper_class

    asked = []  # the kernel setting of the model the CLI samples from
    real = wrapper_class.__init__
    monkeypatch.setattr(wrapper_class, "__init__",
                        lambda self, net, **kw: asked.append(net.attention.kernel) or real(self, net, **kw))
    texts = []
    for kernel in ("sdpa", "auto"):
        rc, out, _ = run_cli(capsys, str(export_dir), "--prompt", PROMPT, "--max-new-tokens", "12", "--seed", "4",
                             "--device", "cpu", "--attention", kernel)
        assert rc == 0
        texts.append(out.splitlines()[-1])
    assert asked == ["sdpa", "auto"]
    assert texts[0] == texts[1] and texts[0].strip()


def test_cli_unknown_attention_kernel_is_exit_2(export_dir, capsys):
    rc, out, err = run_cli(capsys, str(export_dir), "--prompt", PROMPT, "--attention", "flash")
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and "--attention" in err and "'flash'" in err and "cpu_flash" in err


@pytest.mark.parametrize("args, message", [
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--num-candidates", "0"], "--num-candidates must be >= 1"),
    (["--tokenizer", "/nonexistent/tok.json"], "--tokenizer /nonexistent/tok.json: no such file"),
    (["--device", "nodevice"], "--device nodevice cannot be used here"),
])
def test_cli_bad_input_is_one_line_and_exit_2(export_dir, capsys, args, message):
    rc, out, err = run_cli(capsys, str(export_dir), "--prompt", PROMPT, *args)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_model_without_model_or_tokenizer(export_dir, tmp_path, capsys):
    rc, _, err = run_cli(capsys, str(tmp_path / "nothing"), "--prompt", PROMPT)
    assert rc == 2 and "no such directory" in err
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((export_dir / name).read_bytes())
    rc, _, err = run_cli(capsys, str(bare), "--prompt", PROMPT)
    assert rc == 2 and "no tokenizer.json beside" in err and "--tokenizer FILE" in err
    rc, out, _ = run_cli(capsys, str(bare), "--prompt", PROMPT, "--tokenizer", str(export_dir / "tokenizer.json"),
                         "--max-new-tokens", "3")
    assert rc == 0 and out.count("\n") == 1
