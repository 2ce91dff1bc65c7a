"""build encodes queries and documents with the model's prompts (or the options'), as encode_query / encode_document do;
stores and heads made with other prompts are refused."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from jepa_cache.build import build
from jepa_cache.config import BuildConfig
from jepa_cache.datasets import BeirDataset, read_corpus, read_queries
from jepa_cache.errors import UserError
from jepa_cache.models import default_prompts, weights_sha256
from jepa_cache.store import open_store

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = {"query": "query: find the study about ", "document": "passage: "}


def quiet(_: str) -> None:
    pass


def with_prompts(tiny_model, dest, prompts=PROMPTS, include_prompt=True, **config):
    """The tiny encoder with prompts in its config_sentence_transformers.json (and, optionally, pooling without them)."""
    folder = shutil.copytree(tiny_model, dest)
    path = folder / "config_sentence_transformers.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(data | {"prompts": prompts} | config))
    if not include_prompt:
        pooling = next(folder.glob("*Pooling/config.json"))
        pooling.write_text(json.dumps(json.loads(pooling.read_text()) | {"include_prompt": False}))
    return folder


def cfg(dataset, model, out, **kw) -> BuildConfig:
    return BuildConfig(**{"dataset": str(dataset), "model": str(model), "out": str(out), "shard_rows": 16, "chunk_rows": 8,
                          "batch_size": 4, "dtype": "float32", "backend": "torch"} | kw)


def st_sides(folder, dataset):
    """encode_query / encode_document / plain encode of the dataset's texts, by sentence-transformers itself."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device="cpu")
    ds = BeirDataset(dataset.name, dataset)
    queries, docs = read_queries(ds.queries_path)[1], read_corpus(ds.corpus_path)[1]
    kw = dict(batch_size=4, normalize_embeddings=True, convert_to_numpy=True)
    return {"queries": st.encode_query(queries, **kw), "corpus": st.encode_document(docs, **kw),
            "plain queries": st.encode(queries, prompt="", **kw), "plain corpus": st.encode(docs, prompt="", **kw)}


@pytest.mark.parametrize("include_prompt", [True, False], ids=["pooled-with-prompt", "pooling-excludes-prompt"])
def test_each_side_is_encoded_with_its_prompt_as_encode_query_and_encode_document(include_prompt, tiny_model, tiny_beir, tmp_path):
    folder = with_prompts(tiny_model, tmp_path / "prompted", include_prompt=include_prompt)
    ref = st_sides(folder, tiny_beir)
    store = build(cfg(tiny_beir, folder, tmp_path / "s"), log=quiet)
    for section in ("corpus", "queries"):
        got = store.section(section).vectors()
        assert np.abs(got - ref[section]).max() < 1e-6
        assert np.abs(got - ref[f"plain {section}"]).max() > 1e-3  # the prompt changed the vectors: it reached the tokenizer
    assert store.provenance["encoder"]["prompts"] == PROMPTS


def test_options_override_the_model_prompts(tiny_model, tiny_beir, tmp_path):
    folder = with_prompts(tiny_model, tmp_path / "prompted")
    ref = st_sides(folder, tiny_beir)
    store = build(cfg(tiny_beir, folder, tmp_path / "s", query_prompt="", document_prompt=""), log=quiet)
    for section in ("corpus", "queries"):
        assert np.abs(store.section(section).vectors() - ref[f"plain {section}"]).max() < 1e-6
    assert "prompts" not in store.provenance["encoder"]  # none used: recorded as for a model without prompts
    assert store.encoder_fingerprint == weights_sha256(folder)
    mine = build(cfg(tiny_beir, tiny_model, tmp_path / "mine", query_prompt="search_query: "), log=quiet)
    assert mine.provenance["encoder"]["prompts"] == {"query": "search_query: ", "document": ""}


def test_default_prompts_follow_sentence_transformers(tiny_model, tmp_path):
    assert default_prompts(tiny_model) == {"query": "", "document": ""}
    passage = with_prompts(tiny_model, tmp_path / "a", {"query": "q: ", "passage": "p: ", "corpus": "c: "})
    assert default_prompts(passage) == {"query": "q: ", "document": "p: "}
    default = with_prompts(tiny_model, tmp_path / "b", {"query": "q: ", "retrieval": "r: "}, default_prompt_name="retrieval")
    assert default_prompts(default) == {"query": "q: ", "document": "r: "}  # encode_document falls back to the default prompt
    (tmp_path / "b" / "config_sentence_transformers.json").write_text("{")
    with pytest.raises(UserError, match=r"config_sentence_transformers\.json: not valid JSON"):
        default_prompts(default)


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None and importlib.util.find_spec("onnxruntime") is None,
                    reason="no converted backend installed")
