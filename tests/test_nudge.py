"""NUDGE-M / NUDGE-N against the peer package `nudge-ft` itself, and corrections through eval."""

from __future__ import annotations

import contextlib
import json
import io

import numpy as np
import pytest

from jepa_cache import nudge
from jepa_cache.corrections import Corrections
from jepa_cache.config import EvalConfig
from jepa_cache.errors import UserError
from jepa_cache.search import unit
from jepa_cache.evaluate import evaluate


def _case(seed: int, n: int = 300, d: int = 16):
    """Documents, and queries that sit near a hidden per-document direction (so nudging helps)."""
    rng = np.random.default_rng(seed)
    docs = rng.normal(size=(n, d)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    hidden = rng.normal(size=(n, d)).astype(np.float32)

    def queries(m):
        answers = [[int(a) for a in rng.choice(40, size=rng.integers(1, 3), replace=False)] for _ in range(m)]
        q = np.stack([0.3 * docs[a].mean(0) + hidden[a].mean(0) + 0.3 * rng.normal(size=d) for a in answers]).astype(np.float32)
        return q / np.linalg.norm(q, axis=1, keepdims=True), answers

    return docs, queries(80), queries(30)


def _ours(method, docs, train, val, block=64):
    rows, g = nudge.query_sums(*train)
    held = nudge.Held.build(val[0], val[1], [docs[i:i + block] for i in range(0, len(docs), block)], rows,
                            answer_scores=method == "m")
    pick, move = (nudge.choose_gamma_n, nudge.nudge_n) if method == "n" else (nudge.choose_gamma_m, nudge.nudge_m)
    gamma = pick(held, rows, docs[rows], g)
    out = docs.copy()
    out[rows] = move(docs[rows], g, gamma)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("method", ["n", "m"])
def test_matches_nudge_ft(method, seed):
    torch = pytest.importorskip("torch")
    peer = pytest.importorskip("nudge")  # nudge-ft, a test-only dependency
    docs, train, val = _case(seed)
    cls = peer.NUDGEN if method == "n" else peer.NUDGEM
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints its progress
        want = cls(device=torch.device("cpu")).finetune_embeddings(
            docs, {"q_embs": train[0], "q_ans_indx": train[1]}, {"q_embs": val[0], "q_ans_indx": val[1]})
    got = _ours(method, docs, train, val)
    assert np.abs(want - docs).max() > 0.1  # the case really moves documents
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_nudge_n_stays_on_the_sphere_within_its_step():
    docs, train, _ = _case(0)
    rows, g = nudge.query_sums(*train)
    for gamma in (0.1, 0.4, 1.0):
        moved = nudge.nudge_n(docs[rows], g, gamma)
        np.testing.assert_allclose(np.linalg.norm(moved, axis=1), 1, atol=1e-5)
        assert (((moved - docs[rows]) ** 2).sum(1) <= gamma + 1e-5).all()
        assert ((moved * g).sum(1) >= (docs[rows] * g).sum(1) - 1e-6).all()  # never further from its queries


def test_query_sums_against_a_loop():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(5, 3)).astype(np.float32)
    answers = [[2, 7], [7], [], [0, 2, 2], [7]]
    rows, g = nudge.query_sums(q, answers)
    assert rows.tolist() == [0, 2, 7]
    want = {0: q[3], 2: q[0] + 2 * q[3], 7: q[0] + q[1] + q[4]}
    for r, v in zip(rows, g):
        np.testing.assert_allclose(v, want[int(r)], rtol=1e-6)


