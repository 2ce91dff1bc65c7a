"""Live-encoder mode on a tiny random encoder: full, hybrid and frozen-live, the study's API, round trips."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import write_beir
from jepa_cache.build import build
from jepa_cache.config import BuildConfig, EvalConfig, LiveConfig, TrainConfig
from jepa_cache.errors import UserError
from jepa_cache.heads import load_heads
from jepa_cache.live import JEPAEncoder, _save_encoder, train_live
from jepa_cache.models import weights_sha256
from jepa_cache.sources import NO_PROMPTS
from jepa_cache.store import open_store
from jepa_cache.train import train

QUIET = dict(log=lambda s: None)
SMALL = dict(preset="jepa", output_dim=8, projection_hidden=16, predictor_hidden=16, batch_size=4, epochs=2, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_built):
    return tiny_built


def _live(tiny, out, strategy, **kw):
    data, store = tiny
    train_kw = {k: kw.pop(k) for k in list(kw) if k in TrainConfig.__dataclass_fields__}
    tcfg = TrainConfig(store=str(store.path), dataset=str(data), out=str(out), **{**SMALL, **train_kw})
    return train_live(LiveConfig(train=tcfg, strategy=strategy, **kw), **QUIET)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_full_changes_the_encoder_and_frozen_live_does_not(tiny, tiny_model, tmp_path):
    full = _live(tiny, tmp_path / "full", "full", encoder_lr=1e-3)
    assert full.encoder_changed and full.encoder == tmp_path / "full" / "encoder"
    before, after = _weights(tiny_model), _weights(full.encoder)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    heads = load_heads(full.out)
    assert heads.encoder_fingerprint == weights_sha256(full.encoder) != tiny[1].encoder_fingerprint
    summary = json.loads((full.out / "live.json").read_text())
    assert summary["encoder"]["changed"] and summary["config"]["head_lr"] == 1e-3  # the study's heads rate
    assert summary["trainable_parameters"] > heads.parameter_counts()["total"]
    assert len((full.out / "steps.jsonl").read_text().splitlines()) == len(full.history) == 6

    frozen = _live(tiny, tmp_path / "frozen", "frozen-live")
    assert not frozen.encoder_changed and frozen.encoder == tiny_model
    assert not (tmp_path / "frozen" / "encoder").exists()
    assert weights_sha256(tiny_model) == tiny[1].encoder_fingerprint
    assert load_heads(frozen.out).encoder_fingerprint == tiny[1].encoder_fingerprint
    assert load_heads(frozen.out).meta["training"]["live"] is True
    with pytest.raises(UserError, match="already holds"):
        _live(tiny, tmp_path / "frozen", "frozen-live")


def test_full_with_encoder_lr_zero_and_no_dropout_equals_frozen_live(tiny, tmp_path):
    """Same seed, batches and heads rate; clipping off (full clips the encoder's gradients too)."""
    common = dict(lr=1e-3, grad_clip=0.0, epochs=3, seed=5)
    full = _live(tiny, tmp_path / "full", "full", encoder_lr=0.0, head_lr=1e-3, encoder_dropout=False, **common)
    frozen = _live(tiny, tmp_path / "frozen", "frozen-live", **common)
    assert len(full.history) == len(frozen.history) == 9
    for a, b in zip(full.history, frozen.history):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
    for (name, a), b in zip(full.heads.state_dict().items(), frozen.heads.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    assert torch.equal(_weights(full.encoder)["embeddings.word_embeddings.weight"],
                       _weights(frozen.encoder)["embeddings.word_embeddings.weight"])


def test_hybrid_phase1_is_train_heads(tiny, tmp_path):
    """With a dev split, phase 1 is train-heads on the same config; phase 2 runs when validation passes."""
    data, store = tiny
    with_dev = tmp_path / "dev-data" / "tiny"
    shutil.copytree(data, with_dev)
    (with_dev / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq7\td3\t1\nq8\td5\t1\n")
    tiny_dev = (with_dev, store)
    hybrid = _live(tiny_dev, tmp_path / "hybrid", "hybrid", threshold=0.0, seed=3)
    reference = train(TrainConfig(store=str(store.path), dataset=str(with_dev), out=str(tmp_path / "heads"), seed=3, **SMALL), **QUIET)
    phase1 = load_heads(hybrid.out / "phase1")
    for (name, a), b in zip(phase1.state_dict().items(), reference.heads.state_dict().values()):
        assert torch.equal(a, b), name
    assert hybrid.validation["from"].startswith("tiny/dev") and hybrid.validation["queries"] == 2
    assert hybrid.validation["phase2"] and hybrid.encoder_changed
    assert len(hybrid.history) == 2 * len(reference.history)  # phase 1 then phase 2, numbered on
    assert [r["step"] for r in hybrid.history] == list(range(len(hybrid.history)))
    assert hybrid.history[: len(reference.history)] == reference.history
    assert hybrid.config.head_lr == reference.config.lr  # phase 2's heads go on at phase 1's rate by default
    assert load_heads(hybrid.out).encoder_fingerprint == weights_sha256(hybrid.encoder)


def test_hybrid_holds_out_training_queries_without_dev_and_can_stop_after_phase1(tiny, tmp_path):
    data, store = tiny
    hybrid = _live(tiny, tmp_path / "hybrid", "hybrid", threshold=1.01, val_fraction=0.34)
    val = hybrid.validation
    assert val["queries"] == 2 and "held out" in val["from"] and not val["phase2"]
    assert not hybrid.encoder_changed and not (hybrid.out / "encoder").exists()
    pairs = [json.loads(line) for line in (hybrid.out / "phase1-pairs.jsonl").read_text().splitlines()]
    trained_queries = {p["query_id"] for p in pairs}
    assert len(trained_queries) == 4 and len(pairs) == 8  # 6 training queries with 2 positives each, 2 held out
    config = json.loads((hybrid.out / "phase1" / "config.json").read_text())
    assert config["pairs"] == str(hybrid.out / "phase1-pairs.jsonl")
    reference = train(TrainConfig(store=str(store.path), dataset=str(data), pairs=config["pairs"], out=str(tmp_path / "h"), **SMALL), **QUIET)
    for a, b in zip(hybrid.heads.state_dict().values(), reference.heads.state_dict().values()):
        assert torch.equal(a, b)
    assert load_heads(hybrid.out).encoder_fingerprint == store.encoder_fingerprint
    again = _live(tiny, tmp_path / "again", "hybrid", threshold=1.01, val_fraction=0.34, seed=9)
    assert (again.out / "phase1-pairs.jsonl").read_text() == (hybrid.out / "phase1-pairs.jsonl").read_text()  # nor with the seed
    with pytest.raises(UserError, match="hold out all"):
        _live(tiny, tmp_path / "x", "hybrid", val_fraction=0.99)


def test_fine_tuned_encoder_reloads_and_round_trips_through_build_and_eval(tiny, tiny_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    from jepa_cache.evaluate import evaluate

    data, store = tiny
    model = JEPAEncoder(str(tiny_model), output_dim=8, freeze_base=False, device="cpu")
    optimizer = torch.optim.AdamW(model.param_groups(1e-2, 1e-3, 0.0))
    texts = ["protein cell gene", "vitamin cancer heart blood brain diet", "sleep"]
    model.train()
    model(texts).square().mean().backward()
    optimizer.step()
    model.eval()
    folder, sha = _save_encoder(model, tmp_path, NO_PROMPTS)
    reloaded = SentenceTransformer(str(folder), device="cpu").encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    with torch.no_grad():
        np.testing.assert_allclose(reloaded, model.embed(texts).numpy(), atol=1e-5)
    assert sha != weights_sha256(tiny_model)

    full = _live(tiny, tmp_path / "full", "full", encoder_lr=1e-3)
    new_store = build(BuildConfig(dataset=str(data), model=str(full.encoder), out=str(tmp_path / "new-store"), dtype="float32",
                                  shard_rows=16, chunk_rows=8), **QUIET)
    assert new_store.encoder_fingerprint == load_heads(full.out).encoder_fingerprint
    result = evaluate(EvalConfig(datasets=[str(data)], store=str(new_store.path), heads=str(full.out), out=str(tmp_path / "eval")), **QUIET)
    assert 0 <= result["datasets"]["tiny"]["metrics"]["ndcg@10"] <= 1
    with pytest.raises(UserError, match="trained on encoder"):
        evaluate(EvalConfig(datasets=[str(data)], store=str(store.path), heads=str(full.out), out=str(tmp_path / "eval2")), **QUIET)


STUDY_SCRIPT = """
import torch
from jepa_cache import GaussianEmbeddingGemma, JEPASIGRegLoss

model = GaussianEmbeddingGemma(base_model='sentence-transformers/all-mpnet-base-v2', output_dim=512,
                               freeze_base=FREEZE, use_predictor=True)
optimizer = torch.optim.AdamW([
    {'params': model.base.parameters(), 'lr': 2e-5},
    {'params': model.projection.parameters(), 'lr': 1e-3},
    {'params': model.predictor.parameters(), 'lr': 1e-3},
], weight_decay=0.01)
criterion = JEPASIGRegLoss(lambda_predictive=0.5, lambda_contrastive=0.1, lambda_isotropy=1.0, lambda_reg=0.0, use_stopgrad=True)
queries = ["what does vitamin d do", "sleep and the immune system", "gene therapy risk", "heart disease diet"]
docs = ["vitamin d regulates calcium", "sleep supports immune function", "gene therapy trials report risk", "diet and heart"]
model.train()
for step in range(2):
    query_emb = model(queries)
    doc_emb = model(docs)
    predicted = model.predictor(query_emb)
    loss, parts = criterion(query_emb, doc_emb, predicted_pos=predicted)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
"""


@pytest.mark.parametrize("freeze", [True, False])
def test_the_studys_script_runs_unchanged(freeze, tiny_model, tmp_path, monkeypatch):
    """The study's names resolve to the tiny encoder through JEPA_CACHE_MODELS; the script is theirs."""
    models = tmp_path / "models"
    shutil.copytree(tiny_model, models / "all-mpnet-base-v2")
    monkeypatch.setenv("JEPA_CACHE_MODELS", str(models))
    scope: dict = {}
    exec(STUDY_SCRIPT.replace("FREEZE", str(freeze)), scope)
    model, parts = scope["model"], scope["parts"]
    assert set(parts) == {"predictive", "contrastive", "isotropy", "reg"}
    assert model.base.training is not freeze  # a frozen encoder stays in eval mode
    base_before = _weights(models / "all-mpnet-base-v2")
    after = model.base[0].auto_model.state_dict()
    assert base_before.keys() <= after.keys()
    assert any(not torch.equal(after[k], v) for k, v in base_before.items()) is not freeze
    assert all(p.grad is None for p in model.base.parameters()) is freeze
    assert model.projection[0].weight.grad is not None and model.predictor[0].weight.grad is not None
    assert model(["one text"]).shape == (1, 512) and model.encode(["one text"], convert_to_numpy=True).shape == (1, 512)
    from jepa_cache import JEPAEncoder as primary

    assert type(model) is primary


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    texts = ["protein cell gene vitamin", "cancer", "heart blood brain diet sleep virus"]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = JEPAEncoder(str(tiny_model), output_dim=8, freeze_base=False, base_dropout=False,
                            gradient_checkpointing=checkpointing, device="cpu")
        model.train()
        model(texts).square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.base.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6), k


def test_cli_train_live(tiny, tmp_path):
    from typer.testing import CliRunner

    from jepa_cache.cli import app

    data, store = tiny
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["train-live", "--strategy", "full", "--store", str(store.path), "--dataset", str(data),
                                      "--out", str(out), "--max-pairs", "6", "--output-dim", "8", "--batch-size", "3",
                                      "--epochs", "1", "--no-dropout", "--gradient-checkpointing", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "live.json").read_text())
    assert summary["steps"] == 2 and summary["config"]["encoder_dropout"] is False
    assert summary["config"]["gradient_checkpointing"] is True and summary["config"]["train"]["max_pairs"] == 6
    assert (out / "encoder" / "modules.json").is_file()
    bad = CliRunner().invoke(app, ["train-live", "--strategy", "sideways", "--store", str(store.path)])
    assert bad.exit_code != 0 and "choose one of full, hybrid, frozen-live" in str(bad.exception)


def test_pipeline_runs_the_live_strategies(tiny_model, tmp_path, monkeypatch):
    """A recipe with full and hybrid: train-live, stores built by each fine-tuned encoder, eval, report; then all reused."""
    from jepa_cache.pipeline import Runner
    from jepa_cache.recipe import load_recipe

    monkeypatch.chdir(tmp_path)  # the base store goes to data/cache/ under the working directory
    write_beir(tmp_path / "beir" / "tiny")
    write_beir(tmp_path / "beir" / "other", n_docs=30, n_queries=8, seed=4)
    heads = 'output_dim = 8, projection_hidden = 16, predictor_hidden = 16, batch_size = 4, epochs = 1'
    recipe = tmp_path / "live.toml"
    recipe.write_text(f"""
name = "tiny-live"
model = "{tiny_model}"
vectors = "build"
data_dir = "{tmp_path / 'beir'}"
[train]
dataset = "tiny"
[eval]
datasets = ["tiny", "other"]
[[strategies]]
name = "vanilla"
[[strategies]]
name = "nudge"
[[strategies]]
name = "full"
options = {{ {heads}, encoder_lr = 1e-3, encoder_dropout = false }}
[[strategies]]
name = "hybrid"
preset = "jepa"
options = {{ {heads}, threshold = 0.0 }}
[[strategies]]
name = "hybrid-stopped"
strategy = "hybrid"
preset = "jepa"
options = {{ {heads}, threshold = 1.01 }}
""")
    summary = Runner(load_recipe(recipe), runs_dir=tmp_path / "runs", **QUIET).run()
    runs = {(r["name"], r["dataset"]): r for r in summary["runs"]}
    assert len(runs) == 10
    # NUDGE-N's corrections apply to the training store only: elsewhere it is vanilla
    assert runs[("nudge", "tiny")]["corrected_docs"] > 0
    assert runs[("nudge", "other")]["metrics"] == runs[("vanilla", "other")]["metrics"]
    full = json.loads((tmp_path / "runs" / "tiny-live" / "live").glob("full-s0-*/live.json").__next__().read_text())
    assert full["encoder"]["changed"]
    stores = tmp_path / "runs" / "tiny-live" / "stores"
    assert sorted(p.name for p in stores.iterdir()) == ["other", "tiny"]
    assert len(list((stores / "tiny").glob("[!.]*"))) == 2  # one per changed encoder: full and hybrid
    assert runs[("full", "tiny")]["trainable_params"] > runs[("hybrid-stopped", "tiny")]["trainable_params"] > 0
    # the spectrum of `full` is of its own encoder's documents through its heads, not of the base store's
    own = open_store(runs[("full", "tiny")]["store"]).corpus.vectors(np.float32)
    with torch.no_grad():
        projected = load_heads(runs[("full", "tiny")]["heads"]).encode_documents(torch.from_numpy(own)).numpy()
    centred = projected - projected.mean(0)
    eig = np.linalg.svd(centred.astype(np.float64), compute_uv=False) ** 2
    p = eig / eig.sum()
    assert summary["effective_rank"]["full"] == pytest.approx(float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())), rel=1e-6)
    again = Runner(load_recipe(recipe), runs_dir=tmp_path / "runs", **QUIET)
    again.run()
    assert again.computed == 0
    recipe.write_text(recipe.read_text().replace("encoder_dropout = false", "encoder_nonsense = 1"))
    with pytest.raises(UserError, match="encoder_nonsense"):
        load_recipe(recipe)


