"""One fit of fresh heads on a pair set, and the selection on dev around it: train-heads' middle.

`fit_and_refit` holds out the dev slice, fits, chooses the corrections' settings on dev, and refits on every
pair for the epochs dev chose; resolve.py resolves the settings, train.py runs this and writes the heads' folder.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .adapt import AdaptConfig, choose_on, corrections_on
from .config import DataConfig, LossConfig, OptimConfig, SelectConfig, TrainConfig
from .corrections import Corrections
from .distributed import World, broadcast_tensor
from .errors import UserError
from .heads import Heads, describe
from .loop import DevSet, FitResult, fit, interpolate_heads
from .pairs import DEV_SEED, PairIndex, Pairs, mine_negatives, same_id_rows
from .resolve import build_criterion, build_heads
from .sources import CachedSource, EmbeddingSource
from .store import Store

# Makes the embedding source of a training run from its pair index (default: the cached vectors).
SourceFactory = Callable[[PairIndex, torch.device], EmbeddingSource]


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


def _source(
    cfg: TrainConfig,
    store: Store,
    index: PairIndex,
    device: torch.device,
    corpus: Tensor | None,
    make_source: SourceFactory | None,
) -> tuple[Tensor, EmbeddingSource]:
    """The documents' cached vectors (what the heads start from) and the source that embeds each batch."""
    if cfg.negatives != "batch" and corpus is not None:
        doc_vectors = corpus.cpu()
    else:
        doc_vectors = torch.from_numpy(store.corpus.vectors(np.float32, index.doc_rows))
    if make_source is not None:  # loaded before seeding, so loading an encoder cannot shift the seeded streams
        return doc_vectors, make_source(index, device)
    query_vectors = torch.from_numpy(store.queries.vectors(np.float32, index.query_rows))
    return doc_vectors, CachedSource(query_vectors.to(device), doc_vectors.to(device))


def _mined(
    cfg: TrainConfig, heads: Heads, source: EmbeddingSource, index: PairIndex, device: torch.device, w: World
) -> Tensor | None:
    """--negatives mined: rank 0 mines, the others receive: the same negatives everywhere."""
    if cfg.negatives != "mined":
        return None
    mined = (
        mine_negatives(heads, source, index, cfg.mine_k)
        if w.main
        else torch.empty(index.num_queries, cfg.mine_k, dtype=torch.int64, device=device)
    )
    broadcast_tensor(w, mined)
    return mined


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
    doc_vectors, source = _source(cfg, store, index, device, corpus, make_source)
    torch.manual_seed(cfg.seed)  # heads init and dropout masks
    heads = build_heads(cfg, store.dim, doc_vectors).to(device)  # the same initial heads on every rank
    if w.distributed:
        torch.manual_seed(cfg.seed + w.rank)  # each rank's share of the batch gets its own dropout masks
    criterion = build_criterion(cfg.group(LossConfig), cfg.seed)
    trainable = [p for p in heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    mined = _mined(cfg, heads, source, index, device, w)
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


def _dev_slice(
    cfg: TrainConfig, store: Store, pairs: Pairs, device: torch.device, log: Callable[[str], None]
) -> tuple[Tensor | None, Pairs, Pairs | None, DevSet | None]:
    """The corpus on `device` (when dev or the negatives need it), the pairs to fit, and the dev slice held out."""
    corpus = None
    if cfg.dev_fraction > 0 or cfg.negatives != "batch":
        corpus = torch.from_numpy(store.corpus.vectors(np.float32)).to(device)
    if cfg.dev_fraction <= 0:
        return corpus, pairs, None, None
    fit_pairs, dev_pairs = pairs.hold_out(cfg.dev_fraction)
    dev = DevSet.from_pairs(dev_pairs, store, corpus, device)
    log(f"dev: {len(dev):,} held-out queries ({dev_pairs.origin}); NDCG@10 over the whole corpus after every epoch")
    return corpus, fit_pairs, dev_pairs, dev


def _dev_record(dev: DevSet, result: FitResult, select: SelectConfig) -> dict:
    """heads.json["training"]["dev"]: the slice, its NDCG@10 per epoch, the epoch kept and whether it was refit."""
    return {
        "queries": len(dev),
        "fraction": select.dev_fraction,
        "seed": DEV_SEED,
        "ndcg@10": result.dev,
        "select": select.select,
        "best_epoch": result.best_epoch,
        "refit": select.refit,
    }


def _choose_adapt(
    cfg: TrainConfig, store: Store, heads: Heads, fit_pairs: Pairs, dev_pairs: Pairs, log: Callable[[str], None]
) -> tuple[float, float, dict]:
    """The corrections' settings chosen on the dev slice, in the fitted heads' space."""
    choice = choose_on(AdaptConfig(cfg.adapt), store, heads.eval(), fit_pairs, dev_pairs)
    log(
        f"{cfg.adapt}: step γ {choice[0]:g}, query weight power {choice[1]:g}; dev NDCG@10 with the corrections "
        f"{choice[2]['dev_ndcg@10']:.4f} (heads alone {choice[2]['base_dev_ndcg@10']:.4f})"
    )
    return choice


def fit_and_refit(
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
    corpus, fit_pairs, dev_pairs, dev = _dev_slice(cfg, store, pairs, device, log)
    select = cfg.group(SelectConfig)
    heads, result, steps = _fit_once(
        cfg, store, fit_pairs, device, corpus, dev, log, lambda r: write_step(r, "fit"), w=w, make_source=make_source
    )
    dev_record = _dev_record(dev, result, select) if dev is not None else None
    choice = _choose_adapt(cfg, store, heads, fit_pairs, dev_pairs, log) if cfg.adapt != "none" and w.main else None
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


def refit_corrections(
    cfg: TrainConfig, store: Store, heads: Heads, pairs: Pairs, choice: tuple, log: Callable[[str], None]
) -> Corrections:
    """The corrections with the settings dev chose, from every training query, in the final heads' space."""
    corrections = corrections_on(AdaptConfig(cfg.adapt), store, heads.eval(), pairs, *choice)
    log(
        f"{cfg.adapt}: {len(corrections.doc_ids):,} documents corrected from {corrections.labelled_queries:,} "
        "labelled queries"
    )
    return corrections
