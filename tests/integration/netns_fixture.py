"""Fixtures for tests on a lab of network namespaces (specserve.cluster.netns_lab): the lab itself,
a real redis-server on its redis host, and the engine driver on its head host.

Without root or `ip netns` the tests skip with the reason; under CI (`CI` set, where the suite
runs as root) that is an error instead. The lab is torn down after the module, also after a
failure; a crashed earlier run's namespaces are removed before it is built.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from specserve.bench.lab_cluster import LabRedis
from specserve.cluster.netns_lab import NetnsLab, lab_unavailable_reason

from tests.helpers.tiny_folder import save_tiny_model

HOSTS = ["head", "verify", "draft", "prefill", "redis"]
REPLY_TIMEOUT_S = 60.0  # a driver reply later than this fails the test (a hang, not a slow reply)
REPO = Path(__file__).resolve().parents[2]


def require_lab() -> None:
    """Skips (fails under CI) when this machine cannot build a lab, or lacks redis-server."""
    reason = lab_unavailable_reason()
    if reason is None and shutil.which("redis-server") is None:
        reason = "redis-server not installed (run deploy/setup.sh or apt-get install redis-server)"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI runs as root and requires it", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def netns_lab() -> Iterator[NetnsLab]:
    require_lab()
    lab = NetnsLab.create(HOSTS)
    try:
        yield lab
    finally:
        lab.teardown()


@pytest.fixture(scope="module")
def lab_redis(netns_lab: NetnsLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRedis]:
    redis = LabRedis(netns_lab["redis"], tmp_path_factory.mktemp("lab-redis"))
    redis.start()
    yield redis  # the lab's teardown kills it


class EngineDriver:
    """tests/helpers/netns_engine_driver.py running on a lab host; see its docstring."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._replies.put(json.loads(line))

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> dict:
        """The next reply; AssertionError when none comes within REPLY_TIMEOUT_S (a hang)."""
        try:
            return self._replies.get(timeout=REPLY_TIMEOUT_S)
        except queue.Empty:
            raise AssertionError(f"engine driver sent nothing within {REPLY_TIMEOUT_S:.0f}s") from None

    def expect(self, event: str) -> dict:
        """The next reply, which must be `event`."""
        return self.expect_each(event)[event]

    def expect_each(self, *events: str) -> dict[str, dict]:
        """The next len(events) replies, one of each event in any order (threads race to reply)."""
        replies = {}
        for _ in events:
            reply = self.reply()
            assert reply["event"] in events and reply["event"] not in replies, \
                f"expected one of each of {events} from the engine driver, got {reply}"
            replies[reply["event"]] = reply
        return replies


@pytest.fixture(scope="module")
def lab_model_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def head_driver(netns_lab: NetnsLab, lab_redis: LabRedis, lab_model_folder: str) -> Iterator[EngineDriver]:
    """The engine driver on the head host, its shared prefix cache in the lab's Redis."""
    proc = netns_lab["head"].popen(
        [sys.executable, "-m", "tests.helpers.netns_engine_driver", lab_model_folder, lab_redis.url],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    driver = EngineDriver(proc)
    driver.expect("ready")
    yield driver
    proc.stdin.close()
    proc.wait(timeout=REPLY_TIMEOUT_S)
