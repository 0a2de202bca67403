"""Real machinery for the launch tests, all on this one machine: two "hosts" as network
namespaces with their own sshd (for `deepspeed --hostfile` over pdsh/ssh), and a real
single-node Slurm (munged, slurmctld, slurmd) configured in a temp dir.

Everything started here is stopped by PID in `close()`; names, subnets and ports are picked
per run so that concurrent runs on the same machine cannot collide. Leftovers of runs that were
killed before they could clean up (their pytest PID is part of every name) are removed by the
next run.

Hazard (see DeepSpeed's runner): on SIGINT/SIGTERM the pdsh runner runs
`pkill -f '<python> -u -m deepspeed.launcher.launch'` on every host. Each simulated host, and the
launcher itself, therefore lives in its own PID namespace, and the launcher is only ever
stopped with SIGKILL.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from lamda_pipe.distributed import pid_alive  # one liveness check for the project
from tests.dist_utils import free_port

APT_TIMEOUT = 600


SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def _have(cmd: str) -> bool:
    return shutil.which(cmd, path=SBIN_PATH) is not None


def ensure_packages(needed: dict[str, str]) -> str | None:
    """`needed` maps a command to its Debian package. Installs what is missing with apt-get
    (root only); returns why that is impossible, or None when everything is there."""
    missing = sorted({pkg for cmd, pkg in needed.items() if not _have(cmd)})
    if not missing:
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"missing Debian packages {' '.join(missing)} and apt-get is not usable here (needs root)"
    if os.environ.get("LAMDA_TEST_NO_APT"):
        return f"missing Debian packages {' '.join(missing)} (LAMDA_TEST_NO_APT is set)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "-o", "DPkg::Lock::Timeout=120", *missing]
    try:
        if subprocess.run(install, env=env, capture_output=True, timeout=APT_TIMEOUT).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=APT_TIMEOUT)
            proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT)
            if proc.returncode != 0:
                return f"apt-get install {' '.join(missing)} failed: {proc.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired:
        return f"apt-get install {' '.join(missing)} took longer than {APT_TIMEOUT}s"
    still = sorted({pkg for cmd, pkg in needed.items() if not _have(cmd)})
    return f"packages installed but still missing: {' '.join(still)}" if still else None


def skip(request, reason: str):
    """pytest.skip, with the reason also printed at once (past output capture): a skipped
    launch test should say why even without `-rs`."""
    import pytest

    capman = request.config.pluginmanager.getplugin("capturemanager")
    line = f"\nSKIPPED {request.node.nodeid}: {reason}"
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print(line, flush=True)
    else:
        print(line, flush=True)
    pytest.skip(reason)


def _kill_pids(pids, sig=signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if pid_alive(p) and not _is_zombie(p)]
    return alive


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _ancestors(pid: int) -> set[int]:
    """pid and its parents, up to PID 1."""
    out = set()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return out


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


# --------------------------------------------------------------------------------------------
# Hosts: network namespaces joined by a veth pair, each with an sshd in its own PID/UTS namespace
# --------------------------------------------------------------------------------------------

HOST_PACKAGES = {"sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client", "pdsh": "pdsh",
                 "unshare": "util-linux", "nsenter": "util-linux", "ip": "iproute2"}
NS_PATTERN = re.compile(r"^lpt(\d+)x[0-9a-f]{6}h\d$")  # lpt<pytest pid>x<token>h<i>


def hosts_unavailable() -> str | None:
    """Why namespace hosts cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network-namespace hosts need root"
    reason = ensure_packages(HOST_PACKAGES)
    if reason:
        return reason
    probe = f"lpt{os.getpid()}x{secrets.token_hex(3)}h0"
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return f"`ip netns add` is not allowed here: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


