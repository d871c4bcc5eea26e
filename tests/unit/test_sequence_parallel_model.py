"""Sequence-parallel prefill of a tiny random Llama on 2 and 3 local ranks (ring and Ulysses)
gives the K/V of the single-process forward, and an engine handed that K/V generates the same
greedy tokens as one that computed the prompt itself."""

import pytest
import torch

from specserve.cluster.prefill_group import LocalPrefillGroup
from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine
from specserve.workers.engine.forward_batch import SequenceSlots, build_forward_batch
from specserve.workers.engine.kv_cache import BlockTable, KVCacheConfig, PagedKVCache
from specserve.workers.engine.sequence import SamplingParams
from specserve.workers.model.sequence_parallel import SequenceParallelMode

from tests.helpers.sp_programs import BothModesProgram, InMemoryModel
from tests.helpers.tiny_models import tiny_tokenizer

# 12 query heads over 6 K/V heads (GQA): Ulysses splits them over 2 or 3 ranks.
FACTORY = InMemoryModel.tiny(seed=0, hidden_size=96, num_attention_heads=12, num_key_value_heads=6,
                             initializer_range=0.3)
PROMPT_LEN = 50  # not divisible by 3 (nor by 2 * W chunks of the zigzag layout)
# fp32; the layers differ from the single-process forward only in attention summation order
# (tiled and merged softmax vs SDPA), which the later layers carry along (observed <= 3e-6).
ATOL, RTOL = 1e-4, 1e-4


def prompt() -> list[int]:
    return torch.randint(3, 97, (PROMPT_LEN,), generator=torch.Generator().manual_seed(7)).tolist()


def single_process_kv(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V [L, T, Hkv, D] the ordinary forward writes into a paged cache for the whole prompt."""
    cfg = model.config
    kv = PagedKVCache(KVCacheConfig(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_blocks=32, block_size=4))
    table = BlockTable()
    batch = build_forward_batch([SequenceSlots(table, ids, logits_rows=[len(ids) - 1])], kv, None)
    model.forward(batch, kv)
    slots = kv.slots(table, 0, len(ids))
    return kv.k[:, slots], kv.v[:, slots]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def group(request):
    with LocalPrefillGroup(BothModesProgram(FACTORY), request.param, timeout_s=60) as g:
        yield g


@pytest.mark.parametrize("mode", list(SequenceParallelMode), ids=lambda m: m.value)
def test_prefill_kv_matches_single_process_and_engine_tokens_match(group, mode):
    model, ids = FACTORY(), prompt()
    expected_k, expected_v = single_process_kv(model, ids)
    results = group.run((mode, ids))
    prefix = results[0]
    assert all(r is None for r in results[1:])  # only rank 0 returns the gathered K/V
    assert prefix.start == 0 and prefix.num_tokens == PROMPT_LEN
    torch.testing.assert_close(prefix.k, expected_k, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(prefix.v, expected_v, atol=ATOL, rtol=RTOL)

    engine = LLMEngine(model, tiny_tokenizer(), EngineConfig(block_size=4, kv_cache_bytes=1 << 20))
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    plain = [t for out in engine.generate(ids, params) for t in out.new_token_ids]
    fresh = LLMEngine(model, tiny_tokenizer(), EngineConfig(block_size=4, kv_cache_bytes=1 << 20))
    handed = [t for out in fresh.generate(ids, params, prefix_kv=prefix) for t in out.new_token_ids]
    assert handed == plain and len(plain) == 8
