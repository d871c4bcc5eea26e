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
    _add_spec_args(serve)
    _add_model_args(serve)

    bench = sub.add_parser("bench", help="benchmarks (ratios measured side by side, see BENCH.md)")
    bench.add_argument("suite", choices=("engine", "spec", "serve"),
                       help="engine: our engine vs transformers generate(); spec: every drafter vs transformers; "
                            "serve: gRPC server throughput and latency at rising concurrency")
    bench.add_argument("--num-prompts", type=int, default=8, help="prompts per category (HumanEval, ShareGPT)")
    bench.add_argument("--methods", default="ngram,recycling,ngram+recycling",
                       help="spec suite: comma-separated spec methods to run beside speculation off")
    bench.add_argument("--spec-tokens", type=int, default=0, help="spec suite: most draft tokens (0: latency-sized)")
    bench.add_argument("--server", metavar="HOST:PORT", default=None,
                       help="serve suite: a running server (default: start one in this process)")
    bench.add_argument("--concurrency", default="1,2,4,8,16", help="serve suite: comma-separated stream counts")
    bench.add_argument("--requests-per-level", type=int, default=8,
                       help="serve suite: requests per concurrency level (at least 2x the concurrency)")
    bench.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON results")
    _add_model_args(bench)
    bench.add_argument("--max-new-tokens", type=int, default=128)
    bench.add_argument("--seed", type=int, default=0, help="prompt selection seed")
    return parser


def _generate(args) -> None:
    from specserve.workers.loader import load_engine
    from specserve.workers.sequence import SamplingParams

    from .generate_cmd import generate_all
    from .prompts import Prompt, read_prompt_file

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
        from .remote_generate import generate_all_remote

        generate_all_remote(args.server, prompts, params, args.spec, args.json, token=args.token, tls_ca=args.tls_ca)
        return
    loaded = load_engine(args.model, **engine_options(args))
    generate_all(loaded.engine, prompts, params, args.json)


def _serve(args) -> None:
    from .serve_cmd import serve, server_config

    serve(server_config(args), args.model, engine_options(args))


def engine_options(args) -> dict:
    """load_engine keywords from the model arguments."""
    from specserve.workers.engine import EngineConfig
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
    config = EngineConfig(block_size=args.block_size, kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)), spec=spec)
    return {"device": args.device, "dtype": args.dtype, "threads": args.threads, "config": config}


def _bench(args) -> None:
    if args.num_prompts < 1 or args.max_new_tokens < 1:
        raise ValueError("--num-prompts and --max-new-tokens must be >= 1")
    if args.suite == "serve":
        from specserve.bench.serve_load import run_serve_bench

        run_serve_bench(args)
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
    from specserve.workers.model_source import ModelError

    from .prompts import PromptError

    try:
        {"generate": _generate, "serve": _serve, "bench": _bench}[args.command](args)
    except (ModelError, PromptError, ValueError) as e:
        print(f"specserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
