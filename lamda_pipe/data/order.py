"""The order of the samples within an epoch: which of n samples is the k-th of epoch e.

Two versions, because a run keeps the order it started with (the run record's `data_order`):

* Version 2 (every new run): a keyed bijection on [0, n), a pure function of (seed, epoch,
  position). Nothing is built when an epoch starts and any position costs the same few
  microseconds, at any n: at LaMDA's 2.81T tokens and seq 2048 an epoch has ~1.4B windows.
* Version 1 (runs started before version 2; kept when they resume, so that they see exactly
  the samples an uninterrupted run would): torch.randperm(n) per epoch, materialised in every
  process, 8 bytes per sample (11 GB at 1.4B windows) and seconds to minutes to build.

The bijection is a balanced Feistel network on the smallest even-width bit domain that holds
n (fewer than 4n values), made a bijection on [0, n) by cycle-walking: an output >= n is fed
through the network again until it lands below n. A Feistel network is invertible whatever its
round function, so the walk from a position below n must come back below n, and every value is
reached exactly once. With at most 4n values in the domain, a walk takes under 4 passes on
average. Six rounds of a 64-bit mixing function keyed per (seed, epoch) decorrelate the output
from the input (three or four rounds already make a keyed pseudo-random permutation).
"""

from __future__ import annotations

import torch

CURRENT = 2  # the version new runs use
VERSIONS = (1, 2)
_MASK64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """A 64-bit bijective mix (the splitmix64 finaliser): each input bit flips about half of the
    output bits, so consecutive inputs give unrelated outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class FeistelPermutation:
    """A keyed bijection on [0, n): perm(i) and its inverse, O(1) time and memory each."""

    ROUNDS = 6

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)  # 2 * half bits hold every value below n
        self.mask = (1 << self.half) - 1
        keys, k = [], mix64(key & _MASK64)
        for _ in range(self.ROUNDS):
            k = mix64(k)
            keys.append(k)
        self.keys = tuple(keys)

    def _forward(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (mix64(right ^ k) & self.mask)
        return (left << self.half) | right

    def _backward(self, y: int) -> int:
        left, right = y >> self.half, y & self.mask
        for k in reversed(self.keys):
            left, right = right ^ (mix64(left ^ k) & self.mask), left
        return (left << self.half) | right

    def _walk(self, step, x: int) -> int:
        if not 0 <= x < self.n:
            raise IndexError(f"position {x} is outside [0, {self.n})")
        x = step(x)
        while x >= self.n:
            x = step(x)
        return x

    def __call__(self, i: int) -> int:
        return self._walk(self._forward, i)

    def inverse(self, j: int) -> int:
        return self._walk(self._backward, j)


def epoch_key(seed: int, epoch: int) -> int:
    """One 64-bit key per (seed, epoch): seeds and epochs never share a key by arithmetic
    coincidence (as seed * C + epoch would for seed + 1 and epoch - C)."""
    return mix64(mix64(seed & _MASK64) ^ (epoch & _MASK64))


class EpochOrder:
    """Sample k of an endless sequence of epochs over n samples -> which of the n it is: each
    epoch its own seeded order (the identity without shuffling)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, version: int = CURRENT):
        if version not in VERSIONS:
            raise ValueError(f"unknown data order version {version}; this lamda-pipe knows {VERSIONS}")
        self.n, self.seed, self.shuffle, self.version = n, seed, shuffle, version
        self._epoch: tuple[int, object] | None = None  # (epoch, its permutation): the latest only

    def index(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        if not self.shuffle:
            return pos
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = None  # version 1: the old permutation goes before the new one is built
            self._epoch = (epoch, self._permutation(epoch))
        perm = self._epoch[1]
        return int(perm[pos]) if self.version == 1 else perm(pos)

    def _permutation(self, epoch: int):
        if self.version == 1:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            return torch.randperm(self.n, generator=g)
        return FeistelPermutation(self.n, epoch_key(self.seed, epoch))
