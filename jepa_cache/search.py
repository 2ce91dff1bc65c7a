"""Top-k retrieval: FAISS (exact `Flat`, or any factory string such as `HNSW32`, `IVF1024,Flat`) or exact torch matmul.

Scores are always "higher is better": `cos` is the inner product of L2-normalised vectors, `l2` is
minus the squared Euclidean distance, so rank order, TREC run files and pytrec_eval (which ranks
by score) agree for both. The corpus may come as one array or as blocks in row order: exact search
then keeps a running top-k merged block by block, so a corpus larger than memory is searched
exactly; an approximate index is filled block by block (trained on the first block). FAISS runs
on the GPU when it was built with GPU support and one is visible.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .errors import UserError

SIMILARITIES = ("cos", "l2")
EXACT = ("Flat", "torch")
_TORCH_TILE = 1 << 26  # query rows x doc rows scored at once on the torch path (256 MiB of float32)


@dataclass
class Hits:
    """Top-k per query, best first. Shape: scores, indices [n_queries, k]; -inf / -1 where the corpus ran out."""

    scores: np.ndarray
    indices: np.ndarray
    backend: str  # what searched, e.g. "faiss-cpu Flat", "torch cpu"
    seconds: float = 0.0  # everything: reading blocks, building (training) the index, searching
    search_seconds: float = 0.0  # the searches alone

    @property
    def queries_per_second(self) -> float:
        return len(self.indices) / self.search_seconds if self.search_seconds > 0 else float("nan")


def check_similarity(similarity: str) -> str:
    if similarity not in SIMILARITIES:
        raise UserError(f"--similarity {similarity!r}: choose one of {', '.join(SIMILARITIES)}")
    return similarity


def prepare(x: np.ndarray, similarity: str) -> np.ndarray:
    """Contiguous float32, rows L2-normalised for cosine (what FAISS needs); the caller's array is never modified."""
    y = np.ascontiguousarray(x, dtype=np.float32)
    if similarity == "cos":
        norms = np.maximum(np.linalg.norm(y, axis=1, keepdims=True), np.finfo(np.float32).tiny)
        if np.shares_memory(y, x):  # the caller's data (or a view of it, e.g. a memmap): leave it alone
            y = y / norms
        else:  # already our own copy: normalise in place, one block-sized array fewer at the peak
            y /= norms
    return y


