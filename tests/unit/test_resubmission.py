"""A request resubmitted with its prompt + delivered output (what the Ray scheduler does after a
lost verify worker) goes on exactly as the one run would have: the same sampled tokens from the
same per-position random streams, the same text, and a stop string spanning the resubmission
point still ends it."""

import pytest

from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine
from specserve.workers.engine.sequence import Resumed, SamplingParams, Sequence, stream_seed
from specserve.workers.spec.methods import SpecConfig

from tests.helpers.tiny_models import ours_from_hf, tiny_hf, tiny_tokenizer

PROMPT = [5, 7, 9, 11, 3, 5, 7, 9, 11, 3, 5, 7]
SAMPLED = SamplingParams(max_new_tokens=40, temperature=1.0, seed=7, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf("llama", initializer_range=0.3))


def new_engine(model, spec: SpecConfig) -> LLMEngine:
    draft = model if "model" in spec.method else None
    return LLMEngine(model, tiny_tokenizer(), EngineConfig(block_size=4, kv_cache_bytes=1 << 20, spec=spec),
                     eos_token_ids=(), draft_model=draft)


def steps_of(engine: LLMEngine, prompt: list[int], params: SamplingParams, resumed: Resumed | None = None):
    """[(tokens, text)] per step of one request."""
    seq = engine.add_request(prompt, params, resumed=resumed)
    steps = []
    while not seq.is_finished:
        steps += [(out.new_token_ids, out.new_text) for out in engine.step() if out.seq is seq]
    return steps


def resumed_at(engine: LLMEngine, steps, k: int, params: SamplingParams):
    """The rest of the request resubmitted after its first k steps were delivered."""
    tokens = [t for ts, _ in steps[:k] for t in ts]
    text = "".join(s for _, s in steps[:k])
    rest = SamplingParams(**{**params.__dict__, "max_new_tokens": params.max_new_tokens - len(tokens)})
    return tokens, text, steps_of(engine, PROMPT + tokens, rest, Resumed(len(tokens), len(text)))


SPECS = [SpecConfig("none"), SpecConfig("ngram", 4), SpecConfig("model", 6, draft_model="self")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.method)
def test_a_resubmitted_sampled_request_samples_what_the_one_run_did(model, spec):
    engine = new_engine(model, spec)
    steps = steps_of(engine, PROMPT, SAMPLED)
    whole = [t for ts, _ in steps for t in ts]
    assert len(steps) > 6
    for k in (1, 3, len(steps) // 2, len(steps) - 1):
        tokens, _, rest = resumed_at(new_engine(model, spec), steps, k, SAMPLED)
        assert tokens + [t for ts, _ in rest for t in ts] == whole, k


def test_different_seeds_sample_differently_and_streams_do_not_repeat(model):
    engine = new_engine(model, SpecConfig("none"))
    outputs = {tuple(t for ts, _ in steps_of(engine, PROMPT, SamplingParams(**{**SAMPLED.__dict__, "seed": s}))
                     for t in ts) for s in range(4)}
    assert len(outputs) == 4
    # adjacent (seed, position) pairs never share a stream: seed s at n + 1 is not seed s + 1 at n
    assert len({stream_seed(s, n) for s in range(50) for n in range(50)}) == 2500


def test_noise_is_a_function_of_seed_and_position_only():
    params = SamplingParams(temperature=1.0)
    assert Sequence([1], params).stream_base != Sequence([1], params).stream_base  # unseeded: its own
    a, b = Sequence([1], SamplingParams(temperature=1.0, seed=3)), Sequence([4, 5, 6], SamplingParams(temperature=0.5, seed=3))
    assert a.stream_base == 3 and a.noise(9, 50).equal(b.noise(9, 50)) and not a.noise(9, 50).equal(a.noise(10, 50))
    assert (a.noise(9, 50) > 0).all()
    with pytest.raises(ValueError, match="greedy"):
        Sequence([1], SamplingParams()).noise(1, 50)


@pytest.mark.parametrize("spec", SPECS[:2], ids=lambda s: s.method)
def test_text_and_stop_strings_continue_across_the_resubmission_point(model, spec):
    engine = new_engine(model, spec)
    greedy = SamplingParams(max_new_tokens=40, ignore_eos=True)
    steps = steps_of(engine, PROMPT, greedy)
    whole = "".join(s for _, s in steps)
    words = whole.split()
    stop = f"{words[8]} {words[9]}"  # spans two tokens, so some resubmission point falls inside it
    params = SamplingParams(**{**greedy.__dict__, "stop": (stop,)})
    stopped = steps_of(engine, PROMPT, params)
    expected = "".join(s for _, s in stopped)
    assert stop not in expected and whole.startswith(expected)
    for k in range(1, len(stopped)):
        _, text, rest = resumed_at(new_engine(model, spec), stopped, k, params)
        assert text + "".join(s for _, s in rest) == expected, k


def test_resumed_must_leave_some_prompt(model):
    engine = new_engine(model, SpecConfig("none"))
    with pytest.raises(ValueError, match="resumed.tokens"):
        engine.add_request([1, 2], SamplingParams(), resumed=Resumed(2, 0))
    with pytest.raises(ValueError, match="resumed tokens must be >= 1"):
        Resumed(0, 0)
