"""The network-namespace lab itself (specserve.cluster.netns_lab): hosts reach each other at
addresses that exist only inside the lab, a pulled cable partitions a host, an impaired link
delays and drops what the host sends, and teardown leaves nothing behind, also of a crashed
earlier lab."""

import json
import subprocess
import sys

from specserve.cluster.netns_lab import NetnsLab, remove_stale_labs

from .netns_fixture import REPO, require_lab

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


def round_trips(lab: NetnsLab, src: str, dst: str, n: int) -> dict:
    out = lab[src].run([sys.executable, "-m", "tests.helpers.udp_echo", "probe", lab[dst].address, str(n)],
                       cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_impair_delays_and_drops_what_the_host_sends_and_clears(netns_lab):
    """50 ms and 5% loss on the draft host (tc netem, or the user-space delay line where the kernel
    has no sch_netem): round trips from it take 50 ms more, about 5% are lost, a 20 MB TCP
    transfer through it arrives whole; cleared, the link is as before."""
    draft, head = netns_lab["draft"], netns_lab["head"]
    echo = head.popen([sys.executable, "-m", "tests.helpers.udp_echo", "serve", head.address], cwd=REPO,
                      stdout=subprocess.PIPE, text=True)
    assert echo.stdout.readline().strip() == "up"
    assert round_trips(netns_lab, "draft", "head", 50)["median_ms"] < 10
    how = draft.impair(delay_ms=50, loss_pct=5, seed=1)
    try:
        if how == "tc netem":
            shown = draft.run(["tc", "qdisc", "show", "dev", "lab0"], capture_output=True, text=True).stdout
            assert "netem" in shown and "delay 50ms" in shown and "loss 5%" in shown, shown
        else:
            assert how == "wire" and draft.wire.poll() is None, how
        impaired = round_trips(netns_lab, "draft", "head", 400)
        assert 49 <= impaired["median_ms"] < 80, (how, impaired)
        assert 6 <= impaired["lost"] <= 40, (how, impaired)  # 20 expected (binomial: 6..40 is > 4 sd)
        assert tcp_transfer(netns_lab, "draft", "head", 20 << 20) == 20 << 20
        assert tcp_transfer(netns_lab, "head", "draft", 20 << 20) == 20 << 20
    finally:
        draft.clear_impairment()
    cleared = round_trips(netns_lab, "draft", "head", 50)
    assert cleared["median_ms"] < 10 and cleared["lost"] == 0, cleared


# Receives one TCP connection on ADDRESS:9001 and prints how many bytes it carried.
SINK = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 9001)); s.listen(); print("up", flush=True)
c, _ = s.accept(); n = 0
while data := c.recv(1 << 20):
    n += len(data)
print(n, flush=True)
"""


def tcp_transfer(lab: NetnsLab, src: str, dst: str, size: int) -> int:
    """Bytes that arrived of `size` sent from src to dst over one TCP connection."""
    sink = lab[dst].popen([sys.executable, "-c", SINK, lab[dst].address], stdout=subprocess.PIPE, text=True)
    assert sink.stdout.readline().strip() == "up"
    send = (f"import socket; c = socket.create_connection(({lab[dst].address!r}, 9001)); "
            f"c.sendall(b'x' * {size}); c.close()")
    lab[src].run([sys.executable, "-c", send], check=True, timeout=120)
    received = int(sink.stdout.readline())
    sink.wait(timeout=30)
    return received
