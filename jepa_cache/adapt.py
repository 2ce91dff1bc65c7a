"""Document-side adaptation: make per-document corrections of a store's corpus in the heads' space.

A head is one map for every text; a correction moves one labelled document toward the training
queries that judged it relevant (NUDGE, nudge.py), which a map cannot do. The step γ is chosen on
held-out training queries by a fixed rule, then the corrections are refit on all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from . import nudge
from .corrections import Corrections
from .errors import UserError
from .search import tie_order, unit
from .pairs import DEV_SEED, Pairs
from .store import Store

METHODS = (
    "nudge-n",
)  # NUDGE-M (nudge.nudge_m) leaves the unit sphere: it needs inner-product search, which eval has not
RULES = ("ndcg", "nudge-ft")
NDCG_GAMMAS = tuple(round(0.02 * i, 2) for i in range(51))  # NUDGE-N's step, ‖Δ‖² ≤ γ, from 0 to 1
POWERS = (0.0, 0.5, 1.0)  # a query weighs |its relevant documents|^-power in each document's target


@dataclass(frozen=True)
class AdaptConfig:
    """How corrections are made: the method, and the rule that picks its settings on held-out training queries.

    rule `ndcg` (jepa-cache's): the step γ and the query weighting (`powers`) with the best NDCG@10 on the
    held-out queries (ties: smaller γ, then smaller power), then a refit on every training query;
    rule `nudge-ft` (the peer as published): the package's choice of γ (top-1 accuracy on its grid), plain
    sums, and the corrections of the fitting slice (no refit).
    """

    method: str = "nudge-n"
    rule: str = "ndcg"
    gammas: tuple[float, ...] = NDCG_GAMMAS
    powers: tuple[float, ...] = POWERS

    def validate(self) -> "AdaptConfig":
        if self.method not in METHODS:
            raise UserError(
                f"adapt method {self.method!r}: choose {' or '.join(METHODS)} (NUDGE-M's vectors leave the "
                "unit sphere and need inner-product search, which eval does not offer)"
            )
        if self.rule not in RULES:
            raise UserError(f"--rule {self.rule!r}: choose one of {', '.join(RULES)}")
        if any(p < 0 for p in self.powers) or any(not 0 <= g < 2 for g in self.gammas):
            raise UserError("adapt powers must be >= 0 and steps γ in [0, 2)")
        return self

    @property
    def refit(self) -> bool:
        return self.rule == "ndcg"


@dataclass
class Labelled:
    """Queries in the space of the corpus vectors, and per query the corpus rows it judged relevant.

    Shape: vectors [n, d]; ids: n query ids (a hit with the query's own id is dropped, as eval does).
    """

    vectors: np.ndarray
    answers: list[list[int]]
    ids: list[str]


@dataclass
class DevScorer:
    """NDCG@10 of held-out queries (relevance 1 for each judged row) for many trial scores, vectorised.

    The candidates of a query are the labelled rows (whose scores are given per trial) and its best
    unlabelled rows (fixed, from `held`); a candidate with the query's own id is dropped (BEIR), and ties
    rank as pytrec_eval ranks them (larger id first). tests/test_nudge.py checks it against pytrec_eval.
    Queries go `chunk` at a time (nudge.spans): memory grows with chunk x labelled rows.
    """

    held: nudge.Held
    rows: np.ndarray  # [R] the labelled corpus rows
    own: np.ndarray  # [n] the slot in `rows` of the query's own id (-1: none)
    fixed: np.ndarray  # [n, k] the unlabelled candidates' scores (-inf: dropped)
    ideal: np.ndarray  # [n] IDCG@10
    tie: np.ndarray  # [n_docs] pytrec_eval's order among equal scores
    chunk: int = nudge.QUERY_CHUNK

    @classmethod
    def build(
        cls,
        corpus_ids: Sequence[str],
        held: nudge.Held,
        dev: Labelled,
        rows: np.ndarray,
        tie: np.ndarray,
        chunk: int = nudge.QUERY_CHUNK,
    ) -> "DevScorer":
        """`held` built from `dev` on the corpus with `corpus_ids`, whose labelled rows are `rows` (sorted)."""
        mine = _rows_of(corpus_ids, dev.ids)
        fixed = np.where((held.top_rows == mine[:, None]) | (held.top_rows < 0), -np.inf, held.top_scores)
        own = np.full(len(mine), -1, dtype=np.int64)
        own[np.isin(mine, rows)] = np.searchsorted(rows, mine[np.isin(mine, rows)])
        discount = 1 / np.log2(np.arange(2, 12))
        ideal = np.array([discount[: min(len(set(a)), 10)].sum() for a in dev.answers])
        return cls(held, rows, own, fixed.astype(np.float64), ideal, tie, chunk)

    def curve(self, trials: Callable[[slice], Iterator[np.ndarray]]) -> list[float]:
        """Mean NDCG@10 of each trial: `trials(span)` yields, trial by trial, the labelled rows' scores of
        the queries in `span` [span, R] (the same trials, in the same order, for every span)."""
        parts = []
        for lo, hi in nudge.spans(len(self.ideal), self.chunk):
            scorer = self._part(lo, hi)
            parts.append(np.stack([scorer(s) for s in trials(slice(lo, hi))]))
        return [float(np.mean(values)) for values in np.concatenate(parts, axis=1)]

    def _part(self, lo: int, hi: int) -> Callable[[np.ndarray], np.ndarray]:
        """NDCG@10 per query of queries lo..hi, given their labelled rows' scores; built once for every trial."""
        cand = np.concatenate([np.broadcast_to(self.rows, (hi - lo, len(self.rows))), self.held.top_rows[lo:hi]], 1)
        truth = np.zeros(cand.shape, dtype=bool)
        for i, answers in enumerate(self.held.answers[lo:hi]):
            truth[i] = np.isin(cand[i], answers) & (cand[i] >= 0)
        key = self.tie[np.maximum(cand, 0)]  # each candidate's place among equal scores
        dropped = np.flatnonzero(self.own[lo:hi] >= 0)
        fixed, ideal = self.fixed[lo:hi], self.ideal[lo:hi]

        def ndcg(s: np.ndarray) -> np.ndarray:
            scores = np.concatenate([s, fixed], axis=1, dtype=np.float64)
            scores[dropped, self.own[lo:hi][dropped]] = -np.inf
            return _ndcg_at_10(scores, truth, key) / ideal

        return ndcg


def _ndcg_at_10(scores: np.ndarray, truth: np.ndarray, key: np.ndarray) -> np.ndarray:
    """DCG@10 per row of `scores` [n, m] (-inf: not a candidate) with relevance `truth`, equal scores by `key`
    (pytrec_eval's order)."""
    chosen = nudge.ranked(scores, key, 10, keep=16)
    gain = np.take_along_axis(truth, chosen, 1) & np.isfinite(np.take_along_axis(scores, chosen, 1))
    return (gain / np.log2(np.arange(2, 2 + gain.shape[1]))).sum(axis=1)


def _rows_of(corpus_ids: Sequence[str], ids: Sequence[str]) -> np.ndarray:
    """The corpus row of each id (-2: none), in one pass over the corpus ids (no corpus-wide dict)."""
    at = {q: i for i, q in enumerate(ids)}
    mine = np.full(len(ids), -2, dtype=np.int64)
    for r, d in enumerate(corpus_ids):
        if d in at:
            mine[at[d]] = r
    return mine


def _steps(
    queries: np.ndarray, docs: np.ndarray, g: np.ndarray, gammas: Sequence[float]
) -> Callable[[slice], Iterator[np.ndarray]]:
    """For DevScorer.curve: per γ, the scores of `queries[span]` for NUDGE-N's vectors from `docs` toward `g`."""

    def trials(span: slice) -> Iterator[np.ndarray]:
        qd, qg = queries[span] @ docs.T, queries[span] @ g.T
        for a, b in nudge.nudge_n_terms(docs, g, gammas):
            s = a * qd
            s += b * qg
            yield s

    return trials


def choose(
    cfg: AdaptConfig,
    docs_of: Callable[[np.ndarray], np.ndarray],
    blocks: Iterable[np.ndarray],
    corpus_ids: Sequence[str],
    fit: Labelled,
    dev: Labelled,
    chunk: int = nudge.QUERY_CHUNK,
) -> tuple[float, float, dict]:
    """(γ, power, record): the settings of `fit`'s corrections that cfg.rule picks on `dev`.

    `docs_of(rows)`: those corpus rows in the heads' space, unit length; `blocks`: the whole corpus so, in
    row order, read once (only labelled rows move with γ: every other row's scores are kept from that pass).
    Dev queries go `chunk` at a time (the result does not depend on it).
    """
    rows, g = nudge.query_sums(fit.vectors, fit.answers)
    docs = docs_of(rows)
    tie = tie_order(list(corpus_ids))
    held = nudge.Held.build(dev.vectors, dev.answers, blocks, rows, k=11, tie=tie, chunk=chunk)
    ndcg = DevScorer.build(corpus_ids, held, dev, rows, tie, chunk)
    record = {"rule": cfg.rule, "dev_queries": len(dev.ids)}
    if cfg.rule == "nudge-ft":
        gamma = nudge.choose_gamma_n(held, rows, docs, g, chunk=chunk)
        moved_t = nudge.nudge_n(docs, g, gamma).T
        [record["dev_ndcg@10"]] = ndcg.curve(lambda span: iter([dev.vectors[span] @ moved_t]))
        return gamma, 0.0, record
    curve = {}
    for power in cfg.powers:
        trials = _steps(dev.vectors, docs, nudge.query_sums(fit.vectors, fit.answers, power)[1], cfg.gammas)
        curve.update(zip([(gamma, power) for gamma in cfg.gammas], ndcg.curve(trials)))
    gamma, power = max(curve, key=lambda k: (curve[k], -k[0], -k[1]))
    record.update({"dev_ndcg@10": curve[gamma, power], "base_dev_ndcg@10": curve[cfg.gammas[0], power]})
    record["curve"] = {f"{p:g}/{k:.2f}": round(v, 5) for (k, p), v in curve.items()}
    return gamma, power, record


def make_corrections(
    cfg: AdaptConfig,
    docs_of: Callable[[np.ndarray], np.ndarray],
    corpus_ids: Sequence[str],
    labelled: Labelled,
    gamma: float,
    power: float,
    store_fingerprint: str,
    heads_fingerprint: str | None,
    record: dict,
) -> Corrections:
    """NUDGE with step γ from `labelled`'s judgements: one vector for every document some query judged relevant."""
    rows, g = nudge.query_sums(labelled.vectors, labelled.answers, power)
    moved = nudge.nudge_n(docs_of(rows), g, gamma).astype(np.float32)
    return Corrections(
        [corpus_ids[r] for r in rows],
        moved,
        cfg.method,
        float(gamma),
        store_fingerprint,
        heads_fingerprint,
        len(labelled.ids),
        record,
    )


def labelled(store: Store, pairs: Pairs, to_space: Callable[[np.ndarray], np.ndarray]) -> Labelled:
    """The pairs' queries (in the heads' space, unit rows) with the corpus rows each judged relevant."""
    by_query: dict[int, list[int]] = {}
    for q, d in zip(pairs.query_rows.tolist(), pairs.doc_rows.tolist()):
        by_query.setdefault(q, []).append(d)
    rows = np.fromiter(by_query, dtype=np.int64, count=len(by_query))
    ids = store.queries.ids
    return Labelled(
        unit(to_space(store.queries.vectors(np.float32, rows))), list(by_query.values()), [ids[r] for r in rows]
    )


def _space(heads, side: str) -> Callable[[np.ndarray], np.ndarray]:
    """numpy in, numpy out through the heads' document or query tower (identity without heads)."""
    if heads is None:
        return lambda x: x
    import torch

    fn = heads.encode_documents if side == "documents" else heads.encode_queries
    return lambda x: fn(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).float().cpu().numpy()


@dataclass
class Space:
    """A store's vectors as the heads see them (None: as stored), unit length: labelled rows, or every block."""

    store: Store
    heads: object | None
    block_rows: int = 65536

    def docs(self, rows: np.ndarray) -> np.ndarray:
        return unit(_space(self.heads, "documents")(self.store.corpus.vectors(np.float32, rows)))

    def blocks(self) -> Iterator[np.ndarray]:
        to_space = _space(self.heads, "documents")
        for _, block in self.store.corpus.iter_blocks(self.block_rows):
            yield unit(to_space(block))

    def labelled(self, pairs: Pairs) -> Labelled:
        return labelled(self.store, pairs, _space(self.heads, "queries"))


def choose_on(cfg: AdaptConfig, store: Store, heads, fit_pairs: Pairs, dev_pairs: Pairs) -> tuple[float, float, dict]:
    """(γ, power, record) chosen on `dev_pairs` for corrections fitted on `fit_pairs`, in `heads`' space
    (None: the base vectors)."""
    space = Space(store, heads)
    return choose(
        cfg, space.docs, space.blocks(), store.corpus.ids, space.labelled(fit_pairs), space.labelled(dev_pairs)
    )


def corrections_on(
    cfg: AdaptConfig, store: Store, heads, pairs: Pairs, gamma: float, power: float, record: dict
) -> Corrections:
    """The corrections that `pairs` make with the chosen γ and power, in `heads`' space (None: the base vectors)."""
    space = Space(store, heads)
    return make_corrections(
        cfg,
        space.docs,
        store.corpus.ids,
        space.labelled(pairs),
        gamma,
        power,
        store.fingerprint,
        heads.fingerprint if heads is not None else None,
        {**record, "power": power},
    )


def adapt_store(
    cfg: AdaptConfig,
    store: Store,
    pairs: Pairs,
    heads=None,
    dev_seed: int = DEV_SEED,
    dev_fraction: float = 0.2,
    log: Callable[[str], None] = print,
) -> Corrections:
    """Corrections on `store` in `heads`' space (None: the base vectors), chosen on a held-out slice of `pairs`.

    Rule `ndcg` then refits on every pair; `nudge-ft` keeps the corrections of the fitting slice, as published.
    """
    fit_pairs, dev_pairs = pairs.hold_out(dev_fraction, dev_seed)
    gamma, power, record = choose_on(cfg, store, heads, fit_pairs, dev_pairs)
    record.update(dev_seed=dev_seed, dev_fraction=dev_fraction, refit=cfg.refit)
    log(
        f"{cfg.method}: γ {gamma:g}, power {power:g} chosen on {record['dev_queries']:,} held-out queries "
        f"({cfg.rule}); dev NDCG@10 {record['dev_ndcg@10']:.4f}"
    )
    corrections = corrections_on(cfg, store, heads, pairs if cfg.refit else fit_pairs, gamma, power, record)
    log(
        f"{cfg.method}: {len(corrections.doc_ids):,} documents corrected from "
        f"{corrections.labelled_queries:,} labelled queries"
    )
    return corrections