def test_corrections_apply_only_to_their_store(tmp_path, synthetic_store):
    """eval with corrections equals a store holding the corrected vectors; another store is untouched."""
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(50, 8)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = rng.normal(size=(10, 8)).astype(np.float32)
    root = tmp_path / "beir" / "synthetic"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(f'{{"_id": "d{i}", "text": "x"}}\n' for i in range(50)))
    (root / "queries.jsonl").write_text("".join(f'{{"_id": "q{i}", "text": "x"}}\n' for i in range(10)))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{3 * i}\t1\n" for i in range(10)))
    store = synthetic_store(docs, queries, shard_rows=16)
    moved = unit(queries[:5])  # documents d0, d3, ..., d12 moved onto their queries: those 5 become hits at rank 1
    corr = Corrections([f"d{3 * i}" for i in range(5)], moved, "nudge-n", 0.5, store.fingerprint, None, 5)
    corr.save(tmp_path / "corr")
    fixed = docs.copy()
    fixed[[0, 3, 6, 9, 12]] = moved
    reference = synthetic_store(fixed, queries, shard_rows=16)

    def run(s, name, **kw):
        cfg = EvalConfig(datasets=[str(root)], store=str(s.path), k=10, out=str(tmp_path / name), block_rows=7, **kw)
        return evaluate(cfg, log=lambda m: None)["datasets"]["synthetic"]

    with_corr = run(store, "a", corrections=str(tmp_path / "corr"))
    assert with_corr["corrections_applied"] == 5
    assert with_corr["metrics"] == run(reference, "b")["metrics"]
    assert with_corr["metrics"]["mrr@10"] >= 0.5
    with pytest.raises(UserError, match="made for another store"):  # named explicitly for a store they do not belong to
        run(reference, "c", corrections=str(tmp_path / "corr"))
    (tmp_path / "corr" / "corrections.safetensors").write_bytes(b"not the file the JSON names")
    with pytest.raises(UserError, match="sha256 differs"):
        run(store, "d", corrections=str(tmp_path / "corr"))


def test_adapt_command_then_eval_applies_the_corrections(cli, tmp_path, synthetic_store):
    """`adapt` (NUDGE-N as published) writes corrections that `eval --corrections` applies; bad input is one line."""
    from conftest import write_beir

    from jepa_cache.datasets import BeirDataset, read_corpus, read_queries

    root = write_beir(tmp_path / "beir" / "tiny", n_docs=40, n_queries=40)
    ds = BeirDataset("tiny", root)
    doc_ids, query_ids = read_corpus(ds.corpus_path)[0], read_queries(ds.queries_path)[0]
    rng = np.random.default_rng(1)
    docs = unit(rng.normal(size=(len(doc_ids), 8)).astype(np.float32))
    store = synthetic_store(docs, unit(rng.normal(size=(len(query_ids), 8)).astype(np.float32)),
                            doc_ids=doc_ids, query_ids=query_ids, dataset="tiny")
    code, text = cli(["adapt", "--store", str(store.path), "--dataset", str(root), "--rule", "nudge-ft",
                      "--out", str(tmp_path / "corr")])
    assert code == 0, text
    saved = Corrections.load(tmp_path / "corr")
    assert saved.store_fingerprint == store.fingerprint and saved.record["rule"] == "nudge-ft"
    assert saved.labelled_queries == 16  # the fitting slice: 20 training queries less 4 held out
    code, text = cli(["eval", "--dataset", str(root), "--store", str(store.path), "--corrections", str(tmp_path / "corr"),
                      "--out", str(tmp_path / "ev")])
    assert code == 0, text
    result = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert result["datasets"]["tiny"]["corrections_applied"] == len(saved.doc_ids)
    for argv, message in ((["--train-split", "test"], "--train-split test"), (["--rule", "best"], "--rule"),
                          (["--dev-fraction", "1"], "--dev-fraction")):
        code, text = cli(["adapt", "--store", str(store.path), "--dataset", str(root), *argv])
        assert code == 2 and message in text and len(text.strip().splitlines()) == 1, text


