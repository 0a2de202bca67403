"""Naive reference implementations: the oracle for parity tests and the baseline in bench/.

Written the obvious way on purpose (explicit scores, a Python loop for the buckets, a boolean
mask, softmax), sharing no code with lamda_pipe.model's attention path.
"""

from __future__ import annotations

import math

import torch


def naive_bucket(relative_position: int, num_buckets: int = 32, max_distance: int = 128) -> int:
    """T5's unidirectional bucket for one integer r = key - query, straight from the formula."""
    n = max(-relative_position, 0)
    half = num_buckets // 2
    if n < half:
        return n
    return min(num_buckets - 1, half + int(math.log(n / half) / math.log(max_distance / half) * (num_buckets - half)))


def naive_bias(table: torch.Tensor, q_len: int, k_len: int, num_buckets: int, max_distance: int) -> torch.Tensor:
    """(H, Tq, Tk) bias from a (num_buckets, H) table; queries are the last q_len positions."""
    idx = torch.tensor([[naive_bucket(j - (k_len - q_len + i), num_buckets, max_distance) for j in range(k_len)]
                        for i in range(q_len)])
    return table[idx].permute(2, 0, 1)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                    doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + bias, causal) V for q (B, H, Tq, D), k/v (B, H, Tk, D), bias (H, Tq, Tk).

    doc_ids (B, Tk), the document of each key position (queries: the last Tq): a query sees a
    key only if both have the same document."""
    tq, tk = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    allowed = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)
    if doc_ids is not None:
        docs = doc_ids.tolist()
        same = torch.tensor([[[row[tk - tq + i] == row[j] for j in range(tk)] for i in range(tq)] for row in docs])
        allowed = allowed & same[:, None]  # (B, 1, Tq, Tk)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1) @ v
