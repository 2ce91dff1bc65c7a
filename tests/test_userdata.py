"""prepare-data: the tables people have (JSONL / CSV / Parquet, BEIR qrels or text pairs) become a BEIR folder
that the rest of the pipeline reads; bad rows are one line with file, line and column."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import minilm_folder
from jepa_cache.datasets import find_dataset, read_corpus, read_qrels, read_queries
from jepa_cache.userdata import text_id

DOCS = [
    {"id": "a", "title": "Cells", "text": "A cell is the smallest unit of life."},
    {"id": "b", "title": "", "text": "A gene is a unit of heredity."},
    {"id": "c", "title": "Fruit", "text": "Bananas are yellow and rich in potassium."},
    {"id": "d", "title": "Sleep", "text": "Adults need seven to nine hours of sleep."},
]
QUERIES = [{"id": "q1", "text": "what is a cell"}, {"id": "q2", "text": "how much sleep do adults need"}]


def write_table(path, rows: list[dict]):
    """rows as .jsonl, .csv or .parquet, by suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def beir(root):
    ds = find_dataset(str(root))
    return read_corpus(ds.corpus_path), read_queries(ds.queries_path), ds


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_corpus_queries_and_qrels_in_each_format(suffix, tmp_path, cli):
    corpus = write_table(tmp_path / f"corpus{suffix}", [{"_id" if suffix == ".jsonl" else "id": d["id"], "title": d["title"],
                                                         "text": d["text"]} for d in DOCS])
    queries = write_table(tmp_path / f"queries{suffix}", QUERIES)
    (tmp_path / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\ta\t1\nq2\td\t2\n")
    code, err = cli(["prepare-data", "--corpus", str(corpus), "--queries", str(queries), "--qrels", f"test={tmp_path / 'test.tsv'}",
                     "--out", str(tmp_path / "mine")])
    assert code == 0, err
    (ids, texts), (qids, qtexts), ds = beir(tmp_path / "mine")
    assert ids == ["a", "b", "c", "d"] and texts[0] == "Cells A cell is the smallest unit of life." and texts[1] == DOCS[1]["text"]
    assert qids == ["q1", "q2"] and qtexts == [q["text"] for q in QUERIES]
    assert read_qrels(ds.qrels_path("test")) == {"q1": {"a": 1}, "q2": {"d": 2}}


@pytest.mark.parametrize("layout", ["anchor", "query"])
@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_text_pairs_with_hard_negatives(layout, suffix, tmp_path, cli):
    corpus = write_table(tmp_path / "corpus.parquet", DOCS)
    pairs = write_table(tmp_path / f"train{suffix}", [
        {layout: "what is a cell", "positive": "Cells A cell is the smallest unit of life.", "negative": "A gene is a unit of heredity."},
        {layout: "what is a cell", "positive": "Cells make up every organism.", "negative": "Bananas are yellow."},
        {layout: "yellow fruit", "positive": "Bananas are yellow.", "negative": "Adults need seven to nine hours of sleep."},
    ])
    code, err = cli(["prepare-data", "--corpus", str(corpus), "--pairs", str(pairs), "--out", str(tmp_path / "mine")])
    assert code == 0, err
    (ids, texts), (qids, qtexts), ds = beir(tmp_path / "mine")
    # the corpus' own documents keep their ids; a pair text equal to one of them (title + text, or text) is that document;
    # new texts are added once
    new_cell, bananas = text_id("doc", "Cells make up every organism."), text_id("doc", "Bananas are yellow.")
    assert ids == ["a", "b", "c", "d", new_cell, bananas]
    q_cell, q_fruit = text_id("q", "what is a cell"), text_id("q", "yellow fruit")
    assert qids == [q_cell, q_fruit]
    assert read_qrels(ds.qrels_path("train")) == {q_cell: {"a": 1, new_cell: 1}, q_fruit: {bananas: 1}}
    triples = [json.loads(line) for line in (tmp_path / "mine" / "pairs" / "train.jsonl").read_text().splitlines()]
    assert triples == [{"query_id": q_cell, "doc_id": "a", "negative_id": "b"},
                       {"query_id": q_cell, "doc_id": new_cell, "negative_id": bananas},
                       {"query_id": q_fruit, "doc_id": bananas, "negative_id": "d"}]  # d's text without its title


def test_ids_are_stable_across_runs(tmp_path, cli):
    pairs = write_table(tmp_path / "p.csv", [{"anchor": "x y", "positive": "some text"}])
    for out in ("one", "two"):
        assert cli(["prepare-data", "--pairs", str(pairs), "--out", str(tmp_path / out)])[0] == 0
    assert (tmp_path / "one" / "corpus.jsonl").read_text() == (tmp_path / "two" / "corpus.jsonl").read_text()
    assert (tmp_path / "one" / "qrels" / "train.tsv").read_text() == (tmp_path / "two" / "qrels" / "train.tsv").read_text()


@pytest.mark.parametrize("name, content, expected", [
    ("p.csv", "anchor,positive\nq one,doc one\nq two,\n", "p.csv: line 3, column 'positive': empty"),
    ("p.csv", "anchor,positive\n\"q\none\",doc one\nq two,doc\",x\n", "p.csv: line 4: 3 fields, but the header names 2 columns"),
    ("p.csv", "question,positive\nq,d\n", "p.csv: header: no column 'anchor' or 'query'"),
    ("p.jsonl", '{"query": "q", "positive": "d"}\n{"query": "q2", "positive": 7}\n', "p.jsonl: line 2, column 'positive': expected text, got int"),
    ("p.jsonl", '{"query": "q", "positive": "d"}\nnot json\n', "p.jsonl: line 2: malformed JSON"),
    ("p.csv", "anchor,positive,negative\nq,same,same\n", "p.csv: line 2, column 'negative': the negative is the positive document"),
    ("p.txt", "anchor,positive\nq,d\n", "p.txt: unknown table format"),
])
def test_bad_pairs_rows(name, content, expected, tmp_path, cli):
    (tmp_path / name).write_text(content)
    code, err = cli(["prepare-data", "--pairs", str(tmp_path / name), "--out", str(tmp_path / "mine")])
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {tmp_path / expected}") and not (tmp_path / "mine").exists(), err


def test_bad_corpus_rows(tmp_path, cli):
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": ["one", None, "three"]}), tmp_path / "c.parquet")
    code, err = cli(["prepare-data", "--corpus", str(tmp_path / "c.parquet"), "--queries", str(tmp_path / "c.parquet"), "--out", str(tmp_path / "o")])
    assert code == 2 and err == f"error: {tmp_path / 'c.parquet'}: row 2, column 'text': empty\n"
    write_table(tmp_path / "c.jsonl", [{"_id": "a", "text": "one"}, {"_id": "a", "text": "other"}])
    code, err = cli(["prepare-data", "--corpus", str(tmp_path / "c.jsonl"), "--queries", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "o")])
    assert code == 2 and "c.jsonl: line 2: id 'a' again with a different text (first at" in err
    write_table(tmp_path / "q.csv", QUERIES)
    write_table(tmp_path / "d.csv", DOCS)
    (tmp_path / "qrels.tsv").write_text("q1\tzz\t1\n")
    code, err = cli(["prepare-data", "--corpus", str(tmp_path / "d.csv"), "--queries", str(tmp_path / "q.csv"),
                     "--qrels", str(tmp_path / "qrels.tsv"), "--out", str(tmp_path / "o")])
    assert code == 2 and "corpus-id 'zz' (query 'q1') is not in the corpus" in err


