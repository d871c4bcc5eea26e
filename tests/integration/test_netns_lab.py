"""The network-namespace lab itself (specserve.cluster.netns_lab): hosts reach each other at
addresses that exist only inside the lab, a pulled cable partitions a host, and teardown leaves
nothing behind, also of a crashed earlier lab."""

import json
import subprocess
import sys

import pytest

from specserve.cluster.netns_lab import NetemUnavailableError, NetnsLab, remove_stale_labs

from .netns_fixture import require_lab

# Connects from inside a host to ADDRESS:PORT; prints "open", "refused" or "timeout".
PROBE = """
import socket, sys
s = socket.socket(); s.settimeout(1.0)
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); print("open")
except ConnectionRefusedError:
    print("refused")
except OSError:
    print("timeout")
"""


def probe(lab: NetnsLab, src: str, dst: str) -> str:
    out = lab[src].run([sys.executable, "-c", PROBE, lab[dst].address, "9"], capture_output=True, text=True)
    return out.stdout.strip()


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan stays one until init reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def namespaces() -> set[str]:
    return {ns["name"] for ns in json.loads(subprocess.run(["ip", "-j", "netns", "list"], capture_output=True,
                                                            text=True).stdout or "[]")}


def test_hosts_reach_each_other_and_the_root_namespace_is_untouched(netns_lab):
    assert probe(netns_lab, "head", "redis") == "refused"  # reached: a RST from the host, no listener
    root = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True).stdout
    routes = subprocess.run(["ip", "-j", "route"], capture_output=True, text=True).stdout
    for host in netns_lab.hosts.values():
        assert host.address not in root
    assert str(netns_lab.subnet.network_address) not in routes


def test_a_pulled_cable_partitions_the_host_until_it_is_back(netns_lab):
    netns_lab["verify"].disconnect()
    try:
        assert probe(netns_lab, "head", "verify") == "timeout"  # packets vanish: no RST, no unreachable
        assert probe(netns_lab, "head", "draft") == "refused"  # the others still talk
    finally:
        netns_lab["verify"].reconnect()
    assert probe(netns_lab, "head", "verify") == "refused"


def test_teardown_kills_the_processes_and_removes_every_namespace():
    require_lab()
    lab = NetnsLab.create(["a", "b"])
    try:
        sleeper = lab["a"].popen(["sleep", "600"])
        stray = lab["b"].run(["sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
        stray_pid = int(stray.stdout)
    finally:
        lab.teardown()
    assert sleeper.returncode is not None
    assert not running(stray_pid)  # started inside the host, not by the lab: killed all the same
    assert not (set(lab.namespaces()) & namespaces())


def test_kill_all_kills_every_process_of_the_host_and_only_of_it(netns_lab):
    host, other = netns_lab["prefill"], netns_lab["draft"]
    started = host.popen(["sleep", "600"])
    stray = int(host.run(["sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True).stdout)
    bystander = other.popen(["sleep", "600"])
    try:
        host.kill_all()
        assert started.returncode is not None and not running(stray)  # also what the lab did not start
        assert bystander.poll() is None
        assert probe(netns_lab, "head", "prefill") == "refused"  # the host itself is still there
    finally:
        other.stop_processes()


def test_a_crashed_labs_namespaces_are_removed():
    require_lab()
    dead = subprocess.Popen(["true"])
    dead.wait()
    ns = f"ssl-{dead.pid}-0-head"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        assert ns in remove_stale_labs()
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    assert ns not in namespaces()


def test_netem_delays_the_host_or_says_the_kernel_lacks_it(netns_lab):
    host = netns_lab["draft"]
    try:
        host.set_netem(delay_ms=50, loss_pct=1)
    except NetemUnavailableError as e:
        pytest.skip(str(e))
    try:
        shown = host.run(["tc", "qdisc", "show", "dev", "lab0"], capture_output=True, text=True).stdout
        assert "netem" in shown and "delay 50ms" in shown and "loss 1%" in shown
    finally:
        host.clear_netem()
