"""In-training lm-evaluation-harness runs (lamda_pipe/background_eval.py, ds_train.py --lm-eval).

The component is driven with a stand-in child (a small script with lamda-eval's command line
whose behaviour the test chooses: quick, held until the test lets it go, failing, or with a
grandchild) to check cadence, one-at-a-time, pinning, reporting and killing; the launch test
runs the real child (lamda-eval) inside a DeepSpeed run and compares its figures with
lamda-eval run by hand on the same checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lamda_pipe.background_eval import BackgroundEval, child_args, scores
from lamda_pipe.errors import ConfigError
from lamda_pipe.run_config import RunConfig

# Writes --json like lamda-eval, with a score from the checkpoint's step (global_stepN -> N / 100)
# and the environment it saw. --tasks picks the behaviour: quick, held (until RUN/release-N
# exists), fail, or family (starts a grandchild and waits).
STAND_IN = r'''
import json, os, subprocess, sys, time
from pathlib import Path
a = sys.argv[1:]
val = lambda f: a[a.index(f) + 1]
mode, model, out = val("--tasks"), Path(val("--model")), Path(val("--json"))
step = int(model.name.removeprefix("global_step"))
run = model.parent.parent
if mode == "fail":
    sys.exit(3)
if mode == "family":
    sleeper = subprocess.Popen(["sleep", "300"])
    (run / "grandchild").write_text(str(sleeper.pid))
if mode in ("held", "family"):
    deadline = time.time() + 60
    while not (run / f"release-{step}").exists() and time.time() < deadline:
        time.sleep(0.02)
env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "CUDA_VISIBLE_DEVICES")}
out.write_text(json.dumps({"step": step, "env": env, "results": {"t": {
    "alias": "t", "acc,none": step / 100, "acc_stderr,none": 0.5, "sample_len": 7}}}))
'''


# --- unit: flags, scores, the record -----------------------------------------------------------------

@pytest.mark.unit
def test_lm_eval_flags_are_checked_with_the_run_flags():
    ok = RunConfig(lm_eval="demo", save_every=10, lm_eval_every=20, lm_eval_args="--limit 5 --batch-size 2")
    assert ok.lm_eval_argv == ["--tasks", "demo", "--limit", "5", "--batch-size", "2", "--device", "cpu"]
    assert RunConfig(lm_eval="demo", lm_eval_args="--device=cuda:7").lm_eval_argv == ["--tasks", "demo", "--device=cuda:7"]
    assert RunConfig().lm_eval_argv is None
    refusals = [
        (dict(lm_eval_every=10), "--lm-eval-every applies to --lm-eval TASKS"),
        (dict(lm_eval_args="--limit 5"), "--lm-eval-args applies to --lm-eval TASKS"),
        (dict(lm_eval="demo", save_every=10, lm_eval_every=15), "must be a multiple of --save-every 10"),
        (dict(lm_eval="demo", lm_eval_every=0), "must be a multiple of --save-every"),
        (dict(lm_eval="demo", lm_eval_args="--json x.json"), "--lm-eval-args gives --json, which the trainer sets"),
        (dict(lm_eval="demo", lm_eval_args="--model=m"), "--lm-eval-args gives --model"),
        (dict(lm_eval="demo", lm_eval_args="--js out.json"), "--lm-eval-args gives --json"),  # abbreviated
        (dict(lm_eval="demo", lm_eval_args="--tasks demo"), "--lm-eval-args gives --tasks"),
        (dict(lm_eval="demo", lm_eval_args="--limit 0"), "--limit must be >= 1"),
        (dict(lm_eval="demo", lm_eval_args="--no-such-flag"), "unrecognized arguments: --no-such-flag"),
        (dict(lm_eval="demo", lm_eval_args="--limit '5"), "quote it as one shell word"),
        (dict(lm_eval=" , "), "--tasks is empty"),
    ]
    for kwargs, message in refusals:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            RunConfig(**kwargs)


@pytest.mark.unit
def test_preflight_refuses_lm_eval_without_the_harness(monkeypatch):
    import importlib.util

    from lamda_pipe.background_eval import check_harness

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--lm-eval needs lm-evaluation-harness: pip install 'lamda-pipe\[hf\]'"):
        check_harness(child_args("demo", ""))


@pytest.mark.unit
def test_scores_keep_the_metrics_and_drop_stderr_aliases_and_counts():
    results = {"lamda_demo_heldout": {"alias": "lamda_demo_heldout", "sample_len": 7,
                                      "word_perplexity,none": 12.5, "word_perplexity_stderr,none": "N/A",
                                      "bits_per_byte,none": 2.0, "bits_per_byte_stderr,none": 0.1},
               "mc": {"acc,none": 0.25, "acc_stderr,none": 0.04, "acc,strict": 1}}
    assert scores(results) == {"lamda_demo_heldout": {"word_perplexity": 12.5, "bits_per_byte": 2.0},
                               "mc": {"acc": 0.25, "acc,strict": 1.0}}


@pytest.mark.unit
def test_an_lm_eval_record_reaches_every_sink_at_the_checkpoints_samples():
    from lamda_pipe.metrics import MetricsLogger, Sink

    class Recording(Sink):
        def __init__(self):
            self.got = []

        def write(self, record, scalars, samples):
            self.got.append((record, scalars, samples))

    sink = Recording()
    logger = MetricsLogger([sink], tokens_per_step=1, flops_per_token=1)
    logger.log_lm_eval(20, 640, {"mc": {"acc": 0.5}, "ppl": {"bits_per_byte": 2.5}}, 12.0)
    (record, scalars, samples), = sink.got
    assert record["step"] == 20 and record["lm_eval"] == {"mc": {"acc": 0.5}, "ppl": {"bits_per_byte": 2.5}}
    assert record["lm_eval_seconds"] == 12.0
    assert scalars == {"lm_eval/mc/acc": 0.5, "lm_eval/ppl/bits_per_byte": 2.5} and samples == 640
    MetricsLogger([], tokens_per_step=1, flops_per_token=1).log_lm_eval(20, 640, {"mc": {"acc": 0.5}}, 1.0)


# --- distributed: the component with stand-in children ----------------------------------------------

class Run:
    """A run dir, a BackgroundEval on it with the stand-in child, and what it reported and said."""

    def __init__(self, root: Path, mode: str, every: int = 2, enabled: bool = True):
        self.root = root
        (root / "checkpoints").mkdir(parents=True, exist_ok=True)
        script = root / "stand_in.py"
        script.write_text(STAND_IN)
        self.reports, self.said = [], []
        self.evals = BackgroundEval(root, ["--tasks", mode, "--device", "cpu"], every, enabled=enabled,
                                    report=lambda *r: self.reports.append(r), log=self.said.append,
                                    command=[sys.executable, str(script)])

    def saved(self, step: int, last_step: bool = False) -> None:
        tag = self.root / "checkpoints" / f"global_step{step}"
        tag.mkdir(exist_ok=True)
        self.evals.after_save(step, step * 32, tag, last_step)

    def release(self, step: int) -> None:
        (self.root / f"release-{step}").write_text("")

    def wait_reported(self, n: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while len(self.reports) < n and time.time() < deadline:
            self.evals.poll()
            time.sleep(0.02)
        assert len(self.reports) == n, self.said


@pytest.mark.distributed
def test_checkpoints_on_the_cadence_are_evaluated_and_reported_with_their_step(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    run = Run(tmp_path, "quick", every=4)
    run.saved(2)  # off the cadence
    assert run.evals.pinned() == set() and not (tmp_path / "lm_eval").exists()
    run.saved(4)
    run.wait_reported(1)
    (step, samples, got, seconds), = run.reports
    assert (step, samples, got) == (4, 128, {"t": {"acc": 0.04}}) and seconds > 0
    written = json.loads((tmp_path / "lm_eval" / "step_4.json").read_text())
    assert written["env"] == {"RANK": None, "WORLD_SIZE": None, "MASTER_ADDR": None, "CUDA_VISIBLE_DEVICES": ""}
    assert "--model" in (tmp_path / "lm_eval" / "step_4.log").read_text()
    assert not list((tmp_path / "lm_eval").glob(".*partial"))
    run.saved(6, last_step=True)  # the last step's checkpoint, off the cadence
    run.evals.finish()
    assert [r[:3] for r in run.reports][1:] == [(6, 192, {"t": {"acc": 0.06}})]


@pytest.mark.distributed
def test_one_child_at_a_time_pinned_while_it_reads_and_the_last_step_waits(tmp_path):
    run = Run(tmp_path, "held")
    run.saved(2)
    assert run.evals.pinned() == {"global_step2"}
    run.saved(4)  # step 2's still runs: not evaluated, said
    assert any("step 4 not evaluated: the evaluation of step 2 is still running" in s for s in run.said)
    run.evals.poll()
    assert run.reports == [] and run.evals.pinned() == {"global_step2"}
    run.release(2)
    run.release(6)
    run.saved(6, last_step=True)  # waits for step 2's, then evaluates step 6's
    assert [r[0] for r in run.reports] == [2]
    run.evals.finish()
    assert [r[0] for r in run.reports] == [2, 6] and run.evals.pinned() == set()
    assert not (tmp_path / "lm_eval" / "step_4.json").exists()


@pytest.mark.distributed
def test_a_stop_kills_the_child_and_its_children_and_reports_nothing(tmp_path):
    run = Run(tmp_path, "family")
    run.saved(2)
    deadline = time.time() + 60
    while not (tmp_path / "grandchild").exists() and time.time() < deadline:
        time.sleep(0.02)
    grandchild = int((tmp_path / "grandchild").read_text())
    run.evals.close()  # as a stopped run does: kills whatever runs
    assert any("the evaluation of step 2 was stopped before it finished" in s for s in run.said)
    deadline = time.time() + 10
    while _alive(grandchild) and time.time() < deadline:
        time.sleep(0.02)
    assert not _alive(grandchild)
    assert run.reports == [] and run.evals.pinned() == set()
    assert not (tmp_path / "lm_eval" / "step_2.json").exists()


@pytest.mark.distributed
def test_a_failed_child_is_said_and_training_goes_on(tmp_path):
    run = Run(tmp_path, "fail")
    run.saved(2)
    run.evals.finish()
    assert run.reports == []
    assert any("the evaluation of step 2 failed (exit status 3); see" in s for s in run.said)
    run.saved(4)  # the next checkpoint is evaluated as usual
    assert run.evals.pinned() in ({"global_step4"}, set())


@pytest.mark.distributed
def test_ranks_other_than_0_start_nothing(tmp_path):
    run = Run(tmp_path, "quick", enabled=False)
    run.saved(2, last_step=True)
    run.evals.finish()
    assert run.reports == [] and run.said == [] and not (tmp_path / "lm_eval").exists()


@pytest.mark.distributed
def test_the_child_runs_at_a_lower_priority_and_dies_with_its_parent(tmp_path):
    """The real entry point (python -m lamda_pipe.background_eval): its niceness and Linux'
    idle scheduling class (CPU time only when no rank wants it), and that it ends when the
    trainer is killed without a chance to stop it (SIGKILL)."""
    child_code = ("import os, sys, time\n"
                  "import lamda_pipe.background_eval as b, lamda_pipe.tools.eval_lm as e\n"
                  "e.main = lambda argv: (print(os.nice(0), os.sched_getscheduler(0), flush=True), time.sleep(300))\n"
                  "b._child_main([])\n")
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', sys.argv[2]], stdout=open(sys.argv[1], 'w'))\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(300)\n")
    niceness = tmp_path / "nice.txt"
    niceness.write_text("")
    parent = subprocess.Popen([sys.executable, "-c", code, str(niceness), child_code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    child = int(parent.stdout.readline())
    deadline = time.time() + 60
    while not niceness.read_text().strip() and time.time() < deadline:
        time.sleep(0.05)
    nice, policy = map(int, niceness.read_text().split())
    assert nice == min(os.nice(0) + 10, 19) and policy == os.SCHED_IDLE
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    """Running (a zombie whose parent has not reaped it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.unit
def test_child_args_keep_a_device_the_user_gave():
    assert child_args("demo", "--device cuda") == ["--tasks", "demo", "--device", "cuda"]
