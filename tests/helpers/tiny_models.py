"""Tiny random-weight Llama-family models built from a config, for unit tests."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from specserve.workers.model.llama import LlamaModel
from specserve.workers.model.model_config import ModelConfig

COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def tiny_hf(kind: str = "llama", seed: int = 0, **overrides):
    """A transformers model in eval mode, float32, random weights from `seed`."""
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(**{**COMMON, "tie_word_embeddings": True, **overrides})
        model = LlamaForCausalLM(config)
    elif kind == "qwen2":
        config = Qwen2Config(**{**COMMON, "tie_word_embeddings": False, **overrides})
        model = Qwen2ForCausalLM(config)
    elif kind == "mistral":
        config = MistralConfig(**{**COMMON, "tie_word_embeddings": False, **overrides})
        model = MistralForCausalLM(config)
    else:
        raise ValueError(kind)
    config.architectures = [type(model).__name__]
    return model.eval()


def ours_from_hf(hf_model, dtype=torch.float32) -> LlamaModel:
    return LlamaModel(ModelConfig.from_hf(hf_model.config), hf_model.state_dict(), dtype)


def tiny_tokenizer(vocab_size: int = 97):
    """A word-level tokenizer over words w0..w{n-1} ("w5 w7" <-> [5, 7]); id 0 is the eos token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w0", unk_token="w1")
