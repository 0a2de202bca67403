"""Divergence guards: a non-finite step never reaches the weights, and a run that keeps failing
heals itself by rolling back to its last checkpoint and skipping exactly the samples in between.

First line, no host sync of its own: the pipeline's loss is wrapped (``finite_or_nan``) so that
a non-finite loss turns every gradient NaN; DeepSpeed's optimizer (ZeRO, bf16 or fp16) then
finds a non-finite gradient norm, which it all-reduces over data-parallel ranks and pipeline
stages anyway for clipping, and skips the optimizer step on every stage alike, counting it in
``engine.skipped_steps`` (a host int). fp16 keeps DeepSpeed's dynamic loss scaling in front of
this. ``check_ds_config`` refuses the DeepSpeed configs whose optimizer would apply the step.

Second line, ``Guard``: after each step it looks at values every rank holds identically (the
skipped-step count, the loss scale, and at logged steps the loss, which the pipeline engine
broadcasts from the last stage), so every rank takes the same decision without communicating.
It reports a ``Fault`` on a streak of skipped steps, fp16 loss-scale collapse, or a loss spike
against the mean of the last logged losses; the trainer then calls ``Checkpointer.rollback``.
After ``max_rollbacks`` rollbacks with no checkpoint saved past the failing step it gives up
(``Diverged``: exit status 3, the last good checkpoint untouched).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from .errors import ConfigError

EXIT_DIVERGED = 3


@dataclass(frozen=True)
class GuardSettings:
    skip_streak: int = 8  # consecutive skipped steps that trigger a rollback
    spike_factor: float = 3.0  # a logged loss above factor x the window's mean is a spike (0: off)
    spike_window: int = 10  # logged losses in the moving window
    max_rollbacks: int = 3  # rollbacks without passing the failing step before giving up
    min_loss_scale: float | None = None  # fp16: DeepSpeed's min_loss_scale (None: not fp16)


@dataclass(frozen=True)
class Fault:
    step: int
    reason: str


class Diverged(RuntimeError):
    """The run failed again after every allowed rollback; the message says what to try."""


def finite_or_nan(loss_fn):
    """Wraps a loss function: a non-finite loss becomes NaN with NaN gradients (the graph is
    kept, multiplied by a NaN-or-one factor), so DeepSpeed's overflow check skips the step.
    A finite loss is multiplied by exactly 1.0: values and gradients are unchanged, bit for bit."""
    import torch

    def guarded(*args, **kwargs):
        loss = loss_fn(*args, **kwargs)
        one = torch.ones((), dtype=loss.dtype, device=loss.device)
        return loss * torch.where(torch.isfinite(loss), one, one * math.nan)

    guarded.__wrapped__ = loss_fn
    return guarded


def check_ds_config(ds: dict) -> None:
    """Refuses a DeepSpeed config whose optimizer would apply a step with non-finite gradients."""
    zero = ds.get("zero_optimization", {}).get("stage", 0)
    if ds.get("fp16", {}).get("enabled", False):
        return  # DeepSpeed's fp16 optimizers check for overflow on every step
    if ds.get("bf16", {}).get("enabled", False):
        if ds["bf16"].get("check_grad_overflow", True) is False:
            raise ConfigError('the DeepSpeed config sets "bf16": {"check_grad_overflow": false}: a non-finite '
                              'step would reach the weights; remove the setting')
        return
    if zero < 1:
        raise ConfigError('with fp32 and "zero_optimization" stage 0 DeepSpeed applies steps with non-finite '
                          'gradients; use "zero_optimization": {"stage": 1} (as the shipped configs do)')
    if ds.get("zero_optimization", {}).get("compute_grad_norm", True) is False:
        raise ConfigError('"zero_optimization": {"compute_grad_norm": false} turns off the check that skips '
                          'non-finite steps in fp32; remove the setting')


@dataclass
class Guard:
    """Decides, from values every rank sees alike, when the run must roll back."""

    settings: GuardSettings
    last_skipped: int = 0  # engine.skipped_steps after the previous step
    _streak: int = 0
    _losses: deque = field(default_factory=deque)
    failures: list[Fault] = field(default_factory=list)  # since the last checkpoint past a failure

    def check(self, step: int, skipped_steps: int, loss_scale: float, loss: float | None) -> Fault | None:
        """After a step; loss only at logged steps (None otherwise). Pure host arithmetic."""
        s = self.settings
        skipped = skipped_steps > self.last_skipped
        self.last_skipped = skipped_steps
        self._streak = self._streak + 1 if skipped else 0
        if skipped and self._streak >= s.skip_streak:
            return Fault(step, f"{self._streak} consecutive steps skipped for non-finite loss or gradients")
        if skipped and s.min_loss_scale is not None and loss_scale <= s.min_loss_scale:
            return Fault(step, f"fp16 loss scale collapsed to its minimum {loss_scale:g}")
        if loss is None or not math.isfinite(loss):
            return None  # a non-finite loss is a skipped step, counted above
        if s.spike_factor > 0 and self._losses:
            mean = sum(self._losses) / len(self._losses)
            if loss > s.spike_factor * mean:
                return Fault(step, f"loss spike: {loss:.4g} > {s.spike_factor:g} x {mean:.4g} (the mean of "
                                   f"the last {len(self._losses)} logged losses)")
        self._losses.append(loss)
        if len(self._losses) > s.spike_window:
            self._losses.popleft()
        return None

    def admit(self, fault: Fault) -> None:
        """Before a rollback: raises Diverged when the rollbacks allowed without progress are spent."""
        self.failures.append(fault)
        if len(self.failures) > self.settings.max_rollbacks:
            steps = ", ".join(f"step {f.step} ({f.reason})" for f in self.failures)
            raise Diverged(f"training failed {len(self.failures)} times without a checkpoint past the failing "
                           f"step, after {self.settings.max_rollbacks} rollbacks: {steps}; the last good "
                           f"checkpoint is kept. Try a lower learning rate, a longer warmup or stronger gradient "
                           f"clipping, and check the data around those steps")

    def restart(self, skipped_steps: int) -> None:
        """After a rollback: the moving state starts afresh."""
        self.last_skipped, self._streak = skipped_steps, 0
        self._losses.clear()

    def saved(self, step: int) -> None:
        """A checkpoint past every failure so far is progress: the rollback count starts again."""
        if self.failures and step > max(f.step for f in self.failures):
            self.failures.clear()


def weights_finite(engine) -> bool:
    """Whether every rank's weights are finite: one all-reduce, at saves only. Collective."""
    import torch
    import torch.distributed as dist

    params = [p for p in engine.module.parameters()]
    ok = torch.stack([torch.isfinite(p).all() for p in params]).all() if params else torch.tensor(True)
    flag = ok.to(torch.int32).reshape(1).to(params[0].device if params else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def settings_for(run, ds: dict) -> GuardSettings:
    """The guard's settings from the flags and, for fp16, DeepSpeed's minimum loss scale."""
    fp16 = ds.get("fp16", {})
    return GuardSettings(skip_streak=run.skip_streak, spike_factor=run.spike_factor, spike_window=run.spike_window,
                         max_rollbacks=run.max_rollbacks,
                         min_loss_scale=float(fp16.get("min_loss_scale", 1)) if fp16.get("enabled") else None)
