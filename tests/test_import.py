import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jepa_cache.config import ImportConfig
from jepa_cache.datasets import BeirDataset, read_corpus, read_queries
from jepa_cache.errors import UserError
from jepa_cache.files import sha256_file
from jepa_cache.importer import import_vectors
from jepa_cache.store import open_store

DIM = 16


def unit(rng, n, dim=DIM):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fake_model(root, dim=DIM):
    """A sentence-transformers folder as far as the JSON goes: mean pooling to `dim`, then Normalize."""
    root.mkdir(parents=True)
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": dim, "pooling_mode_mean_tokens": True}))
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    (root / "model.safetensors").write_bytes(b"not really weights")
    return root


@pytest.fixture
def inputs(tiny_beir, tmp_path):
    """Unit vectors for every doc/query of the tiny dataset, rows shuffled (ids by row), as .npy + ids files."""
    rng = np.random.default_rng(1)
    ds = BeirDataset("tiny", tiny_beir)
    out = {}
    for section, (ids, _) in (("corpus", read_corpus(ds.corpus_path)), ("queries", read_queries(ds.queries_path))):
        order = rng.permutation(len(ids))
        vecs, shuffled = unit(rng, len(ids)), [ids[i] for i in order]
        np.save(tmp_path / f"{section}.npy", vecs)
        (tmp_path / f"{section}.ids.txt").write_text("\n".join(shuffled) + "\n")
        out[section] = dict(zip(shuffled, vecs))
    return out


def config(tiny_beir, tmp_path, **kw):
    base = dict(dataset=str(tiny_beir), corpus=str(tmp_path / "corpus.npy"), corpus_ids=str(tmp_path / "corpus.ids.txt"),
                queries=str(tmp_path / "queries.npy"), query_ids=str(tmp_path / "queries.ids.txt"),
                model="my-org/not-on-disk", out=str(tmp_path / "store"), dtype="float32", shard_rows=16, chunk_rows=8)
    return ImportConfig(**{**base, **kw})


def assert_same_by_id(store, vectors):
    for section in ("corpus", "queries"):
        sec = store.section(section)
        got = sec.vectors()
        assert set(sec.ids) == set(vectors[section])
        for doc_id, vec in vectors[section].items():
            np.testing.assert_array_equal(got[sec.row_of[doc_id]], vec)


def test_npy_round_trip_by_id(tiny_beir, tmp_path, inputs):
    model = fake_model(tmp_path / "model")
    store = import_vectors(config(tiny_beir, tmp_path, model=str(model)), log=lambda s: None)
    assert_same_by_id(store, inputs)
    assert store.imported and store.complete
    assert store.corpus.ids == read_corpus(BeirDataset("tiny", tiny_beir).corpus_path)[0]  # dataset file order
    assert store.encoder_fingerprint == sha256_file(model / "model.safetensors")
    enc = store.provenance["encoder"]
    assert (enc["pooling"], enc["max_seq_length"], enc["model_normalizes"], enc["dim"]) == ("mean", 128, True, DIM)
    files = store.provenance["import"]["files"]
    assert files["corpus"]["sha256"] == sha256_file(tmp_path / "corpus.npy")
    assert files["query_ids"]["sha256"] == sha256_file(tmp_path / "queries.ids.txt")
    assert store.provenance["dataset"]["files"] == BeirDataset("tiny", tiny_beir).file_hashes()


@pytest.mark.parametrize("kind", ["fixed_size_list", "list", "npy_float16"])
def test_other_inputs_round_trip(tiny_beir, tmp_path, inputs, kind):
    kw = {}
    for section in ("corpus", "queries"):
        ids, vecs = list(inputs[section]), np.stack(list(inputs[section].values()))
        if kind == "npy_float16":
            vecs = vecs.astype(np.float16)
            np.save(tmp_path / f"{section}.npy", vecs)
            inputs[section] = dict(zip(ids, vecs.astype(np.float32)))
            continue
        list_type = pa.list_(pa.float32(), DIM) if kind == "fixed_size_list" else pa.list_(pa.float32())
        table = pa.table({"_id": ids, "embedding": pa.array(list(vecs), list_type), "note": ["x"] * len(ids)})
        pq.write_table(table, tmp_path / f"{section}.parquet")
        kw.update({section: str(tmp_path / f"{section}.parquet"), {"corpus": "corpus_ids", "queries": "query_ids"}[section]: None})
    store = import_vectors(config(tiny_beir, tmp_path, **kw), log=lambda s: None)
    assert_same_by_id(store, inputs)
    if kind != "npy_float16":
        assert store.provenance["import"]["files"]["corpus"]["format"] == "parquet"


