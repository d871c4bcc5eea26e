"""`specserve bench multiturn`: speculation where earlier requests sit in the prompt.

A trace is a sequence of requests served in order; request k carries the whole chat so far:
- chat: a ShareGPT conversation continued: the first k+1 human turns of a real multi-turn
  conversation, each earlier one followed by the model's OWN reply to it;
- code: a code file edited repeatedly: request 0 asks for a HumanEval function to be completed,
  each later one for an edit of the whole code (EDIT_REQUESTS: no dataset holds edit requests
  for HumanEval, so this is the only text written here), the model's earlier code in the chat.
A reply is ours with speculation off, cut at its first end-of-sequence token (what a chat client
keeps), rendered with the model's chat template in the next request.

Contenders serve every request (greedy, exactly max_new_tokens tokens, end-of-sequence ignored):
transformers generate(), transformers prompt lookup, our engine with speculation off, the same
without its prefix cache, and each drafter of `methods`, each in its own engine. Their order
alternates per trace; a first warm-up trace is served by all and dropped.

Fairness, printed with the results: within a trace our engines use one cache salt, so request k
reuses the prefix-cached KV of request k-1's prompt and the suffix drafter's shared tree holds
request k-1's output: the reuse a server gives one conversation. transformers recomputes every
prompt. `none-no-prefix-cache` and the prefill share (time to first token / request time) show
what the cache contributes. Every output must equal ours with speculation off, token for token
(a mismatch is reported with its first differing position). Ratios are geometric means over
requests of per-request tokens/s ratios.
"""

import enum
import json
import statistics
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from specserve.scheduler.prompts import Prompt
from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine
from specserve.workers.engine.sequence import Sequence, SpecCounters
from specserve.workers.model.cpu_info import cpu_info
from specserve.workers.model.loader import LoadOptions, load_engine
from specserve.workers.spec.methods import SpecConfig

from specserve.bench.harness import first_difference, geomean, hf_model_like, run_hf, run_ours
from specserve.bench.prompt_sets import humaneval_prompts, sharegpt_multi_turn
from specserve.bench.spec_vs_hf import HF_GREEDY, HF_LOOKUP, OURS_NONE, SpecBenchConfig

OURS_NO_CACHE = "none-no-prefix-cache"
WARM_UP_TURNS = 2
KV_POOL_BYTES = 256 << 20  # one request at a time; the engine keeps at least one full context anyway
CODE_TASK = "Complete this Python code:\n\n```python\n{code}```"
EDIT_REQUESTS = (  # request k >= 1 of a code trace asks for EDIT_REQUESTS[(k - 1) % 4]
    "Add type hints and a short comment on each step, and show the complete code again.",
    "Rename the variables to say what they hold, and show the complete code again.",
    "Handle empty and invalid input, and show the complete code again.",
    "Add three doctest examples to the docstring, and show the complete code again.",
)


class TraceKind(enum.Enum):
    CODE = "code"  # a code file edited repeatedly
    CHAT = "chat"  # a conversation continued


@dataclass(frozen=True)
class Trace:
    """What the user says at each request of one trace; the model's replies come at run time."""

    kind: TraceKind
    trace_id: str  # the HumanEval task_id or ShareGPT conversation id it comes from
    user_turns: tuple[str, ...]

    def __post_init__(self):
        if not self.user_turns:
            raise ValueError(f"trace {self.trace_id!r} needs at least one user turn")

    def messages(self, replies: list[str]) -> tuple[dict, ...]:
        """Request len(replies): each earlier user turn followed by the model's reply to it, then
        the next user turn. # user_turns [u0, u1, u2], replies [r0, r1] -> [u0, r0, u1, r1, u2]"""
        if len(replies) >= len(self.user_turns):
            raise ValueError(f"trace {self.trace_id!r} has {len(self.user_turns)} requests, got {len(replies)} replies")
        chat = []
        for user, reply in zip(self.user_turns, replies):
            chat += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return (*chat, {"role": "user", "content": self.user_turns[len(replies)]})


@dataclass(frozen=True)
class TracePlan:
    warm_up: Trace  # served by every contender first; its numbers are dropped
    traces: tuple[Trace, ...]  # code and chat alternating


def code_trace(task_id: str, code: str, turns: int) -> Trace:
    edits = tuple(EDIT_REQUESTS[k % len(EDIT_REQUESTS)] for k in range(turns - 1))
    return Trace(TraceKind.CODE, task_id, (CODE_TASK.format(code=code), *edits))


def build_traces(n: int, turns: int, seed: int, sharegpt_path: Path | None = None,
                 humaneval_path: Path | None = None) -> TracePlan:
    """n code and n chat traces of `turns` requests each, picked with seed, plus a warm-up code
    trace (another HumanEval task, WARM_UP_TURNS requests)."""
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    warm, *tasks = humaneval_prompts(n + 1, seed, humaneval_path)
    code = [code_trace(p.prompt_id, p.text, turns) for p in tasks]
    conversations = sharegpt_multi_turn(n, turns, seed, path=sharegpt_path)
    chat = [Trace(TraceKind.CHAT, cid, humans) for cid, humans in conversations]
    interleaved = tuple(t for pair in zip(code, chat) for t in pair)
    return TracePlan(code_trace(warm.prompt_id, warm.text, min(turns, WARM_UP_TURNS)), interleaved)


