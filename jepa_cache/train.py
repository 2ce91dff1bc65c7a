"""Stage 2: resolve the training settings, train heads on a store's cached vectors, and write them.

`train` runs `loop.fit` on the cached vectors (or on any embedding source the caller supplies:
live.py's frozen-live reference), with the dev slice, refit and WiSE-FT interpolation the settings
ask for, and writes heads.safetensors + heads.json (heads.py), config.json (every setting resolved)
and steps.jsonl (one line per step). Why the `best` preset is shaped so: pipelines/ABLATION.md.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .adapt import AdaptConfig, choose_on, corrections_on
from .config import DataConfig, LossConfig, OptimConfig, SelectConfig, TrainConfig
from .distributed import World, barrier, broadcast_tensor, main_lock, rank_device, world
from .encoder import pick_device
from .errors import UserError
from .files import atomic_write_json
from .corrections import remove as remove_corrections
from .heads import META_FILE, Heads, HeadsConfig, describe, save_heads
from .loop import DevSet, FitResult, NonFiniteLoss, fit, format_parts, interpolate_heads, mean_parts
from .losses import JEPASIGRegLoss
from .pairs import DEV_SEED, SAMPLINGS, PairIndex, Pairs, load_pairs, mine_negatives, same_id_rows
from .presets import PRESETS
from .sources import CachedSource, EmbeddingSource
from .store import Store, now_iso, open_store

DEFAULT_HEADS_DIR = Path("runs/heads")
STRATEGIES = ("frozen-predictor", "frozen-isotropy")
STEPS_FILE = "steps.jsonl"
CONFIG_FILE = "config.json"
NEGATIVES = ("batch", "corpus", "mined")
SCHEDULES = ("cosine", "constant")
SELECTS = ("last", "dev")
ADAPTS = ("none", "nudge-n")
HEADS_FIELDS = tuple(f.name for f in dataclasses.fields(HeadsConfig) if f.name != "input_dim")

# Makes the embedding source of a training run from its pair index (default: the cached vectors).
SourceFactory = Callable[[PairIndex, torch.device], EmbeddingSource]


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


def default_out(root: Path, dataset: str, name: str) -> Path:
    """Where a run writes without --out: <root>/<dataset>/<name> (root: runs/heads, or runs/live for train-live)."""
    return root / dataset / name


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


def store_record(store: Store) -> dict:
    """What heads.json records of the store: eval refuses a store of another encoder."""
    return {
        "path": str(store.path),
        "fingerprint": store.fingerprint,
        "encoder_fingerprint": store.encoder_fingerprint,
        "encoder": store.provenance["encoder"].get("name"),
        "dataset": store.dataset_name,
        "imported": store.imported,
    }


def training_record(
    *,
    strategy: str,
    preset: str,
    pairs: int,
    pairs_from: str,
    history: list[dict],
    final: dict,
    seconds: float,
    epoch_seconds: list[float],
    device: str,
    trainable_parameters: int,
    live: bool,
    encoder_changed: bool = False,
    ranks: int = 1,
    dev: dict | None = None,
    validation: dict | None = None,
    adapt: dict | None = None,
) -> dict:
    """heads.json["training"], the one schema train-heads and train-live write."""
    return {
        "strategy": strategy,
        "preset": preset,
        "pairs": pairs,
        "pairs_from": pairs_from,
        "steps": len(history),
        "seconds": round(seconds, 3),
        "epoch_seconds": [round(t, 3) for t in epoch_seconds],
        "live": live,
        "encoder_changed": encoder_changed,
        "device": device,
        "ranks": ranks,
        "trainable_parameters": trainable_parameters,
        "final_epoch_mean": final,
        "dev": dev,
        "validation": validation,
        "adapt": adapt,
        "finished": now_iso(),
    }


@dataclass
class TrainResult:
    """What a training run (train-heads or train-live) produced; `record` is heads.json["training"]."""

    out: Path
    heads: Heads
    config: object  # resolved: the TrainConfig (train-heads) or LiveConfig (train-live) the run used
    history: list[dict]  # one record per step (phase 1 then phase 2 for hybrid)
    epoch_seconds: list[float]
    seconds: float
    record: dict
    encoder: Path | None = None  # train-live: the encoder these heads go with (out/encoder when it changed)

    @property
    def dev(self) -> dict | None:
        """The dev slice: queries, NDCG@10 per epoch, epoch kept, refit."""
        return self.record["dev"]

    @property
    def validation(self) -> dict | None:
        """hybrid: what phase 1 scored and whether phase 2 ran."""
        return self.record["validation"]

    @property
    def encoder_changed(self) -> bool:
        return self.record["encoder_changed"]


def _log_plan(
    cfg: TrainConfig,
    heads: Heads,
    index: PairIndex,
    steps: int,
    stop_after: int | None,
    live: bool,
    log: Callable[[str], None],
) -> None:
    drawn = "all" if not 0 < cfg.corpus_negatives < len(index.doc_rows) else cfg.corpus_negatives
    negs = {
        "batch": "in-batch negatives",
        "mined": f"in-batch + 1 of {cfg.mine_k} mined negatives per query",
        "corpus": f"in-batch + {drawn} corpus negatives",
    }
    log(describe(heads))
    log(
        f"loss: {cfg.contrastive} λ={cfg.lambda_contrastive} ({negs[cfg.negatives]}), "
        f"{cfg.isotropy} λ={cfg.lambda_isotropy}, {cfg.predictive} predictive λ={cfg.lambda_predictive} "
        f"(stop-grad {cfg.use_stopgrad}), reg λ={cfg.lambda_reg}; {cfg.epochs} "
        f"{'query' if cfg.sampling == 'queries' else 'pair'} epoch(s) × {steps} steps of {cfg.batch_size}, "
        f"{cfg.schedule} lr {cfg.lr:g}{f', stopping after epoch {stop_after}' if stop_after is not None else ''}"
        f"{'; LIVE: encoding every batch through the frozen encoder' if live else ''}"
    )


def _index(cfg: TrainConfig, store: Store, pairs: Pairs, device: torch.device, log: Callable[[str], None]) -> PairIndex:
    whole = cfg.negatives != "batch"
    if cfg.negatives == "mined" and pairs.neg_rows is not None:
        raise UserError(
            f"{pairs.origin}: triples bring their own hard negatives; use --negatives batch or corpus with them"
        )
    index = PairIndex.build(
        pairs, device, corpus_rows=store.corpus.rows if whole else None, same_id=same_id_rows(store)
    )
    log(
        f"training pairs: {len(pairs):,} from {pairs.origin} ({index.num_queries:,} queries, {len(index.doc_rows):,} "
        f"{'corpus ' if whole else ''}documents{', with hard negatives' if pairs.neg_rows is not None else ''})"
    )
    return index


def _fit_once(
    cfg: TrainConfig,
    store: Store,
    pairs: Pairs,
    device: torch.device,
    corpus: Tensor | None,
    dev: DevSet | None,
    log: Callable[[str], None],
    on_step: Callable[[dict], None],
    stop_after: int | None = None,
    w: World = World(),
    make_source: SourceFactory | None = None,
) -> tuple[Heads, FitResult, int]:
    """Build the index, the source, fresh heads and the optimiser for `pairs`, and fit them."""
    index = _index(cfg, store, pairs, device, log)
    if cfg.negatives != "batch" and corpus is not None:
        doc_vectors = corpus.cpu()
    else:
        doc_vectors = torch.from_numpy(store.corpus.vectors(np.float32, index.doc_rows))
    if make_source is not None:  # loaded before seeding, so loading an encoder cannot shift the seeded streams
        source = make_source(index, device)
    else:
        query_vectors = torch.from_numpy(store.queries.vectors(np.float32, index.query_rows))
        source = CachedSource(query_vectors.to(device), doc_vectors.to(device))
    torch.manual_seed(cfg.seed)  # heads init and dropout masks
    heads = build_heads(cfg, store.dim, doc_vectors).to(device)  # the same initial heads on every rank
    if w.distributed:
        torch.manual_seed(cfg.seed + w.rank)  # each rank's share of the batch gets its own dropout masks
    criterion = build_criterion(cfg.group(LossConfig), cfg.seed)
    trainable = [p for p in heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    mined = None
    if cfg.negatives == "mined":  # rank 0 mines, the others receive: the same negatives everywhere
        mined = (
            mine_negatives(heads, source, index, cfg.mine_k)
            if w.main
            else torch.empty(index.num_queries, cfg.mine_k, dtype=torch.int64, device=device)
        )
        broadcast_tensor(w, mined)
    initial = {k: v.detach().clone() for k, v in heads.state_dict().items()}

    def dev_score(h: Heads) -> float:  # the heads as they would be saved: interpolated
        if cfg.interpolate == 1.0:
            return dev.score(h)
        return dev.score(interpolate_heads(copy.deepcopy(h), initial, cfg.interpolate))

    steps = math.ceil(index.items(cfg.sampling) / cfg.batch_size)
    _log_plan(cfg, heads, index, steps, stop_after, make_source is not None, log)
    result = fit(
        heads,
        criterion,
        source,
        index,
        optimizer,
        cfg.group(OptimConfig),
        cfg.group(DataConfig),
        seed=cfg.seed,
        mined=mined,
        dev=dev_score if dev is not None else None,
        select=cfg.select if dev is not None else "last",
        stop_after=stop_after,
        on_step=on_step,
        log=log,
        world=w,
    )
    if cfg.interpolate != 1.0:
        interpolate_heads(heads, initial, cfg.interpolate)
        log(f"heads interpolated with their initial weights: initial + {cfg.interpolate:g} × (trained − initial)")
    return heads, result, steps


def _fit_and_refit(
    cfg: TrainConfig,
    store: Store,
    pairs: Pairs,
    device: torch.device,
    w: World,
    log: Callable[[str], None],
    write_step: Callable[[dict, str], None],
    make_source: SourceFactory | None,
) -> tuple[Heads, FitResult, int, dict | None, tuple | None]:
    """Fit (on all pairs, or all but the dev slice); with `refit`, fit again on all pairs for the epochs dev chose.

    With `adapt`, the corrections' settings are chosen on the dev slice in the fitted heads' space (rank 0).
    """
    corpus = None
    if cfg.dev_fraction > 0 or cfg.negatives != "batch":
        corpus = torch.from_numpy(store.corpus.vectors(np.float32)).to(device)
    fit_pairs, dev = pairs, None
    if cfg.dev_fraction > 0:
        fit_pairs, dev_pairs = pairs.hold_out(cfg.dev_fraction)
        dev = DevSet.from_pairs(dev_pairs, store, corpus, device)
        log(f"dev: {len(dev):,} held-out queries ({dev_pairs.origin}); NDCG@10 over the whole corpus after every epoch")
    select = cfg.group(SelectConfig)
    heads, result, steps = _fit_once(
        cfg, store, fit_pairs, device, corpus, dev, log, lambda r: write_step(r, "fit"), w=w, make_source=make_source
    )
    dev_record = None
    if dev is not None:
        dev_record = {
            "queries": len(dev),
            "fraction": select.dev_fraction,
            "seed": DEV_SEED,
            "ndcg@10": result.dev,
            "select": select.select,
            "best_epoch": result.best_epoch,
            "refit": select.refit,
        }
    choice = None
    if cfg.adapt != "none" and w.main:
        choice = choose_on(AdaptConfig(cfg.adapt), store, heads.eval(), fit_pairs, dev_pairs)
        log(
            f"{cfg.adapt}: step γ {choice[0]:g}, query weight power {choice[1]:g}; dev NDCG@10 with the corrections "
            f"{choice[2]['dev_ndcg@10']:.4f} (heads alone {choice[2]['base_dev_ndcg@10']:.4f})"
        )
    if select.refit:
        kept = result.best_epoch or 0
        log(f"refit: all {len(pairs):,} pairs, {kept} of {cfg.epochs} epoch(s)")
        fit_history = result.history
        heads, result, steps = _fit_once(
            cfg,
            store,
            pairs,
            device,
            corpus,
            None,
            log,
            lambda r: write_step(r, "refit"),
            stop_after=kept,
            w=w,
            make_source=make_source,
        )
        result.history = fit_history + result.history
    return heads, result, steps, dev_record, choice


def _refit_corrections(
    cfg: TrainConfig, store: Store, heads: Heads, pairs: Pairs, choice: tuple, log: Callable[[str], None]
):
    """The corrections with the settings dev chose, from every training query, in the final heads' space."""
    corrections = corrections_on(AdaptConfig(cfg.adapt), store, heads.eval(), pairs, *choice)
    log(
        f"{cfg.adapt}: {len(corrections.doc_ids):,} documents corrected from {corrections.labelled_queries:,} "
        "labelled queries"
    )
    return corrections


