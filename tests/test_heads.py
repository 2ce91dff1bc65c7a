"""Heads: the study's exact sizes, what each init keeps of the encoder's geometry, save/load without pickle."""

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jepa_cache.errors import UserError
from jepa_cache.heads import Heads, HeadsConfig, load_heads, save_heads


def _unit(n, d, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def _study(**kw):
    return HeadsConfig(projection="mlp", predictor="mlp", init="random", similarity="l2", **kw)


def test_study_preset_has_the_studys_parameter_counts():
    heads = Heads(_study())
    assert heads.parameter_counts() == {"projection": 1_968_128, "predictor": 1_050_112, "total": 3_018_240}
    # same layout as the study's nn.Sequential, so its state-dict keys line up
    assert set(heads.state_dict()) == {f"{m}.{i}.{p}" for m in ("projection", "predictor") for i in (0, 3) for p in ("weight", "bias")}


def test_identity_init_is_vanilla_retrieval():
    x = _unit(20, 32)
    heads = Heads(HeadsConfig(input_dim=32, output_dim=32, init="identity", predictor="residual"), x)
    z = heads.encode_documents(x)
    assert torch.allclose(F.normalize(z, dim=1), x, atol=1e-6)
    # scaled so the mean squared coordinate is 1 (SIGReg's scale); cos and L2 rankings are unchanged by it
    assert float(z.square().mean()) == pytest.approx(1.0, rel=1e-4)
    # the residual predictor starts as the identity, so the predictor tower is vanilla too
    assert torch.allclose(heads.encode_queries(x, tower="predictor"), z, atol=1e-6)


def test_orthogonal_init_keeps_inner_products_at_full_width():
    x = _unit(20, 32)
    heads = Heads(HeadsConfig(input_dim=32, output_dim=32, init="orthogonal"))
    z = F.normalize(heads.encode_documents(x), dim=1)
    assert torch.allclose(z @ z.T, x @ x.T, atol=1e-5)


def test_pca_init_keeps_the_documents_subspace():
    basis = torch.linalg.qr(torch.randn(32, 8))[0]  # documents living in an 8-d subspace of R^32
    docs = F.normalize(torch.randn(50, 8) @ basis.T, dim=1)
    heads = Heads(HeadsConfig(input_dim=32, output_dim=8, init="pca"), docs)
    z = F.normalize(heads.encode_documents(docs), dim=1)
    assert torch.allclose(z @ z.T, docs @ docs.T, atol=1e-5)  # 32 -> 8 loses nothing these documents have
    assert float(heads.encode_documents(docs).square().mean()) == pytest.approx(1.0, rel=1e-4)


def test_pca_keeps_more_than_a_random_projection():
    docs = F.normalize(torch.randn(300, 64) * torch.linspace(3, 0.1, 64), dim=1)  # anisotropic, like encoder vectors
    truth = docs @ docs.T

    def error(init):
        torch.manual_seed(0)
        z = F.normalize(Heads(HeadsConfig(input_dim=64, output_dim=16, init=init), docs).encode_documents(docs), dim=1)
        return float((z @ z.T - truth).abs().mean())

    assert error("pca") < 0.7 * min(error("orthogonal"), error("random"))


def test_residual_projection_starts_as_its_linear_map():
    x = _unit(10, 16)
    heads = Heads(HeadsConfig(input_dim=16, output_dim=16, projection="residual", projection_hidden=24, init="identity"), x)
    assert torch.allclose(F.normalize(heads.encode_documents(x), dim=1), x, atol=1e-6)


def test_inference_is_eval_mode_and_leaves_the_mode_alone():
    heads = Heads(_study(input_dim=16, output_dim=8, projection_hidden=32, predictor_hidden=16, dropout=0.5))
    x = _unit(6, 16)
    heads.train()
    a, b = heads.encode_queries(x), heads.encode_queries(x)
    assert torch.equal(a, b) and heads.training  # no dropout at inference; training mode restored
    assert not heads.encode_documents(x).requires_grad
    assert not torch.equal(heads(x), heads(x))  # the module itself, in training mode, does drop out


@pytest.mark.parametrize("bad, message", [
    (dict(init="identity", output_dim=16), "identity"),
    (dict(projection="mlp", init="pca"), "random init"),
    (dict(predictor="none", query_tower="predictor"), "predictor"),
    (dict(similarity="dot"), "similarity"),
    (dict(init="pca", output_dim=64), "output-dim"),
])
def test_bad_configs_are_user_errors(bad, message):
    with pytest.raises(UserError, match=message):
        Heads(HeadsConfig(**{"input_dim": 32, "output_dim": 32, **bad}), _unit(40, 32))


def test_save_load_round_trip(tmp_path):
    x = _unit(12, 32)
    heads = Heads(HeadsConfig(input_dim=32, output_dim=16, init="pca", similarity="cos", query_tower="predictor"), x)
    torch.nn.init.normal_(heads.predictor.branch[-1].weight)  # a non-trivial predictor
    meta = {"store": {"fingerprint": "f" * 64, "encoder_fingerprint": "e" * 64, "dataset": "tiny", "imported": True}}
    save_heads(heads, tmp_path / "h", meta)
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["heads.json", "heads.safetensors"]
    loaded = load_heads(tmp_path / "h")
    assert not loaded.training
    assert loaded.similarity == "cos" and loaded.config == heads.config
    assert loaded.encoder_fingerprint == "e" * 64 and loaded.store_fingerprint == "f" * 64
    assert loaded.fingerprint == heads.fingerprint != Heads(HeadsConfig(input_dim=32, output_dim=16, init="pca"), x).fingerprint
    assert loaded.meta["store"]["dataset"] == "tiny" and loaded.meta["store"]["imported"] is True
    for tower in ("projection", "predictor"):
        assert torch.equal(loaded.encode_queries(x, tower=tower), heads.encode_queries(x, tower=tower))
    assert torch.equal(loaded.encode_queries(x), heads.encode_queries(x, tower="predictor"))  # the config's tower
    assert torch.equal(load_heads(tmp_path / "h" / "heads.json").encode_documents(x), heads.encode_documents(x))
    record = json.loads((tmp_path / "h" / "heads.json").read_text())
    assert record["parameters"]["total"] == sum(p.numel() for p in heads.parameters())


def test_load_refuses_mismatched_or_foreign_files(tmp_path):
    heads = Heads(HeadsConfig(input_dim=8, output_dim=8, init="identity"))
    save_heads(heads, tmp_path / "h")
    weights = tmp_path / "h" / "heads.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(UserError, match="sha256"):
        load_heads(tmp_path / "h")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "heads.json").write_text('{"format": "something-else"}')
    with pytest.raises(UserError, match="not a jepa-cache heads"):
        load_heads(tmp_path / "other")
    with pytest.raises(UserError, match="missing: no such heads folder"):
        load_heads(tmp_path / "missing")


