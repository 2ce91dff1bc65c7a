"""Stage 2: train the projection and predictor on cached tensors only.

The vectors the training pairs touch go to the device once; a batch is an index gather, the
shuffle comes from a seeded generator, and nothing here reads text or imports
sentence-transformers. The same `fit` loop runs the live reference (`--live`): only the
embedding source differs (see live.py), which is what proves the cache changes speed, not results.

What a step sees is configurable, because with a cache the expensive choices become cheap:

- `sampling`: `pairs` (an epoch is one pass over the (query, document) pairs) or `queries` (an
  epoch is one pass over the training *queries*, each with one of its positives drawn at
  random). NFCorpus has ~43 positives per query: a pair epoch is 43 query epochs, which over-fits.
- `negatives`: `batch` (the batch's documents, plus a triples file's hard negatives), `corpus`
  (also every document of the cached corpus, or a random `corpus_negatives` of them per step:
  a full softmax over the collection, cheap precisely because the corpus is cached), or `mined`
  (each query also gets one of its `mine_k` nearest non-positive documents, mined once with FAISS
  through the heads at step 0). Other positives of the query (and, as BEIR does at evaluation, a
  document whose id is the query's) are never negatives.
- `dev_fraction` / `select`: hold out a seeded slice of the training queries (the same slice for
  every seed), score NDCG@10 on it after every epoch (epoch 0 is the initial heads: vanilla for
  an identity start), and keep the best epoch (`select dev`); `refit` then retrains on all the
  training queries for that many epochs of the same schedule.
- `interpolate`: weight-space ensembling with the initial heads (WiSE-FT, Wortsman et al. 2022):
  the saved heads are θ₀ + β(θ − θ₀). From an identity start this moves the map part of the way
  back to vanilla, which keeps most of the in-domain gain and gives back most of the zero-shot loss.

Outputs, in the heads folder: `heads.safetensors` + `heads.json` (see heads.py), `config.json`
(every setting resolved) and `steps.jsonl` (one line per step: loss and each weighted term).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import Tensor

from .config import TrainConfig
from .datasets import iter_jsonl, read_qrels, recorded_dataset
from .encoder import pick_device
from .errors import UserError
from .files import atomic_write_json
from .distributed import World, average_gradients, barrier, broadcast, broadcast_tensor, main_lock, rank_device, sharded_forward, world
from .heads import META_FILE, Heads, HeadsConfig, describe, save_heads
from .presets import PRESETS
from .losses import PART_NAMES, JEPASIGRegLoss, first_nonfinite
from .store import Store, now_iso, open_store

DEFAULT_HEADS_DIR = Path("runs/heads")
STRATEGIES = ("frozen-predictor", "frozen-isotropy")
STEPS_FILE = "steps.jsonl"
CONFIG_FILE = "config.json"

SAMPLINGS = ("pairs", "queries")
NEGATIVES = ("batch", "corpus", "mined")
SCHEDULES = ("cosine", "constant")
SELECTS = ("last", "dev")
DEV_SEED = 0  # the held-out dev slice is the same for every --seed, so seeds are compared on one slice

HEADS_FIELDS = tuple(f.name for f in dataclasses.fields(HeadsConfig) if f.name != "input_dim")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"--{name.replace('_', '-')} {value!r}: choose one of {', '.join(allowed)}")


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill every None from the preset, apply the strategy, and check the values."""
    if cfg.preset not in PRESETS:
        raise UserError(f"--preset {cfg.preset!r}: choose one of {', '.join(PRESETS)}")
    strategy = cfg.strategy or PRESETS[cfg.preset]["strategy"]
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)} (full fine-tune and hybrid: `jepa-cache train-live`)")
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
    values["strategy"] = strategy
    if strategy == "frozen-isotropy":  # projection only: no predictor, no predictive term
        for key, want in (("predictor", "none"), ("lambda_predictive", 0.0)):
            if values.get(key, want) != want:
                raise UserError(f"--strategy frozen-isotropy trains the projection only; it cannot take {key}={values[key]!r}")
            values[key] = want
        if values.get("query_tower", "projection") != "projection":
            raise UserError("--strategy frozen-isotropy has no predictor: queries go through the projection")
        values["query_tower"] = "projection"
    resolved = TrainConfig(**{**PRESETS[cfg.preset], **values})
    if resolved.strategy == "frozen-predictor" and resolved.predictor == "none":
        raise UserError(f"--strategy frozen-predictor needs a predictor (preset {cfg.preset} has none: add e.g. --predictor residual "
                        "--lambda-predictive 0.5); use --strategy frozen-isotropy for projection only")
    for name in ("epochs", "batch_size", "directions", "mine_k"):
        if getattr(resolved, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(resolved, name)}: must be positive")
    if resolved.lr <= 0 or resolved.temperature <= 0 or not 0 <= resolved.warmup < 1 or resolved.grad_clip < 0:
        raise UserError("--lr and --temperature must be positive, --warmup in [0, 1), --grad-clip >= 0")
    if resolved.max_pairs is not None and resolved.max_pairs <= 0:
        raise UserError(f"--max-pairs {resolved.max_pairs}: must be positive")
    for name, allowed in (("negatives", NEGATIVES), ("sampling", SAMPLINGS), ("schedule", SCHEDULES), ("select", SELECTS)):
        _choice(name, getattr(resolved, name), allowed)
    if resolved.corpus_negatives < 0:
        raise UserError(f"--corpus-negatives {resolved.corpus_negatives}: 0 (the whole corpus) or a positive count")
    if not 0 <= resolved.dev_fraction < 1:
        raise UserError(f"--dev-fraction {resolved.dev_fraction}: must be in [0, 1)")
    if resolved.select == "dev" and resolved.dev_fraction == 0:
        raise UserError("--select dev needs a dev slice: --dev-fraction > 0 (e.g. 0.2)")
    if resolved.refit and resolved.select != "dev":
        raise UserError("--refit retrains for the epoch chosen on dev: it needs --select dev")
    if not 0 < resolved.interpolate <= 1:
        raise UserError(f"--interpolate {resolved.interpolate}: must be in (0, 1] (1 keeps the heads as trained)")
    if resolved.live and resolved.negatives != "batch":
        raise UserError(f"--negatives {resolved.negatives} needs the whole corpus every step (or mined from it): "
                        "cached training only; use --negatives batch with --live")
    return resolved


