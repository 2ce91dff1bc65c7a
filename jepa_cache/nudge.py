"""NUDGE-M and NUDGE-N (Zeighami et al., ICLR 2025): per-document corrections in closed form.

Each labelled document moves toward the sum g_d of the training queries that judged it relevant;
one step size γ is chosen on held-out queries. Vectorised re-implementation of `nudge-ft` 0.1.2
(tests compare against it): only labelled rows change, so the corpus is read once, block by block,
to find each held-out query's best unlabelled score, and every γ is then tried on labelled rows only.
Held-out queries go QUERY_CHUNK at a time: memory grows with chunk x labelled rows, never queries x rows.

Shape: corpus [n_docs, d] unit rows; queries [n_q, d]; answers: per query, the corpus rows it judged relevant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from .search import unit

NUDGE_N_GAMMAS = tuple(0.02 * i for i in range(25))  # nudge-ft's grid for NUDGE-N
QUERY_CHUNK = 128  # held-out queries scored together


def spans(n: int, size: int = QUERY_CHUNK) -> list[tuple[int, int]]:
    """[start, stop) of consecutive chunks of `size` rows, the last also taking the remainder (size to 2·size-1 rows).

    No product has fewer rows than `size` (unless n < size), which keeps BLAS on one path: OpenBLAS then gives
    each row the bits of one product of all rows (a product of a few rows takes another path, gemv or small
    kernels, and may round differently).
    """
    if size < 1:
        raise ValueError(f"chunk size {size}: must be at least 1")
    starts = list(range(0, max(n - size, 0) + 1, size))
    return list(zip(starts, starts[1:] + [n]))


def query_sums(
    queries: np.ndarray, answers: Sequence[Sequence[int]], power: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, g): the corpus rows some query judged relevant (sorted) and, per row, the sum of those queries.

    Each query counts with weight |its answers|^-power (0: nudge-ft's plain sum; a query that judges
    many documents says less about each). A query that lists a document twice counts twice, as in nudge-ft.
    One sparse (rows x queries) product in float64, so the sum does not depend on the order of the pairs.
    """
    import torch

    sizes = np.array([len(a) for a in answers], dtype=np.int64)
    q_idx = np.repeat(np.arange(len(answers)), sizes)
    d_idx = np.fromiter((d for a in answers for d in a), dtype=np.int64, count=len(q_idx))
    rows, slot = np.unique(d_idx, return_inverse=True)
    weight = np.maximum(sizes, 1).astype(np.float64) ** -power
    judged = torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([slot.reshape(-1), q_idx])),
        torch.from_numpy(weight[q_idx]),
        (len(rows), len(answers)),
        check_invariants=True,
    )
    g = torch.sparse.mm(judged, torch.from_numpy(np.asarray(queries, dtype=np.float64)))
    return rows, g.numpy().astype(queries.dtype)


def nudge_m(docs: np.ndarray, g: np.ndarray, gamma: float) -> np.ndarray:
    """NUDGE-M: d + γ·g/‖g‖ (not renormalised: score with the inner product)."""
    return docs + gamma * unit(g)