def reply_text(tokenizer, output_ids: list[int], eos_token_ids) -> str:
    """What a chat client keeps of a reply: its tokens before the first end-of-sequence token."""
    end = next((i for i, t in enumerate(output_ids) if t in eos_token_ids), len(output_ids))
    return tokenizer.decode(output_ids[:end], skip_special_tokens=True)


@dataclass(frozen=True)
class MultiTurnBenchConfig(SpecBenchConfig):
    """num_prompts: traces of each kind (code, chat); turns: requests per trace."""

    methods: tuple[str, ...] = ("ngram", "suffix", "auto")  # beside speculation off, with and without the cache
    turns: int = 3

    def __post_init__(self):
        super().__post_init__()
        if self.turns < 1:
            raise ValueError(f"turns must be >= 1, got {self.turns}")


@dataclass(frozen=True)
class Reply:
    output_ids: list[int]
    seconds: float
    seq: Sequence | None = None  # ours: the engine's sequence (first-token time, cached tokens, spec counters)


@dataclass(frozen=True)
class Served:
    """One request of one trace, served by one contender."""

    contender: str
    kind: TraceKind
    trace_id: str
    turn: int  # 0: the trace's first request
    prompt_tokens: int
    tokens_per_s: float
    first_difference: int | None  # vs ours with speculation off; None: identical
    prefill_share: float | None  # ours: time to the first token / request time
    cached_tokens: int | None  # ours: prompt tokens whose KV the prefix cache gave
    spec: SpecCounters


class Contenders:
    """Every contender by name: transformers (keeps nothing between calls) and our engines (one
    per method, each with its own prefix cache and drafter state)."""

    def __init__(self, config: MultiTurnBenchConfig):
        methods = [m for m in config.methods if m != OURS_NONE]
        specs = {m: SpecConfig(m, config.spec_tokens) for m in [OURS_NONE, *methods]}
        last = list(specs)[-1]  # loaded with a drafter (if any) so the verify latency curve comes along
        engine_config = EngineConfig(kv_cache_bytes=KV_POOL_BYTES, spec=specs[last])
        loaded = load_engine(config.model, LoadOptions(device=config.device, dtype=config.dtype,
                                                       threads=config.threads, config=engine_config))
        base = loaded.engine
        self.tokenizer, self.eos_token_ids = base.tokenizer, base.eos_token_ids
        curve = base.speculator.curve if base.speculator else None

        def engine(spec: SpecConfig, prefix_caching: bool = True) -> LLMEngine:
            cfg = EngineConfig(kv_cache_bytes=KV_POOL_BYTES, spec=spec, prefix_caching=prefix_caching)
            return LLMEngine(base.model, self.tokenizer, cfg, base.eos_token_ids, latency_curve=curve)

        self.engines = {m: base if m == last else engine(s) for m, s in specs.items()}
        self.engines[OURS_NO_CACHE] = engine(specs[OURS_NONE], prefix_caching=False)
        self.hf = hf_model_like(loaded)
        self.names = [HF_GREEDY, HF_LOOKUP, OURS_NONE, OURS_NO_CACHE, *methods]
        self.dtype = base.model.dtype

    def serve(self, name: str, ids: list[int], n: int, cache_salt: str) -> Reply:
        if name in (HF_GREEDY, HF_LOOKUP):
            return Reply(*run_hf(self.hf, ids, n, lookup=name == HF_LOOKUP))
        return Reply(*run_ours(self.engines[name], ids, n, cache_salt))


def serve_trace(trace: Trace, contenders: Contenders, order: list[str], n: int) -> list[Served]:
    """Every request of the trace, each served by every contender in `order`."""
    salt = uuid.uuid4().hex  # one per trace: its requests share our cache and drafter state, no other trace's
    replies, served = [], []
    for turn in range(len(trace.user_turns)):
        ids = Prompt(messages=trace.messages(replies)).token_ids(contenders.tokenizer)
        got = {name: contenders.serve(name, ids, n, salt) for name in order}
        ref = got[OURS_NONE].output_ids
        for name, reply in got.items():
            seq = reply.seq
            served.append(Served(
                name, trace.kind, trace.trace_id, turn, len(ids), n / reply.seconds,
                first_difference(reply.output_ids, ref),
                prefill_share=None if seq is None else (seq.first_token_time - seq.arrival_time) / reply.seconds,
                cached_tokens=None if seq is None else seq.cached_tokens,
                spec=SpecCounters() if seq is None else seq.spec))
        replies.append(reply_text(contenders.tokenizer, ref, contenders.eos_token_ids))
    return served


