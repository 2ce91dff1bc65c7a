"""Bring your own vectors: `.npy` or Parquet embeddings become a store that train and eval use like a built one.

Everything is read and checked before anything is created, so a bad input leaves no store behind.
Input rows are matched to the dataset by id and written in the dataset's file order (the order a
build writes), so an imported and a built store of the same data line up row by row and share
their ids file. `.npy` inputs are memory-mapped (any size); Parquet inputs are read into memory.

The provenance has the keys of a built store, with `source: "imported"`; the encoder block holds
what the user declares (settings read from the model folder when it is on disk, else unknown), and
`import` records each input file with its sha256 and what was changed (rows L2-normalised).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import ImportConfig
from .datasets import CORPUS_TEMPLATE, QUERY_TEMPLATE, find_dataset, read_ids
from .errors import UserError
from .files import check_writable, exclusive_lock, read_json, sha256_file
from .models import canonical_name, resolve_model, weights_sha256
from .store import DTYPES, SECTIONS, Store, default_store_path, open_store
from .store_writer import StoreWriter

# A unit vector stored in float16 keeps its norm within ~1e-4; 1e-3 flags vectors that were never normalised.
NORM_TOL = 1e-3
CHECK_ROWS = 1 << 16  # rows per validation block: bounded memory on memory-mapped inputs
_FILE_KEYS = {("corpus", "vectors"): "corpus", ("corpus", "ids"): "corpus_ids",  # named as the options
              ("queries", "vectors"): "queries", ("queries", "ids"): "query_ids"}
_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass
class Vectors:
    """One input table of vectors with its ids, row i of `data` belonging to `ids[i]`."""

    label: str  # "corpus" or "queries", for messages
    data: np.ndarray  # [rows, dim], float16/float32 (a memory map for .npy)
    ids: list[str]
    files: dict[str, dict]  # role -> {path, sha256, format}

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])


def _file_record(path: Path, fmt: str) -> dict:
    return {"path": str(path.resolve()), "sha256": sha256_file(path), "format": fmt}


def read_ids_file(path: Path) -> list[str]:
    """One id per line (LF or CRLF); a blank line inside the file is an error, a final newline is not."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 ({e.reason})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    ids = [line.rstrip("\r") for line in lines]
    for lineno, doc_id in enumerate(ids, 1):
        if not doc_id.strip():
            raise UserError(f"{path}: line {lineno}: empty id")
    return ids


def _load_npy(path: Path) -> np.ndarray:
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except ValueError as e:
        raise UserError(f"{path}: not a plain .npy array ({e})") from None
    if data.ndim != 2:
        raise UserError(f"{path}: expected a 2-D array [rows, dim], got shape {data.shape}")
    if data.dtype not in (np.float32, np.float16):
        raise UserError(f"{path}: dtype {data.dtype}; import float32 or float16 vectors")
    return data


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _load_parquet(path: Path, id_column: str | None, vector_column: str | None) -> tuple[np.ndarray, list[str] | None]:
    """Vectors (and ids, when the file has an id column) from a Parquet file."""
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{path}: unreadable Parquet ({e})") from None
    names = table.column_names
    if vector_column is None:
        listy = [n for n in names if _is_list(table.schema.field(n).type)]
        if len(listy) != 1:
            raise UserError(f"{path}: {len(listy)} list-typed columns ({', '.join(listy) or 'none'}); "
                            "name the vectors with --vector-column")
        vector_column = listy[0]
    if vector_column not in names:
        raise UserError(f"{path}: no column {vector_column!r} (columns: {', '.join(names)})")
    col = table.column(vector_column).combine_chunks()
    if not _is_list(col.type):
        raise UserError(f"{path}: column {vector_column!r} is {col.type}, not a list of floats")
    if not pa.types.is_floating(col.type.value_type):
        raise UserError(f"{path}: column {vector_column!r} holds {col.type.value_type}; vectors must be floats")
    if col.null_count:
        raise UserError(f"{path}: column {vector_column!r} has {col.null_count} null vector(s)")
    lengths = pc.list_value_length(col)
    widths = pc.min_max(lengths).as_py() if len(col) else {"min": 0, "max": 0}
    if widths["min"] != widths["max"]:
        first = int(np.flatnonzero(lengths.to_numpy() != widths["max"])[0])
        raise UserError(f"{path}: vectors of different widths ({widths['min']} to {widths['max']}; "
                        f"row {first} differs)")
    values = col.flatten().to_numpy(zero_copy_only=False)  # nulls inside a vector become NaN, caught later
    data = values.reshape(len(col), widths["max"])
    if data.dtype not in (np.float32, np.float16):
        data = data.astype(np.float32)
    ids = None
    if id_column is None:
        id_column = next((c for c in ("id", "_id") if c in names), None)
    elif id_column not in names:
        raise UserError(f"{path}: no id column {id_column!r} (columns: {', '.join(names)})")
    if id_column is not None:
        id_col = table.column(id_column)
        if id_col.null_count:
            raise UserError(f"{path}: id column {id_column!r} has {id_col.null_count} null(s)")
        ids = [str(v) for v in id_col.to_pylist()]
    return data, ids


