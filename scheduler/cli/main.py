"""The `specserve` command line. Builds configs by keyword and hands off; no logic here."""

import argparse
import os
import sys
from pathlib import Path

def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded model name (smollm2-135m), a local Hugging Face folder, or a .gguf file")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and KV dtype (auto: float32 on CPU, bfloat16/float16 on GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="size of the paged KV pool in GiB")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    _add_cache_args(p)


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", metavar="URL", default=os.environ.get("SPECSERVE_REDIS"),
                   help="shared prefix cache: redis://[:password@]host:port/db or rediss:// (default: "
                        "$SPECSERVE_REDIS; none: each worker caches only its own prefixes)")
    p.add_argument("--cache-ttl-s", type=int, default=None,
                   help="with --redis: cached blocks expire after this many seconds (default: only LRU eviction)")
    p.add_argument("--no-prefix-cache", action="store_true", help="compute every prompt in full (no prefix reuse)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", default=None,
                   help="speculative decoding: none, recycling, ngram, model, or several joined by '+' "
                        "(ngram+recycling); default: model with --draft-model, else ngram (fastest measured)")
    p.add_argument("--draft-model", default=None,
                   help="the draft model of --spec model (a name, folder or .gguf sharing the target's tokenizer)")
    p.add_argument("--spec-template", default=None,
                   help="recycling tree template: token_recycling_2.2.2 (80 nodes, default), "
                        "token_recycling_32, token_recycling_16, or a JSON file")
    p.add_argument("--spec-tokens", type=int, default=0,
                   help="most draft tokens per sequence and step (0: sized per step from measured latency)")


def _add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (auto, or the head's host:port); default: start an embedded local Ray")
    p.add_argument("--no-ray", action="store_true", help="run the engine(s) in this process, without Ray workers")
    p.add_argument("--verify-replicas", type=int, default=None, help="VerifyWorker actors (default: --replicas)")
    p.add_argument("--prefill-replicas", type=int, default=1,
                   help="PrefillWorker actors (0: verify workers prefill every prompt themselves)")
    p.add_argument("--draft-replicas", type=int, default=1,
                   help="DraftWorker actors for --spec model (0: the draft model runs inside each verify worker)")
    for role, cpus in (("verify", 1.0), ("prefill", 0.5), ("draft", 0.5)):
        p.add_argument(f"--{role}-cpus", type=float, default=cpus, help=f"Ray CPUs each {role} actor takes")
        p.add_argument(f"--{role}-gpus", type=float, default=0.0, help=f"Ray GPUs each {role} actor takes")
    p.add_argument("--prefill-threshold", type=int, default=256,
                   help="prompts of at least this many tokens are prefilled by a PrefillWorker")
    p.add_argument("--prefill-group-size", type=int, default=1,
                   help="long prompts are prefilled sequence-parallel by a group of this many PrefillGroupWorker "
                        "actors (1: off)")
    p.add_argument("--sequence-parallel", choices=("ring", "ulysses"), default="ring",
                   help="attention across the prefill group: ring (any head count) or ulysses "
                        "(query heads must divide by --prefill-group-size)")
    p.add_argument("--long-prompt-threshold", type=int, default=4096,
                   help="prompts of at least this many tokens go to the prefill group (with --prefill-group-size > 1)")
    p.add_argument("--deployment-name", default="specserve",
                   help="worker actor names start with this (a restarted server finds its workers by name)")
    p.add_argument("--keep-workers", action="store_true",
                   help="on shutdown leave the worker actors running for the next server to find")


def _add_long_context_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill-workers", type=int, default=1,
                   help="long prompts are prefilled sequence-parallel by this many local worker processes "
                        "(1: off, the engine prefills every prompt)")
    p.add_argument("--sequence-parallel", choices=("ring", "ulysses"), default="ring",
                   help="attention across the prefill workers: ring (any head count) or ulysses "
                        "(query heads must divide by --prefill-workers)")
    p.add_argument("--long-prompt-threshold", type=int, default=4096,
                   help="prompts with more uncached tokens than this go to the prefill workers")


