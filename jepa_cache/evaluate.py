"""Stage 3: store (+ heads) -> index -> top-k -> pytrec_eval, for one or more datasets in one table.

Vanilla evaluation needs neither torch nor heads; with heads, documents go through the projection and
queries through the projection or projection + predictor (`query_tower`). As in BEIR/MTEB (metrics.py),
only judged queries are searched and a hit whose id equals the query id is dropped (k+1 are retrieved so k
remain). The run's inputs are checked in eval_inputs.py and its per-dataset files written by
eval_outputs.py; results.json is written here, last and atomically: it exists only for a finished run.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from rich.table import Table

from .config import EvalConfig
from .corrections import apply_to_block
from .eval_inputs import Prepared, Resolved, prepare, resolve
from .eval_outputs import remove, write_outputs
from .files import atomic_write_json, check_writable, exclusive_lock
from .metrics import run_of_hits, score
from .search import EXACT, Hits, recall_vs_exact, tie_order, top_k
from .store import Store, now_iso, package_versions

DEFAULT_RUNS_DIR = Path("runs/eval")
BLOCK_BYTES = 2 << 30  # corpus held at once as float32; larger corpora are searched block by block


def _apply(fn: Callable, x: np.ndarray, *args) -> np.ndarray:
    """Run a heads tower on a block of float32 vectors (CPU tensors in, numpy out)."""
    import torch  # noqa: PLC0415  (only evaluation with heads needs torch)

    with torch.inference_mode():
        return fn(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), *args).float().cpu().numpy()


def _kept_rows(run: dict[str, list[tuple[str, float]]], row_of: dict[str, int]) -> np.ndarray:
    k = max((len(d) for d in run.values()), default=0)
    out = np.full((len(run), k), -1, dtype=np.int64)
    for i, docs in enumerate(run.values()):
        out[i, : len(docs)] = [row_of[d] for d, _ in docs]
    return out


def _vectors(
    prep: Prepared, cfg: EvalConfig, heads: Any, tower: str
) -> tuple[np.ndarray, np.ndarray | Callable[[], Iterator[np.ndarray]], bool]:
    """The queries (through their tower) and the corpus (projected, corrected): the array when it fits, else blocks."""
    store = prep.store
    query_row = store.queries.row_of
    queries = store.queries.vectors(rows=np.array([query_row[q] for q in prep.with_vector], dtype=np.int64))
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
    return queries, corpus if in_memory else blocks, in_memory


@dataclass
class _Searched:
    """One dataset's search: what ran, what it found, and how close an approximate index came to exact."""

    spec: str  # "torch" or the FAISS factory string
    hits: Hits
    run: dict[str, list[tuple[str, float]]]
    recall: float | None  # of the approximate index against exact search; None when exact
    exact_s: float | None


def _search(prep: Prepared, cfg: EvalConfig, queries: np.ndarray, docs: Any, similarity: str) -> _Searched:
    """Top-k of every query, ids equal to the query's dropped; an approximate index is measured against Flat."""
    corpus_ids, doc_row = prep.store.corpus.ids, prep.store.corpus.row_of
    spec = "torch" if cfg.index == "torch" else cfg.faiss_index
    device = None
    if cfg.index == "torch":
        from .encoder import pick_device  # noqa: PLC0415  (torch)

        device = pick_device(cfg.device)
    ties = tie_order(corpus_ids)
    hits = top_k(docs, queries, cfg.k + 1, similarity, spec, params=cfg.faiss_params, device=device, ties=ties)
    run = run_of_hits(hits, prep.with_vector, corpus_ids, cfg.k)
    recall, exact_s = None, None
    if spec not in EXACT:
        exact = top_k(docs, queries, cfg.k + 1, similarity, "Flat", ties=ties)
        recall = recall_vs_exact(
            _kept_rows(run, doc_row), _kept_rows(run_of_hits(exact, prep.with_vector, corpus_ids, cfg.k), doc_row)
        )
        exact_s = exact.seconds
    return _Searched(spec, hits, run, recall, exact_s)


