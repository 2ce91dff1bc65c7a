"""BEIR folders: corpus.jsonl / queries.jsonl (plain or .gz) and qrels/<split>.tsv.

Errors name the file and the line, because users feed their own copies of these files.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError
from .files import check_name, sha256_file

DATA_ENV = "JEPA_CACHE_DATA"
DEFAULT_DATA_DIR = Path("data/beir")


def corpus_text(doc: dict) -> str:
    """BEIR/MTEB document text: `(title + " " + text).strip()`."""
    return f"{doc.get('title') or ''} {doc.get('text') or ''}".strip()


CORPUS_TEMPLATE = '(title + " " + text).strip()'
QUERY_TEMPLATE = "text"


@dataclass(frozen=True)
class BeirDataset:
    """A BEIR dataset folder on disk."""

    name: str
    root: Path

    def _find(self, stem: str) -> Path:
        for candidate in (self.root / f"{stem}.jsonl", self.root / f"{stem}.jsonl.gz"):
            if candidate.is_file():
                return candidate
        raise UserError(f"{self.root}: no {stem}.jsonl or {stem}.jsonl.gz; is this a BEIR dataset folder?")

    @property
    def corpus_path(self) -> Path:
        return self._find("corpus")

    @property
    def queries_path(self) -> Path:
        return self._find("queries")

    def qrels_path(self, split: str) -> Path:
        path = self.root / "qrels" / f"{split}.tsv"
        if not path.is_file():
            have = ", ".join(self.splits()) or "none"
            raise UserError(f"{self.name}: no qrels for split {split!r} ({path} missing); splits here: {have}")
        return path

    def splits(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "qrels").glob("*.tsv"))

    def file_hashes(self) -> dict[str, str]:
        """sha256 of every file the store depends on, keyed by path relative to the dataset root."""
        paths = [self.corpus_path, self.queries_path, *sorted((self.root / "qrels").glob("*.tsv"))]
        return {str(p.relative_to(self.root)): sha256_file(p) for p in paths}


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """Where datasets are looked up: --data-dir, then $JEPA_CACHE_DATA, then data/beir/."""
    if data_dir:
        return Path(data_dir)
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return DEFAULT_DATA_DIR


def find_dataset(name_or_path: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> BeirDataset:
    """Resolve a dataset name (or a folder path) to a BEIR folder, downloading it when missing."""
    as_path = Path(name_or_path)
    if os.sep in name_or_path or as_path.is_dir():
        if not as_path.is_dir():
            raise UserError(f"dataset folder {as_path} does not exist")
        return BeirDataset(as_path.resolve().name, as_path)  # `.` or `..` name their folder, never a path step
    name = check_name(name_or_path)
    root = data_root(data_dir)
    folder = root / name
    if folder.is_dir():
        return BeirDataset(name, folder)
    if download:
        from .download import download_beir

        return BeirDataset(name, download_beir(name, root))
    raise UserError(f"dataset {name!r} not found under {root}; pass --data-dir or set ${DATA_ENV}")


def recorded_dataset(record: dict, name_or_path: str | None = None,
                     data_dir: str | os.PathLike | None = None) -> BeirDataset:
    """The dataset a store was made from (`record` is its provenance's `dataset` block).

    `name_or_path` (the user's --dataset) wins. Otherwise the folder the store recorded, when it still
    holds the same corpus and queries (sha256); otherwise the recorded name, looked up as usual.
    """
    if name_or_path:
        return find_dataset(name_or_path, data_dir)
    folder = Path(record["path"]) if record.get("path") else None
    if folder is not None and folder.is_dir():
        dataset = BeirDataset(record["name"], folder)
        files = record.get("files", {})
        try:
            same = all(sha256_file(dataset.root / rel) == files.get(rel) for rel in
                       (str(p.relative_to(folder)) for p in (dataset.corpus_path, dataset.queries_path)))
        except UserError:
            same = False
        if same:
            return dataset
        try:
            return find_dataset(record["name"], data_dir, download=False)
        except UserError:
            raise UserError(f"{folder}: the dataset this store was made from has changed since (corpus or queries "
                            "sha256 differ); "
                            "pass --dataset with the folder it was made from, or rebuild the store") from None
    return find_dataset(record["name"], data_dir)


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a bad line is a UserError naming it."""
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {lineno}: malformed JSON ({e.msg})") from None
                except (ValueError, RecursionError) as e:  # an integer of > 4300 digits; arrays nested thousands deep
                    why = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
                    raise UserError(f"{path}: line {lineno}: malformed JSON ({why})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
    except (OSError, EOFError, UnicodeDecodeError) as e:
        if isinstance(e, FileNotFoundError):
            raise UserError(f"{path}: file not found") from None
        raise UserError(f"{path}: cannot be read ({e}); the file may be truncated or not UTF-8") from None


def query_text(query: dict) -> str:
    return query.get("text") or ""


def iter_records(path: Path, text_of: Callable[[dict], str] = corpus_text) -> Iterator[tuple[int, str, str]]:
    """(line number, id, text) of each record, every line checked; lets a build stream a large corpus."""
    for lineno, obj in iter_jsonl(path):
        raw_id = obj.get("_id")
        if raw_id is None or str(raw_id) == "":
            raise UserError(f"{path}: line {lineno}: missing '_id'")
        if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
            raise UserError(f"{path}: line {lineno}: '_id' must be a string or an integer, got {type(raw_id).__name__}")
        for field in ("title", "text"):
            if field in obj and obj[field] is not None and not isinstance(obj[field], str):
                raise UserError(f"{path}: line {lineno}: field {field!r} must be a string")
        yield lineno, str(raw_id), text_of(obj)


def _read_records(path: Path, text_of: Callable[[dict], str], keep_texts: bool = True) -> tuple[list[str], list[str]]:
    ids: list[str] = []
    texts: list[str] = []
    first_line: dict[str, int] = {}
    for lineno, doc_id, text in iter_records(path, text_of):
        if doc_id in first_line:
            raise UserError(f"{path}: line {lineno}: duplicate _id {doc_id!r} (first on line {first_line[doc_id]})")
        first_line[doc_id] = lineno
        ids.append(doc_id)
        if keep_texts:
            texts.append(text)
    if not ids:
        raise UserError(f"{path}: no records; the file is empty")
    return ids, texts


def read_corpus(path: Path) -> tuple[list[str], list[str]]:
    """Document ids and texts, `(title + " " + text).strip()`, in file order."""
    return _read_records(path, corpus_text)


def read_queries(path: Path) -> tuple[list[str], list[str]]:
    """Query ids and texts, in file order."""
    return _read_records(path, query_text)


def read_ids(path: Path) -> list[str]:
    """The ids of a corpus or queries file in file order, every record checked, without holding the texts."""
    return _read_records(path, corpus_text, keep_texts=False)[0]


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """qrels/<split>.tsv as {query_id: {doc_id: score}} (header optional, CRLF tolerated, graded scores kept)."""
    qrels: dict[str, dict[str, int]] = {}
    reader = None
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            for lineno, row in enumerate(reader, 1):
                if not row or all(not c.strip() for c in row):
                    continue
                if lineno == 1 and row[0].strip().lower() in {"query-id", "query_id", "qid"}:
                    continue
                if len(row) != 3:
                    raise UserError(f"{path}: line {lineno}: expected 3 tab-separated columns (query-id, corpus-id, "
                                    f"score), got {len(row)}")
                qid, did, score = (c.strip() for c in row)
                if not qid or not did:
                    raise UserError(f"{path}: line {lineno}: empty query-id or corpus-id")
                try:
                    value = int(score)
                except ValueError:
                    raise UserError(f"{path}: line {lineno}: score {score!r} is not an integer") from None
                qrels.setdefault(qid, {})[did] = value
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 ({e.reason})") from None
    except csv.Error as e:  # e.g. a field longer than csv's limit: not a qrels file
        raise UserError(f"{path}: line {reader.line_num if reader else 1}: not a qrels line ({e})") from None
    if not qrels:
        raise UserError(f"{path}: no judgements; the split is empty")
    return qrels
