"""A sequence-parallel prefill group of Ray PrefillGroupWorker actors in `RayBackend`: a long
prompt's K/V comes from a 2-rank ring group (gloo), is handed to the verify worker, and the
output equals the in-process engine's; a member killed mid-prefill still gives the full output
(the verify worker prefills) and the next long prompt goes through a re-formed group."""

import os
import sys
import time
import uuid
from dataclasses import dataclass

import pytest
import ray
import torch

from specserve.cluster.placement import RoleSpec
from specserve.cluster.ray_cluster import connect
from specserve.scheduler.ray.backend import RayBackend
from specserve.scheduler.ray.config import RayBackendConfig
from specserve.workers.engine.sequence import SamplingParams
from specserve.workers.model.loader import LoadOptions, load_weights
from specserve.workers.model.sequence_parallel import SequenceParallelMode
from specserve.workers.spec.methods import SpecConfig
from specserve.workers.actors.worker_model import WorkerModel

from tests.helpers.tiny_folder import GreedyReference, save_tiny_model, tiny_engine_config

from .ray_cluster_fixture import Collector, poll, run

THRESHOLD = 32  # prompts this long go through the group
LONG = [[(5 * i + j * j) % 90 + 2 for j in range(n)] for i, n in enumerate((70, 53))]
SHORT = [3, 9, 27, 81, 4, 7]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-group"))


@pytest.fixture(scope="module")
def reference(tiny_folder) -> GreedyReference:
    return GreedyReference(tiny_folder)


@dataclass(frozen=True)
class GatedModel:
    """The tiny model, whose layer 1 waits inside every prefill (after writing `entered`) until
    the file `release` exists: the test kills a member while the group is mid-prefill."""

    folder: str
    entered: str
    release: str

    def __call__(self):
        model = load_weights(self.folder, torch.float32, "cpu")
        layer = model.layers[1]
        o = layer.o

        def gated_o(x):
            while not os.path.exists(self.release):
                open(self.entered, "a").close()
                time.sleep(0.01)  # poll interval
            return o(x)

        layer.o = gated_o
        return model


def start_backend(folder: str, group_model_factory=None,
                  mode: SequenceParallelMode = SequenceParallelMode.RING) -> RayBackend:
    small = RoleSpec(replicas=1, num_cpus=0.1)
    config = RayBackendConfig(name=f"g{uuid.uuid4().hex[:8]}", verify=small, prefill=RoleSpec(replicas=0, num_cpus=0.1),
                              draft=RoleSpec(replicas=0), stall_timeout_s=60.0, prefill_group_size=2,
                              sequence_parallel=mode, long_prompt_threshold=THRESHOLD)
    worker_model = WorkerModel(folder, LoadOptions(config=tiny_engine_config(SpecConfig("recycling", 8)), threads=1))
    backend = RayBackend(config, worker_model, connect(), group_model_factory)
    try:
        backend.start()
    except BaseException:
        backend.shutdown()
        raise
    return backend


def handed_tokens(backend: RayBackend) -> int:
    return ray.get(backend.loops[0].handle.breakdown.remote())["prefix_tokens"]


@pytest.mark.parametrize("mode", list(SequenceParallelMode), ids=lambda m: m.value)
def test_group_prefill_output_equals_in_process(ray_cluster, tiny_folder, reference, mode):
    backend = start_backend(tiny_folder, mode=mode)
    try:
        group = backend.prefill_group
        assert len(group.handles) == 2 and group.formations == 1 and group.config.mode is mode
        for prompt in (SHORT, *LONG):
            before = handed_tokens(backend)
            tokens, last = run(backend, prompt, 24)
            assert tokens == reference(prompt, 24), f"prompt of {len(prompt)} tokens"
            assert last.seq.prompt_ids == prompt
            expected = len(prompt) - 1 if len(prompt) >= THRESHOLD else 0  # the verify worker computes the last
            assert handed_tokens(backend) - before == expected
        stats = ray.get([h.stats.remote() for h in group.handles])
        assert [s["prompts"] for s in stats] == [len(LONG), len(LONG)]  # every rank took part in each
        assert group.failures == 0
    finally:
        backend.shutdown()
    assert backend.prefill_group.handles == []


def test_member_killed_mid_prefill_request_completes_and_group_reforms(ray_cluster, tiny_folder, reference, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    gate = GatedModel(tiny_folder, str(tmp_path / "entered"), str(tmp_path / "release"))
    backend = start_backend(tiny_folder, gate)
    try:
        group = backend.prefill_group
        first = list(group.handles)
        out = Collector()
        prompt = LONG[0]
        backend.loops[0].submit(prompt, SamplingParams(max_new_tokens=24, ignore_eos=True), uuid.uuid4().hex, out)
        poll(lambda: os.path.exists(gate.entered), "the group to be mid-prefill")
        ray.kill(first[1], no_restart=True)  # asynchronous: released too early, rank 1 could finish the prefill
        gone = first[1].ping.remote()  # queued behind the gated prefill: resolves (with an error) once rank 1 is dead
        poll(lambda: bool(ray.wait([gone], timeout=0)[0]), "the killed member to be gone")
        open(gate.release, "w").close()  # rank 0 goes on, to find its peer gone
        last = out.wait()
        assert not isinstance(last, Exception), last
        assert out.tokens == reference(prompt, 24)  # the verify worker prefilled it
        assert group.failures == 1 and group.handles == []  # torn down
        before = handed_tokens(backend)
        tokens, _ = run(backend, LONG[1], 24)  # the next long prompt: a new group
        assert tokens == reference(LONG[1], 24)
        assert group.formations == 2 and len(group.handles) == 2
        assert not {h._actor_id for h in group.handles} & {h._actor_id for h in first}
        assert handed_tokens(backend) - before == len(LONG[1]) - 1
    finally:
        backend.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_serve_flags_reach_the_backend_config():
    from specserve.scheduler.cli.main import build_parser
    from specserve.scheduler.cli.serve import ray_serve_options

    parser = build_parser()
    default = ray_serve_options(parser.parse_args(["serve", "--model", "m"])).backend
    assert default.prefill_group_size == 1  # off: today's prefill path
    args = parser.parse_args(["serve", "--model", "m", "--prefill-group-size", "3", "--sequence-parallel", "ulysses",
                              "--long-prompt-threshold", "100"])
    config = ray_serve_options(args).backend
    assert (config.prefill_group_size, config.sequence_parallel, config.long_prompt_threshold) == \
        (3, SequenceParallelMode.ULYSSES, 100)
    old_name = ray_serve_options(parser.parse_args(["serve", "--model", "m", "--prefill-workers", "3"])).backend
    assert old_name.prefill_group_size == 3  # generate's old flag name is an alias
    with pytest.raises(ValueError, match="prefill_group_size"):
        RayBackendConfig(prefill_group_size=0)
