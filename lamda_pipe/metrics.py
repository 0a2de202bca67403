"""Rank-0 training logs: records computed once by MetricsLogger, written by sinks.

MetricsLogger turns what the training loop knows (step, loss, lr, loss scale, wall clock) into
records: tokens/s, TFLOP/s, MFU, and which curves go to the plotting backends. A Sink only
writes what it is handed; `run_sinks` chooses the sinks of a training run:

  JsonlSink    RUN_DIR/metrics.jsonl, one JSON object per logged step or evaluation
  MonitorSink  the DeepSpeed engine's monitor (a deepspeed.monitor.monitor.MonitorMaster), which
               fans out to TensorBoard, CSV and Weights & Biases as the DeepSpeed JSON enables
               them; our curves share its files and its x-axis (samples seen) with DeepSpeed's
               own train_loss / lr / loss_scale curves
  ConsoleSink  one stdout line

The backends are switched on in the DeepSpeed JSON (TensorBoard is on in the shipped configs).
`fill_run_values` (ds_config.py) puts their files under --run-dir when no path is given:

  "tensorboard": {"enabled": true, "job_name": "tensorboard"}
  "csv_monitor": {"enabled": true, "job_name": "csv"}
  "wandb": {"enabled": true, "project": "lamda-pipe"}

(optionally "group" and "team" in "wandb"; `pip install lamda-pipe[wandb]`). Without network
set WANDB_MODE=offline and upload later with `wandb sync RUN_DIR/wandb/offline-run-*`.

Why DeepSpeed's monitors and not sinks of our own:
- CSV: DeepSpeed's csv_monitor writes one file per curve (RUN_DIR/csv/Train_Samples_<name>.csv,
  columns "step" -- which holds samples seen, DeepSpeed's x-axis -- and the curve's last name
  component). It also gets the engine's per-step loss, lr and loss scale, which our records
  have only at logged steps. The one-table view of our records is metrics.jsonl already
  (pandas.read_json(path, lines=True)), so a second table writer would add nothing. Its one
  flaw for us is fixed in MonitorSink: it writes a header whenever a process first writes a
  file, so a resumed run appending to the same files would put a header row mid-file.
- W&B: DeepSpeed's WandbMonitor calls wandb.init(project, group, entity) with no dir, so its
  files would land in the launch directory. wandb reads WANDB_DIR, so fill_run_values sets it
  to --run-dir when the JSON enables wandb and WANDB_DIR is unset (an explicit choice wins):
  it must happen before deepspeed.initialize, which is where the run starts, and
  fill_run_values is the run-dir step that comes before it. A sink of our own would need the
  engine's curves fed to it separately. MonitorSink.close finishes the W&B run, so its files
  are complete when training returns rather than at interpreter exit. W&B's step is samples
  seen; a resumed training starts a new W&B run (wandb's WANDB_RESUME / WANDB_RUN_ID join it
  to the old one, and wandb drops points below the old run's last step).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s per GPU, from the vendors'
# datasheets. Matched against torch.cuda.get_device_name() in this order: the first entry
# whose words all appear in the name wins, so the PCIe/NVL variants come before the SXM parts.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.5),
    ("H200 NVL", 835.5),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),  # SXM ("NVIDIA H200")
    ("H800", 989.4),
    ("A100", 312.0),  # SXM and PCIe alike
    ("A800", 312.0),
)


def peak_tflops_for(device_name: str) -> float | None:
    """The bf16 peak of a GPU by its name, or None when the card is not in the table."""
    words = device_name.upper().replace("-", " ").split()
    for key, peak in PEAK_BF16_TFLOPS:
        if all(w in words for w in key.upper().split()):
            return peak
    return None


def drop_partial_last_line(path: Path) -> None:
    """A run killed mid-write can leave half a JSON line; cut it so the file stays line-valid."""
    if not path.is_file():
        return
    with open(path, "r+b") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class Sink:
    """One destination of the logs.

    record: the metrics.jsonl object (a training step has "loss", an evaluation "val_loss");
    scalars: the curves for plotting backends, each a float at x = samples (samples seen).
    """

    def write(self, record: dict, scalars: dict[str, float], samples: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JsonlSink(Sink):
    """Appends one JSON line per record; flushed at once, so a killed run loses at most a line."""

    def __init__(self, path: Path):
        path = Path(path)
        drop_partial_last_line(path)
        self._file = open(path, "a")

    def write(self, record: dict, scalars: dict[str, float], samples: int) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ConsoleSink(Sink):
    def write(self, record: dict, scalars: dict[str, float], samples: int) -> None:
        if "val_loss" in record:
            v = record["val_loss"]
            print(f"step {record['step']:>6} | val loss {v:.4f} | val ppl {math.exp(min(v, 50)):.2f}", flush=True)
            return
        if "lm_eval" in record:
            for task, metrics in record["lm_eval"].items():
                shown = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                print(f"step {record['step']:>6} | lm-eval {task} | {shown} | {record['lm_eval_seconds']:.0f}s",
                      flush=True)
            return
        mfu = f" | MFU {record['mfu']:.1%}" if "mfu" in record else ""
        peak = f" | peak {record['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in record else ""
        print(f"step {record['step']:>6} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
              f"loss scale {record['loss_scale']:g} | {record['tokens_per_s']:,.0f} tokens/s | "
              f"{record['tflops_per_device']:.3f} TFLOP/s per device{mfu}{peak}", flush=True)


class MonitorSink(Sink):
    """The scalars, as "Train/Samples/<name>" events, into DeepSpeed's monitor (see the module
    docstring for what it fans out to)."""

    def __init__(self, monitor):
        self.monitor = monitor
        csv = getattr(monitor, "csv_monitor", None)
        if csv is not None and csv.log_dir:
            # csvMonitor writes a file's header the first time this process writes to it; files
            # left by the run being resumed already have theirs.
            csv.filenames.extend(p.stem for p in Path(csv.log_dir).glob("*.csv") if p.stem not in csv.filenames)

    def write(self, record: dict, scalars: dict[str, float], samples: int) -> None:
        if self.monitor.enabled:
            self.monitor.write_events([(f"Train/Samples/{k}", v, samples) for k, v in scalars.items()])

    def close(self) -> None:
        if getattr(self.monitor, "wandb_monitor", None) is not None:
            import wandb

            if wandb.run is not None:
                wandb.finish()


def run_sinks(run_dir: Path, enabled: bool, monitor=None) -> list[Sink]:
    """The sinks of a training run: metrics.jsonl, the engine's monitor (if given) and stdout,
    on the writing rank (enabled=True) only; the other ranks get none."""
    if not enabled:
        return []
    sinks: list[Sink] = [JsonlSink(Path(run_dir) / "metrics.jsonl")]
    if monitor is not None:
        sinks.append(MonitorSink(monitor))
    sinks.append(ConsoleSink())
    return sinks


class MetricsLogger:
    """Computes one record per logged step or evaluation and hands it to every sink. A logger
    without sinks (the ranks other than 0) is called the same way and does nothing.

    Throughput is measured between log calls with the wall clock: `train_batch` returns
    only after the pipeline's last communication, and the loss is read (.item()) only at a
    logged step, so the metrics add no device sync to the other steps.
    """

    def __init__(self, sinks: Sequence[Sink], *, tokens_per_step: int, flops_per_token: int,
                 monitor_writes_loss_scale: bool = False, devices: int = 1, peak_tflops: float | None = None,
                 log_every: int = 1, clock: Callable[[], float] = time.perf_counter,
                 peak_memory: Callable[[], int] | None = None):
        """flops_per_token: the model's training FLOPs per token (config.flops_per_token);
        peak_tflops: one device's peak, for MFU = achieved FLOP/s / (devices x peak); None: no MFU;
        monitor_writes_loss_scale: DeepSpeed's monitor records the loss scale itself (under
        fp16), so it is left out of the scalars; log_every: the training-metrics cadence;
        clock: seconds, for the throughput; peak_memory: the device's peak allocation so far in
        bytes (CUDA: torch.cuda.max_memory_allocated, which reads a counter and does not sync),
        logged as peak_memory_gib to hold against the planner's prediction; None: not logged."""
        self.sinks = list(sinks)
        self.log_every = log_every
        self.enabled = bool(self.sinks)
        self.devices = devices
        self.peak_tflops = peak_tflops
        self.scalar_loss_scale = not monitor_writes_loss_scale
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.clock = clock
        self.peak_memory = peak_memory
        self._mark: tuple[float, int] | None = None

    def should_log(self, step: int, last_step: bool = False) -> bool:
        """Every log_every steps and the last one: the loss is read from the device only then."""
        return last_step or step % self.log_every == 0

    def start(self, step: int) -> None:
        """Starts (or restarts, after an evaluation or a save) the throughput clock."""
        self._mark = (self.clock(), step)

    def _emit(self, record: dict, scalars: dict[str, float], samples: int) -> None:
        for sink in self.sinks:
            sink.write(record, scalars, samples)

    def train_record(self, step: int, loss: float, lr: float, loss_scale: float,
                     elapsed: float, steps: int, skipped_steps: int = 0) -> tuple[dict, dict[str, float]]:
        """The metrics.jsonl record and the scalars of `steps` optimizer steps taking `elapsed` s."""
        tokens_per_s = steps * self.tokens_per_step / elapsed if elapsed > 0 else math.nan
        tflops = tokens_per_s * self.flops_per_token / 1e12  # all devices together
        record = {"step": step, "loss": loss, "lr": lr, "loss_scale": loss_scale,
                  "tokens_per_s": tokens_per_s, "tflops": tflops, "tflops_per_device": tflops / self.devices,
                  "skipped_steps": skipped_steps, "time": time.time()}
        scalars = {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops / self.devices,
                   "skipped_steps": float(skipped_steps)}
        if self.peak_tflops:
            record["mfu"] = scalars["mfu"] = tflops / (self.devices * self.peak_tflops)
        if self.scalar_loss_scale:
            scalars["loss_scale"] = loss_scale
        if self.peak_memory is not None:
            record["peak_memory_gib"] = scalars["peak_memory_gib"] = self.peak_memory() / 2 ** 30
        return record, scalars

    def log_train(self, step: int, samples: int, loss: float, lr: float, loss_scale: float,
                  skipped_steps: int = 0) -> dict | None:
        """skipped_steps: optimizer steps skipped for non-finite values so far in the run (guard.py)."""
        now = self.clock()
        t0, step0 = self._mark or (now, step)
        self._mark = (now, step)
        if not self.enabled:
            return None
        record, scalars = self.train_record(step, loss, lr, loss_scale, now - t0, step - step0, skipped_steps)
        self._emit(record, scalars, samples)
        return record

    def log_eval(self, step: int, samples: int, val_loss: float, by_source: dict | None = None) -> None:
        """val_loss is the mixture-weighted mean; with several sources each is logged too."""
        if not self.enabled:
            return
        record = {"step": step, "val_loss": val_loss, "time": time.time()}
        scalars = {"val_loss": val_loss}
        if by_source:
            record["val_loss_by_source"] = by_source
            scalars.update({f"val_loss/{name}": v for name, v in by_source.items()})
        self._emit(record, scalars, samples)

    def log_lm_eval(self, step: int, samples: int, scores: dict[str, dict[str, float]], seconds: float) -> None:
        """lm-evaluation-harness figures of step N's checkpoint (background_eval.py), reported
        when its evaluation ends: `samples` is the checkpoint's, so the curves sit at its step."""
        if not self.enabled:
            return
        record = {"step": step, "lm_eval": scores, "lm_eval_seconds": seconds, "time": time.time()}
        scalars = {f"lm_eval/{task}/{metric}": v for task, metrics in scores.items() for metric, v in metrics.items()}
        self._emit(record, scalars, samples)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
