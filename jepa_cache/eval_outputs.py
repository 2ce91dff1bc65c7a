"""The files an evaluation leaves per dataset: per_query.parquet, run.parquet and run.trec.

Each is written atomically and recorded as it is created, so that a failed run removes all of
itself (`remove`) and an evaluation leaves either every file or none.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .files import atomic_path, atomic_write_bytes


def write_outputs(
    folder: Path, run: dict, per_query: dict, has_vector: set[str], qrels: dict, tag: str, written: list[Path]
) -> dict[str, str]:
    """Write one dataset's files, recording in `written` what this run creates, for cleanup on failure."""
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


def remove(paths: list[Path]) -> None:
    """Delete the files, then the (now empty) folders, that a failed run created."""
    for p in reversed(paths):
        try:
            if p.is_dir():
                p.rmdir()
            else:
                p.unlink(missing_ok=True)
        except OSError:
            pass
