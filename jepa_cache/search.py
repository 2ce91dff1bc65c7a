"""Top-k retrieval: FAISS (exact `Flat`, or any factory string such as `HNSW32`, `IVF1024,Flat`) or exact torch matmul.

Scores are always "higher is better": `cos` is the inner product of L2-normalised vectors, `l2` is
minus the squared Euclidean distance. Rankings are deterministic: the backend only proposes
candidates (float32, whose last bits depend on threads, blocking and the library); every candidate
is rescored in float64 in a fixed order and rounded to float32, and ties are broken by a given
order (eval: trec_eval's, larger document id first), so threads, `--block-rows` and FAISS vs torch
give the same ranking and scores, and pytrec_eval ranks the written run as we did. For exact
search a query's candidates are widened until no document outside them can reach its k-th score
(float32 error bound; TF32 matmuls would void it). The corpus may come as one array or as a
function yielding blocks in row order: exact search keeps a running top-k merged block by block;
an approximate index is filled block by block (trained on the first block), and its candidates
are rescored in a second pass. FAISS runs on the GPU when built with GPU support and one is visible.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from .errors import UserError

SIMILARITIES = ("cos", "l2")
EXACT = ("Flat", "torch")
MARGIN = 16  # candidates beyond k asked of the backend per block, so rank k is rarely in doubt
_TORCH_TILE = 1 << 26  # query rows x doc rows scored at once on the torch path (256 MiB of float32)
_RESCORE_ELEMENTS = 1 << 22  # float64 values per operand rescored at once (32 MiB)
_U = 2.0**-24  # float32 unit roundoff


@dataclass
class Hits:
    """Top-k per query, best first. Shape: scores, indices [n_queries, k]; -inf / -1 where the corpus ran out."""

    scores: np.ndarray
    indices: np.ndarray
    backend: str  # what searched, e.g. "faiss-cpu Flat", "torch cpu"
    seconds: float = 0.0  # everything: reading blocks, building (training) the index, searching
    search_seconds: float = 0.0  # searching and rescoring (not reading blocks or building the index)

    @property
    def queries_per_second(self) -> float:
        return len(self.indices) / self.search_seconds if self.search_seconds > 0 else float("nan")


def check_similarity(similarity: str) -> str:
    if similarity not in SIMILARITIES:
        raise UserError(f"--similarity {similarity!r}: choose one of {', '.join(SIMILARITIES)}")
    return similarity


def unit(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows scaled to unit length, in x's dtype (into `out`, which may be x itself); a zero row stays zero."""
    return np.divide(x, np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float32).tiny), out=out)


def prepare(x: np.ndarray, similarity: str) -> np.ndarray:
    """Contiguous float32, rows L2-normalised for cosine (what FAISS needs); the caller's array is never modified."""
    y = np.ascontiguousarray(x, dtype=np.float32)
    if similarity == "cos":  # in place when y is our own copy (one block-sized array fewer at the peak), never in x
        y = unit(y, out=None if np.shares_memory(y, x) else y)
    return y


def tie_order(ids: list[str]) -> np.ndarray:
    """Per row, its place among equal scores as trec_eval (and so pytrec_eval) ranks them: larger id first.

    trec_eval sorts a query's documents by score, then by docno with strcmp, descending; Python's
    string order is strcmp's on UTF-8. Ranking with this order makes our run files, our top-k cut and
    MRR@10's truncation (metrics.truncate) agree with pytrec_eval on every tie.
    """
    order = np.empty(len(ids), dtype=np.int64)
    order[sorted(range(len(ids)), key=ids.__getitem__, reverse=True)] = np.arange(len(ids))
    return order


def _empty(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)


