"""`specserve bench SUITE`: the benchmark flags, turned into the typed config each suite's
`run_*` takes (bench/). The benchmarks never import the CLI; this is the only place that knows
both argparse and the suites."""

import argparse
from pathlib import Path

from specserve.scheduler.cli import flags

SUITES = ("engine", "spec", "multiturn", "serve", "prefix", "longctx", "ray", "rayserve", "fuzz", "kernels", "chaos")
DEFAULT_BENCH_THREADS = 2  # the machines here have 2 cores


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (ratios measured side by side, see BENCH.md)")
    bench.add_argument("suite", choices=SUITES,
                       help="engine: our engine vs transformers generate(); spec: every drafter vs transformers; "
                            "multiturn: the same on traces of requests that carry the earlier ones (a conversation "
                            "continued, a code file edited repeatedly), our prefix cache on within a trace; "
                            "serve: server throughput and latency at rising concurrency (gRPC or OpenAI HTTP); "
                            "prefix: TTFT of 2K/4K-token prompts cold vs prefix cache hits (L1, Redis L2); "
                            "longctx: sequence-parallel prefill vs workers, verify latency vs context; "
                            "ray: one stream's tokens/s in-process vs through the Ray worker actors; "
                            "rayserve: a verify worker's tokens/s through a Ray Serve deployment handle vs a direct "
                            "actor handle at rising stream counts; "
                            "fuzz: hostile and ordinary requests against a running server (--server), then "
                            "checks that it still serves with nothing left running; "
                            "kernels: decode and verify step time of every matmul/attention path vs the bandwidth "
                            "floor; "
                            "chaos: a soak of faults at random times on a multi-host cluster of network namespaces "
                            "(root), every fault's figures (tokens lost/duplicated/wrong, recovery, p99 latency)")
    bench.add_argument("--num-prompts", type=int, default=8,
                       help="prompts per category (HumanEval, ShareGPT); multiturn suite: traces of each kind")
    bench.add_argument("--methods", default=None,
                       help="spec, multiturn and ray suites: comma-separated spec methods to run beside speculation "
                            "off (default: spec and ray ngram,recycling,ngram+recycling; multiturn ngram,suffix,auto)")
    bench.add_argument("--turns", type=int, default=3, help="multiturn suite: requests per trace")
    flags.add_spec_tokens(bench)
    flags.add_draft_model(bench)
    bench.add_argument("--server", metavar="HOST:PORT", default=None,
                       help="serve suite: a running server (default: start one in this process)")
    bench.add_argument("--concurrency", default=None,
                       help="serve and rayserve suites: comma-separated stream counts (default 1,2,4,8,16 and 1,16)")
    bench.add_argument("--api", default="grpc",
                       help="serve suite: the front door to load: grpc, openai (the HTTP API), or grpc,openai "
                            "(both on the same server, side by side: HTTP's overhead)")
    bench.add_argument("--requests-per-level", type=int, default=None,
                       help="serve and rayserve suites: requests per concurrency level, side and round (at least "
                            "2x the concurrency for serve; default 8 and 16)")
    bench.add_argument("--rounds", type=int, default=None,
                       help="serve and rayserve suites: run each level's sides this many times, interleaved, and sum "
                            "them (drift on the machine then falls on every side alike; default 1 and 2)")
    bench.add_argument("--requests", type=int, default=10_000, help="fuzz suite: requests to send")
    bench.add_argument("--streams", type=int, default=8, help="fuzz suite: concurrent streams")
    bench.add_argument("--token", default=None, help="fuzz suite: the server's bearer token")
    bench.add_argument("--duration-min", type=float, default=20.0,
                       help="chaos suite: inject faults for this many minutes (the load ends after the last recovery)")
    bench.add_argument("--max-faults", type=int, default=None,
                       help="chaos suite: stop injecting after this many faults (default: only --duration-min)")
    bench.add_argument("--faults", default="",
                       help="chaos suite: comma-separated faults to draw from (default: all; see bench/chaos.py)")
    bench.add_argument("--mean-gap-s", type=float, default=30.0,
                       help="chaos suite: mean pause between one fault's recovery and the next fault")
    bench.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON results")
    bench.add_argument("--lengths", default="4096,8192,16384", help="longctx suite: prompt lengths to prefill")
    bench.add_argument("--prefill-workers-list", default="1,2,4", help="longctx suite: prefill group sizes")
    flags.add_sequence_parallel(bench)
    bench.add_argument("--layers", type=int, default=4, help="longctx suite: prefill with the model's first N layers")
    bench.add_argument("--skip-decode", action="store_true", help="longctx suite: prefill rows only")
    flags.add_model_args(bench)
    flags.add_max_new_tokens(bench)
    bench.add_argument("--seed", type=int, default=0, help="prompt selection seed")