def _write(out: Path, heads: Heads, corrections, meta: dict, cfg: TrainConfig, partial: Path) -> None:
    """Old heads.json first (so old heads are never read without their corrections), then corrections, then
    the new heads (heads.json last: it marks the folder finished), the config and the steps."""
    (out / META_FILE).unlink(missing_ok=True)
    remove_corrections(out)
    if corrections is not None:
        corrections.save(out)
    save_heads(heads, out, meta)
    atomic_write_json(out / CONFIG_FILE, cfg)
    partial.replace(out / STEPS_FILE)


def train(
    cfg: TrainConfig, log: Callable[[str], None] = print, make_source: SourceFactory | None = None
) -> TrainResult:
    """Train heads on a store's cached vectors (or on the batches `make_source` encodes) and save them under `out`.

    With `dev_fraction`, a seeded slice of the training queries is held out and scored after
    every epoch; `select dev` keeps the best epoch (0: the initial heads), and `refit` retrains
    on every training query for that many epochs of the same schedule.
    """
    cfg = resolve_config(cfg)
    w = world(cfg.device)
    log = log if w.main else (lambda s: None)
    store = open_store(cfg.store)
    cfg = with_width(cfg, store.dim)
    pairs = load_pairs(cfg, store)
    out = (
        Path(cfg.out)
        if cfg.out
        else default_out(DEFAULT_HEADS_DIR, store.dataset_name, f"{cfg.preset}-{cfg.strategy}-s{cfg.seed}")
    )
    if (out / META_FILE).exists() and not cfg.overwrite:
        raise UserError(f"{out}: already holds heads; choose another --out or pass --overwrite")
    device = pick_device(rank_device(cfg.device, w))
    with main_lock(out, "train-heads", w):
        log(f"{store.describe()}\ndevice {device}")
        created = w.main and not out.exists()
        if w.main:  # rank 0 writes; the other ranks only compute
            out.mkdir(parents=True, exist_ok=True)
        partial = out / f".{STEPS_FILE}.partial"
        try:
            t0 = time.perf_counter()
            with open(partial if w.main else os.devnull, "w", encoding="utf-8") as steps_file:

                def write_step(record: dict, phase: str) -> None:
                    steps_file.write(json.dumps({**record, "phase": phase} if cfg.refit else record) + "\n")

                heads, result, steps, dev_record, choice = _fit_and_refit(
                    cfg, store, pairs, device, w, log, write_step, make_source
                )
            corrections = _refit_corrections(cfg, store, heads, pairs, choice, log) if choice is not None else None
            seconds = time.perf_counter() - t0
            final = mean_parts(result.history[-steps:])
            record = training_record(
                strategy=cfg.strategy,
                preset=cfg.preset,
                pairs=len(pairs),
                pairs_from=pairs.origin,
                history=result.history,
                final=final,
                seconds=seconds,
                epoch_seconds=result.epoch_seconds,
                device=str(device),
                trainable_parameters=heads.parameter_counts()["total"],
                live=make_source is not None,
                ranks=w.size,
                dev=dev_record,
                adapt=corrections and corrections.summary(),
            )
            if w.main:
                _write(out, heads, corrections, {"store": store_record(store), "training": record}, cfg, partial)
        except NonFiniteLoss as e:  # its steps stay, for the post-mortem; no heads are written
            failed = out / "steps.failed.jsonl"
            if w.main:
                partial.replace(failed)
            raise NonFiniteLoss(f"{e} (steps so far: {failed})") from None
        except BaseException:  # Ctrl-C, disk full, ...: no half-written heads, no stray partial file
            if w.main:
                partial.unlink(missing_ok=True)
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise
        barrier(w)  # the heads are saved before any rank returns
        log(f"trained in {seconds:.1f} s; last epoch mean: {format_parts(final)}\nheads: {out}")
        return TrainResult(out, heads.eval(), cfg, result.history, result.epoch_seconds, seconds, record)
