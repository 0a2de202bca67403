"""Running a function on N real DeepSpeed ranks (gloo, CPU) forked from the test process
(run_ranks), and a script's ranks as processes without a launcher (launch_direct).

Forking costs ~2 s per run where a fresh launcher costs ~10 s, because the parent has
already imported torch and DeepSpeed. Results come back through one pipe per rank; a rank
that raises sends its traceback, which the test then raises.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import wait


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the one definition for every test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, conn, args):
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        import torch
        torch.set_num_threads(1)  # the same thread count in every run: results are then bit-identical
        # Plain pickle: multiprocessing's own pickler would share tensor storage through file
        # descriptors that vanish when this process exits.
        conn.send_bytes(pickle.dumps(("ok", fn(rank, *args))))
    except BaseException:
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
    finally:
        conn.close()
        os._exit(0)  # skip atexit handlers inherited from pytest


def run_ranks(fn, world_size: int, *args, timeout: float = 180.0) -> list:
    """Runs fn(rank, *args) on `world_size` forked ranks and returns their results by rank."""
    # Imported before forking so that each child starts with them loaded.
    import deepspeed.runtime.pipe.engine  # noqa: F401
    import torch._dynamo  # noqa: F401

    ctx = mp.get_context("fork")
    port = free_port()
    procs, conns = [], []
    for rank in range(world_size):
        parent_end, child_end = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(fn, rank, world_size, port, child_end, args))
        p.start()
        child_end.close()
        procs.append(p)
        conns.append(parent_end)
    deadline = time.monotonic() + timeout
    results, errors = [None] * world_size, []
    pending = {conn: rank for rank, conn in enumerate(conns)}
    try:
        while pending and not errors:  # stop at the first failure: the other ranks may hang
            ready = wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                errors.append(f"ranks {sorted(pending.values())} gave no result within {timeout:.0f}s")
            for conn in ready:
                rank = pending.pop(conn)
                try:
                    status, payload = pickle.loads(conn.recv_bytes())
                except EOFError:
                    status, payload = "error", "the process died without a result"
                if status == "ok":
                    results[rank] = payload
                else:
                    errors.append(f"rank {rank}:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return results


def launch_direct(script_args: list[str], nprocs: int, *, cwd, env: dict | None = None,
                  timeout: float = 240) -> subprocess.CompletedProcess:
    """Starts `nprocs` ranks of a script (python -u SCRIPT ARGS) directly, with the environment a
    launcher gives them (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), and
    waits as DeepSpeed's launcher does: a rank that fails ends the others, and the first failing
    status is the result's. stdout and stderr are the ranks' outputs in rank order.

    For the tests whose subject is the training run (resume, layouts, fine-tuning) rather than
    the launcher: the deepspeed runner and launcher add two Python start-ups and their teardowns
    to every run (about 6 s on the 2-core CI box), and the tests of the launcher itself
    (test_e2e's main run, test_lifecycle, test_slurm, test_multinode) still use it."""
    port = free_port()
    procs, files = [], []
    for rank in range(nprocs):
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        rank_env = {**(env or os.environ), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs),
                    "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-u", *script_args], cwd=cwd, env=rank_env, stdout=out,
                                      stderr=err))
        files.append((out, err))
    deadline = time.monotonic() + timeout
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed:
                status = failed[0]
                break
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(script_args, timeout)
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    status = status or next((p.returncode for p in procs if p.returncode), 0)
    texts = []
    for out, err in files:
        out.seek(0)
        err.seek(0)
        texts.append((out.read(), err.read()))
        out.close()
        err.close()
    return subprocess.CompletedProcess(script_args, status, "".join(t[0] for t in texts),
                                       "".join(t[1] for t in texts))
