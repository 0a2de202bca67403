"""The package as a user installs it: a wheel built from this checkout, installed (not editable)
by pip into a fresh venv, dependency list checked, trains with the venv's `lamda-train` started
from a directory far from the checkout, on the DeepSpeed JSON and the demo corpus shipped inside
the package."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_utils import free_port

pytestmark = pytest.mark.launch  # pip, and lamda-train as a subprocess

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["cpu.json", "gpu_bf16.json", "gpu_fp16.json"]
BOOKS = ["ecclesiastes.txt", "esther.txt", "genesis.txt", "job.txt", "proverbs.txt", "ruth.txt"]


def run(argv, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)
    assert proc.returncode == 0, f"{argv[:4]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_installed_elsewhere_trains_from_any_directory(tmp_path):
    from lamda_pipe.checkpoint import validate
    from lamda_pipe.ds_config import fill_run_values

    wheels, target, run_dir, cwd = (tmp_path / name for name in ("wheels", "target", "run", "cwd"))
    cwd.mkdir()
    # setuptools reads DIST_EXTRA_CONFIG as one more setup.cfg: build/ and the egg-info go to
    # tmp_path, not into the checkout, where a stale build/lib could hand the wheel a file the
    # sources no longer hold.
    build_cfg = tmp_path / "build.cfg"
    build_cfg.write_text(f"[build]\nbuild_base = {tmp_path / 'build'}\n[egg_info]\negg_base = {tmp_path}\n")
    pip_env = {**os.environ, "DIST_EXTRA_CONFIG": str(build_cfg), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [sys.executable, "-m", "pip"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir", "-w", str(wheels),
         str(ROOT)], cwd=tmp_path, env=pip_env)
    (wheel,) = wheels.glob("lamda_pipe-*.whl")
    # A fresh venv that sees this one's packages (a .pth file: torch, DeepSpeed, ... are not
    # installed twice), so that pip checks the wheel's dependency list against them: with
    # --no-index a requirement nothing satisfies fails the install.
    run([sys.executable, "-m", "venv", "--without-pip", str(target)], cwd=tmp_path)  # pip is this one's
    venv_site = next((target / "lib").glob("python3*/site-packages"))
    here_site = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "deepspeed").is_dir())
    (venv_site / "outer.pth").write_text(f"{here_site}\n")
    py = target / "bin" / "python"
    installed = run([*pip, "--python", str(py), "install", "--no-index", str(wheel)], cwd=tmp_path, env=pip_env)
    assert "Successfully installed lamda-pipe" in installed.stdout, installed.stdout

    package = venv_site / "lamda_pipe"
    assert sorted(p.name for p in (package / "ds_configs").glob("*.json")) == CONFIGS
    assert sorted(p.name for p in (package / "data" / "corpus").glob("*.txt")) == BOOKS
    # Marks on the installed copies: the run must read these, not the checkout's files.
    cpu_json = package / "ds_configs" / "cpu.json"
    config = json.loads(cpu_json.read_text())
    config["steps_per_print"] = 1_000_003
    cpu_json.write_text(json.dumps(config))
    with open(package / "data" / "corpus" / "ruth.txt", "a", encoding="utf-8") as f:
        f.write("\n\nA chapter that only the installed corpus holds.\n")
    corpus = sorted((package / "data" / "corpus").glob("*.txt"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in corpus)).hexdigest()[:16]

    # One process, as a launcher would start rank 0 of 1; CPU whatever the machine has.
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    where = run([str(py), "-c", "import lamda_pipe; print(lamda_pipe.__file__)"], cwd=cwd, env=env)
    assert Path(where.stdout.strip()) == package / "__init__.py"  # the installed copy, not the checkout
    proc = run([str(target / "bin" / "lamda-train"), "--pipe-stages", "1", "--steps", "2",
                "--save-every", "2", "--eval-every", "0", "--sample-tokens", "4", "--run-dir", str(run_dir)],
               cwd=cwd, env=env)
    assert "sample: " in proc.stdout
    assert list(cwd.iterdir()) == []  # everything went to --run-dir

    record = validate(run_dir / "checkpoints" / "global_step2")  # complete, every file readable
    assert (record.global_steps, record.pipe_stages) == (2, 1)
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step2"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "loss" in r] == [2]
    # The installed cpu.json, filled with this run's values, is the config the run recorded.
    assert record.ds_config == fill_run_values(config, steps=2, run_dir=run_dir)
    meta = json.loads((run_dir / "data" / "meta.json").read_text())
    assert meta["source"].startswith(f"bundled corpus {digest},")
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 150  # 149 + the mark
