"""Export trained heads as a sentence-transformers model folder built from its own modules only.

`SentenceTransformer(DIR)` loads it with `trust_remote_code=False` and without jepa-cache installed
(MTEB, LangChain, LlamaIndex, vector databases). `encode_document(texts)` gives the vectors eval
indexes and `encode_query(texts)` the ones it searches with: encoder → L2-normalise (as every store
is) → the heads as `Dense` layers → `Normalize` when the heads compare by cosine (raw for `l2`).
Documents must be passed as the store encoded them: `(title + " " + text).strip()`.

Every head that heads.py builds maps exactly onto `Dense` (a linear map + one activation):

- `linear`: one `Dense`, identity activation.
- `adapter` (the `best` preset's `scale · (x + Wx + b)`, W full or low rank): one `Dense` with
  weight `scale · (I + W)` and bias `scale · b`.
- `mlp` (Linear → GELU → Dropout → Linear): two `Dense`, GELU then identity (dropout is off at inference).
- `residual` (`base(x) + mlp(x)`, base the identity or a linear map): the skip connection rides
  through the GELU layer as `GELU(x) − GELU(−x) = x`: a first `Dense` maps x to `[x, −x, W1 x + b1]`
  with GELU, the second applies `[B, −B, W2]` (+ `c + b2`), which is `Bx + c + W2 GELU(W1 x + b1) + b2`.

A separate query tower (the predictor after the projection) goes through a `Router`
(sentence-transformers ≥ 5): `encode_query` takes the query route, `encode_document` and plain
`encode` the document route. With the projection as query tower both sides are the same stack and
no Router is needed. Weights are safetensors; nothing is unpickled when loading.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import UserError
from .corrections import Corrections, apply_to_block
from .corrections import find as find_corrections
from .corrections import for_store
from .files import atomic_dir, atomic_write_json
from .heads import TOWERS, Adapter, Heads, Residual, load_heads
from .models import resolve_model, weights_sha256

try:  # sentence-transformers 6 moved the modules; 5.x has them (Router included) in `models`
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Router
except ImportError:
    try:
        from sentence_transformers.models import Dense, Normalize, Router
    except ImportError:
        raise UserError("export needs sentence-transformers >= 5 (its Router module): "
                        "pip install -U sentence-transformers") from None

EXPORT_FILE = "jepa_cache_export.json"
CORPUS_FILE = "corpus_vectors.parquet"


def _dense(weight: torch.Tensor, bias: torch.Tensor, activation: nn.Module) -> Dense:
    weight = weight.detach().to("cpu", torch.float32).clone()
    return Dense(weight.shape[1], weight.shape[0], bias=True, activation_function=activation,
                 init_weight=weight, init_bias=bias.detach().to("cpu", torch.float32).clone())


def _mlp_parts(block: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The two linear layers of heads.mlp (Linear → GELU → Dropout → Linear), or a refusal for any other block."""
    kinds = [type(m) for m in block] if isinstance(block, nn.Sequential) else []
    if kinds != [nn.Linear, nn.GELU, nn.Dropout, nn.Linear] or block[1].approximate != "none":
        raise UserError(f"heads block {block!r} has no exact sentence-transformers equivalent; only heads.py's "
                        "linear, adapter, mlp and residual layers export")
    return block[0], block[3]


