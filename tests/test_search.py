import numpy as np
import pytest

from jepa_cache.errors import UserError
from jepa_cache.search import merge_top_k, recall_vs_exact, top_k


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
    blocks = (docs[i : i + 64] for i in range(0, len(docs), 64))
    parts = top_k(blocks, queries, 25, "cos", index)
    assert (parts.indices == whole.indices).all()
    assert np.allclose(parts.scores, whole.scores, atol=1e-6)


def test_k_beyond_corpus_is_padded(data):
    docs, queries = data
    hits = top_k(docs[:5], queries, 8)
    assert (hits.indices[:, 5:] == -1).all() and np.isneginf(hits.scores[:, 5:]).all()
    assert sorted(hits.indices[0, :5]) == [0, 1, 2, 3, 4]


def test_merge_top_k():
    s, i = merge_top_k(np.array([[0.9, 0.1]]), np.array([[1, 2]]), np.array([[0.5, 0.4]]), np.array([[7, 8]]), 3)
    assert i.tolist() == [[1, 7, 8]] and s.tolist() == [[0.9, 0.5, 0.4]]


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
