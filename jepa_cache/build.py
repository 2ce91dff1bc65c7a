"""Stage 1: dataset -> frozen encoder -> store. Resumable shard by shard.

Everything that can be refused is checked before anything is written: options, every line of the
dataset (ids read in one pass), the model folder (loaded), and an existing store's provenance.
Texts are then streamed a shard at a time, so memory does not grow with the corpus beyond its ids.
"""

from __future__ import annotations

import time
from itertools import islice
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from .backends import (
    PRECISION_DTYPES, PRECISIONS, cached_conversion, load_runtime, resolve_backend, resolve_precision, runtime_info,
)
from .config import BuildConfig
from .datasets import (
    CORPUS_TEMPLATE,
    QUERY_TEMPLATE,
    BeirDataset,
    corpus_text,
    find_dataset,
    iter_records,
    query_text,
    read_ids,
)
from .distributed import (
    barrier,
    broadcast,
    gather_to_main,
    main_lock,
    on_main,
    rank_device,
    world,
)
from .encoder import embedding_dim, encode, encoder_info, load_encoder, pick_device
from .errors import UserError
from .files import atomic_write_json, check_writable
from .models import canonical_name, default_prompts, resolve_model, weights_sha256
from .store import DTYPES, SECTIONS, Store, default_store_path, open_store
from .store_writer import StoreWriter

TEXT_OF = {"corpus": corpus_text, "queries": query_text}
PROMPT_OF = {"corpus": "document", "queries": "query"}


def check_options(cfg: BuildConfig) -> None:
    if cfg.batch_size <= 0:
        raise UserError(f"--batch-size {cfg.batch_size}: must be a positive integer")
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype {cfg.dtype!r}: choose one of {', '.join(DTYPES)}")
    if cfg.precision not in PRECISIONS:
        raise UserError(f"--precision {cfg.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if cfg.shard_rows <= 0 or cfg.chunk_rows <= 0 or cfg.shard_rows % cfg.chunk_rows:
        raise UserError(
            f"--shard-rows {cfg.shard_rows} must be a positive multiple of --chunk-rows {cfg.chunk_rows}"
        )


def _paths(dataset: BeirDataset) -> dict[str, Path]:
    return {"corpus": dataset.corpus_path, "queries": dataset.queries_path}


def _precision_fits(requested: str, runtime: dict | None) -> bool:
    """Whether a store's runtime is what `--precision requested` makes: auto takes fp32 and CUDA's autocast,
    never an explicit CPU bf16 store; stores from before runtimes were recorded are fp32."""
    backend, precision = (runtime or {}).get("backend"), (runtime or {}).get("precision") or "float32"
    if requested == "auto":
        return precision == "float32" or backend == "torch"
    return precision == PRECISION_DTYPES[requested]


def _existing(out: Path, wanted: dict, precision: str = "auto") -> Store | None:
    """The store already at `out`, refused early (before the model loads) if it was made differently."""
    if not (out / "zarr.json").is_file():
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"{out}: exists and is not a jepa-cache store; choose another --out")
        return None
    existing = open_store(out, require_complete=False)
    p = existing.provenance
    found = {
        "source": p.get("source"),
        "weights_sha256": (p.get("encoder") or {}).get("weights_sha256"),
        "prompts": (p.get("encoder") or {}).get("prompts"),
        "dataset files": (p.get("dataset") or {}).get("files"),
        "dtype": p.get("dtype"),
        "layout": p.get("layout"),
    }
    differ = [k for k in wanted if wanted[k] != found[k]]
    if p.get("source") == "built" and not _precision_fits(precision, p.get("runtime")):
        differ.append("precision")
    if differ:
        raise UserError(f"{out}: holds a store made differently ({', '.join(differ)} differ); "
                        "choose another --out, or pass --overwrite to replace it")
    return existing


def _complete_summary(out: Path, wanted: dict, precision: str) -> str | None:
    """"N docs, M queries" when `out` already holds this build, finished; None when there is work to do."""
    existing = _existing(out, wanted, precision)
    if existing and existing.complete:
        return f"{existing.corpus.rows} docs, {existing.queries.rows} queries"
    return None


def prompts_of(cfg: BuildConfig, folder: Path) -> dict[str, str]:
    """Each side's prompt: the model's own (as encode_query / encode_document), unless the options give one."""
    prompts = default_prompts(folder)
    given = {"query": cfg.query_prompt, "document": cfg.document_prompt}
    return {side: prompts[side] if given[side] is None else given[side] for side in prompts}


