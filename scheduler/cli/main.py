"""The `specserve` command line: the parser (flags from flags.py) and the subcommands' hand-off.
Builds configs by keyword and hands off; no logic here."""

import argparse
import os
import sys
from pathlib import Path

from specserve.scheduler.cli import flags
from specserve.scheduler.cli.bench import add_bench_parser, run_bench


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
    flags.add_spec_args(gen)
    flags.add_model_args(gen)
    flags.add_sampling_args(gen)
    flags.add_prefill_group_args(gen)

    about = "the gRPC server (by default the engines run in Ray worker actors; --no-ray: in this process)"
    serve = sub.add_parser("serve", help=about, description=about)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=50051, help="gRPC port (0: a free port)")
    serve.add_argument("--http-port", type=int, default=8000,
                       help="port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions; "
                            "0: a free port); same host, token and TLS as gRPC")
    serve.add_argument("--no-http", action="store_true", help="serve gRPC only (no OpenAI-compatible HTTP API)")
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
                       help="engine replicas, each with --kv-cache-gb of KV (Ray: VerifyWorker actors unless "
                            "--verify-replicas; --no-ray: engines in this process over the same weights); "
                            "requests are routed by prefix affinity and load")
    serve.add_argument("--metrics-port", type=int, default=9464, help="Prometheus /metrics port (0: a free port)")
    serve.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    serve.add_argument("--shutdown-grace-s", type=float, default=30.0,
                       help="on SIGTERM/SIGINT, how long requests in flight may finish before they are aborted")
    flags.add_ray_args(serve)
    flags.add_prefill_group_args(serve)
    flags.add_spec_args(serve)
    flags.add_model_args(serve)

    cache = sub.add_parser("cache", help="inspect or clear the shared prefix cache in Redis")
    cache.add_argument("action", choices=("stats", "clear"),
                       help="stats: blocks and bytes per model; clear: delete specserve's blocks (never FLUSHALL)")
    flags.add_redis(cache)
    cache.add_argument("--model-prefix", default=None,
                       help="clear: only the blocks of the model whose fingerprint starts with this (see stats)")

    add_bench_parser(sub)
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
    loaded = load_engine(args.model, flags.load_options(args))
    router = _long_prefill_router(args, loaded.engine)
    try:
        generate_all(loaded.engine, prompts, params, args.json, router.prefix_kv if router else None)
    finally:
        if router is not None:
            router.close()
    if loaded.engine.shared_cache is not None and not loaded.engine.shared_cache.flush():
        print("specserve: warning: some prefix cache writes did not finish", file=sys.stderr)


def _long_prefill_router(args, engine):
    """The local prefill group of --prefill-group-size (None when 1: off)."""
    from specserve.workers.model.sequence_parallel import SequenceParallelMode

    from specserve.scheduler.cli.long_prefill import LongPrefillConfig, LongPrefillRouter
    from specserve.scheduler.long_prompt import LongPromptPolicy

    config = LongPrefillConfig(args.prefill_group_size, SequenceParallelMode(args.sequence_parallel),
                               LongPromptPolicy(args.long_prompt_threshold))
    if not config.enabled:
        return None
    threads = max(1, (args.threads or 2) // config.workers)
    return LongPrefillRouter(config, engine, args.model, args.device, threads)


def _serve(args) -> None:
    from specserve.scheduler.cli.serve import ray_serve_options, serve, server_config

    serve(server_config(args), args.model, flags.load_options(args), ray_serve_options(args))


def _cache(args) -> None:
    from specserve.scheduler.cli.cache import cache_command

    if not args.redis:
        raise ValueError("give --redis URL (or set SPECSERVE_REDIS)")
    cache_command(args.action, args.redis, args.model_prefix)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from specserve.workers.model.model_source import ModelError

    from specserve.scheduler.prompts import PromptError

    try:
        status = {"generate": _generate, "serve": _serve, "bench": run_bench, "cache": _cache}[args.command](args)
    except (ModelError, PromptError, ValueError) as e:
        print(f"specserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
