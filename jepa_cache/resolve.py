"""Resolve train-heads' settings, and build the heads and loss they describe.

`resolve_config` fills a TrainConfig from its preset, applies the strategy and refuses a value out of range in
one line naming the option; pipeline.py checks a run's strategies with it before anything trains, and live.py
builds its heads and loss here too, so every entry point resolves the same way.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from .config import LossConfig, TrainConfig
from .errors import UserError
from .heads import Heads, HeadsConfig
from .losses import JEPASIGRegLoss
from .pairs import SAMPLINGS
from .presets import PRESETS

STRATEGIES = ("frozen-predictor", "frozen-isotropy")
NEGATIVES = ("batch", "corpus", "mined")
SCHEDULES = ("cosine", "constant")
SELECTS = ("last", "dev")
ADAPTS = ("none", "nudge-n")
HEADS_FIELDS = tuple(f.name for f in dataclasses.fields(HeadsConfig) if f.name != "input_dim")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"--{name.replace('_', '-')} {value!r}: choose one of {', '.join(allowed)}")


def _strategy_values(cfg: TrainConfig) -> dict:
    """The values the user set, with the strategy's own: frozen-isotropy is the projection alone."""
    if cfg.preset not in PRESETS:
        raise UserError(f"--preset {cfg.preset!r}: choose one of {', '.join(PRESETS)}")
    strategy = cfg.strategy or PRESETS[cfg.preset]["strategy"]
    if strategy not in STRATEGIES:
        raise UserError(
            f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)} "
            "(full fine-tune, hybrid and frozen-live: `jepa-cache train-live`)"
        )
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
    values["strategy"] = strategy
    if strategy == "frozen-isotropy":  # projection only: no predictor, no predictive term
        for key, want in (("predictor", "none"), ("lambda_predictive", 0.0)):
            if values.get(key, want) != want:
                raise UserError(
                    f"--strategy frozen-isotropy trains the projection only; it cannot take {key}={values[key]!r}"
                )
            values[key] = want
        if values.get("query_tower", "projection") != "projection":
            raise UserError("--strategy frozen-isotropy has no predictor: queries go through the projection")
        values["query_tower"] = "projection"
    return values


SCORED_SPLIT = "test"  # what eval scores by default: training on it would report the training queries


def _check_values(cfg: TrainConfig) -> None:
    """Refuse resolved values out of range, in one line naming the option."""
    if cfg.train_split == SCORED_SPLIT and not cfg.pairs and not cfg.allow_test_training:
        raise UserError(
            f"--train-split {SCORED_SPLIT}: that is the split eval scores, so the results would be "
            "measured on the training queries; train on another split, or pass --allow-test-training "
            "if you mean it"
        )
    if cfg.strategy == "frozen-predictor" and cfg.predictor == "none":
        raise UserError(
            f"--strategy frozen-predictor needs a predictor (preset {cfg.preset} has none: add e.g. "
            "--predictor residual --lambda-predictive 0.5); "
            "use --strategy frozen-isotropy for projection only"
        )
    for name in ("epochs", "batch_size", "directions", "mine_k"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be positive")
    if cfg.lr <= 0 or cfg.temperature <= 0 or not 0 <= cfg.warmup < 1 or cfg.grad_clip < 0:
        raise UserError("--lr and --temperature must be positive, --warmup in [0, 1), --grad-clip >= 0")
    if cfg.max_pairs is not None and cfg.max_pairs <= 0:
        raise UserError(f"--max-pairs {cfg.max_pairs}: must be positive")
    choices = (("negatives", NEGATIVES), ("sampling", SAMPLINGS), ("schedule", SCHEDULES), ("select", SELECTS))
    for name, allowed in choices:
        _choice(name, getattr(cfg, name), allowed)
    if cfg.corpus_negatives < 0:
        raise UserError(f"--corpus-negatives {cfg.corpus_negatives}: 0 (the whole corpus) or a positive count")
    if not 0 <= cfg.dev_fraction < 1:
        raise UserError(f"--dev-fraction {cfg.dev_fraction}: must be in [0, 1)")
    if cfg.select == "dev" and cfg.dev_fraction == 0:
        raise UserError("--select dev needs a dev slice: --dev-fraction > 0 (e.g. 0.2)")
    if cfg.refit and cfg.select != "dev":
        raise UserError("--refit retrains for the epoch chosen on dev: it needs --select dev")
    if not 0 < cfg.interpolate <= 1:
        raise UserError(f"--interpolate {cfg.interpolate}: must be in (0, 1] (1 keeps the heads as trained)")
    _choice("adapt", cfg.adapt, ADAPTS)
    if cfg.adapt != "none" and cfg.dev_fraction == 0:
        raise UserError(
            f"--adapt {cfg.adapt} chooses its step on a dev slice: pass --dev-fraction > 0 (e.g. 0.2) or --adapt none"
        )
    if cfg.adapt != "none" and cfg.similarity != "cos":
        raise UserError(f"--adapt {cfg.adapt} moves documents on the unit sphere: it needs --similarity cos")


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill every None from the preset, apply the strategy, and check the values."""
    values = _strategy_values(cfg)
    resolved = TrainConfig(**{**PRESETS[cfg.preset], **values})
    _check_values(resolved)
    return resolved


def with_width(cfg: TrainConfig, input_dim: int) -> TrainConfig:
    """`output_dim` 0 (`best`'s) is the encoder's width, and so is a preset's width that a narrower encoder
    cannot give (`jepa`'s 512 on MiniLM's 384): resolved once the store is known, and recorded so."""
    too_wide = cfg.output_dim == PRESETS[cfg.preset]["output_dim"] > input_dim and cfg.init != "random"
    return dataclasses.replace(cfg, output_dim=input_dim) if not cfg.output_dim or too_wide else cfg


def build_heads(cfg: TrainConfig, input_dim: int, init_vectors: Tensor | None) -> Heads:
    cfg = with_width(cfg, input_dim)
    heads_cfg = HeadsConfig(input_dim=input_dim, **{k: getattr(cfg, k) for k in HEADS_FIELDS})
    return Heads(heads_cfg, init_vectors if heads_cfg.init != "random" else None)


def build_criterion(loss: LossConfig, seed: int) -> JEPASIGRegLoss:
    return JEPASIGRegLoss(
        loss.lambda_predictive,
        loss.lambda_contrastive,
        loss.lambda_isotropy,
        loss.lambda_reg,
        loss.use_stopgrad,
        contrastive=loss.contrastive,
        isotropy=loss.isotropy,
        predictive=loss.predictive,
        temperature=loss.temperature,
        margin=loss.margin,
        num_directions=loss.directions,
        seed=seed,
    )
