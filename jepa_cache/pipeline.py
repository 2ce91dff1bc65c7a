"""Run a `pipelines/*.toml` recipe: stores -> heads per strategy and seed -> eval -> report.

Every stage output is content-addressed: its folder name ends in a hash of its config and of the
fingerprints of its inputs, so an unchanged stage is reused and a changed setting reruns only
what depends on it.
"""

from __future__ import annotations

import os
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .config import EvalConfig, ImportConfig, LiveConfig, TrainConfig
from .errors import UserError
from .files import canonical_hash, check_name, read_json
from .models import DEFAULT_MODEL
from .presets import DEFAULT_PRESET, LIVE_PRESET

REFERENCE_ENV = "JEPA_CACHE_REFERENCE"
KINDS = ("vanilla", "nudge", "frozen-isotropy", "frozen-predictor", "full", "hybrid")
UNTRAINED = ("vanilla", "nudge")  # no heads: the base vectors, or NUDGE-N's corrections of them as published
LIVE_KINDS = ("full", "hybrid")
VECTORS = ("reference", "build")
_TRAIN_FIELDS = {f.name for f in fields(TrainConfig)} - {"store", "out", "dataset", "data_dir", "train_split", "seed",
                                                         "strategy", "overwrite", "allow_test_training"}
_NOT_KEYED = ("out", "store", "allow_test_training")  # change no result: not part of a stage's content address
_LIVE_FIELDS = {f.name for f in fields(LiveConfig)} - {"train", "strategy"}  # options of the live kinds too


@dataclass
class Strategy:
    """One row of the comparison: a kind of training (or none), its preset, overrides and seeds."""

    name: str
    kind: str
    preset: str = DEFAULT_PRESET  # LIVE_PRESET for `full`
    seeds: list[int] = field(default_factory=lambda: [0])
    options: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides
    query_tower: str | None = None
    similarity: str | None = None


@dataclass
class Recipe:
    name: str
    train_dataset: str
    eval_datasets: list[str]  # the training dataset is in-domain; every other is zero-shot
    strategies: list[Strategy]
    model: str = DEFAULT_MODEL
    train_split: str = "train"
    eval_split: str = "test"
    vectors: str = "reference"  # reference: import $JEPA_CACHE_REFERENCE/<dataset> when there; build: encode
    data_dir: str | None = None
    allow_test_training: bool = False  # [train]: train on the split eval scores, on purpose


