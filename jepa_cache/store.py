"""The Zarr v3 embedding store, read side: one group per (dataset, encoder), opened locally or from a URL.

Layout of a store folder::

    zarr.json                 group; attributes = provenance (how every vector was made)
    corpus/emb                [rows, dim] float16|float32, fill_value NaN, sharded along rows
    corpus/ids.parquet        the row ids, in row order (the one place ids live)
    queries/emb, queries/ids.parquet
    _shards/<section>-<index>.json   one marker per finished shard, with the sha256 of its rows

The chunk is the unit of reading; rows never written read as NaN, never as a zero vector, and
every read checks for them. Writing, resuming and verifying: store_writer.py.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import DEFAULT_SHARD_ROWS
from .datasets import BeirDataset
from .errors import UserError
from .files import canonical_hash, is_url
from .models import model_folder_name

FORMAT = "jepa-cache/store"
FORMAT_VERSION = 1
SECTIONS = ("corpus", "queries")
# What must match for two builds to be the same store (time stamps and library versions may differ).
IDENTITY_KEYS = ("format", "format_version", "source", "encoder", "dataset", "template", "dtype", "layout")
DTYPES = ("float16", "float32")
DEFAULT_CACHE_DIR = Path("data/cache")


def _zarr():
    import zarr  # noqa: PLC0415  (lazy: keeps `jepa-cache --help` instant)

    return zarr


def package_versions() -> dict[str, str]:
    out = {}
    for pkg in ("jepa-cache", "torch", "sentence-transformers", "transformers", "zarr", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def default_store_path(dataset: str, model: str) -> Path:
    """Where build and import put, and eval and train look for, `dataset`'s store made by `model`."""
    return DEFAULT_CACHE_DIR / dataset / model_folder_name(model)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def identity(provenance: dict) -> dict:
    """What must match for two stores to hold the same vectors.

    An encoder with a weights fingerprint is identified by it and its settings: the folder it was
    loaded from and the name it was given by change no vector, so resuming a build with the model
    named differently (a path instead of a hub id) is not refused.
    """
    out = {k: provenance.get(k) for k in IDENTITY_KEYS}
    encoder = out.get("encoder")
    if isinstance(encoder, dict) and encoder.get("weights_sha256"):
        out["encoder"] = {k: v for k, v in encoder.items() if k not in ("name", "path")}
    if isinstance(
        out.get("dataset"), dict
    ):  # nor does the folder the dataset was read from (its files' sha256 are kept)
        out["dataset"] = {k: v for k, v in out["dataset"].items() if k != "path"}
    return out


def encoder_fingerprint(weights: str, prompts: dict[str, str] | None) -> str:
    """The weights' sha256, plus a hash of the query/document prompts when there are any.

    Vectors equal within tolerance share it (any fp32 backend); other prompts make other vectors.
    """
    used = {side: text for side, text in (prompts or {}).items() if text}
    return f"{weights}+prompts:{canonical_hash(used)[:16]}" if used else weights


def _join(base: str | Path, *parts: str) -> str | Path:
    return "/".join([str(base).rstrip("/"), *parts]) if is_url(base) else Path(base).joinpath(*parts)


def _read_ids(path: str | Path) -> list[str]:
    try:
        if is_url(path):
            import fsspec  # noqa: PLC0415  (zarr's own dependency for remote stores)

            with fsspec.open(str(path), "rb") as f:
                return pq.read_table(f, columns=["id"]).column("id").to_pylist()
        return pq.read_table(path, columns=["id"]).column("id").to_pylist()
    except FileNotFoundError:
        raise UserError(f"{path}: missing; the store is incomplete or damaged (run `jepa-cache verify`)") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{path}: unreadable ({e}); the store is damaged") from None


