"""The JEPA retrieval loss and its terms: pure functions of tensors, plus one module that combines them.

Every function takes embeddings (never text, never a model), so cached and live training compute the
same thing. `JEPASIGRegLoss` returns `(loss, parts)`, each part a *weighted* term (they sum to `loss`);
its SIGReg term is the Epps-Pulley statistic / N, so λ means the same at any batch size
(pipelines/ABLATION.md, "Design notes").
"""

from __future__ import annotations

import math

import numpy as np

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONTRASTIVE = ("infonce", "triplet")
ISOTROPY = ("sigreg", "covariance")
PREDICTIVE = ("cosine", "mse")
PART_NAMES = ("predictive", "contrastive", "isotropy", "reg")


def epps_pulley_quadrature(knots: int = 17, t_max: float = 3.0) -> tuple[Tensor, Tensor, Tensor]:
    """Knots, trapezoid weights and target characteristic function for the Epps–Pulley integral.

    Only t ≥ 0 is evaluated: the integrand is even in t, so the weights are doubled (the
    trapezoid's half weights at both ends become whole ones). The weight function
    w(t) = e^{−t²/2} is folded into the returned weights.

    Shape:
        each output is [knots], float32
    """
    if knots < 2 or t_max <= 0:
        raise ValueError(f"need knots >= 2 and t_max > 0, got {knots}, {t_max}")
    t = torch.linspace(0.0, t_max, knots, dtype=torch.float32)
    dt = t_max / (knots - 1)
    weights = torch.full((knots,), 2 * dt, dtype=torch.float32)
    weights[0] = weights[-1] = dt
    phi = torch.exp(-0.5 * t.square())
    return t, weights * phi, phi


def gaussian_expectation(knots: int = 17, t_max: float = 3.0) -> float:
    """Expected Epps–Pulley statistic for N(0, 1) samples (any N): ∫ (1 − e^{−t²}) w(t) dt ≈ 1.05."""
    _, weights, phi = epps_pulley_quadrature(knots, t_max)
    return float((weights * (1 - phi.square())).sum())


def epps_pulley(x: Tensor, knots: int = 17, t_max: float = 3.0) -> Tensor:
    """Epps–Pulley statistic of each column of `x` against N(0, 1), computed in float32.

    N · ∫ |φ̂(t) − e^{−t²/2}|² e^{−t²/2} dt with φ̂ the empirical characteristic function of
    the column; about 1.05 for Gaussian columns, growing with N for anything else.

    Shape:
        x: [N, M] (N samples of M one-dimensional projections)
        returns [M]
    """
    t, weights, phi = (v.to(x.device) for v in epps_pulley_quadrature(knots, t_max))
    return _EppsPulley.apply(x.float(), t, weights, phi)


class _EppsPulley(torch.autograd.Function):
    """Epps–Pulley with a hand-written backward: 4-6x faster on CPU than autograd through cos/sin.

    Its gradient, for column m and sample n, is
    Σ_k w_k · 2 t_k · [S̄_k cos(t_k x_n) − (C̄_k − φ_k) sin(t_k x_n)], with C̄, S̄ the mean
    cos and sin over the samples (N and the 1/N of the means cancel).
    """

    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor, weights: Tensor, phi: Tensor) -> Tensor:
        t, weights, phi = (v.to(x.dtype) for v in (t, weights, phi))
        xt = x.unsqueeze(-1) * t  # [N, M, K]
        cos, sin = torch.cos(xt), torch.sin(xt)
        cos_mean, sin_mean = cos.mean(0), sin.mean(0)  # [M, K]
        ctx.save_for_backward(cos, sin, cos_mean - phi, sin_mean, t * weights)
        return x.shape[0] * (((cos_mean - phi).square() + sin_mean.square()) @ weights)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        cos, sin, cos_err, sin_mean, tw = ctx.saved_tensors
        a, b = 2 * tw * cos_err, 2 * tw * sin_mean  # [M, K]
        grad = torch.einsum("nmk,mk->nm", cos, b) - torch.einsum("nmk,mk->nm", sin, a)
        return grad * grad_out, None, None, None


