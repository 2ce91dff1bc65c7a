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
from .pairs import DEV_SEED, Pairs
from .store import Store

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
    power: float = 0.0  # each query weighs |its relevant documents|^-power in a document's target (0: nudge-ft's sum)
    gammas: tuple[float, ...] = NDCG_GAMMAS

    def validate(self) -> "AdaptConfig":
        if self.method not in METHODS:
            raise UserError(f"--adapt {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.rule not in RULES:
            raise UserError(f"--adapt-rule {self.rule!r}: choose one of {', '.join(RULES)}")
        if self.method == "nudge-m" and self.rule == "ndcg":
            raise UserError("--adapt nudge-m scores by inner product, which eval's cosine index would undo; use nudge-n")
        if self.power < 0:
            raise UserError(f"--adapt-power {self.power}: must be >= 0")
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


def _fit(corpus: np.ndarray, fit: Labelled, method: str, gamma: float, power: float) -> tuple[np.ndarray, np.ndarray]:
    rows, g = nudge.query_sums(fit.vectors, fit.answers, power)
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
    rows, g = nudge.query_sums(fit.vectors, fit.answers, cfg.power)
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
    rows, vectors = _fit(corpus, labelled, cfg.method, gamma, cfg.power)
    return Corrections([corpus_ids[r] for r in rows], vectors, cfg.method, float(gamma), store_fingerprint, heads_fingerprint,
                       len(labelled.ids), record)


def labelled(store: Store, pairs: Pairs, to_space: Callable[[np.ndarray], np.ndarray]) -> Labelled:
    """The pairs' queries (in the heads' space, unit rows) with the corpus rows each judged relevant."""
    by_query: dict[int, list[int]] = {}
    for q, d in zip(pairs.query_rows.tolist(), pairs.doc_rows.tolist()):
        by_query.setdefault(q, []).append(d)
    rows = np.fromiter(by_query, dtype=np.int64, count=len(by_query))
    ids = store.queries.ids
    return Labelled(nudge.unit(to_space(store.queries.vectors(np.float32, rows))), list(by_query.values()), [ids[r] for r in rows])


def _space(heads, side: str) -> Callable[[np.ndarray], np.ndarray]:
    """numpy in, numpy out through the heads' document or query tower (identity without heads)."""
    if heads is None:
        return lambda x: x
    import torch

    fn = heads.encode_documents if side == "documents" else heads.encode_queries
    return lambda x: fn(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).float().cpu().numpy()


def corpus_in(store: Store, heads, block_rows: int = 65536) -> np.ndarray:
    """The whole corpus in the heads' document space, unit rows [n_docs, d] float32 (read block by block)."""
    to_space = _space(heads, "documents")
    return np.concatenate([nudge.unit(to_space(b)) for _, b in store.corpus.iter_blocks(block_rows)], axis=0)


def adapt_store(cfg: AdaptConfig, store: Store, pairs: Pairs, choose_with, final_heads, dev_seed: int = DEV_SEED,
                dev_fraction: float = 0.2, log: Callable[[str], None] = print) -> Corrections:
    """Corrections for `final_heads` (None: the base vectors) on `store`, γ chosen on a held-out slice of `pairs`.

    `choose_with`: the heads in whose space γ is chosen, trained without the held-out queries (None: no heads).
    The rule `ndcg` then refits on every pair; `nudge-ft` keeps the corrections of the fitting slice, as published.
    """
    fit_pairs, dev_pairs = pairs.hold_out(dev_fraction, dev_seed)
    corpus = corpus_in(store, choose_with)
    fit, dev = (labelled(store, p, _space(choose_with, "queries")) for p in (fit_pairs, dev_pairs))
    gamma, record = choose_gamma(cfg, corpus, store.corpus.ids, fit, dev)
    record.update(dev_seed=dev_seed, dev_fraction=dev_fraction, refit=cfg.refit)
    log(f"{cfg.method}: γ {gamma:g} chosen on {len(dev.ids):,} held-out queries ({cfg.rule})"
        + (f", dev NDCG@10 {record['dev_ndcg@10']:.4f} (γ 0: {record['vanilla_dev_ndcg@10']:.4f})" if cfg.rule == "ndcg" else ""))
    if cfg.refit or final_heads is not choose_with:
        corpus = corpus_in(store, final_heads)
    source = pairs if cfg.refit else fit_pairs
    final = labelled(store, source, _space(final_heads, "queries"))
    fingerprint = final_heads.fingerprint if final_heads is not None else None
    corrections = make_corrections(cfg, corpus, store.corpus.ids, final, gamma, store.fingerprint, fingerprint, record)
    log(f"{cfg.method}: {len(corrections.doc_ids):,} documents corrected from {len(final.ids):,} labelled queries")
    return corrections
