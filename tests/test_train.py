"""Stage 2 on synthetic and tiny stores: outputs, determinism, gradients, failure modes, cached == live."""

import dataclasses
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
from jepa_cache.losses import JEPASIGRegLoss
from jepa_cache.distributed import World
from jepa_cache.config import DataConfig, LiveConfig, LossConfig, OptimConfig
from jepa_cache.live import resolve_live, train_live
from jepa_cache.loop import fit
from jepa_cache.pairs import PairIndex, Pairs, mine_negatives
from jepa_cache.presets import PRESETS
from jepa_cache.sources import CachedSource
from jepa_cache.resolve import build_criterion, build_heads, resolve_config
from jepa_cache.train import train

QUIET = dict(log=lambda s: None)


pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def tiny_store(synthetic_store):
    """40 documents and 12 queries, 16-d, with the ids of the tiny BEIR fixture (d0.., q0..)."""
    return synthetic_store(_unit(40, 16, 0), _unit(12, 16, 1))


def _cfg(store, tiny_beir, tmp_path, **kw):
    base = dict(store=str(store.path), dataset=str(tiny_beir), out=str(tmp_path / "heads"), preset="jepa", output_dim=8, batch_size=4,
                epochs=2, device="cpu", predictor_hidden=16, projection_hidden=16)
    return TrainConfig(**{**base, **kw})


