"""build --backend: OpenVINO / ONNX Runtime stores equal the PyTorch store, conversions are cached, missing runtimes are one line."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from conftest import minilm_folder, write_beir
from jepa_cache import backends
from jepa_cache.build import build
from jepa_cache.config import BuildConfig
from jepa_cache.errors import UserError
from jepa_cache.models import weights_sha256
from jepa_cache.store import identity
from jepa_cache.store_writer import verify_store

pytestmark = pytest.mark.usefixtures("one_thread")
MODULE = {"openvino": "openvino", "onnx": "onnxruntime"}
CONVERTED = [pytest.param(b, marks=pytest.mark.skipif(importlib.util.find_spec(m) is None, reason=f"{m} is not installed (pip install 'jepa-cache[{b}]')"))
             for b, m in MODULE.items()]


def quiet(_: str) -> None:
    pass


def cfg(dataset, model, out, **kw) -> BuildConfig:
    return BuildConfig(**{"dataset": str(dataset), "model": str(model), "out": str(out), "shard_rows": 16, "chunk_rows": 8,
                          "batch_size": 4, "dtype": "float32", "backend": "torch"} | kw)


@pytest.fixture(scope="module")
def model_copy(tiny_model, tmp_path_factory):
    """The tiny encoder in a folder of this module's own, so that conversions cached beside it start from none."""
    import shutil

    return shutil.copytree(tiny_model, tmp_path_factory.mktemp("backend-model") / "tiny-mpnet")


@pytest.mark.parametrize("backend", CONVERTED)
def test_each_backend_store_equals_the_pytorch_store(backend, model_copy, tiny_beir, tmp_path):
    reference = build(cfg(tiny_beir, model_copy, tmp_path / "torch"), log=quiet)
    store = build(cfg(tiny_beir, model_copy, tmp_path / backend, backend=backend), log=quiet)
    for section in ("corpus", "queries"):
        assert store.section(section).ids == reference.section(section).ids
        assert np.abs(store.section(section).vectors() - reference.section(section).vectors()).max() < 1e-5
    runtime = store.provenance["runtime"]
    assert runtime == {"backend": backend, "version": backends.runtime_version(backend), "precision": "float32"}
    assert reference.provenance["runtime"]["backend"] == "torch"
    # one encoder's vectors: heads trained on either store are accepted on the other
    assert store.encoder_fingerprint == reference.encoder_fingerprint == weights_sha256(model_copy)
    assert identity(store.provenance) == identity(reference.provenance)
    assert verify_store(store.path) == []


@pytest.mark.parametrize("backend", CONVERTED)
def test_a_bert_model_with_token_type_ids_equals_sentence_transformers(backend, tmp_path):
    """all-MiniLM-L6-v2 (BERT: its tokenizer's token_type_ids go in) against plain SentenceTransformer.encode."""
    import shutil

    from sentence_transformers import SentenceTransformer

    from jepa_cache.datasets import BeirDataset, read_corpus
    from jepa_cache.encoder import load_encoder

    folder = shutil.copytree(minilm_folder(), tmp_path / "minilm")  # conversions go beside it, not into site-packages
    data = write_beir(tmp_path / "data" / "mini", n_docs=24, n_queries=4, seed=3)
    store = build(cfg(data, folder, tmp_path / "s", backend=backend, batch_size=8), log=quiet)
    assert backends.input_names(load_encoder(folder)) == ("input_ids", "attention_mask", "token_type_ids")
    texts = read_corpus(BeirDataset("mini", data).corpus_path)[1]
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts, batch_size=8, normalize_embeddings=True)
    assert np.abs(store.corpus.vectors() - ref).max() < 1e-5


