"""SmolLM2-135M on a real 8K-token prompt (ShareGPT conversations): the engine prefilling it
alone (1 worker) and ring prefill groups of 2 and 3 local workers handing their K/V to the engine
give identical greedy tokens, and the groups' K/V agree."""

import time

import torch

from specserve.bench.long_prompts import long_prompt_ids
from specserve.cluster.prefill_group import LocalPrefillGroup
from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine
from specserve.workers.engine.sequence import SamplingParams
from specserve.workers.model.sequence_parallel import CheckpointModel, PrefillProgram, SequenceParallelMode

PROMPT_TOKENS = 8000  # + NEW_TOKENS within SmolLM2's 8192 positions
NEW_TOKENS = 16
SEED = 0
# fp32 over 30 layers and 8000 positions: 2 and 3 workers differ only in how the attention
# softmax is tiled and merged; observed max |dK|, |dV| ~1e-5 on values of magnitude ~10.
KV_ATOL, KV_RTOL = 1e-3, 1e-4


class CountingModel:
    """The model, counting the slots (tokens) its forwards compute."""

    def __init__(self, model):
        self._model, self.slots = model, 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def forward(self, batch, kv):
        self.slots += batch.num_slots
        return self._model.forward(batch, kv)


def greedy(base: LLMEngine, ids: list[int], prefix) -> tuple[list[int], int]:
    """NEW_TOKENS greedy tokens from a fresh engine on base's weights, and the slots it computed."""
    model = CountingModel(base.model)
    engine = LLMEngine(model, base.tokenizer, EngineConfig(kv_cache_bytes=64 << 20), base.eos_token_ids)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    tokens = [t for out in engine.generate(ids, params, prefix_kv=prefix) for t in out.new_token_ids]
    return tokens, model.slots


def test_greedy_tokens_identical_with_1_2_3_prefill_workers(smollm2):
    base = smollm2.engine
    ids = long_prompt_ids(base.tokenizer, PROMPT_TOKENS, SEED)
    torch.set_num_threads(2)
    start = time.perf_counter()
    reference, slots = greedy(base, ids, None)  # 1 worker: the engine's own (chunked) prefill
    print(f"1 worker (engine prefill) + decode: {time.perf_counter() - start:.1f} s")
    assert slots == PROMPT_TOKENS + NEW_TOKENS - 1 and len(reference) == NEW_TOKENS
    previous = None
    for workers in (2, 3):
        program = PrefillProgram(CheckpointModel("smollm2-135m"), SequenceParallelMode.RING, threads=1)
        with LocalPrefillGroup(program, workers, timeout_s=900) as group:
            start = time.perf_counter()
            prefix = group.run(ids)[0]
            print(f"{workers} prefill workers: {time.perf_counter() - start:.1f} s")
        assert prefix.start == 0 and prefix.num_tokens == PROMPT_TOKENS
        tokens, slots = greedy(base, ids, prefix)
        assert slots == 1 + NEW_TOKENS - 1  # the engine used the K/V: it re-ran only the last prompt token
        assert tokens == reference, (
            f"{workers} workers: first difference at {next(i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b)}")
        if previous is not None:
            torch.testing.assert_close(prefix.k, previous.k, atol=KV_ATOL, rtol=KV_RTOL)
            torch.testing.assert_close(prefix.v, previous.v, atol=KV_ATOL, rtol=KV_RTOL)
        previous = prefix
