"""The Ray worker pieces without a cluster (fast): placement options, the remote drafter's sync
protocol and fault handling against a fake DraftWorker, the prefill worker's K/V handed into an
engine, and the `specserve serve` Ray flags."""

import asyncio
import concurrent.futures

import pytest
import torch

from specserve.cluster.placement import Role, RoleSpec, actor_options
from specserve.scheduler.cli.main import build_parser
from specserve.scheduler.ray.actor_pool import VerifyReplica
from specserve.scheduler.ray.remote_loop import RemoteEngineLoop
from specserve.scheduler.ray.remote_request import RemoteRequest
from specserve.scheduler.ray.request_driver import RESTART_GRACE_S, RequestDriver
from specserve.scheduler.cli.serve import ray_serve_options
from specserve.workers.actors.messages import StreamChunk
from specserve.workers.engine.engine_loop import LoopStoppedError, QueueFullError
from specserve.workers.actors.messages import DraftedTrees
from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine
from specserve.workers.engine.kv_prefix import PrefixKV
from specserve.workers.actors.prefill import LocalPrefillRunner, PrefillWorker
from specserve.workers.actors.remote_drafter import RemoteDrafter
from specserve.workers.engine.sequence import FinishReason, SamplingParams, Sequence, SpecCounters
from specserve.workers.spec.draft_tree import DraftTree
from specserve.workers.actors.worker_model import WorkerModel
from specserve.workers.model.loader import LoadOptions

from tests.helpers.tiny_models import ours_from_hf, tiny_hf, tiny_tokenizer

NODE = "ab" * 28  # a node id: 28 bytes in hex


def test_a_role_goes_to_the_nodes_offering_its_resource_else_to_this_node_unless_joined():
    spec = RoleSpec(replicas=2, num_cpus=0.5, num_gpus=1, resource_per_replica=1)
    offered = actor_options(Role.VERIFY, spec, {"CPU": 8, "specserve_verify": 2}, NODE)
    assert offered["resources"] == {"specserve_verify": 1} and "scheduling_strategy" not in offered
    assert (offered["num_cpus"], offered["num_gpus"], offered["max_task_retries"]) == (0.5, 1, 0)
    local = actor_options(Role.DRAFT, spec, {"CPU": 8, "specserve_verify": 2}, NODE)
    assert "resources" not in local and local["scheduling_strategy"].node_id == NODE
    assert not local["scheduling_strategy"].soft
    joined = actor_options(Role.DRAFT, spec, {"CPU": 8, "specserve_verify": 2}, NODE, joined=True)
    assert joined["resources"] == {"specserve_draft": 1} and "scheduling_strategy" not in joined  # waits for one
    with pytest.raises(ValueError, match="replicas"):
        RoleSpec(replicas=-1)


class _Call:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class FakeDraftWorker:
    """Answers propose like a DraftWorker (a chain of the next two token ids), records the syncs;
    `restarted` forgets every sequence, `broken` raises."""

    def __init__(self):
        self.syncs, self.known, self.released = [], set(), []
        self.broken = False
        self.propose, self.release, self.ping = _Call(self._propose), _Call(self.released.extend), _Call(self._ping)

    def _ping(self):
        if self.broken:
            raise ConnectionError("draft node gone")
        return True

    def _propose(self, syncs):
        if self.broken:
            raise ConnectionError("draft node gone")
        self.syncs.append(syncs)
        trees = []
        for s in syncs:
            if not s.full and s.key not in self.known:
                trees.append(None)
                continue
            self.known.add(s.key)
            last = s.new_tokens[-1]
            trees.append(DraftTree([last, last + 1, last + 2], [-1, 0, 1]))
        return DraftedTrees(trees)


