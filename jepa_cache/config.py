"""Typed configs for each stage; each is dumped as JSON beside the output it produced."""

from __future__ import annotations

from dataclasses import dataclass

from .models import DEFAULT_MODEL
from .store import DEFAULT_CHUNK_ROWS, DEFAULT_SHARD_ROWS


@dataclass
class BuildConfig:
    """Stage 1: encode a dataset's corpus and queries once into a store."""

    dataset: str
    model: str = DEFAULT_MODEL
    out: str | None = None  # default: data/cache/<dataset>/<model folder name>
    data_dir: str | None = None
    dtype: str = "float16"
    batch_size: int = 32
    device: str = "auto"
    shard_rows: int = DEFAULT_SHARD_ROWS
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    overwrite: bool = False
