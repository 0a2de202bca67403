"""Through the launcher: a run dir whose checkpoints/latest is gone is neither started over on
(a plain rerun refuses) nor restarted at step 0 by --resume auto (it continues from the newest
complete checkpoint and says so)."""

from __future__ import annotations

import pytest

from tests.test_e2e import read_metrics
from tests.test_full_disk import run_demo_on

pytestmark = pytest.mark.launch


def test_resume_auto_continues_from_the_newest_complete_checkpoint_when_latest_is_gone(tmp_path):
    run_dir = tmp_path / "run"
    first = run_demo_on(run_dir, "--steps", "4", "--save-every", "2", "--log-every", "1", direct=True)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = run_dir / "checkpoints"
    (ckpt / "latest").unlink()
    saved = {p.name: p.stat().st_mtime_ns for p in (ckpt / "global_step4").iterdir()}

    plain = run_demo_on(run_dir, "--steps", "6", "--save-every", "2", direct=True)
    assert plain.returncode == 2 and "already holds checkpoints; to continue that run pass --resume auto" in plain.stderr

    resumed = run_demo_on(run_dir, "--steps", "6", "--save-every", "2", "--log-every", "1", "--resume", "auto",
                          direct=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"note: {ckpt / 'latest'} is missing: resuming from the newest complete checkpoint, global_step4" \
        in resumed.stdout
    assert "at step 4, 64 samples consumed" in resumed.stdout
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]  # continued, not restarted
    assert {p.name: p.stat().st_mtime_ns for p in (ckpt / "global_step4").iterdir()} == saved  # never rewritten
    assert (ckpt / "latest").read_text() == "global_step6"


def test_a_run_whose_data_dir_moved_is_not_continued_on_the_bundled_corpus(tmp_path):
    """Trained on --data .../data; that dir moved away; a resume that leaves out --data would read
    the record's missing '.../data' as the demo's own data dir and train on the bundled corpus. The
    tokenizer check after start-up refuses it, on every rank, in one line; nothing is written."""
    from tests.test_data import prepared

    (tmp_path / "elsewhere").mkdir()
    data = prepared(tmp_path / "elsewhere", "data")
    run_dir = tmp_path / "run"
    first = run_demo_on(run_dir, "--steps", "2", "--save-every", "2", "--data", str(data), direct=True)
    assert first.returncode == 0, first.stderr[-3000:]
    data.rename(tmp_path / "elsewhere" / "moved")
    saved = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints" / "global_step2").iterdir()}

    resumed = run_demo_on(run_dir, "--steps", "4", "--save-every", "2", "--resume", "auto", direct=True)
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    errors = [line for line in resumed.stderr.splitlines() if line.startswith("ds_train.py: error:")]
    assert len(errors) == 2 and "another tokenizer" in errors[0] and f"pass the run's --data ({data})" in errors[0]
    assert "Traceback" not in resumed.stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step2"
    assert not (run_dir / "checkpoints" / "global_step4").exists()
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints" / "global_step2").iterdir()} == saved
