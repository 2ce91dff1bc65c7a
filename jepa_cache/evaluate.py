"""Stage 3: store (+ heads) -> index -> top-k -> pytrec_eval, for one or more datasets in one table.

Vanilla evaluation puts the store's vectors straight into the index and needs neither torch nor
heads. With heads, documents go through the projection and queries through the projection or
projection + predictor (`query_tower`); the heads refuse a store of another encoder. Conventions
follow BEIR/MTEB (see metrics.py): only judged queries are searched, a hit whose id equals the
query id is dropped (k+1 are retrieved so k remain), qrels naming documents absent from the corpus
count as misses and are reported, a judged query without a vector scores 0 and is reported.

Outputs in `out/`: results.json (written last and atomically: it exists only for a finished run),
and per dataset `<name>/per_query.parquet`, `<name>/run.parquet`, `<name>/run.trec`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .corrections import FILE_JSON as CORRECTIONS_FILE
from .corrections import Corrections, apply_to_block
from .corrections import find as find_corrections
from .corrections import for_store as corrections_for_store
from .config import EvalConfig
from .datasets import BeirDataset, find_dataset, read_qrels
from .errors import UserError
from .files import atomic_path, atomic_write_bytes, atomic_write_json, check_writable, exclusive_lock
from .metrics import run_of_hits, score
from .search import EXACT, _faiss, check_similarity, recall_vs_exact, tie_order, top_k
from .models import model_folder_name
from .store import Store, check_dataset, default_store_path, now_iso, open_store, package_versions

DEFAULT_RUNS_DIR = Path("runs/eval")
BLOCK_BYTES = 2 << 30  # corpus held at once as float32; larger corpora are searched block by block


def dataset_names(values: list[str]) -> list[str]:
    """`--dataset a --dataset b` and `--dataset a,b` alike, duplicates dropped, order kept."""
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if not names:
        raise UserError("--dataset: name at least one dataset")
    return list(dict.fromkeys(names))


def _load_heads(path: str):
    from .heads import load_heads  # noqa: PLC0415  (torch; only evaluation with heads needs it)

    return load_heads(path)


def _apply(fn: Callable, x: np.ndarray, *args) -> np.ndarray:
    """Run a heads tower on a block of float32 vectors (CPU tensors in, numpy out)."""
    import torch  # noqa: PLC0415

    with torch.inference_mode():
        return fn(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), *args).float().cpu().numpy()


def _kept_rows(run: dict[str, list[tuple[str, float]]], row_of: dict[str, int]) -> np.ndarray:
    k = max((len(d) for d in run.values()), default=0)
    out = np.full((len(run), k), -1, dtype=np.int64)
    for i, docs in enumerate(run.values()):
        out[i, : len(docs)] = [row_of[d] for d, _ in docs]
    return out


def _write_outputs(
    folder: Path, run: dict, per_query: dict, has_vector: set[str], qrels: dict, tag: str, written: list[Path]
) -> dict[str, str]:
    """Write one dataset's files (each atomically), recording in `written` what this run creates, for cleanup on failure."""
    if not folder.exists():
        written.append(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written.extend(folder / f for f in ("per_query.parquet", "run.parquet", "run.trec"))
    names = list(next(iter(per_query.values())).keys())
    qids = list(per_query)
    table = {
        "query_id": qids,
        **{n: [per_query[q][n] for q in qids] for n in names},
        "relevant": [sum(1 for r in qrels[q].values() if r > 0) for q in qids],
        "has_vector": [q in has_vector for q in qids],
    }
    with atomic_path(folder / "per_query.parquet") as tmp:
        pq.write_table(pa.table(table), tmp)
    rows = [(qid, rank, did, score) for qid, docs in run.items() for rank, (did, score) in enumerate(docs, 1)]
    with atomic_path(folder / "run.parquet") as tmp:
        pq.write_table(
            pa.table(
                {
                    "query_id": pa.array([r[0] for r in rows], pa.string()),
                    "rank": pa.array([r[1] for r in rows], pa.int32()),
                    "doc_id": pa.array([r[2] for r in rows], pa.string()),
                    "score": pa.array([r[3] for r in rows], pa.float32()),
                }
            ),
            tmp,
        )
    # 9 significant digits round-trip a float32 score, so a re-scored TREC file ranks exactly as we did.
    atomic_write_bytes(folder / "run.trec", "".join(f"{q} Q0 {d} {r} {s:.9g} {tag}\n" for q, r, d, s in rows).encode())
    return {
        "per_query": str(folder / "per_query.parquet"),
        "run": str(folder / "run.parquet"),
        "trec": str(folder / "run.trec"),
    }


@dataclass
class _Prepared:
    """One dataset's inputs, opened and checked before anything is written."""

    dataset: BeirDataset
    qrels: dict[str, dict[str, int]]
    store: Store
    with_vector: list[str]  # judged queries with a vector, in store row order
    no_vector: list[str]
    absent: list[tuple[str, str]]  # (query, document) qrels whose document is not in the corpus
    seconds: float
    corrections: tuple[np.ndarray, np.ndarray] | None  # (corpus rows, their vectors) when made for this store


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


def _prepare(
    dataset: BeirDataset, cfg: EvalConfig, heads: Any, corrections: Any, similarity: str, log: Callable[[str], None]
) -> _Prepared:
    """Read the qrels, open and check the store, count what the qrels name that is not there (warned; --strict refuses)."""
    t0 = time.perf_counter()
    name = dataset.name
    qrels_path = dataset.qrels_path(cfg.split)
    qrels = read_qrels(qrels_path)
    store_path = cfg.store if cfg.store else default_store_path(dataset.name, Path(model_folder_name(cfg.model)))
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
            f"{name}: {len(absent)} qrels name documents absent from the corpus (e.g. {absent[0][1]!r}); they count as misses"
        )
    if no_vector:
        log(
            f"{name}: {len(no_vector)} judged queries have no vector in {store.path} (e.g. {no_vector[0]!r}); they score 0"
        )
    if cfg.strict and (absent or no_vector):
        raise UserError(
            f"{name} --strict: {len(absent)} qrels name absent documents, {len(no_vector)} judged queries have no vector "
            f"in {store.path}; drop --strict to score them as misses"
        )
    dim = getattr(heads.config, "output_dim", None) if heads is not None else store.dim
    if cfg.index == "faiss" and cfg.faiss_index not in EXACT and dim:
        _check_index(cfg.faiss_index, dim, similarity)
    return _Prepared(
        dataset,
        qrels,
        store,
        with_vector,
        no_vector,
        absent,
        time.perf_counter() - t0,
        _corrections_for(store, corrections, heads, log),
    )


