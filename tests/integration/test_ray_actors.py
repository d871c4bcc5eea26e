"""Prefill, draft and verify workers as Ray actors on a multi-node cluster on this machine (one
node per role): placement by role resource, output identical to the in-process engine, KV
handoff (target and draft model), worker deaths mid-request, nothing leaked afterwards."""

import dataclasses
import re
import signal
import subprocess
import sys
import uuid

import pytest
import ray

from specserve.cluster.placement import Role, RoleSpec
from specserve.cluster.ray_cluster import NAMESPACE, connect
from specserve.scheduler.client import Client
from specserve.scheduler.ray.backend import RayBackend
from specserve.scheduler.ray.config import RayBackendConfig
from specserve.scheduler.ray.start import served_model_from
from specserve.scheduler.server.grpc_server import ServerConfig, ServerThread
from specserve.scheduler.prompts import Prompt
from specserve.workers.model.loader import LoadOptions, load_engine
from specserve.workers.model.model_source import load_tokenizer, resolve_model
from specserve.workers.engine.sequence import FinishReason, SamplingParams
from specserve.workers.spec.methods import SpecConfig
from specserve.workers.actors.worker_model import WorkerModel

from tests.helpers.tiny_folder import GreedyReference, save_tiny_model, tiny_engine_config

from .ray_cluster_fixture import Collector, poll, run, run_collected

THRESHOLD = 24  # prompts this long go through the PrefillWorker (short ones do not)
PROMPTS = [[(7 * i + j * j) % 90 + 2 for j in range(n)] for i, n in enumerate((5, 11, 40, 64))]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-ray"))


def model_spec(folder: str) -> SpecConfig:
    return SpecConfig("model", 8, draft_model=folder)  # self-drafting: the draft model is the target


def start_backend(folder: str, spec: SpecConfig, **config) -> RayBackend:
    small = RoleSpec(replicas=1, num_cpus=0.1)
    config = {"name": f"t{uuid.uuid4().hex[:8]}", "verify": small, "prefill": small, "draft": small,
              "prefill_threshold": THRESHOLD, "stall_timeout_s": 60.0, **config}
    worker_model = WorkerModel(folder, LoadOptions(config=tiny_engine_config(spec), threads=1))
    backend = RayBackend(RayBackendConfig(**config), worker_model, connect())
    backend.start()
    return backend


@pytest.fixture(scope="module")
def model_backend(ray_cluster, tiny_folder):
    backend = start_backend(tiny_folder, model_spec(tiny_folder))
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_folder) -> GreedyReference:
    return GreedyReference(tiny_folder)


def test_actors_land_on_their_role_nodes(ray_cluster, model_backend):
    nodes = {Role.VERIFY: model_backend.info.node_id,
             Role.PREFILL: ray.get(model_backend.pool.prefill_handles[0].ready.remote()),
             Role.DRAFT: ray.get(model_backend.pool.draft_handles[0].ready.remote())}
    assert nodes == ray_cluster.role_nodes
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE}
    assert set(model_backend.actor_names()) <= names


def test_model_drafter_output_equals_in_process_and_hands_kv_over(model_backend, reference):
    before = ray.get(model_backend.pool.draft_handles[0].stats.remote())
    for prompt in PROMPTS:
        tokens, last = run(model_backend, prompt, 40)
        assert tokens == reference(prompt, 40), f"prompt of {len(prompt)} tokens"
        assert last.finish_reason is FinishReason.LENGTH and len(last.seq.output_ids) == 40
        assert last.seq.prompt_ids == prompt and last.seq.spec.spec_steps > 0
    draft = ray.get(model_backend.pool.draft_handles[0].stats.remote())
    long_prompts = [p for p in PROMPTS if len(p) >= THRESHOLD]
    # The draft model's prompt K/V came from the prefill worker for every long prompt (all but the root).
    assert draft.handed_tokens - before.handed_tokens == sum(len(p) - 1 for p in long_prompts)
    assert ray.get(model_backend.pool.prefill_handles[0].ping.remote())


