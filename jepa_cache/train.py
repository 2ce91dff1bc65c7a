"""Stage 2: train the projection and predictor on cached tensors only.

The vectors the training pairs touch go to the device once; a batch is an index gather, the
shuffle comes from a seeded generator, and nothing here reads text or imports
sentence-transformers. The same `fit` loop runs the live reference (`--live`): only the
embedding source differs (see live.py), which is what proves the cache changes speed, not results.

Outputs, in the heads folder: `heads.safetensors` + `heads.json` (see heads.py), `config.json`
(every setting resolved) and `steps.jsonl` (one line per step: loss and each weighted term).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import Tensor

from .config import TrainConfig
from .datasets import find_dataset, iter_jsonl, read_qrels
from .encoder import pick_device
from .errors import UserError
from .files import atomic_write_json, exclusive_lock
from .heads import META_FILE, Heads, HeadsConfig, describe, save_heads
from .losses import PART_NAMES, JEPASIGRegLoss, first_nonfinite
from .store import Store, now_iso, open_store

DEFAULT_HEADS_DIR = Path("runs/heads")
STRATEGIES = ("frozen-predictor", "frozen-isotropy")
STEPS_FILE = "steps.jsonl"
CONFIG_FILE = "config.json"

# Every preset sets every preset-controlled field of TrainConfig.
PRESETS: dict[str, dict] = {
    # Linear PCA-initialised projection (step 0 keeps most of vanilla), residual predictor (starts
    # as the identity), cosine retrieval, InfoNCE + real SIGReg.
    "default": dict(
        output_dim=512, projection="linear", projection_hidden=1536, predictor="residual", predictor_hidden=1024,
        dropout=0.1, init="pca", similarity="cos", query_tower="projection",
        contrastive="infonce", isotropy="sigreg", predictive="cosine", temperature=0.05, margin=1.0,
        lambda_predictive=0.5, lambda_contrastive=0.1, lambda_isotropy=1.0, lambda_reg=0.0, use_stopgrad=True,
        directions=256, epochs=2, batch_size=256, lr=5e-4, weight_decay=0.01, warmup=0.05, grad_clip=1.0,
    ),
    # The study's heads and loss, kept for a faithful comparison: MLP projection 768→1536→512
    # (1.97M params) and MLP predictor 512→1024→512 (1.05M), PyTorch's random init, raw outputs
    # compared by L2, triplet (margin 1.0; without triples the negative is mined in the batch: the
    # nearest non-positive document, where the study also mined among queries) +
    # covariance isotropy, MSE predictive term, batch 16, heads at 5e-4.
    # Where we necessarily differ: its frozen encoder ran in train mode (dropout on, so each
    # text's vector changed every step); the cache holds the deterministic eval-mode vector.
    # Bugs not copied: its head learning rate silently fell to ~2e-6 and its scheduler stepped
    # once per epoch, so its heads barely trained; here the schedule steps every batch.
    "study": dict(
        output_dim=512, projection="mlp", projection_hidden=1536, predictor="mlp", predictor_hidden=1024,
        dropout=0.1, init="random", similarity="l2", query_tower="projection",
        contrastive="triplet", isotropy="covariance", predictive="mse", temperature=0.05, margin=1.0,
        lambda_predictive=0.5, lambda_contrastive=0.1, lambda_isotropy=1.0, lambda_reg=0.0, use_stopgrad=True,
        directions=256, epochs=2, batch_size=16, lr=5e-4, weight_decay=0.01, warmup=0.05, grad_clip=1.0,
    ),
}
HEADS_FIELDS = tuple(f.name for f in dataclasses.fields(HeadsConfig) if f.name != "input_dim")


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill every None from the preset, apply the strategy, and check the values."""
    if cfg.preset not in PRESETS:
        raise UserError(f"--preset {cfg.preset!r}: choose one of {', '.join(PRESETS)}")
    if cfg.strategy not in STRATEGIES:
        raise UserError(f"--strategy {cfg.strategy!r}: choose one of {', '.join(STRATEGIES)} (full fine-tune and hybrid: `jepa-cache train-live`)")
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
    if cfg.strategy == "frozen-isotropy":  # projection only: no predictor, no predictive term
        for key, want in (("predictor", "none"), ("lambda_predictive", 0.0)):
            if values.get(key, want) != want:
                raise UserError(f"--strategy frozen-isotropy trains the projection only; it cannot take {key}={values[key]!r}")
            values[key] = want
    resolved = TrainConfig(**{**PRESETS[cfg.preset], **values})
    if resolved.strategy == "frozen-predictor" and resolved.predictor == "none":
        raise UserError("--strategy frozen-predictor needs a predictor; use --strategy frozen-isotropy for projection only")
    for name in ("epochs", "batch_size", "directions"):
        if getattr(resolved, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(resolved, name)}: must be positive")
    if resolved.lr <= 0 or resolved.temperature <= 0 or not 0 <= resolved.warmup < 1 or resolved.grad_clip < 0:
        raise UserError("--lr and --temperature must be positive, --warmup in [0, 1), --grad-clip >= 0")
    if resolved.max_pairs is not None and resolved.max_pairs <= 0:
        raise UserError(f"--max-pairs {resolved.max_pairs}: must be positive")
    return resolved


