"""Prompts as users give them: raw text or chat messages, one per line of a JSONL file."""

import json
from dataclasses import dataclass
from pathlib import Path


class PromptError(ValueError):
    """A prompt could not be read; str() names where."""


@dataclass(frozen=True)
class Prompt:
    text: str | None = None  # raw text, tokenized as-is
    messages: tuple[dict, ...] | None = None  # chat messages, rendered with the model's chat template

    def __post_init__(self):
        if (self.text is None) == (self.messages is None):
            raise PromptError("a prompt has exactly one of 'prompt' or 'messages'")

    def token_ids(self, tokenizer) -> list[int]:
        if self.text is not None:
            return list(tokenizer(self.text)["input_ids"])
        if not getattr(tokenizer, "chat_template", None):
            raise PromptError("the model's tokenizer has no chat template; use 'prompt' instead of 'messages'")
        rendered = tokenizer.apply_chat_template(list(self.messages), add_generation_prompt=True, tokenize=False)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def parse_prompt_line(line: str, where: str) -> Prompt:
    """One JSONL line: {"prompt": "..."} or {"messages": [{"role": ..., "content": ...}, ...]}."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise PromptError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(item, dict) or ("prompt" in item) == ("messages" in item):
        raise PromptError(f"{where}: expected an object with exactly one of 'prompt' or 'messages'")
    if "prompt" in item:
        if not isinstance(item["prompt"], str) or not item["prompt"]:
            raise PromptError(f"{where}: 'prompt' must be a non-empty string")
        return Prompt(text=item["prompt"])
    messages = item["messages"]
    if not isinstance(messages, list) or not messages:
        raise PromptError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PromptError(f"{where}: messages[{i}] needs string 'role' and 'content'")
    return Prompt(messages=tuple(messages))


def read_prompt_file(path: Path) -> list[Prompt]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"cannot read prompt file {path}: {e}") from None
    prompts = [parse_prompt_line(line, f"{path} line {n}") for n, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise PromptError(f"prompt file {path} has no prompts")
    return prompts
