"""LaMDA-style decoder-only transformer in plain PyTorch (no DeepSpeed in this file).

Ordered bottom-up: relative position buckets, bias, attention, GEGLU feed-forward, block,
the full model and the seed-compatible autoregressive wrapper.

Choices written down once here:
* Relative positions as in T5's decoder: r = key - query, future keys share bucket 0 and are
  removed by the causal mask. Each layer owns its bias table (num_buckets x heads): a layer
  learns its own positional pattern, the cost is 32 * heads numbers per layer, and no table
  has to be kept in sync across pipeline stages.
* Bias scaling: scores = (q . k) / sqrt(dim_head) + bias. The bias is added to the scaled
  scores, unscaled itself (T5 omits the 1/sqrt(d) and adds the bias to raw q . k; ours is
  T5's with the table divided by sqrt(dim_head)). tests/test_model.py checks it.
* Embedding tied to the head: E ~ N(0, 1/dim), input = E[token], logits = h . E^T.
  With h the output of the final RMSNorm (RMS 1, |h| = sqrt(dim)), every logit starts as
  ~N(0, 1), so the initial loss is ln(vocab) + 1/2 (the seed started near 300). The token's
  own embedding (RMS 1/sqrt(dim)) is small next to the blocks' outputs (RMS ~1) at init, so
  the head does not start out predicting a copy of its input. Unscaled logits learned
  clearly faster than logits scaled by 1/sqrt(dim) in a comparison on the debug preset.
* RMSNorm pre-norm blocks without biases, as in the T5 family.
* Decoding (AutoregressiveWrapper.decode) keeps a KV cache: the prompt is run once, then each
  new token costs one position. Past max_seq_len it recomputes over the last max_seq_len tokens
  every step (exactly what uncached decoding does): a cache cannot slide, because its keys were
  computed with the dropped tokens in view.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import (  # noqa: F401  (re-exported: the model's public names)
    Attention,
    RelativePositionBias,
    RelativePositionBuckets,
    relative_position_bucket,
)
from .config import ModelConfig

# An exported model (lamda_pipe/export.py writes it, LaMDA.from_pretrained reads it).
EXPORT_FORMAT = "lamda-pipe-export/1"
EXPORT_CONFIG, EXPORT_WEIGHTS = "config.json", "model.safetensors"
EXPORT_META_KEYS = ("format", "dtype", "source_checkpoint", "source_step")  # config.json keys beyond ModelConfig


class GEGLUFeedForward(nn.Module):
    """out = W_down (GELU(x W_gate) * x W_value), with the two input projections fused."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj_in = nn.Linear(cfg.dim, 2 * cfg.d_ff, bias=False)  # [value | gate]
        self.proj_out = nn.Linear(cfg.d_ff, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(F.gelu(gate) * value)


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(Norm(x)), then x + FF(Norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ff_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ff = GEGLUFeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, buckets: RelativePositionBuckets,
                kv_cache: dict | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), buckets, kv_cache))
        return x + self.drop(self.ff(self.ff_norm(x)))


class TokenEmbedding(nn.Module):
    """The vocabulary matrix, used twice: lookup at the input, h . E^T at the output."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.dim))
        nn.init.normal_(self.weight, std=cfg.dim ** -0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)  # (B, T) -> (B, T, D)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)  # (B, T, D) -> (B, T, V)


def init_block_weights(block: Block, cfg: ModelConfig) -> None:
    """Fan-in scaled normal init; the two residual output projections are further scaled by
    1/sqrt(2 * depth) so the residual stream's variance does not grow with depth."""
    for name, p in block.named_parameters():
        if p.dim() == 2:
            std = p.shape[1] ** -0.5
            if name in ("attn.out.weight", "ff.proj_out.weight"):
                std /= math.sqrt(2 * cfg.depth)
            nn.init.normal_(p, std=std)


def make_block(cfg: ModelConfig) -> Block:
    block = Block(cfg)
    init_block_weights(block, cfg)
    return block