def merge_top_k(scores_a: np.ndarray, idx_a: np.ndarray, scores_b: np.ndarray, idx_b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k of two top-k lists per query (higher score first; stable, so earlier rows win ties)."""
    scores = np.concatenate([scores_a, scores_b], axis=1)
    idx = np.concatenate([idx_a, idx_b], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(idx, order, axis=1)


def _empty(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)


def _faiss():
    try:
        import faiss  # noqa: PLC0415  (lazy: heavy, and only eval needs it)
    except ImportError:
        raise UserError("faiss is not installed: pip install 'jepa-cache[cpu]' (or [gpu]), or use --index torch") from None
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


def _blocks(doc_vecs: np.ndarray | Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    return [doc_vecs] if isinstance(doc_vecs, np.ndarray) else doc_vecs


def _exact_faiss(blocks: Iterable[np.ndarray], q: np.ndarray, k: int, similarity: str):
    faiss = _faiss()
    best = _empty(len(q), k)
    where, offset, spent = "faiss-cpu", 0, 0.0
    for block in blocks:
        block = prepare(block, similarity)
        flat = faiss.IndexFlatIP(block.shape[1]) if similarity == "cos" else faiss.IndexFlatL2(block.shape[1])
        index, where = _to_gpu(flat)
        index.add(block)
        t0 = time.perf_counter()
        scores, labels = _from_faiss(*index.search(q, min(k, len(block))), similarity)
        spent += time.perf_counter() - t0
        best = merge_top_k(*best, scores, np.where(labels >= 0, labels + offset, -1), k)
        offset += len(block)
        del block, flat, index  # before the next block is read: one block (and its index copy) alive at a time
    return *best, f"{where} Flat", spent


def _exact_torch(blocks: Iterable[np.ndarray], q: np.ndarray, k: int, similarity: str, device):
    import torch  # noqa: PLC0415

    device = torch.device(device or "cpu")
    queries = torch.from_numpy(q).to(device)
    best = _empty(len(q), k)
    offset, spent = 0, 0.0
    with torch.inference_mode():
        for block in blocks:
            docs = torch.from_numpy(prepare(block, similarity)).to(device)
            doc_sq = (docs * docs).sum(1) if similarity == "l2" else None
            t0 = time.perf_counter()
            step = max(1, _TORCH_TILE // max(1, len(docs)))
            top_s, top_i = [], []
            for start in range(0, len(queries), step):
                qb = queries[start : start + step]
                scores = qb @ docs.T
                if doc_sq is not None:  # -(|q|^2 - 2 q.d + |d|^2)
                    scores = 2 * scores - doc_sq[None, :] - (qb * qb).sum(1, keepdim=True)
                s, i = torch.topk(scores, min(k, len(docs)), dim=1)
                top_s.append(s.float().cpu().numpy())
                top_i.append(i.cpu().numpy() + offset)
            spent += time.perf_counter() - t0
            best = merge_top_k(*best, np.concatenate(top_s), np.concatenate(top_i).astype(np.int64), k)
            offset += len(docs)
            del block, docs, doc_sq  # before the next block is read
    return *best, f"torch {device.type}", spent


def _approximate(blocks: Iterable[np.ndarray], q: np.ndarray, k: int, similarity: str, spec: str, params: str | None):
    faiss = _faiss()
    metric = faiss.METRIC_INNER_PRODUCT if similarity == "cos" else faiss.METRIC_L2
    index, where = None, "faiss-cpu"
    for block in blocks:
        block = prepare(block, similarity)
        if index is None:
            try:
                index = faiss.index_factory(block.shape[1], spec, metric)
            except RuntimeError as e:
                raise UserError(f"--faiss-index {spec!r}: not a FAISS index factory string ({str(e).strip().splitlines()[-1]})") from None
            if not index.is_trained:  # IVF/PQ: trained once, on the first block
                try:
                    index.train(block)
                except RuntimeError as e:
                    raise UserError(f"--faiss-index {spec!r}: training failed on {len(block)} rows ({str(e).strip().splitlines()[-1]})") from None
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
    scores, labels = _from_faiss(*index.search(q, k), similarity)
    return scores, labels, f"{where} {spec}" + (f" ({params})" if params else ""), time.perf_counter() - t0


def top_k(
    doc_vecs: np.ndarray | Iterable[np.ndarray],
    query_vecs: np.ndarray,
    k: int,
    similarity: str = "cos",
    index: str = "Flat",
    *,
    params: str | None = None,
    device=None,
) -> Hits:
    """The k best documents for each query.

    Args:
        doc_vecs: the corpus, one array or an iterable of blocks in row order (for corpora larger than memory).
        index: "Flat" (exact, FAISS), "torch" (exact, torch matmul on `device`), or another FAISS factory string.
        params: FAISS search parameters for an approximate index, e.g. "nprobe=32" or "efSearch=128".
        device: torch device for index="torch" (default CPU).

    Shape:
        doc_vecs [n_docs, dim], query_vecs [n_queries, dim] -> Hits with [n_queries, k] arrays
    """
    check_similarity(similarity)
    if k <= 0:
        raise UserError(f"--k {k}: must be a positive integer")
    q = prepare(query_vecs, similarity)
    t0 = time.perf_counter()
    if index == "torch":
        scores, labels, backend, spent = _exact_torch(_blocks(doc_vecs), q, k, similarity, device)
    elif index == "Flat":
        scores, labels, backend, spent = _exact_faiss(_blocks(doc_vecs), q, k, similarity)
    else:
        scores, labels, backend, spent = _approximate(_blocks(doc_vecs), q, k, similarity, index, params)
    return Hits(scores, labels, backend, time.perf_counter() - t0, spent)


def recall_vs_exact(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top-k that the approximate search found (rows of corpus indices; -1 ignored)."""
    found = [len(set(a[a >= 0]) & set(e[e >= 0])) / max(1, int((e >= 0).sum())) for a, e in zip(approx, exact)]
    return float(np.mean(found)) if found else float("nan")
