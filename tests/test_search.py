import numpy as np
import pytest

from jepa_cache import search
from jepa_cache.errors import UserError
from jepa_cache.search import MARGIN, recall_vs_exact, tie_order, top_k
from conftest import threads


def brute_force(docs: np.ndarray, queries: np.ndarray, k: int, similarity: str):
    if similarity == "cos":
        docs = docs / np.linalg.norm(docs, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        scores = queries @ docs.T
    else:
        scores = -((queries[:, None, :] - docs[None, :, :]) ** 2).sum(-1)
    order = np.argsort(-scores, axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(500, 32)).astype(np.float32), rng.normal(size=(40, 32)).astype(np.float32)


@pytest.mark.parametrize("similarity", ["cos", "l2"])
@pytest.mark.parametrize("index", ["Flat", "torch"])
def test_exact_equals_brute_force(data, similarity, index):
    docs, queries = data
    want_scores, want_idx = brute_force(docs.astype(np.float64), queries.astype(np.float64), 10, similarity)
    hits = top_k(docs, queries, 10, similarity, index)
    assert (hits.indices == want_idx).all()
    assert np.allclose(hits.scores, want_scores, atol=1e-4)
    assert (np.diff(hits.scores, axis=1) <= 0).all()  # best first, higher is better for l2 too


@pytest.mark.parametrize("index", ["Flat", "torch"])
def test_blockwise_equals_whole(data, index):
    docs, queries = data
    whole = top_k(docs, queries, 25, "cos", index)
    parts = top_k(lambda: (docs[i : i + 64] for i in range(0, len(docs), 64)), queries, 25, "cos", index)
    assert (parts.indices == whole.indices).all()
    assert np.array_equal(parts.scores, whole.scores)


def test_k_beyond_corpus_is_padded(data):
    docs, queries = data
    hits = top_k(docs[:5], queries, 8)
    assert (hits.indices[:, 5:] == -1).all() and np.isneginf(hits.scores[:, 5:]).all()
    assert sorted(hits.indices[0, :5]) == [0, 1, 2, 3, 4]


def test_approximate_index_and_recall(data):
    docs, queries = data
    exact = top_k(docs, queries, 10)
    approx = top_k(docs, queries, 10, index="HNSW32", params="efSearch=64")
    assert recall_vs_exact(exact.indices, exact.indices) == 1.0
    assert recall_vs_exact(approx.indices, exact.indices) > 0.8
    ivf = top_k(docs, queries, 10, index="IVF4,Flat", params="nprobe=4")  # all lists probed: exact
    assert recall_vs_exact(ivf.indices, exact.indices) == 1.0


def test_bad_inputs_are_user_errors(data):
    docs, queries = data
    with pytest.raises(UserError, match="factory"):
        top_k(docs, queries, 10, index="NoSuchIndex")
    with pytest.raises(UserError, match="similarity"):
        top_k(docs, queries, 10, similarity="dot")


def test_prepare_never_modifies_the_callers_vectors(tmp_path):
    from jepa_cache.search import prepare

    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=x.shape)
    mm[:] = x
    for given in (x, mm, x.astype(np.float16)):
        before = np.array(given, copy=True)
        out = prepare(given, "cos")
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
        assert np.array_equal(np.asarray(given), before)