def test_live_options_are_checked():
    from jepa_cache.live import resolve_live

    full = resolve_live(LiveConfig(train=TrainConfig(store="", preset="jepa"), strategy="full"))
    hybrid = resolve_live(LiveConfig(train=TrainConfig(store="", preset="jepa"), strategy="hybrid"))
    assert (full.head_lr, hybrid.head_lr, hybrid.phase2_epochs) == (1e-3, hybrid.train.lr, hybrid.train.epochs)
    with pytest.raises(UserError, match="in-batch negatives"):
        resolve_live(LiveConfig(train=TrainConfig(store="", preset="best"), strategy="full"))
    resolve_live(LiveConfig(train=TrainConfig(store="", preset="best"), strategy="hybrid"))  # phase 1 takes them
    for bad in (dict(head_lr=0.0), dict(encoder_lr=-1.0), dict(val_fraction=1.0), dict(phase2_epochs=0)):
        with pytest.raises(UserError):
            resolve_live(LiveConfig(train=TrainConfig(store="", preset="jepa"), strategy="hybrid", **bad))


def test_hybrid_takes_the_best_preset(tiny, tmp_path):
    """A recipe's hybrid row defaults to `best`: phase 1 is best (corpus negatives, dev slice, refit) on the cache,
    then phase 2 trains the encoder with those heads."""
    data, store = tiny
    tcfg = TrainConfig(store=str(store.path), dataset=str(data), out=str(tmp_path / "hybrid"), preset="best", epochs=2,
                       batch_size=4, device="cpu")
    hybrid = train_live(LiveConfig(train=tcfg, strategy="hybrid", threshold=0.0, val_fraction=0.34), **QUIET)
    phase1 = json.loads((hybrid.out / "phase1" / "config.json").read_text())
    assert (phase1["preset"], phase1["negatives"], phase1["refit"]) == ("best", "corpus", True)
    assert hybrid.validation["phase2"] and hybrid.encoder_changed
    assert load_heads(hybrid.out).config.output_dim == store.dim  # best's width: the encoder's
