"""The tiny random-weight model saved as a Hugging Face folder (for code that loads models by
path: the loader, Ray workers, `specserve serve`), its engine config, and the greedy reference
every integration test compares against: the in-process engine with speculation off."""

from pathlib import Path

from specserve.workers.engine.llm_engine import EngineConfig
from specserve.workers.engine.sequence import SamplingParams
from specserve.workers.model.loader import LoadOptions, load_engine
from specserve.workers.spec.methods import SpecConfig

from tests.helpers.tiny_models import tiny_hf, tiny_tokenizer


def save_tiny_model(folder: Path, max_position_embeddings: int = 4096, seed: int = 0,
                    tokenizer_vocab: int = 97) -> str:
    """Writes the tiny Llama (weights from `seed`) and its word-level tokenizer; returns the folder."""
    tiny_hf("llama", seed=seed, initializer_range=0.3, max_position_embeddings=max_position_embeddings) \
        .save_pretrained(folder)
    tiny_tokenizer(tokenizer_vocab).save_pretrained(folder)
    return str(folder)


# A chat template the word-level tokenizer can render: "w1 <content> ... w2" (w2 starts the reply).
CHAT_TEMPLATE = "{% for m in messages %}w1 {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w2{% endif %}"


def save_tiny_chat_model(folder: Path) -> str:
    """save_tiny_model with CHAT_TEMPLATE on its tokenizer (for chat requests and ShareGPT prompts)."""
    from transformers import AutoTokenizer

    save_tiny_model(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_engine_config(spec: SpecConfig = SpecConfig("none"), kv_cache_bytes: int = 1 << 22) -> EngineConfig:
    return EngineConfig(block_size=4, kv_cache_bytes=kv_cache_bytes, spec=spec)


class GreedyReference:
    """reference(prompt, n): the first n greedy tokens of the in-process engine, speculation
    off, end-of-sequence ignored (remembered per prompt and n)."""

    def __init__(self, folder: str):
        self.engine = load_engine(folder, LoadOptions(config=tiny_engine_config(), progress=False)).engine
        self._cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def __call__(self, prompt: list[int], n: int) -> list[int]:
        key = (tuple(prompt), n)
        if key not in self._cache:
            params = SamplingParams(max_new_tokens=n, ignore_eos=True)
            self._cache[key] = [t for o in self.engine.generate(prompt, params) for t in o.new_token_ids]
        return self._cache[key]