def _add_longctx_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", default="4096,8192,16384", help="longctx suite: prompt lengths to prefill")
    p.add_argument("--prefill-workers-list", default="1,2,4", help="longctx suite: prefill group sizes")
    p.add_argument("--sequence-parallel", choices=("ring", "ulysses"), default="ring", help="longctx suite")
    p.add_argument("--layers", type=int, default=4, help="longctx suite: prefill with the model's first N layers")
    p.add_argument("--skip-decode", action="store_true", help="longctx suite: prefill rows only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specserve", description="LLM serving with lossless speculative decoding")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate in-process (no Ray, no server)")
    gen.add_argument("prompt", nargs="?", help="prompt text (raw, or a user message with --chat)")
    gen.add_argument("--prompt-file", type=Path, help='JSONL: {"prompt": "..."} or {"messages": [...]} per line')
    gen.add_argument("--chat", action="store_true", help="send PROMPT as a user message through the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of streaming text")
    gen.add_argument("--server", metavar="HOST:PORT", default=None,
                     help="send the prompts to a running `specserve serve` instead of loading the model here")
    gen.add_argument("--token", default=os.environ.get("SPECSERVE_TOKEN"),
                     help="with --server: bearer token (default: $SPECSERVE_TOKEN)")
    gen.add_argument("--tls-ca", type=Path, default=None, help="with --server: CA certificate (PEM) to speak TLS")
    _add_spec_args(gen)
    _add_model_args(gen)
    _add_sampling_args(gen)
    _add_long_context_args(gen)

    serve = sub.add_parser("serve", help="the gRPC server (one machine: the engine runs in this process)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=50051, help="gRPC port (0: a free port)")
    serve.add_argument("--token", default=os.environ.get("SPECSERVE_TOKEN"),
                       help="bearer token every call must carry (default: $SPECSERVE_TOKEN); required beyond "
                            "loopback unless --allow-unauthenticated")
    serve.add_argument("--allow-unauthenticated", action="store_true",
                       help="listen beyond loopback without a token")
    serve.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain (with --tls-key: TLS only)")
    serve.add_argument("--tls-key", type=Path, default=None, help="PEM private key")
    serve.add_argument("--max-queued", type=int, default=64,
                       help="requests admitted beyond the running batch; more get RESOURCE_EXHAUSTED")
    serve.add_argument("--replicas", type=int, default=1,
                       help="engines in this process over the same weights (each with --kv-cache-gb of KV); "
                            "requests are routed by prefix affinity and load")
    serve.add_argument("--metrics-port", type=int, default=9464, help="Prometheus /metrics port (0: a free port)")
    serve.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    serve.add_argument("--shutdown-grace-s", type=float, default=30.0,
                       help="on SIGTERM/SIGINT, how long requests in flight may finish before they are aborted")
    _add_ray_args(serve)
    _add_spec_args(serve)
    _add_model_args(serve)

    cache = sub.add_parser("cache", help="inspect or clear the shared prefix cache in Redis")
    cache.add_argument("action", choices=("stats", "clear"),
                       help="stats: blocks and bytes per model; clear: delete specserve's blocks (never FLUSHALL)")
    cache.add_argument("--redis", metavar="URL", default=os.environ.get("SPECSERVE_REDIS"),
                       help="redis://[:password@]host:port/db (default: $SPECSERVE_REDIS)")
    cache.add_argument("--model-prefix", default=None,
                       help="clear: only the blocks of the model whose fingerprint starts with this (see stats)")

    bench = sub.add_parser("bench", help="benchmarks (ratios measured side by side, see BENCH.md)")
    bench.add_argument("suite", choices=("engine", "spec", "serve", "prefix", "longctx", "ray"),
                       help="engine: our engine vs transformers generate(); spec: every drafter vs transformers; "
                            "serve: gRPC server throughput and latency at rising concurrency; "
                            "prefix: TTFT of 2K/4K-token prompts cold vs prefix cache hits (L1, Redis L2); "
                            "longctx: sequence-parallel prefill vs workers, verify latency vs context; "
                            "ray: one stream's tokens/s in-process vs through the Ray worker actors")
    bench.add_argument("--num-prompts", type=int, default=8, help="prompts per category (HumanEval, ShareGPT)")
    bench.add_argument("--methods", default="ngram,recycling,ngram+recycling",
                       help="spec suite: comma-separated spec methods to run beside speculation off")
    bench.add_argument("--spec-tokens", type=int, default=0, help="spec suite: most draft tokens (0: latency-sized)")
    bench.add_argument("--draft-model", default=None,
                       help="ray suite: also run spec method model with this draft model (e.g. smollm2-135m)")
    bench.add_argument("--server", metavar="HOST:PORT", default=None,
                       help="serve suite: a running server (default: start one in this process)")
    bench.add_argument("--concurrency", default="1,2,4,8,16", help="serve suite: comma-separated stream counts")
    bench.add_argument("--requests-per-level", type=int, default=8,
                       help="serve suite: requests per concurrency level (at least 2x the concurrency)")
    bench.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON results")
    _add_longctx_bench_args(bench)
    _add_model_args(bench)
    bench.add_argument("--max-new-tokens", type=int, default=128)
    bench.add_argument("--seed", type=int, default=0, help="prompt selection seed")
    return parser


def _generate(args) -> None:
    from specserve.workers.model.loader import load_engine
    from specserve.workers.engine.sequence import SamplingParams

    from specserve.scheduler.cli.generate import generate_all
    from specserve.scheduler.prompts import Prompt, read_prompt_file

    if (args.prompt is None) == (args.prompt_file is None):
        raise ValueError("give a PROMPT or --prompt-file (exactly one)")
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
    )
    if args.prompt_file is not None:
        prompts = read_prompt_file(args.prompt_file)
    elif args.chat:
        prompts = [Prompt(messages=({"role": "user", "content": args.prompt},))]
    else:
        prompts = [Prompt(text=args.prompt)]
    if args.server:
        from specserve.scheduler.cli.remote_generate import generate_all_remote

        generate_all_remote(args.server, prompts, params, args.spec, args.json, token=args.token, tls_ca=args.tls_ca)
        return
    loaded = load_engine(args.model, **engine_options(args))
    router = _long_prefill_router(args, loaded.engine)
    try:
        generate_all(loaded.engine, prompts, params, args.json, router.prefix_kv if router else None)
    finally:
        if router is not None:
            router.close()
    if loaded.engine.shared_cache is not None and not loaded.engine.shared_cache.flush():
        print("specserve: warning: some prefix cache writes did not finish", file=sys.stderr)


