"""The loss terms against their definitions: SIGReg's Gaussian value, masking, stop-gradient, parts."""

import math

import pytest
import torch
import torch.nn.functional as F

from jepa_cache.losses import (
    JEPASIGRegLoss,
    _EppsPulley,
    covariance_isotropy,
    epps_pulley,
    epps_pulley_quadrature,
    gaussian_expectation,
    info_nce,
    random_directions,
    sigreg,
    triplet,
)


def _sigreg(x, seed=0, directions=256):
    return float(sigreg(x, random_directions(x.shape[1], directions, seed)))


def test_quadrature_is_the_symmetric_trapezoid():
    t, weights, phi = epps_pulley_quadrature(17, 3.0)
    assert t[0] == 0 and t[-1] == 3 and len(t) == 17
    # ∫_{-3}^{3} e^{-t²/2} dt by the rule, against the exact value sqrt(2π)·erf(3/√2)
    assert float(weights.sum()) == pytest.approx(math.sqrt(2 * math.pi) * math.erf(3 / math.sqrt(2)), rel=1e-3)
    assert torch.allclose(phi, torch.exp(-t**2 / 2))
    # E[statistic] for Gaussian samples: ∫(1 − e^{−t²}) e^{−t²/2} = √(2π) − √(2π/3) ≈ 1.059, less the tails beyond ±3
    assert gaussian_expectation() == pytest.approx(math.sqrt(2 * math.pi) - math.sqrt(2 * math.pi / 3), abs=0.01)


def test_sigreg_is_near_its_gaussian_value_for_gaussian_samples():
    gen = torch.Generator().manual_seed(0)
    for n in (256, 1024):
        value = _sigreg(torch.randn(n, 128, generator=gen))
        assert value == pytest.approx(gaussian_expectation(), rel=0.2), n


def test_sigreg_is_far_above_it_for_collapsed_low_rank_and_unit_sphere_batches():
    gen = torch.Generator().manual_seed(1)
    n, d = 512, 128
    gauss = gaussian_expectation()
    collapsed = torch.randn(1, d, generator=gen).expand(n, d)
    low_rank = torch.randn(n, 2, generator=gen) @ torch.randn(2, d, generator=gen)
    sphere = F.normalize(torch.randn(n, d, generator=gen), dim=1)
    for name, x in (("collapsed", collapsed), ("low-rank", low_rank), ("unit sphere", sphere)):
        assert _sigreg(x) > 20 * gauss, name
    # the unit sphere scaled by sqrt(d) is close to N(0, I) in high dimension: near the Gaussian value again
    assert _sigreg(sphere * math.sqrt(d)) < 1.5 * gauss


def test_statistic_grows_with_batch_size_but_per_sample_value_does_not():
    gen = torch.Generator().manual_seed(2)
    small, large = (F.normalize(torch.randn(n, 256, generator=gen), dim=1) for n in (128, 1024))
    assert _sigreg(large) / _sigreg(small) == pytest.approx(8, rel=0.1)
    assert _sigreg(large) / 1024 == pytest.approx(_sigreg(small) / 128, rel=0.1)


def test_epps_pulley_gradient_is_exact_and_finite():
    t, weights, phi = (v.double() for v in epps_pulley_quadrature())
    x = torch.randn(30, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: _EppsPulley.apply(v, t, weights, phi), (x,))
    for x in (torch.zeros(64, 8), torch.full((64, 8), 1e4), torch.randn(64, 8)):
        x.requires_grad_()
        epps_pulley(x).sum().backward()
        assert torch.isfinite(x.grad).all()


def test_directions_are_unit_and_seeded():
    a, b, c = random_directions(32, 16, 5), random_directions(32, 16, 5), random_directions(32, 16, 6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a.norm(dim=0), torch.ones(16))


def test_same_step_same_directions_fresh_directions_each_step():
    x = torch.randn(64, 16)
    loss = JEPASIGRegLoss(0, 0, 1.0, 0)
    first = loss(x[:32], x[32:], step=3)[0]
    assert torch.equal(first, loss(x[:32], x[32:], step=3)[0])
    assert not torch.equal(first, loss(x[:32], x[32:], step=4)[0])
    assert loss.calls == 3