def near_ties(dim: int = 384, largest: int = 3 * MARGIN, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Documents whose scores differ by less than float32 summation error, and exact duplicates.

    Groups of copies of one vector, each copy moved by a float32 ulp or two in random coordinates
    (some copies end up identical), so within a group the float64 scores differ by ~1e-9 while a
    float32 dot product of `dim` terms errs by ~1e-6; the `largest` group, when larger than MARGIN,
    straddles rank k, so the backend's candidates must be widened. Queries sit near the groups.
    """
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((12, dim)).astype(np.float32)
    sizes = [largest] + [8] * 11
    docs = []
    for b, size in zip(base, sizes):
        for _ in range(size):
            copy = b.copy()
            j = rng.choice(dim, size=4, replace=False)
            copy[j] = np.nextafter(copy[j], rng.choice([-np.inf, np.inf], size=4).astype(np.float32))
            docs.append(copy if rng.random() < 0.7 else b)
    docs = np.concatenate([np.stack(docs), rng.standard_normal((300, dim)).astype(np.float32)])
    docs = docs[rng.permutation(len(docs))]  # copies spread over blocks
    queries = (base[rng.integers(0, 12, size=40)] + 0.3 * rng.standard_normal((40, dim))).astype(np.float32)
    return docs, queries


def reference_top_k(docs, queries, k, similarity, ties):
    """float64 scores rounded to float32, ranked by (-score, ties), by brute force."""
    d, q = docs.astype(np.float64), queries.astype(np.float64)
    if similarity == "cos":
        s = (q @ d.T) / np.outer(np.linalg.norm(q, axis=1), np.linalg.norm(d, axis=1))
    else:
        s = -((q[:, None, :] - d[None, :, :]) ** 2).sum(-1)
    s = s.astype(np.float32)
    order = np.array([sorted(range(len(d)), key=lambda j: (-s[i, j], ties[j]))[:k] for i in range(len(q))])
    return np.take_along_axis(s, order, axis=1), order


@pytest.mark.parametrize("similarity", ["cos", "l2"])
def test_ranking_ignores_threads_blocks_and_backend(similarity, monkeypatch):
    """Near-tied and duplicate documents rank the same with 1 or 2 threads, any block size, FAISS or torch,
    and as a float64 brute force does, ties broken by the given order."""

    docs, queries = near_ties()
    k = 30
    ties = tie_order([f"d{i}" for i in range(len(docs))])
    want_s, want_i = reference_top_k(docs, queries, k, similarity, ties)
    runs = {}
    for n_threads in (1, 2):
        with threads(n_threads):
            for index in ("Flat", "torch"):
                for rows in (None, 64, 7):
                    corpus = docs if rows is None else (lambda r=rows: (docs[i : i + r] for i in range(0, len(docs), r)))
                    for n in (40, 5):  # FAISS takes another code path under 20 queries
                        runs[f"{index}, {n_threads} threads, blocks of {rows}, {n} queries"] = top_k(corpus, queries[:n], k, similarity, index, ties=ties)
    monkeypatch.setattr(search, "_RESCORE_ELEMENTS", 1000)  # rescored a few pairs at a time
    monkeypatch.setattr(search, "_TORCH_TILE", 1000)  # widened a few queries at a time
    runs["small tiles"] = top_k(docs, queries, k, similarity, ties=ties)
    first = runs["Flat, 1 threads, blocks of None, 40 queries"]
    for where, hits in runs.items():
        n = len(hits.indices)
        assert np.array_equal(hits.indices, first.indices[:n]) and np.array_equal(hits.scores, first.scores[:n]), where
    assert np.array_equal(first.indices, want_i) and np.array_equal(first.scores, want_s)


def test_approximate_candidates_are_rescored():
    docs, queries = near_ties(largest=8)  # no tie group wider than the MARGIN extra candidates
    ties = tie_order([f"d{i}" for i in range(len(docs))])
    exact = top_k(docs, queries, 10, ties=ties)
    ivf = top_k(lambda: (docs[i : i + 200] for i in range(0, len(docs), 200)), queries, 10, index="IVF4,Flat",
                params="nprobe=4", ties=ties)  # every list probed: the same candidates, so the same ranking
    assert np.array_equal(ivf.indices, exact.indices) and np.array_equal(ivf.scores, exact.scores)


def test_tie_order_is_pytrec_evals():
    """pytrec_eval ranks equal scores by document id, larger first (bytes of UTF-8); tie_order says the same."""
    import pytrec_eval

    ids = ["d1", "d10", "d9", "D2", "d2", "é", "z", "a b", "10", "9"]
    order = tie_order(ids)
    for rel in ids:
        run = {"q": {d: 0.5 for d in ids}}
        got = pytrec_eval.RelevanceEvaluator({"q": {rel: 1}}, {"recip_rank"}).evaluate(run)["q"]["recip_rank"]
        assert got == 1 / (order[ids.index(rel)] + 1), rel
