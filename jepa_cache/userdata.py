"""Your own data as a BEIR folder: corpus, queries and labels from the tables people have.

JSONL, CSV/TSV or Parquet in; labels as BEIR qrels or as sentence-transformers' text pairs (README:
Your own data). Texts without ids get a stable one (a hash of the text), and every input is checked
before anything is written: a bad row is one line with file, line and column.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .datasets import corpus_text, iter_jsonl, read_qrels
from .errors import UserError
from .files import atomic_write_json, sha256_file

ID_COLUMNS = ("_id", "id")
QUERY_COLUMNS = ("anchor", "query")
_SPLIT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_NEGATIVE = re.compile(r"^negative(_\d+)?$")


def _format(path: Path) -> str:
    name = path.name.lower()
    for suffixes, kind in (
        ((".jsonl", ".jsonl.gz"), "jsonl"),
        ((".csv",), "csv"),
        ((".tsv",), "tsv"),
        ((".parquet", ".pq"), "parquet"),
    ):
        if name.endswith(suffixes):
            return kind
    raise UserError(f"{path}: unknown table format; use .jsonl, .csv, .tsv or .parquet")


def iter_table(path: Path) -> tuple[list[str] | None, Iterator[tuple[str, dict]]]:
    """The columns (None for JSONL, whose objects may differ) and ("line N" or "row N", row) of each row."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    kind = _format(path)
    if kind == "jsonl":
        return None, ((f"line {lineno}", obj) for lineno, obj in iter_jsonl(path))
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise UserError(f"{path}: unreadable Parquet ({e})") from None

        def rows() -> Iterator[tuple[str, dict]]:
            n = 0
            for batch in table.iter_batches(batch_size=8192):
                for row in batch.to_pylist():
                    n += 1
                    yield f"row {n}", row

        return list(table.schema_arrow.names), rows()
    return _csv_table(path, "," if kind == "csv" else "\t")