def test_infonce_masks_other_positives_of_the_same_query():
    gen = torch.Generator().manual_seed(3)
    q, docs = torch.randn(1, 8, generator=gen), torch.randn(4, 8, generator=gen)
    docs_dup = torch.cat([docs, docs[:1]])  # document 0 again, as candidate 4: the query's positive once more
    mask = torch.zeros(1, 5, dtype=torch.bool)
    mask[0, 4] = True
    masked = info_nce(q, docs_dup, 0.1, mask)
    assert float(masked) == pytest.approx(float(info_nce(q, docs, 0.1)), abs=1e-6)
    assert float(info_nce(q, docs_dup, 0.1)) > float(masked)  # unmasked, the duplicate is a false negative
    q = torch.randn(4, 8, generator=gen)
    # the diagonal is never masked, even when the mask marks it
    assert float(info_nce(q, docs, 0.1, torch.eye(4, dtype=torch.bool))) == pytest.approx(float(info_nce(q, docs, 0.1)), abs=1e-6)


def test_infonce_by_hand():
    q, d = torch.randn(3, 5), torch.randn(3, 5)
    logits = F.normalize(q, dim=1) @ F.normalize(d, dim=1).T / 0.05
    want = -torch.log_softmax(logits, 1).diagonal().mean()
    assert float(info_nce(q, d, 0.05)) == pytest.approx(float(want), rel=1e-5)


def test_triplet_mines_the_nearest_non_positive():
    q = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [10.0, 1.0]])
    extra = torch.tensor([[0.0, 0.5], [0.0, 0.9]])  # candidate 2 is also positive for query 0; 3 is its real negative
    candidates = torch.cat([p, extra])
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 2] = True
    got = triplet(q, p, None, margin=1.0, candidates=candidates, positive_mask=mask)
    # query 0: d_pos 1, nearest allowed negative is candidate 3 at 0.9 -> relu(1 - 0.9 + 1) = 1.1
    # query 1: d_pos 1, nearest allowed negative is candidate 0 at 9 -> 0
    assert float(got) == pytest.approx(1.1 / 2, rel=1e-5)
    given = triplet(q, p, torch.tensor([[3.0, 0.0], [10.0, 0.5]]), margin=1.0)
    assert float(given) == pytest.approx((0 + 1.5) / 2, rel=1e-5)


def test_covariance_isotropy_is_zero_for_isotropic_and_positive_otherwise():
    iso = torch.cat([torch.eye(6), -torch.eye(6)]) * 3.0  # covariance ∝ I
    assert float(covariance_isotropy(iso)) == pytest.approx(0.0, abs=1e-6)
    assert float(covariance_isotropy(iso * torch.tensor([1.0, 1, 1, 1, 1, 5]))) > 0.1


@pytest.mark.parametrize("settings", [
    dict(),
    dict(contrastive="triplet", isotropy="covariance", predictive="mse"),
])
def test_parts_sum_to_the_loss(settings):
    gen = torch.Generator().manual_seed(4)
    q, d, n, p = (torch.randn(16, 12, generator=gen) for _ in range(4))
    criterion = JEPASIGRegLoss(0.5, 0.1, 1.0, 0.3, **settings)
    for neg in (None, n):
        loss, parts = criterion(q, d, neg, predicted_pos=p, step=0)
        assert set(parts) == {"predictive", "contrastive", "isotropy", "reg"}
        assert all(float(v) > 0 for v in parts.values())
        assert float(sum(parts.values())) == pytest.approx(float(loss), rel=1e-6)


def test_zero_weights_give_zero_parts():
    q, d = torch.randn(8, 4), torch.randn(8, 4)
    loss, parts = JEPASIGRegLoss(0.5, 0.0, 0.0, 0.0)(q, d)  # no predicted_pos: no predictive term either
    assert float(loss) == 0 and all(float(v) == 0 for v in parts.values())


