"""Real long prompts (4K-16K tokens) for long-context tests and benchmarks: whole ShareGPT
conversations, chosen with a seed and concatenated (BENCH.md, "Long context")."""

import random
from pathlib import Path

from specserve.bench.prompt_sets import SHAREGPT_FILE, iter_json_list, package_file

POOL = 2000  # conversations read from the start of the file to choose from


def sharegpt_conversations(pool: int = POOL, path: Path | None = None) -> list[str]:
    """The first `pool` complete ShareGPT conversations with at least two turns, each as text
    ("human: ...\\n\\ngpt: ...")."""
    texts = []
    for conv in iter_json_list(path or package_file(*SHAREGPT_FILE)):
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if not turns or len(turns) < 2:
            continue
        parts = [f"{t.get('from')}: {t.get('value')}" for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)]
        texts.append("\n\n".join(parts))
        if len(texts) == pool:
            break
    return texts


def long_prompt_ids(tokenizer, num_tokens: int, seed: int = 0, path: Path | None = None) -> list[int]:
    """Exactly num_tokens token ids: seeded-shuffled ShareGPT conversations joined until long
    enough, then cut."""
    conversations = sharegpt_conversations(path=path)
    random.Random(seed).shuffle(conversations)
    ids: list[int] = []
    for text in conversations:
        ids += tokenizer(text + "\n\n")["input_ids"]
        if len(ids) >= num_tokens:
            return ids[:num_tokens]
    raise ValueError(f"the first {len(conversations)} ShareGPT conversations hold only {len(ids)} tokens")