def test_acceptance_through_actors_holds_up(model_backend, tiny_folder):
    """Mean accepted tokens per verify step through actors (draft K/V handed over) vs the same
    method in-process: a lost draft prompt K/V would collapse it."""
    engine = load_engine(tiny_folder, LoadOptions(config=tiny_engine_config(model_spec(tiny_folder)),
                                                  progress=False)).engine
    prompt = PROMPTS[3]
    seq = engine.add_request(prompt, SamplingParams(max_new_tokens=48, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    _, last = run(model_backend, prompt, 48)
    in_process = seq.spec.accepted_tokens / seq.spec.spec_steps
    actors = last.seq.spec.accepted_tokens / last.seq.spec.spec_steps
    assert in_process > 1.0  # self-drafting accepts most of every tree
    assert actors >= 0.8 * in_process, (actors, in_process)


def test_through_the_grpc_server(model_backend, reference):
    server = ServerThread(ServerConfig(port=0, metrics_port=None))
    try:
        info = model_backend.info
        server.attach_loops(model_backend.loops, served_model_from(info, "tiny"), info.fingerprint, info.block_size)
        with Client(f"127.0.0.1:{server.port}") as client:
            assert client.health() == "SERVING"
            prompt = " ".join(f"w{t}" for t in PROMPTS[2])
            chunks = list(client.generate(prompt=prompt, max_tokens=24, ignore_eos=True))
        ids = info.tokenizer(prompt)["input_ids"]
        assert [t for c in chunks for t in c.token_ids] == reference(ids, 24)
        assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].spec.method == "model"
    finally:
        server.server.loops = []  # the backend belongs to the fixture: do not stop it here
        server.stop()


def test_health_is_not_serving_while_every_verify_worker_is_dead(ray_cluster, tiny_folder, reference):
    """One dead verify worker of two: still SERVING; both: NOT_SERVING; a request revives one
    (a new actor under its name) and health is SERVING again."""
    backend = start_backend(tiny_folder, SpecConfig("none"), prefill=RoleSpec(replicas=0),
                            verify=RoleSpec(replicas=2, num_cpus=0.1), stats_interval_s=0.1)
    server = ServerThread(ServerConfig(port=0, metrics_port=None, health_poll_s=0.05))
    try:
        info = backend.info
        server.attach_loops(backend.loops, served_model_from(info, "tiny"), info.fingerprint, info.block_size)
        with Client(f"127.0.0.1:{server.port}") as client:
            assert client.health() == "SERVING"
            ray.kill(backend.loops[0].handle, no_restart=True)
            poll(lambda: not backend.loops[0].healthy(), "the pool to notice the first dead worker")
            assert client.health() == "SERVING"  # the other worker serves
            ray.kill(backend.loops[1].handle, no_restart=True)
            poll(lambda: client.health() == "NOT_SERVING", "health to turn NOT_SERVING")
            prompt = " ".join(f"w{t}" for t in PROMPTS[0])
            chunks = list(client.generate(prompt=prompt, max_tokens=8, ignore_eos=True))
            assert [t for c in chunks for t in c.token_ids] == reference(info.tokenizer(prompt)["input_ids"], 8)
            poll(lambda: client.health() == "SERVING", "health to turn SERVING once a worker was replaced")
    finally:
        server.stop()
        backend.shutdown()


def test_no_kv_blocks_left_after_requests(model_backend):
    loop = model_backend.loops[0]
    poll(lambda: loop.in_flight() == 0, "requests to end")
    verify = ray.get(loop.handle.stats.remote())
    assert verify.running == 0 and verify.kv_blocks_free == verify.kv_blocks_total

    def draft_empty():
        s = ray.get(model_backend.pool.draft_handles[0].stats.remote())
        return s.sequences == 0 and s.kv_blocks_free == s.kv_blocks_total

    poll(draft_empty, "the draft worker to release every sequence")


def kill_mid_generation(backend: RayBackend, handle_of, prompt: list[int], n: int, no_restart: bool,
                        params: SamplingParams | None = None):
    """Starts a request (greedy unless params), kills an actor once some tokens were delivered;
    returns the outputs."""
    out = Collector()
    params = params or SamplingParams(max_new_tokens=n, ignore_eos=True)
    backend.loops[0].submit(prompt, params, uuid.uuid4().hex, out)
    poll(lambda: len(out.tokens) >= 8, "the first tokens")
    assert len(out.tokens) < n, "finished before the kill: raise n"
    ray.kill(handle_of(backend), no_restart=no_restart)
    last = out.wait()
    return out, last


@pytest.mark.parametrize("no_restart", [False, True], ids=["restarted", "replaced"])
def test_verify_actor_killed_mid_generation_still_gives_the_full_output(ray_cluster, tiny_folder, reference,
                                                                        no_restart):
    backend = start_backend(tiny_folder, SpecConfig("recycling", 8), prefill=RoleSpec(replicas=0))
    try:
        prompt, n = PROMPTS[1], 1500
        out, last = kill_mid_generation(backend, lambda b: b.loops[0].handle, prompt, n, no_restart)
        assert not isinstance(last, Exception), last
        assert out.tokens == reference(prompt, n)  # nothing lost, nothing twice
        assert last.seq.prompt_ids == prompt and len(last.seq.output_ids) == n
        assert backend.driver.resubmits == 1
        tokens, _ = run(backend, PROMPTS[0], 16)  # and it keeps serving
        assert tokens == reference(PROMPTS[0], 16)
    finally:
        backend.shutdown()


def test_a_resubmitted_request_samples_and_says_what_the_one_run_did(ray_cluster, tiny_folder):
    """Sampled and seeded, and with a stop string that never matches but holds back text at every
    step: after the verify worker dies mid-request, the tokens and the text are the one run's
    (the same per-position noise; the held-back text not lost)."""
    backend = start_backend(tiny_folder, SpecConfig("ngram", 4), prefill=RoleSpec(replicas=0))
    try:
        prompt, n = PROMPTS[1], 1500
        params = SamplingParams(max_new_tokens=n, temperature=0.9, seed=17, ignore_eos=True, stop=("#" * 30,))
        one = run_collected(backend, prompt, params)
        out, last = kill_mid_generation(backend, lambda b: b.loops[0].handle, prompt, n, False, params)
        assert not isinstance(last, Exception), last
        assert backend.driver.resubmits == 1
        assert out.tokens == one.tokens and len(out.tokens) == n
        assert out.text == one.text and len(one.text) > 30
    finally:
        backend.shutdown()


def test_verify_actor_killed_without_resubmits_ends_with_a_clear_error(ray_cluster, tiny_folder, reference):
    backend = start_backend(tiny_folder, SpecConfig("none"), prefill=RoleSpec(replicas=0), max_resubmits=0)
    try:
        prompt, n = PROMPTS[1], 1500
        out, last = kill_mid_generation(backend, lambda b: b.loops[0].handle, prompt, n, no_restart=False)
        assert isinstance(last, RuntimeError) and "verify worker lost" in str(last), last
        assert out.tokens == reference(prompt, n)[: len(out.tokens)]  # what was emitted is right
        poll(lambda: backend.loops[0].in_flight() == 0, "the failed request to leave")
        tokens, _ = run(backend, PROMPTS[0], 16)  # the restarted worker serves new requests
        assert tokens == reference(PROMPTS[0], 16)
    finally:
        backend.shutdown()


def test_draft_actor_killed_mid_generation_never_changes_output(ray_cluster, tiny_folder, reference):
    backend = start_backend(tiny_folder, model_spec(tiny_folder), prefill=RoleSpec(replicas=0), draft_timeout_s=5.0)
    try:
        prompt, n = PROMPTS[2], 600
        out, last = kill_mid_generation(backend, lambda b: b.pool.draft_handles[0], prompt, n, no_restart=True)
        assert not isinstance(last, Exception), last
        assert out.tokens == reference(prompt, n)
        assert ray.get(backend.loops[0].handle.drafter_stats.remote())["failures"] >= 1  # it ran without drafts
    finally:
        backend.shutdown()


def test_recycling_output_equals_in_process(ray_cluster, tiny_folder, reference):
    backend = start_backend(tiny_folder, SpecConfig("recycling", 8), draft=RoleSpec(replicas=0))
    try:
        assert backend.pool.draft_handles == []  # train-free drafting runs inside the verify worker
        for prompt in PROMPTS:
            tokens, last = run(backend, prompt, 32)
            assert tokens == reference(prompt, 32)
            assert last.seq.spec.spec_steps > 0
    finally:
        backend.shutdown()


def test_no_actors_left_after_shutdown(ray_cluster, tiny_folder):
    backend = start_backend(tiny_folder, SpecConfig("ngram", 4))
    names = backend.actor_names()
    backend.shutdown()

    def gone():
        alive = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
        return not alive & set(names)

    poll(gone, f"actors {names} to end")


def test_specserve_serve_joins_the_cluster(ray_cluster, tiny_folder, reference, tmp_path):
    """`specserve serve --address host:port`: workers on the role nodes, SERVING only once they are
    ready, identical output over gRPC, and SIGTERM ends the server and its actors."""
    name = f"srv{uuid.uuid4().hex[:6]}"
    log = tmp_path / "serve.log"
    args = [sys.executable, "-m", "specserve.scheduler.cli.main", "serve", "--address", ray_cluster.address,
            "--model", tiny_folder, "--port", "0", "--http-port", "0", "--no-metrics", "--threads", "1",
            "--kv-cache-gb", "0.01",
            "--block-size", "4", "--spec", "recycling", "--spec-tokens", "8", "--deployment-name", name,
            "--verify-cpus", "0.1", "--prefill-cpus", "0.1", "--prefill-threshold", str(THRESHOLD)]
    with open(log, "w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
    try:
        poll(lambda: "specserve: ready" in log.read_text() or proc.poll() is not None, "the server to be ready")
        assert proc.poll() is None, log.read_text()
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text()).group(1))
        tokenizer = load_tokenizer(resolve_model(tiny_folder, progress=False))
        with Client(f"127.0.0.1:{port}") as client:
            assert client.health() == "SERVING"
            for prompt in (PROMPTS[0], PROMPTS[3]):  # the long one through the prefill worker
                text = " ".join(f"w{t}" for t in prompt)
                ids = Prompt(text=text).token_ids(tokenizer)
                chunks = list(client.generate(prompt=text, max_tokens=20, ignore_eos=True))
                assert [t for c in chunks for t in c.token_ids] == reference(ids, 20)
                assert chunks[-1].usage.prompt_tokens == len(ids)
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
        assert {f"{name}-verify-0", f"{name}-prefill-0"} <= names
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    poll(lambda: not any(a["name"].startswith(name) for a in ray.util.list_named_actors(all_namespaces=True)),
         "the server's actors to end")


def test_a_restarted_scheduler_finds_its_workers_by_name(ray_cluster, tiny_folder, reference):
    first = start_backend(tiny_folder, SpecConfig("ngram", 4), keep_workers=True, prefill=RoleSpec(replicas=0))
    actor_id = first.loops[0].handle._actor_id
    first.shutdown()  # the scheduler goes away; keep_workers leaves the actors running
    second = RayBackend(first.config, first.worker_model, connect())
    try:
        second.start()
        assert second.loops[0].handle._actor_id == actor_id  # found again, not created anew
        assert run(second, PROMPTS[0], 12)[0] == reference(PROMPTS[0], 12)
    finally:
        second.config = dataclasses.replace(second.config, keep_workers=False)
        second.shutdown()