class LaMDA(nn.Module):
    """The full model: tokens (B, T) -> logits (B, T, vocab)."""

    def __init__(self, num_tokens: int | None = None, dim: int | None = None,
                 dim_head: int | None = None, depth: int | None = None, heads: int | None = None,
                 *, config: ModelConfig | None = None, attn_impl: str = "auto", **overrides):
        """attn_impl: "auto", "sdpa" or "flex", the attention kernel (lamda_pipe/attention.py);
        it changes speed and memory, not the function computed."""
        super().__init__()
        if config is None:
            # Keyword form of the seed repo: LaMDA(num_tokens=..., dim=..., dim_head=..., ...)
            given = dict(vocab_size=num_tokens, dim=dim, dim_head=dim_head, depth=depth, heads=heads)
            config = ModelConfig(**{k: v for k, v in given.items() if v is not None}, **overrides)
        elif overrides or any(v is not None for v in (num_tokens, dim, dim_head, depth, heads)):
            raise TypeError("pass either config=ModelConfig(...) or keyword sizes, not both")
        self.config = cfg = config
        self.embed = TokenEmbedding(cfg)
        self.blocks = nn.ModuleList(make_block(cfg) for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.buckets = RelativePositionBuckets(cfg.num_buckets, cfg.max_distance, attn_impl)

    def forward(self, tokens: torch.Tensor, kv_caches: list[dict] | None = None) -> torch.Tensor:
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, self.buckets, None if kv_caches is None else kv_caches[i])
        return self.embed.logits(self.norm(x))  # tied head

    @classmethod
    def from_pretrained(cls, path, device=None, dtype: torch.dtype | None = None,
                        attn_impl: str = "auto") -> "LaMDA":
        """Loads a directory written by lamda-export (config.json + model.safetensors), in eval
        mode, with safetensors only: no pickle, no DeepSpeed. dtype None keeps the stored dtype."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        cfg = read_export_config(path)
        weights_file = Path(path) / EXPORT_WEIGHTS
        try:
            state = load_file(weights_file, device="cpu")
        except SafetensorError as e:
            raise ValueError(f"{weights_file} is not a readable safetensors file ({e}); re-export the model") from None
        with torch.device("meta"):
            model = cls(config=cfg, attn_impl=attn_impl)  # shapes only: no random init of weights that are replaced next
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise ValueError(f"{weights_file} does not match its {EXPORT_CONFIG}: {e}") from None
        return model.to(device=device, dtype=dtype).eval()


def read_export_config(path) -> ModelConfig:
    """The ModelConfig of an export dir (its config.json), checking both files are there."""
    path = Path(path)
    config_file = path / EXPORT_CONFIG
    missing = [f for f in (EXPORT_CONFIG, EXPORT_WEIGHTS) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not an exported model: missing {' and '.join(missing)}; export a checkpoint first "
            f"(python scripts/export.py RUN_DIR --out {path})")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON ({e}); re-export the model") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != EXPORT_FORMAT:
        raise ValueError(f"{config_file}: format {found!r}, expected {EXPORT_FORMAT!r}; re-export the checkpoint "
                         f"with this version's lamda-export")
    return ModelConfig.from_dict({k: v for k, v in meta.items() if k not in EXPORT_META_KEYS})


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
               generator: torch.Generator | None = None, keep_logits: bool = False) -> Decoded:
        """Samples up to seq_len tokens after prompt (B, T); stops early once every row has its eos.

        use_cache: feed one token per step through LaMDA's KV cache (see the module docstring for
        contexts beyond max_seq_len); a net other than LaMDA (the seed contract: net(tokens) ->
        logits) is always run over the whole context.
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
        new = out[:, prompt.shape[1]:]
        if not alive:  # seq_len 0
            return Decoded(new, new.float(), new.new_zeros(b), [] if keep_logits else None)
        return Decoded(new, torch.stack(logprobs, dim=1), torch.stack(alive, dim=1).sum(dim=1),
                       kept if keep_logits else None)