# ---------------------------------------------------------------------------------------------
# Training pairs: ids -> store rows


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
            f"{origin}: {len(missing)} {what} id(s) are not in the store {section.name} ({shown}{', ...' if len(missing) > 5 else ''}); "
            "the pairs and the store come from different datasets, or the store is out of date"
        )
    return np.fromiter((row_of[i] for i in ids), dtype=np.int64, count=len(ids))


def pairs_from_ids(store: Store, query_ids: list[str], doc_ids: list[str], neg_ids: list[str] | None, origin: str) -> Pairs:
    if not query_ids:
        raise UserError(f"{origin}: no training pairs")
    neg = None if neg_ids is None else _rows(store.corpus, neg_ids, "negative document", origin)
    return Pairs(_rows(store.queries, query_ids, "query", origin), _rows(store.corpus, doc_ids, "document", origin), neg, origin)


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
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise UserError(f"{path}: not a readable Parquet file ({e})") from None
        for col in columns[:2]:
            if col not in table.column_names:
                raise UserError(f"{path}: no {col!r} column (have {', '.join(table.column_names)})")
        data = {c: [str(v) for v in table.column(c).to_pylist()] for c in columns if c in table.column_names}
        if any(v in ("None", "") for c in data for v in data[c]):
            raise UserError(f"{path}: empty or null ids; every row needs query_id and doc_id (and negative_id when present)")
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


# ---------------------------------------------------------------------------------------------
# Sources of embeddings and the loop


