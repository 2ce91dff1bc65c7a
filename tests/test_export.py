"""Export round trip: the exported folder is plain sentence-transformers (no remote code, no pickle) and encodes as eval scores."""

import json
import pickle

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from conftest import minilm_folder
from jepa_cache.config import TrainConfig
from jepa_cache.datasets import corpus_text, find_dataset, iter_records, query_text
from jepa_cache.export import EXPORT_FILE
from jepa_cache.heads import load_heads
from jepa_cache.search import prepare
from jepa_cache.train import train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tiny_built):
    """The shared tiny float32 store, and the dataset it came from."""
    data, built = tiny_built
    return built, find_dataset(str(data))


def _train(store, out, **kw):
    built, dataset = store
    cfg = TrainConfig(store=str(built.path), dataset=str(dataset.root), out=str(out), batch_size=4, epochs=2, device="cpu",
                      projection_hidden=16, predictor_hidden=16, **{"preset": "jepa", **kw})
    train(cfg, log=lambda s: None)
    return out


def _texts(path, text_of):
    return [text for _, _, text in iter_records(path, text_of)]


# Every head architecture of heads.py: jepa (linear projection + residual predictor, cos); study (MLP + MLP, raw L2);
# best (the identity-started adapter, whose fixed scale is a buffer that must travel too; and with the predictor);
# a residual projection; a low-rank adapter.
@pytest.mark.parametrize("preset,kw", [
    ("jepa", dict(output_dim=16)),
    ("study", dict(output_dim=16)),
    ("best", dict(output_dim=32)),
    ("best", dict(output_dim=32, strategy="frozen-predictor", predictor="residual")),
    ("jepa", dict(output_dim=16, projection="residual")),
    ("best", dict(output_dim=32, rank=4)),
])
def test_exported_model_encodes_as_eval_does(preset, kw, store, tmp_path, cli):
    heads_dir = _train(store, tmp_path / "heads", preset=preset, **kw)
    heads = load_heads(heads_dir)
    built, dataset = store
    docs, queries = _texts(dataset.corpus_path, corpus_text), _texts(dataset.queries_path, query_text)
    # what eval indexes and searches: store vectors -> heads -> normalised for cos, raw for l2
    want_docs = prepare(heads.encode_documents(torch.from_numpy(built.corpus.vectors())).numpy(), heads.similarity)
    encoded = {}
    towers = ("projection", "predictor") if heads.predictor is not None else ("projection",)
    for tower in towers:
        out = tmp_path / f"st-{tower}"
        code, err = cli(["export", "--heads", str(heads_dir), "--out", str(out), "--query-tower", tower])
        assert code == 0, err
        model = SentenceTransformer(str(out), trust_remote_code=False, device="cpu")
        want_queries = prepare(heads.encode_queries(torch.from_numpy(built.queries.vectors()), tower).numpy(), heads.similarity)
        encoded[tower] = model.encode_query(queries, batch_size=5)
        np.testing.assert_allclose(encoded[tower], want_queries, rtol=0, atol=1e-5)
        np.testing.assert_allclose(model.encode_document(docs, batch_size=7), want_docs, rtol=0, atol=1e-5)
        np.testing.assert_allclose(model.encode(docs[:3]), want_docs[:3], rtol=0, atol=1e-5)  # no task: the document route
    norms = np.linalg.norm(encoded["projection"], axis=1)
    assert np.allclose(norms, 1, atol=1e-5) == (heads.similarity == "cos")
    if "predictor" in encoded and preset != "best":
        assert not np.allclose(encoded["projection"], encoded["predictor"], atol=1e-4)  # the routes really differ


def test_export_uses_only_sentence_transformers_modules(store, tmp_path, cli):
    heads_dir = _train(store, tmp_path / "heads", output_dim=16)
    out = tmp_path / "st"
    assert cli(["export", "--heads", str(heads_dir), "--out", str(out), "--query-tower", "predictor"])[0] == 0
    types = {m["type"] for m in json.loads((out / "modules.json").read_text())}
    types |= set(json.loads((out / "3_Router" / "router_config.json").read_text())["types"].values())
    assert all(t.startswith("sentence_transformers.") for t in types), types
    assert "jepa_cache" not in "".join(p.read_text() for p in out.rglob("*.json") if p.name != EXPORT_FILE)


