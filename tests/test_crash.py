"""Crash safety and concurrency of `build`: SIGKILL at random moments, two builds at once, damaged stores.

Killed builds run as real processes. In the default suite they are forked from a server that has
imported torch and sentence-transformers once (multiprocessing's forkserver), so that 20+ kills
cost seconds instead of a 4-second interpreter start each; the slow test does the same through
`python -m jepa_cache build` subprocesses.
"""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import pytest

from conftest import assert_same_store, write_beir
from jepa_cache.build import build
from jepa_cache.config import BuildConfig
from jepa_cache.errors import UserError
from jepa_cache.store import open_store
from jepa_cache.store_writer import verify_store

PRELOAD = ["jepa_cache.cli", "jepa_cache.build", "jepa_cache.encoder", "jepa_cache.store", "sentence_transformers", "zarr"]


def _cli_child(argv: list[str]) -> None:
    """Run `jepa-cache ARGV` in this (forked) process, its output discarded."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.argv = ["jepa-cache", *argv]
    import torch

    from jepa_cache.cli import main

    torch.set_num_threads(1)  # OpenMP barriers crawl when a loaded machine deschedules a thread; one thread does not wait
    main()


@pytest.fixture(scope="module")
def forkserver():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    warm = ctx.Process(target=_cli_child, args=(["--help"],))  # starts the server (imports) before anything is timed
    warm.start()
    warm.join()
    return ctx


def build_args(data: Path, model: Path, out: Path, batch_size: int = 8) -> list[str]:
    return ["build", "--dataset", str(data), "--model", str(model), "--out", str(out), "--dtype", "float32",
            "--shard-rows", "16", "--chunk-rows", "8", "--batch-size", str(batch_size)]


def kill_until_complete(start, out: Path, delay, rng: random.Random, max_kills: int) -> int:
    """Start the build, SIGKILL it after `delay(rng)` seconds, again and again; then let it finish. Returns the kills."""
    kills = 0
    while True:
        proc = start()
        if kills < max_kills:
            deadline = time.monotonic() + delay(rng)
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.005)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
        assert proc.wait() == 0, "a build after kills failed"
        if open_store(out, require_complete=False).complete:
            return kills


class Forked:
    """A forkserver child with the small part of Popen's interface the kill loop uses."""

    def __init__(self, ctx, argv):
        self.p = ctx.Process(target=_cli_child, args=(argv,))
        self.p.start()
        self.pid = self.p.pid

    def poll(self):
        return self.p.exitcode

    def wait(self):
        self.p.join()
        return self.p.exitcode


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted_build(forkserver, tiny_model, tmp_path):
    data = write_beir(tmp_path / "data" / "crash", n_docs=400, n_queries=40, seed=1)
    ref = tmp_path / "ref"
    t0 = time.monotonic()
    assert Forked(forkserver, build_args(data, tiny_model, ref)).wait() == 0
    full = time.monotonic() - t0  # an uninterrupted build, start to finish
    rng = random.Random(20240607)
    total, stores = 0, 0
    while total < 21:  # a store that completes before enough kills is checked, then another one starts
        out = tmp_path / f"killed{stores}"
        total += kill_until_complete(lambda: Forked(forkserver, build_args(data, tiny_model, out)), out,
                                     lambda r: r.uniform(0.0, full), rng, max_kills=21 - total)
        assert_same_store(out, ref)
        stores += 1
    assert total >= 20


@pytest.mark.slow
def test_sigkill_subprocess_builds_then_resume_equals_uninterrupted_build(tiny_model, tmp_path):
    """The same through `python -m jepa_cache build`, killed at random moments in [0.5 s, 5 s]."""
    data = write_beir(tmp_path / "data" / "crash", n_docs=6000, n_queries=200, seed=2)
    ref = tmp_path / "ref"
    build(BuildConfig(dataset=str(data), model=str(tiny_model), out=str(ref), dtype="float32", shard_rows=16, chunk_rows=8,
                      batch_size=8), log=lambda s: None)
    rng = random.Random(7)
    total, stores = 0, 0
    while total < 20:
        out = tmp_path / f"killed{stores}"
        cmd = [sys.executable, "-m", "jepa_cache", *build_args(data, tiny_model, out)]
        start = lambda: subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: E731
        total += kill_until_complete(start, out, lambda r: r.uniform(0.5, 5.0), rng, max_kills=20 - total)
        assert_same_store(out, ref)
        stores += 1


