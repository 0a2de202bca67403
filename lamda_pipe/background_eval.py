"""lm-evaluation-harness during training (--lm-eval TASKS): rank 0 evaluates saved checkpoints in
a child process while the pipeline goes on training.

Why a child process: the harness, its imports and a second copy of the model stay out of rank 0,
whose step time, memory and signal handling the pipeline depends on, and the figures are those
`lamda-eval` gives for the same checkpoint, because the child *is* lamda-eval
(lamda_pipe.tools.eval_lm). It runs at the lowest CPU priority (nice, and on Linux the idle
scheduling class: CPU time only when no rank wants it), defaults to `--device cpu`
(on a GPU node every device may hold a stage; `--lm-eval-args "--device cuda:7"` picks one),
dies with its parent (PR_SET_PDEATHSIG), and sees no launcher environment (it is no rank).

Cadence: after the save of every --lm-eval-every-th step (a multiple of --save-every, so the
checkpoint exists) and after the last step's save. One child at a time: a checkpoint reached
while the previous child still runs is not evaluated, and the log says so; the end of a
finished run waits for its last evaluation, whose figures belong to the run; a stop request
(preemption) or a failure kills the child.

The checkpoint a child reads is pinned: --keep-last deletes it only after the child has ended
(Checkpointer(pinned=...)).

Results per evaluated step N, under RUN_DIR/lm_eval/: step_N.json (lamda-eval --json, renamed
into place when complete) and step_N.log (the child's output); and one metrics.jsonl record
{"step": N, "lm_eval": {task: {metric: value}}, "lm_eval_seconds": ...} whose values are also
TensorBoard scalars lm_eval/TASK/METRIC at the checkpoint's samples seen.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

from .errors import ConfigError, DataError

OUT_DIR = "lm_eval"
PARENT_VAR = "LAMDA_PIPE_EVAL_PARENT"  # the trainer's pid, for the child's die_with_parent
NICENESS = 10
# The flags the trainer sets on each child itself: --lm-eval-args must not give them.
OWN_FLAGS = ("--model", "--tasks", "--json")
_UNSET = "(set by the trainer)"  # stands for --model and --tasks while the user's flags are parsed
# Launcher variables: with them the child would look like a rank of the job to DeepSpeed / torch.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
               "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "TORCHELASTIC_RUN_ID")


def child_args(tasks: str, extra: str) -> list[str]:
    """lamda-eval's flags of every child but --model/--json, checked by lamda-eval's own parser
    (one line naming the flag, before any work; an abbreviated flag counts as the flag). Raises
    ConfigError."""
    try:
        user = shlex.split(extra)
    except ValueError as e:
        raise ConfigError(f"--lm-eval-args {extra!r}: {e}; quote it as one shell word") from None
    given = parsed(["--model", _UNSET, "--tasks", _UNSET, *user])
    own = [flag for flag, value in zip(OWN_FLAGS, (str(given.model), ",".join(given.tasks), given.json))
           if value not in (_UNSET, None)]
    if own:
        raise ConfigError(f"--lm-eval-args gives {own[0]}, which the trainer sets for each checkpoint; name the "
                          f"tasks with --lm-eval and drop {', '.join(OWN_FLAGS)} from --lm-eval-args")
    argv = ["--tasks", tasks, *user, *(["--device", "cpu"] if given.device is None else [])]
    parsed(["--model", _UNSET, *argv])
    return argv


def parsed(argv: list[str]):
    """lamda-eval's parse of argv; its refusal as a ConfigError of --lm-eval's."""
    from .tools.eval_lm import parse_args

    try:
        return parse_args(argv)
    except DataError as e:  # lamda-eval's own message names the flag
        raise ConfigError(f"--lm-eval / --lm-eval-args: {e}") from None


def check_harness(argv: list[str]) -> None:
    """Preflight, every rank: lm-evaluation-harness is installed, and task names other than
    `demo` are the harness' (indexing its tasks takes seconds, so only when such a name is given).
    argv: child_args(...)."""
    import importlib.util

    from .tools.eval_lm import check_task_names

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("--lm-eval needs lm-evaluation-harness: pip install 'lamda-pipe[hf]' (or lm-eval), "
                          "or drop --lm-eval")
    args = parsed(["--model", _UNSET, *argv])
    if any(n != "demo" for n in args.tasks):
        try:
            check_task_names(args.tasks, args.include_path)
        except DataError as e:
            raise ConfigError(f"--lm-eval: {e}") from None


def scores(results: dict) -> dict[str, dict[str, float]]:
    """lamda-eval's JSON results -> {task: {metric: value}}: the metrics ("name,filter" keys),
    without their stderr and without the harness' ',none' filter suffix."""
    return {task: {key.removesuffix(",none"): float(v) for key, v in metrics.items()
                   if "," in key and "stderr" not in key and isinstance(v, (int, float))}
            for task, metrics in results.items()}