def random_directions(dim: int, count: int, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """`count` random unit vectors in R^dim, drawn from a CPU generator seeded with `seed`.

    Drawing on the CPU makes the directions identical on every device, so a loop on GPU, a
    loop on CPU, the cached loop and the live loop all see the same ones at the same step.

    Shape:
        returns [dim, count], float32
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(dim, count, generator=gen, dtype=torch.float32)
    return (a / a.norm(dim=0, keepdim=True)).to(device)


def sigreg(x: Tensor, directions: Tensor, knots: int = 17, t_max: float = 3.0) -> Tensor:
    """SIGReg (LeJEPA): mean Epps–Pulley statistic of `x` projected on each direction.

    Its target is N(0, I), so apply it to un-normalised vectors (unit-norm vectors in d
    dimensions have per-direction variance 1/d and can never pass). The value scales with N;
    see the module docstring.

    Shape:
        x: [N, D]; directions: [D, M] unit columns
        returns a scalar
    """
    return epps_pulley(x.float() @ directions.float(), knots, t_max).mean()


def info_nce(query: Tensor, candidates: Tensor, temperature: float, positive_mask: Tensor | None = None) -> Tensor:
    """InfoNCE of each query against in-batch candidates, by cosine similarity / temperature.

    `candidates[i]` is the positive of `query[i]`; every other candidate is a negative unless
    `positive_mask[i, j]` says it is also relevant to query i (another positive of the same
    query, or the same document again), in which case it is left out of the denominator.

    Shape:
        query: [B, D]; candidates: [C, D] with C >= B; positive_mask: [B, C] bool
        returns a scalar
    """
    b = query.shape[0]
    logits = F.normalize(query.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T / temperature
    if positive_mask is not None:
        logits = logits.masked_fill(positive_mask & ~_target_mask(b, candidates.shape[0], query.device), float("-inf"))
    return F.cross_entropy(logits, torch.arange(b, device=query.device))


def triplet(query: Tensor, positive: Tensor, negative: Tensor | None = None, margin: float = 1.0,
            candidates: Tensor | None = None, positive_mask: Tensor | None = None) -> Tensor:
    """Hinge on L2 distances, relu(‖q − p‖ − ‖q − n‖ + margin), as the study trained.

    Without a supplied `negative`, each query's negative is mined: the nearest (L2) of the
    `candidates` that is not one of its positives (diagonal and `positive_mask`).

    Shape:
        query, positive, negative: [B, D]; candidates: [C, D]; positive_mask: [B, C] bool
        returns a scalar
    """
    d_pos = (query - positive).norm(dim=-1)
    if negative is None:
        if candidates is None:
            raise ValueError("triplet needs a negative or candidates to mine one from")
        with torch.no_grad():
            dist = torch.cdist(query.float(), candidates.float())
            taken = _target_mask(query.shape[0], candidates.shape[0], query.device)
            if positive_mask is not None:
                taken = taken | positive_mask
            dist = dist.masked_fill(taken, float("inf"))
            hardest, index = dist.min(dim=1)
        negative = candidates[index]
        d_neg = (query - negative).norm(dim=-1).masked_fill(torch.isinf(hardest), float("inf"))
    else:
        d_neg = (query - negative).norm(dim=-1)
    return F.relu(d_pos - d_neg + margin).mean()


def covariance_isotropy(x: Tensor) -> Tensor:
    """The study's isotropy term: ‖cov(x) − mean variance · I‖_F / D.

    It asks for a covariance proportional to the identity (any scale), unlike SIGReg, which
    asks for the whole distribution to be N(0, I).

    Shape:
        x: [N, D]; returns a scalar
    """
    x = x.float()
    centred = x - x.mean(0, keepdim=True)
    cov = centred.T @ centred / max(x.shape[0] - 1, 1)
    target = torch.eye(cov.shape[0], device=x.device) * cov.diagonal().mean()
    return torch.linalg.matrix_norm(cov - target) / cov.shape[0]


def variance_reg(x: Tensor, target_std: float = 1.0) -> Tensor:
    """The study's regulariser: (std of all entries − target)², keeping the scale from drifting.

    Shape:
        x: [N, D]; returns a scalar
    """
    return (x.float().std() - target_std).square()


def predictive(predicted: Tensor, target: Tensor, kind: str = "cosine") -> Tensor:
    """Distance between the predictor's output and the document's projection.

    `cosine` (1 − cos, the default) ignores scale, so it cannot fight SIGReg over the norm of the
    embeddings; `mse` on raw vectors is what the study used.

    Shape:
        predicted, target: [B, D]; returns a scalar
    """
    if kind == "cosine":
        return 1 - F.cosine_similarity(predicted.float(), target.float(), dim=-1).mean()
    if kind == "mse":
        return F.mse_loss(predicted.float(), target.float())
    raise ValueError(f"unknown predictive distance {kind!r}; choose one of {', '.join(PREDICTIVE)}")


def _target_mask(rows: int, cols: int, device: torch.device) -> Tensor:
    """True at (i, i): the candidate that is query i's own target."""
    return torch.eye(rows, cols, dtype=torch.bool, device=device)


class JEPASIGRegLoss(nn.Module):
    """JEPA loss for retrieval heads: predictive + contrastive + isotropy (+ optional reg).

    Called as `loss, parts = criterion(query_emb, doc_emb, predicted_pos=predictor(query_emb))`
    with the *projection outputs* of queries and their positive documents. `parts` holds each
    weighted term (detached); they sum to `loss`.

    - predictive: `predictive(predicted_pos, doc_emb)`, target detached when `use_stopgrad`.
    - contrastive: `info_nce` over the batch's documents (and hard negatives, if given), or
      `triplet` with the supplied or a mined negative.
    - isotropy: SIGReg / N on the un-normalised projections of queries and documents (random
      directions drawn afresh each step from a generator seeded by `seed` and the step), or the
      study's covariance term.
    - reg: the study's variance term.

    Args:
        positive_mask (forward): [B, C] bool, True where candidate j is also a positive of query i.
        step (forward): seeds SIGReg's directions; when None an internal call counter is used,
            so a script that never passes it still gets fresh directions every call.
    """

    def __init__(
        self,
        lambda_predictive: float = 0.5,
        lambda_contrastive: float = 0.1,
        lambda_isotropy: float = 1.0,
        lambda_reg: float = 0.0,
        use_stopgrad: bool = True,
        *,
        contrastive: str = "infonce",
        isotropy: str = "sigreg",
        predictive: str = "cosine",
        temperature: float = 0.05,
        margin: float = 1.0,
        num_directions: int = 256,
        knots: int = 17,
        t_max: float = 3.0,
        seed: int = 0,
    ):
        super().__init__()
        for name, value, allowed in (("contrastive", contrastive, CONTRASTIVE), ("isotropy", isotropy, ISOTROPY),
                                     ("predictive", predictive, PREDICTIVE)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        if temperature <= 0 or num_directions <= 0:
            raise ValueError("temperature and num_directions must be positive")
        self.lambda_predictive = lambda_predictive
        self.lambda_contrastive = lambda_contrastive
        self.lambda_isotropy = lambda_isotropy
        self.lambda_reg = lambda_reg
        self.use_stopgrad = use_stopgrad
        self.contrastive = contrastive
        self.isotropy = isotropy
        self.predictive = predictive
        self.temperature = temperature
        self.margin = margin
        self.num_directions = num_directions
        self.knots = knots
        self.t_max = t_max
        self.seed = seed
        self.calls = 0

    def direction_seed(self, step: int) -> int:
        """One seed per (loss seed, step): both loops draw the same directions at the same step."""
        return (self.seed * 1_000_003 + step) % (2**63)

    def forward(
        self,
        query_emb: Tensor,
        doc_emb: Tensor,
        neg_emb: Tensor | None = None,
        predicted_pos: Tensor | None = None,
        *,
        positive_mask: Tensor | None = None,
        step: int | None = None,
        negatives: Tensor | None = None,
        contrast_query: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss and its weighted parts for one batch.

        Args:
            negatives: extra candidates for the contrastive term only (e.g. the whole cached
                corpus, or a sample of it); they take no part in the isotropy and reg terms.
            contrast_query: what the contrastive term uses as the query (default `query_emb`);
                the predictor's output when queries are retrieved through the predictor.

        Shape:
            query_emb, doc_emb, predicted_pos, contrast_query: [B, D]; neg_emb: [B, D] or None;
            negatives: [M, D] or None; positive_mask: [B, C] bool over the candidates
            `cat(doc_emb, neg_emb, negatives)` (C = B, 2B, B + M or 2B + M); returns (scalar, {name: scalar})
        """
        if step is None:
            step = self.calls
        self.calls += 1
        zero = query_emb.new_zeros((), dtype=torch.float32)
        parts = dict.fromkeys(PART_NAMES, zero)
        if self.lambda_predictive and predicted_pos is not None:
            target = doc_emb.detach() if self.use_stopgrad else doc_emb
            parts["predictive"] = self.lambda_predictive * predictive(predicted_pos, target, self.predictive)
        candidates = doc_emb if neg_emb is None else torch.cat([doc_emb, neg_emb])
        if self.lambda_contrastive:
            contrast = candidates if negatives is None else torch.cat([candidates, negatives])
            q = query_emb if contrast_query is None else contrast_query
            if self.contrastive == "infonce":
                term = info_nce(q, contrast, self.temperature, positive_mask)
            else:
                term = triplet(q, doc_emb, neg_emb, self.margin, contrast, positive_mask)
            parts["contrastive"] = self.lambda_contrastive * term
        embeddings = torch.cat([query_emb, candidates])
        if self.lambda_isotropy:
            if self.isotropy == "sigreg":
                dirs = random_directions(embeddings.shape[1], self.num_directions, self.direction_seed(step),
                                         embeddings.device)
                term = sigreg(embeddings, dirs, self.knots, self.t_max) / embeddings.shape[0]
            else:
                term = covariance_isotropy(embeddings)
            parts["isotropy"] = self.lambda_isotropy * term
        if self.lambda_reg:
            parts["reg"] = self.lambda_reg * variance_reg(embeddings)
        loss = sum(parts.values(), zero)
        return loss, {k: v.detach() for k, v in parts.items()}


def effective_rank(eig: np.ndarray) -> float:
    """exp(entropy) of a normalised eigenvalue spectrum: 1 (collapsed onto a line) .. D (isotropic)."""
    p = eig / eig.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def isotropy_stats(x: Tensor, directions: int = 1024, seed: int = 0) -> dict[str, float]:
    """How isotropic retrieval vectors are, as the index sees them (L2-normalised rows).

    - `effective_rank`: of the covariance's eigenvalues (see `effective_rank`); D for an isotropic cloud.
    - `sigreg`: the Epps-Pulley statistic / N of the rows scaled by sqrt(D) (unit-sphere
      vectors times sqrt(D) are close to N(0, I) when isotropic): near 1.05/N for a Gaussian-like
      cloud, up to ~0.4 for a collapsed one; comparable across sizes.
    - `top1_share`: fraction of the (uncentred) second moment along the top direction.
    - `mean_cos`: mean cosine between rows (0 for an isotropic cloud).

    Shape:
        x: [N, D]; returns {name: float}
    """
    z = F.normalize(x.float(), dim=-1)
    n, d = z.shape
    stat = sigreg(z * math.sqrt(d), random_directions(d, directions, seed, z.device)) / n
    second = torch.linalg.eigvalsh((z.T.double() @ z.double()) / n)
    mean = z.mean(0)
    covariance = torch.linalg.eigvalsh(torch.cov(z.T.double())).clamp_min(0).cpu().numpy()
    return {"effective_rank": effective_rank(covariance), "sigreg": float(stat),
            "top1_share": float(second[-1] / second.sum()),
            "mean_cos": float((n * mean.square().sum() - 1) / (n - 1))}


def first_nonfinite(parts: dict[str, Tensor]) -> str | None:
    """Name of the first part that is NaN/inf (for an error that says which term went bad)."""
    for name, value in parts.items():
        if not math.isfinite(float(value)):
            return name
    return None
