"""Lab hosts (specserve.cluster.netns_lab) that are machines one can `ssh` into, for `ray up`.

`SshHosts.start(lab, workdir)` makes every host of the lab look like its own machine, as far as
the cluster launcher and deploy/start-node.sh can tell, and runs an `sshd` on it:

    network   the lab's namespace, plus a default route through its link (Ray picks the address
              of the default route as the node's IP; no packet leaves the lab)
    PID       its own PID namespace with its own /proc (`ray stop`, which stops every Ray process
              it can see, stops only this host's)
    files     its own mount namespace where <workdir>/<host>/home is /root,
              <workdir>/<host>/tmp is /tmp, and /etc/resolv.conf names no reachable server (the lab
              has no DNS: lookups fail at once) (~/ray_bootstrap_config.yaml, ~/.config/specserve,
              /tmp/ray and /tmp/specserve stay in the work folder); everything else is shared,
              also Python's install, this checkout and its venv where they lie under /root or /tmp
    sshd      /usr/sbin/sshd -D on the host's lab address, with its own host key, pid file and
              config in the work folder, root login with one throwaway key (`client_key`)

`laptop_argv(argv)` runs a command as the launching machine (the user's laptop): in the head's
network namespace (the only way to reach the lab), with <workdir>/laptop/home as /root and
<workdir>/laptop/tmp as /tmp. The work folder must not be under /tmp (which each host replaces).
Every process lives in a lab namespace: the lab's teardown ends them all.

Needs root, util-linux `unshare`, openssh-server (`sshd_unavailable_reason()` says why not).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from specserve.cluster.netns_lab import IFACE, Host, NetnsLab

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it (systemd's unit creates it; empty)
ACCEPT_TIMEOUT_S = 30.0
SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR")
# What every host must still see where it lies under /root or /tmp (which each host replaces):
# Python's own install (a venv's base; under /root with pyenv), this checkout and its venv (a CI
# clone may be under /tmp). Outermost paths only: a bind mount carries what lies below it.
_NEEDED = sorted({Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), Path(__file__).resolve().parents[2]})
SHARED = [p for p in _NEEDED if p.is_relative_to("/root") or p.is_relative_to("/tmp")]
SHARED = [p for p in SHARED if not any(p != q and p.is_relative_to(q) for q in SHARED)]
# The lab has no DNS server: lookups must fail at once, not time out (glibc tries AAAA and reverse
# lookups of names /etc/hosts answers; Ray and ssh make such lookups).
RESOLV_CONF = "nameserver 127.0.0.1\noptions attempts:1\n"
# argv: HOME TMP RESOLV [PATH...] -- COMMAND...: each /root/REL or /tmp/REL PATH bound into HOME/REL
# or TMP/REL, then HOME is /root, TMP is /tmp, RESOLV is /etc/resolv.conf, then exec COMMAND (run by
# `unshare --mount`: the mounts stay in that namespace).
_AS_MACHINE = """
home=$1 tmp=$2 resolv=$3; shift 3
while [ "$1" != -- ]; do
    case $1 in /root/*) dst=$home/${1#/root/} ;; *) dst=$tmp/${1#/tmp/} ;; esac
    mkdir -p "$dst" && mount --bind "$1" "$dst" || exit 1; shift
done; shift
mount --rbind "$home" /root && mount --rbind "$tmp" /tmp && mount --bind "$resolv" /etc/resolv.conf && exec "$@"
"""


def sshd_unavailable_reason() -> str | None:
    """Why lab hosts cannot run sshd here (no openssh-server, ssh client, rsync, unshare), or None."""
    missing = [name for name in ("ssh", "ssh-keygen", "rsync", "unshare") if shutil.which(name) is None]
    if not os.access(SSHD, os.X_OK):
        missing.insert(0, SSHD)
    if missing:
        return f"`ray up` on lab hosts needs {', '.join(missing)} (deploy/setup.sh installs openssh-server and rsync)"
    return None


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "specserve-lab", "-f", str(path)],
                   check=True, capture_output=True)


def _as_machine(home: Path, tmp: Path, resolv: Path, argv: list[str], new_pids: bool) -> list[str]:
    """argv in a new mount namespace (and PID namespace with its own /proc when new_pids) where
    home is /root, tmp is /tmp and resolv is /etc/resolv.conf."""
    pid_flags = ["--pid", "--fork", "--mount-proc"] if new_pids else []
    return ["unshare", "--mount", *pid_flags, "sh", "-c", _AS_MACHINE, "sh", str(home), str(tmp), str(resolv),
            *map(str, SHARED), "--", *argv]


@dataclass(frozen=True)
class SshHost:
    """One lab host seen as a machine: its own /root and /tmp folders on this machine."""

    host: Host
    root: Path  # <workdir>/<host name>

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def sshd_config(self, authorized_keys: Path) -> str:
        return "\n".join([
            f"ListenAddress {self.host.address}",
            f"HostKey {self.root / 'ssh_host_ed25519_key'}",
            f"PidFile {self.root / 'sshd.pid'}",
            f"AuthorizedKeysFile {authorized_keys}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",  # the work folder's modes are the test's, not a home's
            "Subsystem sftp internal-sftp",
            "",
        ])


class SshHosts:
    """Every host of a lab running sshd as its own machine; see the module docstring."""

    def __init__(self, lab: NetnsLab, workdir: Path):
        if workdir.resolve().is_relative_to("/tmp"):
            raise ValueError(f"workdir must not be under /tmp (each host mounts its own /tmp), got {workdir}")
        self.lab, self.workdir = lab, workdir
        self.client_key = workdir / "ssh" / "lab_key"
        self.hosts = {name: SshHost(host, workdir / name) for name, host in lab.hosts.items()}
        self.laptop = workdir / "laptop"
        self.resolv_conf = workdir / "resolv.conf"

    @classmethod
    def start(cls, lab: NetnsLab, workdir: Path) -> SshHosts:
        """Starts sshd on every host and waits until each accepts the key (the lab's teardown stops them)."""
        hosts = cls(lab, workdir)
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        hosts.client_key.parent.mkdir(parents=True)
        _keygen(hosts.client_key)
        authorized = hosts.client_key.with_suffix(".pub")
        hosts.resolv_conf.write_text(RESOLV_CONF)
        for folder in (hosts.laptop / "home", hosts.laptop / "tmp"):
            folder.mkdir(parents=True)
        for machine in hosts.hosts.values():
            for folder in (machine.home, machine.tmp):
                folder.mkdir(parents=True)
            _keygen(machine.root / "ssh_host_ed25519_key")
            config = machine.root / "sshd_config"
            config.write_text(machine.sshd_config(authorized))
            machine.host.run(["ip", "route", "add", "default", "dev", IFACE], check=True)
            with open(machine.root / "sshd.log", "wb") as log:
                machine.host.popen(_as_machine(machine.home, machine.tmp, hosts.resolv_conf, [SSHD, "-D", "-e", "-f", str(config)],
                                               new_pids=True),
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        for name in hosts.hosts:
            hosts.wait_accepting(name)
        return hosts

    def ssh_argv(self, name: str, command: str) -> list[str]:
        """`ssh root@<host> command` with the throwaway key (run it from a lab namespace)."""
        return ["ssh", *SSH_OPTIONS, "-i", str(self.client_key), f"root@{self.hosts[name].host.address}", command]

    def wait_accepting(self, name: str) -> None:
        """Polls `ssh root@<host> true` from the head until it succeeds (sshd up, key accepted)."""
        deadline = time.monotonic() + ACCEPT_TIMEOUT_S
        while True:
            out = self.lab["head"].run(self.ssh_argv(name, "true"), capture_output=True, text=True)
            if out.returncode == 0:
                return
            log = (self.hosts[name].root / "sshd.log").read_text(errors="replace")
            assert time.monotonic() < deadline, (f"sshd on {name} not accepting after {ACCEPT_TIMEOUT_S:.0f}s: "
                                                 f"{out.stderr.strip()}; sshd.log:\n{log[-3000:]}")
            time.sleep(0.1)  # poll interval

    def laptop_argv(self, argv: list[str]) -> list[str]:
        """argv as the launching machine: the head's network, the laptop's /root and /tmp."""
        laptop = _as_machine(self.laptop / "home", self.laptop / "tmp", self.resolv_conf, argv, new_pids=False)
        return self.lab["head"].exec_argv(laptop)
