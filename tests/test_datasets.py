"""BEIR readers: exact round trips (property-based), and every malformed line named with its file and line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_beir
from jepa_cache.datasets import (
    BeirDataset,
    corpus_text,
    data_root,
    find_dataset,
    iter_records,
    read_corpus,
    read_ids,
    read_qrels,
    read_queries,
)
from jepa_cache.errors import UserError

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ids_st = st.text(min_size=1, max_size=12).filter(lambda s: s != "")
texts_st = st.one_of(st.none(), st.text(max_size=40))
docs_st = st.lists(st.tuples(ids_st, texts_st, texts_st), min_size=1, max_size=20, unique_by=lambda d: d[0])


def write_jsonl(path: Path, records, gz: bool = False) -> Path:
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


@PROPS
@given(docs=docs_st, gz=st.booleans(), ensure_ascii=st.booleans())
def test_corpus_round_trip(tmp_path_factory, docs, gz, ensure_ascii):
    """Any ids and texts (unicode, newlines, tabs, quotes) come back exactly, in file order, from plain or .gz."""
    path = tmp_path_factory.mktemp("c") / ("corpus.jsonl.gz" if gz else "corpus.jsonl")
    records = [json.dumps({"_id": i, "title": t, "text": x}, ensure_ascii=ensure_ascii) for i, t, x in docs]
    write_jsonl(path, records, gz)
    ids, texts = read_corpus(path)
    assert ids == [d[0] for d in docs]
    assert texts == [f"{t or ''} {x or ''}".strip() for _, t, x in docs]
    assert read_ids(path) == ids


@PROPS
@given(queries=st.lists(st.tuples(ids_st, st.text(max_size=30)), min_size=1, max_size=20, unique_by=lambda q: q[0]))
def test_queries_round_trip(tmp_path_factory, queries):
    path = write_jsonl(tmp_path_factory.mktemp("q") / "queries.jsonl", [{"_id": i, "text": t, "metadata": {}} for i, t in queries])
    assert read_queries(path) == ([q[0] for q in queries], [q[1] for q in queries])


tsv_field = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=10).filter(
    lambda s: s.strip() == s and s != "" and "\t" not in s and s.lower() not in {"query-id", "query_id", "qid"}
)


@PROPS
@given(
    rows=st.lists(st.tuples(tsv_field, tsv_field, st.integers(-2, 5)), min_size=1, max_size=30),
    header=st.booleans(),
    crlf=st.booleans(),
)
def test_qrels_round_trip(tmp_path_factory, rows, header, crlf):
    """Header optional, CRLF tolerated, graded scores kept; a later line for the same pair wins."""
    nl = "\r\n" if crlf else "\n"
    lines = (["query-id\tcorpus-id\tscore"] if header else []) + [f"{q}\t{d}\t{s}" for q, d, s in rows]
    path = tmp_path_factory.mktemp("r") / "test.tsv"
    path.write_bytes((nl.join(lines) + nl).encode())
    want: dict[str, dict[str, int]] = {}
    for q, d, s in rows:
        want.setdefault(q, {})[d] = s
    assert read_qrels(path) == want


@PROPS
@given(lines=st.lists(st.text(max_size=30), min_size=1, max_size=8))
def test_arbitrary_lines_parse_or_fail_with_file_and_line(tmp_path_factory, lines):
    """Whatever a line holds, the reader returns records or raises a UserError that names the file (never another error)."""
    path = tmp_path_factory.mktemp("g") / "corpus.jsonl"
    path.write_text("\n".join(line.replace("\r", "") for line in lines) + "\n", encoding="utf-8", errors="surrogatepass")
    try:
        read_corpus(path)
    except UserError as e:
        assert str(e).startswith(str(path))


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"_id": "a", "text": "x"}', '{"_id": "b", "text": "y"', '{"_id": "c"}'], r"corpus\.jsonl: line 2: malformed JSON"),
        (['{"_id": "a"}', '', '{"text": "no id"}'], r"line 3: missing '_id'"),
        (['{"_id": ""}'], r"line 1: missing '_id'"),
        (['{"_id": ["a"]}'], r"line 1: '_id' must be a string or an integer"),
        (['{"_id": "a"}', '{"_id": "b"}', '{"_id": "a"}'], r"line 3: duplicate _id 'a' \(first on line 1\)"),
        (['{"_id": 7}', '{"_id": "7"}'], r"line 2: duplicate _id '7'"),
        (['["not", "an", "object"]'], r"line 1: expected a JSON object, got list"),
        (['{"_id": "a", "title": 5}'], r"line 1: field 'title' must be a string"),
        ([], r"no records; the file is empty"),
        (["", "  "], r"no records; the file is empty"),
    ],
)
def test_bad_corpus_lines_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(UserError, match=message) as err:
        read_corpus(path)
    assert str(err.value).startswith(str(path))


def test_unreadable_files(tmp_path):
    (tmp_path / "corpus.jsonl.gz").write_bytes(gzip.compress(b'{"_id": "a"}\n' * 100)[:-20])
    with pytest.raises(UserError, match="truncated or not UTF-8"):
        read_corpus(tmp_path / "corpus.jsonl.gz")
    (tmp_path / "latin1.jsonl").write_bytes('{"_id": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        read_corpus(tmp_path / "latin1.jsonl")
    with pytest.raises(UserError, match="file not found"):
        read_corpus(tmp_path / "absent.jsonl")


@pytest.mark.parametrize(
    "text, message",
    [
        ("q1\td1\n", r"line 1: expected 3 tab-separated columns"),
        ("query-id\tcorpus-id\tscore\nq1\td1\tone\n", r"line 2: score 'one' is not an integer"),
        ("q1\t\t1\n", r"line 1: empty query-id or corpus-id"),
        ("query-id\tcorpus-id\tscore\n", r"no judgements; the split is empty"),
    ],
)
def test_bad_qrels_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "test.tsv"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        read_qrels(path)


def test_dataset_folder_lookup(tmp_path, monkeypatch):
    root = tmp_path / "beir"
    write_beir(root / "tiny", n_docs=5, n_queries=4, gz=True)
    monkeypatch.delenv("JEPA_CACHE_DATA", raising=False)
    assert data_root(None) == Path("data/beir")
    monkeypatch.setenv("JEPA_CACHE_DATA", str(root))
    assert data_root(None) == root and data_root(tmp_path / "x") == tmp_path / "x"
    ds = find_dataset("tiny")
    assert ds == BeirDataset("tiny", root / "tiny") and ds.corpus_path.name == "corpus.jsonl.gz"
    assert find_dataset(str(root / "tiny")).root == root / "tiny"
    assert set(ds.file_hashes()) == {"corpus.jsonl.gz", "queries.jsonl.gz", "qrels/test.tsv", "qrels/train.tsv"}
    with pytest.raises(UserError, match=r"no qrels for split 'dev'.*splits here: test, train"):
        ds.qrels_path("dev")
    with pytest.raises(UserError, match="not found under"):
        find_dataset("absent", download=False)
    with pytest.raises(UserError, match="does not exist"):
        find_dataset(str(tmp_path / "no" / "such"))
    (root / "empty").mkdir()
    with pytest.raises(UserError, match="no corpus.jsonl or corpus.jsonl.gz"):
        find_dataset("empty").corpus_path


def test_iter_records_streams_with_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "title": "T", "text": "x"}, "", {"_id": 2, "text": "y"}])
    assert list(iter_records(path, corpus_text)) == [(1, "a", "T x"), (3, "2", "y")]