def _corrections_for(
    store: Store, corrections: Any, heads: Any, log: Callable[[str], None]
) -> tuple[np.ndarray, np.ndarray] | None:
    """The corrections' (rows, vectors) when they were made for this store and these heads; None elsewhere (heads alone)."""
    fixed = corrections_for_store(corrections, store, heads)
    if corrections is not None and fixed is None:
        log(f"{store.dataset_name}: corrections belong to another store; the heads apply alone")
    return fixed


def _evaluate_one(
    prep: _Prepared, cfg: EvalConfig, heads: Any, tower: str, similarity: str, out: Path, tag: str, written: list[Path]
) -> dict:
    t0 = time.perf_counter() - prep.seconds
    name, qrels, store = prep.dataset.name, prep.qrels, prep.store
    with_vector, no_vector, absent = prep.with_vector, prep.no_vector, prep.absent
    corpus_ids, doc_row = store.corpus.ids, store.corpus.row_of
    query_row = store.queries.row_of

    queries = store.queries.vectors(rows=np.array([query_row[q] for q in with_vector], dtype=np.int64))
    if heads is not None:
        queries = _apply(heads.encode_queries, queries, tower)
    block_rows = cfg.block_rows or max(1, BLOCK_BYTES // (4 * store.dim))

    def blocks() -> Iterator[np.ndarray]:
        # read as stored (float16 by default): the float32 copy is made by the search, one block at a time
        for start, block in store.corpus.iter_blocks(block_rows, dtype=store.corpus.array.dtype):
            block = _apply(heads.encode_documents, block) if heads is not None else block
            yield apply_to_block(block, start, *prep.corrections) if prep.corrections is not None else block

    in_memory = store.corpus.rows <= block_rows  # fits: read (and project) once, reuse for the exact reference
    corpus = next(blocks(), np.zeros((0, store.dim), np.float32)) if in_memory else None

    def docs() -> np.ndarray | Callable[[], Iterator[np.ndarray]]:
        return corpus if in_memory else blocks

    t_load = time.perf_counter() - t0

    spec = "torch" if cfg.index == "torch" else cfg.faiss_index
    device = None
    if cfg.index == "torch":
        from .encoder import pick_device  # noqa: PLC0415  (torch)

        device = pick_device(cfg.device)
    ties = tie_order(corpus_ids)
    hits = top_k(docs(), queries, cfg.k + 1, similarity, spec, params=cfg.faiss_params, device=device, ties=ties)
    run = run_of_hits(hits, with_vector, corpus_ids, cfg.k)
    recall, exact_s = None, None
    if spec not in EXACT:
        exact = top_k(docs(), queries, cfg.k + 1, similarity, "Flat", ties=ties)
        recall = recall_vs_exact(
            _kept_rows(run, doc_row), _kept_rows(run_of_hits(exact, with_vector, corpus_ids, cfg.k), doc_row)
        )
        exact_s = exact.seconds

    t1 = time.perf_counter()
    mean, per_query = score(qrels, {q: dict(d) for q, d in run.items()}, recall_at=min(100, cfg.k))
    score_s = time.perf_counter() - t1
    files = _write_outputs(out / name, run, per_query, set(with_vector), qrels, tag, written)
    return {
        "dataset": name,
        "split": cfg.split,
        "store": _store_record(store),
        "metrics": mean,
        "corrections_applied": 0 if prep.corrections is None else len(prep.corrections[0]),
        "queries": {"judged": len(qrels), "searched": len(with_vector), "without_vector": len(no_vector)},
        "qrels": {
            "pairs": sum(len(d) for d in qrels.values()),
            "absent_docs": len(absent),
            "absent_examples": [d for _, d in absent[:10]],
        },
        "search": {
            "backend": hits.backend,
            "index": spec,
            "params": cfg.faiss_params,
            "k": cfg.k,
            "similarity": similarity,
            "recall_vs_exact": recall,
            "blockwise": not in_memory,
        },
        "timings": {
            "load_s": t_load,
            "index_and_search_s": hits.seconds,
            "search_s": hits.search_seconds,
            "exact_s": exact_s,
            "score_s": score_s,
            "total_s": time.perf_counter() - t0,
            "queries_per_s": hits.queries_per_second,
        },
        "files": files,
    }


def _store_record(store: Store) -> dict:
    """What results.json says of the store a dataset was scored on."""
    return {
        "path": str(store.path),
        "source": store.provenance.get("source"),
        "imported": store.imported,
        "fingerprint": store.fingerprint,
        "encoder": store.provenance["encoder"]["name"],
        "encoder_fingerprint": store.encoder_fingerprint,
        "dtype": store.provenance["dtype"],
        "docs": store.corpus.rows,
    }


def _validate(cfg: EvalConfig, heads: Any) -> tuple[str, str]:
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
            f"{cfg.heads or 'heads'}: record no encoder fingerprint, so no store can be checked against them; retrain them"
        )
    if heads is not None and tower == "vanilla":
        raise UserError(
            "--query-tower vanilla: with --heads the documents are projected; use projection or predictor, or drop --heads"
        )
    if heads is not None:
        from .heads import TOWERS  # noqa: PLC0415  (torch: only evaluation with heads loads it)

        if tower not in TOWERS:
            raise UserError(f"--query-tower {tower!r}: choose one of {', '.join(TOWERS)} (or drop --heads for vanilla)")
    if cfg.index == "torch" or cfg.device != "auto":
        from .encoder import pick_device  # noqa: PLC0415  (torch)

        pick_device(cfg.device)
    return tower, check_similarity(cfg.similarity or (heads.similarity if heads is not None else "cos"))


