"""A save onto a full disk (a real tmpfs, shrunk after the first checkpoint): every rank stops
with the same one-line error, none waits in a barrier, the unfinished folder is removed, and the
previous checkpoint and `latest` are intact."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.dist_utils import run_ranks
from tests.helpers import TINY_PIPE
from tests.test_pipeline import ds_config, token_stream
from tests.test_resume_dropout import _checkpointer

MS_REMOUNT = 32


def mount_tmpfs(path: Path, size_kb: int, remount: bool = False) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    flags = MS_REMOUNT if remount else 0
    if libc.mount(b"tmpfs", str(path).encode(), b"tmpfs", flags, f"size={size_kb}k".encode()) != 0:
        return ctypes.get_errno()
    return 0


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    err = mount_tmpfs(disk, 64 * 1024)
    if err:
        pytest.skip(f"cannot mount a tmpfs here (errno {err}): needs root (CAP_SYS_ADMIN)")
    yield disk
    ctypes.CDLL(None).umount2(str(disk).encode(), 2)


def save_until_full(rank, disk: str, only_rank_1: bool):
    """Saves step 1, shrinks the disk, saves step 2. only_rank_1: room for rank 0's part of the
    second checkpoint and half of rank 1's, which writes late, so only rank 1's writes fail."""
    import os

    import deepspeed
    import torch.distributed as dist

    from lamda_pipe.distributed import init_distributed
    from lamda_pipe.errors import CheckpointError
    from lamda_pipe.pipeline import build_pipeline, stage_bounds

    init_distributed()
    bounds = stage_bounds(TINY_PIPE, 2)
    net = build_pipeline(TINY_PIPE, bounds, seed=42)
    engine, *_ = deepspeed.initialize(model=net, model_parameters=list(net.parameters()), config=ds_config())
    saver = _checkpointer(Path(disk) / "checkpoints", bounds)
    written = []  # what this rank's DeepSpeed writes at step 1
    write = engine.checkpoint_engine.save

    def recording(state_dict, path):
        write(state_dict, path)
        written.append(os.path.getsize(path))
    engine.checkpoint_engine.save = recording
    batches = token_stream().iterate()
    engine.train_batch(batches)
    assert saver.save(engine, 1, last_step=True)
    engine.checkpoint_engine.save = write
    shares = [None, None]
    dist.all_gather_object(shares, sum(written))
    if rank == 0:
        used = shutil.disk_usage(disk).used
        room = shares[0] + shares[1] // 2 + 64 * 1024 if only_rank_1 else (shares[0] + shares[1]) // 2
        assert mount_tmpfs(Path(disk), (used + room) // 1024, remount=True) == 0
    elif only_rank_1:
        def late(*args, **kwargs):
            time.sleep(0.5)  # rank 0 has written all of its part by then
            return write(*args, **kwargs)
        engine.checkpoint_engine.save = late
    dist.barrier()
    engine.train_batch(batches)
    start = time.perf_counter()
    try:
        saver.save(engine, 2, last_step=True)
    except CheckpointError as e:
        return {"error": str(e), "took": time.perf_counter() - start}
    return {"error": None}


@pytest.mark.distributed
@pytest.mark.parametrize("only_rank_1", [False, True], ids=["every-rank-fails", "only-rank-1-fails"])
def test_full_disk_during_a_save_keeps_the_previous_checkpoint_and_stops_every_rank(small_disk, only_rank_1):
    from lamda_pipe.checkpoint import validate
    from lamda_pipe.run_format import latest_tag_dir

    results = run_ranks(save_until_full, 2, str(small_disk), only_rank_1, timeout=60)
    for r in results:
        assert r["error"] is not None and "\n" not in r["error"]
        assert r["error"].startswith("the checkpoint at step 2 was not completed (removed): ")
        assert "the previous checkpoint global_step1 and `latest` are intact" in r["error"]
        assert r["took"] < 30
    assert "is full" in results[1]["error"]
    if only_rank_1:  # rank 0 wrote all of its part, and still stops: the ranks agree
        assert "another rank could not write its part" in results[0]["error"]
    ckpt = small_disk / "checkpoints"
    assert latest_tag_dir(ckpt) == ckpt / "global_step1"
    assert validate(ckpt / "global_step1").global_steps == 1
    assert not (ckpt / "global_step2").exists()


@pytest.fixture
def twelve_mb_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    err = mount_tmpfs(disk, 12 * 1024)  # the demo's data and one checkpoint (8.3 MB) fit, a second does not
    if err:
        pytest.skip(f"cannot mount a tmpfs here (errno {err}): needs root (CAP_SYS_ADMIN)")
    yield disk
    ctypes.CDLL(None).umount2(str(disk).encode(), 2)


def run_demo_on(run_dir: Path, *flags: str, direct: bool = False) -> subprocess.CompletedProcess:
    """The demo on 2 ranks (tests.test_e2e.launch) without validation or sample, its status unchecked."""
    from tests.test_e2e import launch

    return launch(run_dir, "--eval-every", "0", "--sample-tokens", "0", *flags, check=False, direct=direct)


@pytest.mark.launch
def test_full_disk_through_the_launcher_is_one_line_and_exit_2(twelve_mb_disk):
    """What the user sees: ds_train.py's one line per rank, the launcher's non-zero exit, the
    previous checkpoint intact and resumable."""
    from lamda_pipe.checkpoint import validate
    from lamda_pipe.run_format import latest_tag_dir

    run_dir = twelve_mb_disk / "run"
    proc = run_demo_on(run_dir, "--steps", "4", "--save-every", "2")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "ds_train.py: error:" in line]
    assert len(errors) == 2, proc.stderr[-3000:]  # one per rank
    assert "Traceback" not in proc.stderr
    assert any(f"the disk holding {run_dir / 'checkpoints'} is full" in e for e in errors)
    assert all("the checkpoint at step 4 was not completed (removed)" in e and
               "the previous checkpoint global_step2 and `latest` are intact" in e for e in errors)
    ckpt = run_dir / "checkpoints"
    assert latest_tag_dir(ckpt) == ckpt / "global_step2" and validate(ckpt / "global_step2").global_steps == 2
    assert not (ckpt / "global_step4").exists()


@pytest.mark.unit
def test_the_failure_line_says_what_was_kept(tmp_path):
    import errno as errno_codes

    from lamda_pipe.checkpoint import save_failure

    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    full = OSError(errno_codes.ENOSPC, "No space left on device")
    assert "no earlier checkpoint exists" in save_failure(ckpt, 2, [full])
    (ckpt / "latest").write_text("global_step2")
    line = save_failure(ckpt, 4, [full])
    assert line.startswith(f"the checkpoint at step 4 was not completed (removed): the disk holding {ckpt} is full")
    assert "the previous checkpoint global_step2 and `latest` are intact" in line
    assert "another rank could not write its part" in save_failure(ckpt, 4, [])
    assert "writing it failed (PermissionError: denied)" in save_failure(ckpt, 4, [PermissionError("denied")])
    (ckpt / "latest").write_text("global_step4")  # only keep-last's deletion failed
    assert save_failure(ckpt, 4, [PermissionError("denied")]).startswith(
        "the checkpoint at step 4 is complete and `latest` names it, but deleting older checkpoints failed")
