"""WikiText: two labelled perplexities on the same documents, never one unlabelled number.

- ``token_perplexity`` (primary): the GPTQ paper's fixed-window protocol on the documents
  joined by blank lines (tasks/evaluate/perplexity.py); ``limit`` = windows.
- ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``: lm-eval's ``wikitext`` task
  (rolling log-likelihood per document over its detokenized text); ``word_limit`` = documents.

Either schema: document-level ``page`` records, or line-level ``text`` records
(``Salesforce/wikitext``): their token stream is the GPTQ protocol's ("\n\n".join of the
lines, tokenized at once) and their documents are rebuilt at each top-level heading.

```yaml
datasets:
  - {name: wikitext, path: EleutherAI/wikitext_document_level:wikitext-2-raw-v1, limit: 40, seq_len: 2048}
```
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tasks.evaluate.base import EvalResult
from tasks.evaluate.data import check_schema, load_texts
from tasks.evaluate.lmeval import Prepared, prepare_task, word_perplexity
from tasks.evaluate.perplexity import TokenPerplexity, TokenStream


@dataclass
class WikiTextData:
    tokens: TokenStream
    words: Prepared
    batch_size: int  # of the token-perplexity windows (halved on out-of-memory)


LINE_LEVEL = "line-level (Salesforce/wikitext)"
ARTICLE_HEADING = re.compile(r"^ = [^=].* = \n?$")  # " = Title = ": a top-level heading opens an article


def articles(lines: list[str]) -> list[str]:
    """The documents of line-level WikiText: its lines joined, a new one at each top-level
    heading (how EleutherAI/wikitext_document_level was built from the same files)."""
    pages: list[list[str]] = []
    for line in lines:
        if ARTICLE_HEADING.match(line) or not pages:
            pages.append([])
        pages[-1].append(line)
    return ["".join(page) for page in pages if "".join(page).strip()]


def pages_file(dataset: Any, pages: list[str]) -> Path:
    """The rebuilt documents as a local ``page`` file for lm-eval, written once per content
    (under the qsweep cache; atomic, so concurrent actors never read half a file)."""
    from tasks.models import cache_dir

    body = "".join(json.dumps({"page": page}) + "\n" for page in pages)
    target = cache_dir() / "data" / f"wikitext-pages-{hashlib.sha256(body.encode()).hexdigest()[:16]}.jsonl"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(body)
        os.replace(tmp, target)
    return target


class WikiText:
    takes_reference = True  # passed on to the token perplexity (KL divergence)

    def prepare(self, dataset: Any, tokenizer: Any, seed: int = 0) -> WikiTextData:
        settings = dataset.settings
        if check_schema(dataset) != LINE_LEVEL:
            tokens = TokenPerplexity().prepare(dataset, tokenizer, seed)
            words_data = dataset
        else:  # the GPTQ protocol: the split's lines joined by blank lines, tokenized at once
            lines = load_texts(dataset.path, settings["split"], "text")
            ids = tokenizer("\n\n".join(lines), add_special_tokens=False)["input_ids"]
            tokens = TokenStream(ids, dataset.limit, settings, settings["batch_size"])
            words_data = replace(dataset, path=str(pages_file(dataset, articles(lines))),
                                 settings=settings | {"text_field": "page"})
        words = prepare_task("wikitext", replace(words_data, limit=settings["word_limit"]),
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