def test_stop_gradient_stops_it():
    z_q = torch.randn(8, 6, requires_grad=True)
    z_d = torch.randn(8, 6, requires_grad=True)
    predictor = torch.nn.Linear(6, 6)
    for stop in (True, False):
        z_d.grad = None
        loss, _ = JEPASIGRegLoss(1.0, 0.0, 0.0, 0.0, use_stopgrad=stop)(z_q, z_d, predicted_pos=predictor(z_q))
        loss.backward()
        if stop:
            assert z_d.grad is None
        else:
            assert z_d.grad is not None and z_d.grad.abs().sum() > 0
    assert z_q.grad.abs().sum() > 0 and predictor.weight.grad.abs().sum() > 0


def test_sigreg_term_is_float32_under_half_inputs():
    x = torch.randn(32, 8).half()
    loss, parts = JEPASIGRegLoss(0, 0, 1.0, 0)(x[:16], x[16:], step=0)
    assert loss.dtype == torch.float32 and math.isfinite(float(loss))


def test_importable_from_the_package():
    import jepa_cache
    from jepa_cache import JEPASIGRegLoss as FromPackage

    assert FromPackage is JEPASIGRegLoss and jepa_cache.JEPASIGRegLoss is JEPASIGRegLoss
    loss, parts = FromPackage(lambda_predictive=0.5, lambda_contrastive=0.1, lambda_isotropy=1.0, lambda_reg=0.0,
                              use_stopgrad=True)(torch.randn(8, 4), torch.randn(8, 4), predicted_pos=torch.randn(8, 4))
    assert math.isfinite(float(loss)) and set(parts) == {"predictive", "contrastive", "isotropy", "reg"}


def test_extra_negatives_join_the_softmax_but_not_the_isotropy_term():
    gen = torch.Generator().manual_seed(3)
    q, d, extra = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen), torch.randn(10, 8, generator=gen)
    with_extra = JEPASIGRegLoss(0.0, 1.0, 1.0, temperature=0.1)
    loss, parts = with_extra(q, d, negatives=extra, step=0)
    assert float(parts["contrastive"]) == pytest.approx(float(info_nce(q, torch.cat([d, extra]), 0.1)), rel=1e-6)
    _, alone = JEPASIGRegLoss(0.0, 1.0, 1.0, temperature=0.1)(q, d, step=0)
    assert float(parts["isotropy"]) == pytest.approx(float(alone["isotropy"]), rel=1e-6)
    assert float(parts["contrastive"]) > float(alone["contrastive"])  # more negatives, a harder softmax
    # contrast_query: the predictor's output is the query of the contrastive term
    p = torch.randn(4, 8, generator=gen)
    _, via = JEPASIGRegLoss(0.0, 1.0, 0.0, temperature=0.1)(q, d, contrast_query=p)
    assert float(via["contrastive"]) == pytest.approx(float(info_nce(p, d, 0.1)), rel=1e-6)


def test_isotropy_stats_tell_a_cone_from_a_sphere():
    from jepa_cache.losses import effective_rank, isotropy_stats

    gen = torch.Generator().manual_seed(4)
    sphere = torch.randn(2000, 64, generator=gen)
    cone = sphere * 0.85 ** torch.arange(64.0) + 1.0  # anisotropic and off-centre, like encoder vectors
    iso, aniso = isotropy_stats(sphere), isotropy_stats(cone)
    assert iso["effective_rank"] > 55 and aniso["effective_rank"] < iso["effective_rank"] / 2
    assert abs(iso["mean_cos"]) < 0.01 and aniso["mean_cos"] > 0.5
    assert iso["sigreg"] < 0.01 < aniso["sigreg"] and iso["top1_share"] < aniso["top1_share"]
    line = torch.randn(100, 1, generator=gen) @ torch.randn(1, 16, generator=gen)
    assert effective_rank(torch.linalg.eigvalsh(torch.cov(line.T.double())).clamp_min(0).numpy()) == pytest.approx(1.0, abs=1e-3)
