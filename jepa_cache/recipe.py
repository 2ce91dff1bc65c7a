"""A `pipelines/*.toml` recipe read into typed rows, every value checked before any stage runs.

Each error names the file and the key, so a typo costs a second, not a half-finished study.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .config import LiveConfig, TrainConfig
from .errors import UserError
from .files import check_name
from .live import resolve_live
from .models import DEFAULT_MODEL
from .presets import DEFAULT_PRESET, LIVE_PRESET
from .resolve import STRATEGIES as CACHED
from .resolve import resolve_config

UNTRAINED = ("vanilla", "nudge")  # no heads: the base vectors, or NUDGE-N's corrections of them as published
LIVE = ("full", "hybrid")  # through the encoder (train-live); its frozen-live is the cached strategies' reference
STRATEGIES = UNTRAINED + CACHED + LIVE
VECTORS = ("reference", "build")
_TRAIN_FIELDS = {f.name for f in fields(TrainConfig)} - {"store", "out", "dataset", "data_dir", "train_split", "seed",
                                                         "strategy", "overwrite", "allow_test_training"}
_LIVE_FIELDS = {f.name for f in fields(LiveConfig)} - {"train", "strategy"}  # options of the live strategies too


@dataclass
class Row:
    """One row of the comparison: a strategy (`train-heads`/`train-live --strategy`, or none), its preset,
    overrides and seeds, under a name of its own."""

    name: str
    strategy: str
    preset: str = DEFAULT_PRESET  # LIVE_PRESET for `full`
    seeds: list[int] = field(default_factory=lambda: [0])
    options: dict[str, Any] = field(default_factory=dict)  # TrainConfig (and, live, LiveConfig) overrides
    query_tower: str | None = None
    similarity: str | None = None

    def train_config(self, **run: Any) -> TrainConfig:
        """train-heads' settings for this row; `run`: where and on what (store, seed, ...)."""
        return TrainConfig(strategy=self.strategy, preset=self.preset, **run, **self.options)

    def live_config(self, **run: Any) -> LiveConfig:
        """train-live's settings for this row: the options TrainConfig knows go to its `train`."""
        return LiveConfig.from_flat({"preset": self.preset, **run, **self.options, "strategy": self.strategy})


@dataclass
class Recipe:
    name: str
    train_dataset: str
    eval_datasets: list[str]  # the training dataset is in-domain; every other is zero-shot
    strategies: list[Row]
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


def _resolve(path: Path, where: str, row: Row) -> None:
    """Resolve a row's settings as its stage will, so a bad value is refused before any stage runs."""
    if row.strategy in UNTRAINED:
        if row.options:
            raise UserError(f"{path}: {where} ({row.name}): strategy {row.strategy} takes no options")
        return
    try:
        if row.strategy in LIVE:
            resolve_live(row.live_config(store=""))
        else:
            resolve_config(row.train_config(store=""))
    except UserError as e:
        raise UserError(f"{path}: {where} ({row.name}): {e}") from None


def _read_toml(path: Path) -> dict:
    """The recipe file's TOML, refused in one line when missing or malformed."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: recipe not found (see pipelines/ for examples)") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None


def _row(path: Path, i: int, s) -> Row:
    """One [[strategies]] table, checked key by key."""
    where = f"strategies[{i}]"
    _expect(path, where, s, dict, "a table")
    if "kind" in s:
        raise UserError(f"{path}: {where}.kind: the key is now `strategy` (same values); rename it")
    _known_keys(path, where, s, {"name", "strategy", "preset", "seeds", "options", "query_tower", "similarity"})
    strategy = s.get("strategy", s.get("name"))
    if strategy not in STRATEGIES:
        raise UserError(f"{path}: {where}.strategy = {strategy!r} is not a strategy; "
                        f"choose one of {', '.join(STRATEGIES)}")
    options = _expect(path, f"{where}.options", s.get("options", {}), dict, "TrainConfig overrides")
    if bad := set(options) - _TRAIN_FIELDS - (_LIVE_FIELDS if strategy in LIVE else set()):
        raise UserError(f"{path}: {where}.options: unknown setting(s) {', '.join(sorted(bad))}")
    for key, value in options.items():
        _option_type(path, f"{where}.options.{key}", value, _FIELD_TYPES[key])
    for key, allowed in (("query_tower", ("projection", "predictor", "vanilla")), ("similarity", ("cos", "l2"))):
        if s.get(key) is not None and s[key] not in allowed:
            raise UserError(f"{path}: {where}.{key} = {s[key]!r}; choose one of {', '.join(allowed)}")
    seeds = _expect(path, f"{where}.seeds", s.get("seeds", [0]), list, "a list of integers")
    if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise UserError(f"{path}: {where}.seeds must be a non-empty list of integers")
    preset = s.get("preset", LIVE_PRESET if strategy == "full" else DEFAULT_PRESET)
    return Row(
        name=_expect(path, f"{where}.name", s.get("name", strategy), str, "a label"), strategy=strategy,
        preset=_expect(path, f"{where}.preset", preset, str, "a preset name"),
        seeds=seeds, options=options, query_tower=s.get("query_tower"), similarity=s.get("similarity"),
    )


def _rows(path: Path, raw: dict) -> list[Row]:
    """Every [[strategies]] table, with unique names usable as folder names, each resolved."""
    tables = _expect(path, "[[strategies]]", raw.get("strategies"), list, "an array of tables")
    rows = [_row(path, i, s) for i, s in enumerate(tables)]
    if not rows:
        raise UserError(f"{path}: no [[strategies]]")
    names = [row.name for row in rows]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: strategy names must be unique, got {names}")
    for i, row in enumerate(rows):
        _name(path, f"strategies[{i}].name", row.name, "strategy")  # it names folders under runs/<name>/
        _resolve(path, f"strategies[{i}]", row)
    return rows


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
    strategies = _rows(path, raw)
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
                        f"{recipe.train_dataset}, so the table would measure the training queries; "
                        "train on another split, or set "
                        "allow_test_training = true under [train] if you mean it")
