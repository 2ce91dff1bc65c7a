"""Benchmark `jepa-cache eval`: wall time and queries/s, SciFact and a synthetic 1M x 768 float16 corpus.

    python pipelines/bench_eval.py                      # both, faiss Flat + torch exact + one approximate index
    python pipelines/bench_eval.py --docs 200000 --skip-scifact

SciFact is imported from the shared reference vectors (../shared/data/embeddings/scifact). The synthetic
corpus has structure (documents near a random 64-d subspace, each query a noisy copy of one document,
its single relevant one), so an approximate index has neighbours worth finding; its store and BEIR
folder are kept under --work and reused. Every run goes through `evaluate` end to end: reading the store,
indexing, searching, scoring, writing outputs. On a GPU machine faiss-gpu and `--index torch` use it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from jepa_cache.config import EvalConfig, ImportConfig
from jepa_cache.evaluate import evaluate
from jepa_cache.files import atomic_write_json
from jepa_cache.importer import import_vectors
from jepa_cache.store import open_store
from jepa_cache.store_writer import StoreWriter

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def synthetic_dataset(work: Path, docs: int, queries: int, dim: int, seed: int = 0) -> tuple[Path, Path]:
    """A BEIR folder and a float16 store of `docs` clustered vectors (reused when already complete)."""
    root, store_path = work / "beir" / f"synthetic-{docs}", work / "stores" / f"synthetic-{docs}"
    if (store_path / "zarr.json").is_file() and open_store(store_path, require_complete=False).complete:
        return root, store_path
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((64, dim)).astype(np.float32) / 8  # documents lie near a random 64-d subspace
    targets = np.sort(rng.choice(docs, size=queries, replace=False))
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w") as f:
        f.writelines(f'{{"_id": "d{i}", "text": ""}}\n' for i in range(docs))
    with open(root / "queries.jsonl", "w") as f:
        f.writelines(f'{{"_id": "q{i}", "text": ""}}\n' for i in range(queries))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{t}\t1\n" for i, t in enumerate(targets)))
    from jepa_cache.datasets import BeirDataset

    provenance = {
        "source": "imported",
        "encoder": {"name": "synthetic", "path": None, "weights_sha256": None, "max_seq_length": None, "pooling": None,
                    "normalize": True, "model_normalizes": None, "dim": dim},
        "dataset": {"name": root.name, "files": BeirDataset(root.name, root).file_hashes()},
        "template": {"corpus": "synthetic", "queries": "synthetic"},
        "dim": dim, "dtype": "float16", "layout": {"shard_rows": 8192, "chunk_rows": 1024},
    }
    writer = StoreWriter.open_or_create(store_path, provenance, {"corpus": [f"d{i}" for i in range(docs)],
                                                                 "queries": [f"q{i}" for i in range(queries)]}, overwrite=True)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    query_vecs = np.empty((queries, dim), np.float32)
    for index, start, stop in writer.shard_ranges("corpus"):
        block = unit(rng.standard_normal((stop - start, 64), np.float32) @ basis + 0.3 * rng.standard_normal((stop - start, dim), np.float32))
        writer.write_shard("corpus", index, block)
        hit = (targets >= start) & (targets < stop)
        query_vecs[hit] = unit(block[targets[hit] - start] + 0.3 / np.sqrt(dim) * rng.standard_normal((int(hit.sum()), dim), np.float32))
    for index, start, stop in writer.shard_ranges("queries"):
        writer.write_shard("queries", index, query_vecs[start:stop])
    writer.finalize()
    return root, store_path


def scifact_store(work: Path) -> Path:
    ref = SHARED / "embeddings" / "scifact"
    store = import_vectors(ImportConfig(dataset="scifact", data_dir=str(SHARED / "beir"), corpus=str(ref / "corpus.f32.npy"),
                                        corpus_ids=str(ref / "corpus.ids.txt"), queries=str(ref / "queries.f32.npy"),
                                        query_ids=str(ref / "queries.ids.txt"), out=str(work / "stores" / "scifact")), log=lambda s: None)
    return store.path


def timed_eval(label: str, dataset: str, store: Path, work: Path, **kw) -> dict:
    t0 = time.perf_counter()
    res = evaluate(EvalConfig(datasets=[dataset], store=str(store), out=str(work / "eval" / label), **kw), log=lambda s: None)
    wall = time.perf_counter() - t0
    r = next(iter(res["datasets"].values()))
    t = r["timings"]
    row = {
        "run": label, "docs": r["store"]["docs"], "queries": r["queries"]["searched"], "backend": r["search"]["backend"],
        "wall_s": round(wall, 2), "load_s": round(t["load_s"], 2), "index_and_search_s": round(t["index_and_search_s"], 2),
        "search_s": round(t["search_s"], 3), "queries_per_s": round(t["queries_per_s"], 1),
        "ndcg@10": round(r["metrics"]["ndcg@10"], 5), "recall_vs_exact": r["search"]["recall_vs_exact"],
        "exact_s": None if t["exact_s"] is None else round(t["exact_s"], 2), "blockwise": r["search"]["blockwise"],
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--approx", default="IVF256,Flat", help="approximate FAISS index to compare with exact")
    ap.add_argument("--approx-params", default="nprobe=16")
    ap.add_argument("--skip-scifact", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--indexes", default="flat,torch,approx",
                    help="which searches: flat (exact FAISS), torch (exact, on the GPU when there is one), approx")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for faiss and torch (default: theirs)")
    args = ap.parse_args()
    chosen = set(args.indexes.split(","))
    if chosen - {"flat", "torch", "approx"}:
        raise SystemExit(f"--indexes {args.indexes!r}: choose from flat, torch, approx")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        if chosen - {"torch"}:
            import faiss

            faiss.omp_set_num_threads(args.threads)
    rows = []
    if not args.skip_scifact:
        store = scifact_store(args.work)
        for label, kw in (("scifact-flat", {}), ("scifact-torch", {"index": "torch"}),
                          ("scifact-approx", {"faiss_index": "HNSW32", "faiss_params": "efSearch=128"})):
            if label.split("-")[1] in chosen:
                rows.append(timed_eval(label, "scifact", store, args.work, data_dir=str(SHARED / "beir"), **kw))
    if not args.skip_synthetic:
        t0 = time.perf_counter()
        root, store = synthetic_dataset(args.work, args.docs, args.queries, args.dim)
        print(f"synthetic store ready in {time.perf_counter() - t0:.1f} s: {store}", flush=True)
        runs = [("synthetic-flat", {}), ("synthetic-torch", {"index": "torch"}),
                ("synthetic-approx", {"faiss_index": args.approx, "faiss_params": args.approx_params})]
        for label, kw in runs:
            if label.split("-")[1] in chosen:
                rows.append(timed_eval(label, str(root), store, args.work, **kw))
    machine = {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "platform": platform.platform()}
    atomic_write_json(args.work / "bench_eval.json", {"machine": machine, "args": vars(args), "rows": rows})
    print(f"written {args.work / 'bench_eval.json'}")


if __name__ == "__main__":
    main()
