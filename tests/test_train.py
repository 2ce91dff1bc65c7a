"""Stage 2 on synthetic and tiny stores: outputs, determinism, gradients, failure modes, cached == live."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from jepa_cache.config import TrainConfig
from jepa_cache.errors import UserError
from jepa_cache.heads import load_heads
from jepa_cache.train import PRESETS, CachedSource, PairIndex, Pairs, build_criterion, build_heads, fit, resolve_config, train

QUIET = dict(log=lambda s: None)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: a second OpenMP thread only adds synchronisation (badly so on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def tiny_store(synthetic_store):
    """40 documents and 12 queries, 16-d, with the ids of the tiny BEIR fixture (d0.., q0..)."""
    return synthetic_store(_unit(40, 16, 0), _unit(12, 16, 1))


def _cfg(store, tiny_beir, tmp_path, **kw):
    base = dict(store=str(store.path), dataset=str(tiny_beir), out=str(tmp_path / "heads"), output_dim=8, batch_size=4,
                epochs=2, device="cpu", predictor_hidden=16, projection_hidden=16)
    return TrainConfig(**{**base, **kw})


def test_train_writes_heads_config_and_steps(tiny_store, tiny_beir, tmp_path):
    result = train(_cfg(tiny_store, tiny_beir, tmp_path), **QUIET)
    out = tmp_path / "heads"
    assert {p.name for p in out.iterdir()} >= {"heads.safetensors", "heads.json", "config.json", "steps.jsonl"}
    assert not list(out.glob(".*partial"))
    config = json.loads((out / "config.json").read_text())
    assert all(config[k] is not None for k in PRESETS["default"])  # every preset value resolved and recorded
    assert config["output_dim"] == 8 and config["lr"] == PRESETS["default"]["lr"]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == len(result.history) == 2 * 3  # 12 train pairs, batch 4, 2 epochs
    for step in steps:
        assert {"step", "epoch", "loss", "predictive", "contrastive", "isotropy", "reg", "grad_norm", "lr"} <= set(step)
        assert step["loss"] == pytest.approx(step["predictive"] + step["contrastive"] + step["isotropy"] + step["reg"], rel=1e-5)
    heads = load_heads(out)
    assert heads.store_fingerprint == tiny_store.fingerprint
    assert heads.encoder_fingerprint == tiny_store.encoder_fingerprint
    assert heads.meta["store"]["dataset"] == "synthetic" and heads.meta["store"]["imported"] is True
    assert heads.meta["training"]["pairs"] == 12 and heads.meta["training"]["steps"] == 6
    x = torch.from_numpy(_unit(5, 16, 2))
    assert torch.equal(heads.encode_queries(x), result.heads.encode_queries(x))
    with pytest.raises(UserError, match="already holds heads"):
        train(_cfg(tiny_store, tiny_beir, tmp_path), **QUIET)


def test_deterministic_with_seed(tiny_store, tiny_beir, tmp_path):
    runs = [train(_cfg(tiny_store, tiny_beir, tmp_path / str(i), seed=seed), **QUIET).history for i, seed in enumerate((7, 7, 8))]
    assert runs[0] == runs[1]
    assert [r["loss"] for r in runs[0]] != [r["loss"] for r in runs[2]]


def test_only_head_parameters_receive_gradients(tiny_store):
    pairs = Pairs(np.array([0, 0, 1, 2]), np.array([3, 4, 5, 6]), None, "test")
    index = PairIndex.build(pairs, torch.device("cpu"))
    queries = torch.from_numpy(tiny_store.queries.vectors(rows=index.query_rows))
    docs = torch.from_numpy(tiny_store.corpus.vectors(rows=index.doc_rows))
    kept = queries.clone(), docs.clone()
    cfg = resolve_config(TrainConfig(store="", output_dim=8, predictor_hidden=16))
    torch.manual_seed(0)
    heads = build_heads(cfg, 16, docs)
    before = {k: v.clone() for k, v in heads.state_dict().items()}
    source = CachedSource(queries, docs)
    z = heads(torch.cat([source.queries(index.q), source.documents(index.d)]))
    loss, _ = build_criterion(cfg)(z[:4], z[4:], None, heads.predictor(z[:4]), positive_mask=index.positive_mask(index.q, index.d), step=0)
    loss.backward()
    assert all(p.grad is not None for p in heads.parameters())
    # (the residual predictor's inner layer gets zero gradient at step 0: its output layer starts at zero)
    assert heads.projection.weight.grad.abs().sum() > 0 and heads.predictor.branch[-1].weight.grad.abs().sum() > 0
    assert queries.grad is None and docs.grad is None and not queries.requires_grad
    optimizer = torch.optim.AdamW(heads.parameters(), lr=1e-3)
    fit(heads, build_criterion(cfg), source, index, optimizer, epochs=2, batch_size=2, seed=0, log=lambda s: None)
    assert torch.equal(queries, kept[0]) and torch.equal(docs, kept[1])
    assert any(not torch.equal(v, before[k]) for k, v in heads.state_dict().items())


def test_positive_mask_marks_duplicates_and_other_positives():
    # query 0 has documents 10 and 11; query 1 has document 11; document 12 is nobody's
    pairs = Pairs(np.array([0, 0, 1, 2]), np.array([10, 11, 11, 12]), None, "test")
    index = PairIndex.build(pairs, torch.device("cpu"))
    mask = index.positive_mask(index.q[:3], index.d)
    assert mask.tolist() == [[True, True, True, False], [True, True, True, False], [False, True, True, False]]


def test_a_fixed_linear_map_is_learned(synthetic_store, tmp_path):
    """Documents are a rotation of their queries: vanilla retrieval fails; the predictor learns the map."""
    n, dim = 128, 16
    queries = _unit(n, dim, 3)
    rotation = np.linalg.qr(np.random.default_rng(4).standard_normal((dim, dim)))[0].astype(np.float32)
    store = synthetic_store(queries @ rotation.T, queries)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query_id": f"q{i}", "doc_id": f"d{i}"}) + "\n" for i in range(n)))
    result = train(TrainConfig(store=str(store.path), pairs=str(pairs), out=str(tmp_path / "h"), output_dim=dim, predictor="mlp",
                               predictor_hidden=64, dropout=0.0, batch_size=64, epochs=30, lr=3e-3, device="cpu"), **QUIET)
    q, d = torch.from_numpy(queries), torch.from_numpy(store.corpus.vectors())
    vanilla = float(((q @ d.T).argmax(1) == torch.arange(n)).float().mean())
    heads = result.heads
    scores = F.normalize(heads.encode_queries(q, tower="predictor"), dim=1) @ F.normalize(heads.encode_documents(d), dim=1).T
    learned = float((scores.argmax(1) == torch.arange(n)).float().mean())
    assert vanilla < 0.2 and learned > 0.9, (vanilla, learned)
    assert result.history[-1]["predictive"] < 0.2 * result.history[0]["predictive"]


def test_pairs_and_triples_files(tiny_store, tmp_path):
    rows = [{"query_id": f"q{i}", "doc_id": f"d{i}", "negative_id": f"d{i + 20}"} for i in range(12)]
    jsonl = tmp_path / "triples.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("query_id", "doc_id")} for r in rows]), parquet)
    for path, contrastive in ((jsonl, "infonce"), (jsonl, "triplet"), (parquet, "infonce")):
        result = train(TrainConfig(store=str(tiny_store.path), pairs=str(path), out=str(tmp_path / f"h-{path.suffix}-{contrastive}"),
                                   contrastive=contrastive, output_dim=8, batch_size=4, epochs=1, device="cpu"), **QUIET)
        assert len(result.history) == 3 and all(np.isfinite(r["loss"]) for r in result.history)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query_id": "q0", "doc_id": "nope"}) + "\n")
    with pytest.raises(UserError, match="'nope'"):
        train(TrainConfig(store=str(tiny_store.path), pairs=str(bad), out=str(tmp_path / "x")), **QUIET)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"query_id": "q1", "doc_id": "d1"}) + "\n")
    with pytest.raises(UserError, match="line 2"):
        train(TrainConfig(store=str(tiny_store.path), pairs=str(mixed), out=str(tmp_path / "x")), **QUIET)


def test_qrels_id_missing_from_the_store_is_a_user_error(synthetic_store, tiny_beir, tmp_path):
    store = synthetic_store(_unit(10, 16, 0), _unit(12, 16, 1))  # d10..d39 of the qrels are absent
    with pytest.raises(UserError, match="not in the store corpus"):
        train(_cfg(store, tiny_beir, tmp_path), **QUIET)
    with pytest.raises(UserError, match="no qrels for split 'dev'"):
        train(_cfg(store, tiny_beir, tmp_path, train_split="dev"), **QUIET)


def test_non_finite_loss_stops_and_keeps_the_previous_heads(tiny_store, synthetic_store, tiny_beir, tmp_path):
    train(_cfg(tiny_store, tiny_beir, tmp_path), **QUIET)
    before = (tmp_path / "heads" / "heads.json").read_bytes(), (tmp_path / "heads" / "heads.safetensors").read_bytes()
    huge = synthetic_store(_unit(40, 16, 0) * 1e20, _unit(12, 16, 1) * 1e20)
    with pytest.raises(UserError, match=r"step 0 \(epoch 0\): (predictive|contrastive|isotropy|reg|loss) became"):
        train(_cfg(huge, tiny_beir, tmp_path, preset="study", overwrite=True), **QUIET)
    after = (tmp_path / "heads" / "heads.json").read_bytes(), (tmp_path / "heads" / "heads.safetensors").read_bytes()
    assert before == after
    assert (tmp_path / "heads" / "steps.failed.jsonl").exists()


def test_frozen_isotropy_trains_the_projection_only(tiny_store, tiny_beir, tmp_path):
    result = train(_cfg(tiny_store, tiny_beir, tmp_path, strategy="frozen-isotropy"), **QUIET)
    assert result.heads.predictor is None and all(r["predictive"] == 0 for r in result.history)
    with pytest.raises(UserError, match="projection only"):
        resolve_config(TrainConfig(store="", strategy="frozen-isotropy", predictor="mlp"))
    with pytest.raises(UserError, match="needs a predictor"):
        resolve_config(TrainConfig(store="", predictor="none"))


def test_study_preset_resolves_to_the_studys_settings():
    cfg = resolve_config(TrainConfig(store="", preset="study"))
    assert (cfg.projection, cfg.predictor, cfg.init, cfg.similarity) == ("mlp", "mlp", "random", "l2")
    assert (cfg.contrastive, cfg.isotropy, cfg.predictive) == ("triplet", "covariance", "mse")
    assert (cfg.lambda_predictive, cfg.lambda_contrastive, cfg.lambda_isotropy, cfg.lambda_reg) == (0.5, 0.1, 1.0, 0.0)
    assert (cfg.lr, cfg.weight_decay, cfg.epochs) == (5e-4, 0.01, 2)
    assert resolve_config(TrainConfig(store="", preset="study", lr=1e-3)).lr == 1e-3  # explicit values win


def test_cli_train_heads(tiny_store, tiny_beir, tmp_path):
    from typer.testing import CliRunner

    from jepa_cache.cli import app

    out = tmp_path / "cli-heads"
    result = CliRunner().invoke(app, ["train-heads", "--store", str(tiny_store.path), "--dataset", str(tiny_beir), "--out", str(out),
                                      "--output-dim", "8", "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--no-stopgrad"])
    assert result.exit_code == 0, result.output
    assert "trainable parameters" in result.output and "epoch 1/1" in result.output
    assert json.loads((out / "config.json").read_text())["use_stopgrad"] is False
    assert load_heads(out).similarity == "cos"


@pytest.mark.parametrize("preset", ["default", "study"])
def test_cached_and_live_loops_give_the_same_trajectory(preset, tiny_model, tiny_beir, tmp_path):
    """Same seed, same batches, same SIGReg directions: only the source of the vectors differs."""
    from jepa_cache.build import build
    from jepa_cache.config import BuildConfig

    store = build(BuildConfig(dataset=str(tiny_beir), model=str(tiny_model), out=str(tmp_path / "store"), dtype="float32",
                              shard_rows=16, chunk_rows=8, batch_size=4), log=lambda s: None)
    common = dict(store=str(store.path), dataset=str(tiny_beir), preset=preset, output_dim=16, batch_size=4, epochs=7,
                  device="cpu", seed=3)
    cached = train(TrainConfig(**common, out=str(tmp_path / "cached")), **QUIET)
    live = train(TrainConfig(**common, out=str(tmp_path / "live"), live=True, model=str(tiny_model), encode_batch_size=3), **QUIET)
    assert len(cached.history) == len(live.history) >= 20
    assert live.history[0]["loss"] == pytest.approx(cached.history[0]["loss"], abs=1e-6)
    for a, b in zip(cached.history, live.history):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
        for part in ("predictive", "contrastive", "isotropy", "reg"):
            assert abs(a[part] - b[part]) < 1e-4
    for (name, a), b in zip(cached.heads.state_dict().items(), live.heads.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), name
    assert live.heads.meta["training"]["live"] is True and cached.heads.meta["training"]["live"] is False
