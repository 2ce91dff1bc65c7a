"""The stage commands' options (build, import, eval, train-heads, train-live), one per config field.

A flag is its field's name with dashes (a few keep an older spelling: `decls`) and has its field's
type, so each setting has one spelling in the configs, the command line and the recipes; where the
preset gives the default, --help shows each preset's value, and train's many options come in panels.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable

import typer

from .models import DEFAULT_MODEL
from .presets import LIVE_PRESET, by_preset

HEADS, LOSS, OPTIM, DATA, SELECT, RUN = (
    "Heads", "Loss", "Optimisation", "What a step sees", "Selection on dev", "Input and output"
)


FIELD = object()  # a Flag's default: the one its config field declares


@dataclass(frozen=True)
class Flag:
    """One option: the config field it sets, its help and panel, and its default (the field's own unless given)."""

    field: str
    help: str
    panel: str
    default: Any = FIELD  # `...`: required; FIELD: the config field's own default
    decls: tuple[str, ...] = ()  # default: --<field with dashes>
    preset: bool = False  # the default comes from the preset: --help lists it per preset

    def option(self, defaults: dict[str, Any]) -> Any:
        text = f"{self.help} {by_preset(self.field)}" if self.preset else self.help
        decls = self.decls or (f"--{self.field.replace('_', '-')}",)
        default = defaults[self.field] if self.default is FIELD else self.default
        return typer.Option(default, *decls, help=text, rich_help_panel=self.panel)


def _preset(field: str, text: str, panel: str, *decls: str) -> Flag:
    return Flag(field, text, panel, decls=decls, preset=True)


DATA_DIR_HELP = "Folder holding BEIR datasets (default: $JEPA_CACHE_DATA, then data/beir/)."
_DEVICE = "auto (CUDA when present), cpu, cuda or cuda:N."
_SEED = "Seeds the heads' init, the shuffle, dropout and SIGReg's directions."
_STORE_OUT = "Store folder (default data/cache/<dataset>/<model>)."
_ALL = "Options"  # typer's own panel: the commands with few options have one

BUILD = (
    Flag("dataset", "BEIR dataset name (looked up under --data-dir) or folder.", _ALL, ...),
    Flag("model", "Hub id (found in data/models/ or the Hugging Face cache, else fetched) or a local "
         "sentence-transformers folder.",
         _ALL, DEFAULT_MODEL),
    Flag("out", _STORE_OUT, _ALL),
    Flag("data_dir", DATA_DIR_HELP, _ALL),
    Flag("dtype", "Stored precision: float16 (half the disk) or float32.", _ALL),
    Flag("batch_size", "Texts per forward pass.", _ALL),
    Flag("device", _DEVICE, _ALL),
    Flag("backend", "Encoder runtime: torch, openvino or onnx (CPU; converted once, cached beside the model), auto "
         "(OpenVINO on CPU when installed, else PyTorch).", _ALL),
    Flag("precision", "What the encoder computes in: auto (fp32 on the CPU, exactly SentenceTransformer.encode; "
         "bf16 autocast on CUDA, fp16 where the GPU has no bf16), fp32, or bf16 (on the CPU through OpenVINO "
         "with AMX / AVX-512 BF16: ~4× faster, min cosine to fp32 0.9989 over three BEIR corpora; "
         "README: Faster builds).", _ALL),
    Flag("query_prompt", "Text put before each query (default: the model's query prompt, as encode_query; \"\" for "
         "none).", _ALL),
    Flag("document_prompt", "Text put before each document (default: the model's document prompt, as "
         "encode_document; \"\" for none).", _ALL),
    Flag("shard_rows", "Rows per shard: the unit of writing and of resume.", _ALL),
    Flag("chunk_rows", "Rows per chunk: the unit of reading.", _ALL),
    Flag("overwrite", "Replace a store at --out that was made differently.", _ALL),
)

IMPORT = (
    Flag("dataset", "BEIR dataset the vectors belong to (ids are checked against it).", _ALL, ...),
    Flag("corpus", "Document vectors: .npy (float32/float16) or .parquet (id + list column).", _ALL, ...),
    Flag("queries", "Query vectors: .npy or .parquet.", _ALL, ...),
    Flag("corpus_ids", "Document ids, one per line, in row order (default: the Parquet id column).", _ALL),
    Flag("query_ids", "Query ids, one per line, in row order (default: the Parquet id column).", _ALL),
    Flag("model", "The encoder that made the vectors; its weights are fingerprinted when found locally.", _ALL,
         DEFAULT_MODEL),
    Flag("out", _STORE_OUT, _ALL),
    Flag("data_dir", DATA_DIR_HELP, _ALL),
    Flag("dtype", "Stored precision: float16 or float32.", _ALL),
    Flag("id_column", "Parquet id column (default: id, else _id).", _ALL),
    Flag("vector_column", "Parquet vector column (default: the one list column).", _ALL),
    Flag("normalize", "L2-normalise rows that are not unit length (warned); --no-normalize stores them as given "
         "(an error if the declared encoder normalises).", _ALL, decls=("--normalize/--no-normalize",)),
    Flag("overwrite", "Replace a store at --out made from other vectors.", _ALL),
)

EVAL = (
    Flag("datasets", "Dataset(s) to score; repeat or comma-separate for one table.", _ALL, ..., ("--dataset",)),
    Flag("split", "qrels split to score.", _ALL),
    Flag("store", "Store folder or fsspec URL, e.g. s3://bucket/store (one dataset only; default "
         "data/cache/<dataset>/<model>).", _ALL),
    Flag("model", "Encoder whose default store to use.", _ALL),
    Flag("data_dir", DATA_DIR_HELP, _ALL),
    Flag("heads", "Trained heads; without them the base vectors are scored (vanilla).", _ALL),
    Flag("corrections", "Per-document corrections folder (default: the heads' folder when it holds some); applied "
         "only to the store they were made for.", _ALL),
    Flag("query_tower", "vanilla | projection | predictor (default: vanilla, or the heads' own tower with --heads).",
         _ALL),
    Flag("similarity", "cos | l2 (default: cos, or the heads' own).", _ALL),
    Flag("index", "faiss, or torch (exact matmul, a cross-check).", _ALL),
    Flag("faiss_index", "FAISS factory string: Flat (exact), HNSW32, IVF1024,Flat, ...", _ALL),
    Flag("faiss_params", "Search parameters of an approximate index, e.g. nprobe=32.", _ALL),
    Flag("k", "Hits per query (Recall@min(k,100)).", _ALL),
    Flag("strict", "Fail when qrels name absent documents or judged queries lack a vector.", _ALL),
    Flag("out", "Output folder (default runs/eval/<datasets>-<split>-<variant>-...).", _ALL),
    Flag("block_rows", "Corpus rows searched at a time (default: what fits in 2 GiB).", _ALL),
    Flag("device", "Device for --index torch: auto, cpu, cuda or cuda:N.", _ALL),
)

TRAIN_HEADS = (
    Flag("store", "Store folder (from build or import) holding the dataset's vectors, or an fsspec URL to read it "
         "from (s3://, gs://, https://, ...).", RUN, ...),
    Flag("out", "Heads folder (default runs/heads/<dataset>/<preset>-<strategy>-s<seed>).", RUN),
    Flag("dataset", "Dataset for the qrels (name or folder; default: the store's).", RUN),
    Flag("data_dir", DATA_DIR_HELP, RUN),
    Flag("train_split", "qrels split whose (query, document) pairs with score > 0 are trained on.", RUN),
    Flag("pairs", "Pairs/triples of ids instead of qrels: JSONL or Parquet with query_id, doc_id[, negative_id].",
         RUN),
    Flag("max_pairs", "Train on a seeded random subset of this many pairs.", RUN),
    Flag("allow_test_training", "Allow --train-split test, the split eval scores (results would then be measured "
         "on training queries).", RUN),
    Flag("preset", "best (the recipe that beats vanilla: pipelines/ABLATION.md), jepa (PCA 768→512 + predictor, "
         "in-batch) or study (the study's heads and loss). Options below override it.", RUN),
    Flag("seed", _SEED, RUN),
    Flag("device", _DEVICE, RUN),
    Flag("overwrite", "Replace heads already in --out.", RUN),
    _preset("strategy", "frozen-isotropy (projection only) or frozen-predictor (projection + JEPA predictor and its "
            "predictive term).", HEADS),
    _preset("output_dim", "Width of the heads' output, 0 for the encoder's.", HEADS),
    _preset("projection", "linear | residual | mlp | adapter (x + Wx, starts at the identity).", HEADS),
    _preset("predictor", "With --strategy frozen-predictor: residual | mlp | none.", HEADS),
    _preset("init", "Projection init: pca | orthogonal | identity | random.", HEADS),
    _preset("dropout", "Dropout inside the MLPs.", HEADS),
    _preset("similarity", "Retrieval similarity recorded in the heads: cos | l2.", HEADS),
    _preset("query_tower", "Tower that encodes queries at retrieval: projection | predictor.", HEADS),
    _preset("rank", "--projection adapter: rank of its W, 0 for a full matrix.", HEADS),
    _preset("contrastive", "infonce | triplet.", LOSS),
    _preset("isotropy", "sigreg | covariance.", LOSS),
    _preset("predictive", "Predictive distance: cosine | mse.", LOSS),
    _preset("temperature", "InfoNCE temperature.", LOSS),
    _preset("margin", "Triplet margin.", LOSS),
    _preset("lambda_predictive", "Weight of the predictive term.", LOSS),
    _preset("lambda_contrastive", "Weight of the contrastive term.", LOSS),
    _preset("lambda_isotropy", "Weight of the isotropy term.", LOSS),
    _preset("lambda_reg", "Weight of the variance term.", LOSS),
    _preset("use_stopgrad", "Stop the gradient through the predictive target.", LOSS, "--stopgrad/--no-stopgrad"),
    _preset("directions", "SIGReg random directions per step.", LOSS),
    _preset("epochs", "Epochs: passes over the pairs or the queries (--sampling); with --select dev, the most "
            "tried.", OPTIM),
    _preset("batch_size", "Pairs per step, the in-batch negatives.", OPTIM),
    _preset("lr", "AdamW learning rate of the heads.", OPTIM),
    _preset("weight_decay", "AdamW weight decay.", OPTIM),
    _preset("warmup", "Fraction of steps of linear warm-up before the --schedule.", OPTIM),
    _preset("grad_clip", "Max gradient norm, 0 for none.", OPTIM),
    _preset("schedule", "Learning rate after the warm-up: cosine | constant.", OPTIM),
    _preset("sampling", "An epoch is every pair (pairs) or every query with one positive drawn (queries).", DATA),
    _preset("negatives", "batch | corpus (every cached document too) | mined (a FAISS-mined hard negative too).",
            DATA),
    _preset("corpus_negatives", "--negatives corpus: documents drawn per step, 0 for the whole corpus.", DATA),
    _preset("mine_k", "--negatives mined: nearest non-positive documents kept per query.", DATA),
    _preset("dev_fraction", "Seeded fraction of the training queries held out and scored every epoch.", SELECT),
    _preset("select", "Keep the last epoch, or the one with the best dev NDCG@10 (dev; epoch 0 = the initial "
            "heads).", SELECT),
    _preset("refit", "After --select dev, retrain on all training queries for the chosen epochs.", SELECT,
            "--refit/--no-refit"),
    _preset("interpolate", "Final heads = initial + this × (trained − initial), WiSE-FT; 1 keeps them as trained.",
            SELECT),
    _preset("adapt", "Per-document corrections of the training corpus, saved beside the heads and applied by eval "
            "to this store only: nudge-n (its step chosen on the dev slice) or none.", SELECT),
)

TRAIN_LIVE = (
    Flag("strategy", "full (encoder fine-tuned with the heads), hybrid (heads on the cache, then the encoder "
         "unfrozen if validation allows) or frozen-live (the frozen encoder run every step: the loop the cache "
         "replaces).", RUN, ...),
    Flag("store", "Store of the training dataset, made by the encoder to start from (pairs, PCA init, phase 1).",
         RUN, ...),
    Flag("dataset", "Dataset for the texts and qrels (name or folder; default: the store's).", RUN),
    Flag("data_dir", DATA_DIR_HELP, RUN),
    Flag("model", "The encoder to start from (default: the one recorded in the store; must match it).", RUN),
    Flag("out", "Output folder (default runs/live/<dataset>/<strategy>-<preset>-s<seed>).", RUN),
    Flag("train_split", "qrels split whose pairs are trained on.", RUN),
    Flag("pairs", "Pairs/triples of ids instead of qrels (JSONL or Parquet).", RUN),
    Flag("max_pairs", "Train on a seeded random subset of this many pairs (quick CPU runs).", RUN),
    Flag("allow_test_training", "Allow --train-split test, the split eval scores.", RUN),
    Flag("preset", "Heads and loss preset, as train-heads: jepa or study; hybrid also takes best (its phase 1 is "
         "cached).", HEADS, LIVE_PRESET),
    _preset("output_dim", "Width of the heads' output, 0 for the encoder's.", HEADS),
    _preset("epochs", "Passes over the pairs (full; hybrid phase 1).", OPTIM),
    _preset("batch_size", "Pairs per step.", OPTIM),
    _preset("lr", "Heads' rate with the encoder frozen (frozen-live, hybrid phase 1).", OPTIM),
    Flag("encoder_lr", "full: the encoder's AdamW rate.", OPTIM),
    Flag("head_lr", "Heads' rate while the encoder trains (full: 1e-3, the study's; hybrid phase 2: --lr).", OPTIM),
    Flag("phase2_encoder_lr", "hybrid: the unfrozen encoder's rate in phase 2.", OPTIM),
    Flag("phase2_epochs", "hybrid: passes in phase 2 (default: --epochs).", OPTIM),
    Flag("threshold", "hybrid: phase 2 only if phase-1 validation NDCG@10 >= this (default: only if it beats the "
         "vanilla encoder's on the same queries).", SELECT),
    Flag("val_split", "hybrid: qrels split to validate on; without it, --val-fraction of the training queries is "
         "held out.", SELECT),
    Flag("val_fraction", "hybrid: share of training queries held out (seeded by --val-seed) when there is no "
         "--val-split.", SELECT),
    Flag("val_seed", "hybrid: seed of the held-out slice (fixed across training seeds).", SELECT),
    Flag("encoder_dropout", "--no-dropout: run the training encoder in eval mode (no dropout; deterministic).", RUN,
         True, ("--encoder-dropout/--no-dropout",)),
    Flag("gradient_checkpointing", "Recompute encoder activations in backward (less memory, more compute).", RUN),
    Flag("seed", _SEED, RUN),
    Flag("device", _DEVICE, RUN),
    Flag("overwrite", "Replace a result already in --out.", RUN),
)

def command(flags: tuple[Flag, ...], run: Callable[[dict[str, Any]], None], *configs: type) -> Callable[..., None]:
    """A typer command taking `flags`, typed and defaulted as the fields of `configs` (the last wins), that hands
    their values to `run`; typer reads a command's parameters from its signature, built here from the table."""
    types = {k: v for config in configs for k, v in typing.get_type_hints(config).items()}
    defaults = {f.name: f.default for config in configs for f in fields(config) if f.default is not MISSING}

    def cmd(**values: Any) -> None:
        run(values)

    cmd.__name__, cmd.__doc__ = run.__name__, run.__doc__
    cmd.__annotations__ = {f.field: types[f.field] for f in flags}
    cmd.__signature__ = inspect.Signature([
        inspect.Parameter(f.field, inspect.Parameter.KEYWORD_ONLY, default=f.option(defaults),
                          annotation=types[f.field])
        for f in flags
    ])
    return cmd
