"""Stage 2: train heads on a store's cached vectors and write them: train-heads from settings to folder.

`train` resolves the settings (resolve.py), fits with the dev slice, refit and corrections they ask for
(refit.py), and writes heads.safetensors + heads.json (heads.py), config.json (every setting resolved) and
steps.jsonl (one line per step). Why the `best` preset is shaped so: pipelines/ABLATION.md.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import TrainConfig
from .corrections import Corrections
from .corrections import remove as remove_corrections
from .distributed import World, barrier, main_lock, rank_device, world
from .encoder import pick_device
from .errors import UserError
from .files import atomic_write_json
from .heads import META_FILE, Heads, save_heads
from .loop import FitResult, NonFiniteLoss, format_parts, mean_parts
from .pairs import Pairs, load_pairs
from .refit import SourceFactory, fit_and_refit, refit_corrections
from .resolve import resolve_config, with_width
from .store import Store, now_iso, open_store

DEFAULT_HEADS_DIR = Path("runs/heads")
STEPS_FILE = "steps.jsonl"
CONFIG_FILE = "config.json"


def default_out(root: Path, dataset: str, name: str) -> Path:
    """Where a run writes without --out: <root>/<dataset>/<name> (root: runs/heads, or runs/live for train-live)."""
    return root / dataset / name


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



def _out_folder(cfg: TrainConfig, store: Store) -> Path:
    """--out, or runs/heads/<dataset>/<preset>-<strategy>-s<seed>; refused when it holds heads and not --overwrite."""
    out = (
        Path(cfg.out)
        if cfg.out
        else default_out(DEFAULT_HEADS_DIR, store.dataset_name, f"{cfg.preset}-{cfg.strategy}-s{cfg.seed}")
    )
    if (out / META_FILE).exists() and not cfg.overwrite:
        raise UserError(f"{out}: already holds heads; choose another --out or pass --overwrite")
    return out


def _fit_and_record(
    cfg: TrainConfig, store: Store, pairs: Pairs, device: torch.device, w: World, log: Callable[[str], None],
    make_source: SourceFactory | None, partial: Path,
) -> tuple[Heads, FitResult, Corrections | None, float, dict]:
    """Fit, each step a line of `partial` (rank 0's), then the corrections dev chose; and the training record."""
    t0 = time.perf_counter()
    with open(partial if w.main else os.devnull, "w", encoding="utf-8") as steps_file:

        def write_step(record: dict, phase: str) -> None:
            steps_file.write(json.dumps({**record, "phase": phase} if cfg.refit else record) + "\n")

        heads, result, steps, dev_record, choice = fit_and_refit(
            cfg, store, pairs, device, w, log, write_step, make_source
        )
    corrections = refit_corrections(cfg, store, heads, pairs, choice, log) if choice is not None else None
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
    return heads, result, corrections, seconds, record


def _write(
    out: Path, heads: Heads, corrections: Corrections | None, meta: dict, cfg: TrainConfig, partial: Path
) -> None:
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
    out = _out_folder(cfg, store)
    device = pick_device(rank_device(cfg.device, w))
    with main_lock(out, "train-heads", w):
        log(f"{store.describe()}\ndevice {device}")
        created = w.main and not out.exists()
        if w.main:  # rank 0 writes; the other ranks only compute
            out.mkdir(parents=True, exist_ok=True)
        partial = out / f".{STEPS_FILE}.partial"
        try:
            heads, result, corrections, seconds, record = _fit_and_record(
                cfg, store, pairs, device, w, log, make_source, partial
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
        log(f"trained in {seconds:.1f} s; last epoch mean: {format_parts(record['final_epoch_mean'])}\nheads: {out}")
        return TrainResult(out, heads.eval(), cfg, result.history, result.epoch_seconds, seconds, record)
