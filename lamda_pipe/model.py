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

from .config import ModelConfig

# An exported model (lamda_pipe/export.py writes it, LaMDA.from_pretrained reads it).
EXPORT_FORMAT = "lamda-pipe-export/1"
EXPORT_CONFIG, EXPORT_WEIGHTS = "config.json", "model.safetensors"
EXPORT_META_KEYS = ("format", "dtype", "source_checkpoint", "source_step")  # config.json keys beyond ModelConfig


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """T5's unidirectional bucket of relative_position = key - query (integer tensor).

    Future keys (r > 0) map to bucket 0. For n = -r: 0 <= n < B/2 is its own bucket;
    larger distances are log-spaced onto B/2 .. B-1, and n >= max_distance is B-1.
    """
    n = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # log-spaced part; clamp n to 1 inside the log so exact distances do not produce -inf
    val_large = max_exact + (
        torch.log(n.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).long()
    val_large = val_large.clamp(max=num_buckets - 1)
    return torch.where(is_small, n, val_large)


class RelativePositionBuckets:
    """Per-model cache of bucket indices and the causal mask for each (seq_len, device).

    Built once per sequence length and shared by every layer of a model (or of one
    pipeline stage), so the per-step work of a layer is a single gather from its table.
    """

    max_entries = 8  # training uses one shape; decoding walks through many, keep the latest few

    def __init__(self, num_buckets: int, max_distance: int):
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> one query's row

    def get(self, q_len: int, k_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (buckets (Tq, Tk) long, causal (Tq, Tk) bool: True where attention is allowed).

        Queries are the last q_len of k_len positions (q_len < k_len when decoding with a cache).
        """
        if q_len == 1:
            return self._last_row(k_len, device)
        key = (q_len, k_len, str(device))
        hit = self._cache.get(key)
        if hit is None:
            q_pos = torch.arange(k_len - q_len, k_len, device=device)
            k_pos = torch.arange(k_len, device=device)
            rel = k_pos[None, :] - q_pos[:, None]  # (Tq, Tk) key - query
            hit = (relative_position_bucket(rel, self.num_buckets, self.max_distance), rel <= 0)
            if len(self._cache) >= self.max_entries:
                self._cache.pop(next(iter(self._cache)))  # the oldest
            self._cache[key] = hit
        return hit

    def _last_row(self, k_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """One query against k_len keys: cached decoding asks for a new k_len every token. Served
        as a view of one row per device (r = -(n-1) .. 0), grown by doubling, so decoding neither
        rebuilds buckets per token nor evicts the prefill's entry from the dict."""
        row = self._rows.get(str(device))
        if row is None or row[0].shape[1] < k_len:
            n = max(k_len, 2 * row[0].shape[1] if row is not None else 256)
            rel = torch.arange(-(n - 1), 1, device=device)[None]  # (1, n) key - query
            row = (relative_position_bucket(rel, self.num_buckets, self.max_distance),
                   torch.ones(1, n, dtype=torch.bool, device=device))  # every key is in the past
            self._rows[str(device)] = row
        return row[0][:, -k_len:], row[1][:, -k_len:]  # (1, Tk) views


class RelativePositionBias(nn.Module):
    """A learned (num_buckets, heads) table turned into an additive attention mask."""

    def __init__(self, num_buckets: int, heads: int):
        super().__init__()
        # Zero start: position-agnostic apart from causality; the table learns quickly.
        self.weight = nn.Parameter(torch.zeros(num_buckets, heads))

    def forward(self, buckets: torch.Tensor, causal: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Returns the bias with the causal mask folded in: (1, H, Tq, Tk) in `dtype`."""
        bias = self.weight.to(dtype).t()[:, buckets]  # (H, Tq, Tk): gather, no permute copy
        bias = bias.masked_fill(~causal, float("-inf"))
        return bias.unsqueeze(0)


class Attention(nn.Module):
    """Multi-head causal self-attention with a per-layer T5 relative position bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.dim_head = cfg.heads, cfg.dim_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.inner_dim, bias=False)  # fused Q, K, V projections
        self.out = nn.Linear(cfg.inner_dim, cfg.dim, bias=False)
        self.rel_bias = RelativePositionBias(cfg.num_buckets, cfg.heads)

    def forward(self, x: torch.Tensor, buckets: RelativePositionBuckets,
                kv_cache: dict | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        if kv_cache is not None:  # decoding: append this step's keys and values
            if "k" in kv_cache:
                k = torch.cat([kv_cache["k"], k], dim=2)
                v = torch.cat([kv_cache["v"], v], dim=2)
            kv_cache["k"], kv_cache["v"] = k, v
        idx, causal = buckets.get(t, k.shape[2], x.device)
        mask = self.rel_bias(idx, causal, q.dtype)  # (1, H, Tq, Tk) bias + causal mask
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(rearrange(y, "b h t d -> b t (h d)"))


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
                 *, config: ModelConfig | None = None, **overrides):
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
        self.buckets = RelativePositionBuckets(cfg.num_buckets, cfg.max_distance)

    def forward(self, tokens: torch.Tensor, kv_caches: list[dict] | None = None) -> torch.Tensor:
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, self.buckets, None if kv_caches is None else kv_caches[i])
        return self.embed.logits(self.norm(x))  # tied head

    @classmethod
    def from_pretrained(cls, path, device=None, dtype: torch.dtype | None = None) -> "LaMDA":
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
            model = cls(config=cfg)  # shapes only: no random init of weights that are replaced next
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