def _locked(path: Path) -> bool:
    if not path.exists():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_a_second_build_on_the_same_store_refuses_and_the_store_stays_valid(forkserver, tiny_model, tmp_path, cli):
    data = write_beir(tmp_path / "data" / "busy", n_docs=2000, n_queries=20, seed=4)
    out = tmp_path / "s"
    first = Forked(forkserver, build_args(data, tiny_model, out))
    while not _locked(tmp_path / ".s.lock"):  # wait until the first build holds the store's lock
        assert first.poll() is None, "the first build ended early"
        time.sleep(0.02)
    code, err = cli(build_args(data, tiny_model, out))
    assert first.poll() is None, "the first build ended before the second one tried; use a larger dataset"
    assert code == 2 and err.count("\n") == 1
    assert f"error: {out}: another build is writing here right now" in err and "wait for it to finish or choose another --out" in err
    assert first.wait() == 0
    assert verify_store(out) == []
    store = open_store(out)
    assert store.corpus.rows == 2000 and np.isfinite(store.corpus.vectors()).all()


def test_verify_cli_reports_damage_and_reads_refuse_it(tiny_model, tiny_beir, tmp_path, cli):
    out = tmp_path / "s"
    build(BuildConfig(dataset=str(tiny_beir), model=str(tiny_model), out=str(out), shard_rows=16, chunk_rows=8), log=lambda s: None)
    code, err = cli(["verify", str(out)])
    assert code == 0 and err == ""
    shard = out / "corpus" / "emb" / "c" / "1" / "0"
    shard.write_bytes(shard.read_bytes()[:-100])
    (out / "corpus" / "emb" / "c" / "2" / "0").unlink()
    code, err = cli(["verify", str(out)])
    assert code == 1
    assert err.splitlines() == [
        f"{out}: corpus shard 1 (rows 16-32): unreadable (ValueError: " + err.splitlines()[0].split("ValueError: ", 1)[1],
        f"{out}: corpus shard 2 (rows 32-40): 8 NaN/inf rows (missing or damaged chunk)",
    ]
    with pytest.raises(UserError, match="damaged"):
        open_store(out).corpus.vectors()
    with pytest.raises(UserError, match=r"NaN/inf \(first: row 32"):
        open_store(out).corpus.vectors(rows=slice(32, 40))


def kill_at_random_moments(start, check, full: float, rng: random.Random, kills: int) -> None:
    """Start, SIGKILL after uniform(0, full) seconds, `check()` what the kill left; `kills` times."""
    done = 0
    while done < kills:
        proc = start()
        deadline = time.monotonic() + rng.uniform(0.0, full)
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            done += 1
        proc.wait()
        check()


@pytest.fixture(scope="module")
def crash_store(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("crash-store")
    data = write_beir(root / "data" / "crash", n_docs=300, n_queries=400, seed=5)
    store = root / "store"
    build(BuildConfig(dataset=str(data), model=str(tiny_model), out=str(store), dtype="float32"), log=lambda s: None)
    return data, store


def test_sigkill_during_train_heads_never_leaves_a_heads_file_that_lies(forkserver, crash_store, tmp_path):
    """Killed at random moments (mid-training, mid-save over older heads): a heads.json, when there is one, always loads
    and matches its weights; a run after the kills gives exactly the uninterrupted heads."""
    from jepa_cache.heads import load_heads

    data, store = crash_store

    def args(out: Path) -> list[str]:
        return ["train-heads", "--store", str(store), "--dataset", str(data), "--out", str(out), "--preset", "jepa",
                "--output-dim", "16", "--batch-size", "8", "--epochs", "12", "--device", "cpu", "--overwrite"]

    ref = tmp_path / "ref"
    t0 = time.monotonic()
    assert Forked(forkserver, args(ref)).wait() == 0
    full = time.monotonic() - t0
    out = tmp_path / "killed"
    assert Forked(forkserver, args(out)).wait() == 0  # older heads in place: later kills also land mid-replacement
    seen = {"heads": 0}

    def check() -> None:
        if (out / "heads.json").exists():
            load_heads(out)  # raises on a weights/record mismatch or a damaged file
            seen["heads"] += 1

    kill_at_random_moments(lambda: Forked(forkserver, args(out)), check, full, random.Random(11), kills=8)
    assert Forked(forkserver, args(out)).wait() == 0
    got, want = load_heads(out).state_dict(), load_heads(ref).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not list(out.glob(".*partial")) and not list(tmp_path.glob(".*.lock"))


def test_sigkill_during_eval_never_leaves_a_partial_results_json(forkserver, crash_store, tmp_path):
    import json

    data, store = crash_store
    args = lambda out: ["eval", "--dataset", str(data), "--store", str(store), "--split", "train", "--out", str(out)]  # noqa: E731
    ref = tmp_path / "ref"
    t0 = time.monotonic()
    assert Forked(forkserver, args(ref)).wait() == 0
    full = time.monotonic() - t0
    out = tmp_path / "killed"

    def check() -> None:
        if (out / "results.json").exists():
            results = json.loads((out / "results.json").read_text())  # whole JSON, never a prefix
            assert "crash" in results["datasets"]

    kill_at_random_moments(lambda: Forked(forkserver, args(out)), check, full, random.Random(12), kills=8)
    assert Forked(forkserver, args(out)).wait() == 0
    got, want = (json.loads((p / "results.json").read_text())["datasets"]["crash"]["metrics"] for p in (out, ref))
    assert got == want
