"""The one evaluation-task registry: names, typed settings, known datasets; lazy imports.

Torch-free: the driver validates dataset entries with these configs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.naming import did_you_mean


class TaskConfig(BaseModel):
    """Base for a dataset entry's task settings: frozen, unknown keys forbidden."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PerplexityConfig(TaskConfig):
    """Token-level perplexity over fixed windows (the GPTQ paper's protocol).

    ```yaml
    - {name: docs, task: perplexity, path: corpus.txt, limit: 64, seq_len: 2048, stride: 2048}
    ```

    The text is joined into one token stream and cut into windows of ``seq_len`` tokens
    (capped by the model's context). With ``stride == seq_len`` (the default) windows do not
    overlap and every token is scored once; with a smaller stride each window scores only its
    last ``stride`` tokens. ``limit`` caps the number of windows.
    """

    seq_len: int = Field(2048, gt=1)
    stride: int | None = Field(None, gt=0)
    batch_size: int = Field(4, gt=0)
    text_field: str = "text"
    split: str = "test"


class WikiTextConfig(PerplexityConfig):
    """WikiText: two labelled perplexities on the same documents.

    ```yaml
    - {name: wikitext, path: wikitext.jsonl, limit: 8, seq_len: 512}
    ```

    ``token_perplexity``: the fixed-window protocol above (``limit`` = windows);
    ``word_perplexity`` (and byte perplexity, bits per byte): lm-eval's ``wikitext`` task,
    rolling log-likelihood per document, normalised by words (``word_limit`` = documents).
    Documents are read from ``text_field`` (default ``page``, the document-level schema).
    """

    text_field: str = "page"
    word_limit: int | None = Field(None, gt=0)


class BoolQConfig(TaskConfig):
    """BoolQ through lm-eval's ``boolq`` task (accuracy; log-likelihood of " yes" / " no").

    ```yaml
    - {name: boolq, path: boolq.jsonl, limit: 100, num_fewshot: 0}
    ```

    Data in the official schema: ``question``, ``passage``, ``answer`` (bool).
    """

    num_fewshot: int = Field(0, ge=0)
    batch_size: int = Field(8, gt=0)
    split: str = "validation"
    # Where few-shot examples come from. Default: lm-eval's own definition (its ``fewshot_split``,
    # else its training split: ``train`` for boolq and gsm8k) of the same hub dataset; for a
    # builtin fixture its ``-train`` file. A local file needs ``fewshot_path`` (a file of items
    # in the same schema, e.g. the train split); ``fewshot_from_eval: true`` draws them from the
    # evaluated set itself (lm-eval leaves the evaluated item out), which the row then says.
    fewshot_path: str | None = None
    fewshot_split: str | None = None
    fewshot_from_eval: bool = False


class GSM8KConfig(TaskConfig):
    """GSM8K through lm-eval's ``gsm8k`` task (exact match after ``#### N``; greedy).

    ```yaml
    - {name: gsm8k, path: gsm8k-test.jsonl, fewshot_path: gsm8k-train.jsonl, limit: 50, num_fewshot: 5}
    ```

    Data in the official schema: ``question``, ``answer`` ending in ``#### N``.
    """

    num_fewshot: int = Field(5, ge=0)
    batch_size: int = Field(8, gt=0)
    max_gen_toks: int = Field(256, gt=0)
    split: str = "test"
    # Where few-shot examples come from. Default: lm-eval's own definition (its ``fewshot_split``,
    # else its training split: ``train`` for boolq and gsm8k) of the same hub dataset; for a
    # builtin fixture its ``-train`` file. A local file needs ``fewshot_path`` (a file of items
    # in the same schema, e.g. the train split); ``fewshot_from_eval: true`` draws them from the
    # evaluated set itself (lm-eval leaves the evaluated item out), which the row then says.
    fewshot_path: str | None = None
    fewshot_split: str | None = None
    fewshot_from_eval: bool = False


class MSMarcoConfig(TaskConfig):
    """MS MARCO passage re-ranking by query likelihood (see tasks/evaluate/msmarco.py).

    ```yaml
    - {name: msmarco, path: msmarco.jsonl, limit: 200, candidates: 10}
    ```
    """

    candidates: int = Field(10, gt=1)
    batch_size: int = Field(8, gt=0)
    split: str = "validation"


@dataclass(frozen=True)
class TaskInfo:
    name: str
    target: str  # "module:attr" of the EvalTask implementation
    config: type[TaskConfig]
    version: str
    primary_metric: str
    description: str

    def load(self) -> Any:
        module_name, attr = self.target.split(":")
        return getattr(importlib.import_module(module_name), attr)


TASKS: dict[str, TaskInfo] = {
    "perplexity": TaskInfo("perplexity", "tasks.evaluate.perplexity:TokenPerplexity", PerplexityConfig,
                           "1", "token_perplexity", "token-level perplexity, fixed windows, on any text"),
    "wikitext": TaskInfo("wikitext", "tasks.evaluate.wikitext:WikiText", WikiTextConfig, "2",
                         "token_perplexity", "WikiText: token perplexity (fixed windows) and lm-eval word perplexity"),
    "boolq": TaskInfo("boolq", "tasks.evaluate.lmeval:BoolQ", BoolQConfig, "1", "acc",
                      "BoolQ yes/no QA through lm-eval (accuracy)"),
    "gsm8k": TaskInfo("gsm8k", "tasks.evaluate.lmeval:GSM8K", GSM8KConfig, "1", "exact_match_strict",
                      "GSM8K math word problems through lm-eval (exact match)"),
    "msmarco": TaskInfo("msmarco", "tasks.evaluate.msmarco:MSMarco", MSMarcoConfig, "1", "mrr@10",
                        "MS MARCO passage re-ranking by query likelihood (acc@1, MRR@10)"),
}

# Datasets qsweep can find without a path: name -> (task, path). Hub ids are the real data
# (need hub access or a local HF cache); ``builtin:`` sources ship with qsweep and run offline:
# the four ``*-fixture`` files are small, project-written, in each dataset's official schema.
KNOWN_DATASETS: dict[str, tuple[str, str]] = {
    "pydoc-topics": ("perplexity", "builtin:pydoc-topics"),
    "wikitext": ("wikitext", "EleutherAI/wikitext_document_level:wikitext-2-raw-v1"),
    "boolq": ("boolq", "google/boolq"),
    "gsm8k": ("gsm8k", "openai/gsm8k:main"),
    "msmarco": ("msmarco", "microsoft/ms_marco:v1.1"),
    "wikitext-fixture": ("wikitext", "builtin:wikitext"),
    "boolq-fixture": ("boolq", "builtin:boolq"),
    "gsm8k-fixture": ("gsm8k", "builtin:gsm8k"),
    "msmarco-fixture": ("msmarco", "builtin:msmarco"),
}


class UnknownTask(KeyError):
    pass


def get_task(name: str) -> TaskInfo:
    if name in TASKS:
        return TASKS[name]
    raise UnknownTask(f"unknown task '{name}': {did_you_mean(name, TASKS)}"
                      f"available: {', '.join(sorted(TASKS))}")