@dataclass
class _Child:
    step: int
    samples: int
    tag: str
    proc: subprocess.Popen
    started: float
    log: IO


class BackgroundEval:
    """Rank 0's harness evaluations of saved checkpoints, one child at a time. On other ranks
    (enabled=False) every call does nothing. `close()` kills a child still running (a stop, a
    failure); `finish()` waits for it instead."""

    def __init__(self, run_dir: Path, argv: list[str] | None, every: int, *, enabled: bool,
                 report: Callable[[int, int, dict, float], None], log: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.monotonic, command: list[str] | None = None):
        """argv: child_args(...), None: --lm-eval not given; report(step, samples, scores, seconds):
        where results go (MetricsLogger.log_lm_eval); command: the child's program (default: this
        Python running lamda-eval through this module's __main__)."""
        self.out = Path(run_dir) / OUT_DIR
        self.argv, self.every = argv, every
        self.enabled = enabled and argv is not None
        self.device = parsed(["--model", _UNSET, *argv]).device if self.enabled else None
        self.report, self.log, self.clock = report, log, clock
        self.command = command or [sys.executable, "-m", __name__]
        self._child: _Child | None = None

    def pinned(self) -> set[str]:
        """Checkpoint tags a child is reading: --keep-last must not delete them yet."""
        child = self._child
        return {child.tag} if child is not None and child.proc.poll() is None else set()

    def after_save(self, step: int, samples: int, tag_dir: Path, last_step: bool = False) -> None:
        """Called after each save (every rank; only rank 0 acts): starts a child on the new
        checkpoint when the cadence says so and none is running (the last step's waits for one)."""
        if not self.enabled or not (last_step or step % self.every == 0):
            return
        self.poll()
        if self._child is not None and last_step:
            self._collect(wait=True)
        if self._child is not None:
            self.log(f"lm-eval: step {step} not evaluated: the evaluation of step {self._child.step} is still "
                     f"running (a larger --lm-eval-every, or --lm-eval-args \"--limit N\", keeps up)")
            return
        self._start(step, samples, Path(tag_dir))

    def poll(self) -> None:
        """Non-blocking: reports a child that has ended."""
        if self._child is not None and self._child.proc.poll() is not None:
            self._collect(wait=False)

    def finish(self) -> None:
        """The end of a finished run: waits for the running child and reports it."""
        if self._child is not None:
            self.log(f"lm-eval: waiting for the evaluation of step {self._child.step} ({self.out})")
            self._collect(wait=True)

    def close(self) -> None:
        """Kills a running child (its process group) and says so; nothing is reported for it."""
        child, self._child = self._child, None
        if child is None:
            return
        if child.proc.poll() is None:
            with_group(child.proc, signal.SIGTERM)
            try:
                child.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with_group(child.proc, signal.SIGKILL)
                child.proc.wait()
            self.log(f"lm-eval: the evaluation of step {child.step} was stopped before it finished")
        child.log.close()

    def _paths(self, step: int) -> tuple[Path, Path, Path]:
        return self.out / f"step_{step}.json", self.out / f".step_{step}.json.partial", self.out / f"step_{step}.log"

    def _start(self, step: int, samples: int, tag_dir: Path) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        _, partial, log_path = self._paths(step)
        partial.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
        env[PARENT_VAR] = str(os.getpid())
        if self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # no CUDA context on a device a stage is using
        log = open(log_path, "w")
        cmd = [*self.command, "--model", str(tag_dir), "--json", str(partial), *self.argv]
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # a group of its own: close() takes its children too
        self._child = _Child(step, samples, tag_dir.name, proc, self.clock(), log)
        self.log(f"lm-eval: evaluating step {step} in the background (pid {proc.pid}, output {log_path})")

    def _collect(self, wait: bool) -> None:
        child, self._child = self._child, None
        code = child.proc.wait() if wait else child.proc.returncode
        seconds = self.clock() - child.started
        child.log.close()
        final, partial, log_path = self._paths(child.step)
        if code != 0 or not partial.is_file():
            self.log(f"lm-eval: the evaluation of step {child.step} failed (exit status {code}); see {log_path}")
            return
        os.replace(partial, final)
        self.report(child.step, child.samples, scores(json.loads(final.read_text())["results"]), seconds)


def with_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _child_main(argv: list[str]) -> int:
    """The child: the lowest priority, dies with the trainer (whose pid _start passes, so that a
    trainer that is itself PID 1, in a container, is told from one that died), then lamda-eval."""
    from .lifecycle import die_with_parent

    os.nice(NICENESS)
    with contextlib.suppress(AttributeError, OSError):  # Linux: CPU time only when no rank wants it
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    # elsewhere than Linux, close() still stops it on every exit path of the trainer but a SIGKILL
    die_with_parent(int(os.environ.pop(PARENT_VAR, os.getppid())), signal.SIGTERM)
    from .tools.eval_lm import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
