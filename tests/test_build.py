"""Stage 1: a build equals SentenceTransformer.encode, resumes, is idempotent, and refuses bad input cleanly."""

from __future__ import annotations

import dataclasses
import errno
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED, make_tiny_mpnet, minilm_folder, write_beir
from jepa_cache import build as build_mod
from jepa_cache.build import build
from jepa_cache.config import BuildConfig
from jepa_cache.datasets import BeirDataset, read_corpus, read_queries
from jepa_cache.errors import UserError
from jepa_cache.store import open_store
from jepa_cache.store_writer import StoreWriter, verify_store


def quiet(_: str) -> None:
    pass


def cfg(dataset: Path, model: Path, out: Path, **kw) -> BuildConfig:
    return BuildConfig(**{"dataset": str(dataset), "model": str(model), "out": str(out), "shard_rows": 16, "chunk_rows": 8, "batch_size": 4} | kw)


def st_reference(model_dir: Path, dataset: Path, batch_size: int = 4) -> dict[str, np.ndarray]:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu")
    ds = BeirDataset(dataset.name, dataset)
    return {
        section: st.encode(reader(path)[1], batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
        for section, reader, path in (("corpus", read_corpus, ds.corpus_path), ("queries", read_queries, ds.queries_path))
    }


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def test_build_equals_sentence_transformers_encode(tiny_model, tiny_beir, tmp_path):
    ref = st_reference(tiny_model, tiny_beir)
    s32 = build(cfg(tiny_beir, tiny_model, tmp_path / "s32", dtype="float32"), log=quiet)
    s16 = build(cfg(tiny_beir, tiny_model, tmp_path / "s16"), log=quiet)
    ids, _ = read_corpus(BeirDataset("tiny", tiny_beir).corpus_path)
    for store in (s32, s16):
        assert store.corpus.ids == ids and store.queries.ids == [f"q{i}" for i in range(12)]
    for section in ("corpus", "queries"):
        assert np.abs(s32.section(section).vectors() - ref[section]).max() < 1e-6
        assert cosines(s16.section(section).vectors(), ref[section]).min() >= 0.9999
    p = s16.provenance
    assert p["source"] == "built" and p["dtype"] == "float16" and p["dim"] == 32 and p["complete"]
    assert p["encoder"]["max_seq_length"] == 64 and p["encoder"]["pooling"] == "mean" and p["encoder"]["normalize"]
    assert p["encoder"]["weights_sha256"] == build_mod.weights_sha256(tiny_model)
    assert set(p["dataset"]["files"]) == {"corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"}
    assert p["template"]["corpus"] == '(title + " " + text).strip()'
    assert {"torch", "sentence-transformers", "zarr"} <= set(p["versions"])
    assert json.loads((s16.path / "build_config.json").read_text())["batch_size"] == 4
    assert verify_store(s16.path) == []


def test_resume_after_interruption_equals_uninterrupted_build(tiny_model, tiny_beir, tmp_path, monkeypatch):
    reference = build(cfg(tiny_beir, tiny_model, tmp_path / "ref"), log=quiet)
    real_write = StoreWriter.write_shard
    calls = {"n": 0}

    def dies_after_two(self, *args):
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the process stops here, as a kill would stop it
        calls["n"] += 1
        real_write(self, *args)

    monkeypatch.setattr(StoreWriter, "write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        build(cfg(tiny_beir, tiny_model, tmp_path / "s"), log=quiet)
    monkeypatch.setattr(StoreWriter, "write_shard", real_write)
    with pytest.raises(UserError, match="has not finished"):
        open_store(tmp_path / "s")
    # a kill between writing shard 1 and its marker: the shard is re-encoded
    (tmp_path / "s" / "_shards" / "corpus-000001.json").unlink()
    logs: list[str] = []
    store = build(cfg(tiny_beir, tiny_model, tmp_path / "s"), log=logs.append)
    assert "resuming; 1 shard(s) already done" in logs[0]
    assert store.corpus.ids == reference.corpus.ids and store.queries.ids == reference.queries.ids
    for section in ("corpus", "queries"):
        assert np.array_equal(store.section(section).vectors(), reference.section(section).vectors())
    assert store.provenance["shards"] == reference.provenance["shards"] and verify_store(store.path) == []


def test_rerunning_a_complete_build_is_a_noop(tiny_model, tiny_beir, tmp_path, monkeypatch):
    build(cfg(tiny_beir, tiny_model, tmp_path / "s"), log=quiet)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*")}

    def no_load(*a, **k):
        raise AssertionError("a complete store must not load the model")

    monkeypatch.setattr("jepa_cache.encoder.load_encoder", no_load)
    logs: list[str] = []
    store = build(cfg(tiny_beir, tiny_model, tmp_path / "s"), log=logs.append)
    assert logs == [f"{tmp_path / 's'}: already complete (40 docs, 12 queries); nothing to do"] and store.complete
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*")} == before


def test_other_provenance_is_refused_without_overwrite(tiny_model, tiny_beir, tmp_path):
    out = tmp_path / "s"
    build(cfg(tiny_beir, tiny_model, out), log=quiet)
    other_model = make_tiny_mpnet(tmp_path / "other", seed=1)
    for kw, differs in (
        ({"model": str(other_model)}, "weights_sha256"),
        ({"dtype": "float32"}, "dtype"),
        ({"shard_rows": 32}, "layout"),
    ):
        with pytest.raises(UserError, match=rf"holds a store made differently \({differs} differ\).*--overwrite"):
            build(dataclasses.replace(cfg(tiny_beir, tiny_model, out), **kw), log=quiet)
    changed = write_beir(tmp_path / "data2" / "tiny", seed=5)
    with pytest.raises(UserError, match=r"dataset files differ"):
        build(cfg(changed, tiny_model, out), log=quiet)
    store = build(cfg(tiny_beir, other_model, out, overwrite=True), log=quiet)
    assert store.provenance["encoder"]["weights_sha256"] == build_mod.weights_sha256(other_model)
    assert verify_store(out) == []


def _corrupt(lines_by_file: dict[str, list[str]]):
    def make(folder: Path) -> None:
        for name, lines in lines_by_file.items():
            (folder / name).write_text("".join(line + "\n" for line in lines))

    return make


GOOD = '{"_id": "d0", "title": "t", "text": "protein"}'
BAD_INPUTS = [
    ("malformed JSON line", _corrupt({"corpus.jsonl": [GOOD, '{"_id": "d1", "text": ']}), [], r"corpus\.jsonl: line 2: malformed JSON"),
    ("missing _id", _corrupt({"corpus.jsonl": [GOOD, '{"text": "no id"}']}), [], r"corpus\.jsonl: line 2: missing '_id'"),
    ("duplicate doc ids", _corrupt({"corpus.jsonl": [GOOD, GOOD]}), [], r"corpus\.jsonl: line 2: duplicate _id 'd0' \(first on line 1\)"),
    ("duplicate query ids", _corrupt({"queries.jsonl": ['{"_id": "q", "text": "a"}'] * 2}), [], r"queries\.jsonl: line 2: duplicate _id 'q'"),
    ("empty corpus", _corrupt({"corpus.jsonl": []}), [], r"corpus\.jsonl: no records; the file is empty"),
    ("unknown dataset name", None, ["--dataset", "nosuchset"], r"dataset 'nosuchset' is not under .*download it yourself from .*nosuchset\.zip"),
    ("dataset name with odd characters", None, ["--dataset", "sci fact;"], r"dataset name 'sci fact;' is not allowed"),
    ("dataset folder that does not exist", None, ["--dataset", "../no/such"], r"dataset folder \.\./no/such does not exist"),
    ("model folder without config", "no-config", [], r"not a sentence-transformers model folder"),
    ("model folder with garbage weights", "garbage", [], r"garbage: cannot load as a sentence-transformers model"),
    ("model that is neither folder nor hub id", None, ["--model", "./no/such/model"], r"no such folder, and not a hub id"),
    ("negative batch size", None, ["--batch-size", "-1"], r"--batch-size -1: must be a positive integer"),
    ("unknown dtype", None, ["--dtype", "float8"], r"--dtype 'float8': choose one of float16, float32"),
    ("shard not a multiple of chunk", None, ["--shard-rows", "100", "--chunk-rows", "64"], r"--shard-rows 100 must be a positive multiple of --chunk-rows 64"),
    ("device without CUDA", None, ["--device", "cuda"], r"--device cuda: CUDA is not available"),
]


@pytest.mark.parametrize("case, corrupt, extra, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_clear_line_and_writes_nothing(case, corrupt, extra, message, tiny_model, tiny_beir, tmp_path, cli, monkeypatch):
    if case == "device without CUDA":
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    model = tiny_model
    if corrupt in ("no-config", "garbage"):
        model = shutil.copytree(tiny_model, tmp_path / corrupt)
        if corrupt == "no-config":
            for name in ("modules.json", "config.json"):
                (model / name).unlink()
        else:
            (model / "model.safetensors").write_bytes(b"\x00" * 64)
    elif corrupt is not None:
        corrupt(tiny_beir)
    monkeypatch.chdir(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    argv = ["build", "--dataset", str(tiny_beir), "--model", str(model), "--out", str(tmp_path / "cache" / "s"), "--data-dir", str(tmp_path / "data")]
    code, err = cli(argv + extra)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written, not even the output's folder


def test_out_that_is_not_a_store_is_left_alone(tiny_model, tiny_beir, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="exists and is not a jepa-cache store"):
            build(cfg(tiny_beir, tiny_model, tmp_path / "mine", overwrite=overwrite), log=quiet)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_minilm_integration(tmp_path):
    """A real model (all-MiniLM-L6-v2, 384-d, BERT tokenizer with token_type_ids) on a small dataset, default backend."""
    folder = shutil.copytree(minilm_folder(), tmp_path / "minilm")  # a converted backend caches beside it: not in site-packages
    data = write_beir(tmp_path / "data" / "mini", n_docs=48, n_queries=10, seed=3)
    store = build(cfg(data, folder, tmp_path / "s", dtype="float32", batch_size=8), log=quiet)
    ref = st_reference(folder, data, batch_size=8)
    assert store.dim == 384 and store.provenance["encoder"]["max_seq_length"] == 256
    for section in ("corpus", "queries"):
        assert np.abs(store.section(section).vectors() - ref[section]).max() < 1e-5
        assert cosines(store.section(section).vectors(), ref[section]).min() >= 1 - 1e-6


@pytest.mark.slow
def test_scifact_sample_matches_reference_vectors(tmp_path):
    """Real all-mpnet-base-v2 on 64 SciFact documents (short to 384-token-capped) and 32 queries vs the shared reference."""
    model = Path("data/models/all-mpnet-base-v2")
    ref_dir = SHARED / "embeddings" / "scifact"
    src = SHARED / "beir" / "scifact"
    if not model.is_dir() or not ref_dir.is_dir():
        pytest.skip("needs data/models/all-mpnet-base-v2 (make model) and ../shared/data/embeddings/scifact")
    import gzip

    with gzip.open(src / "corpus.jsonl.gz", "rt") as f:
        docs = f.readlines()
    with gzip.open(src / "queries.jsonl.gz", "rt") as f:
        queries = f.readlines()
    rng = np.random.default_rng(0)
    by_length = np.argsort([len(d) for d in docs])
    picks = sorted(by_length[np.linspace(0, len(docs) - 1, 64).astype(int)])
    sample = tmp_path / "data" / "scifact-sample"
    (sample / "qrels").mkdir(parents=True)
    (sample / "corpus.jsonl").write_text("".join(docs[i] for i in picks))
    (sample / "queries.jsonl").write_text("".join(queries[i] for i in sorted(rng.choice(len(queries), 32, replace=False))))
    store = build(BuildConfig(dataset=str(sample), model=str(model), out=str(tmp_path / "s"), device="cpu"), log=quiet)
    assert store.provenance["encoder"]["max_seq_length"] == 384 and store.provenance["dtype"] == "float16"
    for section in ("corpus", "queries"):
        ref_ids = (ref_dir / f"{section}.ids.txt").read_text().splitlines()
        ref = np.load(ref_dir / f"{section}.f32.npy", mmap_mode="r")
        row = {i: n for n, i in enumerate(ref_ids)}
        got = store.section(section)
        cos = cosines(got.vectors(), np.asarray(ref[[row[i] for i in got.ids]]))
        assert cos.min() >= 0.9999, (section, float(cos.min()))


def test_unwritable_out_and_full_disk_are_one_clear_line(tiny_model, tiny_beir, tmp_path, cli, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    args = ["build", "--dataset", str(tiny_beir), "--model", str(tiny_model), "--shard-rows", "16", "--chunk-rows", "8"]
    code, err = cli(args + ["--out", str(tmp_path / "a-file" / "s")])
    assert code == 2 and err == f"error: --out {tmp_path / 'a-file' / 's'}: {tmp_path / 'a-file'} is a file, not a folder; choose another --out\n"

    def disk_full(self, section, index, vectors):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path / section / "emb"))

    real_write = StoreWriter.write_shard
    monkeypatch.setattr(StoreWriter, "write_shard", disk_full)
    code, err = cli(args + ["--out", str(tmp_path / "s")])
    assert code == 2 and err.splitlines()[-1] == f"error: {tmp_path / 's' / 'corpus' / 'emb'}: No space left on device; free some space and run the same command again (it resumes; nothing half-written was kept)"
    monkeypatch.setattr(StoreWriter, "write_shard", real_write)
    code, err = cli(args + ["--out", str(tmp_path / "s")])  # space freed: the same command finishes the store
    assert code == 0 and verify_store(tmp_path / "s") == []
