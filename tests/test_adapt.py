"""Choosing corrections' settings chunk by chunk of held-out queries gives what one chunk of all of them gives."""

from __future__ import annotations

import numpy as np
import pytest

from jepa_cache import adapt, nudge
from jepa_cache.search import unit


def _case(seed: int = 0, n_docs: int = 300, d: int = 8, n_dev: int = 23):
    """Corpus, fitting queries and dev queries. The dev queries are ±(a basis vector), so that each of their
    scores is one exact product: BLAS may sum in another order for another number of rows, never differently
    here, and any difference between chunkings is the code's."""
    rng = np.random.default_rng(seed)
    docs = unit(rng.normal(size=(n_docs, d)).astype(np.float32))
    docs[101] = docs[100]  # an exact tie between two documents
    ids = [f"d{i:03d}" for i in range(n_docs)]

    def answers(m):
        return [[int(a) for a in rng.choice(60, size=rng.integers(1, 4), replace=False)] for _ in range(m)]

    fit_answers = answers(60)
    fit = adapt.Labelled(unit(np.stack([docs[a].sum(0) for a in fit_answers]) + 0.3 * rng.normal(size=(60, d))
                              ).astype(np.float32), fit_answers, [f"f{i}" for i in range(60)])
    axis, sign = rng.integers(0, d, n_dev), rng.choice([-1.0, 1.0], n_dev)
    dev_vectors = np.zeros((n_dev, d), dtype=np.float32)
    dev_vectors[np.arange(n_dev), axis] = sign
    near = np.argsort(-(sign[:, None] * docs[:60, axis].T), axis=1)  # judged documents near each dev query
    dev_answers = [[int(near[i, 3 * i % 20]), *a][: 1 + i % 4] for i, a in enumerate(answers(n_dev))]
    dev_answers[0] = [100, 200, 250]  # unlabelled answers (NUDGE-M's answer scores)
    dev_ids = [f"q{i}" for i in range(n_dev - 1)] + ["d005"]  # one query shares a document's id
    return docs, ids, fit, adapt.Labelled(dev_vectors, dev_answers, dev_ids)


def _choose(cfg, docs, ids, fit, dev, chunk):
    blocks = [docs[i:i + 64] for i in range(0, len(docs), 64)]
    return adapt.choose(cfg, lambda r: docs[r], blocks, ids, fit, dev, chunk=chunk)


@pytest.mark.parametrize("rule", ["ndcg", "nudge-ft"])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_choice_in_chunks_is_the_choice_in_one(rule, chunk):
    docs, ids, fit, dev = _case()
    cfg = adapt.AdaptConfig(rule=rule)
    whole = _choose(cfg, docs, ids, fit, dev, chunk=len(dev.ids))
    assert len(nudge.spans(len(dev.ids), chunk)) > 1 and len(nudge.spans(len(dev.ids), len(dev.ids))) == 1
    assert _choose(cfg, docs, ids, fit, dev, chunk) == whole
    if rule == "ndcg":  # the curve really varies: the comparison sees every query's score
        assert len(set(whole[2]["curve"].values())) > 10


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_held_out_pass_and_nudge_ft_choice_in_chunks(chunk):
    docs, _, fit, dev = _case(1)
    rows, g = nudge.query_sums(fit.vectors, fit.answers)
    blocks = [docs[i:i + 50] for i in range(0, len(docs), 50)]
    whole = nudge.Held.build(dev.vectors, dev.answers, blocks, rows, k=3, answer_scores=True, chunk=len(dev.ids))
    held = nudge.Held.build(dev.vectors, dev.answers, blocks, rows, k=3, answer_scores=True, chunk=chunk)
    np.testing.assert_array_equal(held.top_rows, whole.top_rows)
    np.testing.assert_array_equal(held.top_scores, whole.top_scores)
    assert held.answer_scores == whole.answer_scores and whole.answer_scores[0].keys() == {100, 200, 250}
    assert whole.answer_scores[0][200] == float(dev.vectors[0] @ docs[200])
    for k in (1, 2):
        want = nudge.choose_gamma_n(whole, rows, docs[rows], g, k=k, chunk=len(dev.ids))
        assert nudge.choose_gamma_n(held, rows, docs[rows], g, k=k, chunk=chunk) == want


def test_spans_cover_every_row_once():
    for n in (0, 1, 5, 23, 128, 300):
        for size in (1, 3, 128):
            got = nudge.spans(n, size)
            assert [r for lo, hi in got for r in range(lo, hi)] == list(range(n))
            assert all(size <= hi - lo < 2 * size for lo, hi in got) or (len(got) == 1 and n < size)
    with pytest.raises(ValueError):
        nudge.spans(5, 0)