def _prepare_store(out: Path, provenance: dict, ids: dict, cfg: BuildConfig) -> None:
    """Create (or reopen) the store, and clear what a killed writer left, unless it is already complete.

    A build is resumed only by the runtime and precision that began it, so that the provenance is
    true of every shard.
    """
    writer = StoreWriter.open_or_create(out, provenance, ids, overwrite=cfg.overwrite)
    began = writer.provenance.get("runtime")
    if not writer.provenance.get("complete") and began is not None:
        now = provenance["runtime"]
        if (began["backend"], began["precision"]) != (now["backend"], now["precision"]):
            raise UserError(f"{out}: this build began with --backend {began['backend']} ({began['precision']}); "
                            f"resume it with the same --backend and --precision, or pass --overwrite to start "
                            f"again with {now['backend']} ({now['precision']})")
    if not writer.provenance.get("complete"):
        writer.remove_partial_files()
        atomic_write_json(out / "build_config.json", cfg)


def _already_built(cfg: BuildConfig, w, out: Path, sha: str, prompts: dict, files: dict, layout: dict) -> str | None:
    """Rank 0's summary of `out` when it already holds this build, finished, shared with every rank."""
    wanted = {"source": "built", "weights_sha256": sha, "prompts": prompts if any(prompts.values()) else None,
              "dataset files": files, "dtype": cfg.dtype, "layout": layout}
    # rank 0 looks and every rank follows, so that no rank returns while the others wait
    return on_main(w, lambda: _complete_summary(out, wanted, cfg.precision))


def _load_model(cfg: BuildConfig, w, folder: Path, sha: str, log: Callable[[str], None]):
    """The encoder on this rank's device, with its backend and runtime (rank 0 converts once, cached)."""
    device = pick_device(rank_device(cfg.device, w))
    # a bad or missing runtime, or a precision it cannot run, is refused before the model loads
    resolve_precision(cfg.precision, resolve_backend(cfg.backend, device), device)
    model = load_encoder(folder, device)
    backend = resolve_backend(cfg.backend, device, model)
    if backend != "torch":
        # rank 0 converts (once; cached)
        on_main(w, lambda: cached_conversion(model, folder, backend, sha, log) and None)
    runtime = load_runtime(model, folder, backend, sha, log, resolve_precision(cfg.precision, backend, device))
    return device, model, runtime


def _provenance(cfg: BuildConfig, dataset: BeirDataset, folder: Path, sha: str, prompts: dict, files: dict,
                layout: dict, model, runtime) -> dict:
    """The store's provenance: encoder, runtime, dataset files, templates, dim, dtype and layout."""
    name = str(cfg.model) if Path(cfg.model).exists() else canonical_name(cfg.model)
    return {
        "source": "built",
        "encoder": encoder_info(model, folder, name, sha, prompts),
        "runtime": runtime_info(runtime.backend, runtime.precision),
        "dataset": {"name": dataset.name, "path": str(dataset.root.resolve()), "files": files},
        "template": {"corpus": CORPUS_TEMPLATE, "queries": QUERY_TEMPLATE},
        "dim": embedding_dim(model),
        "dtype": cfg.dtype,
        "layout": layout,
    }


def _deal_shards(writer: StoreWriter, w, out: Path, device, log: Callable[[str], None]) -> tuple[set, int, int]:
    """This rank's missing shards (dealt round-robin), all rows to encode, and this rank's rows."""
    # rank 0's view of what is missing, so that no rank sees another's fresh markers
    todo = broadcast(w, {s: writer.missing_shards(s) for s in SECTIONS})
    dealt = [(s, index) for s in SECTIONS for index, _, _ in todo[s]]
    mine = set(dealt[w.rank :: w.size])
    rows_todo = sum(stop - start for s in SECTIONS for _, start, stop in todo[s])
    rows_mine = sum(stop - start for s in SECTIONS for index, start, stop in todo[s] if (s, index) in mine)
    resumed = sum(len(writer.shard_ranges(s)) - len(todo[s]) for s in SECTIONS)
    if resumed:
        log(f"{out}: resuming; {resumed} shard(s) already done, {rows_todo} rows to encode")
    if w.distributed:
        log(f"{w.size} ranks: {len(dealt)} shards dealt round-robin; rank 0 encodes {rows_mine} rows on {device}")
    return mine, rows_todo, rows_mine


