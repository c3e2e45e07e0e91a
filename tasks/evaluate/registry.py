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


class RecordsConfig(TaskConfig):
    """Settings of a task that reads records (BoolQ, GSM8K, MS MARCO): ``fields`` maps the
    task's field names to a dataset's own, for data in another schema, e.g.
    ``fields: {passage: context, answer: label}``. Left out of the settings (and so of the
    cell's identity) when not set."""

    fields: dict[str, str] | None = None


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
    Either WikiText schema is read: document-level (``page``:
    ``EleutherAI/wikitext_document_level``) or line-level (``text``: ``Salesforce/wikitext``).
    Line-level data is scored as the GPTQ protocol does ("\n\n".join of the split's lines,
    tokenized once), and its documents for the word perplexity are rebuilt by joining lines at
    each top-level heading (`` = Title = ``), as the document-level dataset was built. Another
    field holding whole documents: ``text_field: <field>``.
    """

    text_field: str = "page"
    word_limit: int | None = Field(None, gt=0)


class BoolQConfig(RecordsConfig):
    """BoolQ through lm-eval's ``boolq`` task (accuracy; log-likelihood of " yes" / " no").

    ```yaml
    - {name: boolq, path: boolq.jsonl, limit: 100, num_fewshot: 0}
    ```

    Data in either official schema: ``google/boolq`` (``question``, ``passage``, ``answer``
    bool) or SuperGLUE's (``question``, ``passage``, ``label`` 0/1).
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


class GSM8KConfig(RecordsConfig):
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


class MSMarcoConfig(RecordsConfig):
    """MS MARCO passage re-ranking by query likelihood (see tasks/evaluate/msmarco.py).

    ```yaml
    - {name: msmarco, path: msmarco.jsonl, limit: 200, candidates: 10}
    ```
    """

    candidates: int = Field(10, gt=1)
    batch_size: int = Field(8, gt=0)
    split: str = "validation"


@dataclass(frozen=True)
class Schema:
    """One layout of records a task reads: its name (where it is from) and the fields it needs."""

    name: str
    fields: tuple[str, ...]


@dataclass(frozen=True)
class TaskInfo:
    name: str
    target: str  # "module:attr" of the EvalTask implementation
    config: type[TaskConfig]
    version: str
    primary_metric: str
    description: str
    schemas: tuple[Schema, ...] = ()  # of records; a text task's field is its ``text_field``

    def load(self) -> Any:
        module_name, attr = self.target.split(":")
        return getattr(importlib.import_module(module_name), attr)


TASKS: dict[str, TaskInfo] = {
    "perplexity": TaskInfo("perplexity", "tasks.evaluate.perplexity:TokenPerplexity", PerplexityConfig,
                           "1", "token_perplexity", "token-level perplexity, fixed windows, on any text"),
    "wikitext": TaskInfo("wikitext", "tasks.evaluate.wikitext:WikiText", WikiTextConfig, "2",
                         "token_perplexity", "WikiText: token perplexity (fixed windows) and lm-eval word perplexity",
                         (Schema("document-level (EleutherAI/wikitext_document_level)", ("page",)),
                          Schema("line-level (Salesforce/wikitext)", ("text",)))),
    "boolq": TaskInfo("boolq", "tasks.evaluate.lmeval:BoolQ", BoolQConfig, "1", "acc",
                      "BoolQ yes/no QA through lm-eval (accuracy)",
                      (Schema("google/boolq", ("question", "passage", "answer")),
                       Schema("super_glue boolq", ("question", "passage", "label")))),
    "gsm8k": TaskInfo("gsm8k", "tasks.evaluate.lmeval:GSM8K", GSM8KConfig, "1", "exact_match_strict",
                      "GSM8K math word problems through lm-eval (exact match)",
                      (Schema("openai/gsm8k", ("question", "answer")),)),
    "msmarco": TaskInfo("msmarco", "tasks.evaluate.msmarco:MSMarco", MSMarcoConfig, "1", "mrr@10",
                        "MS MARCO passage re-ranking by query likelihood (acc@1, MRR@10)",
                        (Schema("microsoft/ms_marco v1.1", ("query", "passages")),)),
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


def settings_dump(config: TaskConfig) -> dict[str, Any]:
    """A dataset entry's settings as they enter the cell's identity: every field, except a
    ``fields`` mapping that is not set (so that entries without one keep their identity)."""
    return config.model_dump(exclude={"fields"} if getattr(config, "fields", 0) is None else None)


def match_schema(task: str, settings: dict[str, Any], found: list[str], where: str) -> Schema:
    """The schema of ``task`` that records with the fields ``found`` (after the entry's
    ``fields`` mapping) fit; DataError naming the fields found and the setting that maps them."""
    from tasks.errors import DataError

    info = get_task(task)
    mapping = settings.get("fields") or {}
    present = set(found) | {ours for ours, theirs in mapping.items() if theirs in found}
    text_field = settings.get("text_field")
    schemas = info.schemas
    if text_field is not None and (not schemas or text_field not in {f for s in schemas for f in s.fields}):
        schemas = (Schema(f"documents in '{text_field}'", (text_field,)),)
    for schema in schemas:
        if all(f in present for f in schema.fields):
            return schema
    wanted = "; ".join(f"{s.name}: {', '.join(s.fields)}" for s in schemas)
    if "text_field" in info.config.model_fields:
        how = "set text_field: <the field that holds the text>"
    else:
        example = ", ".join(f"{f}: <your field>" for f in schemas[0].fields if f not in present)
        how = f"map its fields with fields: {{{example}}}"
    raise DataError(f"{where}: its records have the fields {sorted(found)}, which fit no schema of task "
                    f"'{task}' ({wanted}); {how}")


class UnknownTask(KeyError):
    pass


def get_task(name: str) -> TaskInfo:
    if name in TASKS:
        return TASKS[name]
    raise UnknownTask(f"unknown task '{name}': {did_you_mean(name, TASKS)}"
                      f"available: {', '.join(sorted(TASKS))}")