def _ints(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise ValueError(f"{flag} must list integers separated by commas, got {text!r}") from None


def _apis(text: str):
    from specserve.bench.serve_load import Api

    names = [a for a in text.split(",") if a]
    known = [a.value for a in Api]
    bad = next((a for a in names if a not in known), None)
    if bad is not None:
        raise ValueError(f"--api must list {' and/or '.join(known)}, got {bad!r}")
    return tuple(Api(a) for a in names)


def _methods(text: str | None) -> dict:
    """The config keyword for --methods: nothing when the flag is not given (the suite's default)."""
    return {} if text is None else {"methods": tuple(m for m in text.split(",") if m)}


def run_bench(args: argparse.Namespace) -> int:
    """Builds the suite's config from the flags (each config validates its fields) and runs it;
    the exit status (fuzz: 1 when the server failed a check; chaos: 1 when a fault lost, duplicated or
    changed a token, failed a request uncleanly or did not recover)."""
    if args.suite == "fuzz":
        return _run_fuzz(args)
    if args.suite == "chaos":
        from specserve.bench.chaos import ChaosConfig, run_chaos_bench

        faults = tuple(f for f in args.faults.split(",") if f)
        result = run_chaos_bench(ChaosConfig(
            model=args.model, duration_s=args.duration_min * 60, max_faults=args.max_faults, faults=faults,
            mean_gap_s=args.mean_gap_s, max_tokens=args.max_new_tokens, seed=args.seed, out=args.out))
        return 0 if result.ok else 1
    if args.suite == "kernels":
        from specserve.bench.kernel_paths import KernelPathsConfig, run_kernel_paths_bench

        dtype = "float32" if args.dtype == "auto" else args.dtype
        run_kernel_paths_bench(KernelPathsConfig(model=args.model, dtype=dtype,
                                                 threads=args.threads or DEFAULT_BENCH_THREADS, out=args.out))
        return 0
    common = {"model": args.model, "num_prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens,
              "seed": args.seed, "out": args.out}
    threads = args.threads or DEFAULT_BENCH_THREADS
    if args.suite == "serve":
        from specserve.bench.serve_load import ServeBenchConfig, run_serve_bench

        run_serve_bench(ServeBenchConfig(**common, **_levels(args), server=args.server, load=flags.load_options(args),
                                         spec_tokens=args.spec_tokens, apis=_apis(args.api)))
    elif args.suite == "rayserve":
        from specserve.bench.serve_handles import RayServeBenchConfig, run_rayserve_bench

        run_rayserve_bench(RayServeBenchConfig(**common, **_levels(args), threads=threads, dtype=args.dtype,
                                               spec_tokens=args.spec_tokens))
    elif args.suite == "longctx":
        from specserve.bench.long_context import LongContextBenchConfig, run_longctx_bench
        from specserve.workers.model.sequence_parallel import SequenceParallelMode

        run_longctx_bench(LongContextBenchConfig(
            **common, lengths=_ints("--lengths", args.lengths),
            group_sizes=_ints("--prefill-workers-list", args.prefill_workers_list),
            mode=SequenceParallelMode(args.sequence_parallel), layers=args.layers, skip_decode=args.skip_decode,
            threads=threads))
    elif args.suite == "prefix":
        from specserve.bench.prefix_cache import PrefixBenchConfig, run_prefix_bench

        run_prefix_bench(PrefixBenchConfig(**common, load=flags.load_options(args, threads)))
    elif args.suite == "ray":
        from specserve.bench.ray_vs_inprocess import RayBenchConfig, run_ray_bench

        run_ray_bench(RayBenchConfig(**common, **_methods(args.methods), spec_tokens=args.spec_tokens,
                                     draft_model=args.draft_model, device=args.device, dtype=args.dtype,
                                     threads=threads))
    elif args.suite == "spec":
        from specserve.bench.spec_vs_hf import SpecBenchConfig, run_spec_bench

        run_spec_bench(SpecBenchConfig(**common, **_methods(args.methods), spec_tokens=args.spec_tokens,
                                       device=args.device, dtype=args.dtype, threads=threads))
    elif args.suite == "multiturn":
        from specserve.bench.multi_turn import MultiTurnBenchConfig, run_multi_turn_bench

        run_multi_turn_bench(MultiTurnBenchConfig(**common, **_methods(args.methods), turns=args.turns,
                                                  spec_tokens=args.spec_tokens, device=args.device,
                                                  dtype=args.dtype, threads=threads))
    else:
        from specserve.bench.engine_vs_hf import EngineBenchConfig, run_engine_bench

        run_engine_bench(EngineBenchConfig(**common, load=flags.load_options(args, threads)))
    return 0


def _levels(args: argparse.Namespace) -> dict:
    """The load-level flags given (the suite's defaults stand for the others)."""
    given = {"requests_per_level": args.requests_per_level, "rounds": args.rounds}
    if args.concurrency is not None:
        given["concurrency"] = _ints("--concurrency", args.concurrency)
    return {k: v for k, v in given.items() if v is not None}


def _run_fuzz(args: argparse.Namespace) -> int:
    from specserve.bench.fuzz import FuzzBenchConfig, format_report, run_fuzz

    if args.server is None:
        raise ValueError("bench fuzz needs --server HOST:PORT (a running `specserve serve`)")
    args.out.mkdir(parents=True, exist_ok=True)
    report = run_fuzz(FuzzBenchConfig(args.server, requests=args.requests, streams=args.streams, seed=args.seed,
                                      token=args.token, out=args.out / "fuzz.json"))
    print(format_report(report))
    return 0 if report.passed else 1
