"""The embedded SmolLM2-135M-Instruct GGUF: converted once, found again, same logits as transformers' GGUF load."""

import hashlib
import subprocess
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from specserve.workers.model import model_source
from specserve.workers.model.model_source import load_config, load_state_dict, load_tokenizer, resolve_model

pytestmark = pytest.mark.e2e

NAME = "smollm2-135m"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("specserve-cache")


@pytest.fixture(scope="module")
def source(cache_dir):
    """The first resolve: converts the GGUF (some seconds)."""
    return resolve_model(NAME, cache_dir=cache_dir, progress=False)


@pytest.fixture(scope="module")
def gguf_path():
    return model_source._embedded_gguf(NAME)


@pytest.fixture(scope="module")
def prompt_ids(gguf_path):
    """The prompt tokenized by transformers' tokenizer built straight from the GGUF."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    return tokenizer(PROMPT, return_tensors="pt").input_ids  # [1, num_tokens]


@pytest.fixture(scope="module")
def gguf_logits(gguf_path, prompt_ids):
    """Reference: transformers loading the GGUF itself."""
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
                                                 local_files_only=True).eval()
    with torch.no_grad():
        return model(prompt_ids).logits  # [1, num_tokens, vocab]


def test_folder_has_config_weights_and_tokenizer(source):
    names = {p.name for p in source.folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert source.name == NAME


def test_second_resolve_is_a_cache_hit(source, cache_dir, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr(model_source, "_convert_gguf", must_not_run)
    monkeypatch.setattr(model_source, "hashlib", types.SimpleNamespace(sha256=must_not_run))  # no rehash of 98 MB
    assert resolve_model(NAME, cache_dir=cache_dir) == source


def test_fingerprint_is_the_files_sha256_in_any_process(source, cache_dir, gguf_path):
    assert source.fingerprint == hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    code = (f"from pathlib import Path; from specserve.workers.model.model_source import resolve_model; "
            f"print(resolve_model({NAME!r}, cache_dir=Path({str(cache_dir)!r})).fingerprint)")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == source.fingerprint


def test_config_is_a_tied_llama(source):
    config = load_config(source)
    assert config.architectures[0] == "LlamaForCausalLM"
    assert config.tie_word_embeddings
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)


def test_tokenizer_has_a_chat_template(source, prompt_ids):
    tokenizer = load_tokenizer(source)
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer(PROMPT, return_tensors="pt").input_ids.tolist() == prompt_ids.tolist()


def test_our_state_dict_gives_the_gguf_logits(source, prompt_ids, gguf_logits):
    state = load_state_dict(source)
    assert "lm_head.weight" not in state  # tied: the output projection is model.embed_tokens.weight
    model = LlamaForCausalLM(load_config(source)).eval()
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = model(prompt_ids).logits
    torch.testing.assert_close(logits, gguf_logits, atol=1e-4, rtol=0)


def test_transformers_reads_the_folder_to_the_gguf_logits(source, prompt_ids, gguf_logits):
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        logits = model(prompt_ids).logits
    torch.testing.assert_close(logits, gguf_logits, atol=1e-4, rtol=0)