@pytest.mark.parametrize("seed", [0, 1])
def test_dev_scorer_is_pytrec_evals_ndcg(seed):
    """The vectorised dev NDCG@10 against pytrec_eval on the same candidates: labelled rows moved, the rest
    fixed, a document with the query's own id dropped, exact ties included."""
    from jepa_cache.adapt import DevScorer, Labelled
    from jepa_cache.metrics import score
    from jepa_cache.search import tie_order

    rng = np.random.default_rng(seed)
    docs = unit(rng.normal(size=(120, 8)).astype(np.float32))
    ids = [f"d{i:03d}" for i in range(120)]
    queries = unit(rng.normal(size=(30, 8)).astype(np.float32))
    docs[70] = docs[71] = queries[0]  # an exact tie at the top of query 0: only the id decides who is first
    answers = [[int(a) for a in rng.choice(40, size=rng.integers(1, 5), replace=False)] for _ in range(30)]
    answers[0] = [70, *answers[0]]
    q_ids = [f"q{i}" for i in range(29)] + ["d005"]  # one query shares a document's id (ArguAna)
    dev = Labelled(queries, answers, q_ids)
    rows = np.unique(rng.choice(40, size=25, replace=False))
    rows = np.union1d(rows, [3, 5])
    tie = tie_order(ids)
    held = nudge.Held.build(queries, answers, [docs[:50], docs[50:]], rows, k=11, tie=tie)
    moved = unit(docs[rows] + 0.5 * rng.normal(size=(len(rows), 8)).astype(np.float32))
    [got] = DevScorer.build(ids, held, dev, rows, tie).curve(lambda span: iter([(queries @ moved.T)[span]]))
    full = docs.copy()
    full[rows] = moved
    s = queries @ full.T
    run = {q: {ids[j]: float(s[i, j]) for j in range(120) if ids[j] != q} for i, q in enumerate(q_ids)}
    qrels = {q: {ids[a]: 1 for a in answers[i]} for i, q in enumerate(q_ids)}
    assert got == pytest.approx(score(qrels, run, recall_at=10)[0]["ndcg@10"], abs=1e-9)


def test_dev_scorer_with_many_tied_documents():
    """NUDGE-N snaps every document judged by the same queries onto one vector: tie groups larger than any
    cut, among labelled and among unlabelled rows, must still rank as pytrec_eval ranks them."""
    from jepa_cache.adapt import DevScorer, Labelled
    from jepa_cache.metrics import score
    from jepa_cache.search import tie_order

    rng = np.random.default_rng(3)
    docs = unit(rng.normal(size=(200, 8)).astype(np.float32))
    queries = unit(rng.normal(size=(4, 8)).astype(np.float32))
    docs[100:130] = queries[1]  # 30 identical unlabelled documents at the top of query 1; the last one relevant
    ids = [f"d{i:03d}" for i in range(200)]
    answers = [[58, 59], [129], [2], [3, 4]]
    rows = np.arange(0, 60)
    moved = np.repeat(queries[:1], len(rows), axis=0)  # 60 labelled rows snapped onto query 0's direction
    dev = Labelled(queries, answers, [f"q{i}" for i in range(4)])
    tie = tie_order(ids)
    held = nudge.Held.build(queries, answers, [docs[:70], docs[70:]], rows, k=11, tie=tie)
    [got] = DevScorer.build(ids, held, dev, rows, tie).curve(lambda span: iter([(queries @ moved.T)[span]]))
    full = docs.copy()
    full[rows] = moved
    s = queries @ full.T
    run = {q: {ids[j]: float(s[i, j]) for j in range(200)} for i, q in enumerate(dev.ids)}
    want = score({q: {ids[a]: 1 for a in answers[i]} for i, q in enumerate(dev.ids)}, run, recall_at=10)[0]["ndcg@10"]
    assert want > 0 and got == pytest.approx(want, abs=1e-9)


def test_a_document_no_query_judged_stays_put():
    docs = unit(np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32))
    g = np.zeros((3, 4), dtype=np.float32)
    g[0] = docs[0]
    for gamma in (0.5, 1.9):
        moved = nudge.nudge_n(docs, g, gamma)
        assert np.isfinite(moved).all() and np.allclose(moved[1:], docs[1:])


@pytest.mark.parametrize("k, keep", [(1, 1), (2, 2), (10, 16), (11, 11), (40, 50)])
def test_ranked_is_a_whole_row_sort(k, keep):
    """The k best of each row by score, then key, sorting only a few columns, against sorting every column;
    scores drawn from a few values (tie groups across every cut), -inf included."""
    rng = np.random.default_rng(k)
    scores = rng.integers(0, 6, size=(200, 30)).astype(np.float64)
    scores[rng.random(scores.shape) < 0.2] = -np.inf
    key = np.stack([rng.permutation(30) for _ in range(200)])
    want = np.lexsort((key, -scores), axis=1)[:, :k]
    np.testing.assert_array_equal(nudge.ranked(scores, key, k, keep), want)