def _long_prefill_router(args, engine):
    """The local prefill group of --prefill-workers (None when 1: off)."""
    from specserve.workers.model.sequence_parallel import SequenceParallelMode

    from specserve.scheduler.cli.long_prefill import LongPrefillConfig, LongPrefillRouter

    config = LongPrefillConfig(args.prefill_workers, SequenceParallelMode(args.sequence_parallel),
                               args.long_prompt_threshold)
    if not config.enabled:
        return None
    threads = max(1, (args.threads or 2) // config.workers)
    return LongPrefillRouter(config, engine, args.model, args.device, threads)


def _serve(args) -> None:
    from specserve.scheduler.cli.serve import serve, server_config

    from specserve.scheduler.ray.start import ray_serve_options

    serve(server_config(args), args.model, engine_options(args), ray_serve_options(args))


def engine_options(args) -> dict:
    """load_engine keywords from the model arguments."""
    from specserve.workers.engine.llm_engine import EngineConfig
    from specserve.workers.spec.methods import SpecConfig, default_method
    from specserve.workers.spec.recycling import DEFAULT_TEMPLATE

    if args.kv_cache_gb <= 0:
        raise ValueError(f"--kv-cache-gb must be > 0, got {args.kv_cache_gb}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    draft_model = getattr(args, "draft_model", None)
    method = getattr(args, "spec", "none") or default_method(draft_model)
    template = getattr(args, "spec_template", None) or DEFAULT_TEMPLATE
    spec = SpecConfig(method, getattr(args, "spec_tokens", 0), draft_model, template)
    if args.cache_ttl_s is not None and args.cache_ttl_s < 1:
        raise ValueError(f"--cache-ttl-s must be >= 1, got {args.cache_ttl_s}")
    config = EngineConfig(block_size=args.block_size, kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)), spec=spec,
                          prefix_caching=not args.no_prefix_cache)
    return {"device": args.device, "dtype": args.dtype, "threads": args.threads, "config": config,
            "redis_url": None if args.no_prefix_cache else args.redis, "cache_ttl_s": args.cache_ttl_s}


def _cache(args) -> None:
    from specserve.scheduler.cli.cache import cache_command

    if not args.redis:
        raise ValueError("give --redis URL (or set SPECSERVE_REDIS)")
    cache_command(args.action, args.redis, args.model_prefix)


def _bench(args) -> None:
    if args.num_prompts < 1 or args.max_new_tokens < 1:
        raise ValueError("--num-prompts and --max-new-tokens must be >= 1")
    if args.suite == "serve":
        from specserve.bench.serve_load import run_serve_bench

        run_serve_bench(args)
    elif args.suite == "longctx":
        from specserve.bench.long_context import run_longctx_bench

        run_longctx_bench(args)
    elif args.suite == "prefix":
        from specserve.bench.prefix_cache import run_prefix_bench

        run_prefix_bench(args, engine_options(args))
    elif args.suite == "ray":
        from specserve.bench.ray_vs_inprocess import run_ray_bench

        run_ray_bench(args)
    elif args.suite == "spec":
        from specserve.bench.spec_vs_hf import run_spec_bench

        run_spec_bench(args)
    else:
        from specserve.bench.engine_vs_hf import run_engine_bench

        run_engine_bench(args)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from specserve.workers.model.model_source import ModelError

    from specserve.scheduler.prompts import PromptError

    try:
        {"generate": _generate, "serve": _serve, "bench": _bench, "cache": _cache}[args.command](args)
    except (ModelError, PromptError, ValueError) as e:
        print(f"specserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
