"""Sampling from a LaMDA model: top-k, the seed-compatible AutoregressiveWrapper, sample-and-rank.

Decoding (AutoregressiveWrapper.decode) keeps a KV cache: the prompt is run once, then each new
token costs one position. Past max_seq_len it recomputes over the last max_seq_len tokens every
step (exactly what uncached decoding does): a cache cannot slide, because its keys were computed
with the dropped tokens in view.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .model import LaMDA


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keeps exactly the k largest logits per row (k tokens, as in the paper; ties broken by
    topk), -inf elsewhere."""
    k = max(1, min(int(k), logits.shape[-1]))
    top = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)


class Decoded(NamedTuple):
    tokens: torch.Tensor  # (B, S) new tokens; pad_value after a row's eos
    logprobs: torch.Tensor  # (B, S) log p(token) at temperature 1, unfiltered; 0 on padding
    lengths: torch.Tensor  # (B,) tokens each row generated, its eos included
    logits: list[torch.Tensor] | None  # with keep_logits: the (B, vocab) fp32 logits of every step


class Ranked(NamedTuple):
    tokens: torch.Tensor  # (L,) the best candidate, its eos included, no padding
    best: int  # its row in candidates
    scores: torch.Tensor  # (N,) mean log-prob per generated token
    candidates: Decoded  # all N


class AutoregressiveWrapper(nn.Module):
    """Seed-compatible wrapper: `wrapper(tokens)` is the next-token loss; `.generate` samples."""

    def __init__(self, net: LaMDA, max_seq_len: int = 2048, pad_value: int = 0):
        super().__init__()
        self.net = net
        self.max_seq_len = max_seq_len
        self.pad_value = pad_value

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        logits = self.net(inputs)
        return F.cross_entropy(rearrange(logits, "b t v -> (b t) v"), rearrange(labels, "b t -> (b t)"))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, seq_len: int, top_k: int = 40, temperature: float = 1.0,
                 eos_token: int | None = None, *, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Samples `seq_len` new tokens after `prompt` ((T,) or (B, T)); returns only the new ones.

        Top-k sampling over k tokens; with eos_token, a row stops at its first eos and is padded.
        """
        squeeze = prompt.dim() == 1
        out = self.decode(prompt[None] if squeeze else prompt, seq_len, top_k, temperature, eos_token,
                          use_cache=use_cache, generator=generator).tokens
        return out[0] if squeeze else out

    @torch.no_grad()
    def sample_and_rank(self, prompt: torch.Tensor, seq_len: int, num_candidates: int, top_k: int = 40,
                        temperature: float = 1.0, eos_token: int | None = None, *, use_cache: bool = True,
                        generator: torch.Generator | None = None) -> Ranked:
        """The paper's sample-and-rank: samples num_candidates continuations of one prompt (T,) in
        one batch and returns the one with the highest mean log-prob per generated token.

        The score is the model's own likelihood (temperature 1, no top-k): top-k and temperature
        shape the draws, not the judgement. It is averaged over the candidate's tokens (its eos
        included) because every token adds a negative log-prob: the plain sum would favour the
        shortest candidate whatever its quality. This is Meena's log P / T, which the LaMDA paper
        follows ("a score based on the candidate's log-likelihood and its length").
        """
        if prompt.dim() != 1 or num_candidates < 1 or seq_len < 1:
            raise ValueError("sample_and_rank takes one prompt (T,), num_candidates >= 1 and seq_len >= 1")
        d = self.decode(prompt[None].expand(num_candidates, -1), seq_len, top_k, temperature, eos_token,
                        use_cache=use_cache, generator=generator)
        scores = d.logprobs.sum(dim=1) / d.lengths
        best = int(scores.argmax())
        return Ranked(d.tokens[best, :int(d.lengths[best])], best, scores, d)

    @torch.no_grad()
    def decode(self, prompt: torch.Tensor, seq_len: int, top_k: int = 40, temperature: float = 1.0,
               eos_token: int | None = None, *, use_cache: bool = True,
               generator: torch.Generator | None = None, keep_logits: bool = False,
               cache_out: list | None = None) -> Decoded:
        """Samples up to seq_len tokens after prompt (B, T); stops early once every row has its eos.

        use_cache: feed one token per step through LaMDA's KV cache (see the module docstring for
        contexts beyond max_seq_len); a net other than LaMDA (the seed contract: net(tokens) ->
        logits) is always run over the whole context.
        cache_out: a list that receives the KV cache at the end (one dict per block), so that
        scoring (ranking.py) can go on from it. It holds the prompt and every new token but the
        last (which was sampled, never fed); after a row's eos it holds that row's padding. Left
        empty when decoding ran without a cache.
        """
        if temperature <= 0:
            raise ValueError("temperature must be > 0; use top_k=1 for greedy decoding")
        was_training = self.net.training
        self.net.eval()
        out, b = prompt, prompt.shape[0]
        cached = use_cache and isinstance(self.net, LaMDA)
        caches = None
        done = torch.zeros(b, dtype=torch.bool, device=out.device)
        alive, logprobs, kept = [], [], []
        try:
            for _ in range(seq_len):
                if cached and out.shape[1] <= self.max_seq_len:
                    if caches is None:  # prefill: the whole prompt once
                        caches = [{} for _ in self.net.blocks]
                        logits = self.net(out, kv_caches=caches)[:, -1]
                    else:  # one new position against the cached keys and values
                        logits = self.net(out[:, -1:], kv_caches=caches)[:, -1]
                else:
                    caches = None  # past max_seq_len the cache is useless; free it
                    logits = self.net(out[:, -self.max_seq_len:])[:, -1]
                logits = logits.float()  # (B, V)
                if keep_logits:
                    kept.append(logits.clone())  # not a view that would keep the prefill's (B, T, V) alive
                probs = F.softmax(top_k_filter(logits, top_k) / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
                alive.append(~done)
                logprobs.append(F.log_softmax(logits, dim=-1).gather(-1, nxt)[:, 0].masked_fill(done, 0.0))
                nxt = nxt.masked_fill(done[:, None], self.pad_value)
                out = torch.cat([out, nxt], dim=-1)
                if eos_token is not None:
                    done |= nxt[:, 0] == eos_token
                    if done.all():
                        break
        finally:
            self.net.train(was_training)
        if cache_out is not None and caches is not None:
            cache_out[:] = caches
        new = out[:, prompt.shape[1]:]
        if not alive:  # seq_len 0
            return Decoded(new, new.float(), new.new_zeros(b), [] if keep_logits else None)
        return Decoded(new, torch.stack(logprobs, dim=1), torch.stack(alive, dim=1).sum(dim=1),
                       kept if keep_logits else None)
