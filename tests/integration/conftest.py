"""Fixtures that start real servers on loopback for integration tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

READY_TIMEOUT_S = 20.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_answers_ping(port: int) -> bool:
    """True when a redis server on 127.0.0.1:port replies +PONG to an inline PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``redis-server`` on a free loopback port, without persistence.

    Yields its URL, ``redis://127.0.0.1:<port>/0``. Skips when redis-server is not
    installed, except under CI (``CI`` set), where that is an error.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        msg = "redis-server not installed (run deploy/setup.sh or apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(msg + "; CI requires it", pytrace=False)
        pytest.skip(msg)

    workdir: Path = tmp_path_factory.mktemp("redis")
    port = _free_port()
    log = open(workdir / "redis.log", "wb")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        cwd=workdir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _redis_answers_ping(port):
            if proc.poll() is not None:
                pytest.fail(f"redis-server exited with {proc.returncode}; log:\n"
                            f"{(workdir / 'redis.log').read_text()}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"redis-server not answering PING on port {port} "
                            f"after {READY_TIMEOUT_S:.0f}s", pytrace=False)
            time.sleep(0.05)  # poll interval, not a wait-for-ready guess
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


from .ray_cluster_fixture import ray_cluster  # noqa: E402,F401 - the shared multi-node Ray cluster
from .netns_fixture import head_driver, lab_model_folder, lab_redis, netns_lab  # noqa: E402,F401 - the namespace lab
from .netns_ray_cluster import lab_cluster  # noqa: E402,F401 - a Ray cluster on the namespace lab
