"""Validation during training: when to run it, and what it reports."""

from __future__ import annotations

from typing import Callable


class Evaluator:
    """The validation loss of each source (the mean over its val split's first `iters` batches,
    the same batches every time, so the numbers are comparable across a run) and their
    mixture-weighted mean, every `every` steps (0: never)."""

    def __init__(self, streams: dict, every: int, iters: int, progress: Callable[[], None] = lambda: None):
        """streams: source name -> (mixture weight, MicroBatchStream over its val split);
        progress: called after each batch (the hang watchdog's sign of life)."""
        self.streams, self.every, self.iters, self.progress = streams, every, iters, progress

    def should_evaluate(self, step: int) -> bool:
        return bool(self.every and self.streams) and step % self.every == 0

    def evaluate(self, engine) -> tuple[float, dict[str, float] | None]:
        """(weighted mean, loss by source or None with a single source). Collective: every rank."""
        by_source = {}
        for name, (_, stream) in self.streams.items():
            batches = stream.iterate(0)
            total = 0.0
            for _ in range(self.iters):
                total += engine.eval_batch(batches).item()
                self.progress()
            by_source[name] = total / self.iters
        total = sum(self.streams[n][0] for n in by_source)
        mean = sum(self.streams[n][0] * v for n, v in by_source.items()) / total
        return mean, by_source if len(by_source) > 1 else None
