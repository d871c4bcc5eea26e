"""`specserve bench chaos` in its CI size (about 3 minutes of faults): four rounds of four faults
at random times on the lab cluster (bench/lab_cluster.py) serving the tiny model. The faults are
those the one-fault tests (test_netns_ray_faults.py) do not repeat or do not inject: the draft
and the prefill worker killed four times each (more than Ray's default restart cap of 3), Redis
restarted empty and Redis cut off mid-load."""

from __future__ import annotations

import pytest

from specserve.bench.chaos import ChaosConfig, run_chaos_bench

from tests.helpers.tiny_folder import save_tiny_model

from .netns_ray_cluster import require_root_lab

pytestmark = pytest.mark.integration

FAULTS = ("draft-kill", "prefill-kill", "redis-restart", "redis-partition")


def test_a_short_soak_loses_no_token(tmp_path):
    require_root_lab()
    model = save_tiny_model(tmp_path / "tiny", max_position_embeddings=1024)
    lines: list[str] = []
    result = run_chaos_bench(ChaosConfig(model=model, duration_s=900.0, max_faults=4 * len(FAULTS), faults=FAULTS,
                                         mean_gap_s=4.0, max_tokens=96, seed=3, out=tmp_path / "results"),
                             log=lines.append)
    print("\n".join(lines))
    drawn = [f.fault for f in result.figures]
    assert result.ok, "\n".join(lines)
    assert sorted(drawn) == sorted(FAULTS * 4), drawn
    assert sum(f.in_flight for f in result.figures) >= len(drawn)  # faults hit streams mid-way
    assert list((tmp_path / "results").glob("chaos-*.json"))
