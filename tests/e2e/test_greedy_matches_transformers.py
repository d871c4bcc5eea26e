"""Greedy tokens of our engine equal transformers generate() for the real SmolLM2-135M."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from specserve.workers.engine.sequence import SamplingParams

NEW_TOKENS = 64


@pytest.fixture(scope="module")
def hf_model(smollm2):
    return AutoModelForCausalLM.from_pretrained(smollm2.source.folder, dtype=torch.float32, local_files_only=True).eval()


def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def test_greedy_tokens_equal_transformers_on_real_prompts(smollm2, hf_model, humaneval_prompts):
    engine, tokenizer = smollm2.engine, smollm2.engine.tokenizer
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France? Explain."}],
                                         add_generation_prompt=True, tokenize=False)
    prompts = [tokenizer(p)["input_ids"] for p in humaneval_prompts[:3]]
    prompts.append(tokenizer(chat, add_special_tokens=False)["input_ids"])
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in prompts]  # all four in one running batch
    while engine.has_unfinished():
        engine.step()
    for prompt, seq in zip(prompts, seqs):
        assert len(seq.output_ids) == NEW_TOKENS
        assert seq.output_ids == hf_greedy(hf_model, prompt, NEW_TOKENS)
