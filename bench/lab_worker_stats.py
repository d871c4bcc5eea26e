"""What the workers of a deployment hold once no request is in flight: a Ray driver on a lab
host, run as `python -m specserve.bench.lab_worker_stats NAME` (RAY_ADDRESS: the head's GCS) and
driven over stdin/stdout with one JSON object a line, like lab_load_client.

    {"cmd": "idle", "timeout_s": T, "draft": D} -> {"event": "idle", "verify_running", "verify_blocks_free",
        "verify_blocks_total", "draft_failures", "draft_sequences", "draft_error"}

It polls (up to T) until the verify worker `<NAME>-verify-0` runs no sequence and has every KV
block free and, with D true, the draft worker `<NAME>-draft-0` answers (Ray may still be
restarting it) and holds no sequence; it answers the last numbers seen. draft_failures: the verify worker's failed draft
calls; draft_sequences None: the draft worker did not answer within DRAFT_ANSWER_S (draft_error: why). The actors
are looked up by name at every command (a restarted or replaced actor is found again).
"""

import json
import sys
import time

import ray

from specserve.cluster.ray_cluster import NAMESPACE

DRAFT_ANSWER_S = 5.0


def draft_sequences(name: str) -> tuple[int | None, str | None]:
    """The draft worker's sequences, or None and why it did not answer."""
    try:
        return ray.get(ray.get_actor(f"{name}-draft-0").stats.remote(), timeout=DRAFT_ANSWER_S).sequences, None
    except Exception as e:  # noqa: BLE001 - dead, restarting where no node can take it, or cut off
        return None, f"{type(e).__name__}: {e}"[:500]


def idle(name: str, timeout_s: float, with_draft: bool) -> dict:
    verify = ray.get_actor(f"{name}-verify-0")
    deadline = time.monotonic() + timeout_s
    while True:
        v = ray.get(verify.stats.remote(), timeout=timeout_s)
        held, why = draft_sequences(name)
        draft_idle = held == 0 if with_draft else not held
        if (v.running == 0 and v.kv_blocks_free == v.kv_blocks_total and draft_idle) or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # poll interval while the last requests are released
    return {"event": "idle", "verify_running": v.running, "verify_blocks_free": v.kv_blocks_free,
            "verify_blocks_total": v.kv_blocks_total,
            "draft_failures": ray.get(verify.drafter_stats.remote(), timeout=timeout_s)["failures"],
            "draft_sequences": held, "draft_error": why}


def main() -> None:
    name = sys.argv[1]
    ray.init(address="auto", namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] != "idle":
            raise ValueError(f"unknown command {cmd['cmd']!r} (idle)")
        print(json.dumps(idle(name, cmd["timeout_s"], cmd["draft"])), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