def test_store_remembers_its_dataset_folder(tmp_path, tiny_model, monkeypatch):
    """A store built from a folder outside the data root trains without --dataset (it used to try to download <name>.zip)."""
    from conftest import write_beir
    from jepa_cache.build import build
    from jepa_cache.config import BuildConfig, TrainConfig
    from jepa_cache.errors import UserError
    from jepa_cache.train import train

    data = write_beir(tmp_path / "elsewhere" / "mydata")
    store = build(BuildConfig(dataset=str(data), model=str(tiny_model), out=str(tmp_path / "store"), dtype="float32",
                              shard_rows=16, chunk_rows=8, batch_size=8), log=lambda s: None)
    assert store.provenance["dataset"]["path"] == str(data.resolve())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JEPA_CACHE_DATA", str(tmp_path / "empty"))
    cfg = dict(store=str(store.path), out=str(tmp_path / "heads"), preset="jepa", output_dim=16, epochs=1, batch_size=4,
               device="cpu", projection_hidden=16, predictor_hidden=16)
    train(TrainConfig(**cfg), log=lambda s: None)
    assert (tmp_path / "heads" / "heads.json").is_file()
    # the folder changed since: refused with a clear word, not trained on other texts
    (data / "corpus.jsonl").write_text((data / "corpus.jsonl").read_text().replace("protein", "proteins"))
    with pytest.raises(UserError, match="has changed since"):
        train(TrainConfig(**{**cfg, "out": str(tmp_path / "heads2")}), log=lambda s: None)


@pytest.mark.slow
def test_own_data_end_to_end_with_minilm(tmp_path, cli, monkeypatch):
    """A 3-column CSV of (query, positive, negative) texts and a Parquet corpus: prepare → build (MiniLM) → train-heads → eval → export."""
    from sentence_transformers import SentenceTransformer

    rng = np.random.default_rng(0)
    topics = ["protein folding", "heart disease", "sleep apnea", "vitamin d", "gene editing", "virus spread", "brain injury",
              "blood pressure", "immune response", "drug dosage", "cancer screening", "diet and weight"]
    docs = [{"id": f"x{i}", "title": t.title(), "text": f"A study of {t} in {n} patients found {w} effects."}
            for i, (t, n, w) in enumerate((t, int(rng.integers(10, 900)), w) for t in topics for w in ("small", "large"))]
    pq.write_table(pa.Table.from_pylist(docs), tmp_path / "corpus.parquet")
    def rows(words):
        return [{"query": f"{w} {t}", "positive": f"{t.title()} A study of {t} in patients.", "negative": docs[(i + 3) % len(docs)]["text"]}
                for i, t in enumerate(topics) for w in words]
    write_table(tmp_path / "train.csv", rows(["effects of", "research on"]))
    write_table(tmp_path / "test.csv", rows(["what about"]))
    monkeypatch.chdir(tmp_path)
    assert cli(["prepare-data", "--corpus", "corpus.parquet", "--pairs", "train=train.csv", "--pairs", "test=test.csv", "--out", "mine"])[0] == 0
    model = str(minilm_folder())
    code, err = cli(["build", "--dataset", "mine", "--data-dir", ".", "--model", model, "--out", "store"])
    assert code == 0, err
    code, err = cli(["train-heads", "--store", "store", "--pairs", "mine/pairs/train.jsonl", "--preset", "jepa", "--output-dim", "0",
                     "--init", "identity", "--epochs", "2", "--batch-size", "8", "--out", "heads"])
    assert code == 0, err
    code, err = cli(["eval", "--dataset", "./mine", "--store", "store", "--heads", "heads", "--out", "eval"])
    assert code == 0, err
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["datasets"]["mine"]["metrics"]["ndcg@10"] > 0
    code, err = cli(["export", "--heads", "heads", "--out", "exported"])
    assert code == 0, err
    st = SentenceTransformer(str(tmp_path / "exported"), device="cpu")
    assert st.encode_query(["what about sleep apnea"]).shape == (1, 384)
