"""Validation during training: when to run it, and what it reports."""

from __future__ import annotations


class Evaluator:
    """The validation loss of each source (the mean over its val split's first `iters` batches,
    the same batches every time, so the numbers are comparable across a run) and their
    mixture-weighted mean, every `every` steps (0: never)."""

    def __init__(self, streams: dict, every: int, iters: int):
        """streams: source name -> (mixture weight, MicroBatchStream over its val split)."""
        self.streams, self.every, self.iters = streams, every, iters

    def should_evaluate(self, step: int) -> bool:
        return bool(self.every and self.streams) and step % self.every == 0

    def evaluate(self, engine) -> tuple[float, dict[str, float] | None]:
        """(weighted mean, loss by source or None with a single source). Collective: every rank."""
        by_source = {}
        for name, (_, stream) in self.streams.items():
            batches = stream.iterate(0)
            by_source[name] = sum(engine.eval_batch(batches).item() for _ in range(self.iters)) / self.iters
        total = sum(self.streams[n][0] for n in by_source)
        mean = sum(self.streams[n][0] * v for n, v in by_source.items()) / total
        return mean, by_source if len(by_source) > 1 else None
