"""The stages as Python functions for notebooks: keyword settings named as the command-line options.

`train_heads(store, seed=1)` is `jepa-cache train-heads --store STORE --seed 1`; `evaluate_datasets("scifact", heads=H)`
is `jepa-cache eval --dataset scifact --heads H`. Each builds the same config the CLI builds and calls the stage.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from .config import EvalConfig, TrainConfig


def train_heads(store: str | os.PathLike, log: Callable[[str], None] = print, **settings: Any):
    """Train heads (and, with `best`, their per-document corrections) on a store; returns the TrainResult."""
    from .train import train

    return train(TrainConfig(store=str(store), **settings), log=log)


def evaluate_datasets(datasets: str | list[str], log: Callable[[str], None] = print, **settings: Any) -> dict:
    """Score one or more datasets (vanilla, or `heads=` a heads folder); returns what results.json holds."""
    from .evaluate import evaluate as run

    names = [datasets] if isinstance(datasets, str) else list(datasets)
    settings = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in settings.items()}
    return run(EvalConfig(datasets=names, **settings), log=log)
