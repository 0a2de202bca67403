"""Shared fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: with several, the many tiny ops of the unit tests spend most of their
    time in OpenMP barriers, dreadfully so when the cores are shared with other jobs (measured
    on the 2-core CI box: the KV-cache test 6 s -> 0.06 s; even the README snippet ran 2x
    faster on a loaded machine). Results do not depend on it (fp32, tolerances 1e-5)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