def test_remote_drafter_sends_a_sequence_once_then_diffs_and_recovers_from_a_lost_or_dead_worker():
    worker = FakeDraftWorker()
    drafter = RemoteDrafter(worker, get=lambda value, timeout: value, ready=lambda value: True, probe_interval_s=0)
    seq = Sequence([5, 6, 7], SamplingParams())
    assert drafter.propose(seq, 8).tokens == [7, 8, 9]
    assert worker.syncs[-1][0].full and worker.syncs[-1][0].new_tokens == [5, 6, 7]
    seq.output_ids += [8, 9]
    drafter.propose(seq, 8)
    assert not worker.syncs[-1][0].full and worker.syncs[-1][0].new_tokens == [8, 9]  # a diff
    worker.known.clear()  # the worker restarted: it answers None, the sequence goes in full next step
    assert drafter.propose(seq, 8).size == 1
    drafter.propose(seq, 8)
    assert worker.syncs[-1][0].full and worker.syncs[-1][0].new_tokens == [5, 6, 7, 8, 9]
    worker.broken = True  # dead or slow: no speculation, never an error
    assert drafter.propose(seq, 8).tokens == [9] and drafter.failures == 1
    calls = len(worker.syncs)
    assert drafter.propose(seq, 8).tokens == [9]  # not called while down: its ping failed
    assert len(worker.syncs) == calls and drafter.failures == 1
    worker.broken = False
    drafter.propose(seq, 8)  # the ping answered: called again
    assert len(worker.syncs) == calls + 1 and worker.syncs[-1][0].full
    drafter.release(seq)
    assert worker.released == [seq.request_id]


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf("llama", initializer_range=0.3))