@dataclass
class Section:
    """One table of vectors (corpus or queries) with its ids in row order."""

    name: str
    ids: list[str]
    array: Any  # zarr.Array
    shard_rows: int

    @property
    def rows(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    @functools.cached_property
    def row_of(self) -> dict[str, int]:
        return {doc_id: i for i, doc_id in enumerate(self.ids)}

    def vectors(self, dtype: Any = np.float32, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Read rows (all by default) as `dtype`; NaN anywhere means a missing chunk and is an error."""
        where = str(self.array.store_path).removeprefix("file://")
        try:
            if rows is None:
                out = self.array[:]
            elif isinstance(rows, slice):
                out = self.array[rows]
            else:
                rows = np.asarray(rows, dtype=np.int64)
                out = self.array.get_orthogonal_selection((rows, slice(None)))
        except (ValueError, OSError) as e:  # a damaged shard fails a CRC32C (chunk or shard index) inside zarr
            raise UserError(
                f"{where}: unreadable ({type(e).__name__}: {e}); a shard file is damaged: "
                "run `jepa-cache verify` and rebuild"
            ) from None
        bad = ~np.isfinite(out).all(axis=1)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            row = first if rows is None else (rows.start or 0) + first if isinstance(rows, slice) else int(rows[first])
            raise UserError(
                f"{where}: {int(bad.sum())} row(s) are NaN/inf (first: row {row}, id {self.ids[row]!r}): "
                "a shard file is missing or damaged; run `jepa-cache verify` and rebuild"
            )
        return out.astype(dtype, copy=False)

    def iter_blocks(self, block_rows: int, dtype: Any = np.float32) -> Iterator[tuple[int, np.ndarray]]:
        """(start row, block) over the section, for work that must not hold it all in memory."""
        for start in range(0, self.rows, block_rows):
            yield start, self.vectors(dtype, slice(start, min(start + block_rows, self.rows)))


class Store:
    """A finished (or, for the writer, in-progress) embedding store opened for reading."""

    def __init__(self, path: Path | str, group: Any):
        self.path = path  # a local folder, or an fsspec URL (read-only)
        self.group = group
        self.provenance: dict = dict(group.attrs)
        layout = self.provenance.get("layout", {})
        self.shard_rows = int(layout.get("shard_rows", DEFAULT_SHARD_ROWS))
        self._sections: dict[str, Section] = {}

    def section(self, name: str) -> Section:
        if name not in SECTIONS:
            raise ValueError(f"unknown section {name!r}")
        if name not in self._sections:
            ids = _read_ids(_join(self.path, name, "ids.parquet"))
            array = self.group[f"{name}/emb"]
            if array.shape[0] != len(ids):
                raise UserError(
                    f"{self.path}/{name}: {array.shape[0]} vectors but {len(ids)} ids; the store is damaged"
                )
            self._sections[name] = Section(name, ids, array, self.shard_rows)
        return self._sections[name]

    @property
    def corpus(self) -> Section:
        return self.section("corpus")

    @property
    def queries(self) -> Section:
        return self.section("queries")

    @property
    def dim(self) -> int:
        return int(self.provenance["dim"])

    @property
    def complete(self) -> bool:
        return bool(self.provenance.get("complete"))

    @property
    def imported(self) -> bool:
        return self.provenance.get("source") == "imported"

    @property
    def dataset_name(self) -> str:
        return self.provenance["dataset"]["name"]

    @property
    def encoder_fingerprint(self) -> str:
        """Identifies the encoder (its weights and prompts); heads trained on one encoder refuse another."""
        enc = self.provenance["encoder"]
        return encoder_fingerprint(enc.get("weights_sha256") or f"declared:{enc['name']}", enc.get("prompts"))

    @property
    def fingerprint(self) -> str:
        """Content address of the vectors: identity plus every shard's checksum."""
        return canonical_hash({"identity": identity(self.provenance), "shards": self.provenance.get("shards", {})})

    def describe(self) -> str:
        p = self.provenance
        return (
            f"{self.path} [{p['source']}] {self.dataset_name}: {self.corpus.rows} docs, {self.queries.rows} queries, "
            f"{p['dim']}-d {p['dtype']}, encoder {p['encoder']['name']}"
        )


def check_dataset(store: Store, dataset: BeirDataset) -> None:
    """The store must hold this dataset's corpus and queries: same name, same text files (qrels may differ)."""
    if store.dataset_name != dataset.name:
        raise UserError(
            f"{store.path}: a store of dataset {store.dataset_name!r}, not {dataset.name!r}; pass that dataset's store"
        )
    recorded, current = store.provenance["dataset"].get("files") or {}, dataset.file_hashes()
    changed = [f for f in recorded if not f.startswith("qrels/") and f in current and recorded[f] != current[f]]
    if changed:
        raise UserError(
            f"{store.path}: made from other versions of {', '.join(changed)} than {dataset.root} holds; "
            "rebuild or re-import it"
        )


def open_store(
    path: str | os.PathLike,
    *,
    expect_dim: int | None = None,
    expect_encoder: str | None = None,
    require_complete: bool = True,
) -> Store:
    """Open a store and validate it against what the caller expects.

    Args:
        expect_dim: embedding width the caller needs (e.g. the heads' input dim).
        expect_encoder: encoder fingerprint the caller was built for (e.g. recorded in heads).
        require_complete: refuse a store whose build has not finished.
    """
    path = _locate(path)
    zarr = _zarr()
    try:
        group = zarr.open_group(store=str(path), mode="r")
    except Exception as e:  # zarr raises several types for unreadable metadata
        raise UserError(f"{path}: unreadable zarr metadata ({e})") from None
    if group.attrs.get("format") != FORMAT:
        raise UserError(f"{path}: zarr group is not a jepa-cache store (format {group.attrs.get('format')!r})")
    if group.attrs.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: store format version {group.attrs.get('format_version')} is not supported "
            f"(need {FORMAT_VERSION}); rebuild it"
        )
    store = Store(path, group)
    if require_complete and not store.complete:
        command = "import" if store.imported else "build"
        raise UserError(
            f"{path}: the {command} of this store has not finished; "
            f"re-run the same `jepa-cache {command}` to complete it"
        )
    if expect_dim is not None and store.dim != expect_dim:
        raise UserError(f"{path}: vectors are {store.dim}-d but {expect_dim}-d are expected (different encoder?)")
    if expect_encoder is not None and store.encoder_fingerprint != expect_encoder:
        _refuse_encoder(store, expect_encoder)
    return store


def _locate(path: str | os.PathLike) -> str | Path:
    """The store's path (a URL without its trailing slash, else a Path), refused when it holds no zarr.json."""
    if is_url(path):  # read from any filesystem fsspec knows; building and importing stay local (POSIX)
        path = str(path).rstrip("/")
        try:
            import fsspec  # noqa: PLC0415  (only URLs need it)

            fs, root = fsspec.core.url_to_fs(path)
            found = fs.exists(f"{root}/zarr.json")
        except (ImportError, ValueError) as e:
            raise UserError(
                f"{path}: cannot read this URL ({e}); install the fsspec backend it needs (e.g. s3fs, gcsfs)"
            ) from None
    else:
        path = Path(path)
        found = (path / "zarr.json").is_file()
    if not found:
        raise UserError(
            f"{path}: not a jepa-cache store (no zarr.json); build one with `jepa-cache build` or `jepa-cache import`"
        )
    return path


def _refuse_encoder(store: Store, expected: str) -> None:
    """A store of another encoder than the heads': say whether only the prompts differ."""
    if store.encoder_fingerprint.split("+")[0] == expected.split("+")[0]:
        raise UserError(
            f"{store.path}: encoded with prompts {store.provenance['encoder'].get('prompts') or 'none'}, "
            "but these heads were trained on vectors encoded with other prompts; "
            "use a store built with the same --query-prompt / --document-prompt"
        )
    raise UserError(
        f"{store.path}: made by encoder {store.provenance['encoder']['name']} ({store.encoder_fingerprint[:12]}), "
        f"but these heads were trained on encoder {expected[:12]}; use a store of the same encoder"
    )
