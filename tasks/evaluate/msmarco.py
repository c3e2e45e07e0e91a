"""MS MARCO passage re-ranking by query likelihood (lm-eval has no MS MARCO task).

Protocol, for each query with at least one passage marked ``is_selected``:
1. take its candidate passages (the first ``candidates``, in the file's order);
2. score each passage p by the model's log-likelihood of the query q given the passage,
   log P(q | "Passage: {p}\\nPlease write a question based on this passage.\\nQuestion:"),
   summed over the query's tokens (the query-likelihood re-ranker of Sachan et al. 2022, UPR;
   the same query is scored under every passage, so sum and mean rank alike);
3. rank passages by that score (ties: the earlier passage first);
4. accuracy@1 = the top passage is selected; reciprocal rank@10 = 1 / rank of the first
   selected passage if it is within the top 10, else 0. MRR@10 is its mean over queries.

Data: the MS MARCO v1.1 schema (``query``, ``query_id``, ``passages`` {``is_selected``,
``passage_text``}), a local file or ``microsoft/ms_marco:v1.1``. ``limit`` caps the queries.

```yaml
datasets:
  - {name: msmarco, path: microsoft/ms_marco:v1.1, limit: 200, candidates: 10}
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.errors import DataError
from tasks.evaluate.base import EvalResult, Example, mean_metric, proportion
from tasks.evaluate.data import load_records
from tasks.evaluate.loglik import continuation_logprobs

PROMPT = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"


@dataclass
class Query:
    query_id: str
    query: str
    passages: list[str]
    selected: list[int]


@dataclass
class Queries:
    queries: list[Query]
    batch_size: int


class MSMarco:
    def prepare(self, dataset: Any, tokenizer: Any, seed: int = 0) -> Queries:
        records = load_records(dataset.path, dataset.settings["split"], dataset.settings.get("fields"))
        queries = []
        for i, record in enumerate(records):
            try:
                passages = record["passages"]
                texts = list(passages["passage_text"])[: dataset.settings["candidates"]]
                selected = list(passages["is_selected"])[: dataset.settings["candidates"]]
                query = str(record["query"])
            except (KeyError, TypeError) as exc:
                raise DataError(f"dataset {dataset.path}: record {i} is not in the MS MARCO schema "
                                f"(query, passages.passage_text, passages.is_selected): missing {exc}") from None
            if any(selected):
                queries.append(Query(str(record.get("query_id", i)), query, texts, selected))
            if dataset.limit is not None and len(queries) >= dataset.limit:
                break
        if not queries:
            raise DataError(f"dataset {dataset.path}: no query with a selected passage")
        return Queries(queries, dataset.settings["batch_size"])

    def evaluate(self, model: Any, tokenizer: Any, prepared: Queries) -> EvalResult:
        queries = prepared.queries
        pairs = [(PROMPT.format(passage=p), " " + q.query) for q in queries for p in q.passages]
        scores = iter(continuation_logprobs(model, tokenizer, pairs, batch_size=prepared.batch_size))
        hits, reciprocal, examples = [], [], []
        for q in queries:
            score = [next(scores) for _ in q.passages]
            order = sorted(range(len(score)), key=lambda i: (-score[i], i))
            rank = next(r for r, i in enumerate(order, start=1) if q.selected[i])
            hits.append(float(rank == 1))
            reciprocal.append(1.0 / rank if rank <= 10 else 0.0)
            examples += [Example(q.query_id, "rank", float(rank)),
                         Example(q.query_id, "acc@1", hits[-1]),
                         Example(q.query_id, "reciprocal_rank@10", reciprocal[-1])]
        candidates = max(len(q.passages) for q in queries)
        how = (f"query-likelihood re-ranking (log P(query | passage prompt), summed over query "
               f"tokens) of up to {candidates} candidates per query; {len(queries)} queries")
        acc = proportion("acc@1", hits, f"the top-ranked passage is a selected one; {how}")
        mrr = mean_metric("mrr@10", reciprocal, f"mean reciprocal rank of the first selected passage, 0 beyond rank 10; {how}")
        return EvalResult(primary=mrr, metrics=[mrr, acc], examples=examples, task_version="qsweep msmarco-ql 1")