def load_vectors(label: str, vectors: str, ids_file: str | None, id_column: str | None = None,
                 vector_column: str | None = None) -> Vectors:
    """Read one input (vectors + ids) and check the ids line up with the rows."""
    path = Path(vectors)
    files: dict[str, dict] = {}
    if path.suffix == ".npy":
        data, ids = _load_npy(path), None
        files["vectors"] = _file_record(path, "npy")
    elif path.suffix in (".parquet", ".pq"):
        data, ids = _load_parquet(path, id_column, vector_column)
        files["vectors"] = _file_record(path, "parquet")
    else:
        raise UserError(f"{path}: unknown vector format; use .npy (float32/float16) or .parquet")
    if ids_file is not None:
        ids = read_ids_file(Path(ids_file))
        files["ids"] = _file_record(Path(ids_file), "text")
    elif ids is None:
        raise UserError(f"{path}: no ids; pass the {label} ids file (one id per line) "
                        "or use a Parquet file with an id column")
    if len(ids) != data.shape[0]:
        where = ids_file or f"{path} (id column)"
        raise UserError(f"{label}: {data.shape[0]} vectors in {path} but {len(ids)} ids in {where}; "
                        "rows and ids must match one to one")
    seen: dict[str, int] = {}
    for row, doc_id in enumerate(ids):
        if doc_id in seen:
            raise UserError(f"{label}: duplicate id {doc_id!r} (rows {seen[doc_id]} and {row}) in {ids_file or path}")
        seen[doc_id] = row
    return Vectors(label, data, ids, files)


def _folder_settings(folder: Path) -> dict:
    """Encoder settings read from a sentence-transformers folder's JSON files (no model load)."""
    def read(rel: str) -> dict:
        p = folder / rel
        return read_json(p) if p.is_file() else {}

    modules = read("modules.json") if (folder / "modules.json").is_file() else []
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise UserError(f"{folder / 'modules.json'}: not a sentence-transformers modules list; "
                        f"is {folder} a model folder?")
    types = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    pooling, dim = None, None
    for module, kind in zip(modules, types):
        cfg = read(f"{module.get('path', '')}/config.json") if module.get("path") else {}
        if kind == "Pooling":
            modes = cfg.get("pooling_mode") or [name for flag, name in _POOLING_FLAGS.items() if cfg.get(flag)]
            modes = [modes] if isinstance(modes, str) else list(modes)
            pooling = modes[0] if len(modes) == 1 else modes
            width = cfg.get("embedding_dimension") or cfg.get("word_embedding_dimension")
            dim = int(width) * len(modes) if width and modes else None
        elif kind == "Dense":
            dim = cfg.get("out_features", dim)
    # sentence-transformers < 6 keeps max_seq_length in sentence_bert_config.json, 6 as the tokenizer's
    # model_max_length.
    max_len = (read("sentence_bert_config.json").get("max_seq_length")
               or read("tokenizer_config.json").get("model_max_length"))
    return {
        "max_seq_length": max_len,
        "pooling": pooling,
        "model_normalizes": "Normalize" in types if modules else None,
        "dim": dim,
    }