def dense_layers(module: nn.Module) -> list[Dense]:
    """Built-in `Dense` layers that compute `module` (a projection or predictor from heads.py) exactly.

    Shape:
        the Dense stack maps [N, in] to [N, out] as `module` does (in eval mode)
    """
    identity = nn.Identity()
    if isinstance(module, nn.Linear):
        return [_dense(module.weight, module.bias, identity)]
    if isinstance(module, Adapter):
        with torch.no_grad():
            dim = module.bias.shape[0]
            delta = module.up @ module.down if module.rank else module.weight
            return [_dense(module.scale * (torch.eye(dim) + delta), module.scale * module.bias, identity)]
    if isinstance(module, nn.Sequential):
        first, second = _mlp_parts(module)
        return [_dense(first.weight, first.bias, nn.GELU()), _dense(second.weight, second.bias, identity)]
    if isinstance(module, Residual):
        first, second = _mlp_parts(module.branch)
        dim = first.in_features
        if isinstance(module.base, nn.Identity):
            base_w, base_b = torch.eye(dim), torch.zeros(dim)
        elif isinstance(module.base, nn.Linear):
            base_w, base_b = module.base.weight, module.base.bias
        else:
            raise UserError(f"residual base {module.base!r} has no exact sentence-transformers equivalent")
        with torch.no_grad():
            eye = torch.eye(dim)
            w1 = torch.cat([eye, -eye, first.weight])  # GELU(x) - GELU(-x) = x carries the skip through the GELU
            b1 = torch.cat([torch.zeros(2 * dim), first.bias])
            w2 = torch.cat([base_w, -base_w, second.weight], dim=1)
            return [_dense(w1, b1, nn.GELU()), _dense(w2, base_b + second.bias, identity)]
    raise UserError(f"heads layer {type(module).__name__} has no exact sentence-transformers equivalent; "
                    "nothing was exported")


def to_sentence_transformer(encoder, heads: Heads, tower: str):
    """The encoder's modules, Normalize, the heads as Dense layers (a query/document Router when the towers differ),
    then Normalize for cosine heads. The encoder's prompts (if any) travel with it."""
    from sentence_transformers import SentenceTransformer

    base = list(encoder)
    if not isinstance(base[-1], Normalize):  # stores always hold L2-normalised encoder vectors
        base.append(Normalize())
    if tower == "predictor":
        query = dense_layers(heads.projection) + dense_layers(heads.predictor)
        head = [Router.for_query_document(query_modules=query, document_modules=dense_layers(heads.projection))]
    else:
        head = dense_layers(heads.projection)
    cos = heads.similarity == "cos"
    return SentenceTransformer(modules=[*base, *head, *([Normalize()] if cos else [])],
                               similarity_fn_name="cosine" if cos else "euclidean", device="cpu",
                               prompts=getattr(encoder, "prompts", None) or None,
                               default_prompt_name=getattr(encoder, "default_prompt_name", None))


def corpus_vectors(heads: Heads, store, corrections: Corrections | None = None, block_rows: int = 65536):
    """Yield (ids, vectors) blocks of the store's documents as eval indexes them: through the heads (what
    encode_document gives), then the per-document corrections made for this store, if any.

    Shape:
        vectors: [rows, output_dim] float32, L2-normalised for cosine heads
    """
    section = store.corpus
    fixed = (corrections.rows_in(section.row_of), corrections.vectors) if corrections is not None else None
    for start, block in section.iter_blocks(block_rows):
        docs = heads.encode_documents(torch.from_numpy(block))
        if fixed is not None:
            docs = torch.from_numpy(apply_to_block(docs.cpu().numpy(), start, *fixed))
        if heads.similarity == "cos":
            docs = torch.nn.functional.normalize(docs, dim=1)
        yield section.ids[start : start + len(block)], docs.cpu().numpy()