def test_converted_backends_apply_the_same_prompts(tiny_model, tiny_beir, tmp_path):
    backend = "openvino" if importlib.util.find_spec("openvino") else "onnx"
    folder = with_prompts(tiny_model, tmp_path / "prompted", include_prompt=False)
    ref = st_sides(folder, tiny_beir)
    store = build(cfg(tiny_beir, folder, tmp_path / "s", backend=backend), log=quiet)
    for section in ("corpus", "queries"):
        assert np.abs(store.section(section).vectors() - ref[section]).max() < 1e-5


def test_stores_and_heads_of_other_prompts_are_refused(tiny_model, tiny_beir, tmp_path):
    from jepa_cache.config import EvalConfig, TrainConfig
    from jepa_cache.evaluate import evaluate
    from jepa_cache.train import train

    plain = build(cfg(tiny_beir, tiny_model, tmp_path / "plain"), log=quiet)
    prompted = build(cfg(tiny_beir, tiny_model, tmp_path / "prompted", query_prompt="query: "), log=quiet)
    assert plain.encoder_fingerprint == weights_sha256(tiny_model)
    assert prompted.encoder_fingerprint.startswith(weights_sha256(tiny_model) + "+prompts:")
    # the same output folder with other prompts is another store
    with pytest.raises(UserError, match=r"holds a store made differently \(prompts differ\)"):
        build(cfg(tiny_beir, tiny_model, tmp_path / "plain", query_prompt="query: "), log=quiet)
    heads = tmp_path / "heads"
    train(TrainConfig(store=str(plain.path), dataset=str(tiny_beir), out=str(heads), preset="jepa", output_dim=8, projection_hidden=16,
                      predictor_hidden=16, batch_size=4, epochs=1, device="cpu"), log=quiet)
    ok = evaluate(EvalConfig(datasets=[str(tiny_beir)], store=str(plain.path), heads=str(heads), out=str(tmp_path / "e1")), log=quiet)
    assert ok["datasets"]
    with pytest.raises(UserError, match=r"encoded with prompts .*'query: '.*other prompts"):
        evaluate(EvalConfig(datasets=[str(tiny_beir)], store=str(prompted.path), heads=str(heads), out=str(tmp_path / "e2")), log=quiet)
    with pytest.raises(UserError, match="other prompts"):
        open_store(plain.path, expect_encoder=prompted.encoder_fingerprint)


# ---------------------------------------------------------------------------------------------
# train-live: each side encoded live after the store's prompts

LIVE = dict(preset="jepa", output_dim=8, projection_hidden=16, predictor_hidden=16, batch_size=4, epochs=2,
            device="cpu", lr=1e-3, grad_clip=0.0, seed=5)
STORE_PROMPTS = {"query": "search: ", "document": PROMPTS["document"]}  # the query side overrides the model's


def live(store, dataset, out, strategy, **kw):
    from jepa_cache.config import LiveConfig, TrainConfig
    from jepa_cache.live import train_live

    tcfg = TrainConfig(store=str(store.path), dataset=str(dataset), out=str(out), **LIVE)
    return train_live(LiveConfig(train=tcfg, strategy=strategy, **kw), log=quiet)


def texts(dataset):
    ds = BeirDataset(dataset.name, dataset)
    return read_queries(ds.queries_path)[1], read_corpus(ds.corpus_path)[1]


@pytest.mark.parametrize("include_prompt", [True, False], ids=["pooled-with-prompt", "pooling-excludes-prompt"])
def test_train_live_encodes_each_side_with_the_stores_prompts(include_prompt, tiny_model, tiny_beir, tmp_path):
    """The live sources give the store's vectors (= ST's encode with each side's prompt), so frozen-live and full
    (encoder at lr 0) follow cached training's trajectory on a prompted store."""
    import torch
    from sentence_transformers import SentenceTransformer

    from jepa_cache.config import TrainConfig
    from jepa_cache.encoder import load_encoder
    from jepa_cache.jepa_encoder import JEPAEncoder
    from jepa_cache.sources import EncoderSource, FrozenLiveSource, store_prompts
    from jepa_cache.train import train

    folder = with_prompts(tiny_model, tmp_path / "prompted", include_prompt=include_prompt)
    store = build(cfg(tiny_beir, folder, tmp_path / "s", query_prompt=STORE_PROMPTS["query"]), log=quiet)
    assert store_prompts(store) == STORE_PROMPTS
    queries, docs = texts(tiny_beir)
    st = SentenceTransformer(str(folder), device="cpu")
    kw = dict(batch_size=4, normalize_embeddings=True, convert_to_numpy=True)
    ref = {"queries": st.encode(queries, prompt=STORE_PROMPTS["query"], **kw), "corpus": st.encode_document(docs, **kw)}
    plain = {"queries": st.encode(queries, prompt="", **kw), "corpus": st.encode(docs, prompt="", **kw)}
    frozen = FrozenLiveSource(load_encoder(folder), queries, docs, 3, store_prompts(store))
    trainable = EncoderSource(JEPAEncoder(str(folder), freeze_base=False, base_dropout=False, device="cpu"),
                              queries, docs, store_prompts(store))
    for name, source in (("frozen-live", frozen), ("full", trainable)):
        with torch.no_grad():
            got = {"queries": source.queries(torch.arange(len(queries))).numpy(),
                   "corpus": source.documents(torch.arange(len(docs))).numpy()}
        for section in ("queries", "corpus"):
            assert np.abs(got[section] - store.section(section).vectors()).max() < 1e-5, (name, section)
            assert np.abs(got[section] - ref[section]).max() < 1e-5, (name, section)
            # the prompt reached the tokenizer
            assert np.abs(got[section] - plain[section]).max() > 1e-3, (name, section)

    cached = train(TrainConfig(store=str(store.path), dataset=str(tiny_beir), out=str(tmp_path / "cached"), **LIVE),
                   log=quiet)
    runs = {"frozen-live": live(store, tiny_beir, tmp_path / "frozen", "frozen-live"),
            "full": live(store, tiny_beir, tmp_path / "full", "full", encoder_lr=0.0, head_lr=LIVE["lr"],
                         encoder_dropout=False)}
    for name, run in runs.items():
        assert len(run.history) == len(cached.history) == 6
        for a, b in zip(cached.history, run.history):
            assert abs(a["loss"] - b["loss"]) < 1e-5, (name, a, b)
        assert json.loads((run.out / "live.json").read_text())["encoder"]["prompts"] == STORE_PROMPTS
    assert runs["frozen-live"].heads.encoder_fingerprint == store.encoder_fingerprint