def mutate(tmp_path, section, fn):
    vecs = np.load(tmp_path / f"{section}.npy")
    ids = (tmp_path / f"{section}.ids.txt").read_text().splitlines()
    vecs, ids = fn(vecs, ids)
    np.save(tmp_path / f"{section}.npy", vecs)
    (tmp_path / f"{section}.ids.txt").write_text("\n".join(ids) + "\n")


def _set(vecs, row, value):
    vecs = vecs.copy()
    vecs[row] = value
    return vecs


ERRORS = {
    "row count != id count": ("corpus", lambda v, i: (v, i[:-1]), "40 vectors .* but 39 ids"),
    "duplicate ids": ("queries", lambda v, i: (v, [i[0], *i[:-1]]), "duplicate id"),
    "id not in dataset": ("corpus", lambda v, i: (v, ["nope", *i[1:]]), "not in .*corpus"),
    "document without vector": ("corpus", lambda v, i: (v[1:], i[1:]), "have no vector"),
    "wrong width": ("queries", lambda v, i: (v[:, :8], i), "corpus vectors are 16-d but query vectors 8-d"),
    "NaN": ("corpus", lambda v, i: (_set(v, 3, np.nan), i), "NaN/inf"),
    "inf": ("queries", lambda v, i: (_set(v, 0, np.inf), i), "NaN/inf"),
    "zero vector": ("corpus", lambda v, i: (_set(v, 5, 0.0), i), "zero vector"),
    "float64": ("corpus", lambda v, i: (v.astype(np.float64), i), "dtype float64"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_validation_errors_create_nothing(tiny_beir, tmp_path, inputs, case):
    section, fn, message = ERRORS[case]
    mutate(tmp_path, section, fn)
    with pytest.raises(UserError, match=message):
        import_vectors(config(tiny_beir, tmp_path), log=lambda s: None)
    assert not (tmp_path / "store").exists()
    assert not list(tmp_path.glob(".store*"))


def test_width_must_match_the_declared_model(tiny_beir, tmp_path, inputs):
    model = fake_model(tmp_path / "model", dim=32)
    with pytest.raises(UserError, match="declared encoder .* makes 32-d"):
        import_vectors(config(tiny_beir, tmp_path, model=str(model)), log=lambda s: None)


def test_float16_overflow_is_caught(tiny_beir, tmp_path, inputs):
    mutate(tmp_path, "corpus", lambda v, i: (_set(v, 2, 1e6), i))
    with pytest.raises(UserError, match=r"NaN/inf \(as float16\)"):
        import_vectors(config(tiny_beir, tmp_path, dtype="float16", normalize=False), log=lambda s: None)


def test_npy_needs_an_ids_file(tiny_beir, tmp_path, inputs):
    with pytest.raises(UserError, match="no ids"):
        import_vectors(config(tiny_beir, tmp_path, corpus_ids=None), log=lambda s: None)


def test_unnormalised_rows_are_normalised_and_recorded(tiny_beir, tmp_path, inputs):
    mutate(tmp_path, "corpus", lambda v, i: (v * np.where(np.arange(len(v)) < 4, 3.0, 1.0)[:, None].astype(np.float32), i))
    logs = []
    store = import_vectors(config(tiny_beir, tmp_path), log=logs.append)
    assert any("4 row(s) were not unit length; L2-normalising" in line for line in logs)
    assert store.provenance["import"]["normalized_rows"] == {"corpus": 4, "queries": 0}
    assert np.allclose(np.linalg.norm(store.corpus.vectors(), axis=1), 1, atol=1e-6)


def test_no_normalize_refuses_unnormalised_vectors_of_a_normalising_encoder(tiny_beir, tmp_path, inputs):
    mutate(tmp_path, "queries", lambda v, i: (v * 2, i))
    model = fake_model(tmp_path / "model")
    with pytest.raises(UserError, match="declared encoder normalises"):
        import_vectors(config(tiny_beir, tmp_path, model=str(model), normalize=False), log=lambda s: None)
    store = import_vectors(config(tiny_beir, tmp_path, normalize=False), log=lambda s: None)  # unknown encoder: kept as given
    assert np.allclose(np.linalg.norm(store.queries.vectors(), axis=1), 2, atol=1e-5)
    assert store.provenance["encoder"]["normalize"] is False


def test_declared_model_not_on_disk(tiny_beir, tmp_path, inputs):
    store = import_vectors(config(tiny_beir, tmp_path), log=lambda s: None)
    assert store.encoder_fingerprint == "declared:my-org/not-on-disk"
    assert store.provenance["encoder"]["weights_sha256"] is None


def test_missing_queries_are_allowed_and_recorded(tiny_beir, tmp_path, inputs):
    mutate(tmp_path, "queries", lambda v, i: (v[2:], i[2:]))
    logs = []
    store = import_vectors(config(tiny_beir, tmp_path), log=logs.append)
    assert store.queries.rows == 10 and store.provenance["import"]["queries_without_vector"] == 2
    assert any("2 of 12 queries have no vector" in line for line in logs)


def test_reimport(tiny_beir, tmp_path, inputs):
    import_vectors(config(tiny_beir, tmp_path), log=lambda s: None)
    logs = []
    import_vectors(config(tiny_beir, tmp_path), log=logs.append)
    assert "nothing to do" in logs[-1]
    mutate(tmp_path, "corpus", lambda v, i: (v[::-1].copy(), i))
    with pytest.raises(UserError, match="other vectors"):
        import_vectors(config(tiny_beir, tmp_path), log=lambda s: None)
    store = import_vectors(config(tiny_beir, tmp_path, overwrite=True), log=lambda s: None)
    assert store.complete


def test_imported_store_matches_a_built_one(tiny_model, tiny_beir, tmp_path):
    """Vectors read out of a built store, shuffled and imported, give the same store: rows, ids, encoder."""
    from jepa_cache.build import build
    from jepa_cache.config import BuildConfig

    built = build(BuildConfig(dataset=str(tiny_beir), model=str(tiny_model), out=str(tmp_path / "built"), dtype="float32",
                              shard_rows=16, chunk_rows=8, batch_size=8), log=lambda s: None)
    rng = np.random.default_rng(0)
    for section in ("corpus", "queries"):
        sec = built.section(section)
        order = rng.permutation(sec.rows)
        np.save(tmp_path / f"{section}.npy", sec.vectors()[order])
        (tmp_path / f"{section}.ids.txt").write_text("\n".join(sec.ids[i] for i in order) + "\n")
    imported = import_vectors(config(tiny_beir, tmp_path, model=str(tiny_model)), log=lambda s: None)
    for section in ("corpus", "queries"):
        assert imported.section(section).ids == built.section(section).ids
        np.testing.assert_array_equal(imported.section(section).vectors(), built.section(section).vectors())
    assert imported.encoder_fingerprint == built.encoder_fingerprint
    assert set(imported.provenance) >= set(built.provenance) - {"finished", "runtime"}  # runtime: how a build computed its vectors
    assert {k: v for k, v in imported.provenance["encoder"].items() if k != "declared"} == built.provenance["encoder"]
    assert (imported.provenance["source"], built.provenance["source"]) == ("imported", "built")


def test_cli_import(tiny_beir, tmp_path, inputs):
    from typer.testing import CliRunner

    from jepa_cache.cli import app

    result = CliRunner().invoke(app, ["import", "--dataset", str(tiny_beir), "--corpus", str(tmp_path / "corpus.npy"),
                                      "--corpus-ids", str(tmp_path / "corpus.ids.txt"), "--queries", str(tmp_path / "queries.npy"),
                                      "--query-ids", str(tmp_path / "queries.ids.txt"), "--model", "my-org/not-on-disk",
                                      "--out", str(tmp_path / "store"), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "imported 40 docs + 12 queries" in result.output
    assert_same_by_id(open_store(tmp_path / "store"), inputs)
