"""Training examples: pairs of store rows from qrels or a pairs file, their device index, sampling and mining.

Everything here speaks in store rows and local indices; nothing reads vectors' meaning except
`mine_negatives`, which ranks the corpus through the heads to pick hard negatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from .config import TrainConfig
from .datasets import recorded_dataset, iter_jsonl, read_qrels
from .errors import UserError
from .heads import Heads
from .search import top_k
from .sources import EmbeddingSource
from .store import Store

SAMPLINGS = ("pairs", "queries")
DEV_SEED = 0  # the held-out dev slice is the same for every --seed, so seeds are compared on one slice


@dataclass
class Pairs:
    """Training examples as store rows: query i, its relevant document, and an optional hard negative."""

    query_rows: np.ndarray
    doc_rows: np.ndarray
    neg_rows: np.ndarray | None
    origin: str

    def __len__(self) -> int:
        return len(self.query_rows)

    def subset(self, count: int, seed: int) -> "Pairs":
        """A seeded random subset of `count` pairs, kept in their original order."""
        if count >= len(self):
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self), count, replace=False))
        neg = None if self.neg_rows is None else self.neg_rows[keep]
        return Pairs(self.query_rows[keep], self.doc_rows[keep], neg, f"{self.origin} (subset of {count})")

    def select(self, keep: np.ndarray, origin: str) -> "Pairs":
        neg = None if self.neg_rows is None else self.neg_rows[keep]
        return Pairs(self.query_rows[keep], self.doc_rows[keep], neg, origin)

    def hold_out(self, fraction: float, seed: int = DEV_SEED) -> tuple["Pairs", "Pairs"]:
        """(train, dev): a seeded `fraction` of the *queries*, with all their pairs, held out as dev."""
        queries = np.unique(self.query_rows)
        count = max(1, round(fraction * len(queries)))
        if count >= len(queries):
            raise UserError(f"--dev-fraction {fraction}: would hold out all {len(queries)} training queries")
        held = np.random.default_rng(seed).choice(queries, count, replace=False)
        is_dev = np.isin(self.query_rows, held)
        return (self.select(~is_dev, f"{self.origin} less {count} dev queries"),
                self.select(is_dev, f"{count} of {len(queries)} training queries of {self.origin} (seed {seed})"))


def _rows(section, ids: list[str], what: str, origin: str) -> np.ndarray:
    row_of = section.row_of
    missing = [i for i in dict.fromkeys(ids) if i not in row_of]
    if missing:
        shown = ", ".join(repr(i) for i in missing[:5])
        raise UserError(
            f"{origin}: {len(missing)} {what} id(s) are not in the store {section.name} "
            f"({shown}{', ...' if len(missing) > 5 else ''}); "
            "the pairs and the store come from different datasets, or the store is out of date"
        )
    return np.fromiter((row_of[i] for i in ids), dtype=np.int64, count=len(ids))


def pairs_from_ids(store: Store, query_ids: list[str], doc_ids: list[str], neg_ids: list[str] | None,
                   origin: str) -> Pairs:
    if not query_ids:
        raise UserError(f"{origin}: no training pairs")
    neg = None if neg_ids is None else _rows(store.corpus, neg_ids, "negative document", origin)
    queries, docs = _rows(store.queries, query_ids, "query", origin), _rows(store.corpus, doc_ids, "document", origin)
    return Pairs(queries, docs, neg, origin)


def qrels_pairs(store: Store, qrels_path: Path) -> Pairs:
    """(query, document) for every judgement with score > 0, in file order."""
    qrels = read_qrels(qrels_path)
    q_ids, d_ids = [], []
    for qid, docs in qrels.items():
        for did, score in docs.items():
            if score > 0:
                q_ids.append(qid)
                d_ids.append(did)
    return pairs_from_ids(store, q_ids, d_ids, None, str(qrels_path))


def read_pairs_file(path: Path) -> tuple[list[str], list[str], list[str] | None]:
    """query_id, doc_id and optional negative_id columns from a JSONL or Parquet file."""
    if not path.is_file():
        raise UserError(f"--pairs {path}: file not found")
    columns = ("query_id", "doc_id", "negative_id")
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise UserError(f"{path}: not a readable Parquet file ({e})") from None
        for col in columns[:2]:
            if col not in table.column_names:
                raise UserError(f"{path}: no {col!r} column (have {', '.join(table.column_names)})")
        data = {c: [str(v) for v in table.column(c).to_pylist()] for c in columns if c in table.column_names}
        if any(v in ("None", "") for c in data for v in data[c]):
            raise UserError(f"{path}: empty or null ids; every row needs query_id and doc_id "
                            "(and negative_id when present)")
        return data["query_id"], data["doc_id"], data.get("negative_id")
    rows = []
    for lineno, obj in iter_jsonl(path):
        for col in columns[:2]:
            if obj.get(col) in (None, ""):
                raise UserError(f"{path}: line {lineno}: missing {col!r}")
        rows.append((lineno, obj))
    if not rows:
        raise UserError(f"{path}: no pairs")
    has_neg = "negative_id" in rows[0][1]
    for lineno, obj in rows:
        if ("negative_id" in obj) != has_neg or (has_neg and obj["negative_id"] in (None, "")):
            raise UserError(f"{path}: line {lineno}: give negative_id on every line or on none")
    neg = [str(o["negative_id"]) for _, o in rows] if has_neg else None
    return [str(o["query_id"]) for _, o in rows], [str(o["doc_id"]) for _, o in rows], neg


def load_pairs(cfg: TrainConfig, store: Store) -> Pairs:
    if cfg.pairs:
        q, d, n = read_pairs_file(Path(cfg.pairs))
        pairs = pairs_from_ids(store, q, d, n, cfg.pairs)
    else:
        dataset = recorded_dataset(store.provenance["dataset"], cfg.dataset, cfg.data_dir)
        pairs = qrels_pairs(store, dataset.qrels_path(cfg.train_split))
    return pairs.subset(cfg.max_pairs, cfg.seed) if cfg.max_pairs else pairs


def same_id_rows(store: Store) -> dict[int, int]:
    """Query row -> row of the corpus document with the same id (ArguAna-style collections)."""
    doc_row = store.corpus.row_of
    return {i: doc_row[q] for i, q in enumerate(store.queries.ids) if q in doc_row}


@dataclass
class PairIndex:
    """The pairs in local indices on the device, plus what the positive mask and the samplers need.

    Local indices number only the rows the pairs touch (or, with `corpus_rows`, every corpus
    row): `query_rows[q]` / `doc_rows[d]` are the store rows of local query q / document d.
    """

    query_rows: np.ndarray  # store rows, in local order
    doc_rows: np.ndarray
    q: Tensor  # [P] local query index of each pair
    d: Tensor  # [P] local document index
    n: Tensor | None  # [P] local hard-negative index
    pair_keys: Tensor  # sorted q * len(doc_rows) + d of every pair (and same-id document): "never a negative of q"
    by_query: Tensor | None = None  # [P] pair indices sorted by query
    query_start: Tensor | None = None  # [Q] first position of each query's pairs in by_query
    query_count: Tensor | None = None  # [Q] how many pairs (positives) each query has

    @classmethod
    def build(cls, pairs: Pairs, device: torch.device, corpus_rows: int | None = None,
              same_id: dict[int, int] | None = None) -> "PairIndex":
        """Index `pairs`; `corpus_rows` makes every corpus row a local document (corpus or mined negatives).

        Args:
            same_id: store query row -> store row of the document with the same id. BEIR drops such
                a hit at evaluation (ArguAna's queries are corpus documents), so it is never a negative.
        """
        query_rows, q = np.unique(pairs.query_rows, return_inverse=True)
        docs = pairs.doc_rows if pairs.neg_rows is None else np.concatenate([pairs.doc_rows, pairs.neg_rows])
        if corpus_rows is not None:
            doc_rows, local = np.arange(corpus_rows), docs
        else:
            doc_rows, local = np.unique(docs, return_inverse=True)
        d, n = local[: len(pairs)], (None if pairs.neg_rows is None else local[len(pairs):])
        keys = q.astype(np.int64) * len(doc_rows) + d
        if same_id:
            local_doc = {int(r): i for i, r in enumerate(doc_rows)} if corpus_rows is None else None
            extra = [(i, same_id[int(r)] if local_doc is None else local_doc.get(same_id[int(r)], -1))
                     for i, r in enumerate(query_rows) if int(r) in same_id]
            extra = np.array([i * len(doc_rows) + j for i, j in extra if j >= 0], dtype=np.int64)
            keys = np.concatenate([keys, extra])
        keys = np.unique(keys)
        by_query = np.argsort(q, kind="stable")
        count = np.bincount(q, minlength=len(query_rows))
        start = np.concatenate([[0], np.cumsum(count)[:-1]])
        as_tensor = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64), device=device)  # noqa: E731
        return cls(query_rows, doc_rows, as_tensor(q), as_tensor(d), None if n is None else as_tensor(n),
                   as_tensor(keys),
                   as_tensor(by_query), as_tensor(start), as_tensor(count))

    def __len__(self) -> int:
        return len(self.q)

    @property
    def num_queries(self) -> int:
        return len(self.query_rows)

    def positive_mask(self, queries: Tensor, candidates: Tensor) -> Tensor:
        """[B, C] bool: candidate j is a positive of query i (includes duplicates of i's own positive).

        `candidates` is [C] (the same for every query) or [B, C] (a row per query).
        """
        keys = queries[:, None] * len(self.doc_rows) + (candidates if candidates.dim() == 2 else candidates[None, :])
        found = torch.searchsorted(self.pair_keys, keys).clamp_max_(len(self.pair_keys) - 1)  # 4x faster than isin
        return self.pair_keys[found] == keys

    def epoch_order(self, gen: torch.Generator, sampling: str = "pairs") -> Tensor:
        """The pair indices of one epoch, in order (on the CPU).

        `pairs`: every pair once, shuffled. `queries`: every query once, shuffled, each with one
        of its pairs drawn uniformly (one positive per query per epoch).
        """
        if sampling == "pairs":
            return torch.randperm(len(self), generator=gen)
        if sampling != "queries":
            raise ValueError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")
        queries = torch.randperm(self.num_queries, generator=gen)
        count, start, by_query = self.query_count.cpu(), self.query_start.cpu(), self.by_query.cpu()
        pick = (torch.rand(len(queries), generator=gen) * count[queries]).long()
        return by_query[start[queries] + pick]

    def items(self, sampling: str = "pairs") -> int:
        """Examples in one epoch: pairs, or queries."""
        return len(self) if sampling == "pairs" else self.num_queries


def repeated(candidates: Tensor) -> Tensor:
    """[C] bool: True where the same document already stands at an earlier column of `candidates` ([C]).

    With corpus negatives the batch's documents are also in the corpus; masking the repeats leaves
    each document once in the softmax's denominator (the target column is never masked).
    """
    order = torch.argsort(candidates, stable=True)
    ordered = candidates[order]
    again = torch.cat([torch.zeros(1, dtype=torch.bool, device=candidates.device), ordered[1:] == ordered[:-1]])
    out = torch.empty_like(again)
    out[order] = again
    return out


def mine_negatives(heads: Heads, source: EmbeddingSource, index: PairIndex, k: int, batch: int = 1024) -> Tensor:
    """The `k` nearest non-positive corpus documents of every local query, through `heads` as they are now.

    FAISS (exact, inner product) when installed, else torch. A query's positives and its same-id
    document are skipped; a query with fewer than k candidates repeats its last one.

    Shape:
        returns [Q, k] local document indices (index.doc_rows must be the whole corpus)
    """
    device = index.q.device
    all_docs = torch.arange(len(index.doc_rows), device=device)
    docs = heads.encode_documents(source.documents(all_docs)).cpu().numpy()
    queries = heads.encode_queries(source.queries(torch.arange(index.num_queries, device=device))).cpu().numpy()
    extra = int(index.query_count.max()) + 1  # room for the positives (and the same-id document) to be skipped
    fetch = min(k + extra, len(docs))
    try:
        import faiss  # noqa: F401, PLC0415  (optional: exact FAISS when installed, else torch)
        spec = "Flat"
    except ImportError:
        spec = "torch"
    hits = top_k(docs, queries, fetch, heads.similarity, spec).indices
    hits_t = torch.as_tensor(hits, device=device)
    mined = torch.empty(index.num_queries, k, dtype=torch.int64, device=device)
    for start in range(0, index.num_queries, batch):
        rows = torch.arange(start, min(start + batch, index.num_queries), device=device)
        cand = hits_t[rows].clamp_min(0)
        bad = index.positive_mask(rows, cand) | (hits_t[rows] < 0)
        # stable order of the good ones first: sort by (bad, rank)
        order = torch.argsort(bad.long() * fetch + torch.arange(fetch, device=device), dim=1)
        good = torch.gather(cand, 1, order)[:, :k]
        n_good = (~bad).sum(1).clamp_min(1)
        last = torch.minimum(torch.arange(k, device=device)[None, :], n_good[:, None] - 1)
        mined[rows] = torch.gather(good, 1, last)
    return mined