def test_train_writes_heads_config_and_steps(tiny_store, tiny_beir, tmp_path):
    result = train(_cfg(tiny_store, tiny_beir, tmp_path), **QUIET)
    out = tmp_path / "heads"
    assert {p.name for p in out.iterdir()} >= {"heads.safetensors", "heads.json", "config.json", "steps.jsonl"}
    assert not list(out.glob(".*partial"))
    config = json.loads((out / "config.json").read_text())
    assert all(config[k] is not None for k in PRESETS["jepa"])  # every preset value resolved and recorded
    assert config["output_dim"] == 8 and config["lr"] == PRESETS["jepa"]["lr"]
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
    cfg = resolve_config(TrainConfig(store="", preset="jepa", output_dim=8, predictor_hidden=16))
    torch.manual_seed(0)
    heads = build_heads(cfg, 16, docs)
    before = {k: v.clone() for k, v in heads.state_dict().items()}
    source = CachedSource(queries, docs)
    z = heads(torch.cat([source.queries(index.q), source.documents(index.d)]))
    loss, _ = build_criterion(cfg.group(LossConfig), cfg.seed)(z[:4], z[4:], None, heads.predictor(z[:4]), positive_mask=index.positive_mask(index.q, index.d), step=0)
    loss.backward()
    assert all(p.grad is not None for p in heads.parameters())
    # (the residual predictor's inner layer gets zero gradient at step 0: its output layer starts at zero)
    assert heads.projection.weight.grad.abs().sum() > 0 and heads.predictor.branch[-1].weight.grad.abs().sum() > 0
    assert queries.grad is None and docs.grad is None and not queries.requires_grad
    optimizer = torch.optim.AdamW(heads.parameters(), lr=1e-3)
    fit(heads, build_criterion(cfg.group(LossConfig), 0), source, index, optimizer,
        dataclasses.replace(cfg.group(OptimConfig), epochs=2, batch_size=2), cfg.group(DataConfig), seed=0, log=lambda s: None)
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
    result = train(TrainConfig(store=str(store.path), pairs=str(pairs), out=str(tmp_path / "h"), preset="jepa", output_dim=dim, predictor="mlp",
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
        result = train(TrainConfig(store=str(tiny_store.path), preset="jepa", pairs=str(path), out=str(tmp_path / f"h-{path.suffix}-{contrastive}"),
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
        resolve_config(TrainConfig(store="", preset="jepa", predictor="none"))


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
                                      "--preset", "jepa", "--output-dim", "8", "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--no-stopgrad"])
    assert result.exit_code == 0, result.output
    assert "trainable parameters" in result.output and "epoch 1/1" in result.output
    assert json.loads((out / "config.json").read_text())["use_stopgrad"] is False
    # no preset named: `best`, at the store's width (16 here, 768 for mpnet, 384 for MiniLM)
    default = tmp_path / "default-heads"
    result = CliRunner().invoke(app, ["train-heads", "--store", str(tiny_store.path), "--dataset", str(tiny_beir), "--out", str(default),
                                      "--epochs", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    config = json.loads((default / "config.json").read_text())
    assert (config["preset"], config["projection"], config["output_dim"]) == ("best", "adapter", tiny_store.dim)
    assert load_heads(default).config.output_dim == tiny_store.dim
    assert load_heads(out).similarity == "cos"


@pytest.mark.parametrize("preset", ["jepa", "study"])
def test_cached_and_live_loops_give_the_same_trajectory(preset, tiny_model, tiny_beir, tmp_path):
    """Same seed, same batches, same SIGReg directions: only the source of the vectors differs."""
    from jepa_cache.build import build
    from jepa_cache.config import BuildConfig

    store = build(BuildConfig(dataset=str(tiny_beir), model=str(tiny_model), out=str(tmp_path / "store"), dtype="float32",
                              shard_rows=16, chunk_rows=8, batch_size=4), log=lambda s: None)
    common = dict(store=str(store.path), dataset=str(tiny_beir), preset=preset, output_dim=16, batch_size=4, epochs=7,
                  device="cpu", seed=3)
    cached = train(TrainConfig(**common, out=str(tmp_path / "cached")), **QUIET)
    live = train_live(LiveConfig(TrainConfig(**common, out=str(tmp_path / "live")), strategy="frozen-live",
                                 model=str(tiny_model), encode_batch_size=3), **QUIET)
    assert len(cached.history) == len(live.history) >= 20
    assert live.history[0]["loss"] == pytest.approx(cached.history[0]["loss"], abs=1e-6)
    for a, b in zip(cached.history, live.history):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
        for part in ("predictive", "contrastive", "isotropy", "reg"):
            assert abs(a[part] - b[part]) < 1e-4
    for (name, a), b in zip(cached.heads.state_dict().items(), live.heads.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), name
    assert live.heads.meta["training"]["live"] is True and cached.heads.meta["training"]["live"] is False


# ---------------------------------------------------------------------------------------------
# The `best` recipe's options: corpus/mined negatives, query epochs, the dev slice


def test_corpus_negatives_mask_every_other_positive_and_match_a_full_softmax():
    # query 0 has documents 1 and 4, query 1 has document 4, query 2 has document 0; a corpus of 6
    pairs = Pairs(np.array([0, 0, 1, 2]), np.array([1, 4, 4, 0]), None, "test")
    index = PairIndex.build(pairs, torch.device("cpu"), corpus_rows=6)
    assert index.doc_rows.tolist() == list(range(6)) and index.d.tolist() == [1, 4, 4, 0]  # local index == store row
    mask = index.positive_mask(index.q[:2], torch.arange(6))
    assert mask.tolist() == [[False, True, False, False, True, False]] * 2
    # the loss of the loop: candidates = batch positives + the corpus; expected: a softmax over the corpus in which
    # the target is kept and the query's other positives are removed
    gen = torch.Generator().manual_seed(0)
    zq, zc = torch.randn(2, 8, generator=gen), torch.randn(6, 8, generator=gen)
    criterion = JEPASIGRegLoss(0.0, 1.0, 0.0, temperature=0.1)
    bq, bd = index.q[:2], index.d[:2]  # (q0, d1) and (q0, d4)
    full_mask = index.positive_mask(bq, torch.cat([bd, torch.arange(6)]))
    loss, _ = criterion(zq[bq], zc[bd], None, None, positive_mask=full_mask, negatives=zc)
    logits = F.normalize(zq[bq], dim=1) @ F.normalize(zc, dim=1).T / 0.1
    expected = []
    for i, target in enumerate(bd.tolist()):
        keep = [j for j in range(6) if j == target or not mask[i, j]]
        expected.append(torch.logsumexp(logits[i, keep], 0) - logits[i, target])
    assert float(loss) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)


def test_corpus_negatives_count_each_document_once_in_the_denominator():
    """The loop's loss with the whole corpus as negatives equals a softmax over the corpus, each document once.

    The batch's documents are in the corpus too: (q1, d4) and (q2, d0) put d0 before q1's corpus and d4 before
    q2's, where a mask of positives alone would leave them twice.
    """
    from jepa_cache.loop import _candidates, _loss

    pairs = Pairs(np.array([0, 0, 1, 2]), np.array([1, 4, 4, 0]), None, "test")
    index = PairIndex.build(pairs, torch.device("cpu"), corpus_rows=6)
    gen = torch.Generator().manual_seed(0)
    zq, zc = torch.randn(3, 8, generator=gen), torch.randn(6, 8, generator=gen)
    cfg = resolve_config(TrainConfig(store="", preset="best", output_dim=8))
    heads = build_heads(cfg, 8, zc)  # the identity adapter: a uniform scale, the same cosines
    criterion = JEPASIGRegLoss(0.0, 1.0, 0.0, temperature=0.1)
    batch = torch.tensor([2, 3])
    cand, extra = _candidates(index, cfg.group(DataConfig), batch, None, gen)
    assert cand.tolist() == [4, 0] and extra.tolist() == list(range(6))
    loss, _ = _loss(heads, criterion, CachedSource(zq, zc), index, index.q[batch], cand, extra, 0, World())
    logits = F.normalize(zq, dim=1) @ F.normalize(zc, dim=1).T / 0.1
    expected = [torch.logsumexp(logits[q], 0) - logits[q, d] for q, d in ((1, 4), (2, 0))]  # q1, q2: one positive each
    assert float(loss) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)


def test_same_id_document_is_never_a_negative():
    pairs = Pairs(np.array([0, 1]), np.array([2, 3]), None, "test")
    index = PairIndex.build(pairs, torch.device("cpu"), corpus_rows=5, same_id={0: 4})
    assert index.positive_mask(index.q, torch.arange(5)).tolist() == [[False, False, True, False, True],
                                                                       [False, False, False, True, False]]


def test_query_epochs_visit_every_query_once_with_one_of_its_positives():
    q = np.repeat(np.arange(5), [1, 3, 10, 2, 1])
    d = np.arange(len(q)) + 100
    index = PairIndex.build(Pairs(q, d, None, "test"), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(60):
        order = index.epoch_order(gen, "queries")
        assert sorted(index.q[order].tolist()) == list(range(5))  # each query exactly once
        seen.update(order.tolist())
    assert seen == set(range(len(q)))  # every positive gets drawn in time
    assert index.items("queries") == 5 and index.items("pairs") == len(q)
    assert sorted(index.epoch_order(gen, "pairs").tolist()) == list(range(len(q)))


def test_mined_negatives_are_the_nearest_non_positives():
    docs = _unit(30, 16, 5)
    queries = torch.from_numpy(docs[:4] + 0.01)  # each query sits next to documents 0..3
    pairs = Pairs(np.array([0, 1, 1, 2, 3]), np.array([0, 1, 2, 2, 3]), None, "test")
    index = PairIndex.build(pairs, torch.device("cpu"), corpus_rows=30)
    cfg = resolve_config(TrainConfig(store="", preset="best", output_dim=16))
    heads = build_heads(cfg, 16, torch.from_numpy(docs))
    mined = mine_negatives(heads, CachedSource(queries, torch.from_numpy(docs)), index, k=5)
    assert mined.shape == (4, 5)
    scores = F.normalize(queries, dim=1) @ torch.from_numpy(docs).T
    for i in range(4):
        positives = set(index.d[index.q == i].tolist())
        assert not positives & set(mined[i].tolist())
        expected = [j for j in scores[i].argsort(descending=True).tolist() if j not in positives][:5]
        assert mined[i].tolist() == expected


def test_dev_slice_is_the_same_for_every_seed_and_disjoint_from_training():
    pairs = Pairs(np.repeat(np.arange(20), 2), np.arange(40), None, "test")
    train_part, dev_part = pairs.hold_out(0.25)
    assert len(np.unique(dev_part.query_rows)) == 5 and len(train_part) + len(dev_part) == 40
    assert not set(train_part.query_rows) & set(dev_part.query_rows)
    assert pairs.hold_out(0.25)[1].query_rows.tolist() == dev_part.query_rows.tolist()
    with pytest.raises(UserError, match="all"):
        Pairs(np.array([0]), np.array([0]), None, "test").hold_out(0.5)


def test_select_dev_restores_the_best_epoch_even_the_initial_heads(tiny_store):
    pairs = Pairs(np.arange(12), np.arange(12), None, "test")
    index = PairIndex.build(pairs, torch.device("cpu"))
    source = CachedSource(torch.from_numpy(tiny_store.queries.vectors(rows=index.query_rows)),
                          torch.from_numpy(tiny_store.corpus.vectors(rows=index.doc_rows)))
    cfg = resolve_config(TrainConfig(store="", preset="best", output_dim=16, predictor_hidden=16))
    for scores, kept in (([0.5, 0.4, 0.3, 0.2], 0), ([0.1, 0.3, 0.3, 0.2], 1)):
        torch.manual_seed(0)
        heads = build_heads(cfg, 16, source.documents(torch.arange(12)))
        states = []

        def dev(h, it=iter(scores)):
            states.append({k: v.clone() for k, v in h.state_dict().items()})
            return next(it)

        result = fit(heads, build_criterion(cfg.group(LossConfig), 0), source, index,
                     torch.optim.AdamW(heads.parameters(), lr=1e-2),
                     dataclasses.replace(cfg.group(OptimConfig), epochs=3, batch_size=4, warmup=0.0, grad_clip=0.0),
                     dataclasses.replace(cfg.group(DataConfig), negatives="batch", sampling="queries"),
                     seed=0, dev=dev, select="dev", log=lambda s: None)
        assert result.dev == scores and result.best_epoch == kept
        assert all(torch.equal(v, states[kept][k]) for k, v in heads.state_dict().items())
        assert not all(torch.equal(v, states[-1][k]) for k, v in heads.state_dict().items())


def test_identity_adapter_start_is_vanilla_exactly(synthetic_store, tiny_beir, tmp_path):
    """The `best` heads before any step retrieve exactly what vanilla retrieves: same run, same scores' order, same NDCG."""
    from jepa_cache.config import EvalConfig
    from jepa_cache.evaluate import evaluate
    from jepa_cache.heads import save_heads
    from jepa_cache.train import store_record

    store = synthetic_store(_unit(40, 16, 0), _unit(12, 16, 1), dataset="tiny")
    x_q, x_d = torch.from_numpy(store.queries.vectors()), torch.from_numpy(store.corpus.vectors())
    cfg = resolve_config(TrainConfig(store="", preset="best", output_dim=16, strategy="frozen-predictor", predictor="residual",
                                     predictor_hidden=16))
    heads = build_heads(cfg, 16, x_d)
    for tower in ("projection", "predictor"):
        assert torch.equal(F.normalize(heads.encode_queries(x_q, tower), dim=1), F.normalize(x_q, dim=1))
    assert torch.equal(F.normalize(heads.encode_documents(x_d), dim=1), F.normalize(x_d, dim=1))
    save_heads(heads, tmp_path / "h", {"store": store_record(store)})
    runs = {}
    for name, extra in (("vanilla", {}), ("heads", {"heads": str(tmp_path / "h")})):
        result = evaluate(EvalConfig(datasets=[str(tiny_beir)], store=str(store.path), out=str(tmp_path / name), **extra),
                          log=lambda s: None)
        runs[name] = (result["datasets"]["tiny"]["metrics"], pq.read_table(tmp_path / name / "tiny" / "run.parquet").to_pydict())
    assert runs["heads"][0] == runs["vanilla"][0]
    assert runs["heads"][1]["doc_id"] == runs["vanilla"][1]["doc_id"]


def test_best_preset_trains_with_a_dev_slice_and_refits(tiny_store, tiny_beir, tmp_path):
    result = train(_cfg(tiny_store, tiny_beir, tmp_path, preset="best", output_dim=16, epochs=3), **QUIET)
    cfg = result.config
    assert (cfg.projection, cfg.negatives, cfg.sampling, cfg.select, cfg.refit) == ("adapter", "corpus", "queries", "dev", True)
    assert (cfg.strategy, cfg.predictor) == ("frozen-isotropy", "none") and result.heads.predictor is None  # the preset's strategy
    dev = result.dev
    assert dev["queries"] == 1 and len(dev["ndcg@10"]) == 4 and 0 <= dev["best_epoch"] <= 3  # 6 train queries, 20% held out
    steps = [json.loads(line) for line in (tmp_path / "heads" / "steps.jsonl").read_text().splitlines()]
    fit_steps = [s for s in steps if s["phase"] == "fit"]
    refit_steps = [s for s in steps if s["phase"] == "refit"]
    assert len(fit_steps) == 3 * 2  # 5 queries, batch 4, 3 epochs
    assert len(refit_steps) == dev["best_epoch"] * 2  # 6 queries, batch 4
    meta = load_heads(tmp_path / "heads").meta["training"]
    assert meta["dev"] == dev and meta["pairs"] == 12
    for negatives in ("batch", "mined"):
        r = train(_cfg(tiny_store, tiny_beir, tmp_path / negatives, preset="best", output_dim=16, epochs=1, negatives=negatives,
                       mine_k=3), **QUIET)
        assert all(np.isfinite(s["loss"]) for s in r.history)


def test_new_options_are_checked():
    for kw, message in ((dict(negatives="all"), "--negatives"), (dict(sampling="query"), "--sampling"),
                        (dict(select="dev", dev_fraction=0.0), "dev slice"), (dict(refit=True, select="last"), "--refit"),
                        (dict(dev_fraction=1.0), "--dev-fraction"), 
                        (dict(corpus_negatives=-1), "--corpus-negatives"), (dict(adapt="nudge-m"), "--adapt"),
                        (dict(dev_fraction=0.0, select="last", refit=False), "--adapt none"),
                        (dict(similarity="l2"), "--similarity cos")):
        with pytest.raises(UserError, match=message):
            resolve_config(TrainConfig(store="", preset="best", **kw))
    with pytest.raises(UserError, match="cached training only"):
        resolve_live(LiveConfig(TrainConfig(store="", preset="best"), strategy="frozen-live"))
    with_predictor = resolve_config(TrainConfig(store="", preset="best", strategy="frozen-predictor"))  # best + the JEPA predictor
    assert (with_predictor.predictor, with_predictor.lambda_predictive, with_predictor.query_tower) == ("residual", 0.5, "projection")
    alone = resolve_config(TrainConfig(store="", preset="best"))
    assert (alone.strategy, alone.predictor, alone.lambda_predictive, alone.output_dim) == ("frozen-isotropy", "none", 0.0, 0)
    with pytest.raises(UserError, match="needs a predictor"):
        resolve_config(TrainConfig(store="", preset="best", strategy="frozen-predictor", predictor="none"))
    # the classic presets keep their behaviour: in-batch negatives, pair epochs, cosine schedule, no dev slice
    for preset in ("study",):
        cfg = resolve_config(TrainConfig(store="", preset=preset))
        assert (cfg.negatives, cfg.sampling, cfg.schedule, cfg.dev_fraction, cfg.refit) == ("batch", "pairs", "cosine", 0.0, False)


def test_interpolate_moves_the_trained_heads_back_towards_their_start(tiny_store, tiny_beir, tmp_path):
    common = dict(preset="best", output_dim=16, epochs=2, dev_fraction=0.0, select="last", refit=False, adapt="none")
    full = train(_cfg(tiny_store, tiny_beir, tmp_path / "full", **common), **QUIET).heads
    half = train(_cfg(tiny_store, tiny_beir, tmp_path / "half", interpolate=0.5, **common), **QUIET).heads
    assert full.projection.weight.abs().max() > 0
    assert torch.allclose(half.projection.weight, 0.5 * full.projection.weight, atol=1e-7)  # the adapter starts at W = 0
    assert torch.allclose(half.projection.bias, 0.5 * full.projection.bias, atol=1e-7)
    assert torch.equal(half.projection.scale, full.projection.scale)  # buffers that do not train stay put
    with pytest.raises(UserError, match="--interpolate"):
        resolve_config(TrainConfig(store="", interpolate=0.0))


def test_cli_train_heads_best_options(tiny_store, tiny_beir, tmp_path):
    from typer.testing import CliRunner

    from jepa_cache.cli import app

    out = tmp_path / "cli-best"
    result = CliRunner().invoke(app, ["train-heads", "--store", str(tiny_store.path), "--dataset", str(tiny_beir), "--out", str(out),
                                      "--preset", "best", "--output-dim", "16", "--epochs", "2", "--device", "cpu",
                                      "--negatives", "mined", "--mine-k", "3", "--no-refit", "--interpolate", "0.5", "--rank", "4"])
    assert result.exit_code == 0, result.output
    assert "dev NDCG@10 by epoch" in result.output and "adapter rank 4 projection" in result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["strategy"], config["negatives"], config["mine_k"], config["refit"], config["interpolate"], config["rank"]) == \
        ("frozen-isotropy", "mined", 3, False, 0.5, 4)
    assert load_heads(out).meta["training"]["dev"]["best_epoch"] in (0, 1, 2)


def test_help_shows_every_presets_value():
    """The per-preset defaults reach --help (rich would swallow them as markup if they were in brackets)."""
    from typer.testing import CliRunner

    from jepa_cache.cli import app

    result = CliRunner().invoke(app, ["train-heads", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    assert "(best: 0, jepa: 512, study: 512)" in text and "(every preset: 0.1)" in text


def test_training_on_the_scored_split_needs_allow_test_training(tmp_path):
    from jepa_cache.recipe import load_recipe

    with pytest.raises(UserError, match="--train-split test: that is the split eval scores"):
        resolve_config(TrainConfig(store="", train_split="test"))
    assert resolve_config(TrainConfig(store="", train_split="test", allow_test_training=True)).train_split == "test"
    assert resolve_config(TrainConfig(store="", train_split="test", pairs="p.jsonl")).pairs  # a pairs file: no split used
    recipe = tmp_path / "r.toml"
    body = 'name = "r"\n[train]\ndataset = "scifact"\nsplit = "test"\n{allow}[eval]\ndatasets = {datasets}\n' \
           '[[strategies]]\nname = "vanilla"\n'
    recipe.write_text(body.format(allow="", datasets='["nfcorpus", "scifact"]'))
    with pytest.raises(UserError, match="train.split = 'test' is the split eval scores on scifact"):
        load_recipe(recipe)
    recipe.write_text(body.format(allow="allow_test_training = true\n", datasets='["nfcorpus", "scifact"]'))
    assert load_recipe(recipe).allow_test_training
    recipe.write_text(body.format(allow="", datasets='["nfcorpus"]'))  # scifact's test split is not scored here
    assert load_recipe(recipe).train_split == "test"



def test_best_saves_corrections_refit_on_every_training_query(synthetic_store, tiny_beir, tmp_path):
    from jepa_cache.corrections import Corrections

    tiny_store = synthetic_store(_unit(40, 16, 0), _unit(12, 16, 1), dataset="tiny")
    from jepa_cache.datasets import read_qrels

    res = train(_cfg(tiny_store, tiny_beir, tmp_path / "h", preset="best", output_dim=16, epochs=1), **QUIET)
    corr = Corrections.load(res.out)
    qrels = read_qrels(tiny_beir / "qrels" / "train.tsv")
    assert corr.store_fingerprint == tiny_store.fingerprint and corr.heads_fingerprint == res.heads.fingerprint
    assert corr.labelled_queries == len(qrels)  # the refit: dev queries included
    assert sorted(corr.doc_ids) == sorted({d for docs in qrels.values() for d, r in docs.items() if r > 0})
    assert res.record["adapt"]["documents"] == len(corr.doc_ids) and corr.record["rule"] == "ndcg"
    assert np.allclose(np.linalg.norm(corr.vectors, axis=1), 1, atol=1e-5)
    from jepa_cache.config import EvalConfig
    from jepa_cache.evaluate import evaluate
    from jepa_cache.heads import load_heads

    assert load_heads(res.out).fingerprint == corr.heads_fingerprint  # the saved heads, not only the in-memory ones
    ev = evaluate(EvalConfig(datasets=[str(tiny_beir)], store=str(tiny_store.path), heads=str(res.out),
                             out=str(tmp_path / "ev")), log=lambda s: None)
    assert ev["datasets"]["tiny"]["corrections_applied"] == len(corr.doc_ids)
    again = train(_cfg(tiny_store, tiny_beir, tmp_path / "h", preset="best", output_dim=16, epochs=1, adapt="none",
                       overwrite=True), **QUIET)
    assert again.record["adapt"] is None and not (again.out / "corrections.json").exists()  # no stale set


def test_a_preset_wider_than_the_encoder_takes_its_width(tiny_store, tiny_beir, tmp_path):
    """jepa's PCA 768->512 on a narrower encoder (MiniLM's 384; here 16-d) uses the encoder's width."""
    res = train(_cfg(tiny_store, tiny_beir, tmp_path, output_dim=None, epochs=1), **QUIET)
    assert res.config.output_dim == 16 and res.heads.config.output_dim == 16
    with pytest.raises(UserError, match="--output-dim <= 16"):  # a width asked for explicitly is not changed
        train(_cfg(tiny_store, tiny_beir, tmp_path / "x", output_dim=32, epochs=1), **QUIET)