def test_prefill_workers_kv_equals_the_engines_own_and_gives_the_same_tokens(model):
    prompt = [(5 * i * i + 3) % 90 + 2 for i in range(37)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    worker = PrefillWorker(WorkerModel("unused", LoadOptions(config=EngineConfig(block_size=4))),
                           target=LocalPrefillRunner(model, block_size=4, chunk=16))
    target, draft = worker.prefill(prompt)
    assert draft is None and target.start == 0 and target.num_tokens == len(prompt) - 1
    assert target.k.is_contiguous() and target.k.device.type == "cpu"

    def engine():
        return LLMEngine(model, tiny_tokenizer(), EngineConfig(block_size=4, kv_cache_bytes=1 << 20))

    plain, handed = engine(), engine()
    seq = plain.add_request(prompt, params)
    plain.step()  # the whole prompt in one step
    k, v = plain.kv.read(seq.table, 0, len(prompt) - 1)
    torch.testing.assert_close(target.k, k, rtol=1e-4, atol=1e-5)  # chunked vs one pass: fp32 rounding
    torch.testing.assert_close(target.v, v, rtol=1e-4, atol=1e-5)
    while plain.has_unfinished():
        plain.step()
    other = handed.add_request(prompt, params, prefix_kv=PrefixKV(0, target.k, target.v))
    while handed.has_unfinished():
        handed.step()
    assert other.output_ids == seq.output_ids


def test_serve_ray_flags():
    parse = build_parser().parse_args
    assert ray_serve_options(parse(["serve", "--no-ray"])) is None
    options = ray_serve_options(parse(["serve", "--address", "auto", "--verify-replicas", "2", "--verify-gpus", "1",
                                       "--prefill-replicas", "0", "--draft-cpus", "2", "--prefill-threshold", "512"]))
    assert options.address == "auto"
    b = options.backend
    assert (b.verify.replicas, b.verify.num_gpus, b.prefill.replicas, b.draft.num_cpus) == (2, 1, 0, 2)
    assert b.prefill_threshold == 512
    embedded = ray_serve_options(parse(["serve", "--replicas", "3"]))
    assert embedded.address is None and embedded.backend.verify.replicas == 3
    with pytest.raises(ValueError, match="--no-ray"):
        ray_serve_options(parse(["serve", "--no-ray", "--address", "auto"]))


class FakeDriver:
    """Stands in for the RequestDriver: records the requests a RemoteEngineLoop hands it; each
    ends when the test resolves its future."""

    def __init__(self):
        self.futures: dict[str, concurrent.futures.Future] = {}
        self.cancelled: list[str] = []

    def start(self, req: RemoteRequest) -> concurrent.futures.Future:
        self.futures[req.request_id] = concurrent.futures.Future()
        return self.futures[req.request_id]

    def cancel(self, req: RemoteRequest) -> None:
        self.cancelled.append(req.request_id)

    def end(self, request_id: str) -> None:
        self.futures[request_id].set_result(None)


def test_remote_loops_admit_and_close_each_for_its_own_replica():
    driver = FakeDriver()
    first, second = (RemoteEngineLoop(VerifyReplica(i, None, max_queued=1), driver, max_in_flight=2) for i in range(2))

    def submit(loop, request_id):
        loop.submit([5, 6], SamplingParams(max_new_tokens=4), request_id, lambda item: None)

    submit(first, "a")
    submit(first, "b")
    with pytest.raises(QueueFullError, match="the limit is 2"):
        submit(first, "c")
    with pytest.raises(ValueError, match="request_id 'a' is already in flight"):
        submit(first, "a")
    assert first.stats().rejected == 1 and first.stats().max_queued == 1
    first.cancel("a")
    assert driver.cancelled == ["a"]
    driver.end("a")
    assert first.in_flight() == 1 and first.has_room()
    first.close()
    with pytest.raises(LoopStoppedError):
        submit(first, "d")
    submit(second, "d")  # closing one replica's loop leaves the others admitting
    assert second.in_flight() == 1 and second.healthy()
    second.replica.alive = False  # the pool found its worker dead
    assert not second.healthy() and not second.has_room()


def test_a_resubmitted_request_keeps_every_token_and_sums_its_counters():
    delivered = []
    req = RemoteRequest("r", [5, 6, 7], SamplingParams(max_new_tokens=10), "", delivered.append, replica=None)
    req.absorb(StreamChunk("r", [8, 9], "", cached_tokens=4, spec=SpecCounters(2, 1, 5, 1)))
    req.end_attempt(started=True)  # the worker died after two tokens
    again = req.next_request()
    assert again.prompt_ids == [5, 6, 7, 8, 9] and again.params.max_new_tokens == 8
    out = req.absorb(StreamChunk("r", [10], "", finished=True, finish_reason=FinishReason.LENGTH,
                                 cached_tokens=0, spec=SpecCounters(1, 1, 3, 0)))
    assert out.seq.output_ids == [8, 9, 10] and out.seq.prompt_ids == [5, 6, 7]
    assert out.seq.spec == SpecCounters(3, 2, 8, 1) and out.seq.cached_tokens == 4  # the first attempt's hit
    assert req.attempts == 1
    req.deliver(out)
    req.finish(FinishReason.ABORT)  # after the last output: nothing more
    assert delivered == [out]


class FakePool:
    """ActorPool's answers / revive as the driver sees them: the lost replica never answers."""

    def __init__(self, replicas: list[VerifyReplica]):
        self.replicas, self.asked = replicas, []

    async def answers(self, replica: VerifyReplica, within_s: float | None = None) -> bool:
        self.asked.append((replica.index, within_s))
        return False

    async def revive(self, replica: VerifyReplica) -> VerifyReplica:
        return replica


def test_a_lost_replica_gets_a_short_grace_while_another_can_take_its_requests():
    lost, other = VerifyReplica(0, None, max_queued=1), VerifyReplica(1, None, max_queued=1)
    pool = FakePool([lost, other])
    driver = RequestDriver(asyncio.new_event_loop(), pool, None, stall_timeout_s=60, max_resubmits=3)
    assert asyncio.run(driver._replacement(lost)) is other
    assert pool.asked == [(0, RESTART_GRACE_S)]  # not the whole ready timeout
    other.alive = False  # no one else: wait for the lost one as long as it takes, then a new actor
    assert asyncio.run(driver._replacement(lost)) is lost
    assert pool.asked[-1] == (0, None)
