"""The pipeline's stores live at the one default path eval looks at (data/cache/<dataset>/<model>), and an
imported store is reused in a shell without $JEPA_CACHE_REFERENCE instead of being re-encoded."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_beir
from jepa_cache import pipeline
from jepa_cache.datasets import find_dataset, read_ids
from jepa_cache.pipeline import Runner
from jepa_cache.recipe import Recipe, Row
from jepa_cache.models import DEFAULT_MODEL
from jepa_cache.store import default_store_path


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A tiny dataset under data/beir/ and reference vectors for it, in a fresh working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JEPA_CACHE_DATA", raising=False)
    data = write_beir(tmp_path / "data" / "beir" / "tiny")
    ref = tmp_path / "reference" / "tiny"
    ref.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for section, path in (("corpus", data / "corpus.jsonl"), ("queries", data / "queries.jsonl")):
        ids = read_ids(path)
        vectors = rng.standard_normal((len(ids), 8)).astype(np.float32)
        np.save(ref / f"{section}.f32.npy", vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
        (ref / f"{section}.ids.txt").write_text("\n".join(ids) + "\n")
    recipe = Recipe(name="t", train_dataset="tiny", eval_datasets=["tiny"], strategies=[Row(name="vanilla", strategy="vanilla")])
    return tmp_path, recipe


def test_imported_store_is_where_eval_looks_and_is_reused_without_the_reference(world, monkeypatch):
    tmp_path, recipe = world
    monkeypatch.setenv(pipeline.REFERENCE_ENV, str(tmp_path / "reference"))
    store = Runner(recipe, runs_dir=tmp_path / "runs", log=lambda s: None).store("tiny")
    expected = default_store_path(find_dataset("tiny").name, DEFAULT_MODEL)
    assert store.imported and store.path == expected and str(expected) == "data/cache/tiny/all-mpnet-base-v2"

    monkeypatch.delenv(pipeline.REFERENCE_ENV)  # a new shell
    monkeypatch.setattr("jepa_cache.pipeline.build", lambda *a, **k: pytest.fail("would encode instead of reusing the import"))
    runner = Runner(recipe, runs_dir=tmp_path / "runs", log=lambda s: None)
    assert runner.store("tiny").imported and (runner.reused, runner.computed) == (1, 0)


def test_encode_replaces_an_imported_store(world, monkeypatch):
    tmp_path, recipe = world
    monkeypatch.setenv(pipeline.REFERENCE_ENV, str(tmp_path / "reference"))
    Runner(recipe, runs_dir=tmp_path / "runs", log=lambda s: None).store("tiny")
    calls = []
    monkeypatch.setattr("jepa_cache.pipeline.build", lambda cfg, log: calls.append(cfg) or "built")
    assert Runner(recipe, runs_dir=tmp_path / "runs", encode=True, log=lambda s: None).store("tiny") == "built"
    assert calls[0].out == "data/cache/tiny/all-mpnet-base-v2" and calls[0].overwrite
