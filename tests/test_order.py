"""The data order (lamda_pipe/data/order.py): a keyed bijection on [0, n), O(1) per position.

The oracles are the definition of a permutation (every value once), the inverse network
(a sampled check in both directions at sizes too large to enumerate), statistics a shuffled
order must show, and, for version 1, the randperm formula written out here."""

from __future__ import annotations

import random
import statistics

import numpy as np
import pytest
import torch

from lamda_pipe.data.loader import MicroBatchStream, ShuffledSamples
from lamda_pipe.data.order import CURRENT, EpochOrder, FeistelPermutation, epoch_key, mix64

pytestmark = pytest.mark.unit

SIZES = sorted({*range(1, 130), 255, 256, 257, 1023, 1024, 1025, 4095, 4096, 4097, 10_007})


@pytest.mark.parametrize("key", [0, 1, 2**63 + 12345])
def test_every_position_maps_to_a_distinct_value_below_n(key):
    for n in SIZES:
        perm = FeistelPermutation(n, key)
        values = [perm(i) for i in range(n)]
        assert sorted(values) == list(range(n)), n
        assert [perm.inverse(v) for v in values] == list(range(n)), n


@pytest.mark.parametrize("n", [1_400_000_000, 2**40 + 3, 2**61 - 1])
def test_large_domains_are_a_bijection_on_samples_both_ways(n):
    """1.4B: LaMDA's 2.81T tokens in windows of 2048. A sample of positions and of values: the
    forward image is distinct and in range, and the inverse undoes it in both directions."""
    perm, rng = FeistelPermutation(n, epoch_key(1234, 7)), random.Random(n)
    positions = [rng.randrange(n) for _ in range(5000)] + [0, n - 1]
    values = [perm(i) for i in positions]
    assert all(0 <= v < n for v in values)
    assert len(set(values)) == len(set(positions))
    assert [perm.inverse(v) for v in values] == positions
    targets = [rng.randrange(n) for _ in range(5000)]
    assert [perm(perm.inverse(v)) for v in targets] == targets


def test_positions_outside_the_domain_are_refused():
    perm = FeistelPermutation(10, 1)
    for bad in (-1, 10, 16):
        with pytest.raises(IndexError, match="outside"):
            perm(bad)
        with pytest.raises(IndexError, match="outside"):
            perm.inverse(bad)
    with pytest.raises(ValueError, match="n >= 1"):
        FeistelPermutation(0, 1)


def test_the_order_looks_shuffled():
    """What a uniformly random permutation of 20,000 shows, with wide margins: about one fixed
    point, rank correlation near 0, half the neighbours in rising order, and each value's
    position spread evenly over the four quarters."""
    n = 20_000
    perm = FeistelPermutation(n, epoch_key(99, 0))
    values = np.array([perm(i) for i in range(n)])
    assert (values == np.arange(n)).sum() <= 6
    assert abs(np.corrcoef(np.arange(n), values)[0, 1]) < 0.03  # sd of r is 1/sqrt(n) = 0.007
    assert abs((np.diff(values) > 0).mean() - 0.5) < 0.02
    quarters = np.histogram2d(np.arange(n), values, bins=4)[0]  # 16 cells of 1250 expected
    assert np.abs(quarters - n / 16).max() < 0.1 * n / 16


def test_epochs_and_seeds_give_different_orders_each_a_full_pass():
    n = 5000
    order = EpochOrder(n, seed=3)
    epochs = [[order.index(e * n + i) for i in range(n)] for e in range(3)]
    other_seed = [EpochOrder(n, seed=4).index(i) for i in range(n)]
    for e in epochs:
        assert sorted(e) == list(range(n))
    for a, b in ((epochs[0], epochs[1]), (epochs[1], epochs[2]), (epochs[0], other_seed)):
        assert sum(x == y for x, y in zip(a, b)) < 20  # ~1 expected of independent orders
    assert epoch_key(1, 0) != epoch_key(0, 1_000_003)  # seed * C + epoch collided for these


def test_without_shuffling_both_versions_are_the_identity():
    for version in (1, 2):
        order = EpochOrder(7, seed=5, shuffle=False, version=version)
        assert [order.index(k) for k in range(15)] == [*range(7), *range(7), 0]


def test_version_1_is_the_randperm_order_runs_started_with():
    n, seed = 1000, 1234
    order = EpochOrder(n, seed, version=1)
    for epoch in (0, 1):
        want = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        assert [order.index(epoch * n + i) for i in range(n)] == want
    with pytest.raises(ValueError, match="unknown data order version 3"):
        EpochOrder(n, seed, version=3)


def test_mix64_is_a_bijection_on_a_sample_and_spreads_bits():
    xs = list(range(4096)) + [2**64 - 1 - i for i in range(4096)]
    ys = [mix64(x) for x in xs]
    assert len(set(ys)) == len(xs) and all(0 <= y < 2**64 for y in ys)
    flips = [bin(mix64(x) ^ mix64(x ^ 1)).count("1") for x in range(2000)]  # one input bit changed
    assert 30 < statistics.mean(flips) < 34


@pytest.mark.parametrize("version", [1, CURRENT])
def test_a_resumed_or_relaid_stream_sees_exactly_the_samples_of_an_uninterrupted_one(version):
    """Global batch 8 as 1 rank x 8, then resumed after 3 steps as 2 ranks x 2 x 2 micro-batches:
    every step holds the same samples as the uninterrupted run's, across an epoch boundary."""
    tokens = np.arange(42 * 8 + 1) % 997
    seq, steps = 8, 12  # 42 windows: the epochs end inside steps 5 and 10

    def step_rows(streams, accum, first_step, n):
        out = []
        for s in range(first_step, first_step + n):
            rows = []
            for m in range(accum):
                for st in streams:
                    rows += [tuple(r) for r in st.micro_batch(s * accum + m)[0].tolist()]
            out.append(sorted(rows))
        return out

    whole = step_rows([MicroBatchStream([tokens], seq, 8, seed=2, order=version)], 1, 0, steps)
    resumed = step_rows([MicroBatchStream([tokens], seq, 2, dp_rank=r, dp_size=2, seed=2, order=version)
                         for r in range(2)], 2, 3, steps - 3)
    assert resumed == whole[3:]
    assert len({r for step in whole[:5] for r in step}) == 40  # within an epoch no sample repeats


def test_the_order_version_reaches_the_windows():
    tokens = np.arange(101 * 4 + 1)
    v1 = ShuffledSamples(tokens, 4, seed=9, order=1)
    v2 = ShuffledSamples(tokens, 4, seed=9, order=2)
    assert sorted(map(v1.window, range(101))) == sorted(map(v2.window, range(101))) == list(range(101))
    assert [v1.window(k) for k in range(20)] != [v2.window(k) for k in range(20)]