def evaluate(cfg: EvalConfig, log: Callable[[str], None] = print, heads: Any = None) -> dict:
    """Evaluate one or more datasets; returns (and writes to results.json) metrics, fingerprints and timings.

    Args:
        heads: an already loaded heads object (else loaded from `cfg.heads`): encode_documents(x),
            encode_queries(x, tower), encoder_fingerprint, similarity, fingerprint, config.query_tower
            (and, when present, config.input_dim / config.output_dim, checked against the store and index).
    """
    t0 = time.perf_counter()
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
    variant = "vanilla" if heads is None else f"{tower}-{heads.fingerprint[:8]}"
    if corrections is not None:
        variant += f"+{corrections.method}-{corrections.store_fingerprint[:8]}"
    index_tag = "torch" if cfg.index == "torch" else re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.faiss_index)
    out = (
        Path(cfg.out)
        if cfg.out
        else DEFAULT_RUNS_DIR / f"{'+'.join(d.name for d in datasets)}-{cfg.split}-{variant}-{similarity}-{index_tag}"
    )
    results: dict = {
        "config": cfg,
        "variant": variant,
        "query_tower": tower,
        "similarity": similarity,
        "heads": None
        if heads is None
        else {
            "path": cfg.heads,
            "fingerprint": heads.fingerprint,
            "encoder_fingerprint": heads.encoder_fingerprint,
            "similarity": heads.similarity,
        },
        "corrections": None
        if corrections is None
        else {
            "path": str(folder),
            "method": corrections.method,
            "gamma": corrections.gamma,
            "documents": len(corrections.doc_ids),
            "store_fingerprint": corrections.store_fingerprint,
        },
        "created": now_iso(),
        "versions": package_versions(),
        "datasets": {},
    }
    check_writable(out)
    prepared = [
        _prepare(dataset, cfg, heads, corrections, similarity, log) for dataset in datasets
    ]  # every refusal before any write
    if cfg.corrections and all(p.corrections is None for p in prepared):
        raise UserError(
            f"--corrections {cfg.corrections}: made for another store than those of "
            f"{', '.join(d.name for d in datasets)}; pass the store they were made for"
        )
    if corrections is not None and similarity != "cos":
        raise UserError(f"--similarity {similarity}: corrections are unit vectors for cosine search; drop one of them")
    with exclusive_lock(out, "eval"):
        written: list[Path] = [] if out.exists() else [out]
        (out / "results.json").unlink(missing_ok=True)  # a stale one must never describe the files this run replaces
        try:
            for prep in prepared:
                results["datasets"][prep.dataset.name] = _evaluate_one(
                    prep, cfg, heads, tower, similarity, out, f"jepa-cache-{variant}", written
                )
            results["total_s"] = time.perf_counter() - t0
            written.append(out / "results.json")
            atomic_write_json(out / "results.json", results)
        except BaseException:
            _remove(written)  # a failed run (disk full, a FAISS error, Ctrl-C) leaves no half of itself
            raise
    results["out"] = str(out)
    return results


