import math

import numpy as np
import pytest
import pytrec_eval

from jepa_cache.metrics import score, truncate


def random_case(seed: int = 0, n_queries: int = 30, n_docs: int = 200):
    rng = np.random.default_rng(seed)
    qrels = {f"q{i}": {f"d{j}": int(rng.integers(0, 3)) for j in rng.choice(n_docs, size=int(rng.integers(1, 8)), replace=False)}
             for i in range(n_queries)}
    run = {f"q{i}": {f"d{j}": float(rng.normal()) for j in rng.choice(n_docs, size=120, replace=False)} for i in range(n_queries)}
    return qrels, run


def test_equals_pytrec_eval_called_directly():
    qrels, run = random_case()
    mean, per_query = score(qrels, run)
    direct = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    top10 = {q: dict(sorted(d.items(), key=lambda kv: -kv[1])[:10]) for q, d in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    for q in qrels:
        assert per_query[q]["ndcg@10"] == pytest.approx(direct[q]["ndcg_cut_10"])
        assert per_query[q]["recall@100"] == pytest.approx(direct[q]["recall_100"])
        assert per_query[q]["mrr@10"] == pytest.approx(rr[q]["recip_rank"])
    assert mean["ndcg@10"] == pytest.approx(np.mean([v["ndcg_cut_10"] for v in direct.values()]))


def test_hand_computed_ndcg():
    """Gains as given (trec_eval): b(1) at rank 1, x(0) at 2, a(2) at 3; ideal order a, b."""
    qrels = {"q": {"a": 2, "b": 1}}
    run = {"q": {"b": 0.9, "x": 0.8, "a": 0.7}}
    dcg = 1 / math.log2(2) + 2 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    mean, _ = score(qrels, run)
    assert mean["ndcg@10"] == pytest.approx(dcg / idcg)
    assert mean["mrr@10"] == pytest.approx(1.0)
    assert mean["recall@100"] == pytest.approx(1.0)


def test_judged_query_missing_from_run_scores_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 1}}
    run = {"q1": {"a": 1.0}, "q3": {}}  # q2 absent, q3 empty: pytrec_eval alone would skip q2
    mean, per_query = score(qrels, run)
    assert mean["ndcg@10"] == pytest.approx(1 / 3)
    assert per_query["q2"] == {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}


def test_mrr_is_cut_at_10_and_unjudged_queries_ignored():
    qrels = {"q": {"target": 1}}
    run = {"q": {**{f"d{i:02d}": 1.0 - i / 100 for i in range(10)}, "target": 0.5}, "unjudged": {"x": 1.0}}
    mean, per_query = score(qrels, run)
    assert mean["mrr@10"] == 0.0  # recip_rank alone would give 1/11
    assert set(per_query) == {"q"}


def test_truncate_breaks_ties_like_trec_eval():
    assert list(truncate({"q": {"a": 1.0, "c": 1.0, "b": 1.0, "z": 0.5}}, 2)["q"]) == ["c", "b"]
