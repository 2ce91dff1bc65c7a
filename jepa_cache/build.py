"""Stage 1: dataset -> frozen encoder -> store. Resumable shard by shard."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from .config import BuildConfig
from .datasets import CORPUS_TEMPLATE, QUERY_TEMPLATE, find_dataset, read_corpus, read_queries
from .errors import UserError
from .files import atomic_write_json, exclusive_lock
from .models import canonical_name, resolve_model, weights_sha256
from .store import SECTIONS, Store, StoreWriter, open_store

DEFAULT_CACHE_DIR = Path("data/cache")


def default_store_path(dataset: str, model_folder: Path) -> Path:
    return DEFAULT_CACHE_DIR / dataset / model_folder.name


def build(cfg: BuildConfig, log: Callable[[str], None] = print) -> Store:
    """Encode every document and query of `cfg.dataset` into a store; only missing shards are encoded."""
    if cfg.batch_size <= 0:
        raise UserError(f"--batch-size {cfg.batch_size}: must be a positive integer")
    dataset = find_dataset(cfg.dataset, cfg.data_dir)
    doc_ids, doc_texts = read_corpus(dataset.corpus_path)
    query_ids, query_texts = read_queries(dataset.queries_path)
    folder = resolve_model(cfg.model)
    out = Path(cfg.out) if cfg.out else default_store_path(dataset.name, folder)
    texts = {"corpus": doc_texts, "queries": query_texts}

    sha = weights_sha256(folder)
    with exclusive_lock(out, "build"):
        # The encoder's settings come from its folder; reading them needs the model, but a
        # complete store with matching weights is answered before paying for a load.
        if (out / "zarr.json").is_file() and not cfg.overwrite:
            existing = open_store(out, require_complete=False)
            if existing.complete and existing.provenance["encoder"].get("weights_sha256") == sha and \
                    existing.provenance["dataset"]["files"] == dataset.file_hashes() and existing.provenance["dtype"] == cfg.dtype:
                log(f"{out}: already complete ({existing.corpus.rows} docs, {existing.queries.rows} queries); nothing to do")
                return existing

        from .encoder import embedding_dim, encoder_info, load_encoder, pick_device

        device = pick_device(cfg.device)
        model = load_encoder(folder, device)
        provenance_dim = embedding_dim(model)
        provenance = {
            "source": "built",
            "encoder": encoder_info(model, folder, canonical_name(cfg.model) if not Path(cfg.model).exists() else str(cfg.model), sha),
            "dataset": {"name": dataset.name, "files": dataset.file_hashes()},
            "template": {"corpus": CORPUS_TEMPLATE, "queries": QUERY_TEMPLATE},
            "dim": provenance_dim,
            "dtype": cfg.dtype,
            "layout": {"shard_rows": cfg.shard_rows, "chunk_rows": cfg.chunk_rows},
        }
        writer = StoreWriter.open_or_create(out, provenance, {"corpus": doc_ids, "queries": query_ids}, overwrite=cfg.overwrite)
        atomic_write_json(out / "build_config.json", cfg)
        todo = {s: writer.missing_shards(s) for s in SECTIONS}
        rows_todo = sum(stop - start for s in SECTIONS for _, start, stop in todo[s])
        resumed = sum(len(writer.shard_ranges(s)) - len(todo[s]) for s in SECTIONS)
        if resumed:
            log(f"{out}: resuming; {resumed} shard(s) already done")

        from tqdm.auto import tqdm

        from .encoder import encode

        t0 = time.perf_counter()
        with tqdm(total=rows_todo, unit="rows", desc=f"build {dataset.name}", dynamic_ncols=True) as bar:
            for section in SECTIONS:
                for index, start, stop in todo[section]:
                    bar.set_postfix_str(f"{section} shard {index}")
                    vectors = encode(model, texts[section][start:stop], cfg.batch_size, on_batch=bar.update)
                    writer.write_shard(section, index, vectors)
        store = writer.finalize()
        seconds = time.perf_counter() - t0
        rate = rows_todo / seconds if seconds > 0 else float("nan")
        log(
            f"{out}: {store.corpus.rows} docs + {store.queries.rows} queries; encoded {rows_todo} rows "
            f"in {seconds:.1f} s ({rate:.1f} rows/s) on {device}"
        )
        return store
