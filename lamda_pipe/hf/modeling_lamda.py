"""LaMDAForCausalLM for Hugging Face transformers: the model half of a `lamda-export --format hf`
directory, loaded with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True).

Self-contained on purpose (torch and transformers only; it never imports lamda_pipe): the export
dir carries this file to machines where only transformers is installed. It is a second, separately
written implementation of the network in lamda_pipe/model.py and attention.py, and
tests/test_hf_export.py holds the two to the same logits:

* pre-norm RMSNorm blocks without biases: x + Attn(Norm(x)), then x + GEGLU(Norm(x));
* attention scores (q . k) / sqrt(dim_head) + a learned T5 relative position bias (one
  num_buckets x heads table per layer, bucket of key - query as in T5's decoder), causal;
* GEGLU: proj_out(GELU(gate) * value) with proj_in = [value | gate];
* logits = h . E^T with E the input embedding (the head owns no weights).

Parameter names equal lamda_pipe's (embed.weight, blocks.N.attn.qkv.weight, ...), so the same
model.safetensors loads into either. Decoding keeps keys and values in a transformers
DynamicCache. attention_mask masks keys (padding); the bias depends on key - query only, so
left padding does not move the real tokens' positions relative to each other.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_lamda import LaMDAConfig

# transformers 5 names the cache `cache` (in outputs and model inputs), 4.x `past_key_values`.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def t5_bucket(distance, num_buckets, max_distance):
    """Bucket of each causal distance n = query - key >= 0 (integer tensor), as T5's decoder:
    n < B/2 is its own bucket, larger n are log-spaced over B/2 .. B-1, n >= max_distance is B-1.
    A future key (n < 0) is masked anyway; it gets bucket 0."""
    n = distance.clamp(min=0)
    exact = num_buckets // 2
    # n / exact >= 1 where used; the clamp keeps log() finite for the exact buckets
    log_part = torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_part * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return torch.where(n < exact, n, far)


class LaMDARMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class LaMDARelativeBias(nn.Module):
    def __init__(self, num_buckets, heads):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_buckets, heads))


class LaMDAAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.heads, self.dim_head, self.layer_idx = config.heads, config.dim_head, layer_idx
        inner = config.heads * config.dim_head
        self.qkv = nn.Linear(config.dim, 3 * inner, bias=False)  # [q | k | v], each heads x dim_head
        self.out = nn.Linear(inner, config.dim, bias=False)
        self.rel_bias = LaMDARelativeBias(config.num_buckets, config.heads)
        self.dropout = config.dropout

    def forward(self, x, buckets, allowed, cache=None):
        """x (B, T, dim); buckets (T, S) long and allowed (B, 1, T, S) bool, S = cached + T keys."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, H, S, D): the past keys and values, then these
        bias = self.rel_bias.weight[buckets].permute(2, 0, 1)[None]  # (T, S, H) -> (1, H, T, S)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dim_head) + bias  # (B, H, T, S)
        # A finite minimum, not -inf: a padding query that sees only padding gets uniform weights, not NaN.
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = F.dropout(scores.float().softmax(dim=-1).to(q.dtype), self.dropout, self.training)
        y = (probs @ v).transpose(1, 2).reshape(b, t, self.heads * self.dim_head)  # (B, H, T, D) -> (B, T, H*D)
        return self.out(y)


class LaMDAGEGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        d_ff = config.ff_mult * config.dim
        self.proj_in = nn.Linear(config.dim, 2 * d_ff, bias=False)  # [value | gate]
        self.proj_out = nn.Linear(d_ff, config.dim, bias=False)

    def forward(self, x):
        value, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(F.gelu(gate) * value)


class LaMDABlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn_norm = LaMDARMSNorm(config.dim, config.norm_eps)
        self.attn = LaMDAAttention(config, layer_idx)
        self.ff_norm = LaMDARMSNorm(config.dim, config.norm_eps)
        self.ff = LaMDAGEGLU(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, buckets, allowed, cache=None):
        x = x + self.drop(self.attn(self.attn_norm(x), buckets, allowed, cache))
        return x + self.drop(self.ff(self.ff_norm(x)))


class LaMDAPreTrainedModel(PreTrainedModel):
    config_class = LaMDAConfig
    base_model_prefix = "lamda"  # no submodule has this name: the checkpoint's keys are used as they are
    _no_split_modules = ["LaMDABlock"]
    _supports_cache_class = True

    def _init_weights(self, module):
        """Fan-in scaled normal init, for a model built from a config alone (from_pretrained replaces it)."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.weight.shape[1] ** -0.5)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=module.weight.shape[1] ** -0.5)
        elif isinstance(module, LaMDARMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, LaMDARelativeBias):
            nn.init.zeros_(module.weight)


class LaMDAForCausalLM(LaMDAPreTrainedModel, GenerationMixin):
    # save_pretrained copies this file (and the config's) beside the weights, on every transformers version
    _auto_class = "AutoModelForCausalLM"

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(LaMDABlock(config, i) for i in range(config.depth))
        self.norm = LaMDARMSNorm(config.dim, config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return None  # the head is the input embedding itself, not a module

    def _cache_of(self, past_key_values, use_cache):
        if isinstance(past_key_values, Cache):
            return past_key_values
        if past_key_values is None:
            return DynamicCache() if use_cache else None
        cache = DynamicCache()  # the legacy form: one (key, value) pair per layer
        for i, (k, v) in enumerate(past_key_values):
            cache.update(k, v, i)
        return cache

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, labels=None,
                cache=None, **kwargs):
        """input_ids (B, T); attention_mask (B, cached + T), 0 for padding; labels (B, T) as
        input_ids (-100: no loss), shifted here. cache or past_key_values: the keys and values
        of the tokens before input_ids (either name, as the installed transformers calls it)."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = self._cache_of(cache if cache is not None else past_key_values, use_cache)
        past = cache.get_seq_length() if cache is not None else 0
        b, t = input_ids.shape
        device = input_ids.device
        q_pos = torch.arange(past, past + t, device=device)
        k_pos = torch.arange(past + t, device=device)
        distance = q_pos[:, None] - k_pos[None, :]  # (T, S) query - key
        buckets = t5_bucket(distance, self.config.num_buckets, self.config.max_distance)
        allowed = (distance >= 0)[None, None]  # (1, 1, T, S) causal
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, -(past + t):].bool()  # (B, 1, T, S)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, buckets, allowed, cache)
        logits = F.linear(self.norm(x), self.embed.weight)  # tied head: (B, T, dim) -> (B, T, vocab)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