@pytest.fixture(scope="module")
def prompted_full(tiny_model, tmp_path_factory):
    """A prompted model (and a default prompt for plain encode), its store with the query prompt overridden, and a
    full fine-tune on it (the encoder changes)."""
    from conftest import write_beir

    root = tmp_path_factory.mktemp("prompted-full")
    dataset = write_beir(root / "data" / "tiny")
    folder = with_prompts(tiny_model, root / "prompted", PROMPTS | {"topic": "topic: "}, default_prompt_name="topic")
    store = build(cfg(dataset, folder, root / "s", query_prompt=STORE_PROMPTS["query"]), log=quiet)
    return dataset, store, live(store, dataset, root / "full", "full", encoder_lr=1e-3)


def test_full_fine_tune_saves_an_encoder_with_the_stores_prompts_and_its_stores_evaluate(prompted_full, tmp_path):
    from sentence_transformers import SentenceTransformer

    from jepa_cache.config import EvalConfig
    from jepa_cache.evaluate import evaluate
    from jepa_cache.heads import load_heads

    dataset, store, full = prompted_full
    assert full.encoder_changed and weights_sha256(full.encoder) != store.provenance["encoder"]["weights_sha256"]
    saved = json.loads((full.encoder / "config_sentence_transformers.json").read_text())
    assert saved["prompts"]["topic"] == "topic: " and saved["default_prompt_name"] == "topic"  # the model's others stay
    assert default_prompts(full.encoder) == STORE_PROMPTS
    heads = load_heads(full.out)
    assert heads.meta["store"]["prompts"] == STORE_PROMPTS
    # build with the fine-tuned encoder's own prompts (what the pipeline does): its vectors are encode_query's and
    # encode_document's, and eval takes the heads with it
    own = build(cfg(dataset, full.encoder, tmp_path / "own"), log=quiet)
    assert own.provenance["encoder"]["prompts"] == STORE_PROMPTS
    assert own.encoder_fingerprint == heads.encoder_fingerprint
    st = SentenceTransformer(str(full.encoder), device="cpu")
    queries, docs = texts(dataset)
    kw = dict(batch_size=4, normalize_embeddings=True, convert_to_numpy=True)
    assert np.abs(st.encode_query(queries, **kw) - own.queries.vectors()).max() < 1e-5
    assert np.abs(st.encode_document(docs, **kw) - own.corpus.vectors()).max() < 1e-5
    result = evaluate(EvalConfig(datasets=[str(dataset)], store=str(own.path), heads=str(full.out),
                                 out=str(tmp_path / "eval")), log=quiet)
    assert 0 <= result["datasets"]["tiny"]["metrics"]["ndcg@10"] <= 1


def test_heads_trained_live_refuse_stores_of_other_prompts_in_one_line(prompted_full, tmp_path):
    from jepa_cache.config import EvalConfig
    from jepa_cache.evaluate import evaluate

    dataset, store, full = prompted_full
    frozen = live(store, dataset, tmp_path / "frozen", "frozen-live")
    base = store.provenance["encoder"]["path"]
    for heads, model in ((full.out, full.encoder), (frozen.out, base)):
        other = build(cfg(dataset, model, tmp_path / f"other-{heads.name}", query_prompt="", document_prompt=""),
                      log=quiet)
        with pytest.raises(UserError, match=r"encoded with prompts none, but these heads .* other prompts") as err:
            evaluate(EvalConfig(datasets=[str(dataset)], store=str(other.path), heads=str(heads),
                                out=str(tmp_path / "e")), log=quiet)
        assert "\n" not in str(err.value)
