"""A rank's life beside the training loop: stop requests, the launcher watch and the hang watchdog.

Stop requests. SIGTERM, SIGINT and SIGUSR1 only set a flag (the handler runs between bytecodes;
the signal is also written to a wake-up pipe so the watchdog thread sees it even while the main
thread waits in a collective). A process this rank descends from that is gone (the deepspeed
launcher, its runner) counts as a request too: DeepSpeed's runner dies of SIGTERM, SIGINT and
SIGUSR1 without passing them on, and its launcher dies of SIGUSR1, leaving the ranks running.
At every step boundary all ranks agree through one tiny all-reduce (MAX) on a separate gloo group,
a CPU tensor, so no accelerator sync: one rank that got the signal is enough. On agreement the
loop saves a complete checkpoint and the process exits with EXIT_REQUEUE.

Hang watchdog. A daemon thread checks once a second: no progress within --hang-timeout seconds
(a step boundary, a save phase or a validation batch; armed after the first step, so start-up
and compilation do not count), or a stop
request not carried out within --stop-timeout seconds, dumps the stack of every thread to
RUN_DIR/stacks/rank{R}.txt, prints one line naming the rank and its stage, and exits the process
(EXIT_HUNG), so the launcher ends the job and a Slurm job is requeued.

Start-up. The ancestor chain is taken when the process starts (watch_from_start, first thing in
ds_train.py's main), not when the watchdog starts after the process group, engine and resume: a
runner killed in between would otherwise leave an adopted launcher whose chain looks complete.
A launcher (DeepSpeed's launcher module) found adopted by init counts as gone. And the kernel
sends the rank PARENT_DEATH_SIGNAL when its launcher dies (PR_SET_PDEATHSIG): during start-up
that ends the rank at once (nothing to save yet); once the watchdog runs it is a stop request.

Heartbeats. Every rank keeps RUN_DIR/heartbeat/rank{R}.json (host, pid, stage, last step) fresh;
when a collective fails because a peer vanished, the survivor names the peers that are gone.
"""

from __future__ import annotations

import faulthandler
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .distributed import pid_alive
from .errors import EXIT_HUNG, EXIT_REQUEUE

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PARENT_DEATH_SIGNAL = signal.SIGUSR2  # the kernel's word that the launcher died (see Start-up)
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
ANCESTOR_GONE = 100  # a stop code above every signal number (SIGRTMAX is 64): "a launcher process is gone"
POLL_S = 1.0
HEARTBEAT_EVERY_S = 10.0
DUMP_GRACE_S = 3.0  # after dumping, before exiting: peers stuck at the same step dump theirs too
# Test-only fault injection: "RANK:STEP" makes that rank stop responding at that step boundary.
HANG_HOOK_ENV = "LAMDA_TEST_HANG_AT"

_LAUNCHER_MARKS = ("deepspeed.launcher", "torch.distributed.run", "torchrun")


def stop_reason(code: int) -> str:
    if code == ANCESTOR_GONE:
        return "its launcher is gone"
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"stop code {code}"


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) from /proc, or None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def is_launcher(argv: list[str]) -> bool:
    """DeepSpeed's runner (bin/deepspeed) or launcher (deepspeed.launcher.launch), or torchrun."""
    return any(mark in arg for arg in argv for mark in _LAUNCHER_MARKS) or any(
        os.path.basename(arg) == "deepspeed" for arg in argv[:2])


@dataclass(frozen=True)
class Ancestor:
    pid: int
    start: int | None  # start time, so a reused PID is not taken for the process

    def alive(self) -> bool:
        stat = _proc_stat(self.pid)
        if stat is None:
            return self.start is None and pid_alive(self.pid)  # no /proc: PID only
        return self.start is None or stat[1] == self.start


