"""Signals, lost launchers, dead and hung ranks (lamda_pipe/lifecycle.py).

Launch tier: the real `deepspeed` runner -> launcher -> 2 ranks, each process found by PID. A
signal to any one of them ends with a complete checkpoint at the step all ranks agreed on and no
process left; a killed rank or a hung rank ends the whole job within a bound, naming the rank.
Unit tier: the watchdog's rules and the ancestor chain, without processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from lamda_pipe.errors import EXIT_HUNG, EXIT_REQUEUE
from lamda_pipe.lifecycle import ANCESTOR_GONE, HANG_HOOK_ENV, Ancestor, Watch, is_launcher, missing_peers, \
    write_heartbeat
from tests.dist_utils import free_port
from tests.test_e2e import DEEPSPEED, DS_TRAIN, ROOT

FLAGS = ["--steps", "1000", "--save-every", "1000", "--log-every", "1", "--eval-every", "0", "--sample-tokens", "0"]
GONE_BOUND_S = 20  # signal -> last process gone, a save of the tiny model included (measured 2-6 s)


class Job:
    """A 2-rank job under the deepspeed runner in its own session; its output goes to a file so
    that ranks outliving the runner can still write."""

    def __init__(self, run_dir: Path, *flags: str, env: dict | None = None):
        self.run_dir, self.log = run_dir, run_dir.with_suffix(".log")
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), DS_TRAIN, "--run-dir", str(run_dir),
               *FLAGS, *flags]
        with open(self.log, "w") as out:
            # SIGINT back to its default: a suite started in the background of a script (`cmd &`)
            # inherits it ignored, and a runner that ignores SIGINT is not the job a terminal starts
            self.runner = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                "PYTHONUNBUFFERED": "1", **(env or {})},
                                           stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.pids: dict[str, int] = {"runner": self.runner.pid}

    def wait_for_step(self, step: int, timeout: float = 90) -> None:
        """Until rank 0 logged `step`; then records the launcher's and the ranks' PIDs."""
        deadline = time.monotonic() + timeout
        while self.last_logged_step() < step:
            assert self.runner.poll() is None and time.monotonic() < deadline, f"no step {step}:\n{self.output()}"
            time.sleep(0.05)
        launcher = psutil.Process(self.runner.pid).children()[0]
        ranks = {int(re.search(r"--local_rank=(\d)", " ".join(p.cmdline())).group(1)): p.pid
                 for p in launcher.children()}
        self.pids.update(launcher=launcher.pid, rank0=ranks[0], rank1=ranks[1])

    def last_logged_step(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)

    def wait_all_gone(self, timeout: float) -> float:
        """Seconds until no process of the job is left (a zombie counts as gone)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            self.runner.poll()
            if not self.alive():
                gone = time.monotonic() - t0
                self.runner.wait(timeout=10)  # a zombie counts as gone, but its status is read here
                return gone
            time.sleep(0.02)
        raise AssertionError(f"still running after {timeout}s: {self.alive()}\n{self.output()}")

    def alive(self) -> list[str]:
        out = []
        for name, pid in self.pids.items():
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    out.append(name)
            except psutil.NoSuchProcess:
                pass
        return out

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def kill_all(self) -> None:
        for pid in self.pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.runner.wait()


@pytest.fixture
def jobs():
    started: list[Job] = []
    yield started
    for job in started:  # whatever a failed test left behind
        job.kill_all()


def complete_checkpoint(run_dir: Path) -> int:
    ckpt = run_dir / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    assert (ckpt / tag / "lamda_complete").is_file(), tag
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= {p.name for p in (ckpt / tag).iterdir()}
    return int(tag.removeprefix("global_step"))


# Every signal reaches DeepSpeed's runner and launcher, each of which handles each signal its own
# way; the ranks share one handler for the three, so each rank gets one (SIGINT reaches both ranks
# in the process-group test below): 8 cases, the runner's status as DeepSpeed makes it.
CASES = [(target, sig) for target in ("runner", "launcher") for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
         ] + [("rank0", signal.SIGTERM), ("rank1", signal.SIGUSR1)]


