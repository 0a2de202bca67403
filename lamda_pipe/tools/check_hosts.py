"""lamda-check-hosts: every host of a DeepSpeed hostfile answers on its ssh port, within seconds.

    python -m lamda_pipe.tools.check_hosts --hostfile hostfile && deepspeed --hostfile hostfile ds_train.py ...

DeepSpeed's launcher checks each host with `ssh HOST hostname`, which has no timeout: a node that
does not answer (down, firewalled, a typo that resolves somewhere) hangs the launcher without a
word. This connects to every host's ssh port at once, with a connect timeout, and names each one
that did not answer; the Slurm scripts run it before the launcher.
"""

from __future__ import annotations

import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import ConfigError
from . import ArgumentParser, run_cli


def read_hostfile(path: Path) -> list[str]:
    """Host names of a DeepSpeed hostfile ('HOST slots=N' lines, '#' comments)."""
    if not path.is_file():
        raise ConfigError(f"--hostfile {path}: no such file; write one line 'HOST slots=N' per node")
    hosts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        host, *rest = line.split()
        if any(not r.startswith("slots=") for r in rest):
            raise ConfigError(f"--hostfile {path}, line {n}: {line!r} is not 'HOST slots=N'")
        hosts.append(host)
    if not hosts:
        raise ConfigError(f"--hostfile {path} names no host; write one line 'HOST slots=N' per node")
    return hosts


def probe(host: str, port: int, timeout: float) -> str | None:
    """None if host accepts a TCP connection on port within timeout; else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror:
        return "its name does not resolve"
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as e:
        return e.strerror or type(e).__name__


def unreachable(hosts: list[str], port: int, timeout: float) -> dict[str, str]:
    """Host -> why it did not answer, for every host that did not; all probed at once."""
    with ThreadPoolExecutor(max_workers=min(64, len(hosts))) as pool:
        results = pool.map(lambda h: (h, probe(h, port, timeout)), hosts)
        return {h: why for h, why in results if why is not None}


def _run(argv) -> int:
    p = ArgumentParser(prog="lamda-check-hosts", description=__doc__.split("\n\n")[0])
    p.add_argument("--hostfile", type=Path, required=True, help="DeepSpeed hostfile ('HOST slots=N' lines)")
    p.add_argument("--port", type=int, default=22, help="ssh port of the hosts (default 22)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each host (default 5)")
    args = p.parse_args(argv)
    if not args.timeout > 0:
        raise ConfigError(f"--timeout must be > 0, got {args.timeout}")
    hosts = read_hostfile(args.hostfile)
    start = time.perf_counter()
    bad = unreachable(hosts, args.port, args.timeout)
    if bad:
        listing = "; ".join(f"{h} ({why})" for h, why in bad.items())
        raise ConfigError(f"--hostfile {args.hostfile}: {len(bad)} of {len(hosts)} hosts did not answer on port "
                          f"{args.port}: {listing}; remove them from the hostfile or bring them up")
    print(f"all {len(hosts)} hosts of {args.hostfile} answer on port {args.port} "
          f"({time.perf_counter() - start:.2f} s)")
    return 0


def main(argv=None) -> int:
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
