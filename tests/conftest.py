"""Shared fixtures, and the test tiers (markers registered in setup.cfg):

* every test carries exactly one of ``unit``, ``distributed``, ``launch`` (or only ``cuda``):
  collection fails otherwise, naming the test;
* a ``unit`` test that starts a process (fork, subprocess, a multiprocessing pool) fails, so
  that ``pytest -m unit`` stays an in-process inner loop of seconds.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess

import pytest
import torch

TIERS = ("unit", "distributed", "launch")


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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Before -m selects anything: every collected test is in exactly one tier."""
    for item in items:
        tiers = [t for t in TIERS if item.get_closest_marker(t) is not None]
        if len(tiers) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {' and '.join(tiers)}: a test is in one tier")
        if not tiers and item.get_closest_marker("cuda") is None:
            raise pytest.UsageError(f"{item.nodeid} has no tier marker: mark it unit, distributed, launch or cuda "
                                    "(setup.cfg [tool:pytest] says which is which)")


# --- unit tests start no process -------------------------------------------------------------------

_started: list[str] | None = None  # while a unit test's phase runs: the processes it started


def _recording(start, describe):
    @functools.wraps(start)
    def wrapper(*args, **kwargs):
        if _started is not None:
            _started.append(describe(args))
        return start(*args, **kwargs)
    return wrapper


def _argv(args) -> str:
    argv = [a.decode() if isinstance(a, bytes) else str(a) for a in (args[0] if args else [])]
    return " ".join(argv)[:120]


def _install_process_watch() -> None:
    """Every way this Python starts a process: os.fork (multiprocessing's fork context),
    _posixsubprocess.fork_exec (its spawn context), subprocess's own alias of it, posix_spawn."""
    import _posixsubprocess

    os.fork = _recording(os.fork, lambda args: "fork()")
    _posixsubprocess.fork_exec = _recording(_posixsubprocess.fork_exec, _argv)
    if getattr(subprocess, "_fork_exec", None) is not None:
        subprocess._fork_exec = _recording(subprocess._fork_exec, _argv)
    for name in ("posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            setattr(os, name, _recording(getattr(os, name), lambda args: str(args[0])))


_install_process_watch()


@contextlib.contextmanager
def _no_processes(item):
    global _started
    if item.get_closest_marker("unit") is None:
        yield
        return
    _started = []
    try:
        yield
    finally:
        started, _started = _started, None
    if started:
        pytest.fail(f"a unit test started {len(started)} process(es), first: {started[0]!r}; unit tests stay in "
                    "this process: mark it distributed or launch (setup.cfg), or keep it in-process", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _no_processes(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _no_processes(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    with _no_processes(item):
        return (yield)
