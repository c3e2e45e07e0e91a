from __future__ import annotations

import math

import pytest
import torch

from orchestrator.spec import DatasetEntry
from tasks.evaluate.perplexity import TokenPerplexity, token_stream, windows


def test_windows_non_overlapping_and_strided():
    assert windows(10, 4, 4, None) == [(0, 4, 1), (4, 8, 1)]
    assert windows(10, 4, 4, 1) == [(0, 4, 1)]
    # stride 2: the second window starts at 2 and scores only tokens 4..5 (positions 2, 3)
    assert windows(8, 4, 2, None) == [(0, 4, 1), (2, 6, 2), (4, 8, 2)]


def entry(path, **settings):
    base = {"seq_len": 32, "stride": None, "batch_size": 3, "text_field": "text", "split": "test"}
    return DatasetEntry(name="t", task="perplexity", path=str(path), limit=5, settings=base | settings)


def test_matches_the_models_own_loss(tiny_llama, text_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    task = TokenPerplexity()
    result = task.evaluate(model, tokenizer, task.prepare(entry(text_file), tokenizer))
    ids = token_stream(tokenizer, [text_file.read_text()], None)
    losses = []
    with torch.no_grad():
        for i in range(5):  # non-overlapping windows of 32: HF's mean loss over 31 targets each
            window = torch.tensor([ids[i * 32:(i + 1) * 32]])
            losses.append(model(window, labels=window).loss.item())
    assert result.primary.metric == "token_perplexity"
    assert result.primary.value == pytest.approx(math.exp(sum(losses) / 5), rel=1e-5)
    assert result.primary.n == 5
    assert "windows of 32 tokens, stride 32" in result.primary.definition
    tokens = next(m for m in result.metrics if m.metric == "tokens_scored")
    assert tokens.value == 5 * 31


def test_missing_file_is_a_data_error(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from tasks.errors import DataError, classify

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    with pytest.raises(DataError, match="does-not-exist.txt") as info:
        TokenPerplexity().prepare(entry(tmp_path / "does-not-exist.txt"), tokenizer)
    assert classify(info.value) == "data"
