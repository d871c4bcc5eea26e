"""An engine with the Redis-backed shared prefix cache, driven over stdin/stdout in JSON lines, so
a test can run it inside a lab host's namespace (`ip netns exec ... python -m
tests.helpers.netns_engine_driver FOLDER REDIS_URL`) and inject a fault while a store call is
under way.

Every request runs on a fresh replica of the engine (empty KV pool, same weights, same shared
cache), so what it reuses comes from Redis (L2), never from its own pool (L1).

In (one object a line):
  {"op": "generate", "prompt": [ids], "max_new_tokens": n, "hold": "get_many" | "put_many" | null}
      hold: the next store call of that kind waits for {"op": "go"} before it reaches Redis
  {"op": "go"}       releases the held call
  {"op": "flush"}    waits until queued cache writes are done
Out: {"event": "ready"}, {"event": "held", "call": ...},
  {"event": "done", "output_ids": [...], "cached_tokens": k, "seconds": s, "stats": {...}},
  {"event": "flushed", "ok": bool, "stats": {...}}, {"event": "error", "message": ...}
"""

import json
import os
import queue
import sys
import threading
import time

from specserve.cluster.prefix_cache.block_store import BlockStore
from specserve.workers.engine.sequence import SamplingParams
from specserve.workers.model.loader import LoadOptions, load_engine

from tests.helpers.tiny_folder import tiny_engine_config

HOLD_LIMIT_S = 60.0  # a held call that is never released fails the run instead of hanging it


class HeldStore(BlockStore):
    """The real store, with one chosen call held until the test says go."""

    def __init__(self, inner: BlockStore, emit):
        self.inner, self.emit = inner, emit
        self.armed: str | None = None
        self.release = threading.Event()

    def _hold(self, call: str) -> None:
        if self.armed != call:
            return
        self.armed = None
        self.release.clear()
        self.emit({"event": "held", "call": call})
        if not self.release.wait(HOLD_LIMIT_S):
            raise RuntimeError(f"held {call} was not released within {HOLD_LIMIT_S:.0f}s")

    def get_many(self, keys):
        self._hold("get_many")
        return self.inner.get_many(keys)

    def put_many(self, items, ttl_s=None):
        self._hold("put_many")
        return self.inner.put_many(items, ttl_s)

    def delete(self, keys):
        return self.inner.delete(keys)

    def scan(self, prefix):
        return self.inner.scan(prefix)


def main(folder: str, redis_url: str) -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)  # replies only; stray prints go to stderr
    os.dup2(2, 1)
    lock = threading.Lock()

    def emit(obj: dict) -> None:
        with lock:
            out.write(json.dumps(obj) + "\n")

    base = load_engine(folder, LoadOptions(config=tiny_engine_config(), progress=False, threads=1,
                                           redis_url=redis_url)).engine
    cache = base.shared_cache
    store = HeldStore(cache.store, emit)
    cache.store = store
    commands: queue.Queue = queue.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "go":
                store.release.set()
            else:
                commands.put(cmd)
        commands.put({"op": "exit"})

    threading.Thread(target=read_stdin, daemon=True).start()
    emit({"event": "ready"})
    while (cmd := commands.get())["op"] != "exit":
        try:
            if cmd["op"] == "generate":
                store.armed = cmd.get("hold")
                start = time.monotonic()
                params = SamplingParams(max_new_tokens=cmd["max_new_tokens"], ignore_eos=True)
                seq = list(base.replica().generate(cmd["prompt"], params))[-1].seq
                emit({"event": "done", "output_ids": seq.output_ids, "cached_tokens": seq.cached_tokens,
                      "seconds": time.monotonic() - start, "stats": cache.stats.as_dict()})
            elif cmd["op"] == "flush":
                emit({"event": "flushed", "ok": cache.flush(), "stats": cache.stats.as_dict()})
            else:
                emit({"event": "error", "message": f"unknown op {cmd['op']!r}"})
        except Exception as e:  # noqa: BLE001 - a failed request is reported, the driver goes on
            emit({"event": "error", "message": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main(*sys.argv[1:3])
