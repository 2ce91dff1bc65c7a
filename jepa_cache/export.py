"""Export trained heads as a sentence-transformers model folder: the encoder plus the heads, routed by task.

`model.encode_document(texts)` gives the vectors eval indexes and `model.encode_query(texts)` the
ones it searches with: encoder → L2-normalise (as every store is) → projection (→ predictor for
queries with the predictor tower) → L2-normalise when the heads compare by cosine (raw for `l2`).
Documents must be passed as the store encoded them: `(title + " " + text).strip()`.

The heads sit in a sentence-transformers `Router` after the encoder's pooling (query route:
projection [+ predictor]; document route: the same projection module), so `encode_query` /
`encode_document` pick the route and plain `encode` takes the document route. Each head layer is
a `HeadModule` saved as config.json + model.safetensors: no pickle anywhere. Loading imports
`jepa_cache.export.HeadModule`, so jepa-cache must be installed where the model is loaded, and
sentence-transformers >= 6 wants `trust_remote_code=True` for any module class outside its own
package (the class comes from the installed jepa_cache; nothing in the folder is executed).
"""

from __future__ import annotations

import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .files import atomic_dir, atomic_write_json
from .heads import TOWERS, Heads, HeadsConfig, load_heads
from .models import resolve_model, weights_sha256

try:  # sentence-transformers 6 moved the modules; 5.x has them (Router and Module included) in `models`
    from sentence_transformers.sentence_transformer.modules import Module, Normalize, Router
except ImportError:
    try:
        from sentence_transformers.models import Module, Normalize, Router
    except ImportError:
        raise UserError("export needs sentence-transformers >= 5 (its Router module): pip install -U sentence-transformers") from None

PARTS = ("projection", "predictor")
EXPORT_FILE = "jepa_cache_export.json"


class HeadModule(Module):
    """One head layer (the projection or the predictor) as a sentence-transformers module.

    The layer is rebuilt by `heads.Heads` from the heads' own config, so every architecture that
    heads.py trains exports without a second copy of its construction here.

    Shape:
        features["sentence_embedding"]: [N, input_dim] (projection) or [N, output_dim] (predictor) → [N, output_dim]
    """

    config_keys = ["part", "heads_config"]

    def __init__(self, part: str, heads_config: dict[str, Any]):
        super().__init__()
        if part not in PARTS:
            raise ValueError(f"part {part!r}: one of {', '.join(PARTS)}")
        known = {f.name for f in fields(HeadsConfig)}
        layer = getattr(Heads(HeadsConfig(**{k: v for k, v in heads_config.items() if k in known}), initialise=False), part)
        if layer is None:
            raise ValueError("these heads have no predictor")
        self.part, self.heads_config, self.layer = part, heads_config, layer

    @classmethod
    def from_heads(cls, heads: Heads, part: str) -> "HeadModule":
        module = cls(part, asdict(heads.config))
        module.layer.load_state_dict(getattr(heads, part).state_dict())
        return module

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        features["sentence_embedding"] = self.layer(features["sentence_embedding"])
        return features

    def get_embedding_dimension(self) -> int:
        return int(self.heads_config["output_dim"])

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        """config.json + model.safetensors; always safetensors, so loading never unpickles."""
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=True)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None, cache_folder: str | None = None,
             revision: str | None = None, local_files_only: bool = False, **kwargs) -> "HeadModule":
        hub = dict(subfolder=subfolder, token=token, cache_folder=cache_folder, revision=revision, local_files_only=local_files_only)
        module = cls(**cls.load_config(model_name_or_path, **hub))
        return cls.load_torch_weights(model_name_or_path, model=module, **hub)


def to_sentence_transformer(encoder, heads: Heads, tower: str):
    """The encoder's modules, then a query/document Router over the heads, then Normalize for cosine heads."""
    from sentence_transformers import SentenceTransformer

    base = list(encoder)
    if not isinstance(base[-1], Normalize):  # stores always hold L2-normalised encoder vectors
        base.append(Normalize())
    projection = HeadModule.from_heads(heads, "projection")
    query = [projection, HeadModule.from_heads(heads, "predictor")] if tower == "predictor" else [projection]
    router = Router.for_query_document(query_modules=query, document_modules=[projection])
    cos = heads.similarity == "cos"
    return SentenceTransformer(modules=[*base, router, *([Normalize()] if cos else [])],
                               similarity_fn_name="cosine" if cos else "euclidean", device="cpu")


def export(heads_path: str | os.PathLike, out: str | os.PathLike, model: str | None = None, query_tower: str | None = None,
           overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Write `out` as a sentence-transformers folder that encodes queries and documents as eval does.

    Args:
        model: the encoder (name or folder); default the one recorded with the heads. Its weights
            must be the ones the heads were trained on.
        query_tower: `projection` or `predictor`; default the heads' own.
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
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out}: exists and is not empty; pass --overwrite to replace it")

    folder = resolve_model(name)
    sha, expected = weights_sha256(folder), heads.encoder_fingerprint
    if expected and not expected.startswith("declared:") and sha != expected:
        raise UserError(f"{folder}: weights sha256 {sha[:12]} differ from the encoder these heads were trained on ({expected[:12]}); "
                        "pass --model with that encoder")
    if expected is None or expected.startswith("declared:"):
        log(f"note: the heads' store recorded no encoder weights; trusting that {folder} made its vectors")

    from .encoder import embedding_dim, load_encoder

    encoder = load_encoder(folder, "cpu")
    if embedding_dim(encoder) != heads.config.input_dim:
        raise UserError(f"{folder}: {embedding_dim(encoder)}-d vectors, but the heads take {heads.config.input_dim}-d")
    st_model = to_sentence_transformer(encoder, heads, tower)

    with atomic_dir(out, replace=True) as partial:  # the new folder appears whole, never half-written
        st_model.save(str(partial))
        atomic_write_json(partial / EXPORT_FILE, {
            "heads": str(heads_path), "heads_fingerprint": heads.fingerprint, "query_tower": tower, "similarity": heads.similarity,
            "encoder": str(name), "encoder_sha256": sha,
            "load": "SentenceTransformer(DIR, trust_remote_code=True) with jepa-cache installed (for jepa_cache.export.HeadModule)",
        })
    log(f"exported {out}: {folder.name} + heads {heads.fingerprint[:8]} (queries: {tower}, {heads.similarity}); "
        "load with SentenceTransformer(DIR, trust_remote_code=True)")
    return out
