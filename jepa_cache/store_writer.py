"""Writing a store: create it atomically, fill it shard by shard (resumable after any kill), and verify it.

The shard is the unit of writing and of resume: a shard is written whole in one call and its
marker (with the sha256 of its rows) is written atomically after it, so a kill at any moment
leaves either a finished shard with its marker or a shard that will be encoded again.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError
from .files import atomic_dir, atomic_path, atomic_write_json, is_url, sha256_bytes
from .store import (DTYPES, FORMAT, FORMAT_VERSION, IDENTITY_KEYS, SECTIONS, Store, _zarr, identity, now_iso,
                    open_store, package_versions)


def _shard_ranges(rows: int, shard_rows: int) -> list[tuple[int, int, int]]:
    return [(i, start, min(start + shard_rows, rows)) for i, start in enumerate(range(0, rows, shard_rows))]


def _marker_path(root: Path, section: str, index: int) -> Path:
    return root / "_shards" / f"{section}-{index:06d}.json"


def _block_sha(block: np.ndarray) -> str:
    return sha256_bytes(np.ascontiguousarray(block).tobytes())


def _write_ids(path: Path, ids: Sequence[str]) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(pa.table({"id": pa.array(list(ids), pa.string())}), tmp)


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
        with atomic_dir(path, tag="creating") as tmp:  # an empty folder the user made is replaced
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
            raise ValueError(f"shard {section}/{index} needs shape {(stop - start, self.provenance['dim'])}, "
                             f"got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise UserError(f"{section} shard {index} (rows {start}-{stop}): the encoder produced NaN/inf; "
                            "nothing written")
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
            s: [written.get((s, i)) or json.loads(_marker_path(self.path, s, i).read_text())["sha256"]
                for i, _, _ in self.shard_ranges(s)]
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
        raise UserError(f"{path}: verify reads shard markers on a local filesystem; "
                        "verify the store before uploading it, "
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
                problems.append(f"{name} shard {index} (rows {start}-{stop}): {bad} NaN/inf rows "
                                "(missing or damaged chunk)")
                continue
            sha = _block_sha(block)
            want = json.loads(marker.read_text())["sha256"]
            if sha != want or (recorded is not None and index < len(recorded) and recorded[index] != sha):
                problems.append(f"{name} shard {index} (rows {start}-{stop}): checksum mismatch "
                                "(data changed after writing)")
    return problems
