"""Retrieval heads on top of a frozen encoder: a projection and a JEPA predictor, saved without pickle.

Documents are retrieved by their projection; queries by the projection or by the predictor (which maps
a query's projection to where its relevant documents lie). Heads save as `heads.safetensors` +
`heads.json` (config, parameter counts, the store and encoder fingerprints they were trained on).
Why each init and the adapter are shaped so: pipelines/ABLATION.md, "Design notes".
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import UserError
from .files import atomic_path, atomic_write_json, read_json, sha256_file
from .search import SIMILARITIES

FORMAT = "jepa-cache/heads"
FORMAT_VERSION = 1
WEIGHTS_FILE = "heads.safetensors"
META_FILE = "heads.json"
PROJECTIONS = ("linear", "residual", "mlp", "adapter")
PREDICTORS = ("residual", "mlp", "none")
INITS = ("pca", "orthogonal", "identity", "random")
TOWERS = ("projection", "predictor")


@dataclass
class HeadsConfig:
    """Architecture of the heads; the field defaults are the `jepa` preset's heads."""

    input_dim: int = 768
    output_dim: int = 512
    # linear | residual (linear + zero-init MLP) | mlp (the study's) | adapter (x + Wx, zero-init W)
    projection: str = "linear"
    projection_hidden: int = 1536
    predictor: str = "residual"  # residual (identity at start) | mlp (the study's) | none
    predictor_hidden: int = 1024
    dropout: float = 0.1
    init: str = "pca"  # of the projection's linear map: pca | orthogonal | identity | random
    similarity: str = "cos"  # what retrieval with these heads uses: cos | l2
    query_tower: str = "projection"  # which head encodes queries at retrieval time
    rank: int = 0  # adapter projection only: rank of W (0: a full input_dim x input_dim matrix)

    def validate(self) -> "HeadsConfig":
        for name, value, allowed in (
            ("projection", self.projection, PROJECTIONS), ("predictor", self.predictor, PREDICTORS),
            ("init", self.init, INITS), ("similarity", self.similarity, SIMILARITIES),
            ("query tower", self.query_tower, TOWERS),
        ):
            if value not in allowed:
                raise UserError(f"heads {name} {value!r}: choose one of {', '.join(allowed)}")
        if min(self.input_dim, self.output_dim, self.projection_hidden, self.predictor_hidden) <= 0:
            raise UserError("heads dimensions must be positive")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout {self.dropout}: must be in [0, 1)")
        if self.projection == "mlp" and self.init != "random":
            raise UserError(f"--init {self.init}: the study's MLP projection has only the random init; "
                            "use --projection linear or residual")
        if self.rank < 0 or (self.rank and self.projection != "adapter"):
            raise UserError(f"--rank {self.rank}: a non-negative rank, and only with --projection adapter")
        if self.projection == "adapter" and (self.init != "identity" or self.output_dim != self.input_dim):
            raise UserError(f"--projection adapter (x + Wx, the best preset's) starts at the identity: it needs "
                            f"--init identity and --output-dim {self.input_dim} (the encoder's width, or 0), "
                            f"not {self.output_dim} with --init {self.init}; "
                            "for a narrower output use --preset jepa (PCA-initialised linear projection)")
        if self.init == "identity" and self.output_dim != self.input_dim:
            raise UserError(f"--init identity needs --output-dim {self.input_dim} (the encoder's width), "
                            f"not {self.output_dim}")
        if self.init in ("pca", "orthogonal") and self.output_dim > self.input_dim:
            raise UserError(f"--init {self.init} needs --output-dim <= {self.input_dim}, not {self.output_dim}")
        if self.query_tower == "predictor" and self.predictor == "none":
            raise UserError("--query-tower predictor needs a predictor (not --predictor none)")
        return self


def mlp(dim_in: int, hidden: int, dim_out: int, dropout: float) -> nn.Sequential:
    """Linear → GELU → Dropout → Linear: the study's block (its state-dict keys are 0.* and 3.*)."""
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim_out))