def test_a_conversion_is_cached_beside_the_model_and_reused(model_copy, tiny_beir, tmp_path, monkeypatch):
    backend = "openvino" if importlib.util.find_spec("openvino") else "onnx"
    if importlib.util.find_spec(MODULE[backend]) is None:
        pytest.skip("no converted backend installed")
    calls = []
    real = backends.convert
    monkeypatch.setattr(backends, "convert", lambda *a: calls.append(a[1]) or real(*a))
    cached = backends.converted_path(model_copy, backend, weights_sha256(model_copy))
    assert cached.parent == model_copy.parent / "tiny-mpnet.converted" and cached.name.endswith(weights_sha256(model_copy))
    logs: list[str] = []
    first = build(cfg(tiny_beir, model_copy, tmp_path / "a", backend=backend), log=logs.append)
    was_cached = calls == []  # another test of this module may have converted it already
    assert (cached / backends._FILES[backend]).is_file()
    assert was_cached or any(f"converting tiny-mpnet for {backend}" in line for line in logs)
    calls.clear()
    logs.clear()
    second = build(cfg(tiny_beir, model_copy, tmp_path / "b", backend=backend), log=logs.append)
    assert calls == [] and not any("converting" in line for line in logs)
    assert np.array_equal(first.corpus.vectors(), second.corpus.vectors())
    assert not list(cached.parent.glob(".*partial*"))  # no half-written conversion left behind


def test_a_failing_conversion_leaves_nothing_and_says_use_torch(model_copy, tiny_beir, tmp_path, monkeypatch):
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed")

    def broken(model, backend, names, dest):
        dest.mkdir(parents=True)
        (dest / "half-written").write_text("x")
        raise RuntimeError("cannot trace this graph")

    monkeypatch.setattr(backends, "convert", broken)
    monkeypatch.setattr(backends, "runtime_version", lambda b: "0.0-test")  # a cache entry no other test made
    with pytest.raises(UserError, match=r"cannot convert for onnx \(RuntimeError: cannot trace this graph\); use --backend torch"):
        build(cfg(tiny_beir, model_copy, tmp_path / "s", backend="onnx"), log=quiet)
    assert not list((model_copy.parent / "tiny-mpnet.converted").glob("*0.0-test*"))


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_a_missing_runtime_is_one_line_naming_the_extra(backend, tiny_model, tiny_beir, tmp_path, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, MODULE[backend], None)  # `import openvino` now raises ImportError
    code, err = cli(["build", "--dataset", str(tiny_beir), "--model", str(tiny_model), "--out", str(tmp_path / "s"), "--backend", backend])
    assert code == 2 and err == f"error: --backend {backend}: {MODULE[backend]} is not installed; pip install 'jepa-cache[{backend}]'\n"
    assert not (tmp_path / "s").exists()


def test_auto_is_openvino_on_cpu_when_installed_else_torch(tiny_model, monkeypatch):
    import torch

    from jepa_cache.encoder import load_encoder

    model = load_encoder(tiny_model)
    cpu = torch.device("cpu")
    want = "openvino" if importlib.util.find_spec("openvino") else "torch"
    assert backends.resolve_backend("auto", cpu, model) == want
    assert backends.resolve_backend("auto", torch.device("cuda")) == "torch"
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert backends.resolve_backend("auto", cpu, model) == "torch"
    with pytest.raises(UserError, match=r"--backend 'tensorrt': choose one of auto, torch, openvino, onnx"):
        backends.resolve_backend("tensorrt", cpu)
    with pytest.raises(UserError, match=r"--backend onnx: runs on the CPU only"):
        backends.resolve_backend("onnx", torch.device("cuda"))


def test_precision_is_resolved(monkeypatch):
    import torch

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert backends.resolve_precision("auto", "torch", cpu) == "float32"
    assert backends.resolve_precision("auto", "openvino", cpu) == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert backends.resolve_precision("auto", "torch", cuda) == "bfloat16"  # the build's autocast on CUDA
    assert backends.resolve_precision("fp32", "torch", cuda) == "float32"
    assert backends.resolve_precision("bf16", "torch", cuda) == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert backends.resolve_precision("auto", "torch", cuda) == "float16"
    with pytest.raises(UserError, match=r"--precision bf16: cuda has no bf16; use --precision auto \(fp16\) or fp32"):
        backends.resolve_precision("bf16", "torch", cuda)
    for backend in ("torch", "onnx"):  # PyTorch and ONNX Runtime would emulate bf16 on the CPU
        with pytest.raises(UserError, match=r"--precision bf16 on the CPU needs --backend openvino"):
            backends.resolve_precision("bf16", backend, cpu)
    with pytest.raises(UserError, match=r"--precision 'int8': choose one of auto, fp32, bf16"):
        backends.resolve_precision("int8", "torch", cpu)


