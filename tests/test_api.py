"""The notebook API: the same configs the CLI builds, the same results, and `import jepa_cache` stays light."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import write_beir


def test_import_does_not_load_torch():
    code = "import sys, jepa_cache; jepa_cache.evaluate_datasets; jepa_cache.train_heads; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_train_heads_and_evaluate_as_the_stages_give_them(tmp_path, synthetic_store, one_thread):
    import jepa_cache
    from jepa_cache.config import EvalConfig
    from jepa_cache.datasets import BeirDataset, read_corpus, read_queries
    from jepa_cache.evaluate import evaluate

    root = write_beir(tmp_path / "beir" / "tiny", n_docs=40, n_queries=40)
    ds = BeirDataset("tiny", root)
    doc_ids, query_ids = read_corpus(ds.corpus_path)[0], read_queries(ds.queries_path)[0]
    rng = np.random.default_rng(0)
    store = synthetic_store(rng.normal(size=(40, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32),
                            doc_ids=doc_ids, query_ids=query_ids, dataset="tiny")
    opened = jepa_cache.open_store(store.path)
    result = jepa_cache.train_heads(opened.path, dataset=str(root), out=str(tmp_path / "h"), epochs=1, device="cpu",
                                    log=lambda s: None)
    assert result.record["adapt"]["documents"] > 0 and jepa_cache.load_heads(tmp_path / "h").fingerprint == result.heads.fingerprint
    got = jepa_cache.evaluate_datasets(str(root), store=store.path, heads=tmp_path / "h", out=str(tmp_path / "a"), log=lambda s: None)
    want = evaluate(EvalConfig(datasets=[str(root)], store=str(store.path), heads=str(tmp_path / "h"), out=str(tmp_path / "b")),
                    log=lambda s: None)
    assert got["datasets"]["tiny"]["metrics"] == pytest.approx(want["datasets"]["tiny"]["metrics"])
    assert got["datasets"]["tiny"]["corrections_applied"] == len(jepa_cache.Corrections.load(tmp_path / "h").doc_ids)