# ---------------------------------------------------------------------------------------------
# Training pairs: ids -> store rows


@dataclass
class Pairs:
    """Training examples as store rows: query i, its relevant document, and an optional hard negative."""

    query_rows: np.ndarray
    doc_rows: np.ndarray
    neg_rows: np.ndarray | None
    origin: str

    def __len__(self) -> int:
        return len(self.query_rows)

    def subset(self, count: int, seed: int) -> "Pairs":
        """A seeded random subset of `count` pairs, kept in their original order."""
        if count >= len(self):
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self), count, replace=False))
        neg = None if self.neg_rows is None else self.neg_rows[keep]
        return Pairs(self.query_rows[keep], self.doc_rows[keep], neg, f"{self.origin} (subset of {count})")


def _rows(section, ids: list[str], what: str, origin: str) -> np.ndarray:
    row_of = section.row_of
    missing = [i for i in dict.fromkeys(ids) if i not in row_of]
    if missing:
        shown = ", ".join(repr(i) for i in missing[:5])
        raise UserError(
            f"{origin}: {len(missing)} {what} id(s) are not in the store {section.name} ({shown}{', ...' if len(missing) > 5 else ''}); "
            "the pairs and the store come from different datasets, or the store is out of date"
        )
    return np.fromiter((row_of[i] for i in ids), dtype=np.int64, count=len(ids))


def pairs_from_ids(store: Store, query_ids: list[str], doc_ids: list[str], neg_ids: list[str] | None, origin: str) -> Pairs:
    if not query_ids:
        raise UserError(f"{origin}: no training pairs")
    neg = None if neg_ids is None else _rows(store.corpus, neg_ids, "negative document", origin)
    return Pairs(_rows(store.queries, query_ids, "query", origin), _rows(store.corpus, doc_ids, "document", origin), neg, origin)


def qrels_pairs(store: Store, qrels_path: Path) -> Pairs:
    """(query, document) for every judgement with score > 0, in file order."""
    qrels = read_qrels(qrels_path)
    q_ids, d_ids = [], []
    for qid, docs in qrels.items():
        for did, score in docs.items():
            if score > 0:
                q_ids.append(qid)
                d_ids.append(did)
    return pairs_from_ids(store, q_ids, d_ids, None, str(qrels_path))


def read_pairs_file(path: Path) -> tuple[list[str], list[str], list[str] | None]:
    """query_id, doc_id and optional negative_id columns from a JSONL or Parquet file."""
    if not path.is_file():
        raise UserError(f"--pairs {path}: file not found")
    columns = ("query_id", "doc_id", "negative_id")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise UserError(f"{path}: not a readable Parquet file ({e})") from None
        for col in columns[:2]:
            if col not in table.column_names:
                raise UserError(f"{path}: no {col!r} column (have {', '.join(table.column_names)})")
        data = {c: [str(v) for v in table.column(c).to_pylist()] for c in columns if c in table.column_names}
        if any(v in ("None", "") for c in data for v in data[c]):
            raise UserError(f"{path}: empty or null ids; every row needs query_id and doc_id (and negative_id when present)")
        return data["query_id"], data["doc_id"], data.get("negative_id")
    rows = []
    for lineno, obj in iter_jsonl(path):
        for col in columns[:2]:
            if obj.get(col) in (None, ""):
                raise UserError(f"{path}: line {lineno}: missing {col!r}")
        rows.append((lineno, obj))
    if not rows:
        raise UserError(f"{path}: no pairs")
    has_neg = "negative_id" in rows[0][1]
    for lineno, obj in rows:
        if ("negative_id" in obj) != has_neg or (has_neg and obj["negative_id"] in (None, "")):
            raise UserError(f"{path}: line {lineno}: give negative_id on every line or on none")
    neg = [str(o["negative_id"]) for _, o in rows] if has_neg else None
    return [str(o["query_id"]) for _, o in rows], [str(o["doc_id"]) for _, o in rows], neg


