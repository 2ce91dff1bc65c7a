"""Document-side adaptation: make per-document corrections of a store's corpus in the heads' space.

A head is one map for every text; a correction moves one labelled document toward the training
queries that judged it relevant (NUDGE, nudge.py), which a map cannot do. The step γ is chosen on
held-out training queries by a fixed rule, then the corrections are refit on all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from . import nudge
from .corrections import Corrections
from .errors import UserError
from .metrics import score

METHODS = ("nudge-n", "nudge-m")
RULES = ("ndcg", "nudge-ft")
NDCG_GAMMAS = tuple(round(0.02 * i, 2) for i in range(51))  # NUDGE-N's step, ‖Δ‖² ≤ γ, from 0 to 1


@dataclass(frozen=True)
class AdaptConfig:
    """How corrections are made: the method, and the rule that picks its step γ on held-out training queries.

    rule `ndcg`: the γ of NDCG@10 on the held-out queries (ties: the smaller γ), then a refit on all of them;
    rule `nudge-ft`: the package's own choice (NUDGE-N: top-1 accuracy on its grid; NUDGE-M: its interval
    sweep) and no refit, so that the peer is measured as published.
    """

    method: str = "nudge-n"
    rule: str = "ndcg"
    gammas: tuple[float, ...] = NDCG_GAMMAS

    def validate(self) -> "AdaptConfig":
        if self.method not in METHODS:
            raise UserError(f"--adapt {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.rule not in RULES:
            raise UserError(f"--adapt-rule {self.rule!r}: choose one of {', '.join(RULES)}")
        if self.method == "nudge-m" and self.rule == "ndcg":
            raise UserError("--adapt nudge-m scores by inner product, which eval's cosine index would undo; use nudge-n")
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


def _fit(corpus: np.ndarray, fit: Labelled, method: str, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    rows, g = nudge.query_sums(fit.vectors, fit.answers)
    docs = nudge.unit(corpus[rows])
    return rows, (nudge.nudge_n if method == "nudge-n" else nudge.nudge_m)(docs, g, gamma).astype(np.float32)


def dev_ndcg(corpus_ids: Sequence[str], held: nudge.Held, dev: Labelled, rows: np.ndarray, moved: np.ndarray) -> float:
    """NDCG@10 of the held-out queries when `rows` hold `moved` and every other row keeps its vector."""
    s = dev.vectors @ moved.T
    keep = min(11, s.shape[1])
    top = np.argpartition(-s, keep - 1, axis=1)[:, :keep] if keep < s.shape[1] else np.broadcast_to(np.arange(s.shape[1]), s.shape)
    qrels, run = {}, {}
    for i, qid in enumerate(dev.ids):
        cand = {corpus_ids[rows[j]]: float(s[i, j]) for j in top[i]}
        cand.update({corpus_ids[r]: float(x) for r, x in zip(held.top_rows[i], held.top_scores[i]) if r >= 0})
        cand.pop(qid, None)
        run[qid] = dict(sorted(cand.items(), key=lambda kv: (-kv[1], kv[0]))[:10])
        qrels[qid] = {corpus_ids[a]: 1 for a in dev.answers[i]}
    return score(qrels, run, recall_at=10)[0]["ndcg@10"]


def choose_gamma(cfg: AdaptConfig, corpus: np.ndarray, corpus_ids: Sequence[str], fit: Labelled, dev: Labelled,
                 blocks: Callable[[], Iterable[np.ndarray]] | None = None) -> tuple[float, dict]:
    """γ from `fit`'s corrections scored on `dev`, by cfg.rule; returns (γ, a record of the scores).

    `corpus` [n, d] unit rows in the heads' space; `blocks` re-reads it block by block (default: one block).
    """
    rows, g = nudge.query_sums(fit.vectors, fit.answers)
    docs = nudge.unit(corpus[rows])
    held = nudge.Held.build(dev.vectors, dev.answers, (blocks or (lambda: [corpus]))(), rows, k=11)
    if cfg.rule == "nudge-ft":
        pick = nudge.choose_gamma_n if cfg.method == "nudge-n" else nudge.choose_gamma_m
        gamma = pick(held, rows, docs, g)
        return gamma, {"rule": "nudge-ft", "dev_queries": len(dev.ids)}
    curve = {gamma: dev_ndcg(corpus_ids, held, dev, rows, nudge.nudge_n(docs, g, gamma)) for gamma in cfg.gammas}
    gamma = max(curve, key=lambda k: (curve[k], -k))
    return gamma, {"rule": "ndcg", "dev_queries": len(dev.ids), "dev_ndcg@10": curve[gamma], "vanilla_dev_ndcg@10": curve[0.0],
                   "curve": {f"{k:.2f}": round(v, 5) for k, v in curve.items()}}


def make_corrections(cfg: AdaptConfig, corpus: np.ndarray, corpus_ids: Sequence[str], labelled: Labelled, gamma: float,
                     store_fingerprint: str, heads_fingerprint: str | None, record: dict) -> Corrections:
    """NUDGE with step γ from `labelled`'s judgements: one vector for every document some query judged relevant."""
    rows, vectors = _fit(corpus, labelled, cfg.method, gamma)
    return Corrections([corpus_ids[r] for r in rows], vectors, cfg.method, float(gamma), store_fingerprint, heads_fingerprint,
                       len(labelled.ids), record)