def nudge_n_terms(
    docs: np.ndarray, g: np.ndarray, gammas: Sequence[float]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per γ in `gammas`, NUDGE-N's new vectors as a·d + b·g per document: (a, b), each [n_docs].

    The point on the unit sphere within ‖Δ‖² ≤ γ of d that maximises g·(d + Δ); a document already
    within the step of ĝ becomes ĝ; one with g·d < 0 (or g parallel to d) stays. Being linear in d and g,
    a query's scores for every γ come from two products, q·d and q·g, computed once.
    """
    n = len(docs)
    d64, g64 = docs.astype(np.float64), g.astype(np.float64)
    v = (g64 * d64).sum(axis=1)
    c = (g64 * g64).sum(axis=1)
    perp = np.sqrt(np.maximum(c - v * v, 0.0))
    still = (c - v * v <= 0) | (v < 0)
    norm = np.sqrt(c)
    for gamma in gammas:
        if gamma == 0:
            yield np.ones(n, dtype=np.float64), np.zeros(n, dtype=np.float64)
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            mu = v + np.sqrt(gamma / (4 - gamma)) * perp
            denom = 2 * (mu - v)
            a, b = 1 - gamma * mu / denom, gamma / denom
        a[still], b[still] = 1.0, 0.0
        snap = (norm > 0) & (v >= (1 - gamma / 2) * norm)  # a document no query judged (g = 0) never snaps
        a[snap], b[snap] = 0.0, 1 / norm[snap]
        yield a, b


def nudge_n(docs: np.ndarray, g: np.ndarray, gamma: float) -> np.ndarray:
    """NUDGE-N: the new document vectors [n_docs, d] (see `nudge_n_terms`)."""
    a, b = next(nudge_n_terms(docs, g, (gamma,)))
    return (a[:, None] * docs + b[:, None] * g).astype(docs.dtype)


@dataclass
class Held:
    """Held-out queries for choosing γ, with what does not depend on γ: the unlabelled rows' scores.

    Shape: queries [n, d]; top_scores, top_rows [n, k]: each query's k best unlabelled rows;
    answers: per query, its relevant corpus rows; answer_scores (NUDGE-M's choice only, else None):
    per query, {unlabelled answer row: score}.
    """

    queries: np.ndarray
    answers: list[list[int]]
    top_scores: np.ndarray
    top_rows: np.ndarray
    answer_scores: list[dict[int, float]] | None = None

    @classmethod
    def build(
        cls,
        queries: np.ndarray,
        answers: Sequence[Sequence[int]],
        blocks: Iterable[np.ndarray],
        labelled: np.ndarray,
        k: int = 2,
        tie: np.ndarray | None = None,
        answer_scores: bool = False,
        chunk: int = QUERY_CHUNK,
    ) -> "Held":
        """One pass over the corpus `blocks` (row order): the k best unlabelled rows of every query, `chunk`
        queries at a time, and with `answer_scores` (NUDGE-M) each query's score of its unlabelled answers.

        Equal scores keep the rows first in `tie` (e.g. search.tie_order: pytrec_eval's order); default row order.
        """
        n = len(queries)
        top_s = np.full((n, k), -np.inf, dtype=np.float32)
        top_r = np.full((n, k), -1, dtype=np.int64)
        answers = [list(a) for a in answers]
        pair_q, pair_r = _unlabelled_answers(answers, labelled) if answer_scores else (np.zeros(0, np.int64),) * 2
        pair_s = np.zeros(len(pair_q), dtype=np.float32)
        start = 0
        for block in blocks:
            own = labelled[(labelled >= start) & (labelled < start + len(block))] - start
            rows = np.arange(start, start + len(block))
            for lo, hi in spans(n, chunk):
                s = queries[lo:hi] @ block.T
                hit = (pair_r >= start) & (pair_r < start + len(block)) & (pair_q >= lo) & (pair_q < hi)
                pair_s[hit] = s[pair_q[hit] - lo, pair_r[hit] - start]
                s[:, own] = -np.inf
                top_s[lo:hi], top_r[lo:hi] = _merge(top_s[lo:hi], top_r[lo:hi], s, rows, tie, k)
            start += len(block)
        scored = None
        if answer_scores:
            scored = [{} for _ in range(n)]
            for i, r, v in zip(pair_q.tolist(), pair_r.tolist(), pair_s.tolist()):
                scored[i][r] = v
        return cls(queries, answers, top_s, top_r, scored)


def _unlabelled_answers(answers: list[list[int]], labelled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query, row) of each distinct answer that is not a labelled row."""
    is_labelled = set(labelled.tolist())
    pairs = [(i, a) for i, ans in enumerate(answers) for a in sorted(set(ans)) if a not in is_labelled]
    return np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.int64)


def _merge(
    top_s: np.ndarray, top_r: np.ndarray, s: np.ndarray, rows: np.ndarray, tie: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each query's kept (top_s, top_r) and its new scores `s` of corpus `rows`, ties by `tie`."""
    both_s = np.concatenate([top_s, s], axis=1)
    both_r = np.concatenate([top_r, np.broadcast_to(rows, s.shape)], axis=1)
    key = np.where(both_r >= 0, tie[np.maximum(both_r, 0)] if tie is not None else both_r, np.iinfo(np.int64).max)
    order = ranked(both_s, key, k, keep=k)
    return np.take_along_axis(both_s, order, 1), np.take_along_axis(both_r, order, 1)


def ranked(scores: np.ndarray, key: np.ndarray, k: int, keep: int) -> np.ndarray:
    """Column indices of each row's k best [n, min(k, m)]: highest score first, then smallest `key`, as a sort
    of the whole row ranks them. Only each row's `keep` (>= k) highest are sorted, unless the scores equal to
    its k-th best reach past them (a tie group across the cut): such a row is sorted whole."""
    k, keep = min(k, scores.shape[1]), min(max(keep, k), scores.shape[1])
    part = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]  # the `keep` best, in no order
    top = np.take_along_axis(scores, part, 1)
    kth = -np.sort(-top, axis=1)[:, k - 1]
    order = np.lexsort((np.take_along_axis(key, part, 1), -top), axis=1)[:, :k]
    chosen = np.take_along_axis(part, order, 1)
    for i in np.flatnonzero((scores >= kth[:, None]).sum(axis=1) > keep):
        chosen[i] = np.lexsort((key[i], -scores[i]))[:k]
    return chosen


def choose_gamma_n(
    held: Held,
    rows: np.ndarray,
    docs: np.ndarray,
    g: np.ndarray,
    gammas: Sequence[float] = NUDGE_N_GAMMAS,
    k: int = 1,
    chunk: int = QUERY_CHUNK,
) -> float:
    """nudge-ft's choice for NUDGE-N: the first γ with the best top-k accuracy of the held-out queries.

    Candidates are the labelled rows (which move with γ) and each query's k best unlabelled rows (which do not).
    """
    if held.top_rows.shape[1] < k:
        raise ValueError(f"held-out set keeps {held.top_rows.shape[1]} unlabelled rows per query; top-{k} needs {k}")
    slot = {int(r): i for i, r in enumerate(rows)}
    n = len(held.queries)
    n_labels = np.array([len(set(a)) for a in held.answers], dtype=np.float64)
    share = np.empty((len(gammas), n))  # per γ and query: its share of its top-k answers found
    for lo, hi in spans(n, chunk):
        truth = np.zeros((hi - lo, len(rows) + k), dtype=bool)
        for i, answers in enumerate(held.answers[lo:hi]):
            truth[i, [slot[a] for a in answers if a in slot]] = True
            truth[i, len(rows) :] = np.isin(held.top_rows[lo + i, :k], answers)
        qd, qg = held.queries[lo:hi] @ docs.T, held.queries[lo:hi] @ g.T
        for t, (a, b) in enumerate(nudge_n_terms(docs, g, gammas)):
            top = _top(np.concatenate([a * qd + b * qg, held.top_scores[lo:hi, :k]], axis=1), k)
            hits = np.take_along_axis(truth, top, axis=1).sum(axis=1)
            share[t, lo:hi] = hits / np.minimum(n_labels[lo:hi], k)
    best_gamma, best_acc = 0.0, -1.0
    for gamma, found in zip(gammas, share):
        acc = float(found.sum() / n)
        if acc > best_acc:
            best_gamma, best_acc = float(gamma), acc
    return best_gamma


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k highest scores, best first (first index on ties)."""
    if k == 1:
        return np.argmax(scores, axis=1)[:, None]
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.lexsort((part, -np.take_along_axis(scores, part, 1)), axis=1)
    return np.take_along_axis(part, order, 1)


def choose_gamma_m(held: Held, rows: np.ndarray, docs: np.ndarray, g: np.ndarray) -> float:
    """nudge-ft's choice for NUDGE-M: the γ inside the most held-out (query, answer) intervals where the answer
    ranks first. Needs `held` built with answer_scores."""
    if held.answer_scores is None:
        raise ValueError("NUDGE-M's choice needs the held-out set built with answer_scores=True")
    slot = {int(r): i for i, r in enumerate(rows)}
    docs_t, g_hat_t = docs.T.astype(np.float64), unit(g).T.astype(np.float64)
    lows, highs = [], []
    for i, answers in enumerate(held.answers):
        q = held.queries[i].astype(np.float64)
        s_lab, m_lab = q @ docs_t, -(q @ g_hat_t)  # nudge-ft's sign: its update is d - γ·(-ĝ)
        for a in answers:
            if a in slot:  # a labelled answer against every labelled row and the best unlabelled one
                s = np.append(s_lab, held.top_scores[i, 0])
                m, j = np.append(m_lab, 0.0), slot[a]
            else:  # an unlabelled answer (which never moves) against the best unlabelled row that is not itself
                other = held.top_scores[i, 1] if held.top_rows[i, 0] == a else held.top_scores[i, 0]
                s = np.append(s_lab, [other, held.answer_scores[i][a]])
                m, j = np.append(m_lab, [0.0, 0.0]), len(s_lab) + 1
            s_dif, g_dif = s - s[j], m - m[j]
            with np.errstate(divide="ignore", invalid="ignore"):  # exact, so that two answers' crossings coincide
                alphas = s_dif / g_dif
            low = max(float(np.max(np.where(g_dif > 0, alphas, 0.0))), 0.0)
            high = float(np.min(np.where(g_dif < 0, alphas, np.inf)))
            if np.any(s_dif[g_dif == 0] > 0) or high < low:
                continue
            lows.append(low)
            highs.append(high)
    return _most_covered(np.array(lows), np.array(highs))


def _most_covered(lows: np.ndarray, highs: np.ndarray) -> float:
    """The lowest γ inside the most closed intervals [low, high] (0 when there are none).

    nudge-ft sweeps the same intervals, but its ε in the crossing points keeps two answers of one query from
    crossing at exactly the same γ; computed exactly here, such a point counts for both (the package agrees on
    the test cases; on such exact coincidences it may pick the neighbouring point).
    """
    if len(lows) == 0:
        return 0.0
    points = np.sort(lows)
    inside = np.searchsorted(points, points, side="right") - np.searchsorted(np.sort(highs), points, side="left")
    return float(points[int(np.argmax(inside))])
