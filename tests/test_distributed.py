"""torchrun: 2 CPU processes over gloo give what one process gives (build: the same store; train-heads: the same heads).

Each test starts a real `torchrun --standalone --nproc_per_node 2 -m jepa_cache ...` job, so it
exercises the environment handshake, the process group, the shard dealing and rank 0's writes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_same_store, write_beir
from jepa_cache.build import build
from jepa_cache.config import BuildConfig, TrainConfig
from jepa_cache.distributed import World, split_rows
from jepa_cache.heads import load_heads
from jepa_cache.store import open_store
from jepa_cache.store_writer import StoreWriter
import jepa_cache.refit as refit_module
from jepa_cache.loop import fit
from jepa_cache.train import train

QUIET = dict(log=lambda s: None)


def torchrun(*argv: str, ranks: int = 2, expect: int = 0) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "jepa_cache", *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # a hung rank fails here
    assert (done.returncode == 0) == (expect == 0), done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_split_rows_covers_every_row_once():
    for n in (0, 1, 5, 16, 17):
        for size in (1, 2, 3):
            shares = [split_rows(n, World(r, size)) for r in range(size)]
            assert shares[0][0] == 0 and shares[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
            assert max(b - a for a, b in shares) - min(b - a for a, b in shares) <= 1


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_beir(tmp_path_factory.mktemp("dist") / "data" / "dist", n_docs=150, n_queries=60, seed=9)


def _build_args(data: Path, model: Path, out: Path) -> list[str]:
    return ["build", "--dataset", str(data), "--model", str(model), "--out", str(out), "--dtype", "float32", "--shard-rows", "16",
            "--chunk-rows", "8", "--batch-size", "8", "--device", "cpu"]


def test_two_rank_build_equals_one_process_build_and_resumes_per_shard(data, tiny_model, tmp_path):
    ref = tmp_path / "one"
    build(BuildConfig(dataset=str(data), model=str(tiny_model), out=str(ref), dtype="float32", shard_rows=16, chunk_rows=8,
                      batch_size=8, device="cpu"), **QUIET)
    log = torchrun(*_build_args(data, tiny_model, tmp_path / "two"))
    assert "2 ranks: 14 shards dealt round-robin" in log  # 150 docs -> 10 shards, 60 queries -> 4
    assert_same_store(tmp_path / "two", ref)

    # a store whose single-process writer died after 3 shards: the 2-rank job encodes only the other 11
    done = open_store(ref)
    provenance = {k: done.provenance[k] for k in ("source", "encoder", "dataset", "template", "dim", "dtype", "layout")}
    partial = tmp_path / "resumed"
    writer = StoreWriter.open_or_create(partial, provenance, {"corpus": done.corpus.ids, "queries": done.queries.ids})
    for index in (0, 4):
        writer.write_shard("corpus", index, done.corpus.vectors(rows=slice(16 * index, 16 * index + 16)))
    writer.write_shard("queries", 3, done.queries.vectors(rows=slice(48, 60)))
    log = torchrun(*_build_args(data, tiny_model, partial))
    assert "resuming; 3 shard(s) already done" in log and "11 shards dealt" in log
    assert_same_store(partial, ref)
    assert "already complete" in torchrun(*_build_args(data, tiny_model, partial))  # every rank returns, none waits


def test_a_refusal_on_rank_0_reaches_every_rank(data, tiny_model, tmp_path):
    """Another process holds the store's lock: the 2-rank job fails with the lock's message instead of hanging."""
    from jepa_cache.files import exclusive_lock

    out = tmp_path / "busy"
    with exclusive_lock(out, "build"):
        log = torchrun(*_build_args(data, tiny_model, out), expect=1)
    assert "another build is writing here right now" in log


@pytest.mark.parametrize("preset,extra", [
    ("best", ["--epochs", "2"]),  # corpus negatives, dev slice and refit
    # negatives mined on rank 0, sent to the others; the last epoch kept (dev would keep epoch 0, the identity)
    ("best", ["--epochs", "1", "--negatives", "mined", "--mine-k", "3", "--select", "last", "--no-refit"]),
    ("jepa", ["--dropout", "0", "--output-dim", "16", "--batch-size", "7"]),  # predictor, in-batch negatives, uneven shares
])
def test_two_rank_train_heads_equals_one_process_on_the_same_global_batch(data, tiny_model, tmp_path, preset, extra,
                                                                          monkeypatch):
    store = tmp_path / "store"
    build(BuildConfig(dataset=str(data), model=str(tiny_model), out=str(store), dtype="float32", device="cpu"), **QUIET)
    args = ["--store", str(store), "--dataset", str(data), "--preset", preset, "--device", "cpu", "--seed", "3", *extra]
    torchrun("train-heads", *args, "--out", str(tmp_path / "two"))
    flags = {"--no-refit": ("refit", False)}
    values = [a for a in args if a not in flags]
    opts = {a.lstrip("-").replace("-", "_"): b for a, b in zip(values[::2], values[1::2])}
    typed = {k: (float(v) if k == "dropout" else int(v) if v.isdigit() else v) for k, v in opts.items()}
    typed.update(flags[a] for a in args if a in flags)
    initial = []  # the heads as each fit starts: the saved ones must have moved from the last fit's start

    def spy(heads, *a, **kw):
        initial.append({k: v.detach().clone() for k, v in heads.state_dict().items()})
        return fit(heads, *a, **kw)

    monkeypatch.setattr(refit_module, "fit", spy)
    train(TrainConfig(**typed, out=str(tmp_path / "one")), **QUIET)
    one, two = load_heads(tmp_path / "one").state_dict(), load_heads(tmp_path / "two").state_dict()
    assert one.keys() == two.keys()
    moved = max(float((one[k] - initial[-1][k]).abs().max()) for k in one if one[k].is_floating_point())
    assert moved > 10 * 1e-5, f"the heads compared barely left their initial weights (moved {moved})"
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5, msg=k)
    assert load_heads(tmp_path / "two").meta["training"]["ranks"] == 2
    steps = [(tmp_path / d / "steps.jsonl").read_text().splitlines() for d in ("one", "two")]
    assert len(steps[0]) == len(steps[1]) > 0
