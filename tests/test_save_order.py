"""The commit order of a save on real DeepSpeed ranks: `latest` moves only after every rank has
written its files and after the completion marker. Rank 1 is made the slow writer; rank 0 looks
at the folder at the moment it replaces `latest`. (A copy of the code that moved `latest` before
the barrier, or before the marker, passed every other test.)"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.dist_utils import run_ranks
from tests.test_resume_dropout import _checkpointer
from tests.test_pipeline import ds_config, token_stream
from tests.helpers import TINY_PIPE

pytestmark = pytest.mark.distributed
SLOW_WRITER_DELAY = 0.5  # before each of rank 1's files: far longer than rank 0's whole save


def save_once(rank, ckpt_dir: str):
    import deepspeed

    import lamda_pipe.checkpoint as checkpoint
    from lamda_pipe.distributed import init_distributed
    from lamda_pipe.pipeline import build_pipeline, stage_bounds
    from lamda_pipe.run_format import COMPLETE, LATEST

    init_distributed()
    bounds = stage_bounds(TINY_PIPE, 2)
    net = build_pipeline(TINY_PIPE, bounds, seed=42)
    engine, *_ = deepspeed.initialize(model=net, model_parameters=list(net.parameters()), config=ds_config())
    saver = _checkpointer(Path(ckpt_dir), bounds)
    engine.train_batch(token_stream().iterate())
    seen = {}
    if rank == 1:  # each of its files is written late (DeepSpeed's own barriers come before the writes)
        write = engine.checkpoint_engine.save

        def slow_write(*args, **kwargs):
            time.sleep(SLOW_WRITER_DELAY)
            return write(*args, **kwargs)
        engine.checkpoint_engine.save = slow_write
    else:
        real_write_atomic = checkpoint.write_atomic

        def watching(path, text):
            if path.name == LATEST:  # what the folder holds when `latest` moves to it
                tag_dir = path.parent / text
                expected = saver.record.expected_files()
                seen["missing"] = [n for n in expected if not (tag_dir / n).is_file()]
                seen["complete"] = (tag_dir / COMPLETE).is_file()
            return real_write_atomic(path, text)
        checkpoint.write_atomic = watching
        # whoever writes `latest` (our commit, or DeepSpeed's own when asked): every version of it
        stop = threading.Event()
        seen["early"] = []

        def watch_latest():
            latest, last = Path(ckpt_dir) / LATEST, None
            while not stop.is_set():
                try:
                    stamp = latest.stat().st_mtime_ns
                except FileNotFoundError:
                    stamp = None
                if stamp != last and stamp is not None:
                    tag_dir = Path(ckpt_dir) / latest.read_text().strip()
                    missing = [n for n in saver.record.expected_files() if not (tag_dir / n).is_file()]
                    if missing:
                        seen["early"].append(missing)
                last = stamp
                time.sleep(0.001)
        watcher = threading.Thread(target=watch_latest, daemon=True)
        watcher.start()
    assert saver.save(engine, engine.global_steps, last_step=True)
    if rank == 0:
        stop.set()
        watcher.join()
        tag_dir = Path(ckpt_dir) / "global_step1"
        newest = max(p.stat().st_mtime_ns for p in tag_dir.iterdir())
        seen["latest_after_every_file"] = (Path(ckpt_dir) / LATEST).stat().st_mtime_ns >= newest
        seen["latest"] = (Path(ckpt_dir) / LATEST).read_text()
    return seen


def test_latest_moves_after_every_rank_wrote_and_after_the_marker(tmp_path):
    seen = run_ranks(save_once, 2, str(tmp_path / "checkpoints"))[0]
    assert seen["latest"] == "global_step1"
    assert seen["missing"] == []  # rank 1's files were there although it wrote last
    assert seen["complete"]
    assert seen["latest_after_every_file"]
    assert seen["early"] == []  # never, not even for a moment, named a folder still being written
