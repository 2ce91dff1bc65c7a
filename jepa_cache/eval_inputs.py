"""What an evaluation runs on, resolved and checked before it writes anything.

The run's heads, query tower, similarity and corrections (`resolve`), then per dataset its qrels
and store, opened and checked against them (`prepare`): every refusal of `jepa-cache eval` is here.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import EvalConfig
from .corrections import FILE_JSON as CORRECTIONS_FILE
from .corrections import Corrections
from .corrections import find as find_corrections
from .corrections import for_store as corrections_for_store
from .datasets import BeirDataset, find_dataset, read_qrels
from .errors import UserError
from .search import EXACT, _faiss, check_similarity
from .store import Store, check_dataset, default_store_path, open_store


def dataset_names(values: list[str]) -> list[str]:
    """`--dataset a --dataset b` and `--dataset a,b` alike, duplicates dropped, order kept."""
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if not names:
        raise UserError("--dataset: name at least one dataset")
    return list(dict.fromkeys(names))


@dataclass
class Resolved:
    """The run-wide choices of one evaluation: what is scored, through which heads and corrections."""

    datasets: list[BeirDataset]
    heads: Any  # None for vanilla
    tower: str
    similarity: str
    corrections: Corrections | None
    corrections_folder: Path | None

    @property
    def variant(self) -> str:
        """Names the run: vanilla, or the tower and heads (and corrections) by fingerprint."""
        variant = "vanilla" if self.heads is None else f"{self.tower}-{self.heads.fingerprint[:8]}"
        if self.corrections is not None:
            variant += f"+{self.corrections.method}-{self.corrections.store_fingerprint[:8]}"
        return variant


def resolve(cfg: EvalConfig, heads: Any) -> Resolved:
    """Find the datasets, load the heads (unless given) and corrections, and check the options against them."""
    names = dataset_names(cfg.datasets)
    if cfg.store and len(names) > 1:
        raise UserError(
            "--store names one store; with several datasets each uses its default store (data/cache/<dataset>/<model>)"
        )
    datasets = [find_dataset(n, cfg.data_dir) for n in names]
    if heads is None and cfg.heads:
        heads = _load_heads(cfg.heads)
    tower, similarity = _validate(cfg, heads)
    folder = find_corrections(cfg.corrections or cfg.heads)
    if cfg.corrections and folder is None:
        raise UserError(f"--corrections {cfg.corrections}: no {CORRECTIONS_FILE} there")
    corrections = Corrections.load(folder) if folder is not None else None
    return Resolved(datasets, heads, tower, similarity, corrections, folder)


def _load_heads(path: str):
    from .heads import load_heads  # noqa: PLC0415  (torch; only evaluation with heads needs it)

    return load_heads(path)


def _validate(cfg: EvalConfig, heads: Any) -> tuple[str, str]:
    """The query tower and similarity the options and heads make, refusing combinations that cannot run."""
    if cfg.k < 10:
        raise UserError(f"--k {cfg.k}: must be at least 10 (NDCG@10 and MRR@10 need ten hits)")
    if cfg.index not in ("faiss", "torch"):
        raise UserError(f"--index {cfg.index!r}: choose faiss or torch")
    if cfg.block_rows is not None and cfg.block_rows <= 0:
        raise UserError(f"--block-rows {cfg.block_rows}: must be a positive integer")
    tower = cfg.query_tower or (heads.config.query_tower if heads is not None else "vanilla")
    if heads is None and tower != "vanilla":
        raise UserError(f"--query-tower {tower}: needs --heads (without them the only tower is vanilla)")
    if heads is not None and not heads.encoder_fingerprint:
        raise UserError(
            f"{cfg.heads or 'heads'}: record no encoder fingerprint, so no store can be checked against them; "
            "retrain them"
        )
    if heads is not None and tower == "vanilla":
        raise UserError(
            "--query-tower vanilla: with --heads the documents are projected; use projection or predictor, "
            "or drop --heads"
        )
    if heads is not None:
        from .heads import TOWERS  # noqa: PLC0415  (torch: only evaluation with heads loads it)

        if tower not in TOWERS:
            raise UserError(f"--query-tower {tower!r}: choose one of {', '.join(TOWERS)} (or drop --heads for vanilla)")
    if cfg.index == "torch" or cfg.device != "auto":
        from .encoder import pick_device  # noqa: PLC0415  (torch)

        pick_device(cfg.device)
    return tower, check_similarity(cfg.similarity or (heads.similarity if heads is not None else "cos"))


@dataclass
class Prepared:
    """One dataset's inputs, opened and checked before anything is written."""

    dataset: BeirDataset
    qrels: dict[str, dict[str, int]]
    store: Store
    with_vector: list[str]  # judged queries with a vector, in store row order
    no_vector: list[str]
    absent: list[tuple[str, str]]  # (query, document) qrels whose document is not in the corpus
    seconds: float
    corrections: tuple[np.ndarray, np.ndarray] | None  # (corpus rows, their vectors) when made for this store