def test_export_writes_corpus_vectors(store, tmp_path, cli):
    import pyarrow.parquet as pq

    built, _ = store
    heads_dir = _train(store, tmp_path / "heads", preset="best", output_dim=32)
    out = tmp_path / "st"
    code, err = cli(["export", "--heads", str(heads_dir), "--out", str(out), "--store", str(built.path)])
    assert code == 0, err
    table = pq.read_table(out / "corpus_vectors.parquet")
    heads = load_heads(heads_dir)
    want = prepare(heads.encode_documents(torch.from_numpy(built.corpus.vectors())).numpy(), heads.similarity)
    assert table.column("id").to_pylist() == built.corpus.ids
    np.testing.assert_allclose(np.array(table.column("vector").to_pylist(), dtype=np.float32), want, rtol=0, atol=1e-6)


def test_mteb_loads_the_export(store, tmp_path, cli):
    """MTEB's sentence-transformers wrapper loads the folder and encodes through the query and document routes.

    (`mteb.get_model` takes registry or hub names only, not a local folder; the wrapper is what it uses for them.)
    """
    mteb = pytest.importorskip("mteb")
    from datasets import Dataset
    from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper
    from mteb.types import PromptType
    from torch.utils.data import DataLoader

    heads_dir = _train(store, tmp_path / "heads", output_dim=16)
    out = tmp_path / "st"
    assert cli(["export", "--heads", str(heads_dir), "--out", str(out), "--query-tower", "predictor"])[0] == 0
    wrapper = SentenceTransformerEncoderWrapper(str(out), device="cpu")
    built, dataset = store
    heads = load_heads(heads_dir)
    n = 4
    texts = {PromptType.query: _texts(dataset.queries_path, query_text)[:n], PromptType.document: _texts(dataset.corpus_path, corpus_text)[:n]}
    want = {PromptType.query: heads.encode_queries(torch.from_numpy(built.queries.vectors()[:n]), "predictor"),
            PromptType.document: heads.encode_documents(torch.from_numpy(built.corpus.vectors()[:n]))}
    metadata = mteb.get_task("SciFact").metadata
    for kind in (PromptType.query, PromptType.document):
        loader = DataLoader(Dataset.from_dict({"text": texts[kind]}), batch_size=3)
        got = wrapper.encode(loader, task_metadata=metadata, hf_split="test", hf_subset="default", prompt_type=kind)
        np.testing.assert_allclose(got, prepare(want[kind].numpy(), heads.similarity), rtol=0, atol=1e-5)


def test_export_loads_without_pickle(store, tmp_path, cli, monkeypatch):
    heads_dir = _train(store, tmp_path / "heads", output_dim=16)
    out = tmp_path / "st"
    assert cli(["export", "--heads", str(heads_dir), "--out", str(out), "--query-tower", "predictor"])[0] == 0
    assert (out / EXPORT_FILE).is_file()
    weights = [p for p in out.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".pkl")]
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling while loading an exported model")

    for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(target, name, refuse)
    model = SentenceTransformer(str(out), trust_remote_code=False, device="cpu")
    assert model.encode_query(["protein cell"]).shape == (1, 16)


def test_export_refuses_what_eval_would_refuse(store, tmp_path, cli):
    no_predictor = _train(store, tmp_path / "iso", strategy="frozen-isotropy", output_dim=16)
    code, err = cli(["export", "--heads", str(no_predictor), "--out", str(tmp_path / "a"), "--query-tower", "predictor"])
    assert code == 2 and "no predictor" in err
    code, err = cli(["export", "--heads", str(no_predictor), "--out", str(tmp_path / "b"), "--model", str(minilm_folder())])
    assert code == 2 and "differ from the encoder these heads were trained on" in err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    code, err = cli(["export", "--heads", str(no_predictor), "--out", str(tmp_path / "c")])
    assert code == 2 and "--overwrite" in err
    assert cli(["export", "--heads", str(no_predictor), "--out", str(tmp_path / "c"), "--overwrite"])[0] == 0
    assert not (tmp_path / "c" / "keep.txt").exists() and (tmp_path / "c" / "modules.json").is_file()
    (tmp_path / "d").write_text("a file")
    code, err = cli(["export", "--heads", str(no_predictor), "--out", str(tmp_path / "d"), "--overwrite"])
    assert code == 2 and "is a file" in err and (tmp_path / "d").read_text() == "a file"
