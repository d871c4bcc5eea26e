"""Suite-wide test setup.

- Each test gets the marker of the folder it lives in (tests/unit -> ``unit``,
  tests/integration -> ``integration``, tests/e2e -> ``e2e``) unless it already
  carries one of them, so ``-m "unit or integration or e2e"`` selects every test.
- Hugging Face libraries run offline: there is no hub to reach on dev or CI machines.
- Torch uses at most 2 threads (the machines have 2 cores).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports transformers / huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TESTS_DIR = Path(__file__).resolve().parent
FOLDER_MARKERS = ("unit", "integration", "e2e")  # folder name == marker name


def pytest_sessionstart(session: pytest.Session) -> None:
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(m) for m in FOLDER_MARKERS):
            continue
        try:
            folder = item.path.resolve().relative_to(TESTS_DIR).parts[0]
        except (ValueError, IndexError):
            continue
        if folder in FOLDER_MARKERS:
            item.add_marker(getattr(pytest.mark, folder))