def declared_encoder(model: str, normalize: bool) -> dict:
    """The encoder block of the provenance for a model the user names; weights hashed when on disk."""
    as_path = Path(model).expanduser()
    try:
        folder: Path | None = resolve_model(model, fetch=False)
    except UserError:
        if as_path.exists():
            raise  # a folder that is not a model is the user's error
        folder = None  # declared only: the fingerprint becomes "declared:<name>"
    unknown = {"max_seq_length": None, "pooling": None, "model_normalizes": None, "dim": None}
    settings = _folder_settings(folder) if folder else unknown
    return {
        "name": str(model) if as_path.exists() else canonical_name(model),
        "path": str(folder) if folder else None,
        "weights_sha256": weights_sha256(folder) if folder else None,
        "max_seq_length": settings["max_seq_length"],
        "pooling": settings["pooling"],
        "normalize": normalize,
        "model_normalizes": settings["model_normalizes"],
        "dim": settings["dim"],
        "declared": True,
    }


def _check_values(vec: Vectors, dtype: str, normalize: bool, model_normalizes: bool | None) -> int:
    """Scan the rows block by block: finite in the stored dtype, non-zero; returns how many are not unit length."""
    off_unit = 0
    for start in range(0, vec.data.shape[0], CHECK_ROWS):
        block = np.asarray(vec.data[start : start + CHECK_ROWS], dtype=np.float32)
        with np.errstate(over="ignore"):  # overflow to inf in float16 is what this looks for
            bad = ~np.isfinite(block.astype(dtype)).all(axis=1)
        if bad.any():
            row = start + int(np.flatnonzero(bad)[0])
            raise UserError(f"{vec.label}: row {row} (id {vec.ids[row]!r}) of {vec.files['vectors']['path']} "
                            f"holds NaN/inf (as {dtype}); nothing was written")
        norms = np.linalg.norm(block, axis=1)
        if (norms == 0).any():
            row = start + int(np.flatnonzero(norms == 0)[0])
            raise UserError(f"{vec.label}: row {row} (id {vec.ids[row]!r}) of {vec.files['vectors']['path']} "
                            "is a zero vector; no encoder makes one")
        off_unit += int((np.abs(norms - 1) > NORM_TOL).sum())
    if off_unit and not normalize and model_normalizes:
        raise UserError(
            f"{vec.label}: {off_unit} row(s) are not unit length, but the declared encoder normalises its output: "
            "were they made by another model? Drop --no-normalize to L2-normalise them on import"
        )
    return off_unit


def _row_order(vec: Vectors, dataset_ids: list[str], dataset_file: Path, complete: bool) -> list[str]:
    """Store ids in the dataset's order; every input id must be in the dataset (and every document covered)."""
    known = set(dataset_ids)
    unknown = [i for i in vec.ids if i not in known]
    if unknown:
        raise UserError(f"{vec.label}: {len(unknown)} id(s) are not in {dataset_file} "
                        f"(e.g. {', '.join(map(repr, unknown[:3]))}); wrong dataset or ids file?")
    have = set(vec.ids)
    missing = [i for i in dataset_ids if i not in have]
    if missing and complete:
        raise UserError(f"{vec.label}: {len(missing)} document(s) of {dataset_file} have no vector "
                        f"(e.g. {', '.join(map(repr, missing[:3]))}); retrieval over a partial corpus would be wrong")
    return [i for i in dataset_ids if i in have]


def _write(out: Path, cfg: ImportConfig, provenance: dict, inputs: dict, order: dict[str, list[str]],
           log: Callable[[str], None]) -> tuple[Store, bool]:
    """Write the vectors in dataset order, shard by shard (resuming an unfinished import of the same files).

    Returns the store and whether anything was written (False: already imported from these files).
    """
    record = provenance["import"]
    with exclusive_lock(out, "import"):
        if (out / "zarr.json").is_file() and not cfg.overwrite:
            existing = open_store(out, require_complete=False)
            same = {k: v["sha256"] for k, v in existing.provenance.get("import", {}).get("files", {}).items()} == \
                {k: v["sha256"] for k, v in record["files"].items()}
            if not same:
                raise UserError(f"{out}: holds a store made from other vectors; choose another --out, "
                                "or pass --overwrite to replace it")
            if existing.complete:
                log(f"{out}: already imported from these files; nothing to do")
                return existing, False
        writer = StoreWriter.open_or_create(out, provenance, order, overwrite=cfg.overwrite)
        for s in SECTIONS:
            vec = inputs[s]
            row_of = {doc_id: i for i, doc_id in enumerate(vec.ids)}
            source_rows = np.fromiter((row_of[i] for i in order[s]), dtype=np.int64, count=len(order[s]))
            for index, start, stop in writer.missing_shards(s):
                block = np.asarray(vec.data[source_rows[start:stop]], dtype=np.float32)
                norms = np.linalg.norm(block, axis=1, keepdims=True)
                if cfg.normalize:
                    block = np.where(np.abs(norms - 1) > NORM_TOL, block / norms, block)
                writer.write_shard(s, index, block)
        return writer.finalize(), True