def load_pairs(cfg: TrainConfig, store: Store) -> Pairs:
    if cfg.pairs:
        q, d, n = read_pairs_file(Path(cfg.pairs))
        pairs = pairs_from_ids(store, q, d, n, cfg.pairs)
    else:
        dataset = find_dataset(cfg.dataset or store.dataset_name, cfg.data_dir)
        pairs = qrels_pairs(store, dataset.qrels_path(cfg.train_split))
    return pairs.subset(cfg.max_pairs, cfg.seed) if cfg.max_pairs else pairs


# ---------------------------------------------------------------------------------------------
# Sources of embeddings and the loop


class EmbeddingSource(Protocol):
    """Where a batch's encoder vectors come from; rows are local indices (see `PairIndex`)."""

    def queries(self, rows: Tensor) -> Tensor: ...

    def documents(self, rows: Tensor) -> Tensor: ...


class CachedSource:
    """The cached vectors, on the device once; a batch is an index gather.

    Shape:
        queries: [Q, D], documents: [N, D] float32; rows [B] int64 -> [B, D]
    """

    def __init__(self, queries: Tensor, documents: Tensor):
        self._queries = queries
        self._documents = documents

    def queries(self, rows: Tensor) -> Tensor:
        return self._queries[rows]

    def documents(self, rows: Tensor) -> Tensor:
        return self._documents[rows]


@dataclass
class PairIndex:
    """The pairs in local indices on the device, plus what the in-batch positive mask needs.

    Local indices number only the rows the pairs touch: `query_rows[q]` / `doc_rows[d]` are the
    store rows of local query q / document d.
    """

    query_rows: np.ndarray  # store rows, in local order
    doc_rows: np.ndarray
    q: Tensor  # [P] local query index of each pair
    d: Tensor  # [P] local document index
    n: Tensor | None  # [P] local hard-negative index
    pair_keys: Tensor  # sorted q * len(doc_rows) + d of every pair: "is d a positive of q?"

    @classmethod
    def build(cls, pairs: Pairs, device: torch.device) -> "PairIndex":
        query_rows, q = np.unique(pairs.query_rows, return_inverse=True)
        docs = pairs.doc_rows if pairs.neg_rows is None else np.concatenate([pairs.doc_rows, pairs.neg_rows])
        doc_rows, local = np.unique(docs, return_inverse=True)
        d, n = local[: len(pairs)], (None if pairs.neg_rows is None else local[len(pairs):])
        keys = np.unique(q.astype(np.int64) * len(doc_rows) + d)
        as_tensor = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64), device=device)  # noqa: E731
        return cls(query_rows, doc_rows, as_tensor(q), as_tensor(d), None if n is None else as_tensor(n), as_tensor(keys))

    def __len__(self) -> int:
        return len(self.q)

    def positive_mask(self, queries: Tensor, candidates: Tensor) -> Tensor:
        """[B, C] bool: candidate j is a positive of query i (includes duplicates of i's own positive)."""
        keys = queries[:, None] * len(self.doc_rows) + candidates[None, :]
        found = torch.searchsorted(self.pair_keys, keys).clamp_max_(len(self.pair_keys) - 1)  # 4x faster than isin
        return self.pair_keys[found] == keys