def job_ancestors(pid: int | None = None) -> list[Ancestor]:
    """The processes whose death should stop this rank: its parent (launcher, torchrun agent,
    slurmstepd, a test) and above it every further launcher process (the deepspeed runner). A
    shell or init above them is not watched: a closed terminal must not stop a nohup'd run."""
    pid = os.getpid() if pid is None else pid
    stat = _proc_stat(pid)
    parent = stat[0] if stat else os.getppid()
    chain = []
    while parent > 1:
        parent_stat = _proc_stat(parent)
        chain.append(Ancestor(parent, parent_stat[1] if parent_stat else None))
        if not parent_stat or not is_launcher(_cmdline(parent)):
            break
        parent = parent_stat[0]
        if not is_launcher(_cmdline(parent)):
            break
    return chain


def launcher_orphaned(chain: list[Ancestor], parent: int) -> bool:
    """Whether this rank's launcher is already gone or adopted by init: its parent is init, or the
    top of its chain is DeepSpeed's launcher module with init as parent. That module is only ever
    started by the runner (locally, or through pdsh/ssh), never left behind by a shell, so init
    as its parent means the runner died. Unless init is a launcher itself (a container whose
    entry point is the runner or torchrun). A rank started without a launcher (no LOCAL_RANK,
    e.g. under nohup) is never orphaned: a closed terminal must not stop it."""
    if "LOCAL_RANK" not in os.environ or is_launcher(_cmdline(1)):
        return False
    if parent == 1:
        return True
    top = chain[-1] if chain else None
    stat = _proc_stat(top.pid) if top else None
    return stat is not None and stat[0] == 1 and any("deepspeed.launcher" in a for a in _cmdline(top.pid))


@dataclass(frozen=True)
class JobStart:
    """The processes this rank descends from, taken when it started (watch_from_start)."""

    ancestors: list
    parent: int
    orphaned: bool


def watch_from_start() -> JobStart:
    """First thing a rank does: note its launcher chain, and have the kernel signal it if its
    launcher dies (Linux; elsewhere the watchdog's polling alone notices, once it runs)."""
    parent = os.getppid()
    chain = job_ancestors()
    if chain and is_launcher(_cmdline(parent)):
        die_with_parent(parent)
    return JobStart(chain, parent, launcher_orphaned(chain, parent))


