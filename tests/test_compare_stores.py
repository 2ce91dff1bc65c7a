"""pipelines/compare_stores.py: cosines matched by id, between stores and reference folders, against a direct computation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from jepa_cache.errors import UserError

spec = importlib.util.spec_from_file_location("compare_stores", Path(__file__).parents[1] / "pipelines" / "compare_stores.py")
compare_stores = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_stores)


def write_reference(folder: Path, section: str, ids: list[str], vectors: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{section}.f32.npy", vectors.astype(np.float32))
    (folder / f"{section}.ids.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")


def test_rows_are_matched_by_id_whatever_their_order(synthetic_store, tmp_path):
    rng = np.random.default_rng(0)
    corpus, queries = rng.standard_normal((30, 8)), rng.standard_normal((5, 8))
    store = synthetic_store(corpus, queries)
    noisy = corpus + 0.1 * rng.standard_normal(corpus.shape)
    order = rng.permutation(30)
    extra = rng.standard_normal((3, 8))  # the reference may hold rows the store lacks
    write_reference(tmp_path / "ref", "corpus", [f"d{i}" for i in order] + ["x0", "x1", "x2"],
                    np.concatenate([noisy[order], extra]))

    cos = compare_stores.cosines(compare_stores.load(store.path, "corpus"), compare_stores.load(tmp_path / "ref", "corpus"))

    expected = (corpus * noisy).sum(1) / np.linalg.norm(corpus, axis=1) / np.linalg.norm(noisy, axis=1)
    np.testing.assert_allclose(cos, expected, rtol=1e-6)
    assert cos.min() < 0.999  # the noise is seen: rows were not compared with themselves


def test_ids_missing_from_the_second_side_are_refused(tmp_path):
    vectors = np.eye(3)
    write_reference(tmp_path / "a", "corpus", ["a", "b", "c"], vectors)
    write_reference(tmp_path / "b", "corpus", ["a", "b"], vectors[:2])
    with pytest.raises(UserError, match=r"1 id\(s\) of the first side are not in the second"):
        compare_stores.cosines(compare_stores.load(tmp_path / "a", "corpus"), compare_stores.load(tmp_path / "b", "corpus"))