def lr_lambda(total_steps: int, warmup: float) -> Callable[[int], float]:
    """Linear warm-up over `warmup` of the steps, then cosine decay to zero; stepped every batch."""
    warm = int(round(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(total_steps - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


@dataclass
class FitResult:
    history: list[dict]  # one record per step: step, epoch, loss, each weighted part, grad_norm, lr
    epoch_seconds: list[float]


class NonFiniteLoss(UserError):
    """Training produced NaN/inf; nothing was written."""


def fit(
    heads: Heads,
    criterion: JEPASIGRegLoss,
    source: EmbeddingSource,
    index: PairIndex,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    warmup: float = 0.0,
    grad_clip: float = 0.0,
    on_step: Callable[[dict], None] | None = None,
    log: Callable[[str], None] = print,
) -> "FitResult":
    """Train `heads` (and whatever else `optimizer` holds) on `index`'s pairs.

    Batches come from a CPU generator seeded with `seed` (the same on any device and for any
    source); SIGReg's directions are seeded by the global step. A NaN/inf loss or gradient
    raises `NonFiniteLoss` naming the step and the term.
    """
    device = index.q.device
    steps_per_epoch = math.ceil(len(index) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(epochs * steps_per_epoch, warmup))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    history: list[dict] = []
    epoch_seconds: list[float] = []
    step = 0
    heads.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(index), generator=gen).to(device)
        for start in range(0, len(index), batch_size):
            batch = order[start : start + batch_size]
            bq, bd = index.q[batch], index.d[batch]
            cand = bd if index.n is None else torch.cat([bd, index.n[batch]])
            e_q, e_c = source.queries(bq), source.documents(cand)
            z = heads(torch.cat([e_q, e_c]))
            z_q, z_d, z_n = z[: len(bq)], z[len(bq) : 2 * len(bq)], (None if index.n is None else z[2 * len(bq) :])
            predicted = heads.predictor(z_q) if heads.predictor is not None else None
            loss, parts = criterion(z_q, z_d, z_n, predicted, positive_mask=index.positive_mask(bq, cand), step=step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
            values = torch.stack([loss.detach(), grad_norm.to(loss.device), *parts.values()]).tolist()
            record = {"step": step, "epoch": epoch, "loss": values[0], **dict(zip(parts, values[2:])),
                      "grad_norm": values[1], "lr": scheduler.get_last_lr()[0]}
            if not all(math.isfinite(v) for v in values):
                bad = first_nonfinite(parts) or ("loss" if not math.isfinite(values[0]) else "grad_norm")
                raise NonFiniteLoss(
                    f"step {step} (epoch {epoch}): {bad} became {record[bad]}; training stopped and no heads were written "
                    "(try a lower --lr, or check the store with `jepa-cache verify`)"
                )
            optimizer.step()
            scheduler.step()
            history.append(record)
            if on_step:
                on_step(record)
            step += 1
        epoch_seconds.append(time.perf_counter() - t0)
        log(f"epoch {epoch + 1}/{epochs}: {steps_per_epoch} steps, {epoch_seconds[-1]:.2f} s "
            f"({len(index) / max(epoch_seconds[-1], 1e-9):,.0f} pairs/s); {format_parts(mean_parts(history[-steps_per_epoch:]))}")
    return FitResult(history, epoch_seconds)


def mean_parts(records: list[dict]) -> dict[str, float]:
    keys = ("loss", *PART_NAMES)
    return {k: float(np.mean([r[k] for r in records])) for k in keys} if records else {}


def format_parts(parts: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in parts.items())


# ---------------------------------------------------------------------------------------------
# Stage 2


@dataclass
class TrainResult:
    out: Path
    heads: Heads
    config: TrainConfig  # resolved: every value the run used
    history: list[dict]
    epoch_seconds: list[float]
    seconds: float


def default_out(cfg: TrainConfig, dataset: str) -> Path:
    return DEFAULT_HEADS_DIR / dataset / f"{cfg.preset}-{cfg.strategy}-s{cfg.seed}"


def build_heads(cfg: TrainConfig, input_dim: int, init_vectors: Tensor | None) -> Heads:
    heads_cfg = HeadsConfig(input_dim=input_dim, **{k: getattr(cfg, k) for k in HEADS_FIELDS})
    return Heads(heads_cfg, init_vectors if heads_cfg.init != "random" else None)


def build_criterion(cfg: TrainConfig) -> JEPASIGRegLoss:
    return JEPASIGRegLoss(
        cfg.lambda_predictive, cfg.lambda_contrastive, cfg.lambda_isotropy, cfg.lambda_reg, cfg.use_stopgrad,
        contrastive=cfg.contrastive, isotropy=cfg.isotropy, predictive=cfg.predictive, temperature=cfg.temperature,
        margin=cfg.margin, num_directions=cfg.directions, seed=cfg.seed,
    )


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Train heads on a store (or, with `cfg.live`, through the frozen encoder) and save them."""
    cfg = resolve_config(cfg)
    store = open_store(cfg.store)
    pairs = load_pairs(cfg, store)
    out = Path(cfg.out) if cfg.out else default_out(cfg, store.dataset_name)
    if (out / META_FILE).exists() and not cfg.overwrite:
        raise UserError(f"{out}: already holds heads; choose another --out or pass --overwrite")
    device = pick_device(cfg.device)
    with exclusive_lock(out, "train-heads"):
        index = PairIndex.build(pairs, device)
        log(f"{store.describe()}\ntraining pairs: {len(pairs):,} from {pairs.origin} "
            f"({len(index.query_rows):,} queries, {len(index.doc_rows):,} documents"
            f"{', with hard negatives' if pairs.neg_rows is not None else ''}); device {device}")
        doc_vectors = torch.from_numpy(store.corpus.vectors(np.float32, index.doc_rows))
        if cfg.live:  # the encoder is loaded before seeding, so loading it cannot shift the seeded streams
            from .live import frozen_live_source

            source: EmbeddingSource = frozen_live_source(cfg, store, index, device, log)
        else:
            query_vectors = torch.from_numpy(store.queries.vectors(np.float32, index.query_rows))
            source = CachedSource(query_vectors.to(device), doc_vectors.to(device))
        torch.manual_seed(cfg.seed)  # heads init and dropout masks
        heads = build_heads(cfg, store.dim, doc_vectors).to(device)
        criterion = build_criterion(cfg)
        optimizer = torch.optim.AdamW([p for p in heads.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
        log(describe(heads))
        log(f"loss: {cfg.contrastive} λ={cfg.lambda_contrastive}, {cfg.isotropy} λ={cfg.lambda_isotropy}, "
            f"{cfg.predictive} predictive λ={cfg.lambda_predictive} (stop-grad {cfg.use_stopgrad}), reg λ={cfg.lambda_reg}; "
            f"{cfg.epochs} epoch(s) × {math.ceil(len(index) / cfg.batch_size)} steps of {cfg.batch_size}"
            f"{'; LIVE: encoding every batch through the frozen encoder' if cfg.live else ''}")

        out.mkdir(parents=True, exist_ok=True)
        partial = out / f".{STEPS_FILE}.partial"
        t0 = time.perf_counter()
        with open(partial, "w", encoding="utf-8") as steps_file:
            write_step = lambda r: steps_file.write(json.dumps(r) + "\n")  # noqa: E731
            try:
                result = fit(heads, criterion, source, index, optimizer, epochs=cfg.epochs, batch_size=cfg.batch_size,
                              seed=cfg.seed, warmup=cfg.warmup, grad_clip=cfg.grad_clip, on_step=write_step, log=log)
            except NonFiniteLoss as e:
                steps_file.close()
                failed = out / "steps.failed.jsonl"
                partial.replace(failed)
                raise NonFiniteLoss(f"{e} (steps so far: {failed})") from None
        seconds = time.perf_counter() - t0
        final = mean_parts(result.history[-math.ceil(len(index) / cfg.batch_size):])
        training = {
            "strategy": cfg.strategy, "preset": cfg.preset, "pairs": len(pairs), "pairs_from": pairs.origin,
            "steps": len(result.history), "seconds": round(seconds, 3), "epoch_seconds": [round(t, 3) for t in result.epoch_seconds],
            "live": cfg.live, "device": str(device), "final_epoch_mean": final, "finished": now_iso(),
        }
        save_heads(heads, out, {"store": store_record(store), "training": training})
        atomic_write_json(out / CONFIG_FILE, cfg)
        partial.replace(out / STEPS_FILE)
        log(f"trained in {seconds:.1f} s; last epoch mean: {format_parts(final)}\nheads: {out}")
        return TrainResult(out, heads.eval(), cfg, result.history, result.epoch_seconds, seconds)


def store_record(store: Store) -> dict:
    """What heads.json records of the store: eval refuses a store of another encoder."""
    return {
        "path": str(store.path),
        "fingerprint": store.fingerprint,
        "encoder_fingerprint": store.encoder_fingerprint,
        "encoder": store.provenance["encoder"].get("name"),
        "dataset": store.dataset_name,
        "imported": store.imported,
    }
