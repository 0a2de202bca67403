#!/usr/bin/env python3
"""ds_train.py itself on one GPU, in one command that ends within about 8 minutes, into one JSON.

Run through bench/gpu_trainer.sh (docs/benchmarks.md, "`ds_train.py` on one GPU"). Each step
has its own time limit; a failing step is recorded and the next one runs:

1. install: the wheels carried in .whl/ (DeepSpeed and what the machine's image lacks,
   ../shared/tools/gpu-wheels.sh) into .site/, which every later process has on its path;
2. versions: Python, torch, CUDA, Triton, DeepSpeed, pytest, the GPU;
3. the `cuda`-marked tests (python -m pytest -m cuda, over the test files that have such tests),
   and beside them, on the CPUs: DeepSpeed's FusedAdam built (nvcc, ninja) before any leg needs
   it; the data; the plan of every leg (`ds_train.py --dry-run`, one process), for its
   predicted peak memory. The data is the bundled corpus tokenized for the model's vocabulary:
   real text, so that a run that trains can be told from one that does not (random tokens would
   stay at ln(vocab)); it is small, so samples repeat within a step: this measures the engine;
4. the legs (leg_table): `ds_train.py --model lamda-2b --pipe-stages 1 --seq-len 2048` through
   the deepspeed launcher with one process (NCCL refuses two ranks on one GPU), one DeepSpeed
   config each. Each reports its losses, loss scales, skipped steps, tokens/s, MFU and peak
   memory (metrics.jsonl: torch.cuda.max_memory_allocated) against the plan's, and the log lines
   of DeepSpeed's loss scaler. The trainer always saves at its last step, which for lamda-2b is
   ~27 GB of weights and optimizer state to write: the driver ends a leg once that step is
   logged, and deletes its run dir.

Legs run in priority order while the overall deadline allows; the JSON is rewritten after every
step, so a command cut short still leaves what it had.

    bash bench/gpu_trainer.sh                           # on the GPU machine: JSON to $OUT
    bash bench/gpu_trainer.sh --cpu-smoke /tmp/g.json   # here: the same steps, debug model, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "lamda_pipe" / "ds_configs"
# DeepSpeed's dynamic loss scaler (runtime/fp16/loss_scaler.py): "OVERFLOW! Rank 0 Skipping step.
# Attempted loss scale: X, reducing to Y", and its hysteresis lines
OVERFLOW_RE = re.compile(r"OVERFLOW|[Oo]verflow|reducing to|[Rr]educing dynamic loss scale")
PEAK_RE = re.compile(r"verdict: .*?(?:peak|needs) ([\d.]+) (GiB|MiB)")


def leg_table(smoke: bool) -> list[dict]:
    """The legs, most important first. A leg: its name, the shipped config it starts from, the
    changes to it (dotted keys), extra flags, its steps and its time limit in seconds.
    Steps are few: start-up (building 1.9B parameters, DeepSpeed's set-up, compiling) is most of
    a leg; MFU is taken over the steps after the first two."""
    grad_accum = {"gradient_accumulation_steps": 4}  # 4 x 4 x 2048 tokens per step: short steps
    legs = [
        dict(name="bf16 shipped config (FusedAdam, checkpointing every block)", config="gpu_bf16.json",
             changes={}, flags=[], steps=6, timeout=240),
        # 2^32 should overflow at once; every overflow after the first (hysteresis 2) halves the
        # scale, so a dozen or more steps are skipped before it trains. The skip streak is raised
        # above that, or the guard would roll back to a checkpoint that does not exist yet; a
        # short warmup (the shipped one is 2000 steps) lets the loss show that it trains on.
        dict(name="fp16, initial scale 2^32 (overflows, backs off, trains on)", config="gpu_fp16.json",
             changes={**grad_accum, "fp16.initial_scale_power": 32, "scheduler.params.warmup_num_steps": 5},
             flags=["--skip-streak", "40"], steps=28, timeout=150),
        dict(name="bf16, activation checkpointing off", config="gpu_bf16.json",
             changes={**grad_accum, "pipeline.activation_checkpoint_interval": 0}, flags=[], steps=6, timeout=120),
        dict(name="bf16, torch fused AdamW", config="gpu_bf16.json",
             changes={**grad_accum, "optimizer.params.torch_adam": True, "optimizer.params.fused": True}, flags=[],
             steps=6, timeout=120),
        dict(name="bf16 --compile", config="gpu_bf16.json", changes=grad_accum, flags=["--compile"], steps=6,
             timeout=180),
        dict(name="bf16 --compile, activation checkpointing off", config="gpu_bf16.json",
             changes={**grad_accum, "pipeline.activation_checkpoint_interval": 0}, flags=["--compile"], steps=6,
             timeout=150),
    ]
    if smoke:  # the same legs on CPU: tiny steps; DeepSpeed's CPU Adam would first build C++ for a minute
        for leg in legs:
            leg["changes"] = {**leg["changes"], "gradient_accumulation_steps": 2, "optimizer.params.torch_adam": True}
            leg["steps"], leg["timeout"] = 3, 150
    return legs


def set_dotted(config: dict, key: str, value) -> None:
    *path, last = key.split(".")
    for part in path:
        config = config.setdefault(part, {})
    config[last] = value


class Results:
    """The one JSON of results, rewritten after every step."""

    def __init__(self, path: Path, smoke: bool):
        self.path = path
        self.data = {"script": "bench/gpu_trainer.py", "mode": "cpu-smoke" if smoke else "gpu",
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": {}}
        self.t0 = time.monotonic()

    def put(self, name: str, value) -> None:
        self.data["steps"][name] = value
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)
        print(f"== {name}: {json.dumps(value)[:600]}", flush=True)


def run(cmd: list[str], env: dict, timeout: float) -> dict:
    """A command to its end or its time limit (its whole process group killed then)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = "timeout"
    return {"rc": rc, "wall_s": round(time.monotonic() - t0, 1), "output": out}


def tail(text: str, lines: int = 25) -> list[str]:
    return text.splitlines()[-lines:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install(env: dict, py: str) -> dict:
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    if not wheels:
        return {"ok": False, "error": "no .whl/*.whl carried: run ../shared/tools/gpu-wheels.sh first"}
    r = run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
             "--upgrade", "--target", str(ROOT / ".site"), *wheels], env, 120)
    return {"ok": r["rc"] == 0, "wheels": [Path(w).name for w in wheels], "wall_s": r["wall_s"],
            "tail": tail(r["output"], 10)}


