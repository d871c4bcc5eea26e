"""bench/ never imports the CLI (scheduler/cli): each suite runs from its typed config alone."""

import pkgutil
import subprocess
import sys

import pytest

import specserve.bench

MODULES = sorted(f"specserve.bench.{m.name}" for m in pkgutil.iter_modules(specserve.bench.__path__))


def test_every_bench_module_is_checked():
    suites = {"engine_vs_hf", "spec_vs_hf", "serve_load", "prefix_cache", "long_context", "ray_vs_inprocess",
              "serve_handles"}
    assert {f"specserve.bench.{name}" for name in suites} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_a_bench_module_does_not_import_the_cli(module):
    code = (f"import sys, {module}\n"
            "cli = sorted(m for m in sys.modules if (m + '.').startswith('specserve.scheduler.cli.'))\n"
            "print(','.join(cli))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"


def test_the_cli_builds_the_suites_typed_config(monkeypatch):
    from specserve.bench import long_context
    from specserve.scheduler.cli.main import main
    from specserve.workers.model.sequence_parallel import SequenceParallelMode

    built = []
    monkeypatch.setattr(long_context, "run_longctx_bench", built.append)
    assert main(["bench", "longctx", "--lengths", "64,128", "--prefill-workers-list", "1,2",
                 "--sequence-parallel", "ulysses", "--layers", "2", "--skip-decode"]) == 0
    assert built == [long_context.LongContextBenchConfig(
        lengths=(64, 128), group_sizes=(1, 2), mode=SequenceParallelMode.ULYSSES, layers=2, skip_decode=True)]


def test_serve_and_rayserve_take_the_level_flags_given_and_their_own_defaults(monkeypatch):
    from specserve.bench import serve_handles, serve_load
    from specserve.scheduler.cli.main import main

    built = []
    monkeypatch.setattr(serve_load, "run_serve_bench", built.append)
    monkeypatch.setattr(serve_handles, "run_rayserve_bench", built.append)
    assert main(["bench", "serve"]) == 0
    assert main(["bench", "rayserve"]) == 0
    assert main(["bench", "rayserve", "--concurrency", "2,8", "--requests-per-level", "5", "--rounds", "3"]) == 0
    serve, rayserve, given = built
    assert (serve.concurrency, serve.requests_per_level, serve.rounds) == ((1, 2, 4, 8, 16), 8, 1)
    assert (rayserve.concurrency, rayserve.requests_per_level, rayserve.rounds) == ((1, 16), 16, 2)
    assert (given.concurrency, given.requests_per_level, given.rounds) == ((2, 8), 5, 3)
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        serve_handles.RayServeBenchConfig(rounds=0)


def test_a_bad_config_is_refused_naming_the_field():
    from specserve.bench.serve_load import ServeBenchConfig

    with pytest.raises(ValueError, match="concurrency must list positive integers"):
        ServeBenchConfig(concurrency=(4, 0))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        ServeBenchConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        ServeBenchConfig(rounds=0)


def test_the_chaos_suite_gets_its_faults_and_exits_1_when_a_token_was_lost(monkeypatch):
    from specserve.bench import chaos
    from specserve.bench.fault_figures import FaultFigures, TokenErrors
    from specserve.scheduler.cli.main import main

    built = []

    def run(config, log=print):
        built.append(config)
        lost = FaultFigures("draft-kill", 3, 3, 0, 0, TokenErrors(lost=1), 1, 2.0, 2.0, 50.0, 60.0, ())
        return chaos.ChaosResult([lost], None, {"verify_running": 0, "verify_blocks_free": 4,
                                                "verify_blocks_total": 4}, True)

    monkeypatch.setattr(chaos, "run_chaos_bench", run)
    assert main(["bench", "chaos", "--model", "m", "--duration-min", "0.5", "--max-faults", "3",
                 "--faults", "draft-kill,redis-restart", "--mean-gap-s", "7"]) == 1
    config = built[0]
    assert (config.duration_s, config.max_faults, config.faults, config.mean_gap_s) == \
        (30.0, 3, ("draft-kill", "redis-restart"), 7.0)
    with pytest.raises(ValueError, match=r"faults: unknown \['power-cut'\]; known: verify-kill"):
        chaos.ChaosConfig(model="m", faults=("power-cut",))