def run_multi_turn_bench(config: MultiTurnBenchConfig) -> dict:
    plan = build_traces(config.num_prompts, config.turns, config.seed)
    contenders = Contenders(config)
    n = config.max_new_tokens
    print(f"CPU {cpu_info().describe()}; seed {config.seed}: {config.num_prompts} code + {config.num_prompts} chat "
          f"traces of {config.turns} requests, {n} new tokens, {torch.get_num_threads()} threads, {contenders.dtype}")
    print("our engines keep one cache salt per trace: a request reuses the prefix-cached KV of the previous "
          "request's prompt (a serving feature); transformers recomputes every prompt; "
          f"{OURS_NO_CACHE} is ours without the cache")
    print(f"warm-up: {plan.warm_up.trace_id}, {len(plan.warm_up.user_turns)} requests by every contender (dropped)")
    serve_trace(plan.warm_up, contenders, contenders.names, n)
    served = []
    for i, trace in enumerate(tqdm(plan.traces, desc="traces", unit="trace")):
        order = contenders.names if i % 2 == 0 else contenders.names[::-1]
        served += serve_trace(trace, contenders, order, n)
    report = {
        "cpu": cpu_info().model, "isa_flags": list(cpu_info().flags), "seed": config.seed,
        "traces_per_kind": config.num_prompts, "turns": config.turns, "max_new_tokens": n,
        "threads": torch.get_num_threads(), "dtype": str(contenders.dtype),
        "prefix_cache": "ours reuses earlier requests of the same trace (one cache salt per trace); "
                        f"transformers and {OURS_NO_CACHE} recompute every prompt",
        "traces": [{"kind": t.kind.value, "id": t.trace_id, "user_turns": list(t.user_turns)} for t in plan.traces],
        "contenders": summarize(served, contenders.names),
    }
    out = Path(config.out) / "multi_turn.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"results: {out}")
    return report


def summarize(served: list[Served], names: list[str]) -> dict[str, dict]:
    """Per contender: tokens/s and ratios (geometric means over requests), acceptance, the
    prefill share and what the prefix cache gave, mismatches. Prints the table."""
    by = {name: {(s.trace_id, s.turn): s for s in served if s.contender == name} for name in names}

    def ratio(name: str, base: str, keep: Callable[[Served], bool] = lambda s: True) -> float:
        return geomean([s.tokens_per_s / by[base][key].tokens_per_s for key, s in by[name].items() if keep(s)])

    rows = {}
    print(f"\n{'contender':22s} {'tok/s':>6s} {'x HF gen':>8s} {'code':>5s} {'chat':>5s} {'turn>1':>6s} "
          f"{'x HF PLD':>8s} {'x none':>6s} {'acc/step':>8s} {'prefill':>7s} {'cached':>6s} mismatches")
    for name in names:
        mine = list(by[name].values())
        spec = sum((s.spec for s in mine), SpecCounters())
        ours = [s for s in mine if s.prefill_share is not None]
        row = {
            "tokens_per_s_geomean": geomean([s.tokens_per_s for s in mine]),
            "vs_hf_generate": ratio(name, HF_GREEDY),
            "vs_hf_generate_code": ratio(name, HF_GREEDY, lambda s: s.kind is TraceKind.CODE),
            "vs_hf_generate_chat": ratio(name, HF_GREEDY, lambda s: s.kind is TraceKind.CHAT),
            "vs_hf_generate_later_turns": ratio(name, HF_GREEDY, lambda s: s.turn > 0),
            "vs_hf_prompt_lookup": ratio(name, HF_LOOKUP),
            "vs_ours_none": ratio(name, OURS_NONE),
            "mean_accepted_per_step": spec.accepted_tokens / spec.decode_steps if spec.decode_steps else None,
            "drafted_tokens": spec.drafted_tokens,
            "accepted_tokens": spec.accepted_tokens,
            "prefill_share_mean": statistics.fmean(s.prefill_share for s in ours) if ours else None,
            "cached_prompt_share": (sum(s.cached_tokens for s in ours) / sum(s.prompt_tokens for s in ours)
                                    if ours else None),
            "mismatches": [{"trace": s.trace_id, "turn": s.turn, "first_difference": s.first_difference}
                           for s in mine if s.first_difference is not None],
            "requests": [{"kind": s.kind.value, "trace": s.trace_id, "turn": s.turn, "prompt_tokens": s.prompt_tokens,
                          "tokens_per_s": s.tokens_per_s, "prefill_share": s.prefill_share,
                          "cached_tokens": s.cached_tokens} for s in mine],
        }
        rows[name] = row
        acc = f"{row['mean_accepted_per_step']:.2f}" if spec.decode_steps else "-"
        prefill = f"{row['prefill_share_mean']:.0%}" if ours else "-"
        cached = f"{row['cached_prompt_share']:.0%}" if ours else "-"
        print(f"{name:22s} {row['tokens_per_s_geomean']:6.1f} {row['vs_hf_generate']:8.2f} "
              f"{row['vs_hf_generate_code']:5.2f} {row['vs_hf_generate_chat']:5.2f} "
              f"{row['vs_hf_generate_later_turns']:6.2f} {row['vs_hf_prompt_lookup']:8.2f} {row['vs_ours_none']:6.2f} "
              f"{acc:>8s} {prefill:>7s} {cached:>6s} {len(row['mismatches'])}")
    return rows