def _best(scores: np.ndarray, rows: np.ndarray, ties: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query the k best (score descending, then `ties[row]` ascending, row number when None); -inf / -1 pad."""
    if scores.shape[1] < k:
        pad_s, pad_r = _empty(len(scores), k - scores.shape[1])
        scores, rows = np.concatenate([scores, pad_s], axis=1), np.concatenate([rows, pad_r], axis=1)
    key = np.where(rows >= 0, rows if ties is None else ties[rows], np.iinfo(np.int64).max)
    order = np.lexsort((key, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


def _rescore(queries: np.ndarray, block: np.ndarray, local: np.ndarray, similarity: str) -> np.ndarray:
    """The scores that rank: query i against block row local[i, j] ([n, m]; -1: none, -inf), from the vectors as
    given (not the float32-normalised copies), in float64 rounded to float32.

    Every sum runs over one vector's coordinates in numpy's fixed (pairwise) order, so a pair's score
    does not depend on the threads, the block it sits in or the other pairs rescored with it.
    """
    out = np.full(local.shape, -np.inf, dtype=np.float32)
    valid = local >= 0
    dim = block.shape[1]
    if similarity == "cos":  # each distinct document's norm once
        rows, where = np.unique(local[valid], return_inverse=True)
        row_norm = np.empty(len(rows))
        for start in range(0, len(rows), max(1, _RESCORE_ELEMENTS // max(1, dim))):
            d = block[rows[start : start + max(1, _RESCORE_ELEMENTS // max(1, dim))]].astype(np.float64)
            row_norm[start : start + len(d)] = np.sqrt((d * d).sum(-1))
        doc_norm = np.ones(local.shape)  # where no row: anything finite, masked below
        doc_norm[valid] = row_norm[where]
    cols = max(1, min(local.shape[1], _RESCORE_ELEMENTS // max(1, dim)))  # tiles of queries x candidates
    step = max(1, _RESCORE_ELEMENTS // max(1, cols * dim))
    for start in range(0, len(local), step):
        for col in range(0, local.shape[1], cols):
            tile, ok = local[start : start + step, col : col + cols], valid[start : start + step, col : col + cols]
            if not ok.any():
                continue
            d = block[np.where(ok, tile, 0)].astype(np.float64)  # [c, m, dim]
            q = queries[start : start + step].astype(np.float64)[:, None, :]
            if similarity == "cos":
                norms = np.sqrt((q * q).sum(-1)) * doc_norm[start : start + step, col : col + cols]
                d *= q
                scores = d.sum(-1) / np.maximum(norms, np.finfo(np.float64).tiny)
            else:
                d -= q
                d *= d
                scores = -d.sum(-1)
            out[start : start + step, col : col + cols] = np.where(ok, scores, -np.inf)
    return out


def _slack(q: np.ndarray, block: np.ndarray, similarity: str) -> np.ndarray:
    """Per query, a bound on |float32 score of prepared vectors - _rescore's score| for this block.

    A float32 dot product of n terms errs by at most n*u*sum|q_i d_i| in any summation order; the
    float32 normalisation adds about as much again (cos), and |q|^2 + |d|^2 - 2 q.d by at most
    (n + 3) u (|q| + |d|)^2 (l2).
    """
    scale = 1.0
    if similarity == "l2":
        d_max = float(np.sqrt(np.max(np.einsum("ij,ij->i", block, block, dtype=np.float64), initial=0.0)))
        scale = (np.linalg.norm(q.astype(np.float64), axis=1) + d_max) ** 2 * 1.01
    return np.broadcast_to((2 * q.shape[1] + 16) * _U * scale, (len(q),))


def _reach(approx: np.ndarray, slack: np.ndarray) -> np.ndarray:
    """The highest float32 score a document with these backend scores can have: what it must beat to be left out."""
    return (approx.astype(np.float64) + slack).astype(np.float32)


def _float32_scores(block: np.ndarray, q: np.ndarray, similarity: str) -> np.ndarray:
    scores = q @ block.T
    if similarity == "l2":
        scores = 2 * scores - np.einsum("ij,ij->i", block, block)[None, :] - np.einsum("ij,ij->i", q, q)[:, None]
    return scores


def _widen(queries, q, block, prepared, kth, slack, similarity, offset, ties, k) -> tuple[np.ndarray, np.ndarray]:
    """The block's exact top-k for queries whose k-th score a document outside the backend's candidates might
    reach: every row whose float32 score comes within the error bound is rescored."""
    scores, rows = _empty(len(q), k)
    step = max(1, _TORCH_TILE // max(1, len(prepared)))
    for start in range(0, len(q), step):
        approx = _float32_scores(prepared, q[start : start + step], similarity)
        for i, row in enumerate(approx, start):
            local = np.nonzero(_reach(row, slack[i]) >= kth[i])[0][None, :]
            s, r = _best(_rescore(queries[i : i + 1], block, local, similarity), local + offset, ties, k)
            scores[i], rows[i] = s[0], r[0]
    return scores, rows


def _faiss():
    try:
        import faiss  # noqa: PLC0415  (lazy: heavy, and only eval needs it)
    except ImportError:
        raise UserError("faiss is not installed: pip install 'jepa-cache[cpu]' (or [gpu]), or use --index "
                        "torch") from None
    return faiss


@functools.cache
def _gpu_resources():
    """FAISS GPU resources when faiss has GPU support and a GPU is visible, else None."""
    faiss = _faiss()
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return faiss.StandardGpuResources()
    return None


def _to_gpu(index):
    """Move an index to GPU 0 when possible; indexes FAISS cannot clone (e.g. HNSW) stay on the CPU."""
    res = _gpu_resources()
    if res is None:
        return index, "faiss-cpu"
    try:
        return _faiss().index_cpu_to_gpu(res, 0, index), "faiss-gpu"
    except RuntimeError:
        return index, "faiss-cpu"


def _from_faiss(distances: np.ndarray, labels: np.ndarray, similarity: str) -> tuple[np.ndarray, np.ndarray]:
    scores = -distances if similarity == "l2" else distances.copy()
    scores[labels < 0] = -np.inf
    return scores.astype(np.float32, copy=False), labels.astype(np.int64, copy=False)


Searcher = Callable[[np.ndarray], tuple[Callable[[int], tuple[np.ndarray, np.ndarray]], str]]


def _faiss_flat(q: np.ndarray, similarity: str) -> Searcher:
    faiss = _faiss()

    def open_block(block: np.ndarray):
        flat = faiss.IndexFlatIP(block.shape[1]) if similarity == "cos" else faiss.IndexFlatL2(block.shape[1])
        index, where = _to_gpu(flat)
        index.add(block)
        return (lambda m: _from_faiss(*index.search(q, m), similarity)), f"{where} Flat"

    return open_block


def _torch_matmul(q: np.ndarray, similarity: str, device) -> Searcher:
    import torch  # noqa: PLC0415

    device = torch.device(device or "cpu")
    queries = torch.from_numpy(q).to(device)

    def open_block(block: np.ndarray):
        docs = torch.from_numpy(block).to(device)
        doc_sq = (docs * docs).sum(1) if similarity == "l2" else None

        def search(m: int) -> tuple[np.ndarray, np.ndarray]:
            step = max(1, _TORCH_TILE // max(1, len(docs)))
            top_s, top_i = [], []
            with torch.inference_mode():
                for start in range(0, len(queries), step):
                    qb = queries[start : start + step]
                    scores = qb @ docs.T
                    if doc_sq is not None:  # -(|q|^2 - 2 q.d + |d|^2)
                        scores = 2 * scores - doc_sq[None, :] - (qb * qb).sum(1, keepdim=True)
                    s, i = torch.topk(scores, m, dim=1)
                    top_s.append(s.float().cpu().numpy())
                    top_i.append(i.cpu().numpy())
            return np.concatenate(top_s), np.concatenate(top_i).astype(np.int64)

        return search, f"torch {device.type}"

    return open_block


def _exact(blocks: Iterable[np.ndarray], queries: np.ndarray, q: np.ndarray, k: int, similarity: str,
           ties: np.ndarray | None, open_block: Searcher):
    """Block by block: the backend's k + MARGIN best, rescored; widened where rank k is in doubt; merged."""
    best = _empty(len(q), k)
    backend, offset, spent = "", 0, 0.0
    for block in blocks:
        prepared = prepare(block, similarity)
        search, backend = open_block(prepared)
        t0 = time.perf_counter()
        m = min(k + MARGIN, len(block))
        approx, local = search(m)
        scores, rows = _best(_rescore(queries, block, local, similarity), np.where(local >= 0, local + offset, -1),
                             ties, k)
        # rows the backend did not return score at most approx[:, -1] (+ error): can one reach rank k?
        if m < len(block):
            slack = _slack(q, prepared, similarity)
            doubt = np.nonzero(_reach(approx[:, -1], slack) >= scores[:, k - 1])[0]
            if len(doubt):
                scores[doubt], rows[doubt] = _widen(queries[doubt], q[doubt], block, prepared, scores[doubt, k - 1],
                                                    slack[doubt], similarity, offset, ties, k)
        best = _best(np.concatenate([best[0], scores], axis=1), np.concatenate([best[1], rows], axis=1), ties, k)
        spent += time.perf_counter() - t0
        offset += len(block)
        del block, prepared, search  # before the next block is read: one block (and its index copy) alive at a time
    return *best, backend, spent


def _approximate(blocks: Callable[[], Iterable[np.ndarray]], queries: np.ndarray, q: np.ndarray, k: int,
                 similarity: str, spec: str, params: str | None, ties: np.ndarray | None):
    """Fill the index block by block, take its k + MARGIN candidates, rescore them in a second pass over the blocks."""
    faiss = _faiss()
    metric = faiss.METRIC_INNER_PRODUCT if similarity == "cos" else faiss.METRIC_L2
    index, where = None, "faiss-cpu"
    for block in blocks():
        block = prepare(block, similarity)
        if index is None:
            try:
                index = faiss.index_factory(block.shape[1], spec, metric)
            except RuntimeError as e:
                raise UserError(f"--faiss-index {spec!r}: not a FAISS index factory string "
                                f"({str(e).strip().splitlines()[-1]})") from None
            if not index.is_trained:  # IVF/PQ: trained once, on the first block
                try:
                    index.train(block)
                except RuntimeError as e:
                    raise UserError(f"--faiss-index {spec!r}: training failed on {len(block)} rows "
                                    f"({str(e).strip().splitlines()[-1]})") from None
            index, where = _to_gpu(index)
            if params:
                space = faiss.GpuParameterSpace() if where == "faiss-gpu" else faiss.ParameterSpace()
                try:
                    space.set_index_parameters(index, params)
                except RuntimeError as e:
                    raise UserError(f"--faiss-params {params!r}: {str(e).strip().splitlines()[-1]}") from None
        index.add(block)
    if index is None:
        return *_empty(len(q), k), f"{where} {spec}", 0.0
    t0 = time.perf_counter()
    _, labels = _from_faiss(*index.search(q, k + MARGIN), similarity)
    scores, offset = np.full(labels.shape, -np.inf, dtype=np.float32), 0
    for block in blocks():
        local = np.where((labels >= offset) & (labels < offset + len(block)), labels - offset, -1)
        scores = np.where(local >= 0, _rescore(queries, block, local, similarity), scores)
        offset += len(block)
    return (*_best(scores, labels, ties, k), f"{where} {spec}" + (f" ({params})" if params else ""),
            time.perf_counter() - t0)


def top_k(
    doc_vecs: np.ndarray | Callable[[], Iterable[np.ndarray]],
    query_vecs: np.ndarray,
    k: int,
    similarity: str = "cos",
    index: str = "Flat",
    *,
    params: str | None = None,
    device=None,
    ties: np.ndarray | None = None,
) -> Hits:
    """The k best documents for each query, by float64 score rounded to float32, then `ties`.

    Args:
        doc_vecs: the corpus, one array or a function returning its blocks in row order (for corpora larger than
            memory; called once, or twice for an approximate index).
        index: "Flat" (exact, FAISS), "torch" (exact, torch matmul on `device`), or another FAISS factory string.
        params: FAISS search parameters for an approximate index, e.g. "nprobe=32" or "efSearch=128".
        device: torch device for index="torch" (default CPU).
        ties: [n_docs] int, lower ranks first among equal scores (e.g. tie_order(ids)); default the row number.

    Shape:
        doc_vecs [n_docs, dim], query_vecs [n_queries, dim] -> Hits with [n_queries, k] arrays
    """
    check_similarity(similarity)
    if k <= 0:
        raise UserError(f"--k {k}: must be a positive integer")
    queries = np.asarray(query_vecs)
    q = prepare(queries, similarity)
    blocks = (lambda: [doc_vecs]) if isinstance(doc_vecs, np.ndarray) else doc_vecs
    t0 = time.perf_counter()
    if index in EXACT:
        searcher = _torch_matmul(q, similarity, device) if index == "torch" else _faiss_flat(q, similarity)
        scores, labels, backend, spent = _exact(blocks(), queries, q, k, similarity, ties, searcher)
    else:
        scores, labels, backend, spent = _approximate(blocks, queries, q, k, similarity, index, params, ties)
    return Hits(scores, labels, backend, time.perf_counter() - t0, spent)


def recall_vs_exact(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top-k that the approximate search found (rows of corpus indices; -1 ignored)."""
    found = [len(set(a[a >= 0]) & set(e[e >= 0])) / max(1, int((e >= 0).sum())) for a, e in zip(approx, exact)]
    return float(np.mean(found)) if found else float("nan")