def _expect(path: Path, where: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise UserError(f"{path}: {where} must be {names} ({what}), got {type(value).__name__} {value!r}")
    return value


_FIELD_TYPES = {f.name: str(f.type) for f in (*fields(TrainConfig), *fields(LiveConfig))}
_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _known_keys(path: Path, where: str, table: dict, known: set[str]) -> None:
    if unknown := set(table) - known:
        raise UserError(f"{path}: {where}: unknown key(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(sorted(known))}")


def _name(path: Path, where: str, value: str, what: str) -> str:
    """A recipe, strategy or dataset name becomes a folder name: no paths, no `..`."""
    try:
        return check_name(value, what)
    except UserError as e:
        raise UserError(f"{path}: {where}: {e}") from None


def _option_type(path: Path, where: str, value: Any, annotation: str) -> None:
    """A TOML value of the type the config field declares (`int | None`, `float`, ...), so no TypeError comes later."""
    kinds = [k.strip() for k in annotation.split("|") if k.strip() != "None"]
    ok = any(isinstance(value, _TYPES[k]) and (k == "bool" or not isinstance(value, bool))
             for k in kinds if k in _TYPES)
    if not ok and all(k in _TYPES for k in kinds):
        raise UserError(f"{path}: {where} must be {' or '.join(kinds)}, got {type(value).__name__} {value!r}")


def _resolve(path: Path, where: str, strategy: Strategy) -> None:
    """Resolve a strategy's settings as its stage will, so a bad value is refused before any stage runs."""
    if strategy.kind in UNTRAINED:
        if strategy.options:
            raise UserError(f"{path}: {where} ({strategy.name}): kind {strategy.kind} takes no options")
        return
    try:
        if strategy.kind in LIVE_KINDS:
            from .live import resolve_live  # noqa: PLC0415

            train_options = {k: v for k, v in strategy.options.items() if k in _TRAIN_FIELDS}
            resolve_live(LiveConfig(train=TrainConfig(store="", preset=strategy.preset, **train_options),
                                    strategy=strategy.kind,
                                    **{k: v for k, v in strategy.options.items() if k not in _TRAIN_FIELDS}))
        else:
            from .train import resolve_config  # noqa: PLC0415

            resolve_config(TrainConfig(store="", strategy=strategy.kind, preset=strategy.preset, **strategy.options))
    except UserError as e:
        raise UserError(f"{path}: {where} ({strategy.name}): {e}") from None


def _read_toml(path: Path) -> dict:
    """The recipe file's TOML, refused in one line when missing or malformed."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: recipe not found (see pipelines/ for examples)") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None


def _strategy(path: Path, i: int, s) -> Strategy:
    """One [[strategies]] table, checked key by key."""
    where = f"strategies[{i}]"
    _expect(path, where, s, dict, "a table")
    _known_keys(path, where, s, {"name", "kind", "preset", "seeds", "options", "query_tower", "similarity"})
    kind = s.get("kind", s.get("name"))
    if kind not in KINDS:
        raise UserError(f"{path}: {where}.kind = {kind!r} is not a strategy; choose one of {', '.join(KINDS)}")
    options = _expect(path, f"{where}.options", s.get("options", {}), dict, "TrainConfig overrides")
    if bad := set(options) - _TRAIN_FIELDS - (_LIVE_FIELDS if kind in LIVE_KINDS else set()):
        raise UserError(f"{path}: {where}.options: unknown setting(s) {', '.join(sorted(bad))}")
    for key, value in options.items():
        _option_type(path, f"{where}.options.{key}", value, _FIELD_TYPES[key])
    for key, allowed in (("query_tower", ("projection", "predictor", "vanilla")), ("similarity", ("cos", "l2"))):
        if s.get(key) is not None and s[key] not in allowed:
            raise UserError(f"{path}: {where}.{key} = {s[key]!r}; choose one of {', '.join(allowed)}")
    seeds = _expect(path, f"{where}.seeds", s.get("seeds", [0]), list, "a list of integers")
    if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise UserError(f"{path}: {where}.seeds must be a non-empty list of integers")
    preset = s.get("preset", LIVE_PRESET if kind == "full" else DEFAULT_PRESET)
    return Strategy(
        name=_expect(path, f"{where}.name", s.get("name", kind), str, "a label"), kind=kind,
        preset=_expect(path, f"{where}.preset", preset, str, "a preset name"),
        seeds=seeds, options=options, query_tower=s.get("query_tower"), similarity=s.get("similarity"),
    )


def _strategies(path: Path, raw: dict) -> list[Strategy]:
    """Every [[strategies]] table, with unique names usable as folder names, each resolved."""
    tables = _expect(path, "[[strategies]]", raw.get("strategies"), list, "an array of tables")
    strategies = [_strategy(path, i, s) for i, s in enumerate(tables)]
    if not strategies:
        raise UserError(f"{path}: no [[strategies]]")
    names = [s.name for s in strategies]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: strategy names must be unique, got {names}")
    for i, strategy in enumerate(strategies):
        _name(path, f"strategies[{i}].name", strategy.name, "strategy")  # it names folders under runs/<name>/
        _resolve(path, f"strategies[{i}]", strategy)
    return strategies


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Parse and validate a recipe; every error names the file and the key."""
    path = Path(path)
    raw = _read_toml(path)
    known = {"name", "model", "vectors", "data_dir", "train", "eval", "strategies"}
    if unknown := set(raw) - known:
        raise UserError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    train = _expect(path, "[train]", raw.get("train"), dict, "a table with dataset and split")
    ev = _expect(path, "[eval]", raw.get("eval"), dict, "a table with datasets and split")
    _known_keys(path, "[train]", train, {"dataset", "split", "allow_test_training"})
    _known_keys(path, "[eval]", ev, {"datasets", "split"})
    datasets = _expect(path, "eval.datasets", ev.get("datasets"), list, "a list of dataset names")
    if not datasets or not all(isinstance(d, str) for d in datasets):
        raise UserError(f"{path}: eval.datasets must be a non-empty list of dataset names")
    for d in datasets:
        _name(path, "eval.datasets", d, "dataset")
    data_dir = raw.get("data_dir")
    if data_dir is not None:
        _expect(path, "data_dir", data_dir, str, "the folder holding the datasets")
    vectors = raw.get("vectors", "reference")
    if vectors not in VECTORS:
        raise UserError(f"{path}: vectors = {vectors!r}; choose {' or '.join(VECTORS)}")
    strategies = _strategies(path, raw)
    train_dataset = _expect(path, "train.dataset", train.get("dataset"), str, "a dataset name")
    recipe = Recipe(
        name=_name(path, "name", _expect(path, "name", raw.get("name", path.stem), str, "the run's name"), "recipe"),
        model=_expect(path, "model", raw.get("model", DEFAULT_MODEL), str, "a hub id or folder"),
        train_dataset=_name(path, "train.dataset", train_dataset, "dataset"),
        train_split=_expect(path, "train.split", train.get("split", "train"), str, "a qrels split"),
        eval_datasets=datasets, eval_split=_expect(path, "eval.split", ev.get("split", "test"), str, "a qrels split"),
        strategies=strategies, vectors=vectors, data_dir=raw.get("data_dir"),
        allow_test_training=_expect(path, "train.allow_test_training", train.get("allow_test_training", False), bool,
                                    "true to train on the scored split"),
    )
    _check_scored_split(path, recipe)
    return recipe


def _check_scored_split(path: Path, recipe: Recipe) -> None:
    """Refuse training on a split the recipe scores (the training dataset's eval split) unless it says so."""
    if (recipe.train_split == recipe.eval_split and recipe.train_dataset in recipe.eval_datasets
            and not recipe.allow_test_training):
        raise UserError(f"{path}: train.split = {recipe.train_split!r} is the split eval scores on "
                        f"{recipe.train_dataset}, "
                        "so the table would measure the training queries; train on another split, or set "
                        "allow_test_training = true under [train] if you mean it")


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
            from .build import build  # noqa: PLC0415
            from .config import BuildConfig  # noqa: PLC0415
            from .models import weights_sha256  # noqa: PLC0415
            from .store import open_store  # noqa: PLC0415

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
        from .build import build  # noqa: PLC0415
        from .config import BuildConfig  # noqa: PLC0415
        from .models import model_folder_name  # noqa: PLC0415
        from .store import default_store_path, open_store  # noqa: PLC0415

        reference = Path(os.environ.get(REFERENCE_ENV, "")) / dataset if os.environ.get(REFERENCE_ENV) else None
        may_import = self.recipe.vectors == "reference" and not self.encode and self.recipe.model == DEFAULT_MODEL
        use_reference = may_import and reference is not None and (reference / "corpus.f32.npy").is_file()
        # one default store per (dataset, encoder), where build, import and eval look: data/cache/<dataset>/<model>
        out = default_store_path(dataset, Path(model_folder_name(self.recipe.model)))
        found = open_store(out, require_complete=False) if (out / "zarr.json").is_file() else None
        source = found.provenance.get("source") if found is not None else None
        if may_import and source == "imported" and found.complete:  # also in a shell without $JEPA_CACHE_REFERENCE
            store = open_store(out)
            self.reused += 1
        # a built store serves every recipe; build() below checks and reuses it
        elif use_reference and source != "built":
            from .importer import import_vectors  # noqa: PLC0415

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
    def heads(self, strategy: Strategy, seed: int) -> Path:
        """Train (or reuse) the heads of one frozen strategy and seed."""
        from .train import resolve_config, train  # noqa: PLC0415

        store = self.store(self.recipe.train_dataset)
        # load_recipe checked the options
        cfg = resolve_config(TrainConfig(store=str(store.path), dataset=self.recipe.train_dataset,
                                         data_dir=self.recipe.data_dir, train_split=self.recipe.train_split,
                                         strategy=strategy.kind, preset=strategy.preset,
                                         seed=seed, allow_test_training=True, **strategy.options))
        key = canonical_hash({"config": {k: v for k, v in vars(cfg).items() if k not in _NOT_KEYED},
                              "store": store.fingerprint})[:12]
        out = self.root / "heads" / f"{strategy.name}-s{seed}-{key}"
        if (out / "heads.json").is_file():
            self.reused += 1
            return out
        self.log(f"[{strategy.name} seed {seed}] training heads on "
                 f"{self.recipe.train_dataset}/{self.recipe.train_split}")
        cfg.out, cfg.overwrite = str(out), True
        train(cfg, log=self.log)
        self.computed += 1
        return out

    def live(self, strategy: Strategy, seed: int) -> tuple[Path, Path | None]:
        """Train (or reuse) one live strategy and seed: its heads folder, and its encoder when that changed."""
        from .live import SUMMARY_FILE, resolve_live, train_live  # noqa: PLC0415

        store = self.store(self.recipe.train_dataset)
        train_options = {k: v for k, v in strategy.options.items() if k in _TRAIN_FIELDS}
        cfg = resolve_live(LiveConfig(
            train=TrainConfig(store=str(store.path), dataset=self.recipe.train_dataset, data_dir=self.recipe.data_dir,
                              train_split=self.recipe.train_split, preset=strategy.preset, seed=seed,
                              allow_test_training=True, **train_options),  # load_recipe checked
            strategy=strategy.kind, **{k: v for k, v in strategy.options.items() if k not in _TRAIN_FIELDS}))
        train_keyed = {k: v for k, v in vars(cfg.train).items() if k not in _NOT_KEYED}
        key = canonical_hash({"config": {**vars(cfg), "train": train_keyed}, "store": store.fingerprint})[:12]
        out = self.root / "live" / f"{strategy.name}-s{seed}-{key}"
        if (out / SUMMARY_FILE).is_file():
            self.reused += 1
        else:
            self.log(f"[{strategy.name} seed {seed}] train-live {strategy.kind} on "
                     f"{self.recipe.train_dataset}/{self.recipe.train_split}")
            cfg.train.out, cfg.train.overwrite = str(out), True
            train_live(cfg, log=self.log)
            self.computed += 1
        encoder = read_json(out / SUMMARY_FILE)["encoder"]
        return out, Path(encoder["path"]) if encoder["changed"] else None

    def nudge(self, seed: int) -> Path:
        """NUDGE-N as published (nudge-ft's choice of γ on a held-out 20%, seeded by `seed`; no refit), or reuse it."""
        from .adapt import AdaptConfig, adapt_store  # noqa: PLC0415
        from .datasets import find_dataset  # noqa: PLC0415
        from .files import atomic_dir  # noqa: PLC0415
        from .pairs import qrels_pairs  # noqa: PLC0415

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
    def evaluate(self, strategy: Strategy, seed: int | None, heads: Path | None, dataset: str,
                 encoder: Path | None = None, corrections: Path | None = None) -> dict:
        from .evaluate import evaluate  # noqa: PLC0415

        store = self.store(dataset, encoder)
        heads_fp = read_json(heads / "heads.json")["weights"]["sha256"] if heads else None
        folder = corrections or heads
        corr_fp = (canonical_hash(read_json(folder / "corrections.json"))
                   if folder and (folder / "corrections.json").is_file() else None)
        cfg = EvalConfig(datasets=[dataset], split=self.recipe.eval_split, store=str(store.path),
                         model=self.recipe.model, data_dir=self.recipe.data_dir, heads=str(heads) if heads else None,
                         corrections=str(corrections) if corrections else None,
                         query_tower=strategy.query_tower, similarity=strategy.similarity)
        keyed = {k: v for k, v in vars(cfg).items() if k not in ("out", "store", "heads", "corrections")}
        key = canonical_hash({"config": keyed,
                              "store": store.fingerprint, "heads": heads_fp, "corrections": corr_fp})[:12]
        out = self.root / "eval" / f"{strategy.name}-s{seed}-{dataset}-{key}"
        if (out / "results.json").is_file():
            self.reused += 1
            return read_json(out / "results.json")
        cfg.out = str(out)
        self.computed += 1
        return evaluate(cfg, log=lambda s: None)

    # -- all -------------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.perf_counter()
        r = self.recipe
        rows = []
        for strategy in r.strategies:
            seeds = [None] if strategy.kind == "vanilla" else strategy.seeds
            for seed in seeds:
                # a live strategy that changed the encoder is scored on stores that encoder builds
                encoder = corrections = None
                if strategy.kind in LIVE_KINDS:
                    heads, encoder = self.live(strategy, seed)
                elif strategy.kind == "nudge":
                    heads, corrections = None, self.nudge(seed)
                else:
                    heads = None if strategy.kind == "vanilla" else self.heads(strategy, seed)
                meta = read_json(heads / "heads.json") if heads else {}
                adapted = (meta.get("training", {}).get("adapt") or {}) if meta else {}
                if corrections is not None:
                    record = read_json(corrections / "corrections.json")
                    adapted = {"documents": len(record["doc_ids"]), "seconds": record["record"]["seconds"]}
                for dataset in r.eval_datasets:
                    own = corrections if dataset == r.train_dataset else None  # elsewhere the base vectors apply
                    result = self.evaluate(strategy, seed, heads, dataset, encoder, own)
                    one = result["datasets"][dataset]
                    rows.append({
                        "strategy": strategy.name, "kind": strategy.kind, "seed": seed, "dataset": dataset,
                        "in_domain": dataset == r.train_dataset, "metrics": one["metrics"],
                        "per_query": one["files"]["per_query"], "store_source": one["store"]["source"],
                        "store": one["store"]["path"],
                        "heads": str(heads) if heads else None,
                        "trainable_params": meta["training"]["trainable_parameters"] if meta else 0,
                        "corrected_docs": adapted.get("documents", 0),
                        "train_seconds": meta["training"]["seconds"] if meta else adapted.get("seconds", 0.0),
                    })
        from .report import write_report  # noqa: PLC0415

        summary = write_report(self.root, r, rows, self.stores)
        self.log(f"stages: {self.computed} computed, {self.reused} reused; {time.perf_counter() - t0:.1f} s")
        return summary
