"""Measure how close two sets of vectors for one dataset are: minimum and median cosine, rows matched by id.

Each side is a store folder or a reference folder of `<section>.f32.npy` + `<section>.ids.txt` (as in
../shared/data/embeddings/<dataset>). This is how the README compares a build with the reference
vectors, a bf16 build with the fp32 one, and a GPU build with the CPU's.

    python pipelines/compare_stores.py /work/builds/nfcorpus-bf16 ../shared/data/embeddings/nfcorpus
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from jepa_cache.errors import UserError
from jepa_cache.search import unit
from jepa_cache.store import open_store

SECTIONS = ("corpus", "queries")


def load(path: Path, section: str) -> tuple[list[str], np.ndarray]:
    """(ids, vectors) of one section of a store or a reference folder."""
    npy = path / f"{section}.f32.npy"
    if npy.is_file():
        return (path / f"{section}.ids.txt").read_text(encoding="utf-8").splitlines(), np.load(npy)
    part = open_store(path).section(section)
    return part.ids, part.vectors(np.float32)


def cosines(a: tuple[list[str], np.ndarray], b: tuple[list[str], np.ndarray]) -> np.ndarray:
    """The cosine of each row of `a` to the row of `b` with the same id (`b` may hold more rows, not fewer)."""
    (ids_a, va), (ids_b, vb) = a, b
    row_of = {doc_id: i for i, doc_id in enumerate(ids_b)}
    missing = [doc_id for doc_id in ids_a if doc_id not in row_of]
    if missing:
        raise UserError(f"{len(missing)} id(s) of the first side are not in the second (e.g. {missing[0]!r})")
    matched = vb[[row_of[doc_id] for doc_id in ids_a]]
    return (unit(np.asarray(va, np.float64)) * unit(np.asarray(matched, np.float64))).sum(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="a store folder or a reference folder")
    parser.add_argument("b", type=Path, help="the other side")
    args = parser.parse_args()
    for section in SECTIONS:
        cos = cosines(load(args.a, section), load(args.b, section))
        print(f"{section:8s} {len(cos):>7,} rows: min cosine {cos.min():.7f}, median {np.median(cos):.7f}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
