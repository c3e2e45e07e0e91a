"""The one evaluation-task registry: names, typed settings, known datasets; lazy imports."""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class TaskConfig(BaseModel):
    """Base for a dataset entry's task settings: frozen, unknown keys forbidden."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PerplexityConfig(TaskConfig):
    """Token-level perplexity over fixed windows (the GPTQ paper's protocol).

    ```yaml
    - {name: wikitext, path: data/wiki.test.raw, limit: 64, seq_len: 2048, stride: 2048}
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
    "perplexity": TaskInfo(
        name="perplexity",
        target="tasks.evaluate.perplexity:TokenPerplexity",
        config=PerplexityConfig,
        version="1",
        primary_metric="token_perplexity",
        description="token-level perplexity, fixed windows, on any text",
    ),
    "wikitext": TaskInfo(
        name="wikitext",
        target="tasks.evaluate.perplexity:TokenPerplexity",
        config=PerplexityConfig,
        version="1",
        primary_metric="token_perplexity",
        description="token-level perplexity on WikiText (file or hub id), fixed windows",
    ),
}

# Datasets qsweep can find without a path: name -> (task, path). ``builtin:`` sources are
# written by the project from text every Python installation has.
KNOWN_DATASETS: dict[str, tuple[str, str]] = {
    "pydoc-topics": ("perplexity", "builtin:pydoc-topics"),
    "wikitext": ("wikitext", "Salesforce/wikitext:wikitext-2-raw-v1"),
}


class UnknownTask(KeyError):
    pass


def get_task(name: str) -> TaskInfo:
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(name, TASKS, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UnknownTask(f"unknown task '{name}': {hint}available: {', '.join(sorted(TASKS))}")
