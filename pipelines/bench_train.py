"""Benchmark: train-heads on the cache against the same loop run live through the frozen encoder.

For each dataset (SciFact train: 919 pairs, NFCorpus train: 110k pairs) it times one epoch of
`train-heads` on a store holding the shared reference vectors (imported here, float32), then
runs the live reference loop (`train-live --strategy frozen-live`, all-mpnet-base-v2 encoding every batch's texts) on a
fixed seeded subset of pairs, and the cached loop on that same subset with the same seed, and
prints the time per pair of each, their ratio, and how far the two loss trajectories differ.

    python pipelines/bench_train.py                      # defaults: both datasets, 48 live pairs
    python pipelines/bench_train.py --live-pairs 16 --threads 1

The live side costs about a second per pair on a 2-core CPU: keep --live-pairs small there.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from jepa_cache.config import LiveConfig, TrainConfig
from jepa_cache.errors import UserError
from jepa_cache.models import DEFAULT_MODEL, KNOWN, resolve_model, weights_sha256
from jepa_cache.store import open_store
from jepa_cache.store_writer import StoreWriter
from jepa_cache.live import train_live
from jepa_cache.train import train

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def reference_store(name: str, reference: Path, out: Path, encoder_sha: str) -> Path:
    """A float32 store of the shared reference vectors of `name` (made once, then reused)."""
    try:
        open_store(out)
        return out
    except UserError:
        pass
    src = reference / name
    vectors = {s: np.load(src / f"{s}.f32.npy", mmap_mode="r") for s in ("corpus", "queries")}
    ids = {s: (src / f"{s}.ids.txt").read_text(encoding="utf-8").splitlines() for s in ("corpus", "queries")}
    provenance = {
        "source": "imported",
        "encoder": {"name": DEFAULT_MODEL, "weights_sha256": encoder_sha, "normalize": True, "dim": 768},
        "dataset": {"name": name, "files": {}},
        "template": {"corpus": '(title + " " + text).strip()', "queries": "text"},
        "dim": 768,
        "dtype": "float32",
        "layout": {"shard_rows": 1024, "chunk_rows": 128},
    }
    writer = StoreWriter.open_or_create(out, provenance, ids, overwrite=True)
    for section in ("corpus", "queries"):
        for index, start, stop in writer.shard_ranges(section):
            writer.write_shard(section, index, np.asarray(vectors[section][start:stop]))
    writer.finalize()
    return out


def run(cfg: TrainConfig | LiveConfig):
    """Train quietly (cached, or frozen-live for a LiveConfig); returns the result and the CPU seconds the call used."""
    cpu = time.process_time()
    result = train_live(cfg, log=lambda s: None) if isinstance(cfg, LiveConfig) else train(cfg, log=lambda s: None)
    return result, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="scifact,nfcorpus", help="comma-separated; each needs reference vectors")
    ap.add_argument("--reference", type=Path, default=Path(os.environ.get("JEPA_CACHE_REFERENCE", SHARED / "embeddings")))
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("JEPA_CACHE_DATA", SHARED / "beir")))
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-train", help="stores and heads go here")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="encoder for the live loop (must be the reference vectors' encoder)")
    ap.add_argument("--live-dataset", default="scifact")
    ap.add_argument("--live-pairs", type=int, default=48,
                    help="pairs encoded live (about 1 s each on a 2-core CPU); 0: the cached epochs only, no encoder needed")
    ap.add_argument("--live-batch-size", type=int, default=16)
    ap.add_argument("--preset", default="jepa", help="heads preset (the figures in the README used jepa, then named default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    # The encoder is only loaded for the live side; the cached stores carry the pinned fingerprint of the reference's encoder.
    folder = resolve_model(args.model) if args.live_pairs else None
    sha = weights_sha256(folder) if folder else KNOWN[DEFAULT_MODEL].sha256
    print(f"device {args.device}, {torch.get_num_threads()} torch thread(s), preset {args.preset}")

    cached_per_pair, batch_sizes, stores = {}, {}, {}
    for name in args.datasets.split(","):
        stores[name] = reference_store(name, args.reference, args.work / f"{name}-reference-f32", sha)
        cfg = TrainConfig(store=str(stores[name]), dataset=name, data_dir=str(args.data_dir), preset=args.preset, epochs=1,
                          device=args.device, out=str(args.work / f"heads-{name}"), overwrite=True)
        result, cpu = run(cfg)
        seconds, n_pairs = result.epoch_seconds[0], result.heads.meta["training"]["pairs"]
        cached_per_pair[name], batch_sizes[name] = seconds / n_pairs, result.config.batch_size
        print(f"cached  {name:9s}: {n_pairs:>7,} pairs, {len(result.history)} steps of {result.config.batch_size}: epoch {seconds:7.2f} s "
              f"= {1e6 * seconds / n_pairs:8.1f} µs/pair (whole run {cpu:.1f} CPU s); {result.heads.parameter_counts()['total']:,} parameters")

    if not args.live_pairs:
        return
    name = args.live_dataset
    if name not in stores:
        stores[name] = reference_store(name, args.reference, args.work / f"{name}-reference-f32", sha)
    common = dict(store=str(stores[name]), dataset=name, data_dir=str(args.data_dir), preset=args.preset, epochs=1,
                  max_pairs=args.live_pairs, batch_size=args.live_batch_size, device=args.device, overwrite=True)
    t0 = time.perf_counter()
    live, live_cpu = run(LiveConfig(TrainConfig(**common, out=str(args.work / f"heads-{name}-live")), strategy="frozen-live",
                                    model=str(folder)))
    live_wall = time.perf_counter() - t0
    cached, _ = run(TrainConfig(**common, out=str(args.work / f"heads-{name}-subset")))
    n = live.heads.meta["training"]["pairs"]
    live_per_pair = live.epoch_seconds[0] / n
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(live.history, cached.history)]
    print(f"live    {name:9s}: {n:>7,} pairs, {len(live.history)} steps of {args.live_batch_size}: epoch {live.epoch_seconds[0]:7.2f} s "
          f"= {1e6 * live_per_pair:8.1f} µs/pair (whole run {live_cpu:.1f} CPU s, of which encoder load and texts {live_wall - live.seconds:.1f} s wall)")
    print(f"same {n} pairs cached: epoch {cached.epoch_seconds[0]:.4f} s; |loss live − loss cached| per step: "
          f"step 1 {diffs[0]:.2e}, max {max(diffs):.2e} over {len(diffs)} steps")
    for ds, per_pair in cached_per_pair.items():
        print(f"speed-up, time per pair, live {name} vs cached {ds}: {live_per_pair / per_pair:,.0f}x")
    if "nfcorpus" in cached_per_pair:
        print(f"NFCorpus epoch (110,575 pairs, batch {batch_sizes['nfcorpus']}): cached "
              f"{cached_per_pair['nfcorpus'] * 110_575:.1f} s; live would take ~{live_per_pair * 110_575 / 3600:.0f} h")


if __name__ == "__main__":
    main()
