"""Stage 2 through the encoder (`train-live`): frozen-live, full fine-tune and the two-phase hybrid.

Every strategy reuses the cached stage's heads, loss and loop (resolve.py, loop.py); only the
embedding source (sources.py) and the optimizer's parameter groups change. Texts are encoded after
the prompts the store recorded. A changed encoder is saved as a plain sentence-transformers folder
(`out/encoder`) that carries those prompts, and whose weights' sha256 (with the prompts) the heads
record, so eval accepts these heads only with stores that encoder builds with those prompts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import DataConfig, LiveConfig, LossConfig, OptimConfig, TrainConfig
from .corrections import remove as remove_corrections
from .datasets import read_qrels, recorded_dataset
from .distributed import world
from .encoder import load_encoder, pick_device
from .errors import UserError
from .files import atomic_dir, atomic_write_bytes, atomic_write_json, exclusive_lock
from .heads import Heads, describe, save_heads
from .jepa_encoder import JEPAEncoder
from .loop import DevSet, FitResult, fit, mean_parts
from .models import weights_sha256
from .pairs import PairIndex, Pairs, load_pairs, same_id_rows
from .resolve import build_criterion, build_heads, resolve_config, with_width
from .sources import (
    EncoderSource,
    frozen_live_source,
    live_encoder_folder,
    store_prompts,
    store_texts,
)
from .store import Store, encoder_fingerprint, open_store
from .train import (
    CONFIG_FILE,
    STEPS_FILE,
    TrainResult,
    default_out,
    store_record,
    train,
    training_record,
)

STRATEGIES = ("full", "hybrid", "frozen-live")
DEFAULT_LIVE_DIR = Path("runs/live")
ENCODER_DIR = "encoder"
SUMMARY_FILE = "live.json"
STUDY_HEAD_LR = 1e-3  # the study's projection and predictor rate in its full fine-tune


def resolve_live(cfg: LiveConfig) -> LiveConfig:
    """Resolve the heads' config from its preset and the live defaults that depend on the strategy."""
    if cfg.strategy not in STRATEGIES:
        raise UserError(f"--strategy {cfg.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if cfg.train.adapt not in (None, "none"):
        raise UserError(f"--adapt {cfg.train.adapt}: per-document corrections belong to one cached store; train-live "
                        "changes or runs the encoder, so it makes none (train-heads does)")
    tcfg = dataclasses.replace(resolve_config(cfg.train), adapt="none")  # `best` brings nudge-n: cached training only
    head_lr = cfg.head_lr if cfg.head_lr is not None else (STUDY_HEAD_LR if cfg.strategy == "full" else tcfg.lr)
    resolved = dataclasses.replace(cfg, train=tcfg, head_lr=head_lr,
                                   phase2_epochs=tcfg.epochs if cfg.phase2_epochs is None else cfg.phase2_epochs)
    if min(resolved.encoder_lr, resolved.phase2_encoder_lr) < 0 or resolved.head_lr <= 0:
        raise UserError("--encoder-lr and --phase2-encoder-lr must be >= 0, --head-lr positive")
    if resolved.phase2_epochs <= 0 or not 0 < resolved.val_fraction < 1:
        raise UserError("--phase2-epochs must be positive and --val-fraction in (0, 1)")
    if cfg.strategy == "frozen-live" and tcfg.negatives != "batch":
        raise UserError(f"--negatives {tcfg.negatives} needs the whole corpus every step (or mined from it): cached "
                        "training only; frozen-live takes --negatives batch (e.g. --preset jepa)")
    if cfg.strategy == "full" and (tcfg.negatives != "batch" or tcfg.dev_fraction > 0 or tcfg.interpolate != 1.0):
        # Corpus or mined negatives would re-encode the corpus through the changing encoder every
        # step; a dev slice (and WiSE-FT's choice of weight) scores heads on cached vectors of an
        # encoder that no longer exists.
        raise UserError(f"--strategy full trains the encoder: it takes in-batch negatives, no dev slice and no "
                        f"interpolation (preset {tcfg.preset!r} has negatives={tcfg.negatives}, dev_fraction="
                        f"{tcfg.dev_fraction}, interpolate={tcfg.interpolate}); use preset jepa or study, or hybrid, "
                        "whose phase 1 takes them")
    return resolved


# ---------------------------------------------------------------------------------------------
# Validation (hybrid): is phase 1 good enough to unfreeze the encoder?


@dataclasses.dataclass
class Validation:
    """What phase 1 is judged on (a `loop.DevSet`), and phase 1's own config (its pairs exclude held-out queries)."""

    dev: DevSet  # held-out queries scored as eval scores them: NDCG@10 over the whole corpus
    origin: str
    train: TrainConfig


def _write_pairs(path: Path, pairs: Pairs, store: Store) -> None:
    """A pairs file (JSONL of ids) that `train-heads --pairs` reads back to the same pairs."""
    query_ids, doc_ids = store.queries.ids, store.corpus.ids
    lines = []
    for i in range(len(pairs)):
        line = {"query_id": query_ids[pairs.query_rows[i]], "doc_id": doc_ids[pairs.doc_rows[i]]}
        if pairs.neg_rows is not None:
            line["negative_id"] = doc_ids[pairs.neg_rows[i]]
        lines.append(json.dumps(line) + "\n")
    atomic_write_bytes(path, "".join(lines).encode())


def validation_split(cfg: LiveConfig, store: Store, out: Path, device: torch.device) -> Validation:
    """The dataset's `val_split` qrels when it has them; else a seeded slice of the training queries held out.

    Held-out queries are written out of phase 1's pairs (`out/phase1-pairs.jsonl`, recorded in
    phase 1's config.json), so `train-heads --pairs` on that file repeats phase 1 exactly; they
    are judged by their training pairs (relevance 1). The slice depends on `val_seed` only, so
    every training seed is validated on the same queries.
    """
    tcfg = cfg.train
    dataset = recorded_dataset(store.provenance["dataset"], tcfg.dataset, tcfg.data_dir)
    corpus = torch.from_numpy(store.corpus.vectors(np.float32)).to(device)
    if cfg.val_split in dataset.splits():
        if cfg.val_split == tcfg.train_split and not tcfg.pairs:
            raise UserError(f"--val-split {cfg.val_split}: the training split itself; validate on another split")
        qrels = read_qrels(dataset.qrels_path(cfg.val_split))
        qids = [q for q in qrels if q in store.queries.row_of]
        queries = store.queries.vectors(np.float32, np.array([store.queries.row_of[q] for q in qids], dtype=np.int64))
        dev = DevSet(torch.from_numpy(queries).to(device), qids, corpus, store.corpus.ids, {q: qrels[q] for q in qids})
        return Validation(dev, f"{dataset.name}/{cfg.val_split} ({len(qids):,} queries)", tcfg)
    all_pairs = load_pairs(dataclasses.replace(tcfg, max_pairs=None), store)
    fit_pairs, held = all_pairs.hold_out(cfg.val_fraction, cfg.val_seed)
    path = out / "phase1-pairs.jsonl"
    _write_pairs(path, fit_pairs, store)
    origin = (f"{held.origin} held out ({dataset.name} has no {cfg.val_split!r} split); "
              f"phase 1 trains on the other {len(fit_pairs):,} pairs ({path})")
    dev = DevSet.from_pairs(held, store, corpus, device)
    return Validation(dev, origin, dataclasses.replace(tcfg, pairs=str(path)))


# ---------------------------------------------------------------------------------------------
# Strategies


@dataclasses.dataclass
class _Trained:
    """What a strategy leaves to be saved."""

    heads: Heads
    history: list[dict]
    epoch_seconds: list[float]
    trainable: int
    train_cfg: TrainConfig  # of the heads: the pairs they saw
    model: JEPAEncoder | None = None  # set when the encoder changed
    validation: dict | None = None


def _train_through_encoder(cfg: LiveConfig, store: Store, pairs: Pairs, folder: Path, device: torch.device,
                           heads: Heads | None, encoder_lr: float, epochs: int,
                           log: Callable[[str], None]) -> tuple[JEPAEncoder, FitResult, int]:
    """`loop.fit` with the encoder trainable: fresh heads (full) or phase 1's (hybrid); in-batch negatives."""
    tcfg = cfg.train
    index = PairIndex.build(pairs, device, same_id=same_id_rows(store))
    query_texts, doc_texts = store_texts(store, tcfg.dataset, tcfg.data_dir, index.query_rows, index.doc_rows)
    base = load_encoder(folder, device)  # loaded before seeding, as train.train loads a live source
    torch.manual_seed(tcfg.seed)  # heads init, dropout masks
    if heads is None:
        init_vectors = torch.from_numpy(store.corpus.vectors(np.float32, index.doc_rows))
        heads = build_heads(tcfg, store.dim, init_vectors).to(device)
    model = JEPAEncoder(base, freeze_base=False, heads=heads, base_dropout=cfg.encoder_dropout,
                        gradient_checkpointing=cfg.gradient_checkpointing, device=device)
    optimizer = torch.optim.AdamW(model.param_groups(encoder_lr, cfg.head_lr, tcfg.weight_decay))
    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    optim = dataclasses.replace(tcfg.group(OptimConfig), epochs=epochs)
    data = dataclasses.replace(tcfg.group(DataConfig), negatives="batch")
    steps = epochs * math.ceil(index.items(data.sampling) / optim.batch_size)
    mode = "train mode, dropout on" if cfg.encoder_dropout else "eval mode, no dropout"
    prompts = store_prompts(store)
    log(f"{describe(heads)}\nencoder {folder}: trainable at lr {encoder_lr:g} ({mode}"
        f"{', gradient checkpointing' if cfg.gradient_checkpointing else ''}"
        f"{f', prompts {prompts}' if any(prompts.values()) else ''}); heads at lr {cfg.head_lr:g}; "
        f"{trainable:,} trainable parameters; {len(pairs):,} pairs, {epochs} {data.sampling} epoch(s) × "
        f"{steps // epochs} steps of {optim.batch_size}, in-batch negatives, {optim.schedule} lr, on {device}")
    model.train()
    with tqdm(total=steps, unit="step", desc="train-live", dynamic_ncols=True, mininterval=5) as bar:
        def on_step(record: dict) -> None:
            bar.update(1)
            bar.set_postfix_str(f"loss {record['loss']:.4f}", refresh=False)

        result = fit(model.heads, build_criterion(tcfg.group(LossConfig), tcfg.seed),
                     EncoderSource(model, query_texts, doc_texts, prompts), index, optimizer, optim, data,
                     seed=tcfg.seed, on_step=on_step, log=log)
    return model.eval(), result, trainable


def _full(cfg: LiveConfig, store: Store, folder: Path, device: torch.device, out: Path,
          log: Callable[[str], None]) -> _Trained:
    model, fitted, trainable = _train_through_encoder(cfg, store, load_pairs(cfg.train, store), folder, device, None,
                                                      cfg.encoder_lr, cfg.train.epochs, log)
    return _Trained(model.heads, fitted.history, fitted.epoch_seconds, trainable, cfg.train, model)


def _hybrid(cfg: LiveConfig, store: Store, folder: Path, device: torch.device, out: Path,
            log: Callable[[str], None]) -> _Trained:
    split = validation_split(cfg, store, out, device)
    log(f"hybrid phase 1: train-heads on the cache; validation: {split.origin}")
    phase1 = train(dataclasses.replace(split.train, out=str(out / "phase1"), overwrite=True), log=log)
    vanilla, achieved = split.dev.score(None), split.dev.score(phase1.heads)
    # The study's rule, unfreeze only if phase 1 works: reach --threshold, or by default beat vanilla.
    passed = achieved > vanilla if cfg.threshold is None else achieved >= cfg.threshold
    validation = {"from": split.origin, "queries": len(split.dev), "vanilla_ndcg@10": vanilla,
                  "phase1_ndcg@10": achieved, "threshold": cfg.threshold,
                  "rule": "> vanilla" if cfg.threshold is None else ">= --threshold", "phase2": passed,
                  "phase1_seconds": phase1.seconds}
    log(f"phase 1 validation NDCG@10 {achieved:.4f} (vanilla {vanilla:.4f}; phase 2 needs {validation['rule']}"
        f"{f' {cfg.threshold:.4f}' if cfg.threshold is not None else ''}): "
        + ("phase 2 unfreezes the encoder" if passed else "phase 2 skipped; phase 1's heads are the result"))
    counts = phase1.heads.parameter_counts()["total"]
    if not passed:
        return _Trained(phase1.heads, phase1.history, phase1.epoch_seconds, counts, phase1.config,
                        validation=validation)
    model, fitted, trainable = _train_through_encoder(cfg, store, load_pairs(phase1.config, store), folder, device,
                                                      phase1.heads, cfg.phase2_encoder_lr, cfg.phase2_epochs, log)
    steps, epochs = len(phase1.history), max(r["epoch"] for r in phase1.history) + 1  # phase 2 numbered on
    history = phase1.history + [{**r, "step": r["step"] + steps, "epoch": r["epoch"] + epochs} for r in fitted.history]
    return _Trained(model.heads, history, phase1.epoch_seconds + fitted.epoch_seconds, trainable, phase1.config, model,
                    validation)


def _frozen_live(cfg: LiveConfig, store: Store, out: Path, log: Callable[[str], None]) -> TrainResult:
    """The loop the user ran before the cache: train-heads with the frozen encoder run on every batch."""
    if world(cfg.train.device).distributed:
        raise UserError("frozen-live encodes every batch through the encoder: one process only (drop torchrun)")
    tcfg = cfg.train

    def make_source(index: PairIndex, device: torch.device):
        return frozen_live_source(cfg.model, store, tcfg.dataset, tcfg.data_dir, index.query_rows, index.doc_rows,
                                  device, cfg.encode_batch_size, log)

    return train(dataclasses.replace(tcfg, out=str(out)), log=log, make_source=make_source)


def _save_encoder(model: JEPAEncoder, out: Path, prompts: dict[str, str]) -> tuple[Path, str]:
    """Save the base as a sentence-transformers folder, whole or not at all; returns it and its weights' sha256.

    The folder carries `prompts` as its `query` and `document` prompts, which `encode_query` /
    `encode_document` (and build's defaults) pick first; the model's other prompts stay.
    """
    final = out / ENCODER_DIR
    model.base.prompts = {**model.base.prompts, **prompts}
    with atomic_dir(final, replace=True) as partial:
        model.base.save(str(partial), create_model_card=False)
    return final, weights_sha256(final)


def _save(cfg: LiveConfig, store: Store, done: _Trained, out: Path, device: torch.device, seconds: float) -> dict:
    """Heads, their config, steps and (when it changed) the encoder; returns heads.json["training"]."""
    store_meta, prompts = store_record(store), store_prompts(store)
    if done.model is not None:
        encoder, sha = _save_encoder(done.model, out, prompts)
        store_meta = {"path": None, "fingerprint": None, "encoder_fingerprint": encoder_fingerprint(sha, prompts),
                      "encoder": str(encoder), "prompts": prompts, "dataset": store.dataset_name, "imported": False,
                      "trained_from": store_meta}
    last_epoch = [r for r in done.history if r["epoch"] == done.history[-1]["epoch"]]
    pairs = load_pairs(done.train_cfg, store)
    record = training_record(
        strategy=cfg.strategy, preset=cfg.train.preset, pairs=len(pairs), pairs_from=pairs.origin, history=done.history,
        final=mean_parts(last_epoch), seconds=seconds, epoch_seconds=done.epoch_seconds, device=str(device),
        trainable_parameters=done.trainable, live=True, encoder_changed=done.model is not None,
        validation=done.validation)
    remove_corrections(out)  # corrections of earlier heads in this folder must not sit beside these
    save_heads(done.heads, out, {"store": store_meta, "training": record})
    atomic_write_json(out / CONFIG_FILE, done.train_cfg)
    atomic_write_bytes(out / STEPS_FILE, "".join(json.dumps(r) + "\n" for r in done.history).encode())
    return record


def train_live(cfg: LiveConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Run one live strategy and save its heads (and the changed encoder) under `cfg.train.out`.

    Output folder: heads.safetensors + heads.json (their encoder fingerprint is the encoder they
    go with), config.json (the heads' resolved TrainConfig), steps.jsonl, live.json (this config
    resolved, the encoder, validation, timings), `encoder/` when the encoder changed, and for
    hybrid `phase1/` (a train-heads folder) and, without a dev split, phase1-pairs.jsonl.
    """
    cfg = resolve_live(cfg)
    store = open_store(cfg.train.store)
    cfg = dataclasses.replace(cfg, train=with_width(cfg.train, store.dim))
    tcfg = cfg.train
    out = Path(tcfg.out) if tcfg.out else default_out(DEFAULT_LIVE_DIR, store.dataset_name,
                                                      f"{cfg.strategy}-{tcfg.preset}-s{tcfg.seed}")
    if (out / SUMMARY_FILE).exists() and not tcfg.overwrite:
        raise UserError(f"{out}: already holds a train-live result; choose another --out or pass --overwrite")
    t0 = time.perf_counter()
    folder = live_encoder_folder(cfg.model, store)
    if cfg.strategy == "frozen-live":
        result = _frozen_live(cfg, store, out, log)
        heads, history, epoch_seconds, record = result.heads, result.history, result.epoch_seconds, result.record
        changed = False
    else:
        with exclusive_lock(out, "train-live"):
            out.mkdir(parents=True, exist_ok=True)
            device = pick_device(tcfg.device)
            done = (_full if cfg.strategy == "full" else _hybrid)(cfg, store, folder, device, out, log)
            record = _save(cfg, store, done, out, device, time.perf_counter() - t0)
        heads, history, epoch_seconds, changed = done.heads, done.history, done.epoch_seconds, done.model is not None
    encoder = out / ENCODER_DIR if changed else folder
    seconds = time.perf_counter() - t0
    atomic_write_json(out / SUMMARY_FILE, {
        "strategy": cfg.strategy, "config": cfg, "validation": record["validation"], "seconds": round(seconds, 3),
        "trainable_parameters": record["trainable_parameters"], "steps": len(history), "finished": record["finished"],
        "encoder": {"path": str(encoder), "changed": changed, "base": str(folder),
                    "weights_sha256": weights_sha256(encoder), "prompts": store_prompts(store)},
    })
    log(f"train-live {cfg.strategy}: {seconds:.1f} s; heads: {out}"
        + (f"; fine-tuned encoder: {encoder}" if changed else ""))
    return TrainResult(out, heads.eval(), cfg, history, epoch_seconds, seconds, record, encoder)
