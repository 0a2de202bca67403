"""Across two hosts, for real. Two hosts are made on this machine as network namespaces joined by
a veth, each with its own sshd, hostname and PID namespace (tests/hosts.py). Then:
- `deepspeed --hostfile` with DeepSpeed's default launcher (pdsh over ssh) starts one pipeline
  stage on each host, the stages talk gloo over the veth, and a second launch resumes;
- a 2-node Slurm on the same hosts runs scripts/slurm/pretrain.sbatch (hostfile derived from
  the job's node list, DeepSpeed's launcher over pdsh) and pretrain_srun.sbatch (srun, no ssh).
The losses equal a single-host run's, bit for bit.

Skips (with the reason) where namespaces cannot be made: not root, no `ip netns`, packages
missing and not installable. CI (.ci/run) installs the packages, so there it runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_utils import run_ranks
from tests.hosts import NamespaceHosts, SlurmCluster, hosts_unavailable, sbatch_env, skip, slurm_unavailable

pytestmark = pytest.mark.launch  # namespace hosts, pdsh/ssh and Slurm

ROOT = Path(__file__).resolve().parent.parent
DS_TRAIN = str(ROOT / "ds_train.py")
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
SCRIPTS = ROOT / "scripts" / "slurm"
TRAIN_FLAGS = ["--model", "debug", "--pipe-stages", "2", "--log-every", "1", "--eval-every", "0",
               "--sample-tokens", "0", "--save-every", "2"]


@pytest.fixture(scope="module")
def hosts(request, tmp_path_factory):
    reason = hosts_unavailable()
    if reason:
        skip(request, reason)
    h = NamespaceHosts(tmp_path_factory.mktemp("hosts"))
    try:
        h.start()
        yield h
    finally:
        h.close()


@pytest.fixture(scope="module")
def single_host_losses(hosts, tmp_path_factory) -> dict[int, float]:
    """6 steps on one host, 2 processes (forked, one thread each), in one go: the reference."""
    run_dir = tmp_path_factory.mktemp("single")
    run_ranks(_train_rank, 2, ["--run-dir", str(run_dir), *TRAIN_FLAGS, "--steps", "6"], timeout=180)
    return losses(run_dir)


def _train_rank(rank: int, argv: list[str]) -> int:
    from lamda_pipe.train import main

    return main(argv)


def launch(hosts: NamespaceHosts, launch_dir: Path, run_dir: Path, port: int, *flags: str) -> subprocess.CompletedProcess:
    """The user's command, typed on h1: `deepspeed --hostfile hostfile ds_train.py ...`."""
    (launch_dir / "hostfile").write_text("# written by the test, see hostfile.example\nh1 slots=1\nh2 slots=1\n")
    # What the ranks on the other hosts need: the runner exports only PYTHON* variables and this
    # file (no comments or blank lines: DeepSpeed splits every line at '=').
    (launch_dir / ".deepspeed_env").write_text("OMP_NUM_THREADS=1\nDS_ACCELERATOR=cpu\n")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"),
           "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    argv = [DEEPSPEED, "--hostfile", "hostfile", "--master_port", str(port), DS_TRAIN,
            "--run-dir", str(run_dir), *TRAIN_FLAGS, *flags]
    proc = hosts.run(0, argv, cwd=launch_dir, env=env, timeout=180)
    assert proc.returncode == 0, (f"launch failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}\n"
                                  + hosts.sshd_logs())
    # Everything the launch started (pdsh, ssh sessions, ranks) is gone on every host.
    assert hosts.wait_no_strays() == {ns: [] for ns in hosts.ns}
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_hostfile_launch_across_two_hosts_then_resume(hosts, single_host_losses, tmp_path):
    launch_dir, run_dir = tmp_path / "launch", tmp_path / "run"
    launch_dir.mkdir()

    # The hosts' ports are their own: DeepSpeed's default 29500 cannot collide with other jobs.
    first = launch(hosts, launch_dir, run_dir, 29500, "--steps", "4")
    out = first.stdout + first.stderr
    # pdsh prefixes every remote line with the host: one launcher per host, one rank each,
    # rank 0 (stage 0) on h1 and rank 1 (stage 1) on h2.
    assert "WORLD INFO DICT: {'h1': [0], 'h2': [0]}" in out
    assert "global_rank_mapping=defaultdict(<class 'list'>, {'h1': [0], 'h2': [1]})" in out
    assert "h1: " in out and "nnodes=2, num_local_procs=1, node_rank=0" in out
    assert "h2: " in out and "nnodes=2, num_local_procs=1, node_rank=1" in out
    node_rank_1 = [line for line in out.splitlines() if "node_rank=1" in line and "nnodes=2" in line]
    assert node_rank_1 and all(line.startswith("h2: ") for line in node_rank_1)
    assert "2 stages x 1 data parallel" in out
    assert list(losses(run_dir)) == [1, 2, 3, 4]
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "global_step4"
    # One model-state file per stage: stage 0 was written on h1, stage 1 on h2.
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= {p.name for p in (ckpt / "global_step4").iterdir()}

    second = launch(hosts, launch_dir, run_dir, 29501, "--steps", "6", "--resume", "auto")
    assert "at step 4, 64 samples consumed" in second.stdout  # 64 = 4 steps x 16 samples
    stitched = losses(run_dir)
    assert list(stitched) == [1, 2, 3, 4, 5, 6]
    assert (ckpt / "latest").read_text().strip() == "global_step6"

    # Equal bit for bit to 6 steps on one host in one go (fp32, one thread per rank): crossing
    # hosts and resuming changed nothing.
    assert stitched == single_host_losses


