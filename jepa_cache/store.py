"""The Zarr v3 embedding store: one group per (dataset, encoder).

Layout of a store folder::

    zarr.json                 group; attributes = provenance (how every vector was made)
    corpus/emb                [rows, dim] float16|float32, fill_value NaN, sharded along rows
    corpus/ids.parquet        the row ids, in row order (the one place ids live)
    queries/emb, queries/ids.parquet
    _shards/<section>-<index>.json   one marker per finished shard, with the sha256 of its rows

The shard is the unit of writing and of resume: a shard is written whole in one call and its
marker is written (atomically) after it, so a kill at any moment leaves either a finished shard
with its marker or a shard that will be re-encoded. The chunk is the unit of reading. Rows never
written read as NaN, never as a zero vector, and every read checks for them.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError
from .files import atomic_path, atomic_write_json, canonical_hash, is_url, sha256_bytes

FORMAT = "jepa-cache/store"
FORMAT_VERSION = 1
SECTIONS = ("corpus", "queries")
# Shard = write/resume unit. 1024 rows is ~10 minutes of mpnet on a 2-core CPU (the most a kill
# can cost) and 1.5 MB of float16 at 768-d, so an 8.8M-row corpus is ~8.6k files, not millions.
DEFAULT_SHARD_ROWS = 1024
# Chunk = read unit: 128 rows x 768 x 2 bytes = 192 KiB, a good size for a local or object-store read,
# and small enough that reading a slice of rows wastes little.
DEFAULT_CHUNK_ROWS = 128
# What must match for two builds to be the same store (time stamps and library versions may differ).
IDENTITY_KEYS = ("format", "format_version", "source", "encoder", "dataset", "template", "dtype", "layout")
DTYPES = ("float16", "float32")
DEFAULT_CACHE_DIR = Path("data/cache")


def _zarr():
    import zarr  # noqa: PLC0415  (lazy: keeps `jepa-cache --help` instant)

    return zarr


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("jepa-cache", "torch", "sentence-transformers", "transformers", "zarr", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def default_store_path(dataset: str, model_folder: Path) -> Path:
    return DEFAULT_CACHE_DIR / dataset / model_folder.name


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
    return out


def encoder_fingerprint(weights: str, prompts: dict[str, str] | None) -> str:
    """The weights' sha256, plus a hash of the query/document prompts when there are any.

    Vectors equal within tolerance share it (any fp32 backend); other prompts make other vectors.
    """
    used = {side: text for side, text in (prompts or {}).items() if text}
    return f"{weights}+prompts:{canonical_hash(used)[:16]}" if used else weights


def _shard_ranges(rows: int, shard_rows: int) -> list[tuple[int, int, int]]:
    return [(i, start, min(start + shard_rows, rows)) for i, start in enumerate(range(0, rows, shard_rows))]


def _marker_path(root: Path, section: str, index: int) -> Path:
    return root / "_shards" / f"{section}-{index:06d}.json"


def _block_sha(block: np.ndarray) -> str:
    return sha256_bytes(np.ascontiguousarray(block).tobytes())


def _write_ids(path: Path, ids: Sequence[str]) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(pa.table({"id": pa.array(list(ids), pa.string())}), tmp)


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
                f"{where}: unreadable ({type(e).__name__}: {e}); a shard file is damaged: run `jepa-cache verify` and rebuild"
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
                raise UserError(f"{self.path}/{name}: {array.shape[0]} vectors but {len(ids)} ids; the store is damaged")
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
    if is_url(path):  # read from any filesystem fsspec knows; building and importing stay local (POSIX)
        path = str(path).rstrip("/")
        try:
            import fsspec  # noqa: PLC0415

            fs, root = fsspec.core.url_to_fs(path)
            found = fs.exists(f"{root}/zarr.json")
        except (ImportError, ValueError) as e:
            raise UserError(f"{path}: cannot read this URL ({e}); install the fsspec backend it needs (e.g. s3fs, gcsfs)") from None
    else:
        path = Path(path)
        found = (path / "zarr.json").is_file()
    if not found:
        raise UserError(f"{path}: not a jepa-cache store (no zarr.json); build one with `jepa-cache build` or `jepa-cache import`")
    zarr = _zarr()
    try:
        group = zarr.open_group(store=str(path), mode="r")
    except Exception as e:  # zarr raises several types for unreadable metadata
        raise UserError(f"{path}: unreadable zarr metadata ({e})") from None
    if group.attrs.get("format") != FORMAT:
        raise UserError(f"{path}: zarr group is not a jepa-cache store (format {group.attrs.get('format')!r})")
    if group.attrs.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: store format version {group.attrs.get('format_version')} is not supported (need {FORMAT_VERSION}); rebuild it")
    store = Store(path, group)
    if require_complete and not store.complete:
        command = "import" if store.imported else "build"
        raise UserError(f"{path}: the {command} of this store has not finished; re-run the same `jepa-cache {command}` to complete it")
    if expect_dim is not None and store.dim != expect_dim:
        raise UserError(f"{path}: vectors are {store.dim}-d but {expect_dim}-d are expected (different encoder?)")
    if expect_encoder is not None and store.encoder_fingerprint != expect_encoder:
        if store.encoder_fingerprint.split("+")[0] == expect_encoder.split("+")[0]:
            raise UserError(
                f"{path}: encoded with prompts {store.provenance['encoder'].get('prompts') or 'none'}, but these heads were "
                "trained on vectors encoded with other prompts; use a store built with the same --query-prompt / --document-prompt"
            )
        raise UserError(
            f"{path}: made by encoder {store.provenance['encoder']['name']} ({store.encoder_fingerprint[:12]}), "
            f"but these heads were trained on encoder {expect_encoder[:12]}; use a store of the same encoder"
        )
    return store


class StoreWriter:
    """Creates a store (atomically) and fills it shard by shard; resumable after any kill."""

    def __init__(self, path: Path):
        self.path = path
        self.group = _zarr().open_group(store=str(path), mode="r+")
        self.provenance = dict(self.group.attrs)
        self.shard_rows = int(self.provenance["layout"]["shard_rows"])
        self.rows = {s: int(self.group[f"{s}/emb"].shape[0]) for s in SECTIONS}

    @classmethod
    def open_or_create(
        cls,
        path: str | os.PathLike,
        provenance: dict,
        ids: dict[str, Sequence[str]],
        *,
        overwrite: bool = False,
    ) -> "StoreWriter":
        """Open the store at `path` for (re)writing, creating it when absent.

        `provenance` must hold at least dim, dtype, layout{shard_rows, chunk_rows}, source,
        encoder, dataset and template; format fields and creation time are added here.
        """
        path = Path(path)
        provenance = {"format": FORMAT, "format_version": FORMAT_VERSION, **provenance}
        if (path / "zarr.json").is_file():
            if overwrite:
                shutil.rmtree(path)
            else:
                existing = open_store(path, require_complete=False)
                if identity(existing.provenance) != identity(provenance):
                    diff = [k for k in IDENTITY_KEYS if existing.provenance.get(k) != provenance.get(k)]
                    raise UserError(
                        f"{path}: holds a store made differently ({', '.join(diff)} differ); "
                        "choose another --out, or pass --overwrite to replace it"
                    )
                return cls(path)
        elif path.exists() and any(path.iterdir()):
            raise UserError(f"{path}: exists and is not a jepa-cache store; choose another --out")
        cls._create(path, provenance, ids)
        return cls(path)

    @staticmethod
    def _create(path: Path, provenance: dict, ids: dict[str, Sequence[str]]) -> None:
        """Write the empty store in a temporary sibling, then rename: it appears whole or not at all."""
        zarr = _zarr()
        from zarr.codecs import Crc32cCodec

        dim, dtype = int(provenance["dim"]), provenance["dtype"]
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        shard_rows, chunk_rows = (int(provenance["layout"][k]) for k in ("shard_rows", "chunk_rows"))
        if shard_rows <= 0 or chunk_rows <= 0 or shard_rows % chunk_rows:
            raise UserError(f"shard rows ({shard_rows}) must be a positive multiple of chunk rows ({chunk_rows})")
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_creations(path)
        tmp = path.parent / f".{path.name}.creating-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            root = zarr.open_group(store=str(tmp), mode="w")
            for section in SECTIONS:
                rows = len(ids[section])
                group = root.create_group(section)
                group.create_array(
                    "emb",
                    shape=(rows, dim),
                    dtype=dtype,
                    chunks=(chunk_rows, dim),
                    shards=(shard_rows, dim),
                    fill_value=np.nan,
                    # Embeddings barely compress; a CRC32C per chunk catches silent corruption on read.
                    compressors=[Crc32cCodec()],
                )
                _write_ids(tmp / section / "ids.parquet", ids[section])
            root.attrs.update({**provenance, "created": now_iso(), "versions": package_versions(), "complete": False})
            if path.exists():  # an empty folder the user made
                path.rmdir()
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def remove_partial_files(self) -> int:
        """Delete temporary files a killed writer left (zarr's `*.partial`, our `.*.tmp`); the sole writer only."""
        leftovers = [*self.path.rglob("*.partial"), *self.path.rglob(".*.tmp")]
        for p in leftovers:
            p.unlink(missing_ok=True)
        return len(leftovers)

    def shard_ranges(self, section: str) -> list[tuple[int, int, int]]:
        return _shard_ranges(self.rows[section], self.shard_rows)

    def done(self, section: str, index: int) -> bool:
        return _marker_path(self.path, section, index).is_file()

    def missing_shards(self, section: str) -> list[tuple[int, int, int]]:
        return [r for r in self.shard_ranges(section) if not self.done(section, r[0])]

    def write_shard(self, section: str, index: int, vectors: np.ndarray) -> str:
        """Write one whole shard (rows of shard `index`), then its marker with a checksum; returns the checksum."""
        _, start, stop = self.shard_ranges(section)[index]
        if vectors.shape != (stop - start, self.provenance["dim"]):
            raise ValueError(f"shard {section}/{index} needs shape {(stop - start, self.provenance['dim'])}, got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise UserError(f"{section} shard {index} (rows {start}-{stop}): the encoder produced NaN/inf; nothing written")
        block = np.ascontiguousarray(vectors, dtype=self.provenance["dtype"])
        self.group[f"{section}/emb"][start:stop] = block
        sha = _block_sha(block)
        atomic_write_json(
            _marker_path(self.path, section, index),
            {"section": section, "index": index, "start": start, "stop": stop, "sha256": sha},
        )
        return sha

    def finalize(self, extra: dict | None = None, written: dict[tuple[str, int], str] | None = None) -> Store:
        """Record every shard checksum in the provenance and mark the store complete.

        `written`: checksums of shards just written (by this or another process), used instead of
        their markers; the other shards' come from their markers.
        """
        written = written or {}
        missing = {s: len([i for i, _, _ in self.missing_shards(s) if (s, i) not in written]) for s in SECTIONS}
        if any(missing.values()):
            raise RuntimeError(f"cannot finalize {self.path}: shards missing {missing}")
        shards = {
            s: [written.get((s, i)) or json.loads(_marker_path(self.path, s, i).read_text())["sha256"] for i, _, _ in self.shard_ranges(s)]
            for s in SECTIONS
        }
        self.group.attrs.update({**(extra or {}), "shards": shards, "complete": True, "finished": now_iso()})
        with warnings.catch_warnings():  # our sidecars (ids.parquet, _shards/) are not zarr nodes, by design
            warnings.simplefilter("ignore")
            _zarr().consolidate_metadata(str(self.path))
        return open_store(self.path)


def _remove_dead_creations(path: Path) -> None:
    """Remove `.<name>.creating-<pid>` folders whose creator died (SIGKILL skips its cleanup)."""
    for tmp in path.parent.glob(f".{path.name}.creating-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def verify_store(path: str | os.PathLike) -> list[str]:
    """Every problem found in a store (empty when sound): provenance, shapes, shards, checksums, NaN/inf."""
    if is_url(path):
        raise UserError(f"{path}: verify reads shard markers on a local filesystem; verify the store before uploading it, "
                        "or copy it back and verify the copy")
    problems: list[str] = []
    try:
        store = open_store(path, require_complete=False)
    except UserError as e:
        return [str(e).removeprefix(f"{path}: ")]
    p = store.provenance
    for key in IDENTITY_KEYS:
        if key not in p:
            problems.append(f"provenance lacks {key!r}")
    if not store.complete:
        problems.append("build not finished (re-run the same build to complete it)")
    dtype = np.dtype(p.get("dtype", "float16"))
    for name in SECTIONS:
        try:
            section = store.section(name)
        except UserError as e:
            problems.append(str(e))
            continue
        if section.dim != p.get("dim"):
            problems.append(f"{name}: width {section.dim} != provenance dim {p.get('dim')}")
        recorded = p.get("shards", {}).get(name)
        for index, start, stop in _shard_ranges(section.rows, store.shard_rows):
            marker = _marker_path(store.path, name, index)
            if not marker.is_file():
                problems.append(f"{name} shard {index} (rows {start}-{stop}): never finished")
                continue
            try:
                block = np.ascontiguousarray(section.array[start:stop], dtype=dtype)
            except Exception as e:  # a truncated shard fails its CRC inside zarr
                problems.append(f"{name} shard {index} (rows {start}-{stop}): unreadable ({type(e).__name__}: {e})")
                continue
            bad = int((~np.isfinite(block).all(axis=1)).sum())
            if bad:
                problems.append(f"{name} shard {index} (rows {start}-{stop}): {bad} NaN/inf rows (missing or damaged chunk)")
                continue
            sha = _block_sha(block)
            want = json.loads(marker.read_text())["sha256"]
            if sha != want or (recorded is not None and index < len(recorded) and recorded[index] != sha):
                problems.append(f"{name} shard {index} (rows {start}-{stop}): checksum mismatch (data changed after writing)")
    return problems
