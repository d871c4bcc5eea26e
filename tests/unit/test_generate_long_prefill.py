"""`specserve generate --prefill-group-size N --sequence-parallel M --long-prompt-threshold T`
(`--prefill-workers`, its old name, is used here: it stays an alias):
prompts over the threshold are prefilled by a local group and generate the same tokens."""

import json

import pytest
import torch

from specserve.cluster.prefill_group import MemberDiedError
from specserve.scheduler.cli import long_prefill
from specserve.scheduler.cli.main import main
from specserve.scheduler.long_prompt import LongPromptPolicy
from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine
from specserve.workers.model.sequence_parallel import SequenceParallelMode

from tests.helpers.tiny_folder import save_tiny_model
from tests.helpers.tiny_models import ours_from_hf, tiny_hf, tiny_tokenizer


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def model_folder(tmp_path) -> str:
    return save_tiny_model(tmp_path / "tiny", max_position_embeddings=256)  # 4 query heads, 2 K/V heads


def prompt_file(tmp_path) -> str:
    g = torch.Generator().manual_seed(5)
    words = lambda n: " ".join(f"w{i}" for i in torch.randint(3, 97, (n,), generator=g).tolist())
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": words(40)}) + "\n" + json.dumps({"prompt": words(6)}) + "\n")
    return str(path)


def generate(capsys, *args: str) -> list[list[int]]:
    assert main(["generate", *args, "--json", "--max-new-tokens", "8", "--ignore-eos", "--spec", "none",
                 "--block-size", "4", "--kv-cache-gb", "0.001", "--threads", "2"]) == 0
    return [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]


def test_long_prompt_goes_to_the_group_and_tokens_match(tmp_path, capsys, monkeypatch, model_folder):
    prompts = prompt_file(tmp_path)
    reference = generate(capsys, "--prompt-file", prompts, "--model", model_folder)
    sent = []
    original = long_prefill.LongPrefillRouter.prefix_kv

    def recording(self, ids, cache_salt=""):
        kv = original(self, ids, cache_salt)
        sent.append((len(ids), kv is not None and kv.num_tokens))
        return kv

    monkeypatch.setattr(long_prefill.LongPrefillRouter, "prefix_kv", recording)
    grouped = generate(capsys, "--prompt-file", prompts, "--model", model_folder, "--prefill-workers", "2",
                       "--sequence-parallel", "ulysses", "--long-prompt-threshold", "16")
    assert grouped == reference and all(len(t) == 8 for t in grouped)
    (long_len, long_kv), (short_len, short_kv) = sent
    assert long_len > 16 and long_kv == long_len  # over the threshold: the group gave all its K/V
    assert short_len <= 16 and short_kv is False  # under it: the engine prefilled it


def test_heads_that_do_not_split_are_a_clear_error(capsys, model_folder):
    code = main(["generate", "w5 w6", "--model", model_folder, "--prefill-workers", "3", "--sequence-parallel",
                 "ulysses", "--spec", "none", "--kv-cache-gb", "0.001"])
    assert code == 2 and "query heads (4)" in capsys.readouterr().err


class FailingGroup:
    """A prefill group whose members die twice in a row (what LocalPrefillGroup raises then)."""

    def start(self) -> None:
        pass

    def run(self, request):
        raise MemberDiedError("prefill group member(s) [1] died during request (exit codes [-9]); torn down")

    def close(self) -> None:
        pass


def test_a_failed_group_leaves_the_prompt_to_the_engine(capsys):
    engine = LLMEngine(ours_from_hf(tiny_hf()), tiny_tokenizer(), EngineConfig(block_size=4, kv_cache_bytes=1 << 20))
    config = long_prefill.LongPrefillConfig(2, SequenceParallelMode.RING, LongPromptPolicy(8))
    router = long_prefill.LongPrefillRouter(config, engine, "unused", group=FailingGroup())
    assert router.prefix_kv(list(range(3, 30))) is None  # the engine prefills it: no failed request
    assert router.failed == 1 and router.prefilled == 0
    assert "prefill group failed (prefill group member(s) [1] died" in capsys.readouterr().err