VERSIONS = """
import json, platform, shutil, torch
out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
       "gcc": shutil.which("gcc"), "g++": shutil.which("g++"), "nvcc": shutil.which("nvcc")}
for name in ("triton", "deepspeed", "pydantic", "pytest"):
    try:
        out[name] = __import__(name).__version__
    except Exception as e:
        out[name] = f"unavailable: {type(e).__name__}: {e}"
print("VERSIONS " + json.dumps(out))
"""


def versions(env: dict, py: str) -> dict:
    r = run([py, "-c", VERSIONS], env, 120)
    found = [line for line in r["output"].splitlines() if line.startswith("VERSIONS ")]
    return json.loads(found[-1][9:]) if found else {"error": tail(r["output"])}


def build_fused_adam(env: dict, py: str, timeout: float) -> dict:
    """DeepSpeed's FusedAdam is built just in time with nvcc and ninja on its first use (cached
    after): built here, with its own limit, so that the first leg's time is training only."""
    code = "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load(); print('BUILT')"
    r = run([py, "-c", code], env, timeout)
    return {"ok": "BUILT" in r["output"], "rc": r["rc"], "wall_s": r["wall_s"], "tail": tail(r["output"], 8)}


def cuda_tests(env: dict, py: str, timeout: float) -> dict:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "mark.cuda" in p.read_text())
    r = run([py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
             *files], env, timeout)
    summary = [line for line in r["output"].splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return {"rc": r["rc"], "files": files, "wall_s": r["wall_s"], "summary": summary[-1:] or None,
            "failures": [line for line in r["output"].splitlines() if line.startswith(("FAILED", "ERROR"))],
            "tail": tail(r["output"], 15)}


def prepare_data(env: dict, py: str, out_dir: Path, vocab: int) -> dict:
    code = ("import sys; from pathlib import Path; from lamda_pipe.data.loader import prepare_bundled; "
            "prepare_bundled(Path(sys.argv[1]), int(sys.argv[2]))")
    r = run([py, "-c", code, str(out_dir), str(vocab)], env, 180)
    meta = out_dir / "meta.json"
    return {"rc": r["rc"], "wall_s": r["wall_s"], "kind": "bundled corpus, tokenizer trained for the model",
            "meta": json.loads(meta.read_text()) if meta.is_file() else None, "tail": tail(r["output"], 10)}


def train_flags(leg: dict, model: str, seq_len: int, data: Path, run_dir: Path, config: Path) -> list[str]:
    return ["--model", model, "--pipe-stages", "1", "--seq-len", str(seq_len), "--data", str(data),
            "--run-dir", str(run_dir), "--steps", str(leg["steps"]), "--log-every", "1", "--eval-every", "0",
            "--save-every", "1000000", "--sample-tokens", "0", "--deepspeed_config", str(config), *leg["flags"]]


DRY_RUNS = """
import contextlib, io, json, sys
from lamda_pipe.train import main
for name, argv in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    print("DRYRUN " + json.dumps({"name": name, "rc": rc, "plan": buf.getvalue()}), flush=True)
"""


def dry_runs(env: dict, py: str, argvs: list, timeout: float) -> dict:
    r = run([py, "-c", DRY_RUNS, json.dumps(argvs)], env, timeout)
    plans = {}
    for line in r["output"].splitlines():
        if line.startswith("DRYRUN "):
            d = json.loads(line[7:])
            m = PEAK_RE.search(d["plan"])
            gib = float(m.group(1)) / (1024 if m.group(2) == "MiB" else 1) if m else None
            plans[d["name"]] = {"rc": d["rc"], "predicted_peak_gib": gib,
                                "verdict": [x for x in d["plan"].splitlines() if x.startswith(("verdict", "time"))]}
    return {"rc": r["rc"], "wall_s": r["wall_s"], "plans": plans, "tail": None if plans else tail(r["output"])}


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return [r for r in out if "loss" in r]


def median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def train_leg(leg: dict, cmd: list[str], env: dict, run_dir: Path, timeout: float) -> dict:
    """Runs one leg until its last step is logged (then ends it: see the module docstring), it
    exits, or its time is up."""
    t0 = time.monotonic()
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        ended = "exited"
        while proc.poll() is None:
            records = read_records(run_dir)
            if records and records[-1]["step"] >= leg["steps"]:
                ended = "ended by the driver after its last step was logged"
                break
            if time.monotonic() - t0 > timeout:
                ended = "timeout"
                break
            time.sleep(0.5)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    output = log.read_text(errors="replace")
    records = read_records(run_dir)
    later = [r for r in records if r["step"] > 2] or records
    first = next((line for line in output.splitlines() if line.startswith("step ")), None)
    scaler = [line for line in output.splitlines() if OVERFLOW_RE.search(line)]
    return {
        "ended": ended, "rc": proc.returncode, "wall_s": round(time.monotonic() - t0, 1),
        "steps_logged": [r["step"] for r in records], "losses": [round(r["loss"], 4) for r in records],
        "loss_scales": [r["loss_scale"] for r in records],
        "skipped_steps": records[-1]["skipped_steps"] if records else None,
        "tokens_per_s_median": median([r["tokens_per_s"] for r in later]),
        "mfu_median": median([r.get("mfu") for r in later]),
        "peak_memory_gib": records[-1].get("peak_memory_gib") if records else None,
        "first_step_line": first,
        "loss_scaler_line_count": len(scaler),
        "loss_scaler_lines": scaler if len(scaler) <= 12 else scaler[:6] + ["..."] + scaler[-6:],
        "errors": [line for line in output.splitlines() if "error" in line.lower() or "Traceback" in line][:12],
        "tail": tail(output, 12 if ended != "exited" or proc.returncode == 0 else 40),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="the same steps on CPU: debug model, tiny steps")
    p.add_argument("json", nargs="?", type=Path, default=None,
                   help="where the JSON goes when $OUT is not set (default ./gpu_trainer.json)")
    p.add_argument("--deadline", type=float, default=450.0, help="seconds for everything (default 450)")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    if os.environ.get("OUT"):  # the device tool's output folder: what is written there comes back
        out = Path(os.environ["OUT"]) / "gpu_trainer.json"
    else:
        out = args.json or Path("gpu_trainer.json")
    results = Results(out.resolve(), smoke)
    deadline = time.monotonic() + args.deadline
    py = sys.executable
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not smoke:
        results.put("install", install(env, py))
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / ".site"), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(":")
    else:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(":")
    results.put("versions", versions(env, py))

    model, seq_len, vocab = ("debug", 128, 2048) if smoke else ("lamda-2b", 2048, 32000)
    work = Path(tempfile.mkdtemp(prefix="gpu_trainer-"))
    data = work / "data"
    legs = leg_table(smoke)
    for i, leg in enumerate(legs):
        config = json.loads((CONFIGS / leg["config"]).read_text())
        for key, value in leg["changes"].items():
            set_dotted(config, key, value)
        leg["config_path"] = work / f"leg{i}.json"
        leg["config_path"].write_text(json.dumps(config, indent=1))
        leg["run_dir"] = work / f"leg{i}"
        leg["argv"] = train_flags(leg, model, seq_len, data, leg["run_dir"], leg["config_path"])
    # The FusedAdam build (nvcc), the data (tokenizer training) and the plans need CPUs (a plan
    # only reads the GPU's size): they run beside the tests, which need the GPU. The smoke legs
    # use torch's AdamW instead: DeepSpeed's CPU Adam would be another C++ build.
    with ThreadPoolExecutor(3) as pool:
        build = None if smoke else pool.submit(build_fused_adam, env, py, min(240.0, deadline - time.monotonic()))
        prepared = pool.submit(prepare_data, env, py, data, vocab)
        planned = pool.submit(dry_runs, env, py, [(leg["name"], ["--dry-run", *leg["argv"]]) for leg in legs],
                              min(120.0, deadline - time.monotonic()))
        results.put("cuda_tests", cuda_tests(env, py, min(120.0, deadline - time.monotonic())))
        if build is not None:
            results.put("fused_adam_build", build.result())
        results.put("data", prepared.result())
        plans = planned.result()
        results.put("dry_runs", plans)

    for leg in legs:
        left = deadline - time.monotonic()
        entry = {"config": leg["config"], "changes": leg["changes"], "flags": leg["flags"], "steps": leg["steps"]}
        if left < 60:
            results.put(f"leg: {leg['name']}", {**entry, "skipped": f"out of time ({left:.0f} s left)"})
            continue
        launcher = [py, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port())]
        entry.update(train_leg(leg, [*launcher, str(ROOT / "ds_train.py"), *leg["argv"]], env, leg["run_dir"],
                               min(leg["timeout"], left - 10)))
        predicted = plans["plans"].get(leg["name"], {}).get("predicted_peak_gib")
        entry["predicted_peak_gib"] = predicted
        if predicted and entry["peak_memory_gib"]:
            entry["measured_over_predicted"] = round(entry["peak_memory_gib"] / predicted, 4)
        shutil.rmtree(leg["run_dir"], ignore_errors=True)  # checkpoints, possibly half written
        results.put(f"leg: {leg['name']}", entry)
    shutil.rmtree(work, ignore_errors=True)
    results.put("done", {"elapsed_s": round(time.monotonic() - results.t0, 1), "json": str(out)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
