"""Document-side adaptation: per-document corrections of one store's corpus, in the heads' space.

A head is one map for every text; a correction moves one labelled document toward the training
queries that judged it relevant (NUDGE, see nudge.py), which a map cannot do. Corrections belong
to one store (its fingerprint) and one heads (theirs, or none): eval applies them only there, and
on any other store the heads apply alone. Saved as `corrections.safetensors` + `corrections.json`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from . import nudge
from .errors import UserError
from .files import atomic_path, atomic_write_json
from .metrics import score

METHODS = ("nudge-n", "nudge-m")
RULES = ("ndcg", "nudge-ft")
FILE_JSON, FILE_WEIGHTS = "corrections.json", "corrections.safetensors"
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


@dataclass
class Corrections:
    """Replacement vectors for some corpus rows (by document id), in the space the heads give documents."""

    doc_ids: list[str]
    vectors: np.ndarray  # [len(doc_ids), d] float32
    method: str
    gamma: float
    store_fingerprint: str
    heads_fingerprint: str | None
    labelled_queries: int
    record: dict = field(default_factory=dict)  # how gamma was chosen

    def save(self, folder: str | os.PathLike) -> Path:
        """Weights first, then the JSON that names them (each atomically): a JSON that exists describes whole weights."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / FILE_JSON).unlink(missing_ok=True)
        with atomic_path(folder / FILE_WEIGHTS) as tmp:
            save_file({"vectors": np.ascontiguousarray(self.vectors, dtype=np.float32)}, str(tmp))
        meta = {k: v for k, v in asdict(self).items() if k != "vectors"}
        atomic_write_json(folder / FILE_JSON, meta)
        return folder / FILE_JSON

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Corrections":
        from safetensors.numpy import load_file

        folder = Path(folder)
        try:
            meta = json.loads((folder / FILE_JSON).read_text())
            vectors = load_file(str(folder / FILE_WEIGHTS))["vectors"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{folder}: unreadable corrections ({e}); run train-heads or adapt again") from None
        if len(meta.get("doc_ids", [])) != len(vectors):
            raise UserError(f"{folder / FILE_JSON}: names {len(meta.get('doc_ids', []))} documents for {len(vectors)} vectors")
        return cls(vectors=vectors, **meta)

    def rows_in(self, row_of: dict[str, int]) -> np.ndarray:
        missing = [d for d in self.doc_ids if d not in row_of]
        if missing:
            raise UserError(f"corrections name {len(missing)} documents absent from the store (e.g. {missing[0]!r})")
        return np.array([row_of[d] for d in self.doc_ids], dtype=np.int64)


def find(folder: str | os.PathLike | None) -> Path | None:
    """The corrections folder beside heads (or given directly), if it holds corrections."""
    if folder is None:
        return None
    folder = Path(folder)
    folder = folder if folder.is_dir() else folder.parent
    return folder if (folder / FILE_JSON).is_file() else None


def apply_to_block(block: np.ndarray, start: int, rows: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """`block` (corpus rows start.. start+len) with the corrected rows replaced; the input is left alone."""
    inside = (rows >= start) & (rows < start + len(block))
    if not inside.any():
        return block
    out = np.array(block, dtype=np.float32, copy=True)
    out[rows[inside] - start] = vectors[inside]
    return out


def _fit(corpus: np.ndarray, fit: Labelled, method: str, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    rows, g = nudge.query_sums(fit.vectors, fit.answers)
    docs = nudge.unit(corpus[rows])
    return rows, (nudge.nudge_n if method == "nudge-n" else nudge.nudge_m)(docs, g, gamma).astype(np.float32)


def dev_ndcg(corpus_ids: Sequence[str], held: nudge.Held, dev: Labelled, rows: np.ndarray, moved: np.ndarray) -> float:
    """NDCG@10 of the held-out queries when `rows` hold `moved` and every other row keeps its vector."""
    s = dev.vectors @ moved.T
    qrels, run = {}, {}
    for i, qid in enumerate(dev.ids):
        cand = {corpus_ids[r]: float(x) for r, x in zip(rows, s[i])}
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
