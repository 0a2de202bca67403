"""Rank-0 training logs: metrics.jsonl, TensorBoard (through DeepSpeed's monitor) and stdout."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

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


class MetricsLogger:
    """Writes one JSON object per logged step or evaluation. Only the rank given
    `enabled=True` writes; the others call the same methods and do nothing.

    Throughput is measured between log calls with the wall clock: `train_batch` returns
    only after the pipeline's last communication, and the loss is read (.item()) only at a
    logged step, so the metrics add no device sync to the other steps.
    TensorBoard scalars go through the DeepSpeed engine's monitor, into the same event files
    as DeepSpeed's own loss/lr/loss-scale curves, on its x-axis (samples seen).
    """

    def __init__(self, run_dir: Path, enabled: bool, tokens_per_step: int, flops_per_token: int,
                 monitor=None, monitor_writes_loss_scale: bool = False, devices: int = 1,
                 peak_tflops: float | None = None, log_every: int = 1):
        """flops_per_token: the model's training FLOPs per token (config.flops_per_token);
        peak_tflops: one device's peak, for MFU = achieved FLOP/s / (devices x peak); None: no MFU."""
        self.enabled = enabled
        self.log_every = log_every
        self.devices = devices
        self.peak_tflops = peak_tflops
        # DeepSpeed's monitor records the loss scale itself under fp16; otherwise we do.
        self.tb_loss_scale = not monitor_writes_loss_scale
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.monitor = monitor
        self._file = None
        if enabled:
            path = Path(run_dir) / "metrics.jsonl"
            drop_partial_last_line(path)
            self._file = open(path, "a")
        self._mark: tuple[float, int] | None = None

    def should_log(self, step: int, last_step: bool = False) -> bool:
        """Every log_every steps and the last: the loss is read from the device only then."""
        return last_step or step % self.log_every == 0

    def start(self, step: int) -> None:
        """Starts (or restarts, after an evaluation or a save) the throughput clock."""
        self._mark = (time.perf_counter(), step)

    def _write(self, record: dict, samples: int, tb: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.monitor is not None and self.monitor.enabled:
            self.monitor.write_events([(f"Train/Samples/{k}", v, samples) for k, v in tb.items()])

    def log_train(self, step: int, samples: int, loss: float, lr: float, loss_scale: float) -> dict | None:
        now = time.perf_counter()
        t0, step0 = self._mark or (now, step)
        self._mark = (now, step)
        if not self.enabled:
            return None
        elapsed = now - t0
        tokens_per_s = (step - step0) * self.tokens_per_step / elapsed if elapsed > 0 else math.nan
        tflops = tokens_per_s * self.flops_per_token / 1e12  # all devices together
        record = {"step": step, "loss": loss, "lr": lr, "loss_scale": loss_scale,
                  "tokens_per_s": tokens_per_s, "tflops": tflops, "tflops_per_device": tflops / self.devices,
                  "time": time.time()}
        tb = {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops / self.devices}
        mfu = ""
        if self.peak_tflops:
            record["mfu"] = tb["mfu"] = tflops / (self.devices * self.peak_tflops)
            mfu = f" | MFU {record['mfu']:.1%}"
        if self.tb_loss_scale:
            tb["loss_scale"] = loss_scale
        self._write(record, samples, tb)
        print(f"step {step:>6} | loss {loss:.4f} | lr {lr:.3e} | loss scale {loss_scale:g} | "
              f"{tokens_per_s:,.0f} tokens/s | {tflops / self.devices:.3f} TFLOP/s per device{mfu}", flush=True)
        return record

    def log_eval(self, step: int, samples: int, val_loss: float, by_source: dict | None = None) -> None:
        """val_loss is the mixture-weighted mean; with several sources each is logged too."""
        if not self.enabled:
            return
        record = {"step": step, "val_loss": val_loss, "time": time.time()}
        tb = {"val_loss": val_loss}
        if by_source:
            record["val_loss_by_source"] = by_source
            tb.update({f"val_loss/{name}": v for name, v in by_source.items()})
        self._write(record, samples, tb)
        print(f"step {step:>6} | val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 50)):.2f}", flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