@pytest.mark.launch
@pytest.mark.parametrize("target,sig", CASES, ids=[f"{t}-{s.name}" for t, s in CASES])
def test_a_signal_to_any_process_saves_at_an_agreed_step_and_leaves_no_process(jobs, tmp_path, target, sig):
    job = Job(tmp_path / "run")
    jobs.append(job)
    job.wait_for_step(3)
    os.kill(job.pids[target], sig)
    t_signal = time.monotonic()
    gone_s = job.wait_all_gone(GONE_BOUND_S)
    text = job.output()
    stop = re.search(r"stopping at step (\d+): (SIG\w+|its launcher is gone) on rank (\d)", text)
    assert stop, text
    step = int(stop.group(1))
    assert complete_checkpoint(job.run_dir) == step and 3 <= step < 1000
    assert job.last_logged_step() == step  # no step after the one agreed on
    if target.startswith("rank"):
        assert job.runner.returncode == EXIT_REQUEUE, text
    print(f"{target} {sig.name}: stop at step {step} ({stop.group(2)} on rank {stop.group(3)}), last process gone {gone_s:.2f}s after the signal "
          f"(save included); runner status {job.runner.returncode}")
    assert time.monotonic() - t_signal < GONE_BOUND_S


@pytest.mark.launch
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_whole_process_group_saves_once_and_leaves_no_process(jobs, tmp_path, sig):
    """Ctrl-C in the terminal (SIGINT to the foreground process group) or `kill -- -PGID`: the
    runner, the launcher and both ranks get the signal at once, and the launcher also passes its
    own on; the ranks still agree on one step, save it complete and leave nothing behind."""
    job = Job(tmp_path / "run")
    jobs.append(job)
    job.wait_for_step(3)
    os.killpg(job.runner.pid, sig)  # the job runs in its own session: the group is the whole job
    gone_s = job.wait_all_gone(GONE_BOUND_S)
    text = job.output()
    stop = re.search(r"stopping at step (\d+): (SIG\w+|its launcher is gone) on rank (\d)", text)
    assert stop, text
    step = int(stop.group(1))
    assert complete_checkpoint(job.run_dir) == step and job.last_logged_step() == step
    assert text.count("stopping at step") == 1
    print(f"process group {sig.name}: stop at step {step}, last process gone after {gone_s:.2f}s")


@pytest.mark.launch
@pytest.mark.parametrize("target", ["runner", "launcher"])
def test_sigkill_of_the_launcher_or_runner_ends_every_rank_with_a_save(jobs, tmp_path, target):
    job = Job(tmp_path / "run")
    jobs.append(job)
    job.wait_for_step(3)
    os.kill(job.pids[target], signal.SIGKILL)
    gone_s = job.wait_all_gone(GONE_BOUND_S)
    text = job.output()
    assert "its launcher is gone on rank" in text, text
    step = int(re.search(r"stopping at step (\d+)", text).group(1))
    assert complete_checkpoint(job.run_dir) == step
    print(f"SIGKILL {target}: ranks saved at step {step}; last process gone after {gone_s:.2f}s")


