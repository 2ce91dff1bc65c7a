"""The Zarr store: round trip, validation on open, integrity (verify), and no damaged row ever read as a vector."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import write_store
from jepa_cache.errors import UserError
from jepa_cache.store import identity, open_store
from jepa_cache.store_writer import StoreWriter, verify_store


@pytest.fixture
def vectors():
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((200, 8)).astype(np.float32)
    queries = rng.standard_normal((10, 8)).astype(np.float32)
    return corpus, queries


@pytest.fixture
def store(tmp_path, vectors):
    return write_store(tmp_path / "s", *vectors, shard_rows=64)


def test_round_trip_ids_vectors_provenance(store, vectors):
    corpus, queries = vectors
    s = open_store(store.path, expect_dim=8, expect_encoder="sha-of-synthetic-encoder")
    assert s.corpus.ids == [f"d{i}" for i in range(200)] and s.queries.rows == 10
    assert np.array_equal(s.corpus.vectors(), corpus) and np.array_equal(s.queries.vectors(), queries)
    assert np.array_equal(s.corpus.vectors(rows=slice(60, 70)), corpus[60:70])
    assert np.array_equal(s.corpus.vectors(rows=np.array([199, 0, 64])), corpus[[199, 0, 64]])
    blocks = list(s.corpus.iter_blocks(50))
    assert [b[0] for b in blocks] == [0, 50, 100, 150] and np.array_equal(np.concatenate([b[1] for b in blocks]), corpus)
    assert s.corpus.row_of["d5"] == 5 and s.complete and s.imported
    assert len(s.provenance["shards"]["corpus"]) == 4 and s.provenance["layout"] == {"shard_rows": 64, "chunk_rows": 16}
    assert verify_store(s.path) == []


def test_open_validates_what_the_caller_expects(store, tmp_path):
    with pytest.raises(UserError, match="vectors are 8-d but 768-d are expected"):
        open_store(store.path, expect_dim=768)
    with pytest.raises(UserError, match="use a store of the same encoder"):
        open_store(store.path, expect_encoder="another")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a jepa-cache store"):
        open_store(tmp_path / "empty")


def test_an_unfinished_store_is_refused(tmp_path, vectors):
    corpus, queries = vectors
    writer = StoreWriter.open_or_create(tmp_path / "s", _provenance(), {"corpus": [f"d{i}" for i in range(200)], "queries": [f"q{i}" for i in range(10)]})
    writer.write_shard("corpus", 0, corpus[:64])
    with pytest.raises(UserError, match="has not finished"):
        open_store(tmp_path / "s")
    assert writer.missing_shards("corpus") == [(1, 64, 128), (2, 128, 192), (3, 192, 200)]
    problems = verify_store(tmp_path / "s")
    assert "build not finished (re-run the same build to complete it)" in problems
    assert "corpus shard 1 (rows 64-128): never finished" in problems
    with pytest.raises(RuntimeError, match="shards missing"):
        writer.finalize()
    with pytest.raises(UserError, match="NaN/inf; nothing written"):
        writer.write_shard("corpus", 1, np.full((64, 8), np.nan, np.float32))
    assert not (tmp_path / "s" / "_shards" / "corpus-000001.json").exists()


def _provenance(**kw):
    return {
        "source": "built",
        "encoder": {"name": "m", "path": "/x/m", "weights_sha256": "abc", "dim": 8},
        "dataset": {"name": "d", "files": {}},
        "template": {"corpus": "t", "queries": "q"},
        "dim": 8,
        "dtype": "float32",
        "layout": {"shard_rows": 64, "chunk_rows": 16},
    } | kw


def test_reopening_with_other_provenance_is_refused(store, tmp_path):
    ids = {"corpus": ["a"], "queries": ["q"]}
    StoreWriter.open_or_create(tmp_path / "p", _provenance(), ids)
    with pytest.raises(UserError, match=r"made differently \(dtype differ\).*--overwrite"):
        StoreWriter.open_or_create(tmp_path / "p", _provenance(dtype="float16"), ids)
    # where the encoder's folder lies, and the name it is called by, change no vector
    moved = _provenance(encoder={"name": "other-name", "path": "/y/m", "weights_sha256": "abc", "dim": 8})
    assert identity(moved) == identity(_provenance())
    StoreWriter.open_or_create(tmp_path / "p", moved, ids)
    w = StoreWriter.open_or_create(tmp_path / "p", _provenance(dtype="float16"), ids, overwrite=True)
    assert w.provenance["dtype"] == "float16"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a jepa-cache store"):
        StoreWriter.open_or_create(tmp_path / "junk", _provenance(), ids, overwrite=True)
    assert (tmp_path / "junk" / "file").exists()


def _shard_file(store, section="corpus", index=1):
    return store.path / section / "emb" / "c" / str(index) / "0"


def test_deleted_shard_is_reported_and_never_read_as_zeros(store):
    _shard_file(store).unlink()
    assert verify_store(store.path) == ["corpus shard 1 (rows 64-128): 64 NaN/inf rows (missing or damaged chunk)"]
    s = open_store(store.path)
    with pytest.raises(UserError, match=r"64 row\(s\) are NaN/inf \(first: row 64, id 'd64'\).*jepa-cache verify"):
        s.corpus.vectors()
    with pytest.raises(UserError, match="first: row 70"):
        s.corpus.vectors(rows=np.array([3, 70]))
    assert np.isfinite(s.corpus.vectors(rows=slice(0, 64))).all()  # the sound shards still read


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_shard_is_reported_and_refused(store, keep):
    path = _shard_file(store)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    problems = verify_store(store.path)
    assert len(problems) == 1 and problems[0].startswith("corpus shard 1 (rows 64-128): unreadable")
    with pytest.raises(UserError, match="unreadable .*a shard file is damaged"):
        open_store(store.path).corpus.vectors()


def test_flipped_byte_and_changed_data_are_caught(store, vectors):
    path = _shard_file(store, "queries", 0)
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF
    path.write_bytes(bytes(data))
    assert verify_store(store.path)[0].startswith("queries shard 0 (rows 0-10): unreadable")
    with pytest.raises(UserError):
        open_store(store.path).queries.vectors()
    # rewritten through zarr (valid CRCs) but not the recorded rows: the shard checksum catches it
    import zarr

    zarr.open_group(str(store.path), mode="r+")["corpus/emb"][0:64] = vectors[0][0:64] * 2
    assert "corpus shard 0 (rows 0-64): checksum mismatch (data changed after writing)" in verify_store(store.path)


def test_missing_ids_and_marker_are_reported(store):
    (store.path / "_shards" / "corpus-000002.json").unlink()
    assert verify_store(store.path) == ["corpus shard 2 (rows 128-192): never finished"]
    (store.path / "queries" / "ids.parquet").unlink()
    assert any("ids.parquet: missing" in p for p in verify_store(store.path))
    with pytest.raises(UserError, match="ids.parquet: missing"):
        open_store(store.path).queries


def test_leftovers_of_killed_writers_are_cleaned(tmp_path, vectors):
    ids = {"corpus": [f"d{i}" for i in range(200)], "queries": [f"q{i}" for i in range(10)]}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".s.creating-{dead.stdout.strip()}"
    (stale / "corpus").mkdir(parents=True)
    mine = tmp_path / f".s.creating-{os.getppid()}"  # a live process's: left alone
    mine.mkdir()
    writer = StoreWriter.open_or_create(tmp_path / "s", _provenance(), ids)
    assert not stale.exists() and mine.exists()
    writer.write_shard("corpus", 0, vectors[0][:64])
    partial = tmp_path / "s" / "corpus" / "emb" / "c" / "1" / "0.abc.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half")
    (tmp_path / "s" / "_shards" / ".corpus-000001.json.xyz.tmp").write_text("{")
    assert writer.remove_partial_files() == 2
    assert not partial.exists() and writer.missing_shards("corpus")[0][0] == 1
    shutil.rmtree(mine)


def test_marker_records_the_shard_checksum(store):
    marker = json.loads((store.path / "_shards" / "corpus-000003.json").read_text())
    assert marker["start"] == 192 and marker["stop"] == 200 and marker["sha256"] == store.provenance["shards"]["corpus"][3]


def test_a_store_is_read_from_an_fsspec_url_as_from_its_folder(tiny_built, tmp_path, cli):
    """eval and train-heads take `--store <fsspec URL>` (here memory://, in this process) and give what the local
    folder gives; verify, which needs the local shard markers, says so."""
    import json

    import fsspec
    import torch

    from jepa_cache.heads import load_heads

    data, store = tiny_built
    fs = fsspec.filesystem("memory")
    fs.put(str(store.path), "/remote-store", recursive=True)
    url = "memory://remote-store"
    remote = open_store(url)
    assert remote.corpus.ids == store.corpus.ids and np.array_equal(remote.corpus.vectors(), store.corpus.vectors())
    assert remote.fingerprint == store.fingerprint

    for name, where in (("local", str(store.path)), ("remote", url)):
        code, err = cli(["eval", "--dataset", str(data), "--store", where, "--split", "test", "--out", str(tmp_path / f"eval-{name}")])
        assert code == 0, err
        code, err = cli(["train-heads", "--store", where, "--dataset", str(data), "--preset", "jepa", "--output-dim", "8",
                         "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / f"heads-{name}")])
        assert code == 0, err
    metrics = [json.loads((tmp_path / f"eval-{n}" / "results.json").read_text())["datasets"]["tiny"]["metrics"] for n in ("local", "remote")]
    assert metrics[0] == metrics[1]
    a, b = (load_heads(tmp_path / f"heads-{n}").state_dict() for n in ("local", "remote"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    code, err = cli(["verify", url])
    assert code == 2 and "verify reads shard markers on a local filesystem" in err
    fs.rm("/remote-store", recursive=True)
