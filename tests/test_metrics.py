"""MetricsLogger's records, and each sink read back from its files: metrics.jsonl, stdout, and
real DeepSpeed monitors (TensorBoard, CSV, W&B offline) in a one-process gloo group."""

from __future__ import annotations

import csv
import json
import math
import struct
from pathlib import Path

import pytest

from lamda_pipe.ds_config import fill_run_values
from lamda_pipe.metrics import (PEAK_BF16_TFLOPS, ConsoleSink, JsonlSink, MetricsLogger, MonitorSink, Sink,
                                drop_partial_last_line, peak_tflops_for, run_sinks)

class Clock:
    """A wall clock the test sets: throughput becomes exact."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder(Sink):
    def __init__(self):
        self.writes, self.closed = [], False

    def write(self, record, scalars, samples):
        self.writes.append((record, scalars, samples))

    def close(self):
        self.closed = True


def make_logger(sinks, clock, **kw):
    kw = {"tokens_per_step": 1000, "flops_per_token": 6_000_000_000, "devices": 4, "peak_tflops": 20.0, **kw}
    return MetricsLogger(sinks, clock=clock, **kw)


@pytest.mark.unit
def test_train_record_throughput_tflops_mfu():
    clock, rec = Clock(), Recorder()
    logger = make_logger([rec], clock)
    logger.start(10)
    clock.now += 2.0
    record = logger.log_train(20, 640, loss=2.5, lr=3e-4, loss_scale=1.0)
    # 10 steps x 1000 tokens in 2 s; x 6 GFLOP per token = 30 TFLOP/s on 4 devices of peak 20
    assert list(record) == ["step", "loss", "lr", "loss_scale", "tokens_per_s", "tflops",
                            "tflops_per_device", "skipped_steps", "time", "mfu"]
    assert record["tokens_per_s"] == 5000.0 and record["tflops"] == pytest.approx(30.0)
    assert record["tflops_per_device"] == pytest.approx(7.5) and record["mfu"] == pytest.approx(30.0 / (4 * 20.0))
    assert rec.writes == [(record, {"tokens_per_s": 5000.0, "tflops_per_device": record["tflops_per_device"],
                                    "skipped_steps": 0.0, "mfu": record["mfu"], "loss_scale": 1.0}, 640)]
    # the clock restarts at every logged step: the next interval is measured on its own
    clock.now += 4.0
    assert logger.log_train(25, 800, 2.4, 3e-4, 1.0)["tokens_per_s"] == 5 * 1000 / 4.0
    logger.close()
    assert rec.closed


@pytest.mark.unit
def test_loss_scale_goes_to_the_curves_only_when_deepspeed_does_not_write_it():
    """Under fp16 DeepSpeed's engine writes Train/Samples/loss_scale itself; a second series
    under the same tag would interleave with it."""
    clock = Clock()
    for deepspeed_writes, expected in ((True, False), (False, True)):
        rec = Recorder()
        logger = make_logger([rec], clock, monitor_writes_loss_scale=deepspeed_writes)
        logger.start(0)
        clock.now += 1.0
        record = logger.log_train(1, 16, 3.0, 1e-3, 65536.0)
        assert record["loss_scale"] == 65536.0  # metrics.jsonl has it either way
        assert ("loss_scale" in rec.writes[0][1]) is expected


@pytest.mark.unit
def test_peak_memory_is_logged_when_the_trainer_gives_a_reading(capsys):
    """On CUDA the trainer passes torch.cuda.max_memory_allocated; without it (CPU) no field."""
    clock = Clock()
    rec = Recorder()
    logger = make_logger([rec, ConsoleSink()], clock, peak_memory=lambda: 3 * 2 ** 29)
    logger.start(0)
    clock.now += 1.0
    record = logger.log_train(1, 16, 3.0, 1e-3, 1.0)
    assert record["peak_memory_gib"] == 1.5 and rec.writes[0][1]["peak_memory_gib"] == 1.5
    assert capsys.readouterr().out.endswith("| MFU 7.5% | peak 1.50 GiB\n")
    assert "peak_memory_gib" not in make_logger([], clock).train_record(1, 3.0, 1e-3, 1.0, 1.0, 1)[0]


@pytest.mark.unit
def test_no_peak_no_mfu_and_no_elapsed_time_is_nan(capsys):
    clock = Clock()
    logger = make_logger([ConsoleSink()], clock, peak_tflops=None)
    record = logger.log_train(5, 80, 3.0, 1e-3, 1.0)  # never started: no interval to measure
    assert "mfu" not in record and math.isnan(record["tokens_per_s"])
    assert "MFU" not in capsys.readouterr().out


@pytest.mark.unit
def test_eval_record_and_the_formats_of_file_and_stdout(tmp_path, capsys):
    """The metrics.jsonl lines and stdout lines other tools and people read, byte for byte."""
    clock = Clock()
    logger = make_logger(run_sinks(tmp_path, enabled=True), clock)
    logger.start(10)
    clock.now += 2.0
    train = logger.log_train(20, 640, loss=2.5, lr=3e-4, loss_scale=1.0)
    logger.log_eval(20, 640, 2.0, {"law": 1.5, "wisdom": 3.5})
    logger.log_eval(30, 960, 1.0)
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[0] == json.dumps(train)
    evals = [json.loads(line) for line in lines[1:]]
    assert lines[1] == ('{"step": 20, "val_loss": 2.0, "time": %s, "val_loss_by_source": {"law": 1.5, "wisdom": 3.5}}'
                        % json.dumps(evals[0]["time"]))
    assert lines[2] == '{"step": 30, "val_loss": 1.0, "time": %s}' % json.dumps(evals[1]["time"])
    assert capsys.readouterr().out == (
        "step     20 | loss 2.5000 | lr 3.000e-04 | loss scale 1 | 5,000 tokens/s | "
        "7.500 TFLOP/s per device | MFU 37.5%\n"
        "step     20 | val loss 2.0000 | val ppl 7.39\n"
        "step     30 | val loss 1.0000 | val ppl 2.72\n")


@pytest.mark.unit
def test_eval_scalars_name_each_source():
    rec = Recorder()
    make_logger([rec], Clock()).log_eval(7, 112, 2.0, {"law": 1.5, "wisdom": 3.5})
    assert rec.writes[0][1:] == ({"val_loss": 2.0, "val_loss/law": 1.5, "val_loss/wisdom": 3.5}, 112)


@pytest.mark.unit
def test_other_ranks_write_nothing(tmp_path, capsys):
    assert run_sinks(tmp_path, enabled=False, monitor=object()) == []
    logger = make_logger(run_sinks(tmp_path, enabled=False), Clock())
    logger.start(0)
    assert logger.log_train(1, 16, 3.0, 1e-3, 1.0) is None
    logger.log_eval(1, 16, 3.0)
    logger.close()
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().out == ""


@pytest.mark.unit
def test_jsonl_sink_repairs_a_cut_line_and_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
    sink = JsonlSink(path)
    sink.write({"step": 2, "loss": 2.9}, {}, 32)
    sink.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


@pytest.mark.unit
def test_peak_table_and_helpers_stay_importable():
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0 and peak_tflops_for("NVIDIA H200") == 989.4
    assert peak_tflops_for("cpu") is None and ("A100", 312.0) in PEAK_BF16_TFLOPS
    assert callable(drop_partial_last_line)


@pytest.mark.unit
def test_fill_run_values_puts_csv_and_wandb_under_the_run_dir(tmp_path):
    ds = {"csv_monitor": {"enabled": True, "job_name": "csv"}, "wandb": {"enabled": True, "project": "p"}}
    env = {}
    filled = fill_run_values(ds, steps=5, run_dir=tmp_path, environ=env)
    assert filled["csv_monitor"]["output_path"] == str(tmp_path) and "output_path" not in ds["csv_monitor"]
    assert env == {"WANDB_DIR": str(tmp_path)}
    env = {"WANDB_DIR": "/chosen"}  # the user's choice wins, as does an explicit csv path
    ds["csv_monitor"]["output_path"] = "/elsewhere"
    assert fill_run_values(ds, steps=5, run_dir=tmp_path, environ=env)["csv_monitor"]["output_path"] == "/elsewhere"
    assert env == {"WANDB_DIR": "/chosen"}
    env = {}  # disabled monitors are left alone
    fill_run_values({"csv_monitor": {"enabled": False}, "wandb": {"enabled": False}}, steps=5, run_dir=tmp_path,
                    environ=env)
    assert env == {}


# ---------------------------------------------------------------------------------------------
# Real DeepSpeed monitors
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def rank0(monkeypatch):
    """A one-process gloo group (in-memory store, no port): DeepSpeed's monitors write only
    where deepspeed.comm says rank 0."""
    import torch.distributed as tdist
    import deepspeed.comm as dcomm

    from lamda_pipe.distributed import skip_shm_comm

    # deepspeed.comm's backend handle goes back to what it was, so that later tests (and the
    # ranks they fork) start DeepSpeed as if this test had not run.
    monkeypatch.setattr(dcomm.comm, "cdb", dcomm.comm.cdb)
    skip_shm_comm()  # as the trainer starts deepspeed.comm: no C++ build of an inference-only op
    owned = not tdist.is_initialized()
    if owned:
        tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    dcomm.init_distributed(dist_backend="gloo", dist_init_required=False, auto_mpi_discovery=False, verbose=False)
    yield
    if owned:
        tdist.destroy_process_group()


def monitor_for(ds: dict):
    """The monitor as deepspeed.initialize builds it from the (filled) JSON."""
    from deepspeed.monitor.config import get_monitor_config
    from deepspeed.monitor.monitor import MonitorMaster

    return MonitorMaster(get_monitor_config(ds))


def log_a_run(run_dir: Path, monitor, steps=(1, 2), eval_at=2) -> list[dict]:
    clock = Clock()
    logger = make_logger(run_sinks(run_dir, enabled=True, monitor=monitor), clock)
    logger.start(steps[0] - 1)
    records = []
    for step in steps:
        clock.now += 0.5 * step
        records.append(logger.log_train(step, 16 * step, 3.0 / step, 1e-3 * step, 1.0))
        if step == eval_at:
            logger.log_eval(step, 16 * step, 2.5, {"law": 2.0, "wisdom": 3.0})
    logger.close()
    return records


def scalar_events(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


@pytest.mark.distributed
def test_tensorboard_and_csv_through_deepspeeds_monitor(tmp_path, rank0, capsys):
    ds = fill_run_values({"tensorboard": {"enabled": True, "job_name": "tensorboard"},
                          "csv_monitor": {"enabled": True, "job_name": "csv"}}, steps=3, run_dir=tmp_path)
    records = log_a_run(tmp_path, monitor_for(ds))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in lines if "loss" in r] == records and [r["step"] for r in lines if "val_loss" in r] == [2]
    assert capsys.readouterr().out.count("tokens/s") == 2

    tb = scalar_events(tmp_path / "tensorboard")
    for name in ("tokens_per_s", "tflops_per_device", "mfu", "loss_scale"):
        assert tb[f"Train/Samples/{name}"] == [(16, pytest.approx(records[0][name])),
                                               (32, pytest.approx(records[1][name]))]
    assert tb["Train/Samples/val_loss"] == [(32, 2.5)] and tb["Train/Samples/val_loss/wisdom"] == [(32, 3.0)]

    def table(name):
        with open(tmp_path / "csv" / f"Train_Samples_{name}.csv") as f:
            return list(csv.reader(f))

    assert table("tokens_per_s") == [["step", "tokens_per_s"], ["16", str(records[0]["tokens_per_s"])],
                                     ["32", str(records[1]["tokens_per_s"])]]
    assert table("val_loss_law") == [["step", "law"], ["32", "2.0"]]

    # a resumed run appends to the same files, without a second header
    more = log_a_run(tmp_path, monitor_for(ds), steps=(3,), eval_at=None)
    assert table("tokens_per_s") == [["step", "tokens_per_s"], ["16", str(records[0]["tokens_per_s"])],
                                     ["32", str(records[1]["tokens_per_s"])], ["48", str(more[0]["tokens_per_s"])]]


def wandb_history(path: Path) -> dict[int, dict[str, float]]:
    """The logged rows of an offline run's .wandb file: a LevelDB-style log (7-byte file
    header, 32 KiB blocks of records with a 7-byte header: crc, length, type) of protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    rows, pos, buf = {}, 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # the rest of a block too short for a header is padding
            pos += left
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind not in (1, 2, 3, 4):  # 1 full, 2 first, 3 middle, 4 last piece of a record
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record.FromString(buf)
            if record.WhichOneof("record_type") == "history":
                rows[record.history.step.num] = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item}
    return rows


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_wandb_offline_run_lands_in_the_run_dir(tmp_path, rank0, monkeypatch):
    pytest.importorskip("wandb")
    import wandb

    home = tmp_path / "wandb-home"  # wandb's own settings and cache, away from the user's
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "data"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # train.py creates it before deepspeed.initialize
    env = {}
    ds = fill_run_values({"wandb": {"enabled": True, "project": "lamda-pipe-test"}}, steps=3, run_dir=run_dir,
                         environ=env)
    monkeypatch.setenv("WANDB_DIR", env["WANDB_DIR"])
    try:
        records = log_a_run(run_dir, monitor_for(ds))
        assert wandb.run is None  # the sink finished the run
    finally:
        if wandb.run is not None:
            wandb.finish()
        wandb.teardown()
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list(run_dir.rglob("*"))
    rows = wandb_history(runs[0])
    assert sorted(rows) == [16, 32]
    for record, samples in zip(records, (16, 32)):
        for name in ("tokens_per_s", "tflops_per_device", "mfu", "loss_scale"):
            assert rows[samples][f"Train/Samples/{name}"] == pytest.approx(record[name])
    assert rows[32]["Train/Samples/val_loss"] == 2.5 and rows[32]["Train/Samples/val_loss/law"] == 2.0


@pytest.mark.distributed
def test_monitor_sink_skips_a_disabled_monitor(tmp_path, rank0):
    monitor = monitor_for({})  # nothing enabled in the JSON
    assert not monitor.enabled
    sink = MonitorSink(monitor)
    sink.write({"step": 1}, {"val_loss": 1.0}, 16)
    sink.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
def test_logging_cadence_every_n_steps_and_the_last():
    logger = MetricsLogger([], tokens_per_step=1, flops_per_token=1, log_every=10)
    assert [s for s in range(1, 36) if logger.should_log(s, last_step=s == 35)] == [10, 20, 30, 35]