def test_autocast_follows_the_precision():
    import torch

    cpu = torch.device("cpu")
    with backends.Runtime("torch").autocast(cpu):
        assert not torch.is_autocast_enabled("cpu")
    with backends.Runtime("torch", precision="bfloat16").autocast(cpu):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with backends.Runtime("openvino", precision="bfloat16").autocast(cpu):  # casts inside its own graph
        assert not torch.is_autocast_enabled("cpu")


def _ov_bf16() -> bool:
    return importlib.util.find_spec("openvino") is not None and backends._ov_bf16()


@pytest.mark.skipif(not _ov_bf16(), reason="needs OpenVINO and a CPU with bf16 instructions (AMX / AVX-512 BF16)")
def test_a_bf16_build_is_close_to_fp32_and_says_so(model_copy, tiny_beir, tmp_path):
    reference = build(cfg(tiny_beir, model_copy, tmp_path / "fp32", backend="openvino"), log=quiet)
    store = build(cfg(tiny_beir, model_copy, tmp_path / "bf16", backend="openvino", precision="bf16"), log=quiet)
    assert store.provenance["runtime"]["precision"] == "bfloat16"
    assert reference.provenance["runtime"]["precision"] == "float32"
    for section in ("corpus", "queries"):
        a, b = reference.section(section).vectors(), store.section(section).vectors()
        cosine = (a * b).sum(1)
        # close, and really computed in bf16: beyond the 1e-5 within which the fp32 runtimes agree
        assert cosine.min() > 0.999 and np.abs(a - b).max() > 1e-5
    assert store.fingerprint != reference.fingerprint  # other vectors: another content address
    assert store.encoder_fingerprint == reference.encoder_fingerprint  # one encoder: heads apply to both
    # neither an fp32 nor a default request silently reuses the bf16 store; a bf16 one does
    for precision in ("fp32", "auto"):
        with pytest.raises(UserError, match=r"holds a store made differently \(precision differ\)"):
            build(cfg(tiny_beir, model_copy, tmp_path / "bf16", backend="openvino", precision=precision), log=quiet)
    assert build(cfg(tiny_beir, model_copy, tmp_path / "bf16", backend="openvino", precision="bf16"),
                 log=quiet).fingerprint == store.fingerprint
    with pytest.raises(UserError, match=r"holds a store made differently \(precision differ\)"):
        build(cfg(tiny_beir, model_copy, tmp_path / "fp32", backend="openvino", precision="bf16"), log=quiet)


def test_a_bad_precision_is_refused_before_anything_else(model_copy, tiny_beir, tmp_path):
    build(cfg(tiny_beir, model_copy, tmp_path / "s"), log=quiet)
    with pytest.raises(UserError, match=r"^--precision 'bf': choose one of auto, fp32, bf16$"):
        build(cfg(tiny_beir, model_copy, tmp_path / "s", precision="bf"), log=quiet)


@pytest.mark.parametrize("backend", CONVERTED)
def test_a_build_resumes_only_with_the_backend_it_began_with(backend, model_copy, tiny_beir, tmp_path, monkeypatch):
    from jepa_cache.store_writer import StoreWriter

    real_write = StoreWriter.write_shard

    def dies_after_one(self, section, index, vectors):
        real_write(self, section, index, vectors)
        raise KeyboardInterrupt

    monkeypatch.setattr(StoreWriter, "write_shard", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        build(cfg(tiny_beir, model_copy, tmp_path / "s"), log=quiet)
    monkeypatch.setattr(StoreWriter, "write_shard", real_write)
    with pytest.raises(UserError, match=r"began with --backend torch \(float32\); resume it with the same --backend and --precision, or pass "
                                        r"--overwrite"):
        build(cfg(tiny_beir, model_copy, tmp_path / "s", backend=backend), log=quiet)
    store = build(cfg(tiny_beir, model_copy, tmp_path / "s", backend=backend, overwrite=True), log=quiet)
    assert store.provenance["runtime"]["backend"] == backend and verify_store(store.path) == []
