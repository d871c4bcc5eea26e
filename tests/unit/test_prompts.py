"""Prompt files: one JSON object per line, {"prompt": ...} or {"messages": [...]}."""

import json

import pytest

from specserve.scheduler.prompts import Prompt, PromptError, parse_prompt_line, read_prompt_file

WHERE = "prompts.jsonl line 7"


def test_prompt_line():
    assert parse_prompt_line('{"prompt": "hello there"}', WHERE) == Prompt(text="hello there")


def test_messages_line():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt = parse_prompt_line(json.dumps({"messages": messages}), WHERE)
    assert prompt.text is None
    assert prompt.messages == tuple(messages)


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"prompt": "unterminated', "not valid JSON"),
        ("[1, 2]", "exactly one of 'prompt' or 'messages'"),
        ('{"other": 1}', "exactly one of 'prompt' or 'messages'"),
        ('{"prompt": "a", "messages": []}', "exactly one of 'prompt' or 'messages'"),
        ('{"prompt": ""}', "'prompt' must be a non-empty string"),
        ('{"prompt": 5}', "'prompt' must be a non-empty string"),
        ('{"messages": []}', "'messages' must be a non-empty list"),
        ('{"messages": "hi"}', "'messages' must be a non-empty list"),
        ('{"messages": ["hi"]}', r"messages\[0\] needs string 'role' and 'content'"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "user"}]}',
         r"messages\[1\] needs string 'role' and 'content'"),
        ('{"messages": [{"role": 1, "content": "a"}]}', r"messages\[0\] needs string 'role' and 'content'"),
    ],
)
def test_bad_lines_raise_naming_where(line, message):
    with pytest.raises(PromptError, match=message) as err:
        parse_prompt_line(line, WHERE)
    assert str(err.value).startswith(f"{WHERE}: ")


def test_prompt_needs_exactly_one_kind():
    with pytest.raises(PromptError, match="exactly one"):
        Prompt()
    with pytest.raises(PromptError, match="exactly one"):
        Prompt(text="a", messages=({"role": "user", "content": "b"},))


def test_read_prompt_file_skips_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "one"}\n\n   \n{"messages": [{"role": "user", "content": "two"}]}\n',
                    encoding="utf-8")
    prompts = read_prompt_file(path)
    assert prompts == [Prompt(text="one"), Prompt(messages=({"role": "user", "content": "two"},))]


def test_read_prompt_file_names_the_line_of_a_bad_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "one"}\n\n{"prompt": ""}\n', encoding="utf-8")
    with pytest.raises(PromptError, match=rf"^{path} line 3: 'prompt' must be a non-empty string$"):
        read_prompt_file(path)


def test_read_prompt_file_without_prompts_or_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(PromptError, match="has no prompts"):
        read_prompt_file(empty)
    with pytest.raises(PromptError, match="cannot read prompt file"):
        read_prompt_file(tmp_path / "missing.jsonl")
