import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import types

import pytest
import pytrec_eval

from conftest import SHARED, threads, write_beir, write_store
from jepa_cache.config import EvalConfig
from jepa_cache.datasets import BeirDataset, read_corpus, read_qrels, read_queries
from jepa_cache.errors import UserError
from jepa_cache.evaluate import evaluate
from jepa_cache.metrics import score

DIM = 24
ENCODER = "sha-of-synthetic-encoder"  # what conftest.write_store records as the weights sha


class FakeHeads:
    """The heads interface eval relies on, as random linear maps."""

    def __init__(self, encoder_fingerprint=ENCODER, similarity="cos", dim_out=8):
        import torch

        g = torch.Generator().manual_seed(0)
        self.projection = torch.randn(DIM, dim_out, generator=g)
        self.predictor = torch.randn(dim_out, dim_out, generator=g)
        self.encoder_fingerprint, self.similarity, self.fingerprint = encoder_fingerprint, similarity, "fakeheads-fp"
        self.config = types.SimpleNamespace(query_tower="predictor")

    def encode_documents(self, x):
        return x @ self.projection

    def encode_queries(self, x, tower):
        z = x @ self.projection
        return z @ self.predictor if tower == "predictor" else z


@pytest.fixture
def setup(tmp_path):
    """A tiny BEIR folder and a store of its ids: each query sits near one of its relevant documents."""
    root = write_beir(tmp_path / "beir" / "tiny")
    ds = BeirDataset("tiny", root)
    doc_ids, query_ids = read_corpus(ds.corpus_path)[0], read_queries(ds.queries_path)[0]
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(len(doc_ids), DIM)).astype(np.float32)
    qrels = {**read_qrels(ds.qrels_path("train")), **read_qrels(ds.qrels_path("test"))}
    queries = np.stack([docs[doc_ids.index(next(iter(qrels[q])))] + rng.normal(scale=0.8, size=DIM) for q in query_ids]).astype(np.float32)

    def make_store(name="store", drop_docs=(), drop_queries=(), rename=None, **kw):
        keep_d = [i for i, d in enumerate(doc_ids) if d not in drop_docs]
        keep_q = [i for i, q in enumerate(query_ids) if q not in drop_queries]
        ids = [(rename or {}).get(doc_ids[i], doc_ids[i]) for i in keep_d]
        return write_store(tmp_path / name, docs[keep_d], queries[keep_q], doc_ids=ids,
                           query_ids=[query_ids[i] for i in keep_q], dataset="tiny", **kw)

    return {"root": root, "docs": docs, "queries": queries, "doc_ids": doc_ids, "query_ids": query_ids,
            "make_store": make_store, "tmp": tmp_path}


def run_eval(setup, store, **kw):
    cfg = EvalConfig(datasets=[str(setup["root"])], store=str(store.path), k=10, out=str(setup["tmp"] / "out"), **kw)
    return evaluate(cfg, log=lambda s: None, heads=kw.pop("heads_obj", None))