def reap_stale_namespaces() -> None:
    """Removes namespaces (and their processes, /etc/netns entries) left by test runs whose
    pytest process no longer exists; anything of a live run is left alone."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = NS_PATTERN.match(name)
        if m and not pid_alive(int(m.group(1))):
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                                  timeout=30).stdout.split()
            _kill_pids(int(p) for p in pids)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
            shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


def _pick_subnet() -> ipaddress.IPv4Network:
    """A random private /24 not routed on this machine (the addresses live only inside the
    namespaces, so this is for clarity, not necessity)."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True,
                            timeout=30).stdout
    used = [ipaddress.ip_network(w, strict=False) for w in re.findall(r"\b\d+\.\d+\.\d+\.\d+/\d+\b", routes)]
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{random.randint(200, 254)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free private /24 found")


class NamespaceHosts:
    """Two hosts, h1 and h2, reachable from each other as `ssh h1` / `ssh h2` (root, a key made
    for this run). Commands run "on" a host through `run(i, argv)`."""

    IFACE = "lpeth0"

    def __init__(self, workdir: Path, count: int = 2):
        assert count == 2, "one veth pair joins exactly two hosts"
        self.workdir = Path(workdir)
        token = f"lpt{os.getpid()}x{secrets.token_hex(3)}"
        self.ns = [f"{token}h{i + 1}" for i in range(count)]
        self.names = [f"h{i + 1}" for i in range(count)]
        net = _pick_subnet()
        self.ips = [str(net.network_address + i + 1) for i in range(count)]
        self.prefix = net.prefixlen
        self.key = self.workdir / "id_ed25519"
        self._sshd: list[subprocess.Popen] = []
        self._created_ns: list[str] = []
        self.daemons: set[int] = set()  # PIDs of long-running services on the hosts (a Slurm's)

    # -- set-up ----------------------------------------------------------------------------
    def start(self, timeout: float = 20) -> None:
        reap_stale_namespaces()
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's compiled-in privilege-separation dir
        for ns in self.ns:
            self._ip("netns", "add", ns)
            self._created_ns.append(ns)
        # Created directly inside the namespaces: nothing appears in the machine's own network.
        self._ip("link", "add", self.IFACE, "netns", self.ns[0], "type", "veth",
                 "peer", "name", self.IFACE, "netns", self.ns[1])
        for ns, ip in zip(self.ns, self.ips):
            self._ip("-n", ns, "addr", "add", f"{ip}/{self.prefix}", "dev", self.IFACE)
            self._ip("-n", ns, "link", "set", self.IFACE, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")

        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lamda-pipe test", "-f", str(self.key)],
                       check=True, timeout=30)
        (self.workdir / "authorized_keys").write_text((self.workdir / "id_ed25519.pub").read_text())
        hosts = ["127.0.0.1 localhost", "::1 localhost"]
        hosts += [f"{ip} {name}" for ip, name in zip(self.ips, self.names)]
        # c10d also looks the peers up by their IPv4-mapped IPv6 form; without these it warns.
        hosts += [f"::ffff:{ip} {name}" for ip, name in zip(self.ips, self.names)]
        ssh_config = (f"Host *\n  User root\n  IdentityFile {self.key}\n  IdentitiesOnly yes\n"
                      f"  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n"
                      f"  LogLevel ERROR\n  ConnectTimeout 10\n")
        for i, ns in enumerate(self.ns):
            # `ip netns exec` bind-mounts each entry of /etc/netns/<ns>/ over /etc/<entry>.
            etc = Path("/etc/netns") / ns
            (etc / "ssh").mkdir(parents=True)
            (etc / "hosts").write_text("\n".join(hosts) + "\n")
            (etc / "resolv.conf").write_text("")
            (etc / "ssh" / "ssh_config").write_text(ssh_config)
            hostkey = self.workdir / f"host_key_{i + 1}"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)], check=True, timeout=30)
            cfg = self.workdir / f"sshd_config_{i + 1}"
            cfg.write_text(f"ListenAddress {self.ips[i]}\nPort 22\nHostKey {hostkey}\n"
                           f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}\nPermitRootLogin yes\n"
                           f"StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                           f"PidFile none\nLogLevel INFO\n")
            log = open(self.workdir / f"sshd_{i + 1}.log", "ab")
            self._sshd.append(subprocess.Popen(
                # sshd re-executes itself for each connection: it needs its absolute path.
                self._in_host(i, [shutil.which("sshd", path=SBIN_PATH), "-D", "-e", "-f", str(cfg)]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
        deadline = time.monotonic() + timeout
        for i in range(len(self.ns)):
            for name in self.names:
                while True:
                    proc = subprocess.run(["ip", "netns", "exec", self.ns[i], "ssh", name, "true"],
                                          capture_output=True, text=True, timeout=30)
                    if proc.returncode == 0:
                        break
                    if time.monotonic() > deadline or any(p.poll() is not None for p in self._sshd):
                        raise RuntimeError(f"ssh {self.names[i]} -> {name} does not work: {proc.stderr.strip()}\n"
                                           + self.sshd_logs())
                    time.sleep(0.1)

    def _ip(self, *args: str) -> None:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")

    def _in_host(self, i: int, argv: list[str]) -> list[str]:
        """argv run on host i: its network namespace, its /etc/netns/<ns> files bound over /etc
        (as `ip netns exec` does, but keeping /sys: slurmd wants the machine's cgroup mounts),
        its own hostname (gloo binds to the address gethostname() resolves to) and a PID
        namespace of its own (so DeepSpeed's `pkill -f` on SIGINT/SIGTERM reaches only this host;
        SIGKILL of the `unshare` takes the whole namespace down)."""
        setup = ('for f in /etc/netns/"$0"/*; do mount --bind "$f" "/etc/${f##*/}" || exit 1; done; '
                 'hostname "$1" && shift && exec "$@"')
        return ["nsenter", f"--net=/run/netns/{self.ns[i]}", "unshare", "--mount", "--uts", "--pid", "--fork",
                "--mount-proc", "--kill-child", "sh", "-c", setup, self.ns[i], self.names[i], *argv]

    def enter(self, i: int, argv: list[str]) -> list[str]:
        """argv inside host i's running namespaces (network, hostname, PID, mounts: /etc/hosts,
        ssh config, /proc), as a daemon of that host would run; nsenter forks it and waits."""
        holder = self._sshd[i].pid
        pid1 = _children(holder)[0]  # the host's init: sshd
        return ["nsenter", f"--target={pid1}", "--net", "--uts", "--pid", "--mount", "--", *argv]

    def sshd_logs(self) -> str:
        return "\n".join(f"--- sshd on {n}:\n" + (self.workdir / f"sshd_{i + 1}.log").read_text(errors="replace")[-2000:]
                         for i, n in enumerate(self.names) if (self.workdir / f"sshd_{i + 1}.log").exists())

    # -- use -------------------------------------------------------------------------------
    def run(self, i: int, argv: list[str], *, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        """Runs argv on host i (like a user logged in there) and waits at most `timeout` seconds;
        on timeout everything it started, on every host, is SIGKILLed."""
        proc = subprocess.Popen(self._in_host(i, argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # SIGKILL to `unshare --kill-child`: its whole PID namespace dies
            self.kill_strays()
            out, err = proc.communicate(timeout=30)
            err += f"\n[tests.hosts] killed after {timeout:.0f}s"
            return subprocess.CompletedProcess(argv, -9, out, err)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def strays(self) -> dict[str, list[int]]:
        """Processes on each host other than its sshd listener (and the `unshare` holding it) and
        the daemons registered in `self.daemons` (with everything they started)."""
        keep = {p.pid for p in self._sshd} | {c for p in self._sshd for c in _children(p.pid)}
        out = {}
        for ns in self.ns:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30).stdout.split()
            out[ns] = [int(p) for p in pids if int(p) not in keep and not _is_zombie(int(p))
                       and not self.daemons & _ancestors(int(p))]
        return out

    def wait_no_strays(self, timeout: float = 15) -> dict[str, list[int]]:
        """strays(), once they are gone or `timeout` has passed: an ssh session or a rank whose
        launcher just returned may take a moment to exit."""
        deadline = time.monotonic() + timeout
        while any((left := self.strays()).values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    def kill_strays(self) -> None:
        """What a SIGKILLed launcher leaves behind (pdsh, ssh clients, remote ranks): by PID, per host."""
        for pids in self.strays().values():
            _kill_pids(pids)
            _wait_gone(pids, 5)

    # -- tear-down -------------------------------------------------------------------------
    def close(self) -> None:
        errors = []
        for ns in self._created_ns:
            try:
                pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                                       timeout=30).stdout.split()]
                # SIGKILL: `unshare` ignores SIGTERM, and --kill-child then takes its PID namespace down.
                _kill_pids(pids)
                left = _wait_gone(pids, 10)
                if left:
                    errors.append(f"{ns}: processes {left} survived SIGKILL")
            except Exception as e:  # keep tearing down the rest
                errors.append(f"{ns}: {e}")
        for p in self._sshd:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                errors.append(f"sshd holder {p.pid} not reaped")
        for ns in self._created_ns:
            proc = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=30)
            if proc.returncode != 0:
                errors.append(f"ip netns del {ns}: {proc.stderr.strip()}")
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        self._created_ns.clear()
        if errors:
            raise RuntimeError("namespace hosts tear-down: " + "; ".join(errors))


# --------------------------------------------------------------------------------------------
# Slurm: munged + slurmctld + slurmd for one node, configured and kept in a temp dir
# --------------------------------------------------------------------------------------------

SLURM_PACKAGES = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client", "scontrol": "slurm-client",
                  "munged": "munge", "mungekey": "munge"}
SLURM_DIR_PATTERN = re.compile(r"lpslurm-(\d+)-")


def slurm_unavailable() -> str | None:
    """Why a private Slurm cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "the test's Slurm runs its daemons as root (SlurmUser=root)"
    return ensure_packages(SLURM_PACKAGES)


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _pids_with_env(predicate) -> list[int]:
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            env = _environ(int(entry))
            if env and predicate(env):
                out.append(int(entry))
    return out


def reap_stale_slurm() -> None:
    """Kills daemons and job processes of test clusters whose pytest process no longer exists
    (found by the SLURM_CONF in their environment, which names the owner's PID)."""
    def stale(env: bytes) -> bool:
        for var in env.split(b"\0"):
            if var.startswith(b"SLURM_CONF="):
                m = SLURM_DIR_PATTERN.search(var.decode(errors="replace"))
                return bool(m) and not pid_alive(int(m.group(1)))
        return False
    pids = _pids_with_env(stale)
    _kill_pids(pids)
    _wait_gone(pids, 10)
    import tempfile

    for d in Path(tempfile.gettempdir()).glob("lpslurm-*-*"):
        m = SLURM_DIR_PATTERN.search(d.name + "-")
        if m and not pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)


class SlurmCluster:
    """A private Slurm, jobs run as root, partition `debug`. Without `hosts`: one node, this
    machine (`hostname -s`, 127.0.0.1). With `hosts` (NamespaceHosts): one node per host,
    slurmctld on the first, each daemon inside its host's namespaces. munged serves them all
    from a socket in the cluster's dir. Slurm commands go through `cmd()` (or see `self.env`:
    SLURM_CONF points at the private config)."""

    def __init__(self, hosts: NamespaceHosts | None = None):
        import tempfile

        # Not under pytest's tmp dirs: munged wants every directory above its socket searchable
        # by all (pytest's are 0700). The owner's PID in the name lets a later run recognise
        # leftovers of a killed one. Removed by close().
        self.dir = Path(tempfile.mkdtemp(prefix=f"lpslurm-{os.getpid()}-"))
        self.dir.chmod(0o755)
        self.conf = self.dir / "slurm.conf"
        self.hosts = hosts
        if hosts is None:
            self.nodes = [(socket.gethostname().split(".")[0], "127.0.0.1")]
        else:
            self.nodes = list(zip(hosts.names, hosts.ips))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": SBIN_PATH}
        self._daemons: list[tuple[str, subprocess.Popen]] = []

    def _on(self, node: int | None, argv: list[str]) -> list[str]:
        """argv on a node (its namespaces), or, for node None, a client on the first node."""
        if self.hosts is None:
            return argv
        if node is None:
            return ["ip", "netns", "exec", self.hosts.ns[0], *argv]
        return self.hosts.enter(node, argv)

    def start(self, timeout: float = 30) -> None:
        reap_stale_slurm()
        d = self.dir
        for sub in ("state", "log", *(f"spool-{name}" for name, _ in self.nodes)):
            (d / sub).mkdir()
        subprocess.run(["mungekey", "-c", "-k", str(d / "munge.key")], check=True, capture_output=True, timeout=30,
                       env=self.env)
        self._spawn("munged", ["munged", "-F", f"--key-file={d / 'munge.key'}", f"--socket={d / 'munge.sock'}",
                               f"--pid-file={d / 'munged.pid'}", f"--seed-file={d / 'munge.seed'}",
                               f"--log-file={d / 'log' / 'munged.log'}"])
        self._wait_for(lambda: (d / "munge.sock").exists(), timeout, "munged socket")

        # The node as slurmd itself sees it (CPUs, sockets, cores), with a modest RealMemory.
        hw = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30,
                            env=self.env).stdout.splitlines()[0]
        hw = re.sub(r"RealMemory=\d+", "RealMemory=1000", hw.split(None, 1)[1])
        ctld_port, slurmd_port = free_port(), free_port()
        (d / "plugstack.conf").write_text("")
        ctld_name, ctld_addr = self.nodes[0]
        nodes = "\n".join(f"NodeName={name} NodeAddr={addr} {hw} State=UNKNOWN" for name, addr in self.nodes)
        self.conf.write_text(f"""\
ClusterName=lamdatest
SlurmctldHost={ctld_name}({ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d / 'munge.sock'}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool-%n'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd-%n.pid'}
SlurmctldLogFile={d / 'log' / 'slurmctld.log'}
SlurmdLogFile={d / 'log' / 'slurmd-%n.log'}
PlugStackConfig={d / 'plugstack.conf'}
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
KillWait=5
{nodes}
PartitionName=debug Nodes={",".join(n for n, _ in self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")
        self._spawn("slurmctld", self._on(0, ["slurmctld", "-D", "-i"]))
        for i, (name, _) in enumerate(self.nodes):
            self._spawn(f"slurmd-{name}", self._on(i, ["slurmd", "-D", "-N", name]))
        want = "\n".join(["idle"] * len(self.nodes))
        self._wait_for(lambda: self.cmd("sinfo", "-h", "-N", "-o", "%t").strip() == want, timeout, "idle nodes")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.dir / "log" / f"{name}.stdout", "ab")
        proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self._daemons.append((name, proc))
        if self.hosts is not None:
            self.hosts.daemons.add(proc.pid)

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self._daemons if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"Slurm: no {what} after {timeout:.0f}s (exited: {dead})\n" + self.logs())
            time.sleep(0.1)

    def logs(self) -> str:
        parts = []
        for f in sorted((self.dir / "log").glob("*")):
            parts.append(f"--- {f.name}:\n" + f.read_text(errors="replace")[-1500:])
        return "\n".join(parts)

    def cmd(self, *argv: str, check: bool = False) -> str:
        """A Slurm client command (`scontrol ...`, `sinfo`, `scancel`, ...) against this cluster."""
        proc = subprocess.run(self._on(None, list(argv)), capture_output=True, text=True, timeout=60, env=self.env)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
        return proc.stdout

    def sbatch(self, *args: str, env: dict, cwd: Path) -> int:
        proc = subprocess.run(self._on(None, ["sbatch", "--parsable", *args]), capture_output=True, text=True,
                              timeout=60, env={**env, "SLURM_CONF": str(self.conf)}, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)}: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        text = self.cmd("scontrol", "show", "job", "-o", str(job_id))
        return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)

    def wait(self, job_id: int, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                         "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
                                                         "DEADLINE")) -> dict[str, str]:
        """Polls the job until it reaches one of `states`; cancels it if that takes over `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                self.cmd("scancel", str(job_id))
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f}s; cancelled")
            time.sleep(0.2)

    def wait_ok(self, job_id: int, log: Path, timeout: float) -> str:
        """Waits for the job, asserts it COMPLETED with exit 0, returns its output file's text."""
        info = self.wait(job_id, timeout)
        text = log.read_text(errors="replace") if log.exists() else "(no output file)"
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (
            f"job {job_id}: {info.get('JobState')} exit {info.get('ExitCode')}\n{text[-5000:]}\n{self.logs()}")
        return text

    def close(self) -> None:
        errors = []
        # Jobs first: slurmstepd and the job's processes outlive a stopped slurmd.
        try:
            if any(n == "slurmctld" and p.poll() is None for n, p in self._daemons):
                self.cmd("scancel", "--user=root")
                deadline = time.monotonic() + 20
                while self.cmd("squeue", "-h", "-t", "RUNNING,COMPLETING").strip() and time.monotonic() < deadline:
                    time.sleep(0.2)
        except Exception as e:
            errors.append(f"scancel: {e}")
        for name, p in reversed(self._daemons):  # slurmd(s), slurmctld, munged
            if p.poll() is None:
                # In a host, Popen holds `nsenter`; the daemon is its child.
                for pid in _children(p.pid) if self.hosts is not None and name != "munged" else [p.pid]:
                    _kill_pids([pid], signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    errors.append(f"{name} ignored SIGTERM")
                    for pid in [*_children(p.pid), p.pid]:
                        _kill_pids([pid])
                    p.wait(timeout=10)
            if self.hosts is not None:
                self.hosts.daemons.discard(p.pid)
        # Anything still carrying this cluster's SLURM_CONF (a slurmstepd, a job's process) gets
        # a few seconds to finish exiting (a job killed just now), then is reported and killed.
        marker = f"SLURM_CONF={self.conf}".encode()
        deadline = time.monotonic() + 10
        while (left := _pids_with_env(lambda env: marker in env.split(b"\0"))) and time.monotonic() < deadline:
            time.sleep(0.2)
        if left:
            names = [Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:120].decode(errors="replace")
                     if Path(f"/proc/{p}/cmdline").exists() else "?" for p in left]
            errors.append(f"processes of the test cluster were still running, killed: {dict(zip(left, names))}")
            _kill_pids(left)
            _wait_gone(left, 10)
        if errors:
            raise RuntimeError("Slurm tear-down: " + "; ".join(errors) + f" (state kept in {self.dir})")
        shutil.rmtree(self.dir, ignore_errors=True)


def sbatch_env(run_dir: Path, steps: int, **extra: str) -> dict:
    """What a user exports before `sbatch scripts/slurm/*.sbatch` (sbatch passes the environment
    on): LAMDA_* for a small run. Variables that would pin threads or ranks are left out."""
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "DS_ENV_FILE") and not k.startswith(("SLURM_", "PYTEST_"))}
    env.update(LAMDA_MODEL="debug", LAMDA_PIPE_STAGES="2", LAMDA_STEPS=str(steps), LAMDA_RUN_DIR=str(run_dir),
               LAMDA_SAVE_EVERY="2", LAMDA_EXTRA_ARGS="--log-every 1 --eval-every 0 --sample-tokens 0",
               PYTHON=sys.executable, **extra)
    return env


def running_slurm(request):
    """A test module's private Slurm cluster (yield from it in a module-scoped fixture), or
    the module skipped, saying why, where Slurm cannot run here."""
    reason = slurm_unavailable()
    if reason:
        skip(request, reason)
    cluster = SlurmCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