def die_with_parent(parent: int, sig: int = PARENT_DEATH_SIGNAL) -> bool:
    """Has the kernel send this process `sig` when `parent` dies (Linux: PR_SET_PDEATHSIG), and
    sends it now if `parent` is already gone. False where the request is not possible (not
    Linux): then the caller's own polling must notice."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)
    return True


@dataclass
class Watch:
    """What the watchdog thread checks; kept apart from threads and signals so unit tests drive it."""

    hang_timeout: float
    stop_timeout: float
    ancestors: list[Ancestor] = field(default_factory=list)
    parent: int | None = None  # the parent at start-up: a different getppid() means reparented
    last_beat: float | None = None  # monotonic time of the last step boundary; None: not armed yet
    step: int = 0
    stop_code: int = 0
    stop_since: float | None = None

    def request_stop(self, code: int, now: float) -> None:
        if not self.stop_code:
            self.stop_code, self.stop_since = code, now

    def beat(self, step: int, now: float) -> None:
        self.step, self.last_beat = step, now

    def touch(self, now: float) -> None:
        """Progress inside a step's aftermath (a save phase, a validation batch): the clock restarts
        once armed, so a long save or validation is not a hang while each of its parts is bounded."""
        if self.last_beat is not None:
            self.last_beat = now

    def launcher_gone(self, getppid=os.getppid) -> bool:
        return (self.parent is not None and getppid() != self.parent) or not all(a.alive() for a in self.ancestors)

    def overdue(self, now: float) -> str | None:
        """Why this rank must end now, or None."""
        if self.stop_since is not None and now - self.stop_since > self.stop_timeout:
            return (f"stop requested ({stop_reason(self.stop_code)}) {now - self.stop_since:.0f}s ago but not "
                    f"carried out within --stop-timeout {self.stop_timeout:g}s")
        if self.last_beat is not None and now - self.last_beat > self.hang_timeout:
            return (f"no progress in {now - self.last_beat:.0f}s (--hang-timeout {self.hang_timeout:g}s; "
                    f"last step {self.step})")
        return None


class Lifecycle:
    """One per rank. start() after the process group and engine exist; should_stop(step) at every
    step boundary (collective); close() when training ends."""

    def __init__(self, run_dir: Path, rank: int, stage: int, *, hang_timeout: float, stop_timeout: float,
                 group=None, log=print, job: JobStart | None = None):
        """job: watch_from_start()'s record from when the process started (default: taken now)."""
        self.run_dir, self.rank, self.stage = Path(run_dir), rank, stage
        self.job = job
        self.watch = Watch(hang_timeout, stop_timeout)
        self.group, self.log = group, log
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._wake_r = self._wake_w = None
        self._thread: threading.Thread | None = None
        self._saved_handlers: dict = {}
        self._hang_at = _hang_hook(rank)
        self._last_heartbeat = 0.0

    @property
    def name(self) -> str:
        return f"rank {self.rank} (pipeline stage {self.stage}) on {socket.gethostname()}"

    # --- set-up and tear-down (main thread) ---
    def start(self) -> "Lifecycle":
        job = self.job or watch_from_start()
        self.watch.ancestors, self.watch.parent = job.ancestors, job.parent
        if job.orphaned:
            self.watch.request_stop(ANCESTOR_GONE, time.monotonic())
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (*STOP_SIGNALS, PARENT_DEATH_SIGNAL):
            self._saved_handlers[sig] = signal.signal(sig, self._on_signal)
        self._write_heartbeat(time.time())
        self._previous_excepthook, sys.excepthook = sys.excepthook, self._excepthook
        self._thread = threading.Thread(target=self._run, name="lamda-watchdog", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            os.write(self._wake_w, b"\0")  # wakes the watchdog's select() at once
            self._thread.join()
        if self._wake_r is not None:
            signal.set_wakeup_fd(-1)
            sys.excepthook = self._previous_excepthook
            # A rank stopping on request keeps noting stop signals until it exits: the first rank to
            # exit 75 makes `srun --kill-on-bad-exit` (or DeepSpeed's launcher) SIGTERM the others,
            # which must still exit 75, not die of the signal.
            if not self.watch.stop_code:
                for sig, handler in self._saved_handlers.items():
                    signal.signal(sig, handler)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = None

    def _excepthook(self, etype, value, tb) -> None:
        """Training ended by an exception (a collective failed): first name the peers that are gone."""
        line = describe_failure(self, value)
        if line:
            sys.stderr.write(line + "\n")  # one write: the ranks share the launcher's stderr
            sys.stderr.flush()
        self._previous_excepthook(etype, value, tb)

    def _on_signal(self, signum, frame) -> None:
        if self._closed.is_set():
            return  # stopping already: exiting with EXIT_REQUEUE
        with self._lock:
            self.watch.request_stop(ANCESTOR_GONE if signum == PARENT_DEATH_SIGNAL else signum, time.monotonic())

    def progress(self) -> None:
        """Called by the checkpointer after each save phase and the evaluator after each batch."""
        with self._lock:
            self.watch.touch(time.monotonic())

    # --- the loop's one call ---
    def should_stop(self, step: int) -> bool:
        """Collective: whether any rank was asked to stop. Marks the step boundary for the watchdog."""
        import torch
        import torch.distributed as dist

        with self._lock:
            self.watch.beat(step, time.monotonic())
            code = self.watch.stop_code
        if self._hang_at == step:
            _hang_forever()
        world = dist.get_world_size(self.group)
        # MAX over code * world + rank: the strongest request and the rank it came from, in one int.
        flag = torch.tensor([code * world + self.rank if code else -1], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        agreed = int(flag.item())
        if agreed < 0:
            return False
        with self._lock:  # other ranks' request: this rank now stops too, with the same bound
            self.watch.request_stop(agreed // world, time.monotonic())
        if self.rank == 0:
            self.log(f"stopping at step {step}: {stop_reason(agreed // world)} on rank {agreed % world}; saving a "
                     f"complete checkpoint, then exiting with status {EXIT_REQUEUE} (requeue and --resume auto "
                     f"continue from it)")
        return True

    # --- the watchdog thread ---
    def _run(self) -> None:
        while not self._closed.is_set():
            readable, _, _ = select.select([self._wake_r], [], [], POLL_S)
            now = time.monotonic()
            with self._lock:
                if readable:
                    for signum in os.read(self._wake_r, 64):
                        if signum in STOP_SIGNALS:
                            self.watch.request_stop(signum, now)
                        elif signum == PARENT_DEATH_SIGNAL:
                            self.watch.request_stop(ANCESTOR_GONE, now)
                if not self.watch.stop_code and self.watch.launcher_gone():
                    self.watch.request_stop(ANCESTOR_GONE, now)
                why = self.watch.overdue(now)
            if why and not self._closed.is_set():
                self._give_up(why)
            if time.time() - self._last_heartbeat > HEARTBEAT_EVERY_S:
                self._write_heartbeat(time.time())

    def _give_up(self, why: str) -> None:
        path = dump_stacks(self.run_dir, self.rank)
        sys.stderr.write(f"{self.name}: {why}; stacks of every thread in {path}; exiting with status {EXIT_HUNG}\n")
        sys.stderr.flush()
        time.sleep(DUMP_GRACE_S)
        os._exit(EXIT_HUNG)

    # --- heartbeats, and naming the peers that are gone ---
    def _write_heartbeat(self, wall: float) -> None:
        self._last_heartbeat = wall
        beat = {"rank": self.rank, "stage": self.stage, "host": socket.gethostname(), "pid": os.getpid(),
                "step": self.watch.step, "time": wall}
        try:
            write_heartbeat(self.run_dir, beat)
        except OSError:
            pass  # a heartbeat only helps a diagnosis; a full disk is reported by the next save

    def missing_peers(self) -> list[str]:
        return missing_peers(self.run_dir, self.rank, time.time())


def write_heartbeat(run_dir: Path, beat: dict) -> None:
    d = Path(run_dir) / "heartbeat"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".rank{beat['rank']}.json.tmp"
    tmp.write_text(json.dumps(beat))
    tmp.replace(d / f"rank{beat['rank']}.json")


def missing_peers(run_dir: Path, me: int, now: float) -> list[str]:
    """Peers whose process is gone (same host) or whose heartbeat stopped: 'rank R (pipeline stage S)...'."""
    host, out = socket.gethostname(), []
    for path in sorted(Path(run_dir, "heartbeat").glob("rank*.json")):
        try:
            b = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if b["rank"] == me:
            continue
        who = f"rank {b['rank']} (pipeline stage {b['stage']}) on {b['host']}"
        if b["host"] == host and process_gone(b["pid"]):
            out.append(f"{who}: process {b['pid']} is gone (last step {b['step']})")
        elif now - b["time"] > 3 * HEARTBEAT_EVERY_S:
            out.append(f"{who}: no heartbeat for {now - b['time']:.0f}s (last step {b['step']})")
    return out


def process_gone(pid: int) -> bool:
    """No such process, or a zombie (dead, not yet reaped by its launcher)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return not pid_alive(pid)
    return text[text.rindex(")") + 2:].split()[0] in ("Z", "X")


def dump_stacks(run_dir: Path, rank: int) -> Path:
    path = Path(run_dir) / "stacks" / f"rank{rank}.txt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"--- rank {rank}, pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
    except OSError:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        return Path("<stderr>")
    return path


def describe_failure(lifecycle: Lifecycle, exc: BaseException) -> str | None:
    """One line for an exception that ends training: which peers are gone, if any is."""
    for _ in range(3):  # a killed peer's sockets close a moment before its process is gone
        gone = lifecycle.missing_peers()
        if gone:
            break
        time.sleep(1)
    if not gone:
        return None
    return f"{lifecycle.name}: training stopped ({type(exc).__name__}) because a peer rank ended: " + "; ".join(gone)


def _hang_hook(rank: int) -> int | None:
    spec = os.environ.get(HANG_HOOK_ENV, "")
    if ":" not in spec:
        return None
    r, step = spec.split(":", 1)
    return int(step) if int(r) == rank else None


def _hang_forever() -> None:
    while True:  # test-only: a rank that stops responding (signals are still noted by the watchdog)
        time.sleep(3600)
