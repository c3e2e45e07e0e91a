from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

# Offline by design: nothing may load from the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A small text corpus written by the test (from pydoc's topics: on every machine)."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:10]))
    return path