@pytest.fixture(scope="module")
def slurm_on_hosts(request, hosts):
    reason = slurm_unavailable()
    if reason:
        skip(request, reason)
    cluster = SlurmCluster(hosts=hosts)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def test_slurm_two_nodes_launcher_script_then_srun_script_resumes(slurm_on_hosts, hosts, single_host_losses, tmp_path):
    """`sbatch -N 2 --ntasks-per-node 1`: pretrain.sbatch writes a hostfile of the job's nodes and
    launches through DeepSpeed's launcher (pdsh over ssh) from the first node; then
    pretrain_srun.sbatch continues the same run with srun starting one rank per node."""
    slurm, run_dir = slurm_on_hosts, tmp_path / "run"
    nodes = ["--nodes", "2", "--ntasks-per-node", "1", "--cpus-per-task", "1", "--job-name", "lamda-2node"]

    log = tmp_path / "launcher.out"
    job = slurm.sbatch(*nodes, "--output", str(log), str(SCRIPTS / "pretrain.sbatch"), env=sbatch_env(run_dir, 2), cwd=ROOT)
    text = slurm.wait_ok(job, log, 180)
    assert f"job {job} (restart 0) on 2 node(s): h1 h2" in text
    port = 10000 + job % 20000  # the script's default: distinct per job
    assert f"ranks: 1 per node x 2 = 2 | 1 thread(s) each | accelerator cpu | master h1:{port}" in text
    assert (run_dir / f"slurm-{job}" / "hostfile").read_text() == "h1 slots=1\nh2 slots=1\n"
    assert f"--launcher pdsh --master_addr h1 --master_port {port} ds_train.py" in text
    assert "WORLD INFO DICT: {'h1': [0], 'h2': [0]}" in text
    node_rank_1 = [line for line in text.splitlines() if "nnodes=2, num_local_procs=1, node_rank=1" in line]
    assert node_rank_1 and all(line.startswith("h2: ") for line in node_rank_1)
    assert list(losses(run_dir)) == [1, 2]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "global_step2"

    log2 = tmp_path / "srun.out"
    job2 = slurm.sbatch(*nodes, "--output", str(log2), str(SCRIPTS / "pretrain_srun.sbatch"),
                        env=sbatch_env(run_dir, 4), cwd=ROOT)
    text2 = slurm.wait_ok(job2, log2, 180)
    assert slurm.job(job2)["NodeList"] == "h[1-2]"
    assert "+ srun --kill-on-bad-exit=1 --nodes=2 --ntasks-per-node=1 --ntasks=2" in text2
    assert "at step 2, 32 samples consumed" in text2
    stitched = losses(run_dir)
    assert list(stitched) == [1, 2, 3, 4]
    assert stitched == {step: single_host_losses[step] for step in (1, 2, 3, 4)}

    # Nothing of either job is left on the hosts (ranks, ssh sessions, slurmstepd).
    assert hosts.wait_no_strays() == {ns: [] for ns in hosts.ns}
