"""NDCG@10, Recall@k and MRR@10 through pytrec_eval, the way BEIR and MTEB score.

Two pytrec_eval habits are corrected here: a judged query missing from the run is skipped (which
inflates the mean), so every judged query is scored and those without hits get 0; and
`recip_rank` has no cut-off, so MRR@10 is computed on the run truncated to its top 10 (ranked as
trec_eval ranks: score descending, then document id descending).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]


def truncate(run: Run, depth: int) -> dict[str, dict[str, float]]:
    """Each query's `depth` best documents, in trec_eval's order (ties: larger document id first)."""
    return {qid: dict(sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:depth])
            for qid, docs in run.items()}


def run_of_hits(hits, query_ids: list[str], corpus_ids: list[str], k: int) -> dict[str, list[tuple[str, float]]]:
    """Per query, its k best (doc id, score) from top-k `hits` (`.indices`, `.scores`; -1: no hit).

    A hit whose id equals the query id is dropped, as BEIR does (ArguAna's queries are corpus
    documents): retrieve k + 1 so that k remain. `hits` come ranked by search.tie_order (score
    descending, then larger id first: how pytrec_eval re-ranks), so the k kept are the ones it would keep.
    """
    run: dict[str, list[tuple[str, float]]] = {}
    for qid, rows, scores in zip(query_ids, hits.indices, hits.scores):
        docs = [(corpus_ids[r], float(s)) for r, s in zip(rows, scores) if r >= 0 and corpus_ids[r] != qid]
        run[qid] = docs[:k]
    return run


def measure_names(ndcg_at: int = 10, recall_at: int = 100, mrr_at: int = 10) -> list[str]:
    return [f"ndcg@{ndcg_at}", f"recall@{recall_at}", f"mrr@{mrr_at}"]


def score(
    qrels: Qrels,
    run: Run,
    *,
    ndcg_at: int = 10,
    recall_at: int = 100,
    mrr_at: int = 10,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean and per-query metrics over every judged query.

    Args:
        qrels: {query_id: {doc_id: graded relevance}}; documents absent from the corpus simply count as misses.
        run: {query_id: {doc_id: score}}, higher is better; queries absent from qrels are ignored.

    Returns:
        (mean over judged queries, {query_id: {measure: value}}) with measures ndcg@10, recall@100, mrr@10.
    """
    import pytrec_eval  # noqa: PLC0415  (lazy: a C extension only scoring needs)

    names = measure_names(ndcg_at, recall_at, mrr_at)
    judged = {qid: {d: int(r) for d, r in docs.items()} for qid, docs in qrels.items()}
    ranked = {qid: {d: float(s) for d, s in run[qid].items()} for qid in judged if run.get(qid)}
    per_query = {qid: dict.fromkeys(names, 0.0) for qid in judged}
    if ranked:
        main = pytrec_eval.RelevanceEvaluator(judged, {f"ndcg_cut.{ndcg_at}", f"recall.{recall_at}"}).evaluate(ranked)
        mrr = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(truncate(ranked, mrr_at))
        for qid, values in main.items():
            per_query[qid][names[0]] = values[f"ndcg_cut_{ndcg_at}"]
            per_query[qid][names[1]] = values[f"recall_{recall_at}"]
        for qid, values in mrr.items():
            per_query[qid][names[2]] = values["recip_rank"]
    mean = {name: float(np.mean([m[name] for m in per_query.values()])) if per_query else float("nan")
            for name in names}
    return mean, per_query