def _csv_table(path: Path, delimiter: str) -> tuple[list[str], Iterator[tuple[str, dict]]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents exceed csv's default 128 KiB field limit
    try:
        f = open(path, encoding="utf-8-sig", newline="")
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 ({e.reason})") from None
    if not header:
        f.close()
        raise UserError(f"{path}: empty; the first line must name the columns")
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        f.close()
        raise UserError(f"{path}: line 1: repeated column names ({', '.join(header)})")

    def rows() -> Iterator[tuple[str, dict]]:
        with f:
            start = reader.line_num + 1
            try:
                for values in reader:
                    where = f"line {start}"
                    start = reader.line_num + 1
                    if not values or all(not v.strip() for v in values):
                        continue
                    if len(values) != len(header):
                        raise UserError(
                            f"{path}: {where}: {len(values)} fields, but the header names {len(header)} columns"
                        )
                    yield where, dict(zip(header, values))
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: line {start}: not UTF-8 ({e.reason})") from None
            except csv.Error as e:
                raise UserError(
                    f"{path}: line {reader.line_num}: not a {'CSV' if delimiter == ',' else 'TSV'} row ({e})"
                ) from None

    return header, rows()


def _column(
    path: Path, columns: list[str] | None, row: dict, where: str, candidates: tuple[str, ...], what: str
) -> str | None:
    """The first of `candidates` the table has (None when it has none)."""
    have = columns if columns is not None else list(row)
    found = next((c for c in candidates if c in have), None)
    if found is None and what:
        names = " or ".join(repr(c) for c in candidates)
        raise UserError(
            f"{path}: {where if columns is None else 'header'}: no column {names} ({what}); "
            f"columns: {', '.join(map(str, have))}"
        )
    return found


def _text(path: Path, where: str, row: dict, column: str, required: bool = True, is_id: bool = False) -> str:
    value = row.get(column)
    if isinstance(value, int) and not isinstance(value, bool) and is_id:
        value = str(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise UserError(f"{path}: {where}, column {column!r}: empty")
        return ""
    if not isinstance(value, str):
        raise UserError(f"{path}: {where}, column {column!r}: expected text, got {type(value).__name__}")
    if is_id and any(c in value for c in "\t\r\n"):
        raise UserError(f"{path}: {where}, column {column!r}: an id cannot hold tabs or line breaks")
    return value.strip() if is_id else value


def text_id(prefix: str, text: str) -> str:
    """A stable id for a text without one: the same text always gets the same id."""
    return f"{prefix}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}"


@dataclass
class Records:
    """Documents or queries by id, in first-seen order, with a text → id index for pairs."""

    prefix: str
    items: dict[str, dict] = field(default_factory=dict)  # id -> record as written ({_id, title?, text})
    seen_at: dict[str, str] = field(default_factory=dict)  # id -> "file: line N"
    by_text: dict[str, str] = field(default_factory=dict)

    def add(self, record: dict, text: str, origin: str) -> str:
        doc_id = record["_id"]
        if doc_id in self.items:
            if self.items[doc_id] != record:
                raise UserError(
                    f"{origin}: id {doc_id!r} again with a different text (first at {self.seen_at[doc_id]})"
                )
            return doc_id
        self.items[doc_id], self.seen_at[doc_id] = record, origin
        self.by_text.setdefault(text, doc_id)
        return doc_id

    def of_text(self, text: str, origin: str, title: bool) -> str:
        """The id of the record with this exact text, added under a hash id when there is none."""
        if text in self.by_text:
            return self.by_text[text]
        record = {"_id": text_id(self.prefix, text), **({"title": ""} if title else {}), "text": text}
        return self.add(record, text, origin)


def read_records(path: Path, records: Records, title: bool) -> int:
    """Add a corpus (title=True) or queries table to `records`; returns the rows read."""
    columns, rows = iter_table(path)
    n = 0
    id_column: str | None = None
    for where, row in rows:
        if n == 0:
            id_column = _column(path, columns, row, where, ID_COLUMNS, "")
            _column(path, columns, row, where, ("text",), "the text")
        n += 1
        text = _text(path, where, row, "text")
        record_title = _text(path, where, row, "title", required=False) if title else ""
        full = corpus_text({"title": record_title, "text": text}) if title else text
        if id_column is not None:
            doc_id = _text(path, where, row, id_column, is_id=True)
        else:
            doc_id = text_id(records.prefix, full)
        record = {"_id": doc_id, **({"title": record_title} if title else {}), "text": text}
        records.add(record, full, f"{path}: {where}")
        records.by_text.setdefault(text, doc_id)  # a pair may quote a document's text without its title
    if n == 0:
        raise UserError(f"{path}: no rows")
    return n


def read_pairs(path: Path, corpus: Records, queries: Records) -> tuple[dict[str, dict[str, int]], list[dict]]:
    """qrels (score 1 per pair) and (query, positive, negative) id triples from a table of text pairs."""
    columns, rows = iter_table(path)
    qrels: dict[str, dict[str, int]] = {}
    triples: list[dict] = []
    query_col: str | None = None
    negatives: list[str] = []
    n = 0
    for where, row in rows:
        if n == 0 or columns is None:
            query_col = _column(path, columns, row, where, QUERY_COLUMNS, "the query text")
            _column(path, columns, row, where, ("positive",), "the relevant document's text")
            negatives = [c for c in (columns if columns is not None else row) if _NEGATIVE.match(str(c))]
        n += 1
        origin = f"{path}: {where}"
        qid = queries.of_text(_text(path, where, row, query_col), origin, title=False)
        pid = corpus.of_text(_text(path, where, row, "positive"), origin, title=True)
        qrels.setdefault(qid, {})[pid] = 1
        for column in negatives:
            text = _text(path, where, row, column, required=False)
            if text:
                nid = corpus.of_text(text, origin, title=True)
                if nid == pid:
                    raise UserError(f"{path}: {where}, column {column!r}: the negative is the positive document")
                triples.append({"query_id": qid, "doc_id": pid, "negative_id": nid})
    if n == 0:
        raise UserError(f"{path}: no rows")
    return qrels, triples


def split_arg(value: str, option: str) -> tuple[str, Path]:
    """`SPLIT=FILE` or `FILE` (split train)."""
    split, sep, file = value.partition("=")
    if not sep or os.sep in split:
        split, file = "train", value
    if not _SPLIT.match(split):
        raise UserError(
            f"{option} {value!r}: split {split!r} must be letters, digits, '.', '_' or '-' (e.g. {option} test=FILE)"
        )
    return split, Path(file)


def _check_args(out: Path, corpus: str | None, queries: str | None, pairs: list[str], overwrite: bool) -> None:
    """Refuse missing documents or queries, and an `out` that is a file or a non-empty folder without --overwrite."""
    if corpus is None and not pairs:
        raise UserError("give the documents: --corpus FILE, or --pairs FILE whose texts become the corpus")
    if queries is None and not pairs:
        raise UserError("give the queries: --queries FILE, or --pairs FILE whose texts become the queries")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; --out names the dataset folder to write")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: exists and is not empty; pass --overwrite to replace it")


def _read_labels(
    qrels: list[str], pairs: list[str], docs: Records, qs: Records, inputs: dict[str, dict]
) -> tuple[dict[str, dict[str, dict[str, int]]], dict[str, list[dict]]]:
    """Judgements per split from the qrels and pair files, and hard-negative triples per split; inputs recorded."""
    labels: dict[str, dict[str, dict[str, int]]] = {}
    triples: dict[str, list[dict]] = {}
    for value in qrels:
        split, path = split_arg(value, "--qrels")
        judged = read_qrels(path)
        for qid, row in judged.items():
            if qid not in qs.items:
                raise UserError(
                    f"{path}: query-id {qid!r} is not in the queries; check the ids (or the --queries file)"
                )
            for did, score in row.items():
                if did not in docs.items:
                    raise UserError(f"{path}: corpus-id {did!r} (query {qid!r}) is not in the corpus; check the ids")
                labels.setdefault(split, {}).setdefault(qid, {})[did] = score
        inputs[f"qrels {split}"] = {"path": str(path.resolve()), "sha256": sha256_file(path)}
    for value in pairs:
        split, path = split_arg(value, "--pairs")
        judged, found = read_pairs(path, docs, qs)
        for qid, row in judged.items():
            labels.setdefault(split, {}).setdefault(qid, {}).update(row)
        if found:
            triples.setdefault(split, []).extend(found)
        inputs[f"pairs {split}"] = {"path": str(path.resolve()), "sha256": sha256_file(path)}
    return labels, triples


def _write_folder(partial: Path, docs: Records, qs: Records, labels: dict, triples: dict, inputs: dict) -> None:
    """Write the BEIR files and prepare.json into the new folder `partial`."""
    partial.mkdir(parents=True)
    _write_jsonl(partial / "corpus.jsonl", docs.items.values())
    _write_jsonl(partial / "queries.jsonl", qs.items.values())
    (partial / "qrels").mkdir()
    for split, judged in labels.items():
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, row in judged.items() for d, s in row.items()]
        (partial / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for split, rows in triples.items():
        (partial / "pairs").mkdir(exist_ok=True)
        _write_jsonl(partial / "pairs" / f"{split}.jsonl", rows)
    atomic_write_json(
        partial / "prepare.json",
        {
            "inputs": inputs,
            "documents": len(docs.items),
            "queries": len(qs.items),
            "splits": {
                s: {"queries": len(j), "judgements": sum(map(len, j.values())), "triples": len(triples.get(s, []))}
                for s, j in labels.items()
            },
            "ids": "given ids kept; texts without one: doc-/q- + the first 16 hex digits of the text's sha256",
        },
    )


def prepare_data(
    out: str | os.PathLike,
    corpus: str | None = None,
    queries: str | None = None,
    qrels: list[str] = (),
    pairs: list[str] = (),
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Write `out` as a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv[, pairs/<split>.jsonl]).

    Args:
        corpus, queries: tables with ids (or without: hashed) and texts.
        qrels: BEIR qrels TSV files, each `SPLIT=FILE` (or `FILE` for split train); ids must exist.
        pairs: tables of text pairs, each `SPLIT=FILE`; their texts join the corpus and queries.
    """
    out = Path(out)
    _check_args(out, corpus, queries, pairs, overwrite)

    docs, qs = Records("doc"), Records("q")
    inputs: dict[str, dict] = {}
    if corpus is not None:
        read_records(Path(corpus), docs, title=True)
        inputs["corpus"] = {"path": str(Path(corpus).resolve()), "sha256": sha256_file(corpus)}
    if queries is not None:
        read_records(Path(queries), qs, title=False)
        inputs["queries"] = {"path": str(Path(queries).resolve()), "sha256": sha256_file(queries)}
    labels, triples = _read_labels(qrels, pairs, docs, qs, inputs)

    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _write_folder(partial, docs, qs, labels, triples, inputs)
        if out.is_dir():
            shutil.rmtree(out)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    splits = (
        ", ".join(
            f"{s} {len(j)} queries" + (f" + {len(triples[s])} hard-negative triples" if s in triples else "")
            for s, j in labels.items()
        )
        or "no labels"
    )
    log(f"{out}: {len(docs.items)} documents, {len(qs.items)} queries; {splits}")
    return out


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