def _evaluate_one(prep: Prepared, cfg: EvalConfig, run: Resolved, out: Path, tag: str, written: list[Path]) -> dict:
    """Search, score and write one dataset; its entry in results.json."""
    t0 = time.perf_counter() - prep.seconds
    name, qrels = prep.dataset.name, prep.qrels
    queries, docs, in_memory = _vectors(prep, cfg, run.heads, run.tower)
    t_load = time.perf_counter() - t0
    found = _search(prep, cfg, queries, docs, run.similarity)
    hits = found.hits

    t1 = time.perf_counter()
    mean, per_query = score(qrels, {q: dict(d) for q, d in found.run.items()}, recall_at=min(100, cfg.k))
    score_s = time.perf_counter() - t1
    files = write_outputs(out / name, found.run, per_query, set(prep.with_vector), qrels, tag, written)
    return {
        "dataset": name,
        "split": cfg.split,
        "store": _store_record(prep.store),
        "metrics": mean,
        "corrections_applied": 0 if prep.corrections is None else len(prep.corrections[0]),
        "queries": {"judged": len(qrels), "searched": len(prep.with_vector), "without_vector": len(prep.no_vector)},
        "qrels": {
            "pairs": sum(len(d) for d in qrels.values()),
            "absent_docs": len(prep.absent),
            "absent_examples": [d for _, d in prep.absent[:10]],
        },
        "search": {
            "backend": hits.backend,
            "index": found.spec,
            "params": cfg.faiss_params,
            "k": cfg.k,
            "similarity": run.similarity,
            "recall_vs_exact": found.recall,
            "blockwise": not in_memory,
        },
        "timings": {
            "load_s": t_load,
            "index_and_search_s": hits.seconds,
            "search_s": hits.search_seconds,
            "exact_s": found.exact_s,
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


def _header(cfg: EvalConfig, run: Resolved) -> dict:
    """What results.json says of the whole run, before the datasets' entries."""
    heads, corrections = run.heads, run.corrections
    return {
        "config": cfg,
        "variant": run.variant,
        "query_tower": run.tower,
        "similarity": run.similarity,
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
            "path": str(run.corrections_folder),
            "method": corrections.method,
            "gamma": corrections.gamma,
            "documents": len(corrections.doc_ids),
            "store_fingerprint": corrections.store_fingerprint,
        },
        "created": now_iso(),
        "versions": package_versions(),
        "datasets": {},
    }


def evaluate(cfg: EvalConfig, log: Callable[[str], None] = print, heads: Any = None) -> dict:
    """Evaluate one or more datasets; returns (and writes to results.json) metrics, fingerprints and timings.

    Args:
        heads: an already loaded heads object (else loaded from `cfg.heads`): encode_documents(x),
            encode_queries(x, tower), encoder_fingerprint, similarity, fingerprint, config.query_tower
            (and, when present, config.input_dim / config.output_dim, checked against the store and index).
    """
    t0 = time.perf_counter()
    run = resolve(cfg, heads)
    index_tag = "torch" if cfg.index == "torch" else re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.faiss_index)
    default_name = f"{'+'.join(d.name for d in run.datasets)}-{cfg.split}-{run.variant}-{run.similarity}-{index_tag}"
    out = Path(cfg.out) if cfg.out else DEFAULT_RUNS_DIR / default_name
    results = _header(cfg, run)
    check_writable(out)
    prepared = prepare(cfg, run, log)  # every refusal before any write
    with exclusive_lock(out, "eval"):
        written: list[Path] = [] if out.exists() else [out]
        (out / "results.json").unlink(missing_ok=True)  # a stale one must never describe the files this run replaces
        try:
            for prep in prepared:
                results["datasets"][prep.dataset.name] = _evaluate_one(
                    prep, cfg, run, out, f"jepa-cache-{run.variant}", written
                )
            results["total_s"] = time.perf_counter() - t0
            written.append(out / "results.json")
            atomic_write_json(out / "results.json", results)
        except BaseException:
            remove(written)  # a failed run (disk full, a FAISS error, Ctrl-C) leaves no half of itself
            raise
    results["out"] = str(out)
    return results


def results_table(results: dict):
    """A rich table of one evaluation: a row per dataset, imported stores marked."""
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