def prepare(cfg: EvalConfig, run: Resolved, log: Callable[[str], None]) -> list[Prepared]:
    """Every dataset's inputs, so that every refusal comes before any write."""
    prepared = [_prepare(dataset, cfg, run, log) for dataset in run.datasets]
    if cfg.corrections and all(p.corrections is None for p in prepared):
        raise UserError(
            f"--corrections {cfg.corrections}: made for another store than those of "
            f"{', '.join(d.name for d in run.datasets)}; pass the store they were made for"
        )
    if run.corrections is not None and run.similarity != "cos":
        raise UserError(
            f"--similarity {run.similarity}: corrections are unit vectors for cosine search; drop one of them"
        )
    return prepared


def _prepare(dataset: BeirDataset, cfg: EvalConfig, run: Resolved, log: Callable[[str], None]) -> Prepared:
    """Read the qrels, open and check the store, count what the qrels name that is not there.

    Qrels naming documents absent from the corpus count as misses, a judged query without a vector
    scores 0; both are warned (and reported in results.json), and --strict refuses them.
    """
    t0 = time.perf_counter()
    name, heads = dataset.name, run.heads
    qrels_path = dataset.qrels_path(cfg.split)
    qrels = read_qrels(qrels_path)
    store_path = cfg.store if cfg.store else default_store_path(dataset.name, cfg.model)
    store = open_store(store_path, expect_encoder=heads.encoder_fingerprint if heads is not None else None)
    heads_dim = getattr(heads.config, "input_dim", None) if heads is not None else None
    if heads_dim is not None and heads_dim != store.dim:
        raise UserError(
            f"--heads {cfg.heads or 'heads'}: take {heads_dim}-d vectors, but {store.path} holds {store.dim}-d ones; "
            "use heads trained on a store of this encoder"
        )
    check_dataset(store, dataset)

    doc_row, query_row = store.corpus.row_of, store.queries.row_of
    with_vector = sorted((q for q in qrels if q in query_row), key=query_row.get)
    no_vector = [q for q in qrels if q not in query_row]
    absent = [(q, d) for q, docs in qrels.items() for d in docs if d not in doc_row]
    if not with_vector:
        raise UserError(
            f"{qrels_path}: none of its {len(qrels)} judged queries (e.g. {no_vector[0]!r}) is in {store.path}; "
            "wrong dataset or split?"
        )
    if absent:
        log(
            f"{name}: {len(absent)} qrels name documents absent from the corpus (e.g. {absent[0][1]!r}); "
            "they count as misses"
        )
    if no_vector:
        log(
            f"{name}: {len(no_vector)} judged queries have no vector in {store.path} (e.g. {no_vector[0]!r}); "
            "they score 0"
        )
    if cfg.strict and (absent or no_vector):
        raise UserError(
            f"{name} --strict: {len(absent)} qrels name absent documents, {len(no_vector)} judged queries have no "
            f"vector in {store.path}; drop --strict to score them as misses"
        )
    dim = getattr(heads.config, "output_dim", None) if heads is not None else store.dim
    if cfg.index == "faiss" and cfg.faiss_index not in EXACT and dim:
        _check_index(cfg.faiss_index, dim, run.similarity)
    seconds = time.perf_counter() - t0
    return Prepared(dataset, qrels, store, with_vector, no_vector, absent, seconds, _corrections_for(store, run, log))


def _check_index(spec: str, dim: int, similarity: str) -> None:
    """Refuse a FAISS factory string that names no index, before any corpus is read."""
    faiss = _faiss()
    metric = faiss.METRIC_INNER_PRODUCT if similarity == "cos" else faiss.METRIC_L2
    try:
        faiss.index_factory(dim, spec, metric)
    except RuntimeError as e:
        # FAISS prefixes its reason with the C++ signature and source line: keep the reason
        reason = re.sub(r"^Error in .*? at \S+:\d+: ", "", str(e).strip().splitlines()[-1])
        raise UserError(
            f"--faiss-index {spec!r}: not a FAISS index factory string ({reason}); e.g. Flat, HNSW32, IVF1024,Flat"
        ) from None


def _corrections_for(store: Store, run: Resolved, log: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray] | None:
    """The corrections' (rows, vectors) when made for this store and these heads; None elsewhere (heads alone)."""
    fixed = corrections_for_store(run.corrections, store, run.heads)
    if run.corrections is not None and fixed is None:
        log(f"{store.dataset_name}: corrections belong to another store; the heads apply alone")
    return fixed
