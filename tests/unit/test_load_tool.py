"""bench/load_tool.py without GuideLLM: the profile's checks, the scenario it hands GuideLLM and
the headline numbers it reads back from GuideLLM's report."""

from pathlib import Path

import pytest

from specserve.bench.load_tool import PROFILE, WARMUP_REQUESTS, Profile, scenario, summary

pytestmark = pytest.mark.unit


def test_profile_refuses_mismatched_levels_and_empty_requests():
    with pytest.raises(ValueError, match="equally long"):
        Profile(streams=(1, 8), requests=(24,), prompt_tokens=128, output_tokens=128, seed=0)
    with pytest.raises(ValueError, match="output_tokens must be >= 1, got 0"):
        Profile(streams=(1,), requests=(24,), prompt_tokens=128, output_tokens=0, seed=0)
    with pytest.raises(ValueError, match="streams must be >= 1"):
        Profile(streams=(0,), requests=(24,), prompt_tokens=128, output_tokens=128, seed=0)


def test_scenario_runs_one_sub_benchmark_per_stream_count_with_the_served_tokenizer():
    spec = scenario("http://127.0.0.1:9", "smollm2-135m", Path("/models/m"), PROFILE)
    assert spec["benchmarks"] == [{"profile.streams": s, "constraints[0].count": n}
                                  for s, n in zip(PROFILE.streams, PROFILE.requests, strict=True)]
    body = spec["spec"]
    assert body["backend"] == {"kind": "openai_http", "target": "http://127.0.0.1:9", "model": "smollm2-135m",
                               "request_format": "/v1/completions"}
    assert body["tokenizer"] == {"kind": "hf_auto", "model": "/models/m"}
    assert body["data"] == [{"kind": "synthetic_text", "prompt_tokens": PROFILE.prompt_tokens,
                             "output_tokens": PROFILE.output_tokens}]
    assert body["profile"]["warmup"] == {"value": WARMUP_REQUESTS, "mode": "requests"}
    assert {o["kind"] for o in body["outputs"]} == {"json", "csv", "console"}


def _metric(mean: float, p50: float, p95: float) -> dict:
    return {"successful": {"mean": mean, "percentiles": {"p50": p50, "p95": p95}}}


def test_summary_reads_the_headline_numbers_of_each_sub_benchmark():
    metrics = {"request_totals": {"successful": 7, "errored": 1, "incomplete": 0, "total": 8},
               "output_tokens_per_second": _metric(41.456, 40.0, 50.0),
               "time_to_first_token_ms": _metric(900.0, 604.471, 1249.0),
               "inter_token_latency_ms": _metric(40.0, 33.57, 71.6),
               "request_latency": _metric(6.0, 5.31, 9.0)}
    report = {"benchmarks": [{"config": {"strategy": {"streams": 8}}, "metrics": metrics}]}
    assert summary(report) == [{"streams": 8, "successful": 7, "errored": 1, "incomplete": 0, "total": 8,
                                "output_tok_s": 41.46, "ttft_ms_p50": 604.47, "ttft_ms_p95": 1249.0,
                                "itl_ms_p50": 33.57, "itl_ms_p95": 71.6, "latency_s_p50": 5.31}]