class EmbeddingSource(Protocol):
    """Where a batch's encoder vectors come from; rows are local indices (see `PairIndex`)."""

    def queries(self, rows: Tensor) -> Tensor: ...

    def documents(self, rows: Tensor) -> Tensor: ...


class CachedSource:
    """The cached vectors, on the device once; a batch is an index gather.

    Shape:
        queries: [Q, D], documents: [N, D] float32; rows [B] int64 -> [B, D]
    """

    def __init__(self, queries: Tensor, documents: Tensor):
        self._queries = queries
        self._documents = documents

    def queries(self, rows: Tensor) -> Tensor:
        return self._queries[rows]

    def documents(self, rows: Tensor) -> Tensor:
        return self._documents[rows]


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
        return cls(query_rows, doc_rows, as_tensor(q), as_tensor(d), None if n is None else as_tensor(n), as_tensor(keys),
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


def lr_lambda(total_steps: int, warmup: float, schedule: str = "cosine") -> Callable[[int], float]:
    """Linear warm-up over `warmup` of the steps, then cosine decay to zero (or a constant rate); stepped every batch."""
    warm = int(round(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        progress = (step - warm) / max(total_steps - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


@dataclass
class FitResult:
    history: list[dict]  # one record per step: step, epoch, loss, each weighted part, grad_norm, lr
    epoch_seconds: list[float]
    dev: list[float] = dataclasses.field(default_factory=list)  # dev NDCG@10 after epoch e (dev[0]: before training)
    best_epoch: int | None = None  # the epoch kept (select="dev"); None: the last


class NonFiniteLoss(UserError):
    """Training produced NaN/inf; nothing was written."""


def mine_negatives(heads: Heads, source: "CachedSource", index: PairIndex, k: int, batch: int = 1024) -> Tensor:
    """The `k` nearest non-positive corpus documents of every local query, through `heads` as they are now.

    FAISS (exact, inner product) when installed, else torch. A query's positives and its same-id
    document are skipped; a query with fewer than k candidates repeats its last one.

    Shape:
        returns [Q, k] local document indices (index.doc_rows must be the whole corpus)
    """
    from .search import top_k

    device = index.q.device
    all_docs = torch.arange(len(index.doc_rows), device=device)
    docs = heads.encode_documents(source.documents(all_docs)).cpu().numpy()
    queries = heads.encode_queries(source.queries(torch.arange(index.num_queries, device=device))).cpu().numpy()
    extra = int(index.query_count.max()) + 1  # room for the positives (and the same-id document) to be skipped
    fetch = min(k + extra, len(docs))
    try:
        import faiss  # noqa: F401, PLC0415
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


class DevSet:
    """Held-out training queries scored as eval scores them: exact search over the whole corpus, NDCG@10.

    A hit whose id is the query's is dropped, as BEIR does; judgements are the held-out pairs
    (relevance 1). Queries go through the heads' own query tower.
    """

    def __init__(self, queries: Tensor, query_ids: list[str], corpus: Tensor, corpus_ids: list[str],
                 qrels: dict[str, dict[str, int]]):
        self.queries, self.query_ids, self.corpus, self.corpus_ids, self.qrels = queries, query_ids, corpus, corpus_ids, qrels

    @classmethod
    def from_pairs(cls, dev: Pairs, store: Store, corpus: Tensor, device: torch.device) -> "DevSet":
        q_ids, d_ids = store.queries.ids, store.corpus.ids
        qrels: dict[str, dict[str, int]] = {}
        for qr, dr in zip(dev.query_rows, dev.doc_rows):
            qrels.setdefault(q_ids[qr], {})[d_ids[dr]] = 1
        rows = np.array([store.queries.row_of[q] for q in qrels], dtype=np.int64)
        queries = torch.from_numpy(store.queries.vectors(np.float32, rows)).to(device)
        return cls(queries, list(qrels), corpus, d_ids, qrels)

    def __len__(self) -> int:
        return len(self.query_ids)

    def score(self, heads: Heads | None) -> float:
        """NDCG@10 of the dev queries through `heads` (None: vanilla)."""
        from .metrics import score
        from .search import top_k

        if heads is None:
            queries, docs, similarity = self.queries, self.corpus, "cos"
        else:
            queries, docs, similarity = heads.encode_queries(self.queries), heads.encode_documents(self.corpus), heads.similarity
        hits = top_k(docs.float().cpu().numpy(), queries.float().cpu().numpy(), 11, similarity, "torch")
        ids = self.corpus_ids
        run = {q: {ids[r]: float(s) for r, s in zip(rows, scores) if r >= 0 and ids[r] != q}
               for q, rows, scores in zip(self.query_ids, hits.indices, hits.scores)}
        return score(self.qrels, run, recall_at=10)[0]["ndcg@10"]


def interpolate_heads(heads: Heads, initial: dict[str, Tensor], weight: float) -> Heads:
    """Weight-space ensembling with the initial heads (WiSE-FT): θ ← θ₀ + weight · (θ − θ₀), in place.

    For heads that start at vanilla (the identity adapter), weight < 1 moves them part of the way
    back: in-domain gains shrink a little, zero-shot losses shrink more (see README).
    """
    if weight != 1.0:
        with torch.no_grad():
            for name, value in heads.state_dict().items():
                if value.is_floating_point():
                    value.copy_(initial[name].to(value.device) + weight * (value - initial[name].to(value.device)))
    return heads


def fit(
    heads: Heads,
    criterion: JEPASIGRegLoss,
    source: EmbeddingSource,
    index: PairIndex,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    warmup: float = 0.0,
    grad_clip: float = 0.0,
    on_step: Callable[[dict], None] | None = None,
    log: Callable[[str], None] = print,
    sampling: str = "pairs",
    negatives: str = "batch",
    corpus_negatives: int = 0,
    mined: Tensor | None = None,
    schedule: str = "cosine",
    dev: Callable[[Heads], float] | None = None,
    select: str = "last",
    stop_after: int | None = None,
    world: World = World(),
) -> "FitResult":
    """Train `heads` (and whatever else `optimizer` holds) on `index`'s pairs.

    Batches come from a CPU generator seeded with `seed` (the same on any device and for any
    source); SIGReg's directions are seeded by the global step. A NaN/inf loss or gradient
    raises `NonFiniteLoss` naming the step and the term.

    Args:
        sampling: `pairs` or `queries` (see `PairIndex.epoch_order`).
        negatives: `batch`; `corpus`: also every local document (`index` built with the whole
            corpus), or `corpus_negatives` of them drawn per step; `mined`: also one of each
            query's `mined` documents ([Q, k] local indices), drawn per step.
        dev: scores the heads (e.g. `DevSet.score`) before training and after every epoch.
        select: `dev` restores the heads of the epoch with the best dev score (ties: the earlier).
        stop_after: run only this many epochs of an `epochs`-long schedule (a refit).
        world: under torchrun, the ranks share each global batch: every rank draws the same batch
            (same seed), runs the heads on its share of the rows, and all-gathers the outputs with
            their gradients, so the loss (InfoNCE over every rank's documents, SIGReg over the
            global batch with the same directions) is the single-process loss; gradients are then
            averaged, as DDP does. Dropout masks differ from a single process' (each rank draws its
            own). Rank 0 scores dev and every rank follows its choice.
    """
    device = index.q.device
    _choice("sampling", sampling, SAMPLINGS)
    _choice("negatives", negatives, NEGATIVES)
    if negatives == "mined" and mined is None:
        raise ValueError("negatives='mined' needs the mined documents (see mine_negatives)")
    if select == "dev" and dev is None:
        raise ValueError("select='dev' needs a dev scorer")
    steps_per_epoch = math.ceil(index.items(sampling) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(epochs * steps_per_epoch, warmup, schedule))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    history: list[dict] = []
    epoch_seconds: list[float] = []
    dev_scores: list[float] = []
    best_state, best_epoch = None, None
    n_docs = len(index.doc_rows)
    contrast_with_predictor = heads.predictor is not None and heads.config.query_tower == "predictor"

    def keep_if_best(epoch: int) -> None:
        nonlocal best_state, best_epoch
        if dev is None:
            return
        # rank 0 scores and every rank follows: the epoch kept (and so a refit's length) must agree
        dev_scores.append(broadcast(world, float(dev(heads)) if world.main else None))
        if select == "dev" and (best_epoch is None or dev_scores[-1] > dev_scores[best_epoch]):
            best_state = {k: v.detach().clone() for k, v in heads.state_dict().items()}
            best_epoch = epoch

    keep_if_best(0)
    step = 0
    heads.train()
    run_epochs = epochs if stop_after is None else min(stop_after, epochs)
    for epoch in range(run_epochs):
        t0 = time.perf_counter()
        order = index.epoch_order(gen, sampling).to(device)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            bq, bd = index.q[batch], index.d[batch]
            cand = bd if index.n is None else torch.cat([bd, index.n[batch]])
            if negatives == "mined":
                pick = torch.randint(mined.shape[1], (len(bq),), generator=gen).to(device)
                cand = torch.cat([cand, mined[bq, pick]])
            extra = None
            if negatives == "corpus":
                if 0 < corpus_negatives < n_docs:
                    extra = torch.randperm(n_docs, generator=gen)[:corpus_negatives].to(device)
                else:
                    extra = torch.arange(n_docs, device=device)
            e_q, e_c = source.queries(bq), source.documents(cand)
            parts_in = [e_q, e_c] if extra is None else [e_q, e_c, source.documents(extra)]
            z = sharded_forward(heads, torch.cat(parts_in), world)
            b = len(bq)
            z_q, z_d = z[:b], z[b : 2 * b]
            z_n = z[2 * b : b + len(cand)] if len(cand) > b else None
            z_x = z[b + len(cand):] if extra is not None else None
            predicted = heads.predictor(z_q) if heads.predictor is not None else None
            mask = index.positive_mask(bq, cand if extra is None else torch.cat([cand, extra]))
            loss, parts = criterion(z_q, z_d, z_n, predicted, positive_mask=mask, step=step, negatives=z_x,
                                    contrast_query=predicted if contrast_with_predictor else None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(params, world)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
            values = torch.stack([loss.detach(), grad_norm.to(loss.device), *parts.values()]).tolist()
            record = {"step": step, "epoch": epoch, "loss": values[0], **dict(zip(parts, values[2:])),
                      "grad_norm": values[1], "lr": scheduler.get_last_lr()[0]}
            if not all(math.isfinite(v) for v in values):
                bad = first_nonfinite(parts) or ("loss" if not math.isfinite(values[0]) else "grad_norm")
                raise NonFiniteLoss(
                    f"step {step} (epoch {epoch}): {bad} became {record[bad]}; training stopped and no heads were written "
                    "(try a lower --lr, or check the store with `jepa-cache verify`)"
                )
            optimizer.step()
            scheduler.step()
            history.append(record)
            if on_step:
                on_step(record)
            step += 1
        epoch_seconds.append(time.perf_counter() - t0)
        keep_if_best(epoch + 1)
        heads.train()
        dev_note = f"; dev NDCG@10 {dev_scores[-1]:.4f}" if dev is not None else ""
        log(f"epoch {epoch + 1}/{epochs}: {steps_per_epoch} steps, {epoch_seconds[-1]:.2f} s "
            f"({index.items(sampling) / max(epoch_seconds[-1], 1e-9):,.0f} {sampling}/s); "
            f"{format_parts(mean_parts(history[-steps_per_epoch:]))}{dev_note}")
    if best_state is not None:
        heads.load_state_dict(best_state)
        log(f"dev NDCG@10 by epoch {' '.join(f'{v:.4f}' for v in dev_scores)}: keeping epoch {best_epoch}"
            f"{' (the initial heads)' if best_epoch == 0 else ''}")
    return FitResult(history, epoch_seconds, dev_scores, best_epoch)


def mean_parts(records: list[dict]) -> dict[str, float]:
    keys = ("loss", *PART_NAMES)
    return {k: float(np.mean([r[k] for r in records])) for k in keys} if records else {}


def format_parts(parts: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in parts.items())


# ---------------------------------------------------------------------------------------------
# Stage 2


@dataclass
class TrainResult:
    out: Path
    heads: Heads
    config: TrainConfig  # resolved: every value the run used
    history: list[dict]
    epoch_seconds: list[float]
    seconds: float
    dev: dict | None = None  # the dev slice: queries, NDCG@10 per epoch, epoch kept, refit


def default_out(cfg: TrainConfig, dataset: str) -> Path:
    return DEFAULT_HEADS_DIR / dataset / f"{cfg.preset}-{cfg.strategy}-s{cfg.seed}"


def with_width(cfg: TrainConfig, input_dim: int) -> TrainConfig:
    """`output_dim` 0 (`best`'s) is the encoder's width: resolved once the store is known, and recorded so."""
    return cfg if cfg.output_dim else dataclasses.replace(cfg, output_dim=input_dim)


def build_heads(cfg: TrainConfig, input_dim: int, init_vectors: Tensor | None) -> Heads:
    cfg = with_width(cfg, input_dim)
    heads_cfg = HeadsConfig(input_dim=input_dim, **{k: getattr(cfg, k) for k in HEADS_FIELDS})
    return Heads(heads_cfg, init_vectors if heads_cfg.init != "random" else None)


def build_criterion(cfg: TrainConfig) -> JEPASIGRegLoss:
    return JEPASIGRegLoss(
        cfg.lambda_predictive, cfg.lambda_contrastive, cfg.lambda_isotropy, cfg.lambda_reg, cfg.use_stopgrad,
        contrastive=cfg.contrastive, isotropy=cfg.isotropy, predictive=cfg.predictive, temperature=cfg.temperature,
        margin=cfg.margin, num_directions=cfg.directions, seed=cfg.seed,
    )


def same_id_rows(store: Store) -> dict[int, int]:
    """Query row -> row of the corpus document with the same id (ArguAna-style collections)."""
    doc_row = store.corpus.row_of
    return {i: doc_row[q] for i, q in enumerate(store.queries.ids) if q in doc_row}


def _fit_once(cfg: TrainConfig, store: Store, pairs: Pairs, device: torch.device, corpus: Tensor | None,
              dev: DevSet | None, log: Callable[[str], None], on_step: Callable[[dict], None],
              stop_after: int | None = None, w: World = World()) -> tuple[Heads, FitResult, int]:
    """Build the index, the source, fresh heads and the optimiser for `pairs`, and fit them."""
    whole = cfg.negatives != "batch"
    if cfg.negatives == "mined" and pairs.neg_rows is not None:
        raise UserError(f"{pairs.origin}: triples bring their own hard negatives; use --negatives batch or corpus with them")
    index = PairIndex.build(pairs, device, corpus_rows=store.corpus.rows if whole else None, same_id=same_id_rows(store))
    log(f"training pairs: {len(pairs):,} from {pairs.origin} ({index.num_queries:,} queries, "
        f"{len(index.doc_rows):,} {'corpus ' if whole else ''}documents{', with hard negatives' if pairs.neg_rows is not None else ''})")
    if whole and corpus is not None:
        doc_vectors = corpus.cpu()
    else:
        doc_vectors = torch.from_numpy(store.corpus.vectors(np.float32, index.doc_rows))
    if cfg.live:  # the encoder is loaded before seeding, so loading it cannot shift the seeded streams
        from .live import frozen_live_source

        source: EmbeddingSource = frozen_live_source(cfg, store, index, device, log)
    else:
        query_vectors = torch.from_numpy(store.queries.vectors(np.float32, index.query_rows))
        source = CachedSource(query_vectors.to(device), doc_vectors.to(device))
    torch.manual_seed(cfg.seed)  # heads init and dropout masks
    heads = build_heads(cfg, store.dim, doc_vectors).to(device)  # the same initial heads on every rank
    if w.distributed:
        torch.manual_seed(cfg.seed + w.rank)  # each rank's share of the batch gets its own dropout masks
    criterion = build_criterion(cfg)
    optimizer = torch.optim.AdamW([p for p in heads.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    mined = None
    if cfg.negatives == "mined":  # rank 0 mines, the others receive: the same negatives everywhere
        mined = (mine_negatives(heads, source, index, cfg.mine_k) if w.main
                 else torch.empty(index.num_queries, cfg.mine_k, dtype=torch.int64, device=device))
        broadcast_tensor(w, mined)
    initial = {k: v.detach().clone() for k, v in heads.state_dict().items()}

    def dev_score(h: Heads) -> float:  # the heads as they would be saved: interpolated
        if cfg.interpolate == 1.0:
            return dev.score(h)
        return dev.score(interpolate_heads(copy.deepcopy(h), initial, cfg.interpolate))

    steps = math.ceil(index.items(cfg.sampling) / cfg.batch_size)
    negs = {"batch": "in-batch negatives", "mined": f"in-batch + 1 of {cfg.mine_k} mined negatives per query",
            "corpus": f"in-batch + {'all' if not 0 < cfg.corpus_negatives < len(index.doc_rows) else cfg.corpus_negatives} corpus negatives"}
    log(describe(heads))
    log(f"loss: {cfg.contrastive} λ={cfg.lambda_contrastive} ({negs[cfg.negatives]}), {cfg.isotropy} λ={cfg.lambda_isotropy}, "
        f"{cfg.predictive} predictive λ={cfg.lambda_predictive} (stop-grad {cfg.use_stopgrad}), reg λ={cfg.lambda_reg}; "
        f"{cfg.epochs} {'query' if cfg.sampling == 'queries' else 'pair'} epoch(s) × {steps} steps of {cfg.batch_size}, {cfg.schedule} lr {cfg.lr:g}"
        f"{f', stopping after epoch {stop_after}' if stop_after is not None else ''}"
        f"{'; LIVE: encoding every batch through the frozen encoder' if cfg.live else ''}")
    result = fit(heads, criterion, source, index, optimizer, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                 warmup=cfg.warmup, grad_clip=cfg.grad_clip, on_step=on_step, log=log, sampling=cfg.sampling,
                 negatives=cfg.negatives, corpus_negatives=cfg.corpus_negatives, mined=mined, schedule=cfg.schedule,
                 dev=dev_score if dev is not None else None, select=cfg.select if dev is not None else "last",
                 stop_after=stop_after, world=w)
    if cfg.interpolate != 1.0:
        interpolate_heads(heads, initial, cfg.interpolate)
        log(f"heads interpolated with their initial weights: initial + {cfg.interpolate:g} × (trained − initial)")
    return heads, result, steps


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Train heads on a store (or, with `cfg.live`, through the frozen encoder) and save them.

    With `dev_fraction`, a seeded slice of the training queries is held out and scored after
    every epoch; `select dev` keeps the best epoch (0: the initial heads), and `refit` retrains
    on every training query for that many epochs of the same schedule.
    """
    cfg = resolve_config(cfg)
    w = world(cfg.device)
    log = log if w.main else (lambda s: None)
    if w.distributed and cfg.live:
        raise UserError("--live encodes every batch through the encoder: one process only (drop torchrun)")
    store = open_store(cfg.store)
    cfg = with_width(cfg, store.dim)
    pairs = load_pairs(cfg, store)
    out = Path(cfg.out) if cfg.out else default_out(cfg, store.dataset_name)
    if (out / META_FILE).exists() and not cfg.overwrite:
        raise UserError(f"{out}: already holds heads; choose another --out or pass --overwrite")
    device = pick_device(rank_device(cfg.device, w))
    with main_lock(out, "train-heads", w):
        log(f"{store.describe()}\ndevice {device}")
        corpus = None
        if cfg.dev_fraction > 0 or cfg.negatives != "batch":
            corpus = torch.from_numpy(store.corpus.vectors(np.float32)).to(device)
        fit_pairs, dev = pairs, None
        if cfg.dev_fraction > 0:
            fit_pairs, dev_pairs = pairs.hold_out(cfg.dev_fraction)
            dev = DevSet.from_pairs(dev_pairs, store, corpus, device)
            log(f"dev: {len(dev):,} held-out queries ({dev_pairs.origin}); NDCG@10 over the whole corpus after every epoch")

        created = w.main and not out.exists()
        if w.main:  # rank 0 writes; the other ranks only compute
            out.mkdir(parents=True, exist_ok=True)
        partial = out / f".{STEPS_FILE}.partial"
        try:
            t0 = time.perf_counter()
            with open(partial if w.main else os.devnull, "w", encoding="utf-8") as steps_file:
                phase = {"name": "fit"}
                write_step = lambda r: steps_file.write(json.dumps({**r, "phase": phase["name"]} if cfg.refit else r) + "\n")  # noqa: E731
                heads, result, steps = _fit_once(cfg, store, fit_pairs, device, corpus, dev, log, write_step, w=w)
                dev_record = None
                if dev is not None:
                    dev_record = {"queries": len(dev), "fraction": cfg.dev_fraction, "seed": DEV_SEED, "ndcg@10": result.dev,
                                  "select": cfg.select, "best_epoch": result.best_epoch, "refit": cfg.refit}
                if cfg.refit:
                    kept = result.best_epoch or 0
                    phase["name"] = "refit"
                    log(f"refit: all {len(pairs):,} pairs, {kept} of {cfg.epochs} epoch(s)")
                    fit_history = result.history
                    heads, result, steps = _fit_once(cfg, store, pairs, device, corpus, None, log, write_step, stop_after=kept, w=w)
                    result.history = fit_history + result.history
            seconds = time.perf_counter() - t0
            final = mean_parts(result.history[-steps:])
            training = {
                "strategy": cfg.strategy, "preset": cfg.preset, "pairs": len(pairs), "pairs_from": pairs.origin,
                "steps": len(result.history), "seconds": round(seconds, 3), "epoch_seconds": [round(t, 3) for t in result.epoch_seconds],
                "live": cfg.live, "device": str(device), "ranks": w.size, "final_epoch_mean": final, "finished": now_iso(),
                "dev": dev_record,
            }
            if w.main:
                save_heads(heads, out, {"store": store_record(store), "training": training})
                atomic_write_json(out / CONFIG_FILE, cfg)
                partial.replace(out / STEPS_FILE)
        except NonFiniteLoss as e:  # its steps stay, for the post-mortem; no heads are written
            failed = out / "steps.failed.jsonl"
            if w.main:
                partial.replace(failed)
            raise NonFiniteLoss(f"{e} (steps so far: {failed})") from None
        except BaseException:  # Ctrl-C, disk full, ...: no half-written heads, no stray partial file
            if w.main:
                partial.unlink(missing_ok=True)
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise
        barrier(w)  # the heads are saved before any rank returns
        log(f"trained in {seconds:.1f} s; last epoch mean: {format_parts(final)}\nheads: {out}")
        return TrainResult(out, heads.eval(), cfg, result.history, result.epoch_seconds, seconds, dev_record)


def store_record(store: Store) -> dict:
    """What heads.json records of the store: eval refuses a store of another encoder."""
    return {
        "path": str(store.path),
        "fingerprint": store.fingerprint,
        "encoder_fingerprint": store.encoder_fingerprint,
        "encoder": store.provenance["encoder"].get("name"),
        "dataset": store.dataset_name,
        "imported": store.imported,
    }
