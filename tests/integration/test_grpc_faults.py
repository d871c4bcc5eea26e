"""Faults through the gRPC API (a real server over loopback, tiny model): a request the engine
fails alone is INTERNAL while the others stream on, and health follows the stall watchdog (an
engine that stops making progress turns the server NOT_SERVING, and SERVING again once its steps
move)."""

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from specserve.scheduler.client import Client, build_request
from specserve.scheduler.server.grpc_server import ServerConfig, ServerThread
from specserve.workers.model.loader import LoadOptions, load_engine

from tests.helpers.tiny_folder import save_tiny_model, tiny_engine_config

POLL_S = 30.0


def poll(condition, what: str) -> None:
    deadline = time.monotonic() + POLL_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def start(folder: str, **config) -> ServerThread:
    server = ServerThread(ServerConfig(port=0, metrics_port=None, health_poll_s=0.05, **config))
    server.attach(load_engine(folder, LoadOptions(config=tiny_engine_config(), progress=False)), "tiny")
    return server


def test_a_request_with_non_finite_logits_is_internal_and_the_others_stream_on(tmp_path, monkeypatch):
    server = start(save_tiny_model(tmp_path))
    try:
        model = server.server.loops[0].engine.model
        forward = model.forward

        def nan_after_token_90(batch, kv):
            logits = forward(batch, kv)
            return logits.masked_fill((batch.token_ids[batch.logits_index] == 90)[:, None], float("nan"))

        monkeypatch.setattr(model, "forward", nan_after_token_90)
        with Client(f"127.0.0.1:{server.port}") as client:
            def run(prompt: str):
                try:
                    return sum(len(c.token_ids) for c in client.generate(prompt, max_tokens=6, ignore_eos=True,
                                                                          timeout=POLL_S))
                except grpc.RpcError as e:
                    return e.code(), e.details()

            with ThreadPoolExecutor(3) as pool:
                good, bad, also_good = pool.map(run, ["w5 w6", "w5 w90", "w7 w8 w9"])
            assert good == also_good == 6
            assert bad[0] == grpc.StatusCode.INTERNAL and "NaN or inf" in bad[1]
            assert client.health() == "SERVING"
    finally:
        server.stop()


def test_a_stalled_engine_turns_health_not_serving_until_it_recovers(tmp_path, monkeypatch):
    server = start(save_tiny_model(tmp_path), stall_timeout_s=0.3)
    try:
        with Client(f"127.0.0.1:{server.port}") as client:
            assert client.health() == "SERVING"
            engine = server.server.loops[0].engine
            real_step = engine.step
            monkeypatch.setattr(engine, "step", lambda: [])  # the loop steps, nothing moves
            stream = client.stub.Generate(build_request("w5 w6 w7", max_tokens=4, ignore_eos=True), timeout=POLL_S)
            poll(lambda: client.health() == "NOT_SERVING", "health to turn NOT_SERVING")
            monkeypatch.setattr(engine, "step", real_step)
            assert sum(len(chunk.token_ids) for chunk in stream) == 4  # the stalled request completes
            poll(lambda: client.health() == "SERVING", "health to turn SERVING again")
    finally:
        server.stop()


def test_stall_timeout_must_be_positive():
    with pytest.raises(ValueError, match="stall_timeout_s must be > 0, got 0"):
        ServerConfig(stall_timeout_s=0)
