"""Every command-line flag of `specserve`, each defined once, and the configs built from them.

Subcommands share a flag by calling the same `add_*` function, so a flag has one name, one
default and one meaning everywhere. Old names stay as aliases (`--prefill-workers` for
`--prefill-group-size`). The builders at the end turn parsed flags into the typed configs the
rest of the code takes (LoadOptions, LongPromptPolicy), naming the flag in every error.
"""

import argparse
import os

from specserve.scheduler.long_prompt import DEFAULT_LONG_PROMPT_THRESHOLD
from specserve.workers.model.kernel_choice import KERNEL_MODES


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded model name (smollm2-135m), a local Hugging Face folder, or a .gguf file")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and KV dtype (auto: float32 on CPU, bfloat16/float16 on GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--kernels", default="auto", choices=KERNEL_MODES,
                   help="matmul paths: auto (timed on this machine at first start, cached per CPU, ISA, threads, "
                        "dtype and model shapes) or one forced everywhere")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="size of the paged KV pool in GiB")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    add_redis(p)
    p.add_argument("--cache-ttl-s", type=int, default=None,
                   help="with --redis: cached blocks expire after this many seconds (default: only LRU eviction)")
    p.add_argument("--no-prefix-cache", action="store_true", help="compute every prompt in full (no prefix reuse)")


def add_redis(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", metavar="URL", default=os.environ.get("SPECSERVE_REDIS"),
                   help="the shared prefix cache: redis://[:password@]host:port/db or rediss:// (default: "
                        "$SPECSERVE_REDIS; none: each worker caches only its own prefixes)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    add_max_new_tokens(p)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def add_max_new_tokens(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate per prompt")


def add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", default=None,
                   help="speculative decoding: none, recycling, ngram, model, or several joined by '+' "
                        "(ngram+recycling); default: model with --draft-model, else ngram (fastest measured)")
    add_draft_model(p)
    p.add_argument("--spec-template", default=None,
                   help="recycling tree template: token_recycling_2.2.2 (80 nodes, default), "
                        "token_recycling_32, token_recycling_16, or a JSON file")
    add_spec_tokens(p)
    p.add_argument("--spec-gate", choices=("on", "off"), default="on",
                   help="on: stop drafting where it measurably does not pay (per batch size); "
                        "off: draft on every decode step whatever it measures")


def add_draft_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft-model", default=None,
                   help="the draft model of spec method model (a name, folder or .gguf sharing the target's tokenizer)")


def add_spec_tokens(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec-tokens", type=int, default=0,
                   help="most draft tokens per sequence and step (0: sized per step from measured latency)")


def add_prefill_group_args(p: argparse.ArgumentParser) -> None:
    """Sequence-parallel prefill of long prompts: local worker processes under `generate`,
    PrefillGroupWorker actors under `serve`; the same flags and the same rule (LongPromptPolicy)."""
    p.add_argument("--prefill-group-size", "--prefill-workers", dest="prefill_group_size", type=int, default=1,
                   help="long prompts are prefilled sequence-parallel by a group of this many workers "
                        "(generate: local processes; serve: PrefillGroupWorker actors; 1: off)")
    add_sequence_parallel(p)
    p.add_argument("--long-prompt-threshold", type=int, default=DEFAULT_LONG_PROMPT_THRESHOLD,
                   help="prompts with more than this many tokens not already cached go to the prefill group "
                        "(serve over Ray cannot see a worker's cache: every prompt token counts)")


def add_sequence_parallel(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sequence-parallel", choices=("ring", "ulysses"), default="ring",
                   help="attention across a prefill group: ring (any head count) or ulysses "
                        "(query heads must divide by the group size)")


def add_ray_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--deployment-name", default="specserve",
                   help="worker actor names start with this (a restarted server finds its workers by name)")
    p.add_argument("--keep-workers", action="store_true",
                   help="on shutdown leave the worker actors running for the next server to find")
    p.add_argument("--worker-ready-timeout", type=float, default=900.0, metavar="S",
                   help="seconds the worker actors may take to start (model load; with --address also "
                        "waiting for a node that offers their role to join) before the server gives up")


def load_options(args: argparse.Namespace, threads: int | None = None):
    """LoadOptions from the model flags, and the spec flags where the subcommand has them
    (speculation off where it has not). threads: used when --threads is not given."""
    from specserve.workers.engine.llm_engine import EngineConfig
    from specserve.workers.model.loader import LoadOptions
    from specserve.workers.spec.methods import SpecConfig, default_method
    from specserve.workers.spec.recycling import DEFAULT_TEMPLATE

    if args.kv_cache_gb <= 0:
        raise ValueError(f"--kv-cache-gb must be > 0, got {args.kv_cache_gb}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.cache_ttl_s is not None and args.cache_ttl_s < 1:
        raise ValueError(f"--cache-ttl-s must be >= 1, got {args.cache_ttl_s}")
    spec = SpecConfig()
    if hasattr(args, "spec"):
        spec = SpecConfig(args.spec or default_method(args.draft_model), args.spec_tokens, args.draft_model,
                          args.spec_template or DEFAULT_TEMPLATE, gate=args.spec_gate == "on")
    config = EngineConfig(block_size=args.block_size, kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)), spec=spec,
                          prefix_caching=not args.no_prefix_cache)
    return LoadOptions(device=args.device, dtype=args.dtype, threads=args.threads or threads, config=config,
                       kernels=args.kernels, redis_url=None if args.no_prefix_cache else args.redis, cache_ttl_s=args.cache_ttl_s)