def _encode_shards(writer: StoreWriter, w, mine: set, rows_mine: int, paths: dict[str, Path], name: str,
                   model, runtime, prompts: dict[str, str], batch_size: int) -> dict[tuple[str, int], str]:
    """Stream each section's texts and encode and write this rank's shards; their checksums by shard."""
    written: dict[tuple[str, int], str] = {}
    with tqdm(total=rows_mine, unit="rows", desc=f"build {name}", dynamic_ncols=True, disable=not w.main) as bar:
        for section in SECTIONS:
            if not any(s == section for s, _ in mine):
                continue
            texts = (text for _, _, text in iter_records(paths[section], TEXT_OF[section]))
            for index, start, stop in writer.shard_ranges(section):
                window = list(islice(texts, stop - start))
                if len(window) != stop - start:
                    raise UserError(f"{paths[section]}: changed while the build was reading it; run the build again")
                if (section, index) in mine:
                    bar.set_postfix_str(f"{section} shard {index}", refresh=False)
                    vectors = encode(model, window, batch_size, on_batch=bar.update,
                                     prompt=prompts[PROMPT_OF[section]], runtime=runtime)
                    written[(section, index)] = writer.write_shard(section, index, vectors)
    return written


def build(cfg: BuildConfig, log: Callable[[str], None] = print) -> Store:
    """Encode every document and query of `cfg.dataset` into a store; only missing shards are encoded.

    Under torchrun every rank runs this: rank 0 locks and creates (or reopens) the store, the
    missing shards are dealt round-robin to the ranks, each rank streams the texts and writes its
    own shards (separate files in the Zarr store, each with its marker), and rank 0 finalises once
    all are done. Resume is per shard as in one process, with any number of ranks.
    """
    check_options(cfg)
    w = world(cfg.device)
    log = log if w.main else (lambda s: None)
    dataset = find_dataset(cfg.dataset, cfg.data_dir)
    paths = _paths(dataset)
    ids = {section: read_ids(path) for section, path in paths.items()}
    folder = resolve_model(cfg.model)
    out = Path(cfg.out) if cfg.out else default_store_path(dataset.name, cfg.model)
    check_writable(out)
    sha = weights_sha256(folder)
    files = dataset.file_hashes()
    layout = {"shard_rows": cfg.shard_rows, "chunk_rows": cfg.chunk_rows}
    prompts = prompts_of(cfg, folder)

    if not cfg.overwrite and (done := _already_built(cfg, w, out, sha, prompts, files, layout)):
        log(f"{out}: already complete ({done}); nothing to do")
        return open_store(out)

    device, model, runtime = _load_model(cfg, w, folder, sha, log)
    provenance = _provenance(cfg, dataset, folder, sha, prompts, files, layout, model, runtime)
    with main_lock(out, "build", w):
        on_main(w, lambda: _prepare_store(out, provenance, ids, cfg))  # rank 0: the one writer of the store's metadata
        writer = StoreWriter(out)
        if writer.provenance.get("complete"):  # another build finished it while we loaded the model
            log(f"{out}: already complete; nothing to do")
            return open_store(out)
        mine, rows_todo, rows_mine = _deal_shards(writer, w, out, device, log)
        t0 = time.perf_counter()
        written = _encode_shards(writer, w, mine, rows_mine, paths, dataset.name,
                                 model, runtime, prompts, cfg.batch_size)
        # every rank's shards are written; their checksums travel to rank 0 rather than through the
        # filesystem, whose view of other nodes' fresh files may lag (NFS attribute caches)
        written = gather_to_main(w, written)
        if w.main:
            writer.finalize(written=written)
        barrier(w)
        store = open_store(out, require_complete=w.main)
        seconds = time.perf_counter() - t0
        rate = rows_todo / seconds if seconds > 0 else float("nan")
        ranks = f" x {w.size} ranks" if w.distributed else ""
        log(f"{out}: {store.corpus.rows} docs + {store.queries.rows} queries; encoded {rows_todo} rows "
            f"in {seconds:.1f} s ({rate:.1f} rows/s) on {device} with {runtime.backend} ({runtime.precision}){ranks}")
        return store
