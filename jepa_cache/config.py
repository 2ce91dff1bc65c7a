"""Typed configs for each stage; each is dumped as JSON beside the output it produced."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TypeVar

from .models import DEFAULT_MODEL
from .presets import DEFAULT_PRESET

# Shard = write/resume unit. 1024 rows is ~10 minutes of mpnet on a 2-core CPU (the most a kill
# can cost) and 1.5 MB of float16 at 768-d, so an 8.8M-row corpus is ~8.6k files, not millions.
DEFAULT_SHARD_ROWS = 1024
# Chunk = read unit: 128 rows x 768 x 2 bytes = 192 KiB, a good size for a local or object-store read,
# and small enough that reading a slice of rows wastes little.
DEFAULT_CHUNK_ROWS = 128


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
    backend: str = "auto"  # torch | openvino | onnx | auto (PyTorch on CUDA; OpenVINO on CPU when installed)
    precision: str = "auto"  # auto (bf16/fp16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 (CPU: OpenVINO, AMX)
    query_prompt: str | None = None  # prepended to each query; None: the model's own (encode_query's)
    document_prompt: str | None = None  # prepended to each document; None: the model's own (encode_document's)
    shard_rows: int = DEFAULT_SHARD_ROWS
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    overwrite: bool = False


@dataclass
class ImportConfig:
    """Turn precomputed vectors (.npy or Parquet) into a store that train and eval use like a built one."""

    dataset: str
    corpus: str
    queries: str
    corpus_ids: str | None = None  # text file, one id per line; default: the Parquet id column
    query_ids: str | None = None
    model: str = DEFAULT_MODEL  # the encoder the user declares made the vectors
    out: str | None = None  # default: data/cache/<dataset>/<model folder name>
    data_dir: str | None = None
    dtype: str = "float16"
    id_column: str | None = None  # Parquet: default "id", else "_id"
    vector_column: str | None = None  # Parquet: default the one list-typed column
    normalize: bool = True  # L2-normalise rows that are not unit length (warned and recorded)
    shard_rows: int = DEFAULT_SHARD_ROWS
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    overwrite: bool = False


@dataclass
class EvalConfig:
    """Stage 3: store (+ heads) -> index -> top-k -> pytrec_eval, for one or more datasets."""

    datasets: list[str]
    split: str = "test"
    store: str | None = None  # only with one dataset; default: data/cache/<dataset>/<model folder name>
    model: str = DEFAULT_MODEL  # picks the default store path
    data_dir: str | None = None
    heads: str | None = None
    corrections: str | None = None  # per-document corrections folder; default: the heads' folder when it holds some
    query_tower: str | None = None  # vanilla | projection | predictor; default: vanilla, or predictor with heads
    similarity: str | None = None  # cos | l2; default: cos, or the heads' own
    index: str = "faiss"  # faiss | torch (exact, blockwise matmul)
    faiss_index: str = "Flat"  # a faiss factory string: Flat, HNSW32, IVF1024,Flat, ...
    faiss_params: str | None = None  # e.g. "nprobe=32" or "efSearch=128"
    k: int = 100
    strict: bool = False  # qrels naming absent documents, or judged queries without a vector, are errors
    out: str | None = None  # default: runs/eval/<datasets>-<split>-<variant>
    block_rows: int | None = None  # corpus rows searched at a time; default: what fits in ~2 GiB
    device: str = "auto"  # for --index torch and the heads


@dataclass
class TrainConfig:
    """Stage 2: train retrieval heads on a store's cached vectors; the flat settings of the CLI and recipes.

    Fields left None take their value from `preset` (see `PRESETS`); `resolve.resolve_config` fills
    and checks them, and `group` hands each stage its part (`LossConfig`, `OptimConfig`,
    `DataConfig`, `SelectConfig`; the heads' part becomes a `heads.HeadsConfig`). The
    `config.json` written beside the heads holds every value resolved, so a run can be repeated.
    """

    store: str
    out: str | None = None  # default: runs/heads/<dataset>/<preset>-<strategy>-s<seed>
    dataset: str | None = None  # where the qrels are (name or folder); default: the store's dataset
    data_dir: str | None = None
    train_split: str = "train"
    pairs: str | None = None  # a pairs/triples file of ids (JSONL or Parquet) instead of qrels
    max_pairs: int | None = None  # a seeded subset of the pairs (quick runs, the live benchmark)
    allow_test_training: bool = False  # train on the scored split (`test`) on purpose
    strategy: str | None = None  # frozen-predictor | frozen-isotropy (projection only); default: the preset's
    preset: str = DEFAULT_PRESET
    # heads (heads.HeadsConfig)
    output_dim: int | None = None
    projection: str | None = None
    projection_hidden: int | None = None
    predictor: str | None = None
    predictor_hidden: int | None = None
    dropout: float | None = None
    init: str | None = None
    similarity: str | None = None
    query_tower: str | None = None
    rank: int | None = None  # projection adapter: rank of its W (0: full)
    # loss (LossConfig)
    contrastive: str | None = None
    isotropy: str | None = None
    predictive: str | None = None
    temperature: float | None = None
    margin: float | None = None
    lambda_predictive: float | None = None
    lambda_contrastive: float | None = None
    lambda_isotropy: float | None = None
    lambda_reg: float | None = None
    use_stopgrad: bool | None = None
    directions: int | None = None
    # optimisation (OptimConfig)
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup: float | None = None
    grad_clip: float | None = None
    schedule: str | None = None
    # what a step sees (DataConfig)
    sampling: str | None = None
    negatives: str | None = None
    corpus_negatives: int | None = None
    mine_k: int | None = None
    # choosing the epoch on held-out training queries (SelectConfig)
    dev_fraction: float | None = None
    select: str | None = None
    refit: bool | None = None
    interpolate: float | None = None
    # per-document corrections of the training corpus, chosen on the dev slice (adapt.py)
    adapt: str | None = None  # none | nudge-n
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False

    def group(self, kind: type[G]) -> G:
        """One group of the (resolved) settings, e.g. `cfg.group(LossConfig)`."""
        return kind(**{f.name: getattr(self, f.name) for f in fields(kind)})


@dataclass(frozen=True)
class LossConfig:
    """The training loss: a contrastive term, an isotropy term and the JEPA predictive term, weighted."""

    contrastive: str  # infonce | triplet
    isotropy: str  # sigreg | covariance
    predictive: str  # cosine | mse
    temperature: float  # InfoNCE
    margin: float  # triplet
    lambda_predictive: float
    lambda_contrastive: float
    lambda_isotropy: float
    lambda_reg: float  # the variance term
    use_stopgrad: bool  # no gradient through the predictive target
    directions: int  # SIGReg's random directions per step


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (stepped every batch)."""

    epochs: int  # passes over the pairs or the queries (DataConfig.sampling)
    batch_size: int
    lr: float
    weight_decay: float
    warmup: float  # fraction of the steps with a linear warm-up
    grad_clip: float  # max gradient norm; 0 = no clipping
    schedule: str  # cosine (decay to 0 after the warm-up) | constant


@dataclass(frozen=True)
class DataConfig:
    """What a step sees: how an epoch is drawn and which documents are its negatives."""

    sampling: str  # pairs (an epoch = every pair) | queries (an epoch = every query, one positive drawn)
    negatives: str  # batch | corpus (also every cached document) | mined (also a FAISS-mined hard negative)
    corpus_negatives: int  # negatives=corpus: documents drawn per step; 0 = the whole corpus
    mine_k: int  # negatives=mined: nearest non-positive documents kept per query


@dataclass(frozen=True)
class SelectConfig:
    """Choosing what to keep: the epoch with the best NDCG@10 on held-out training queries, a refit, WiSE-FT."""

    dev_fraction: float  # seeded slice of the training queries held out as dev; 0 = none
    select: str  # last | dev (keep the epoch, 0 = the initial heads, with the best dev NDCG@10)
    refit: bool  # with select=dev: retrain on all training queries for the chosen epochs
    interpolate: float  # final heads = initial + interpolate * (trained - initial); 1 = as trained


G = TypeVar("G", LossConfig, OptimConfig, DataConfig, SelectConfig)


@dataclass
class LiveConfig:
    """Training through the encoder (`train-live`): the heads as `train` says, plus what the encoder does.

    `train` is a stage-2 config (store, pairs, preset, heads, loss, epochs, batch, `lr`, seed, device,
    out); its `lr` is the heads' rate while the encoder is frozen (frozen-live, hybrid phase 1).
    Fields left None are resolved by `live.resolve_live` and recorded resolved in live.json.
    """

    train: TrainConfig
    strategy: str = "full"  # full | hybrid | frozen-live
    model: str | None = None  # the encoder to start from; default: the one recorded in the store (must match it)
    encode_batch_size: int = 32  # frozen-live: texts per forward pass
    encoder_lr: float = 2e-5  # full: the encoder's AdamW rate
    head_lr: float | None = None  # heads while the encoder trains; default 1e-3 (full, the study's), train.lr (hybrid)
    phase2_encoder_lr: float = 1e-6  # hybrid phase 2: the unfrozen encoder's rate
    phase2_epochs: int | None = None  # default: train.epochs
    threshold: float | None = None  # hybrid: phase 2 only if phase-1 validation NDCG@10 >= this; default: > vanilla's
    val_split: str = "dev"  # hybrid validation qrels; without that split, a seeded slice of training queries
    val_fraction: float = 0.1
    val_seed: int = 0
    encoder_dropout: bool = True  # a training encoder in train mode (dropout); False: eval mode, deterministic
    gradient_checkpointing: bool = False

    @classmethod
    def from_flat(cls, values: dict) -> LiveConfig:
        """From one flat set of settings (train-live's options, a recipe row): LiveConfig's own fields here
        (`strategy` included), every other one to `train`."""
        own = {f.name for f in fields(cls)} - {"train"}
        return cls(train=TrainConfig(**{k: v for k, v in values.items() if k not in own}),
                   **{k: v for k, v in values.items() if k in own})
