"""Log-likelihood of continuations given contexts, batched, for project tasks."""

from __future__ import annotations

from typing import Any

import torch


def continuation_logprobs(model: Any, tokenizer: Any, pairs: list[tuple[str, str]],
                          batch_size: int = 8) -> list[float]:
    """sum log P(continuation | context) in nats for each (context, continuation).

    Tokenized as lm-eval does: context and continuation separately, concatenated; the context
    is cut from the left when the pair exceeds the model's context length.
    """
    max_len = getattr(model.config, "max_position_embeddings", None) or 2048
    device = next(model.parameters()).device
    encoded = []
    for context, continuation in pairs:
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        full = ctx + cont
        encoded.append((full[:-1][-max_len:], full[1:][-max_len:], len(cont)))
    scores = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        width = max(len(ids) for ids, _, _ in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, _, _) in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = 1
        with torch.inference_mode():
            logits = model(input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, (ids, targets, n_cont) in enumerate(batch):
            positions = torch.arange(len(ids) - n_cont, len(ids))
            wanted = torch.tensor(targets[-n_cont:])
            scores.append(logprobs[row, positions, wanted].sum().item())
    return scores
