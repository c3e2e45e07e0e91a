"""Token-level perplexity over fixed windows (the GPTQ paper's protocol).

Documents are joined with blank lines into one token stream (no special tokens added) and cut
into windows of ``seq_len`` tokens, capped by the model's context length. With
``stride == seq_len`` (default) windows do not overlap: each window's first token has no
context and every other token is scored once. With a smaller stride, windows start every
``stride`` tokens and each scores only the tokens the previous window did not. ``limit`` caps
the number of windows. Perplexity = exp(total NLL / scored tokens), natural log.

```yaml
datasets:
  - {name: wikitext, path: wiki.test.raw.txt, limit: 64, seq_len: 2048}
```
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from tasks.errors import DataError
from tasks.evaluate.base import EvalResult, Example, Metric
from tasks.evaluate.data import load_texts


def token_stream(tokenizer: Any, texts: list[str], needed: int | None) -> list[int]:
    """Token ids of the joined documents, stopping once ``needed`` tokens are there."""
    ids: list[int] = []
    for i, text in enumerate(texts):
        piece = ("\n\n" if i else "") + text
        ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if needed is not None and len(ids) >= needed:
            break
    return ids


def windows(n_tokens: int, seq_len: int, stride: int, limit: int | None) -> list[tuple[int, int, int]]:
    """(start, end, first scored position within the window) for each window."""
    spans, start, scored_to = [], 0, 0
    while start + seq_len <= n_tokens and (limit is None or len(spans) < limit):
        end = start + seq_len
        spans.append((start, end, max(scored_to - start, 1)))
        scored_to, start = end, start + stride
    return spans


@dataclass
class TokenStream:
    ids: list[int]
    limit: int | None
    settings: dict[str, Any]
    batch_size: int


class TokenPerplexity:
    # evaluate() takes ``reference``: the baseline's next-token log-probs, for KL divergence
    takes_reference = True

    def prepare(self, dataset: Any, tokenizer: Any, seed: int = 0) -> TokenStream:
        settings = dataset.settings
        texts = load_texts(dataset.path, settings["split"], settings["text_field"])
        stride = settings["stride"] or settings["seq_len"]
        needed = None if dataset.limit is None else (dataset.limit - 1) * stride + settings["seq_len"]
        return TokenStream(token_stream(tokenizer, texts, needed), dataset.limit, settings,
                           settings["batch_size"])

    @staticmethod
    def windows(model: Any, prepared: TokenStream) -> tuple[int, int, list]:
        """(seq_len, stride, spans) of the evaluation windows, the model's context respected."""
        settings = prepared.settings
        context = getattr(model.config, "max_position_embeddings", None) or settings["seq_len"]
        seq_len = min(settings["seq_len"], context)
        stride = min(settings["stride"] or seq_len, seq_len)
        spans = windows(len(prepared.ids), seq_len, stride, prepared.limit)
        if not spans:
            raise DataError(f"{len(prepared.ids)} tokens, fewer than one window of {seq_len}")
        return seq_len, stride, spans

    def batches(self, model: Any, prepared: TokenStream) -> Iterator[tuple[list, list, torch.Tensor]]:
        """(window keys, spans, input_ids) per evaluation batch; a window's key does not depend
        on the batch size, so reference entries survive a batch halved after out-of-memory."""
        seq_len, stride, spans = self.windows(model, prepared)
        stream = torch.tensor(prepared.ids, dtype=torch.long)
        for first in range(0, len(spans), prepared.batch_size):
            batch = spans[first:first + prepared.batch_size]
            keys = [(seq_len, stride, first + i) for i in range(len(batch))]
            yield keys, batch, torch.stack([stream[s:e] for s, e, _ in batch])

    def reference_batches(self, model: Any, prepared: TokenStream) -> Iterator[tuple[list, torch.Tensor]]:
        """What ``BaselineLogprobs.precompute`` stores for this dataset."""
        for keys, _, input_ids in self.batches(model, prepared):
            yield keys, input_ids

    def evaluate(self, model: Any, tokenizer: Any, prepared: TokenStream,
                 reference: Any = None) -> EvalResult:
        """Perplexity of ``model``; with ``reference`` (a callable ``(batch_key, input_ids) ->
        log-probs [batch, seq_len - 1, vocab]`` of the unquantized model on the same batch), also
        the mean per-token KL divergence of the model's next-token distribution from it and the
        share of positions where both pick the same top token."""
        device = next(model.parameters()).device
        window_nll, window_tokens, window_kl, window_same = [], [], [], []
        seq_len, stride, spans = self.windows(model, prepared)
        for keys, batch, input_ids in self.batches(model, prepared):
            input_ids = input_ids.to(device)
            with torch.inference_mode():
                logits = model(input_ids).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            token_nll = -logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            if reference is not None:
                base = reference(keys, input_ids).to(logprobs.device)
                # KL(base || model) per position: sum_v p_base (log p_base - log p_model)
                token_kl = (base.exp() * (base - logprobs)).sum(-1)
                token_same = (base.argmax(-1) == logprobs.argmax(-1)).float()
            for row, (_, _, scored_from) in enumerate(batch):
                scored = token_nll[row, scored_from - 1:]
                window_nll.append(scored.sum().item())
                window_tokens.append(scored.numel())
                if reference is not None:
                    window_kl.append(token_kl[row, scored_from - 1:].mean().item())
                    window_same.append(token_same[row, scored_from - 1:].mean().item())
        tokens = sum(window_tokens)
        mean_nll = sum(window_nll) / tokens
        per_window = [nll / n for nll, n in zip(window_nll, window_tokens)]
        spread = _stderr(per_window)
        ppl = math.exp(mean_nll)
        definition = (f"token-level perplexity, exp(mean NLL per scored token, natural log); "
                      f"windows of {seq_len} tokens, stride {stride}, {len(spans)} windows, "
                      f"no special tokens; stderr by the delta method over per-window mean NLL")
        primary = Metric("token_perplexity", ppl, ppl * spread if spread is not None else None,
                         len(spans), definition)
        metrics = [
            primary,
            Metric("token_nll", mean_nll, spread, len(spans),
                   f"mean NLL per scored token in nats; windows of {seq_len}, stride {stride}"),
            Metric("tokens_scored", float(tokens), None, len(spans),
                   f"tokens scored across {len(spans)} windows of {seq_len}, stride {stride}"),
        ]
        examples = [Example(f"w{i}", "window_nll", v) for i, v in enumerate(per_window)]
        if reference is not None:
            weights = [n / tokens for n in window_tokens]
            kl = sum(w * v for w, v in zip(weights, window_kl))
            same = sum(w * v for w, v in zip(weights, window_same))
            metrics += [
                Metric("kl_divergence", kl, _stderr(window_kl), len(spans),
                       "mean per-token KL(baseline || model) of the next-token distribution in nats, "
                       f"over the scored tokens of the same {len(spans)} windows of {seq_len} "
                       "(llama.cpp's KLD); stderr over per-window means"),
                Metric("top1_agreement", same, _stderr(window_same), len(spans),
                       "share of scored positions where model and baseline rank the same next token first"),
            ]
            examples += [Example(f"w{i}", "window_kl", v) for i, v in enumerate(window_kl)]
        return EvalResult(primary=primary, metrics=metrics, examples=examples)


def _stderr(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(var / len(values))
