"""Run a recipe: stores -> heads (or corrections) per row and seed -> eval -> report.

Every stage output is content-addressed: its folder name ends in a hash of its config and of the
fingerprints of its inputs, so an unchanged stage is reused and a changed setting reruns only
what depends on it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from .adapt import AdaptConfig, adapt_store
from .build import build
from .config import BuildConfig, EvalConfig, ImportConfig
from .datasets import find_dataset
from .evaluate import evaluate
from .files import atomic_dir, canonical_hash, read_json
from .importer import import_vectors
from .live import SUMMARY_FILE, resolve_live, train_live
from .models import DEFAULT_MODEL, weights_sha256
from .pairs import qrels_pairs
from .recipe import LIVE, Recipe, Row
from .report import write_report
from .resolve import resolve_config
from .store import default_store_path, open_store
from .train import train

REFERENCE_ENV = "JEPA_CACHE_REFERENCE"
_NOT_KEYED = ("out", "store", "allow_test_training")  # change no result: not part of a stage's content address


class Runner:
    """Executes a recipe under runs/<name>/, reusing every stage whose inputs are unchanged."""

    def __init__(self, recipe: Recipe, runs_dir: Path = Path("runs"), encode: bool = False,
                 log: Callable[[str], None] = print):
        self.recipe, self.encode, self.log = recipe, encode, log
        self.root = runs_dir / recipe.name
        self.stores: dict[str, Any] = {}
        self.reused = self.computed = 0

    # -- stage 1 ---------------------------------------------------------------------------------
    def store(self, dataset: str, encoder: Path | None = None):
        """The dataset's store: imported from reference vectors when allowed and present, else built.

        With `encoder` (a fine-tuned folder), the store that encoder builds, under
        runs/<name>/stores/<dataset>/<its weights' sha256>.
        """
        if encoder is not None:
            out = self.root / "stores" / dataset / weights_sha256(encoder)[:12]
            if (out / "zarr.json").is_file() and open_store(out, require_complete=False).complete:
                self.reused += 1
                return open_store(out)
            self.log(f"[{dataset}] encoding with the fine-tuned encoder {encoder}")
            self.computed += 1
            return build(BuildConfig(dataset=dataset, model=str(encoder), out=str(out), data_dir=self.recipe.data_dir),
                         log=self.log)
        if dataset in self.stores:
            return self.stores[dataset]
        reference = Path(os.environ.get(REFERENCE_ENV, "")) / dataset if os.environ.get(REFERENCE_ENV) else None
        may_import = self.recipe.vectors == "reference" and not self.encode and self.recipe.model == DEFAULT_MODEL
        use_reference = may_import and reference is not None and (reference / "corpus.f32.npy").is_file()
        # one default store per (dataset, encoder), where build, import and eval look: data/cache/<dataset>/<model>
        out = default_store_path(dataset, self.recipe.model)
        found = open_store(out, require_complete=False) if (out / "zarr.json").is_file() else None
        source = found.provenance.get("source") if found is not None else None
        if may_import and source == "imported" and found.complete:  # also in a shell without $JEPA_CACHE_REFERENCE
            store = open_store(out)
            self.reused += 1
        # a built store serves every recipe; build() below checks and reuses it
        elif use_reference and source != "built":
            self.log(f"[{dataset}] importing reference vectors from {reference}")
            store = import_vectors(ImportConfig(
                dataset=dataset, corpus=str(reference / "corpus.f32.npy"), corpus_ids=str(reference / "corpus.ids.txt"),
                queries=str(reference / "queries.f32.npy"), query_ids=str(reference / "queries.ids.txt"),
                model=self.recipe.model, out=str(out), data_dir=self.recipe.data_dir), log=self.log)
            self.computed += 1
        else:
            if source == "imported":
                self.log(f"[{dataset}] {out} holds imported vectors; encoding replaces them")
            store = build(BuildConfig(dataset=dataset, model=self.recipe.model, out=str(out),
                                      data_dir=self.recipe.data_dir, overwrite=source == "imported"), log=self.log)
        self.stores[dataset] = store
        return store

    # -- stage 2 ---------------------------------------------------------------------------------
    def _run(self, store, seed: int) -> dict[str, Any]:
        """Where and on what a row trains: the training collection's store and split, and the seed."""
        return dict(store=str(store.path), dataset=self.recipe.train_dataset, data_dir=self.recipe.data_dir,
                    train_split=self.recipe.train_split, seed=seed, allow_test_training=True)  # load_recipe checked

    def heads(self, row: Row, seed: int) -> Path:
        """Train (or reuse) the heads of one frozen row and seed."""
        store = self.store(self.recipe.train_dataset)
        cfg = resolve_config(row.train_config(**self._run(store, seed)))
        key = canonical_hash({"config": {k: v for k, v in vars(cfg).items() if k not in _NOT_KEYED},
                              "store": store.fingerprint})[:12]
        out = self.root / "heads" / f"{row.name}-s{seed}-{key}"
        if (out / "heads.json").is_file():
            self.reused += 1
            return out
        self.log(f"[{row.name} seed {seed}] training heads on "
                 f"{self.recipe.train_dataset}/{self.recipe.train_split}")
        cfg.out, cfg.overwrite = str(out), True
        train(cfg, log=self.log)
        self.computed += 1
        return out

    def live(self, row: Row, seed: int) -> tuple[Path, Path | None]:
        """Train (or reuse) one live row and seed: its heads folder, and its encoder when that changed."""
        store = self.store(self.recipe.train_dataset)
        cfg = resolve_live(row.live_config(**self._run(store, seed)))
        train_keyed = {k: v for k, v in vars(cfg.train).items() if k not in _NOT_KEYED}
        key = canonical_hash({"config": {**vars(cfg), "train": train_keyed}, "store": store.fingerprint})[:12]
        out = self.root / "live" / f"{row.name}-s{seed}-{key}"
        if (out / SUMMARY_FILE).is_file():
            self.reused += 1
        else:
            self.log(f"[{row.name} seed {seed}] train-live {row.strategy} on "
                     f"{self.recipe.train_dataset}/{self.recipe.train_split}")
            cfg.train.out, cfg.train.overwrite = str(out), True
            train_live(cfg, log=self.log)
            self.computed += 1
        encoder = read_json(out / SUMMARY_FILE)["encoder"]
        return out, Path(encoder["path"]) if encoder["changed"] else None

    def nudge(self, seed: int) -> Path:
        """NUDGE-N as published (nudge-ft's choice of γ on a held-out 20%, seeded by `seed`; no refit), or reuse it."""
        store = self.store(self.recipe.train_dataset)
        key = canonical_hash({"store": store.fingerprint, "split": self.recipe.train_split, "seed": seed})[:12]
        out = self.root / "nudge" / f"nudge-s{seed}-{key}"
        if (out / "corrections.json").is_file():
            self.reused += 1
            return out
        self.log(f"[nudge seed {seed}] NUDGE-N on {self.recipe.train_dataset}/{self.recipe.train_split}")
        t0 = time.perf_counter()
        dataset = find_dataset(self.recipe.train_dataset, self.recipe.data_dir)
        pairs = qrels_pairs(store, dataset.qrels_path(self.recipe.train_split))
        corrections = adapt_store(AdaptConfig("nudge-n", "nudge-ft"), store, pairs, dev_seed=seed, log=self.log)
        corrections.record["seconds"] = round(time.perf_counter() - t0, 3)
        with atomic_dir(out) as tmp:
            corrections.save(tmp)
        self.computed += 1
        return out

    # -- stage 3 ---------------------------------------------------------------------------------
    def evaluate(self, row: Row, seed: int | None, heads: Path | None, dataset: str,
                 encoder: Path | None = None, corrections: Path | None = None) -> dict:
        """Score one row and seed on one dataset (or reuse the score)."""
        store = self.store(dataset, encoder)
        heads_fp = read_json(heads / "heads.json")["weights"]["sha256"] if heads else None
        folder = corrections or heads
        corr_fp = (canonical_hash(read_json(folder / "corrections.json"))
                   if folder and (folder / "corrections.json").is_file() else None)
        cfg = EvalConfig(datasets=[dataset], split=self.recipe.eval_split, store=str(store.path),
                         model=self.recipe.model, data_dir=self.recipe.data_dir, heads=str(heads) if heads else None,
                         corrections=str(corrections) if corrections else None,
                         query_tower=row.query_tower, similarity=row.similarity)
        keyed = {k: v for k, v in vars(cfg).items() if k not in ("out", "store", "heads", "corrections")}
        key = canonical_hash({"config": keyed,
                              "store": store.fingerprint, "heads": heads_fp, "corrections": corr_fp})[:12]
        out = self.root / "eval" / f"{row.name}-s{seed}-{dataset}-{key}"
        if (out / "results.json").is_file():
            self.reused += 1
            return read_json(out / "results.json")
        cfg.out = str(out)
        self.computed += 1
        return evaluate(cfg, log=lambda s: None)

    # -- all -------------------------------------------------------------------------------------
    def train_row(self, row: Row, seed: int | None) -> tuple[Path | None, Path | None, Path | None]:
        """One row and seed trained (or reused): its heads, its changed encoder, its own corrections (each or None)."""
        if row.strategy in LIVE:  # a live row that changed the encoder is scored on stores that encoder builds
            return *self.live(row, seed), None
        if row.strategy == "nudge":
            return None, None, self.nudge(seed)
        return (None if row.strategy == "vanilla" else self.heads(row, seed)), None, None

    def run(self) -> dict:
        """Every row, seed and dataset; the report under runs/<name>/."""
        t0 = time.perf_counter()
        r = self.recipe
        rows = []
        for row in r.strategies:
            for seed in [None] if row.strategy == "vanilla" else row.seeds:
                heads, encoder, corrections = self.train_row(row, seed)
                meta = read_json(heads / "heads.json") if heads else {}
                adapted = (meta.get("training", {}).get("adapt") or {}) if meta else {}
                if corrections is not None:
                    record = read_json(corrections / "corrections.json")
                    adapted = {"documents": len(record["doc_ids"]), "seconds": record["record"]["seconds"]}
                for dataset in r.eval_datasets:
                    own = corrections if dataset == r.train_dataset else None  # elsewhere the base vectors apply
                    one = self.evaluate(row, seed, heads, dataset, encoder, own)["datasets"][dataset]
                    rows.append({
                        "name": row.name, "strategy": row.strategy, "seed": seed, "dataset": dataset,
                        "in_domain": dataset == r.train_dataset, "metrics": one["metrics"],
                        "per_query": one["files"]["per_query"], "store_source": one["store"]["source"],
                        "store": one["store"]["path"], "heads": str(heads) if heads else None,
                        "trainable_params": meta["training"]["trainable_parameters"] if meta else 0,
                        "corrected_docs": adapted.get("documents", 0),
                        "train_seconds": meta["training"]["seconds"] if meta else adapted.get("seconds", 0.0),
                    })
        summary = write_report(self.root, r, rows, self.stores)
        self.log(f"stages: {self.computed} computed, {self.reused} reused; {time.perf_counter() - t0:.1f} s")
        return summary