def test_no_predictor_tower_without_a_predictor():
    heads = Heads(HeadsConfig(input_dim=8, output_dim=8, init="identity", predictor="none"))
    assert heads.predictor is None and heads.parameter_counts()["predictor"] == 0
    with pytest.raises(UserError, match="no predictor"):
        heads.encode_queries(_unit(2, 8), tower="predictor")


def test_adapter_starts_bit_exactly_at_the_identity_and_saves():
    x = _unit(30, 32)
    heads = Heads(HeadsConfig(input_dim=32, output_dim=32, projection="adapter", init="identity", predictor="residual",
                              predictor_hidden=8), x)
    scale = float(heads.projection.scale)
    assert scale == 2.0 ** round(math.log2(32**0.5))  # SIGReg's scale, rounded to a power of two
    assert torch.equal(heads.encode_documents(x), scale * x)  # exact: no rounding anywhere
    assert torch.equal(F.normalize(heads.encode_queries(x, "predictor"), dim=1), F.normalize(x, dim=1))
    assert heads.parameter_counts()["projection"] == 32 * 32 + 32
    low = Heads(HeadsConfig(input_dim=32, output_dim=32, projection="adapter", init="identity", rank=4, predictor="none"), x)
    assert low.parameter_counts()["projection"] == 2 * 32 * 4 + 32
    assert torch.equal(low.encode_documents(x), float(low.projection.scale) * x)  # the up matrix starts at zero
    torch.nn.init.normal_(heads.projection.weight, std=0.1)
    with torch.no_grad():
        low.projection.up.normal_()
    for h in (heads, low):
        save_heads(h, Path(tempfile.mkdtemp()) / "h")
    for h in (heads, low):
        folder = Path(tempfile.mkdtemp()) / "h"
        save_heads(h, folder)
        assert torch.equal(load_heads(folder).encode_documents(x), h.encode_documents(x))


def test_weight_decay_pulls_the_adapter_back_to_the_identity():
    heads = Heads(HeadsConfig(input_dim=8, output_dim=8, projection="adapter", init="identity", predictor="none"))
    torch.nn.init.normal_(heads.projection.weight)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=0.1, weight_decay=5.0)
    for _ in range(50):
        optimizer.zero_grad()
        (0 * heads(torch.ones(1, 8)).sum()).backward()
        optimizer.step()
    assert heads.projection.weight.abs().max() < 1e-3  # W -> 0 is x -> x, not the zero map


@pytest.mark.parametrize("bad", [dict(projection="adapter", init="pca"), dict(projection="adapter", init="identity", output_dim=16),
                                 dict(projection="linear", rank=4), dict(projection="adapter", init="identity", rank=-1)])
def test_adapter_configs_that_cannot_start_at_the_identity(bad):
    with pytest.raises(UserError, match="adapter|rank"):
        Heads(HeadsConfig(**{"input_dim": 32, "output_dim": 32, **bad}), _unit(40, 32))