def brute_force_run(docs, queries, doc_ids, query_ids, k=10, similarity="cos"):
    if similarity == "cos":
        docs = docs / np.linalg.norm(docs, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        s = queries @ docs.T
    else:
        s = -((queries[:, None] - docs[None]) ** 2).sum(-1)
    return {q: {doc_ids[j]: float(s[i, j]) for j in np.argsort(-s[i])[:k]} for i, q in enumerate(query_ids)}


def test_vanilla_matches_brute_force_and_writes_outputs(setup):
    store = setup["make_store"]()
    res = run_eval(setup, store)["datasets"]["tiny"]
    qrels = read_qrels(BeirDataset("tiny", setup["root"]).qrels_path("test"))
    want, _ = score(qrels, brute_force_run(setup["docs"], setup["queries"], setup["doc_ids"], setup["query_ids"]), recall_at=10)
    assert res["metrics"] == pytest.approx(want)
    assert res["store"]["imported"] and res["queries"] == {"judged": 6, "searched": 6, "without_vector": 0}
    out = setup["tmp"] / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved["datasets"]["tiny"]["metrics"] == pytest.approx(want)
    assert saved["datasets"]["tiny"]["store"]["fingerprint"] == store.fingerprint and saved["heads"] is None
    per_query = pq.read_table(out / "tiny" / "per_query.parquet").to_pydict()
    assert sorted(per_query["query_id"]) == sorted(qrels)
    assert pq.read_table(out / "tiny" / "run.parquet").num_rows == 60
    with open(out / "tiny" / "run.trec") as f:
        trec = pytrec_eval.parse_run(f)
    direct = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(trec)
    assert np.mean([v["ndcg_cut_10"] for v in direct.values()]) == pytest.approx(want["ndcg@10"])


def test_a_hit_with_the_query_id_is_ignored(setup):
    """Document d0 renamed to q6 (a test query), with q6's own vector: retrieved first, then dropped."""
    setup["docs"][0] = setup["queries"][setup["query_ids"].index("q6")]
    store = setup["make_store"](rename={"d0": "q6"})
    run_eval(setup, store)
    rows = pq.read_table(setup["tmp"] / "out" / "tiny" / "run.parquet").to_pylist()
    hits = [r["doc_id"] for r in rows if r["query_id"] == "q6"]
    assert "q6" not in hits and len(hits) == 10  # k+1 retrieved, so k remain


def test_missing_query_vector_scores_zero_and_strict_refuses(setup):
    store = setup["make_store"](drop_queries=("q6",))
    res = run_eval(setup, store)["datasets"]["tiny"]
    assert res["queries"] == {"judged": 6, "searched": 5, "without_vector": 1}
    per_query = {r["query_id"]: r for r in pq.read_table(setup["tmp"] / "out" / "tiny" / "per_query.parquet").to_pylist()}
    assert per_query["q6"]["ndcg@10"] == 0 and not per_query["q6"]["has_vector"]
    assert res["metrics"]["ndcg@10"] == pytest.approx(sum(r["ndcg@10"] for r in per_query.values()) / 6)
    with pytest.raises(UserError, match="strict"):
        run_eval(setup, store, strict=True)


def test_qrels_naming_absent_documents_are_misses_and_reported(setup):
    qrels = read_qrels(BeirDataset("tiny", setup["root"]).qrels_path("test"))
    gone = next(iter(qrels["q6"]))
    store = setup["make_store"](drop_docs=(gone,))
    res = run_eval(setup, store)["datasets"]["tiny"]
    absent = sum(gone in d for d in qrels.values())
    assert res["qrels"]["absent_docs"] == absent and gone in res["qrels"]["absent_examples"]
    with pytest.raises(UserError, match="strict"):
        run_eval(setup, store, strict=True)


def test_split_without_qrels_is_a_clear_error(setup):
    store = setup["make_store"]()
    with pytest.raises(UserError, match="no qrels for split 'dev'.*test, train"):
        run_eval(setup, store, split="dev")
    (setup["root"] / "qrels" / "empty.tsv").write_text("query-id\tcorpus-id\tscore\n")
    with pytest.raises(UserError, match="no judgements"):
        run_eval(setup, store, split="empty")


@pytest.mark.parametrize("tower", ["projection", "predictor"])
@pytest.mark.parametrize("similarity", ["cos", "l2"])
def test_heads_are_applied(setup, tower, similarity):
    store = setup["make_store"]()
    heads = FakeHeads(similarity=similarity)
    cfg = EvalConfig(datasets=[str(setup["root"])], store=str(store.path), k=10, out=str(setup["tmp"] / "out"), query_tower=tower)
    res = evaluate(cfg, log=lambda s: None, heads=heads)
    import torch

    docs = heads.encode_documents(torch.from_numpy(setup["docs"])).numpy()
    queries = heads.encode_queries(torch.from_numpy(setup["queries"]), tower).numpy()
    qrels = read_qrels(BeirDataset("tiny", setup["root"]).qrels_path("test"))
    want, _ = score(qrels, brute_force_run(docs, queries, setup["doc_ids"], setup["query_ids"], similarity=similarity), recall_at=10)
    assert res["datasets"]["tiny"]["metrics"] == pytest.approx(want)
    assert res["similarity"] == similarity and res["query_tower"] == tower
    assert res["heads"]["fingerprint"] == "fakeheads-fp"


def test_heads_of_another_encoder_are_refused(setup):
    store = setup["make_store"]()
    cfg = EvalConfig(datasets=[str(setup["root"])], store=str(store.path), out=str(setup["tmp"] / "out"))
    with pytest.raises(UserError, match="trained on encoder"):
        evaluate(cfg, log=lambda s: None, heads=FakeHeads(encoder_fingerprint="sha-of-another-encoder"))
    assert not (setup["tmp"] / "out" / "results.json").exists()


def test_option_errors(setup):
    store = setup["make_store"]()
    with pytest.raises(UserError, match="needs --heads"):
        run_eval(setup, store, query_tower="predictor")
    with pytest.raises(UserError, match="--query-tower vanilla"):
        evaluate(EvalConfig(datasets=[str(setup["root"])], store=str(store.path), query_tower="vanilla"), heads=FakeHeads())
    with pytest.raises(UserError, match="no encoder fingerprint"):
        evaluate(EvalConfig(datasets=[str(setup["root"])], store=str(store.path)), heads=FakeHeads(encoder_fingerprint=None))
    with pytest.raises(UserError, match="at least 10"):
        evaluate(EvalConfig(datasets=[str(setup["root"])], store=str(store.path), k=5))
    with pytest.raises(UserError, match="one store"):
        evaluate(EvalConfig(datasets=[str(setup["root"]), str(setup["root"].parent / "other")], store=str(store.path)))


def test_blockwise_and_approximate_agree_with_exact(setup):
    store = setup["make_store"]()
    whole = run_eval(setup, store)["datasets"]["tiny"]
    blocks = run_eval(setup, store, block_rows=7)["datasets"]["tiny"]
    assert blocks["search"]["blockwise"] and blocks["metrics"] == pytest.approx(whole["metrics"])
    torch_run = run_eval(setup, store, index="torch", block_rows=7)["datasets"]["tiny"]
    assert torch_run["metrics"] == pytest.approx(whole["metrics"])
    ivf = run_eval(setup, store, faiss_index="IVF2,Flat", faiss_params="nprobe=2", block_rows=20)["datasets"]["tiny"]
    assert ivf["search"]["recall_vs_exact"] == 1.0 and ivf["metrics"] == pytest.approx(whole["metrics"])


def test_ranking_is_deterministic_and_is_pytrec_evals(setup):
    """Groups of 4 identical documents (different ids), queries near one relevant member: FAISS or torch, any
    --block-rows, 1 or 2 threads write the same run; it is the float64 brute-force ranking with ties broken as
    trec_eval breaks them (larger id first), so the k kept are the first k of the full ranking and the rank of the
    first relevant document in our file is the one pytrec_eval's reciprocal rank sees."""

    docs, doc_ids, query_ids = setup["docs"], setup["doc_ids"], setup["query_ids"]
    docs[:] = docs[np.arange(len(docs)) // 4 * 4]
    qrels = read_qrels(BeirDataset("tiny", setup["root"]).qrels_path("test"))
    rng = np.random.default_rng(1)
    for i, q in enumerate(query_ids):
        first = doc_ids.index(next(iter(qrels.get(q, {"d0": 1}))))
        setup["queries"][i] = docs[first] + rng.normal(scale=0.3, size=DIM)
    store = setup["make_store"]()
    runs = {}
    for n_threads in (1, 2):
        with threads(n_threads):
            for index, rows in (("faiss", None), ("faiss", 7), ("torch", None), ("torch", 5)):
                out = setup["tmp"] / f"out-{n_threads}-{index}-{rows}"
                evaluate(EvalConfig(datasets=[str(setup["root"])], store=str(store.path), k=10, out=str(out), index=index,
                                    block_rows=rows), log=lambda s: None)
                runs[f"{index}, {n_threads} threads, blocks of {rows}"] = (out / "tiny" / "run.trec").read_text()
    first = runs["faiss, 1 threads, blocks of None"]
    for where, text in runs.items():
        assert text == first, where

    d, qv = docs.astype(np.float64), setup["queries"].astype(np.float64)
    s = ((qv @ d.T) / np.outer(np.linalg.norm(qv, axis=1), np.linalg.norm(d, axis=1))).astype(np.float32)
    ours = {}
    for line in first.splitlines():
        q, _, doc, rank, score, _ = line.split()
        ours.setdefault(q, []).append((doc, np.float32(score)))
    for q in qrels:
        i = query_ids.index(q)
        want = sorted(((doc_ids[j], s[i, j]) for j in range(len(doc_ids))), key=lambda t: (t[1], t[0]), reverse=True)[:10]
        assert ours[q] == want, q
    tied = sum(1 for docs_ in ours.values() for a, b in zip(docs_, docs_[1:]) if a[1] == b[1])
    assert tied >= 20  # the ties this test is about did happen
    with open(setup["tmp"] / "out-1-faiss-None" / "tiny" / "run.trec") as f:
        mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(pytrec_eval.parse_run(f))
    for q, docs_ in ours.items():
        ranks = [r for r, (doc, _) in enumerate(docs_, 1) if qrels[q].get(doc, 0) > 0]
        assert mrr[q]["recip_rank"] == (1 / ranks[0] if ranks else 0), q


def test_several_datasets_use_their_default_stores(tmp_path, monkeypatch):
    """`--dataset a,b`: each dataset's store at data/cache/<dataset>/<model folder>, one result each."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for name in ("alpha", "beta"):
        root = write_beir(tmp_path / "beir" / name, seed=len(name))
        ds = BeirDataset(name, root)
        n_docs, n_queries = len(read_corpus(ds.corpus_path)[0]), len(read_queries(ds.queries_path)[0])
        write_store(Path("data/cache") / name / "some-model", rng.normal(size=(n_docs, DIM)).astype(np.float32),
                    rng.normal(size=(n_queries, DIM)).astype(np.float32), dataset=name)
    res = evaluate(EvalConfig(datasets=["alpha,beta", "alpha"], data_dir=str(tmp_path / "beir"), model="some-model"),
                   log=lambda s: None)
    assert list(res["datasets"]) == ["alpha", "beta"]
    assert Path(res["out"]) == Path("runs/eval/alpha+beta-test-vanilla-cos-Flat")
    assert (Path(res["out"]) / "beta" / "run.trec").is_file()
    with pytest.raises(UserError, match="store of dataset 'alpha', not 'beta'"):
        evaluate(EvalConfig(datasets=["beta"], data_dir=str(tmp_path / "beir"), store="data/cache/alpha/some-model"))


def test_cli_eval(setup):
    from typer.testing import CliRunner

    from jepa_cache.cli import app

    store = setup["make_store"]()
    result = CliRunner().invoke(app, ["eval", "--dataset", str(setup["root"]), "--store", str(store.path), "--k", "10",
                                      "--out", str(setup["tmp"] / "cli")], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "imported" in result.output and "NDCG@10" in result.output
    assert (setup["tmp"] / "cli" / "results.json").is_file()


# --- the published numbers, from the shared reference vectors (skipped where ../shared is absent) ---

PUBLISHED = {"scifact": 0.6557, "nfcorpus": 0.3329, "arguana": 0.4652}  # MTEB, all-mpnet-base-v2
RUNS = Path(__file__).resolve().parents[1] / "data" / "runs"
needs_shared = pytest.mark.skipif(not (SHARED / "embeddings" / "scifact").is_dir(), reason="../shared reference data absent")


@needs_shared
def test_imported_scifact_reference_reproduces_mteb(tmp_path):
    from jepa_cache.config import ImportConfig
    from jepa_cache.importer import import_vectors

    ref = SHARED / "embeddings" / "scifact"
    store = import_vectors(ImportConfig(dataset="scifact", data_dir=str(SHARED / "beir"), corpus=str(ref / "corpus.f32.npy"),
                                        corpus_ids=str(ref / "corpus.ids.txt"), queries=str(ref / "queries.f32.npy"),
                                        query_ids=str(ref / "queries.ids.txt"), out=str(tmp_path / "store")), log=lambda s: None)
    res = evaluate(EvalConfig(datasets=["scifact"], data_dir=str(SHARED / "beir"), store=str(store.path), out=str(tmp_path / "eval")),
                   log=lambda s: None)["datasets"]["scifact"]
    assert res["metrics"]["ndcg@10"] == pytest.approx(PUBLISHED["scifact"], abs=0.003)
    assert res["store"]["imported"] and res["queries"]["searched"] == 300
    # the ranking and its scores do not depend on the machine, threads or BLAS: the committed run, byte for byte
    with gzip.open(RUNS / "scifact-vanilla-mpnet.trec.gz", "rt") as f:
        assert Path(res["files"]["trec"]).read_text() == f.read()


@needs_shared
@pytest.mark.parametrize("path", sorted(RUNS.glob("*-vanilla-mpnet*.trec.gz")), ids=lambda p: p.name)
def test_committed_trec_runs_rescore_to_the_readme_numbers(path):
    """data/runs/<dataset>-vanilla-mpnet[-built].trec.gz (imported, or our own build) re-scored by pytrec_eval alone
    gives the published NDCG@10."""
    dataset = path.name.split("-")[0]
    qrels = read_qrels(SHARED / "beir" / dataset / "qrels" / "test.tsv")
    with gzip.open(path, "rt") as f:
        run = pytrec_eval.parse_run(f)
    assert set(run) == set(qrels)  # every judged query is in the run, so pytrec_eval skips none
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    assert np.mean([v["ndcg_cut_10"] for v in per_query.values()]) == pytest.approx(PUBLISHED[dataset], abs=0.003)