def _check_dims(inputs: dict, encoder: dict) -> int:
    """The vectors' width, refused unless corpus, queries and the declared encoder agree; recorded in `encoder`."""
    dim = inputs["corpus"].dim
    if inputs["queries"].dim != dim:
        raise UserError(f"corpus vectors are {dim}-d but query vectors {inputs['queries'].dim}-d; "
                        "both must come from one encoder")
    if encoder["dim"] is not None and encoder["dim"] != dim:
        raise UserError(f"vectors are {dim}-d but the declared encoder {encoder['name']} makes "
                        f"{encoder['dim']}-d vectors; pass the --model that made them")
    encoder["dim"] = dim
    return dim


def _provenance(cfg: ImportConfig, dataset, encoder: dict, dim: int, record: dict) -> dict:
    """The imported store's provenance: declared encoder, dataset files, templates, layout and the import record."""
    return {
        "source": "imported",
        "encoder": encoder,
        "dataset": {"name": dataset.name, "path": str(dataset.root.resolve()), "files": dataset.file_hashes()},
        "template": {"corpus": CORPUS_TEMPLATE, "queries": QUERY_TEMPLATE},
        "dim": dim,
        "dtype": cfg.dtype,
        "layout": {"shard_rows": cfg.shard_rows, "chunk_rows": cfg.chunk_rows},
        "import": record,
    }


def import_vectors(cfg: ImportConfig, log: Callable[[str], None] = print) -> Store:
    """Validate precomputed vectors against the dataset, then write them as a complete store.

    The store appears atomically (empty) and is marked complete only after its last shard; a killed
    import leaves a store that readers refuse and that the same command resumes.
    """
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype {cfg.dtype!r}: choose one of {', '.join(DTYPES)}")
    dataset = find_dataset(cfg.dataset, cfg.data_dir)
    out = Path(cfg.out) if cfg.out else default_store_path(dataset.name, cfg.model)
    check_writable(out)
    doc_ids, query_ids = read_ids(dataset.corpus_path), read_ids(dataset.queries_path)
    encoder = declared_encoder(cfg.model, cfg.normalize)
    inputs = {
        "corpus": load_vectors("corpus", cfg.corpus, cfg.corpus_ids, cfg.id_column, cfg.vector_column),
        "queries": load_vectors("queries", cfg.queries, cfg.query_ids, cfg.id_column, cfg.vector_column),
    }
    dim = _check_dims(inputs, encoder)
    order = {
        "corpus": _row_order(inputs["corpus"], doc_ids, dataset.corpus_path, complete=True),
        "queries": _row_order(inputs["queries"], query_ids, dataset.queries_path, complete=False),
    }
    renormalized = {s: _check_values(inputs[s], cfg.dtype, cfg.normalize, encoder["model_normalizes"])
                    for s in SECTIONS}
    for s in SECTIONS:
        if renormalized[s]:
            log(f"warning: {s}: {renormalized[s]} row(s) were not unit length; "
                "L2-normalising them (recorded in the store)")
    if len(order["queries"]) < len(query_ids):
        log(f"warning: {len(query_ids) - len(order['queries'])} of {len(query_ids)} queries have no vector; "
            "eval scores judged queries without one as 0")

    record = {
        "files": {_FILE_KEYS[s, role]: info for s in SECTIONS for role, info in inputs[s].files.items()},
        "row_order": "dataset file order, rows matched by id",
        "normalized_rows": renormalized,
        "queries_without_vector": len(query_ids) - len(order["queries"]),
    }
    provenance = _provenance(cfg, dataset, encoder, dim, record)
    store, written = _write(out, cfg, provenance, inputs, order, log)
    if not written:
        return store
    weights = f"weights {encoder['weights_sha256'][:12]}" if encoder["weights_sha256"] else "declared, weights unknown"
    log(f"{out}: imported {store.corpus.rows} docs + {store.queries.rows} queries, {dim}-d {cfg.dtype}, "
        f"encoder {encoder['name']} ({weights})")
    return store
