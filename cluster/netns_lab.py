"""A cluster of hosts on one Linux machine: network namespaces joined by a bridge.

`NetnsLab.create(["head", "verify", "redis"])` builds, all inside namespaces it creates:

    ns ssl-<pid>-<lab>-switch:  bridge `br0`, one port `p-<host>` per host   (the switch)
    ns ssl-<pid>-<lab>-<host>:  `lo` up, `lab0` = 10.213.X.<n>/24             (one host each)
                         lab0 <-- veth --> p-<host> on br0

Nothing in the root namespace changes: no interface, route or address is added there, so a
host's address can be reached only from the lab's own hosts. The /24 is one of 10.213.0-255.0
that no route of the machine covers. Namespace names are `ssl-<pid>-<lab>-<host>` (<pid>: the
creating process, <lab>: its count of labs), so a later lab removes what a crashed one left
(its pid no longer alive).

Faults: `Host.disconnect()` pulls the host's cable (its switch port goes down; packets to and
from it are lost without any reset or unreachable, like a real partition); `Host.kill_all()`
kills every process in its namespace (with disconnect: the host is lost); `Host.set_netem`
adds delay and loss on the host's interface (`tc netem`; NetemUnavailableError where the
kernel has no sch_netem); `Host.impair` does the same with netem where the kernel has it, else
with a user-space delay line on the host's switch port (cluster/netns_wire.py). `teardown()`
kills every process in the lab's namespaces and deletes them, which removes the veths and the
bridge; it is safe to call twice and after a failed build.

Needs root and iproute2 (`lab_unavailable_reason()` says why not, or None).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

PREFIX = "ssl"  # every namespace this module creates is named ssl-<pid>-<lab>-<host>
SWITCH = "switch"
IFACE = "lab0"  # the host's side of its veth, inside its namespace
SUBNET_BASE = "10.213"  # the lab's /24 is 10.213.X.0/24 for the first X no route covers
KILL_WAIT_S = 10.0
_lab_ids = itertools.count()  # labs of one process get distinct names


class NetemUnavailableError(RuntimeError):
    """This kernel has no `netem` queueing discipline (module sch_netem)."""


def lab_unavailable_reason() -> str | None:
    """Why a lab cannot be built on this machine (not root, no `ip netns`), or None."""
    if os.geteuid() != 0:
        return "network-namespace lab needs root (ip netns, veth, bridge)"
    if shutil.which("ip") is None:
        return "network-namespace lab needs iproute2's `ip`"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns list` failed: {probe.stderr.strip()}"
    return None


def _ip(*args: str) -> str:
    """Runs `ip args...`; raises RuntimeError with the command and its stderr on failure."""
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def _netns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()] if out.returncode == 0 else []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_processes(ns: str) -> None:
    """SIGKILLs every process in ns and waits until none is left."""
    deadline = time.monotonic() + KILL_WAIT_S
    while pids := _netns_pids(ns):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in namespace {ns} survived SIGKILL for {KILL_WAIT_S:.0f}s")
        time.sleep(0.02)  # poll interval


def _kill_namespace(ns: str) -> None:
    """SIGKILLs every process in ns, waits until none is left, deletes ns."""
    _kill_processes(ns)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def remove_stale_labs() -> list[str]:
    """Deletes namespaces named ssl-<pid>-* whose <pid> is no longer running (a crashed lab's);
    returns their names."""
    removed = []
    for ns in _ip("netns", "list").split():
        parts = ns.split("-")
        if len(parts) >= 3 and parts[0] == PREFIX and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            _kill_namespace(ns)
            removed.append(ns)
    return removed


def free_subnet() -> ipaddress.IPv4Network:
    """The first 10.213.X.0/24 that no route of this machine's root namespace overlaps."""
    routes = json.loads(_ip("-j", "route", "show", "table", "all") or "[]")
    taken = []
    for r in routes:
        dst = r.get("dst", "")
        if dst and dst != "default" and ":" not in dst:
            taken.append(ipaddress.ip_network(dst, strict=False))
    for x in range(256):
        net = ipaddress.ip_network(f"{SUBNET_BASE}.{x}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise RuntimeError(f"every {SUBNET_BASE}.X.0/24 overlaps a route of this machine")


@dataclass
class Host:
    """One host of the lab: its namespace, address, and the processes started in it."""

    name: str
    netns: str
    address: str
    switch_ns: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    wire: subprocess.Popen | None = None  # the user-space delay line on its link (cluster/netns_wire.py)

    @property
    def port(self) -> str:
        """Its port on the bridge (in the switch namespace)."""
        return f"p-{self.name}"

    def exec_argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run of argv inside this host's namespace."""
        return subprocess.run(self.exec_argv(argv), **kwargs)

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """subprocess.Popen of argv inside this host's namespace; killed by the lab's teardown."""
        proc = subprocess.Popen(self.exec_argv(argv), **kwargs)
        self.procs.append(proc)
        return proc

    def disconnect(self) -> None:
        """Pulls the cable: the switch port goes down; packets to and from the host are lost."""
        _ip("-n", self.switch_ns, "link", "set", self.port, "down")

    def reconnect(self) -> None:
        _ip("-n", self.switch_ns, "link", "set", self.port, "up")

    def set_netem(self, delay_ms: float = 0.0, loss_pct: float = 0.0) -> None:
        """Delay and random loss on everything the host sends (tc netem on its interface)."""
        if delay_ms < 0 or not 0 <= loss_pct <= 100:
            raise ValueError(f"netem needs delay_ms >= 0 and loss_pct in [0, 100], got {delay_ms}, {loss_pct}")
        out = subprocess.run(["ip", "netns", "exec", self.netns, "tc", "qdisc", "replace", "dev", IFACE, "root",
                              "netem", "delay", f"{delay_ms}ms", "loss", f"{loss_pct}%"],
                             capture_output=True, text=True)
        if "unknown" in out.stderr.lower():
            raise NetemUnavailableError(f"tc netem on {self.name}: {out.stderr.strip()} (kernel lacks sch_netem)")
        if out.returncode != 0:
            raise RuntimeError(f"tc netem on {self.name} failed: {out.stderr.strip()}")

    def clear_netem(self) -> None:
        subprocess.run(["ip", "netns", "exec", self.netns, "tc", "qdisc", "del", "dev", IFACE, "root"],
                       capture_output=True)

    def impair(self, delay_ms: float = 0.0, loss_pct: float = 0.0, seed: int = 0) -> str:
        """Delay and random loss on everything the host sends: `tc netem` where the kernel has
        sch_netem, else a user-space delay line on its switch port (cluster/netns_wire.py; seed:
        its loss draws). Returns which one: "tc netem" or "wire". `clear_impairment` undoes it."""
        try:
            self.set_netem(delay_ms, loss_pct)
            return "tc netem"
        except NetemUnavailableError:
            pass
        if self.wire is not None:
            raise RuntimeError(f"{self.name} is impaired already; clear_impairment first")
        wire_port, bridge_port = f"x-{self.name}", f"y-{self.name}"
        _ip("-n", self.switch_ns, "link", "set", self.port, "nomaster")
        _ip("-n", self.switch_ns, "link", "add", wire_port, "type", "veth", "peer", "name", bridge_port)
        _ip("-n", self.switch_ns, "link", "set", bridge_port, "master", "br0", "up")
        for port in (self.port, wire_port):
            _ip("-n", self.switch_ns, "link", "set", port, "promisc", "on", "up")
        self.wire = subprocess.Popen(
            ["ip", "netns", "exec", self.switch_ns, sys.executable, "-m", "specserve.cluster.netns_wire",
             self.port, wire_port, str(delay_ms), str(loss_pct), str(seed)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        if self.wire.stdout.readline().strip() != "relaying":
            self.clear_impairment()
            raise RuntimeError(f"the delay line of {self.name} did not start")
        return "wire"

    def clear_impairment(self) -> None:
        """The link as it was built: no netem, no delay line."""
        self.clear_netem()
        if self.wire is None:
            return
        self.wire.kill()
        self.wire.wait()
        self.wire = None
        subprocess.run(["ip", "-n", self.switch_ns, "link", "del", f"x-{self.name}"], capture_output=True)
        _ip("-n", self.switch_ns, "link", "set", self.port, "promisc", "off")
        _ip("-n", self.switch_ns, "link", "set", self.port, "master", "br0", "up")

    def kill_all(self) -> None:
        """SIGKILLs every process in the host's namespace, whoever started it (the host lost power)."""
        _kill_processes(self.netns)
        for proc in self.procs:
            proc.wait()
        self.procs.clear()

    def stop_processes(self) -> None:
        """SIGKILLs and reaps the processes this object started."""
        for proc in self.procs + [self.wire] * (self.wire is not None):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.procs.clear()


@dataclass
class NetnsLab:
    subnet: ipaddress.IPv4Network
    switch_ns: str
    hosts: dict[str, Host]

    @classmethod
    def create(cls, names: list[str]) -> NetnsLab:
        """Builds the switch and one host per name (addresses .1, .2, ... in name order); on any
        failure removes what it built and re-raises."""
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"host names must be distinct and at least one, got {names}")
        for name in names:
            if not name.isalnum() or len(name) > 12:  # `p-<name>` must fit IFNAMSIZ (15)
                raise ValueError(f"host name must be alphanumeric and at most 12 characters, got {name!r}")
        remove_stale_labs()
        base = f"{PREFIX}-{os.getpid()}-{next(_lab_ids)}"
        subnet = free_subnet()
        lab = cls(subnet, f"{base}-{SWITCH}", {})
        try:
            _ip("netns", "add", lab.switch_ns)
            _ip("-n", lab.switch_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", lab.switch_ns, "link", "set", "br0", "up")
            for n, name in enumerate(names, start=1):
                host = Host(name, f"{base}-{name}", str(subnet[n]), lab.switch_ns)
                lab.hosts[name] = host
                _ip("netns", "add", host.netns)
                _ip("-n", lab.switch_ns, "link", "add", host.port, "type", "veth",
                    "peer", "name", IFACE, "netns", host.netns)
                _ip("-n", lab.switch_ns, "link", "set", host.port, "master", "br0", "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
                _ip("-n", host.netns, "addr", "add", f"{host.address}/{subnet.prefixlen}", "dev", IFACE)
                _ip("-n", host.netns, "link", "set", IFACE, "up")
        except BaseException:
            lab.teardown()
            raise
        return lab

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def namespaces(self) -> list[str]:
        return [self.switch_ns, *(h.netns for h in self.hosts.values())]

    def teardown(self) -> None:
        """Kills every process in the lab's namespaces and deletes them (veths and bridge go with
        them). Raises RuntimeError when something of the lab is still there afterwards."""
        for host in self.hosts.values():
            host.stop_processes()
        for ns in self.namespaces():
            _kill_namespace(ns)
        left = set(self.namespaces()) & set(_ip("netns", "list").split())
        if left:
            raise RuntimeError(f"lab teardown left namespaces {sorted(left)}")
