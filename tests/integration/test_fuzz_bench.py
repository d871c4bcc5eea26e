"""`bench fuzz` against a real in-process gRPC server over loopback (tiny model, small KV pool).

CI size: 400 requests at 8 streams; SPECSERVE_FUZZ_REQUESTS raises it (the bench size is 10,000).
"""

import os

import pytest

from specserve.bench.fuzz import FuzzBenchConfig, FuzzCase, format_report, run_fuzz

from tests.helpers.tiny_folder import save_tiny_model
from tests.helpers.tiny_server import start_server

REQUESTS = int(os.environ.get("SPECSERVE_FUZZ_REQUESTS", "400"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny-fuzz"))
    # A pool of 48 blocks of 4 tokens (1 KiB each): 8 streams of up to ~40 prompt + 16 new tokens
    # need preemption.
    server = start_server(folder, max_num_seqs=8, kv_cache_bytes=48 * 1024, max_queued=16)
    yield server
    server.stop()


def test_fuzz_run_ends_clean(server, tmp_path):
    out = tmp_path / "fuzz.json"
    report = run_fuzz(FuzzBenchConfig(f"127.0.0.1:{server.port}", requests=REQUESTS, streams=8, seed=1, out=out),
                      progress=False)
    assert report.passed, format_report(report)
    assert report.codes.get("OK", 0) > REQUESTS // 4  # most valid requests were served, not all refused
    assert report.codes.get("INVALID_ARGUMENT", 0) > 0  # the hostile ones were refused, naming a field
    assert out.exists()


def test_fuzz_cases_cover_the_edges():
    import random

    from specserve.bench.fuzz import fuzz_case

    rng = random.Random(0)
    cases: list[FuzzCase] = [fuzz_case(rng, i, ["fuzz-0"]) for i in range(2000)]
    fields = {k for c in cases for k in c.kwargs}
    assert {"temperature", "top_p", "top_k", "spec_method", "stop", "cache_salt", "prompt_token_ids"} <= fields
    assert any(c.cancel_after_first for c in cases) and any(c.deadline_s for c in cases)
    assert sum(c.kwargs["request_id"] == "fuzz-0" for c in cases) > 10  # duplicate ids