def _remove(paths: list[Path]) -> None:
    """Delete the files, then the (now empty) folders, that a failed run created."""
    for p in reversed(paths):
        try:
            if p.is_dir():
                p.rmdir()
            else:
                p.unlink(missing_ok=True)
        except OSError:
            pass


def results_table(results: dict):
    """A rich table of one evaluation: a row per dataset, imported stores marked."""
    from rich.table import Table  # noqa: PLC0415

    first = next(iter(results["datasets"].values()))
    names = list(first["metrics"])
    approximate = any(r["search"]["recall_vs_exact"] is not None for r in results["datasets"].values())
    table = Table(
        title=f"{first['split']} · {results['variant']} · {results['similarity']} · {first['search']['backend']}"
    )
    label = {"ndcg": "NDCG", "recall": "Recall", "mrr": "MRR"}
    for col in [
        "dataset",
        "store",
        "queries",
        *[label[n.split("@")[0]] + "@" + n.split("@")[1] for n in names],
        "absent docs",
        "q/s",
        *(["recall vs exact"] if approximate else []),
    ]:
        table.add_column(col, justify="left" if col in ("dataset", "store") else "right")
    for name, r in results["datasets"].items():
        marker = "[yellow]imported[/yellow]" if r["store"]["imported"] else "built"
        queries = f"{r['queries']['searched']}/{r['queries']['judged']}"
        cells = [
            name,
            marker,
            queries,
            *[f"{r['metrics'][n]:.4f}" for n in names],
            str(r["qrels"]["absent_docs"]),
            f"{r['timings']['queries_per_s']:.0f}",
        ]
        if approximate:
            cells.append(
                f"{r['search']['recall_vs_exact']:.4f}" if r["search"]["recall_vs_exact"] is not None else "exact"
            )
        table.add_row(*cells)
    return table
