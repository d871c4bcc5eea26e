"""A load generator for a specserve server reachable only from a lab host (a network namespace):
run there as `python -m specserve.bench.lab_load_client HOST:PORT`, driven over stdin/stdout with
one JSON object a line (bench/lab_cluster.py's HeadProcess is the other end).

Commands, and what comes back:
    {"cmd": "health"}                      -> {"event": "health", "status": "SERVING" | <gRPC code name>}
    {"cmd": "start", "run": R, "clients": C, "prompts": [text, ...], "max_tokens": N, "timeout_s": T}
                                           -> {"event": "started"}; then C threads each send greedy
                                              streams (prompts in turn) until "stop": for each request
                                              {"event": "streaming", "id": ...} at its first message
                                              and {"event": "request", "id": ..., ...} once it ended
    {"cmd": "stop"}                        -> {"event": "stopped"} once every thread's last request ended

A request line: id, prompt (its index), start / end (time.monotonic(): one clock for every process
of the machine), chunks ([[arrival, [token ids]], ...]), finish_reason (FINISH_REASON_LENGTH, ...),
and for a failed stream error_code / error (the gRPC status name and details). SPECSERVE_TOKEN is
the bearer token.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import grpc

from specserve.scheduler.client import Client
from specserve.v1 import generation_pb2 as pb

RETRY_PAUSE_S = 0.25  # after a failed request, before the client's next one
_write_lock = threading.Lock()


def emit(**event) -> None:
    with _write_lock:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


def one_request(client: Client, request_id: str, prompt_index: int, prompt: str, max_tokens: int,
                timeout_s: float) -> dict:
    record = {"event": "request", "id": request_id, "prompt": prompt_index, "start": time.monotonic(), "chunks": [],
              "finish_reason": None, "error_code": None, "error": None}
    try:
        for chunk in client.generate(prompt=prompt, max_tokens=max_tokens, ignore_eos=True, timeout=timeout_s):
            record["chunks"].append([time.monotonic(), list(chunk.token_ids)])
            if len(record["chunks"]) == 1:
                emit(event="streaming", id=request_id)
            if chunk.finish_reason:
                record["finish_reason"] = pb.FinishReason.Name(chunk.finish_reason)
    except grpc.RpcError as e:
        record["error_code"], record["error"] = e.code().name, e.details()
    record["end"] = time.monotonic()
    return record


def client_thread(target: str, offset: int, cmd: dict, stop: threading.Event) -> None:
    prompts = cmd["prompts"]
    with Client(target, token=os.environ.get("SPECSERVE_TOKEN")) as client:
        i = offset
        while not stop.is_set():
            index = i % len(prompts)
            record = one_request(client, f"{cmd['run']}-{offset}-{i}", index, prompts[index], cmd["max_tokens"],
                                 cmd["timeout_s"])
            emit(**record)
            if record["error_code"] is not None:
                stop.wait(RETRY_PAUSE_S)  # a server that is down refuses at once: do not spin
            i += 1


def health(target: str) -> str:
    with Client(target, token=os.environ.get("SPECSERVE_TOKEN")) as client:
        try:
            return client.health(timeout=5)
        except grpc.RpcError as e:
            return e.code().name


def main() -> None:
    target = sys.argv[1]
    stop, threads = threading.Event(), []
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "health":
            emit(event="health", status=health(target))
        elif cmd["cmd"] == "start":
            stop.clear()
            threads = [threading.Thread(target=client_thread, args=(target, c, cmd, stop), daemon=True)
                       for c in range(cmd["clients"])]
            for t in threads:
                t.start()
            emit(event="started")
        elif cmd["cmd"] == "stop":
            stop.set()
            for t in threads:
                t.join()
            emit(event="stopped")
        else:
            raise ValueError(f"unknown command {cmd['cmd']!r} (health, start, stop)")


if __name__ == "__main__":
    main()
