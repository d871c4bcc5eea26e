"""A Drafter that asks a DraftWorker actor (the draft model, on its own node) for trees.

Each sequence is sent in full once, then only the tokens committed since the last call. All
sequences of a step go in one call (`propose_many`). The worker keeps the draft model's KV per
sequence; when it lost a sequence (restarted) it answers None and the sequence is sent in full
the next step.

Faults never change output, only speed: a failed, slow (past `timeout_s`) or dead draft worker
means a root-only tree (no speculation this step), and every sequence is sent in full next time.
After a failed call the worker is not called again until it answers a ping, which is sent in
the background (at most every `probe_interval_s`) and checked without waiting: a worker that Ray
cannot restart (its host lost, no other node offers `draft`) answers every call only after a
delay (measured: ~2 s per step, ActorUnavailableError "restarting"), which would otherwise be
paid by every step for as long as it is away.
"""

import logging
import time

from specserve.workers.actors.messages import DraftSync
from specserve.workers.engine.sequence import Sequence
from specserve.workers.spec.draft_tree import DraftTree
from specserve.workers.spec.drafter import Drafter

log = logging.getLogger("specserve.remote_drafter")
PROBE_INTERVAL_S = 1.0  # after a failed call: the least time between pings asking whether the worker is back


class RemoteDrafter(Drafter):
    name = "model"

    def __init__(self, worker, timeout_s: float = 30.0, get=None, ready=None,
                 probe_interval_s: float = PROBE_INTERVAL_S):
        """worker: a DraftWorker actor handle; get(ref, timeout=) resolves what its methods'
        .remote() return, ready(ref) says without waiting whether it can (default ray.get and
        ray.wait; tests pass a plain object, an identity and always-True)."""
        self.worker, self.timeout_s, self.probe_interval_s = worker, timeout_s, probe_interval_s
        self._get, self._ready = get or _ray_get, ready or _ray_ready
        self._down = False  # a call failed and no ping was answered since
        self._probe = None  # the ping in flight while down
        self._probe_sent = 0.0  # when it was sent (time.monotonic())
        self._sent: dict[str, int] = {}  # request id -> tokens the worker holds for it
        self._prefix: dict[str, list] = {}  # request id -> [ObjectRef of PrefixKV] not yet sent
        self._seen: set[str] = set()  # request ids ever sent: the worker may hold state for them
        self.failures = 0
        self.call_seconds = 0.0  # total wall time in propose calls (the step breakdown's "draft")
        self.calls = 0

    def expect_prefix(self, request_id: str, draft_prefix: list) -> None:
        """The draft model's prompt K/V for a request (a prefill worker's), sent with its first sync."""
        self._prefix[request_id] = draft_prefix

    def propose(self, seq: Sequence, max_nodes: int) -> DraftTree:
        return self.propose_many([seq], [max_nodes])[0]

    def propose_many(self, seqs: list[Sequence], max_nodes: list[int]) -> list[DraftTree]:
        if self._down and not self._back():
            return [DraftTree.root_only(seq.token_ids[-1]) for seq in seqs]
        syncs = [self._sync(seq, n) for seq, n in zip(seqs, max_nodes)]
        self._seen.update(seq.request_id for seq in seqs)
        start = time.perf_counter()
        try:
            answer = self._get(self.worker.propose.remote(syncs), timeout=self.timeout_s)
        except Exception as e:  # noqa: BLE001 - dead, restarting or slow: no draft this step
            self.failures += 1
            self._sent.clear()
            self._down, self._probe, self._probe_sent = True, None, 0.0
            log.warning("draft worker call failed (%s: %s); this step runs without speculation", type(e).__name__, e)
            return [DraftTree.root_only(seq.token_ids[-1]) for seq in seqs]
        finally:
            self.call_seconds += time.perf_counter() - start
            self.calls += 1
        trees = []
        for seq, sync, tree in zip(seqs, syncs, answer.trees):
            if tree is None:  # the worker does not know it (restarted): send it in full next step
                self._sent.pop(seq.request_id, None)
                trees.append(DraftTree.root_only(seq.token_ids[-1]))
            else:
                self._sent[seq.request_id] = seq.num_tokens
                if sync.full:
                    self._prefix.pop(seq.request_id, None)
                trees.append(tree)
        return trees

    def _back(self) -> bool:
        """Whether the worker answered a ping since it failed. Never waits: sends a ping when none
        is in flight (at most every probe_interval_s) and looks whether the one in flight answered."""
        if self._probe is None and time.monotonic() - self._probe_sent >= self.probe_interval_s:
            self._probe_sent = time.monotonic()
            try:
                self._probe = self.worker.ping.remote()
            except Exception:  # noqa: BLE001 - could not even be sent: ask again later
                return False
        if self._probe is None or not self._ready(self._probe):
            return False
        probe, self._probe = self._probe, None
        try:
            self._get(probe, timeout=self.timeout_s)  # it has a result: returns or raises at once
        except Exception:  # noqa: BLE001 - still restarting, or dead: ask again later
            return False
        self._down = False
        log.warning("draft worker answers again; speculation resumes")
        return True

    def _sync(self, seq: Sequence, max_nodes: int) -> DraftSync:
        held = self._sent.get(seq.request_id)
        if held is None or held > seq.num_tokens:
            return DraftSync(seq.request_id, max_nodes, list(seq.token_ids), full=True, params=seq.params,
                             draft_prefix=self._prefix.get(seq.request_id))
        return DraftSync(seq.request_id, max_nodes, seq.token_ids[held:])

    def release(self, seq: Sequence) -> None:
        self._prefix.pop(seq.request_id, None)
        self._sent.pop(seq.request_id, None)
        if seq.request_id in self._seen:
            self._seen.discard(seq.request_id)
            try:
                self.worker.release.remote([seq.request_id])  # fire and forget
            except Exception:  # noqa: BLE001 - a dead worker holds nothing
                pass


def _ray_get(ref, timeout: float):
    import ray

    return ray.get(ref, timeout=timeout)


def _ray_ready(ref) -> bool:
    import ray

    done, _ = ray.wait([ref], timeout=0)
    return bool(done)