class Residual(nn.Module):
    """`base(x) + mlp(x)` with the MLP's last layer zero-initialised: starts as `base`."""

    def __init__(self, base: nn.Module, branch: nn.Sequential):
        super().__init__()
        self.base = base
        self.branch = branch
        nn.init.zeros_(branch[-1].weight)
        nn.init.zeros_(branch[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.branch(x)


class Adapter(nn.Module):
    """`scale · (x + W x + b)` with W and b zero-initialised: exactly the identity (up to `scale`) at step 0.

    W is a full [dim, dim] matrix, or `up @ down` of rank `rank` (`down` random, `up` zero, as in
    LoRA). Weight decay on W and b decays towards the identity map.

    Shape:
        x: [N, dim] -> [N, dim]
    """

    def __init__(self, dim: int, rank: int = 0, scale: float = 1.0):
        super().__init__()
        self.rank = rank
        if rank:
            self.down = nn.Parameter(torch.randn(rank, dim) / dim**0.5)
            self.up = nn.Parameter(torch.zeros(dim, rank))
        else:
            self.weight = nn.Parameter(torch.zeros(dim, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def delta(self, x: Tensor) -> Tensor:
        """W x + b: how far the adapter has moved x."""
        if self.rank:
            return (x @ self.down.T) @ self.up.T + self.bias
        return x @ self.weight.T + self.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * (x + self.delta(x))


def structured_weight(init: str, input_dim: int, output_dim: int, init_vectors: Tensor | None) -> Tensor:
    """The projection matrix for a structured init, scaled to unit mean squared output coordinate.

    Shape:
        init_vectors: [N, input_dim] (needed by pca; calibrates the scale of the others)
        returns [output_dim, input_dim]
    """
    if init == "identity":
        weight = torch.eye(input_dim)
    elif init == "orthogonal":
        weight = nn.init.orthogonal_(torch.empty(output_dim, input_dim))
    else:
        if init_vectors is None or len(init_vectors) == 0:
            raise ValueError("pca init needs the training documents' vectors")
        x = init_vectors.double()
        _, eigvecs = torch.linalg.eigh(x.T @ x / len(x))  # ascending eigenvalues
        weight = eigvecs[:, -output_dim:].flip(1).T.float()
    if init_vectors is not None and len(init_vectors):
        mean_sq = (init_vectors.float() @ weight.T).square().sum(1).mean() / output_dim
    else:  # encoder vectors are unit-norm: a map with orthonormal rows gives output_dim/input_dim of it
        mean_sq = torch.tensor(1.0 / input_dim)
    return weight / mean_sq.clamp_min(1e-12).sqrt()


class Heads(nn.Module):
    """Projection (input_dim → output_dim) and optional predictor (output_dim → output_dim).

    Attributes:
        projection: applied to query and document vectors.
        predictor: maps a query's projection to a predicted document projection (or None).
        meta: what `heads.json` records besides the config (fingerprints, training summary).
    """

    def __init__(self, config: HeadsConfig, init_vectors: Tensor | None = None, *, initialise: bool = True):
        """Build the modules and initialise them as `config.init` says.

        Args:
            init_vectors: [N, input_dim] training documents' vectors, for the pca init (and to
                calibrate the scale of the other structured inits).
            initialise: False when the weights are about to be loaded (skips the pca).
        """
        super().__init__()
        self.config = config.validate()
        c = config
        if c.projection == "mlp":
            self.projection: nn.Module = mlp(c.input_dim, c.projection_hidden, c.output_dim, c.dropout)
        elif c.projection == "adapter":
            # SIGReg's scale rounded to a power of two, so that step 0 is *bit-exactly* vanilla once normalised
            scale = 1.0
            if initialise:
                scale = float(structured_weight("identity", c.input_dim, c.output_dim, init_vectors)[0, 0])
            self.projection = Adapter(c.input_dim, c.rank, 2.0 ** round(math.log2(scale)))
        else:
            linear = nn.Linear(c.input_dim, c.output_dim)
            if c.init != "random" and initialise:
                with torch.no_grad():
                    linear.weight.copy_(structured_weight(c.init, c.input_dim, c.output_dim, init_vectors))
                    linear.bias.zero_()
            self.projection = linear if c.projection == "linear" else \
                Residual(linear, mlp(c.input_dim, c.projection_hidden, c.output_dim, c.dropout))
        if c.predictor == "none":
            self.predictor: nn.Module | None = None
        elif c.predictor == "mlp":
            self.predictor = mlp(c.output_dim, c.predictor_hidden, c.output_dim, c.dropout)
        else:
            self.predictor = Residual(nn.Identity(), mlp(c.output_dim, c.predictor_hidden, c.output_dim, c.dropout))
        self.meta: dict[str, Any] = {}

    def forward(self, x: Tensor) -> Tensor:
        """The projection. Shape: x [N, input_dim] → [N, output_dim]."""
        return self.projection(x)

    @property
    def similarity(self) -> str:
        """`cos` or `l2`: how vectors from these heads must be compared at retrieval time."""
        return self.config.similarity

    @property
    def encoder_fingerprint(self) -> str | None:
        """The encoder these heads were trained on; pass it to `open_store(expect_encoder=...)`."""
        return self.meta.get("store", {}).get("encoder_fingerprint")

    @property
    def store_fingerprint(self) -> str | None:
        return self.meta.get("store", {}).get("fingerprint")

    @property
    def fingerprint(self) -> str:
        """sha256 of the config and the weights: names these heads in evaluation outputs."""
        digest = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode())
        for name, value in self.state_dict().items():
            digest.update(name.encode())
            digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def parameter_counts(self) -> dict[str, int]:
        counts = {"projection": sum(p.numel() for p in self.projection.parameters())}
        counts["predictor"] = sum(p.numel() for p in self.predictor.parameters()) if self.predictor is not None else 0
        counts["total"] = counts["projection"] + counts["predictor"]
        return counts

    def _infer(self, fn, x: Tensor) -> Tensor:
        """Run `fn` in eval mode without autograd, restoring the previous mode afterwards."""
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                return fn(x.to(device=self._device(), dtype=torch.float32))
        finally:
            self.train(was_training)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_documents(self, x: Tensor) -> Tensor:
        """Document vectors for the index (eval mode, no grad).

        Shape:
            x: [N, input_dim] encoder vectors; returns [N, output_dim] float32 on the heads' device
        """
        return self._infer(self.projection, x)

    def encode_queries(self, x: Tensor, tower: str | None = None) -> Tensor:
        """Query vectors for search: the projection, or the predictor applied to it.

        Args:
            tower: `projection` or `predictor`; default the config's `query_tower`.

        Shape:
            x: [N, input_dim] encoder vectors; returns [N, output_dim] float32 on the heads' device
        """
        tower = tower or self.config.query_tower
        if tower not in TOWERS:
            raise UserError(f"query tower {tower!r}: choose one of {', '.join(TOWERS)}")
        if tower == "predictor":
            if self.predictor is None:
                raise UserError("these heads have no predictor; encode queries with the projection tower")
            return self._infer(lambda v: self.predictor(self.projection(v)), x)
        return self._infer(self.projection, x)


def save_heads(heads: Heads, folder: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write `heads.safetensors` then `heads.json` (each atomically) into `folder`.

    Heads already there lose their `heads.json` first, and the new one is written last with the
    weights' sha256: at every instant, a `heads.json` that exists describes complete weights that
    match it. A crash mid-save leaves no heads (the old ones were being replaced), never a mix.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    heads.meta = {**heads.meta, **(meta or {})}
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in heads.state_dict().items()}
    (folder / META_FILE).unlink(missing_ok=True)
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": asdict(heads.config),
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(folder / WEIGHTS_FILE)},
        "parameters": heads.parameter_counts(),
        **heads.meta,
    }
    atomic_write_json(folder / META_FILE, record)
    return folder


def load_heads(path: str | os.PathLike, device: torch.device | str = "cpu") -> Heads:
    """Load heads saved by `save_heads` (a folder, or its heads.json), in eval mode.

    The store and encoder fingerprints are in `heads.meta["store"]`; `heads.encoder_fingerprint`
    is what `open_store(expect_encoder=...)` wants.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such heads folder; pass the folder train-heads wrote (its --out)")
    folder = path if path.is_dir() else path.parent
    if not (folder / META_FILE).is_file():
        raise UserError(f"{folder}: holds no {META_FILE}; pass the folder train-heads wrote (its --out)")
    record = read_json(folder / META_FILE)
    if record.get("format") != FORMAT:
        raise UserError(f"{folder / META_FILE}: not a jepa-cache heads file (format {record.get('format')!r})")
    if record.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{folder / META_FILE}: heads format version {record.get('format_version')} is not supported "
                        f"(need {FORMAT_VERSION})")
    entry, config_record = record.get("weights"), record.get("config")
    if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str)
            and isinstance(config_record, dict)):
        raise UserError(f"{folder / META_FILE}: no weights record (file, sha256) or no config; "
                        "the heads file is damaged: retrain")
    if Path(entry["file"]).name != entry["file"] or entry["file"] in ("", ".", ".."):
        raise UserError(f"{folder / META_FILE}: weights file {entry['file']!r} must be a bare file name "
                        f"inside {folder}")
    weights = folder / entry["file"]
    if not weights.is_file():
        raise UserError(f"{weights}: missing; the heads folder is incomplete")
    if sha256_file(weights) != entry["sha256"]:
        raise UserError(f"{weights}: sha256 differs from the one in {META_FILE} (an interrupted or mixed save); "
                        "retrain or restore it")
    known = {f.name for f in fields(HeadsConfig)}
    try:
        config = HeadsConfig(**{k: v for k, v in config_record.items() if k in known})
    except TypeError as e:
        raise UserError(f"{folder / META_FILE}: config is incomplete ({e}); retrain") from None
    heads = Heads(config, initialise=False)
    try:
        heads.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    except RuntimeError as e:
        raise UserError(f"{weights}: weights do not fit the config in {META_FILE} ({e})") from None
    own = ("format", "format_version", "config", "weights", "parameters")
    heads.meta = {k: v for k, v in record.items() if k not in own}
    return heads.to(device).eval()


def describe(heads: Heads) -> str:
    """One line for the log: architecture and trainable parameter counts."""
    c, n = heads.config, heads.parameter_counts()
    predictor = "no predictor" if c.predictor == "none" else f"{c.predictor} predictor {n['predictor']:,}"
    kind = f"{c.projection}{f' rank {c.rank}' if c.rank else ''}"
    return (f"heads: {kind} projection {c.input_dim}→{c.output_dim} ({c.init} init) {n['projection']:,} params, "
            f"{predictor}; {n['total']:,} trainable parameters")
