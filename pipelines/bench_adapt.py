"""Document-side adaptation, timed: ours against the peer package, the whole train-heads, and a large corpus.

    python pipelines/bench_adapt.py                 # NFCorpus: NUDGE-N ours vs nudge-ft 0.1.2, train-heads best (+ corrections)
    python pipelines/bench_adapt.py --rows 1000000  # also a synthetic 1M x 768 float16 store, 10,000 labelled queries

Figures are wall seconds in this process (set OMP_NUM_THREADS to the cores you mean to use), its CPU seconds
(what to compare on a shared machine), and for our adaptation the peak of the memory numpy and Python allocated
during it (tracemalloc). The peer runs on the same vectors and split; the script checks that both give the same vectors.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jepa_cache import adapt  # noqa: E402
from jepa_cache.config import TrainConfig  # noqa: E402
from jepa_cache.datasets import find_dataset  # noqa: E402
from jepa_cache.models import DEFAULT_MODEL  # noqa: E402
from jepa_cache.pairs import Pairs, qrels_pairs  # noqa: E402
from jepa_cache.store import default_store_path, open_store  # noqa: E402
from jepa_cache.train import train  # noqa: E402

T = TypeVar("T")


def measured(fn: Callable[[], T], peak: bool = False) -> tuple[T, str]:
    """fn()'s result, and its wall and CPU seconds (and with `peak`, the most numpy/Python memory it held)."""
    if peak:
        tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    said = f"{time.perf_counter() - t0:.2f} s ({time.process_time() - c0:.2f} s CPU"
    if peak:
        said += f", peak {tracemalloc.get_traced_memory()[1] / 2**20:,.0f} MiB"
        tracemalloc.stop()
    return out, said + ")"


def peer(store, pairs: Pairs) -> None:
    """NUDGE-N as published: ours (block by block, labelled rows only) against nudge-ft's loop over documents."""
    import torch
    from nudge import NUDGEN

    fit, dev = pairs.hold_out(0.2)
    ours, t_ours = measured(
        lambda: adapt.adapt_store(adapt.AdaptConfig("nudge-n", "nudge-ft"), store, pairs, log=lambda s: None), peak=True
    )

    corpus = store.corpus.vectors(np.float32)

    def answers(p: Pairs):
        by: dict[int, list[int]] = {}
        for q, d in zip(p.query_rows.tolist(), p.doc_rows.tolist()):
            by.setdefault(q, []).append(d)
        rows = np.array(list(by), dtype=np.int64)
        return {"q_embs": store.queries.vectors(np.float32, rows), "q_ans_indx": list(by.values())}

    with contextlib.redirect_stdout(io.StringIO()):
        theirs, t_theirs = measured(
            lambda: NUDGEN(device=torch.device("cpu")).finetune_embeddings(corpus, answers(fit), answers(dev))
        )
    rows = ours.rows_in(store.corpus.row_of)
    diff = float(np.abs(theirs[rows] - ours.vectors).max())
    print(f"NUDGE-N on {store.dataset_name} ({store.corpus.rows:,} docs, {len(np.unique(fit.query_rows)):,} fitting "
          f"queries): ours {t_ours}, nudge-ft {t_theirs}; γ {ours.gamma:g}; max |difference| {diff:.1e}")


def heads_and_corrections(store) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        res, total = measured(lambda: train(TrainConfig(store=str(store.path), out=tmp, device="cpu"), log=lambda s: None))
    a = res.record["adapt"]
    print(f"train-heads (best: heads + corrections) on {store.dataset_name}: {total} in all; "
          f"{a['documents']:,} documents corrected (γ {a['gamma']:g}, power {a['power']:g})")


def large(rows: int, dim: int = 768, queries: int = 10_000, seed: int = 0) -> None:
    """A synthetic float16 store of `rows` documents; `queries` queries judge 1-3 documents each."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_store

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        docs = np.empty((rows, dim), dtype=np.float16)
        for start in range(0, rows, 100_000):
            block = rng.standard_normal((min(100_000, rows - start), dim), dtype=np.float32)
            docs[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
        judged = [rng.choice(rows, size=int(rng.integers(1, 4)), replace=False) for _ in range(queries)]
        q = np.stack([docs[j].astype(np.float32).mean(0) + 0.05 * rng.standard_normal(dim, dtype=np.float32) for j in judged])
        store = write_store(Path(tmp) / "store", docs, q, dtype="float16", shard_rows=65536)
        del docs
        pairs = Pairs(np.repeat(np.arange(queries), [len(j) for j in judged]), np.concatenate(judged), None, "synthetic")
        made = time.perf_counter() - t0
        corr, took = measured(lambda: adapt.adapt_store(adapt.AdaptConfig(), store, pairs, log=lambda s: None), peak=True)
    print(f"{rows:,} x {dim} float16 store ({made:.0f} s to write): jepa-cache's rule (γ and power on 2,000 held-out "
          f"queries, refit) in {took}; {len(corr.doc_ids):,} documents corrected")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="nfcorpus")
    ap.add_argument("--rows", type=int, default=0, help="also time a synthetic store of this many documents")
    args = ap.parse_args()
    st = open_store(default_store_path(args.dataset, DEFAULT_MODEL))
    peer(st, qrels_pairs(st, find_dataset(args.dataset).qrels_path("train")))
    heads_and_corrections(st)
    if args.rows:
        large(args.rows)
