"""The Slurm scripts ask for what preemption handling relies on (unit: the files are read, not run;
tests/test_slurm.py runs them on a real Slurm but sends the time-limit signal itself, so a script
that stopped asking Slurm for it would still pass there)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lamda_pipe.errors import EXIT_HUNG, EXIT_REQUEUE

pytestmark = pytest.mark.unit

SLURM = Path(__file__).resolve().parent.parent / "scripts" / "slurm"
SCRIPTS = ["pretrain.sbatch", "pretrain_srun.sbatch"]


def sbatch_options(path: Path) -> list[str]:
    """The #SBATCH options sbatch reads: from the top of the script up to the first command
    (sbatch stops there); "##SBATCH" lines are comments."""
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("#SBATCH"):
            out.append(line.split(None, 1)[1].strip())
        elif line.strip() and not line.startswith("#"):
            break
    return out


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_asks_for_a_signal_before_the_time_limit_and_may_be_requeued(name):
    options = sbatch_options(SLURM / name)
    assert "--requeue" in options
    signal = [o for o in options if o.startswith("--signal=")]
    assert len(signal) == 1, options
    m = re.fullmatch(r"--signal=B:USR1@(\d+)", signal[0])
    assert m, signal  # to the batch shell (B:), which forwards it to the ranks; USR1 is what it traps
    assert 60 <= int(m[1]) <= 3600  # seconds before the limit: enough to reach a step boundary and save
    assert "source" in (SLURM / name).read_text() and "common.sh" in (SLURM / name).read_text()


def test_the_shared_script_traps_usr1_and_requeues_on_the_trainers_exit_statuses():
    text = (SLURM / "common.sh").read_text()
    assert re.search(r"^\s*trap forward_stop USR1$", text, re.M)
    assert re.search(rf"^EXIT_REQUEUE={EXIT_REQUEUE}\b", text, re.M)
    assert re.search(rf"^EXIT_HUNG={EXIT_HUNG}\b", text, re.M)
    assert "scontrol requeue" in text


def test_the_prepare_script_is_an_array_whose_tasks_rerun_and_log_apart():
    """prepare.sbatch: an array (its task count is N unless LAMDA_SHARDS says otherwise), requeued
    after a node failure (the task redoes its part), one log per task (%A_%a), and each task ends
    in the tool itself (exec), so that a signal reaches the process that cleans up its work dir."""
    text = (SLURM / "prepare.sbatch").read_text()
    options = sbatch_options(SLURM / "prepare.sbatch")
    assert any(re.fullmatch(r"--array=0-\d+", o) for o in options), options
    assert "--requeue" in options
    assert any(o.startswith("--output=") and "%A_%a" in o for o in options), options
    assert '--shard "$SLURM_ARRAY_TASK_ID/$LAMDA_SHARDS"' in text
    assert re.search(r'^exec "\$\{CMD\[@\]\}"$', text, re.MULTILINE)
