"""Process-group start-up shared by every launcher: deepspeed, torchrun and Slurm's srun, and the
project's one process-liveness check. torch and DeepSpeed are imported inside the functions that
need them: importing this module must stay cheap (data-preparation workers import it)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def launch_env(local_rank_arg: int = -1) -> LaunchEnv:
    """Reads the launcher's environment without starting anything.

    deepspeed and torchrun set RANK/WORLD_SIZE/LOCAL_RANK; under a bare `srun` only SLURM_*
    is set, so it is translated (MASTER_ADDR/MASTER_PORT must come from the job script).
    """
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        tasks_per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        if tasks_per_node.isdigit():
            env.setdefault("LOCAL_WORLD_SIZE", tasks_per_node)
    world = int(env.get("WORLD_SIZE", 1))
    local_rank = int(env.get("LOCAL_RANK", max(local_rank_arg, 0)))
    local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)))
    return LaunchEnv(int(env.get("RANK", 0)), world, local_rank, max(local_world, 1))


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host (a zombie counts as alive). Without
    torch: data-preparation workers import this module."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def set_cpu_threads(local_world_size: int) -> int:
    """Gives each rank on a host its share of the cores unless OMP_NUM_THREADS says otherwise:
    ranks each using every core oversubscribe the CPU and spend their time in OpenMP barriers."""
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // local_world_size)
    torch.set_num_threads(threads)
    return threads


def init_distributed() -> None:
    """Starts the process group (without DeepSpeed's shared-memory all-reduce op: skip_shm_comm)."""
    import deepspeed

    skip_shm_comm()
    deepspeed.init_distributed(auto_mpi_discovery=False)


def skip_shm_comm() -> None:
    """DeepSpeed's shared-memory all-reduce op serves only inference, yet deepspeed.comm's
    start JIT-compiles it (C++, tens of seconds on a cold cache). Its on/off switch is
    DeepSpeed's table of compatible ops, read only there; setting the entry before the table
    is first read also skips the probe that builds it (compiler runs, linker noise on stderr).
    Call before anything starts deepspeed.comm."""
    import deepspeed.ops

    compatible = deepspeed.ops.__dict__.get("__compatible_ops__")
    if compatible is None:
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    else:
        compatible["deepspeed_shm_comm"] = False
