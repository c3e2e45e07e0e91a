"""WikiText: two labelled perplexities on the same documents, never one unlabelled number.

- ``token_perplexity`` (primary): the GPTQ paper's fixed-window protocol on the documents
  joined by blank lines (tasks/evaluate/perplexity.py); ``limit`` = windows.
- ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``: lm-eval's ``wikitext`` task
  (rolling log-likelihood per document over its detokenized text); ``word_limit`` = documents.

```yaml
datasets:
  - {name: wikitext, path: EleutherAI/wikitext_document_level:wikitext-2-raw-v1, limit: 40, seq_len: 2048}
```
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from tasks.evaluate.base import EvalResult
from tasks.evaluate.lmeval import Prepared, prepare_task, word_perplexity
from tasks.evaluate.perplexity import TokenPerplexity, TokenStream


@dataclass
class WikiTextData:
    tokens: TokenStream
    words: Prepared
    batch_size: int  # of the token-perplexity windows (halved on out-of-memory)


class WikiText:
    takes_reference = True  # passed on to the token perplexity (KL divergence)

    def prepare(self, dataset: Any, tokenizer: Any, seed: int = 0) -> WikiTextData:
        tokens = TokenPerplexity().prepare(dataset, tokenizer, seed)
        words = prepare_task("wikitext", replace(dataset, limit=dataset.settings["word_limit"]),
                             "test_split", {}, 0, seed)
        words.batch_size = 1
        return WikiTextData(tokens, words, tokens.batch_size)

    def reference_batches(self, model: Any, prepared: WikiTextData) -> Any:
        return TokenPerplexity().reference_batches(model, prepared.tokens)

    def evaluate(self, model: Any, tokenizer: Any, prepared: WikiTextData, reference: Any = None) -> EvalResult:
        token = TokenPerplexity().evaluate(model, tokenizer, replace(prepared.tokens, batch_size=prepared.batch_size),
                                           reference)
        word_metrics, word_examples = word_perplexity(prepared.words, model, tokenizer)
        return EvalResult(primary=token.primary, metrics=token.metrics + word_metrics,
                          examples=token.examples + word_examples,
                          task_version=f"qsweep token-ppl 1 + lm-eval wikitext {prepared.words.version}")
