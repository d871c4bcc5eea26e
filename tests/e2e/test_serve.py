"""`specserve serve` with the real model, as users run it: a subprocess, clients over loopback."""

import json
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from specserve.scheduler.client import Client
from specserve.workers.engine.sequence import SamplingParams

SPECSERVE = [sys.executable, "-m", "specserve.scheduler.cli.main"]
READY_S = 300


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([*SPECSERVE, "serve", "--port", "0", "--metrics-port", "0", "--http-port", "0",
                                 "--threads", "2"],
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + READY_S
    while "specserve: ready" not in log.read_text():
        assert proc.poll() is None, f"specserve serve exited with {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"specserve serve not ready after {READY_S} s:\n{log.read_text()}"
        time.sleep(0.1)
    port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text()).group(1))
    yield proc, f"127.0.0.1:{port}", log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def stream_tokens(client: Client, prompt: str, n: int) -> list[int]:
    return [t for chunk in client.generate(prompt=prompt, max_tokens=n, ignore_eos=True) for t in chunk.token_ids]


def test_generate_through_the_server_equals_in_process(server, smollm2, humaneval_prompts):
    _, target, _ = server
    engine = smollm2.engine
    for prompt in humaneval_prompts[:3]:
        out = subprocess.run([*SPECSERVE, "generate", prompt, "--server", target, "--json", "--max-new-tokens", "64",
                              "--ignore-eos"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        remote = json.loads(out.stdout)
        ids = engine.tokenizer(prompt)["input_ids"]
        local = [t for o in engine.generate(ids, SamplingParams(max_new_tokens=64, ignore_eos=True))
                 for t in o.new_token_ids]
        assert remote["token_ids"] == local
        assert remote["prompt_tokens"] == len(ids) and remote["spec"]["method"] == "ngram"


def test_eight_concurrent_streams_each_equal_their_solo_run(server, humaneval_prompts):
    _, target, _ = server
    prompts = humaneval_prompts[3:11]
    with Client(target) as client:
        solo = [stream_tokens(client, p, 64) for p in prompts]
        together = [None] * len(prompts)

        def run(i):
            together[i] = stream_tokens(client, prompts[i], 64)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert client.stats().finished_requests >= 2 * len(prompts)
    assert together == solo


def test_sigterm_shuts_down_cleanly(server):
    proc, _, log = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert "shutting down" in log.read_text()
