"""lamda-check-hosts: a hostfile host that does not answer is named within the connect timeout
(DeepSpeed's own ssh check has none and hangs), not after minutes."""

from __future__ import annotations

import socket
import time

import pytest

from lamda_pipe.tools.check_hosts import main

pytestmark = pytest.mark.unit


@pytest.fixture
def hosts():
    """Three loopback hosts on one port: one answers, one never does (its listen backlog is full, so
    the kernel drops new connection attempts), one refuses (nothing listens)."""
    good = socket.socket()
    good.bind(("127.0.0.1", 0))
    good.listen(8)
    port = good.getsockname()[1]
    silent = socket.socket()
    silent.bind(("127.0.0.2", port))
    silent.listen(0)
    filler = socket.create_connection(("127.0.0.2", port), timeout=1)  # fills the backlog of 1
    yield port
    for s in (filler, silent, good):
        s.close()


def test_unreachable_hosts_are_named_within_the_timeout(tmp_path, hosts, capsys):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# nodes\n127.0.0.1 slots=2\n127.0.0.2 slots=2\n127.0.0.3 slots=2\nno-such-host.invalid slots=1\n")
    start = time.perf_counter()
    status = main(["--hostfile", str(hostfile), "--port", str(hosts), "--timeout", "1"])
    took = time.perf_counter() - start
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err and err.startswith("error: --hostfile ")
    assert f"3 of 4 hosts did not answer on port {hosts}: 127.0.0.2 (no answer within 1 s); " \
           "127.0.0.3 (Connection refused); no-such-host.invalid (its name does not resolve)" in err
    assert "127.0.0.1 (" not in err
    assert took < 3  # all hosts at once: one timeout, not one per host


def test_reachable_hosts_pass_and_bad_hostfiles_are_one_line(tmp_path, hosts, capsys):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=2\n")
    assert main(["--hostfile", str(hostfile), "--port", str(hosts)]) == 0
    assert "all 1 hosts" in capsys.readouterr().out
    hostfile.write_text("127.0.0.1 gpus=2\n")
    assert main(["--hostfile", str(hostfile)]) == 2
    assert "line 1: '127.0.0.1 gpus=2' is not 'HOST slots=N'" in capsys.readouterr().err
    assert main(["--hostfile", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
