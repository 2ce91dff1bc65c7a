"""Per-document corrections: replacement vectors for some rows of one store's corpus, and where they apply.

They belong to one store (its fingerprint) and one heads (theirs, or none): eval applies them only to
that store, in those heads' space; on any other store the heads apply alone. Saved as
`corrections.safetensors` + `corrections.json` (the JSON last, so one that exists names whole weights).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .files import atomic_path, atomic_write_json, sha256_file

FILE_JSON, FILE_WEIGHTS = "corrections.json", "corrections.safetensors"


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
        """Weights first, then the JSON that names them (each atomically): a JSON that exists names whole weights."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / FILE_JSON).unlink(missing_ok=True)
        vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        if not np.isfinite(vectors).all():
            raise ValueError("corrections with non-finite values")  # a bug upstream: never write them
        with atomic_path(folder / FILE_WEIGHTS) as tmp:
            save_file({"vectors": vectors}, str(tmp))
        meta = {k: v for k, v in asdict(self).items() if k != "vectors"}
        atomic_write_json(folder / FILE_JSON, {**meta, "weights_sha256": sha256_file(folder / FILE_WEIGHTS)})
        return folder / FILE_JSON

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Corrections":
        from safetensors.numpy import load_file

        folder = Path(folder)
        try:
            meta = json.loads((folder / FILE_JSON).read_text())
            sha = meta.pop("weights_sha256")
            if sha256_file(folder / FILE_WEIGHTS) != sha:
                raise ValueError(f"{FILE_WEIGHTS} is not the file {FILE_JSON} names (sha256 differs)")
            vectors = load_file(str(folder / FILE_WEIGHTS))["vectors"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{folder}: unreadable corrections ({e}); run train-heads or adapt again") from None
        if len(meta.get("doc_ids", [])) != len(vectors):
            raise UserError(
                f"{folder / FILE_JSON}: names {len(meta.get('doc_ids', []))} documents for {len(vectors)} vectors"
            )
        return cls(vectors=vectors, **meta)

    def summary(self) -> dict:
        """What a training record says of them: method, settings, size (dev scores are in `record`)."""
        return {
            "method": self.method,
            "gamma": self.gamma,
            "power": self.record.get("power", 0.0),
            "documents": len(self.doc_ids),
            "values": int(self.vectors.size),
            "labelled_queries": self.labelled_queries,
            "dev_ndcg@10": self.record.get("dev_ndcg@10"),
            "rule": self.record.get("rule"),
        }

    def rows_in(self, row_of: dict[str, int]) -> np.ndarray:
        missing = [d for d in self.doc_ids if d not in row_of]
        if missing:
            raise UserError(f"corrections name {len(missing)} documents absent from the store (e.g. {missing[0]!r})")
        return np.array([row_of[d] for d in self.doc_ids], dtype=np.int64)


def for_store(corrections: "Corrections | None", store, heads) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows, vectors) when `corrections` were made for this store and these heads; None for another store
    (the heads apply alone). Refused: corrections made in other heads' space, or for heads that do not score by cosine.
    """
    if corrections is None or corrections.store_fingerprint != store.fingerprint:
        return None
    if corrections.heads_fingerprint != (heads.fingerprint if heads is not None else None):
        raise UserError(
            "the corrections beside these heads were made in the space of other heads; retrain them "
            "(train-heads --overwrite) or pass --corrections of these heads"
        )
    if heads is not None and heads.similarity != "cos":
        raise UserError(f"corrections are unit vectors for cosine search; these heads score by {heads.similarity}")
    return corrections.rows_in(store.corpus.row_of), corrections.vectors


def remove(folder: str | os.PathLike) -> None:
    """Delete the corrections in `folder` (the JSON first, so a half-removed set is never read)."""
    for name in (FILE_JSON, FILE_WEIGHTS):
        (Path(folder) / name).unlink(missing_ok=True)


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