def _write_corpus_vectors(path: Path, blocks) -> int:
    """`id` (string) + `vector` (fixed-size list of float32) Parquet, written block by block."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, writer = 0, None
    try:
        for ids, vectors in blocks:
            column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1])
            table = pa.table({"id": pa.array(ids, pa.string()), "vector": column})
            writer = writer or pq.ParquetWriter(str(path), table.schema)
            writer.write_table(table)
            rows += len(ids)
    finally:
        if writer is not None:
            writer.close()
    return rows


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an `out` that is a file, or a non-empty folder without --overwrite."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; --out names the folder to write the model to")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: exists and is not empty; pass --overwrite to replace it")


def _store_and_corrections(store: str, heads, heads_path, log: Callable[[str], None]):
    """The store made by the heads' encoder, and the heads' corrections when they were made for that store."""
    from .store import open_store

    docs_store = open_store(store, expect_dim=heads.config.input_dim, expect_encoder=heads.encoder_fingerprint)
    found = find_corrections(heads_path)
    corrections = Corrections.load(found) if found is not None else None
    if corrections is not None and for_store(corrections, docs_store, heads) is None:
        log(f"{docs_store.path}: the heads' corrections belong to another store; "
            "its vectors go through the heads alone")
        corrections = None
    return docs_store, corrections


def _check_weights(folder: Path, heads, log: Callable[[str], None]) -> str:
    """The encoder's weights sha256, refused when it differs from the one the heads were trained on."""
    sha, expected = weights_sha256(folder), heads.encoder_fingerprint
    if expected and not expected.startswith("declared:") and sha != expected.split("+prompts:")[0]:
        raise UserError(f"{folder}: weights sha256 {sha[:12]} differ from the encoder these heads were trained on "
                        f"({expected[:12]}); pass --model with that encoder")
    if expected is None or expected.startswith("declared:"):
        log(f"note: the heads' store recorded no encoder weights; trusting that {folder} made its vectors")
    return sha


def export(heads_path: str | os.PathLike, out: str | os.PathLike, model: str | None = None,
           query_tower: str | None = None, store: str | None = None, overwrite: bool = False,
           log: Callable[[str], None] = print) -> Path:
    """Write `out` as a sentence-transformers folder that encodes queries and documents as eval does.

    Args:
        model: the encoder (name or folder); default the one recorded with the heads. Its weights
            must be the ones the heads were trained on.
        query_tower: `projection` or `predictor`; default the heads' own.
        store: a store made by that encoder: its documents through the heads are written to
            `out/corpus_vectors.parquet` (`id`, `vector`), so an index needs no re-encoding; the
            heads' per-document corrections made for that store are applied, as eval applies them.
    """
    heads = load_heads(heads_path)
    tower = query_tower or heads.config.query_tower
    if tower not in TOWERS:
        raise UserError(f"--query-tower {tower!r}: choose one of {', '.join(TOWERS)}")
    if tower == "predictor" and heads.predictor is None:
        raise UserError(f"{heads_path}: these heads have no predictor; export with --query-tower projection")
    name = model or heads.meta.get("store", {}).get("encoder")
    if not name:
        raise UserError(f"{heads_path}: heads.json records no encoder name; pass --model")
    out = Path(out)
    _check_out(out, overwrite)
    docs_store, corrections = None, None
    if store is not None:
        docs_store, corrections = _store_and_corrections(store, heads, heads_path, log)

    folder = resolve_model(name)
    sha = _check_weights(folder, heads, log)

    from .encoder import embedding_dim, load_encoder

    encoder = load_encoder(folder, "cpu")
    if embedding_dim(encoder) != heads.config.input_dim:
        raise UserError(f"{folder}: {embedding_dim(encoder)}-d vectors, but the heads take {heads.config.input_dim}-d")
    st_model = to_sentence_transformer(encoder, heads, tower)

    with atomic_dir(out, replace=True) as partial:  # the new folder appears whole, never half-written
        st_model.save(str(partial))
        record = {"heads": str(heads_path), "heads_fingerprint": heads.fingerprint, "query_tower": tower,
                  "similarity": heads.similarity, "encoder": str(name), "encoder_sha256": sha,
                  "load": "SentenceTransformer(DIR)"}
        if docs_store is not None:
            rows = _write_corpus_vectors(partial / CORPUS_FILE, corpus_vectors(heads, docs_store, corrections))
            record["corpus_vectors"] = {"file": CORPUS_FILE, "rows": rows, "store": str(docs_store.path),
                                        "store_fingerprint": docs_store.fingerprint,
                                        "corrected": 0 if corrections is None else len(corrections.doc_ids)}
        atomic_write_json(partial / EXPORT_FILE, record)
    log(f"exported {out}: {folder.name} + heads {heads.fingerprint[:8]} (queries: {tower}, {heads.similarity})"
        + (f", {record['corpus_vectors']['rows']} document vectors in {CORPUS_FILE}" if docs_store is not None else "")
        + "; load with SentenceTransformer(DIR)")
    return out