def wait_for_ranks(job: Job, timeout: float = 60) -> None:
    """Until the launcher has started both ranks (they are then still starting up: importing,
    building the process group and the engine); records the PIDs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            launcher = psutil.Process(job.runner.pid).children()[0]
            ranks = [p for p in launcher.children() if "--local_rank=" in " ".join(p.cmdline())]
        except (IndexError, psutil.NoSuchProcess):
            ranks = []
        if len(ranks) == 2:
            job.pids["launcher"] = launcher.pid
            for p in ranks:
                job.pids["rank" + re.search(r"--local_rank=(\d)", " ".join(p.cmdline())).group(1)] = p.pid
            return
        time.sleep(0.02)
    raise AssertionError(f"no ranks after {timeout}s:\n{job.output()}")


@pytest.mark.launch
@pytest.mark.parametrize("target", ["runner", "launcher"])
def test_a_launcher_killed_during_start_up_leaves_no_rank(jobs, tmp_path, target):
    """SIGKILL of the runner or the launcher while the ranks are still starting up (before the
    watchdog runs): the ranks noted their launcher chain first thing, and the kernel signals them
    when their launcher dies, so none trains on alone."""
    job = Job(tmp_path / "run")
    jobs.append(job)
    wait_for_ranks(job)
    assert job.last_logged_step() == 0  # still starting up
    os.kill(job.pids[target], signal.SIGKILL)
    gone_s = job.wait_all_gone(GONE_BOUND_S + 30)  # start-up, then at most one step and a save
    assert job.last_logged_step() <= 1, job.output()
    print(f"SIGKILL {target} during start-up: last process gone after {gone_s:.2f}s")


@pytest.mark.launch
def test_sigkill_of_one_rank_ends_the_job_naming_the_rank_and_stage(jobs, tmp_path):
    job = Job(tmp_path / "run", "--stop-timeout", "10")
    jobs.append(job)
    job.wait_for_step(3)
    os.kill(job.pids["rank1"], signal.SIGKILL)
    gone_s = job.wait_all_gone(45)
    text = job.output()
    assert job.runner.returncode not in (0, EXIT_REQUEUE), text
    assert re.search(r"rank 0 \(pipeline stage 0\) on \S+: training stopped \(\w+\) because a peer rank ended: "
                     rf"rank 1 \(pipeline stage 1\) on \S+: process {job.pids['rank1']} is gone", text), text
    print(f"SIGKILL rank 1: last process gone after {gone_s:.2f}s")


@pytest.mark.launch
def test_a_hung_rank_dumps_every_ranks_stacks_and_ends_the_job(jobs, tmp_path):
    hang_timeout = 4
    job = Job(tmp_path / "run", "--hang-timeout", str(hang_timeout), env={HANG_HOOK_ENV: "1:3"})
    jobs.append(job)
    job.wait_for_step(3)
    t_hang = time.monotonic()  # within a step's time of the hang itself
    gone_s = job.wait_all_gone(hang_timeout + 25)
    text = job.output()
    assert job.runner.returncode == EXIT_HUNG, text
    assert job.last_logged_step() == 3
    assert re.search(r"rank 1 \(pipeline stage 1\) on \S+: no progress in \d+s \(--hang-timeout 4s; "
                     r"last step 3\); stacks of every thread in \S+rank1.txt", text), text
    stacks = {r: (job.run_dir / "stacks" / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert "_hang_forever" in stacks[1]
    assert "should_stop" in stacks[0]  # rank 0 waits for rank 1 in the stop agreement
    print(f"hang: last process gone {gone_s:.2f}s after the hung step (--hang-timeout {hang_timeout})")
    assert time.monotonic() - t_hang < hang_timeout + 25


# --- unit: the rules, without processes --------------------------------------------------------------

@pytest.mark.unit
def test_watch_is_armed_by_the_first_step_and_fires_after_the_hang_timeout():
    w = Watch(hang_timeout=10, stop_timeout=5)
    assert w.overdue(now=1e6) is None  # start-up, compilation: not armed yet
    w.beat(step=7, now=100)
    assert w.overdue(now=110) is None
    assert "no progress in 11s (--hang-timeout 10s; last step 7)" in w.overdue(now=111)


@pytest.mark.unit
def test_save_phases_and_validation_batches_count_as_progress_once_armed():
    w = Watch(hang_timeout=10, stop_timeout=5)
    w.touch(now=50)  # a resume's save phases before the first step do not arm the watch
    assert w.last_beat is None and w.overdue(now=1e6) is None
    w.beat(step=3, now=100)
    for now in (108, 116, 124):  # a save or validation of 24 s in parts of 8 s: alive
        w.touch(now)
        assert w.overdue(now=now + 9) is None
    assert "no progress in 11s (--hang-timeout 10s; last step 3)" in w.overdue(now=135)


@pytest.mark.unit
def test_a_stop_request_must_be_carried_out_within_the_stop_timeout():
    w = Watch(hang_timeout=1000, stop_timeout=5)
    w.request_stop(signal.SIGTERM, now=50)
    w.request_stop(signal.SIGUSR1, now=52)  # the first request counts
    assert w.stop_code == signal.SIGTERM and w.overdue(now=55) is None
    assert "stop requested (SIGTERM) 6s ago but not carried out within --stop-timeout 5s" in w.overdue(now=56)


@pytest.mark.unit
def test_launcher_gone_when_reparented_or_an_ancestor_died():
    me = psutil.Process()
    alive = Ancestor(me.pid, None)
    w = Watch(1, 1, ancestors=[alive], parent=41)
    assert not w.launcher_gone(getppid=lambda: 41)
    assert w.launcher_gone(getppid=lambda: 1)  # reparented to init or a subreaper
    stat = Path(f"/proc/{me.pid}/stat").read_text()
    start = int(stat[stat.rindex(")") + 2:].split()[19])
    assert Ancestor(me.pid, start).alive() and not Ancestor(me.pid, start + 1).alive()  # a reused PID
    w.ancestors.append(Ancestor(2 ** 22 + 1, None))  # above any pid_max: no such process
    assert w.launcher_gone(getppid=lambda: 41)
    assert ANCESTOR_GONE > max(signal.Signals)


@pytest.mark.unit
def test_launcher_processes_are_recognised_and_shells_are_not():
    assert is_launcher(["/venv/bin/python", "/venv/bin/deepspeed", "--num_gpus", "2", "ds_train.py"])
    assert is_launcher(["/venv/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x"])
    assert is_launcher(["/venv/bin/python", "/venv/bin/torchrun", "--nproc_per_node", "2"])
    assert not is_launcher(["/bin/bash", "/var/spool/slurmd/job42/slurm_script"])
    assert not is_launcher(["python", "ds_train.py", "--run-dir", "runs/deepspeed"])


@pytest.mark.unit
def test_missing_peers_names_a_gone_process_and_a_silent_host(tmp_path):
    import socket

    now = time.time()
    write_heartbeat(tmp_path, {"rank": 0, "stage": 0, "host": socket.gethostname(), "pid": os.getpid(),
                               "step": 9, "time": now})
    write_heartbeat(tmp_path, {"rank": 1, "stage": 0, "host": socket.gethostname(), "pid": 2 ** 22 + 1,
                               "step": 9, "time": now})
    write_heartbeat(tmp_path, {"rank": 2, "stage": 1, "host": "node-b", "pid": 5, "step": 8, "time": now - 100})
    write_heartbeat(tmp_path, {"rank": 3, "stage": 1, "host": "node-b", "pid": 5, "step": 9, "time": now})
    gone = missing_peers(tmp_path, me=0, now=now)
    assert gone == [f"rank 1 (pipeline stage 0) on {socket.gethostname()}: process {2 ** 22 + 1} is gone "
                    "(last step 9)", "rank 2 (pipeline stage 1) on node-b: no heartbeat for 100s (last step 8)"]


@pytest.mark.unit
def test_a_launcher_adopted_by_init_counts_as_gone(monkeypatch):
    from lamda_pipe import lifecycle

    cmdlines = {1: ["/sbin/init"], 50: ["/venv/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x"],
                60: ["/venv/bin/python", "/venv/bin/torchrun", "--nproc_per_node", "2", "ds_train.py"]}
    parents = {50: 1, 60: 1}
    monkeypatch.setattr(lifecycle, "_cmdline", lambda pid: cmdlines.get(pid, []))
    monkeypatch.setattr(lifecycle, "_proc_stat", lambda pid: (parents[pid], 7) if pid in parents else None)
    orphaned = lifecycle.launcher_orphaned
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert orphaned([Ancestor(50, 7)], parent=50)  # DeepSpeed's launcher under init: its runner died
    assert orphaned([], parent=1)  # the rank itself under init: its launcher died
    assert not orphaned([Ancestor(60, 7)], parent=60)  # torchrun under init: started with nohup, say
    parents[50] = 40
    assert not orphaned([Ancestor(50, 7)], parent=50)  # its runner (or ssh session) is alive
    parents[50] = 1
    cmdlines[1] = ["/venv/bin/python", "/venv/bin/deepspeed", "--num_gpus", "2", "ds_train.py"]
    assert not orphaned([Ancestor(50, 7)], parent=50)  # a container whose init is the runner
    cmdlines[1] = ["/sbin/init"]
    monkeypatch.delenv("LOCAL_RANK")
    assert not orphaned([], parent=1)  # no launcher at all (python ds_train.py under nohup)


@pytest.mark.unit
def test_close_restores_the_handlers_unless_the_rank_is_stopping(tmp_path):
    """A stopping rank must exit 75 even when srun or the launcher SIGTERMs it on the way out."""
    from lamda_pipe.lifecycle import Lifecycle

    before = signal.getsignal(signal.SIGTERM)
    Lifecycle(tmp_path, 0, 0, hang_timeout=60, stop_timeout=60).start().close()
    assert signal.getsignal(signal.SIGTERM) is before

    lc = Lifecycle(tmp_path, 0, 0, hang_timeout=60, stop_timeout=60).start()
    try:
        lc.watch.request_stop(signal.SIGUSR1, now=time.monotonic())
        lc.close()
        assert signal.getsignal(signal.SIGTERM) == lc._on_signal
        os.kill(os.getpid(), signal.SIGTERM)  # noted and ignored: this process is exiting 75 anyway
        time.sleep(0.01)
    finally:
        signal.signal(signal.SIGTERM, before)
        for sig in (signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, lc._saved_handlers[sig])
    assert (tmp_path / "heartbeat" / "rank0.json").is_file()
