"""The bad-input catalogue (issue 9): every command, fed something wrong, says so in one line and touches nothing.

Each case builds a small world in a temp folder (a BEIR dataset, a store of its ids, heads, vectors
to import, recipes), snapshots the folder tree (paths, sizes, mtimes), runs `jepa-cache ARGV`
in-process through the console entry point (`cli.main`, the code that turns a UserError into one
line and exit status 2), then checks: a non-zero exit, exactly one line on stderr that names the
file or option at fault (and, where it matters, what to do), no traceback, and the tree unchanged:
no output folder, no temporary file, no lock file left behind.

test_build.py's own table covers build's dataset and model errors; this one covers the other
commands and what build has no table row for.
"""

from __future__ import annotations

import errno
import gzip
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import write_beir, write_store
from jepa_cache.datasets import BeirDataset, read_corpus, read_queries
from jepa_cache.errors import UserError

DIM = 16


# ---------------------------------------------------------------------------------------------
# The world every case starts from


@dataclass
class World:
    root: Path  # the temp folder; everything below it is snapshotted
    cwd: Path  # where the command runs (default outputs: runs/, data/cache/)
    data: Path  # data/tiny: a BEIR folder with train/test qrels
    store: Path  # a complete store of data/tiny's ids (synthetic 16-d vectors)
    heads: Path  # heads trained (as far as eval can tell) on the store's encoder
    vectors: Path  # corpus.npy, queries.npy, corpus.ids.txt, queries.ids.txt for import
    model: Path  # a 32-d model folder (JSON settings and a weights file: all that import reads)
    extra: dict = field(default_factory=dict)

    def out(self, name: str = "out") -> str:
        return str(self.root / name)


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _save_heads(folder: Path, encoder_fingerprint: str, dim: int = DIM) -> Path:
    from jepa_cache.heads import Heads, HeadsConfig, save_heads

    cfg = HeadsConfig(input_dim=dim, output_dim=8, projection_hidden=16, predictor_hidden=16, init="random")
    return save_heads(Heads(cfg), folder, {"store": {"encoder_fingerprint": encoder_fingerprint, "encoder": "synthetic-encoder"}})


def _fake_model(root: Path, dim: int = 32) -> Path:
    """A sentence-transformers folder as far as import reads it (JSON settings + a weights file): mean pooling to `dim`."""
    (root / "1_Pooling").mkdir(parents=True)
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": dim, "pooling_mode_mean_tokens": True}))
    (root / "model.safetensors").write_bytes(b"not really weights")
    return root


@pytest.fixture
def world(tmp_path, monkeypatch) -> World:
    data = write_beir(tmp_path / "data" / "tiny")
    ds = BeirDataset("tiny", data)
    doc_ids, query_ids = read_corpus(ds.corpus_path)[0], read_queries(ds.queries_path)[0]
    store = tmp_path / "store"
    write_store(store, _unit(len(doc_ids), DIM, 0), _unit(len(query_ids), DIM, 1), doc_ids=doc_ids, query_ids=query_ids,
                dataset="tiny", shard_rows=16)
    heads = _save_heads(tmp_path / "heads", "sha-of-synthetic-encoder")
    vectors = tmp_path / "vectors"
    vectors.mkdir()
    for section, ids, seed in (("corpus", doc_ids, 2), ("queries", query_ids, 3)):
        np.save(vectors / f"{section}.npy", _unit(len(ids), DIM, seed))
        (vectors / f"{section}.ids.txt").write_text("\n".join(ids) + "\n")
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return World(tmp_path, cwd, data, store, heads, vectors, _fake_model(tmp_path / "model-32d"))


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its kind, size and mtime: what 'nothing changed' compares."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = ("dir", None, None) if p.is_dir() else ("file", st.st_size, st.st_mtime_ns)
    return out


# ---------------------------------------------------------------------------------------------
# Helpers that damage one thing of the world


def _lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def _recipe(w: World, body: str) -> str:
    path = w.root / "recipe.toml"
    path.write_text(body)
    return str(path)


GOOD_RECIPE = """
name = "bad"
[train]
dataset = "tiny"
[eval]
datasets = ["tiny"]
[[strategies]]
name = "vanilla"
"""


def _import(w: World, *extra: str, corpus: str | None = None, queries: str | None = None) -> list[str]:
    v = w.vectors
    return ["import", "--dataset", str(w.data), "--corpus", corpus or str(v / "corpus.npy"), "--corpus-ids", str(v / "corpus.ids.txt"),
            "--queries", queries or str(v / "queries.npy"), "--query-ids", str(v / "queries.ids.txt"), "--model", "my-org/not-on-disk",
            "--out", w.out(), *extra]


def _eval(w: World, *extra: str, store: Path | None = None) -> list[str]:
    return ["eval", "--dataset", str(w.data), "--store", str(store or w.store), "--k", "10", "--out", w.out(), *extra]


def _train(w: World, *extra: str, store: Path | None = None) -> list[str]:
    return ["train-heads", "--store", str(store or w.store), "--dataset", str(w.data), "--out", w.out(),
            "--batch-size", "4", "--epochs", "1", "--device", "cpu", *extra]


def _incomplete_store(w: World) -> Path:
    """A store whose writer died after its first shard: created, never finalised."""
    from jepa_cache.store import open_store
    from jepa_cache.store_writer import StoreWriter

    done = open_store(w.store)
    provenance = {k: done.provenance[k] for k in ("source", "encoder", "dataset", "template", "dim", "dtype", "layout")}
    path = w.root / "unfinished"
    writer = StoreWriter.open_or_create(path, provenance, {"corpus": done.corpus.ids, "queries": done.queries.ids})
    writer.write_shard("corpus", 0, done.corpus.vectors(rows=slice(0, 16)))
    return path


def _truncate_shard(w: World) -> None:
    shard = w.store / "corpus" / "emb" / "c" / "1" / "0"
    shard.write_bytes(shard.read_bytes()[:-40])


def _not_a_store(w: World) -> Path:
    path = w.root / "mine"
    path.mkdir()
    (path / "notes.txt").write_text("not vectors")
    return path


def _needs_no_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: --device cuda is valid")


def _locked_dir(w: World) -> Path:
    """A folder without write permission (skipped where permissions do not bind: root with CAP_DAC_OVERRIDE)."""
    path = w.root / "readonly"
    path.mkdir()
    path.chmod(0o500)
    w.extra["chmod"] = path
    try:
        (path / "probe").touch()
    except PermissionError:
        return path
    (path / "probe").unlink()
    path.chmod(0o700)
    pytest.skip("file permissions do not bind here (root); `setpriv --bounding-set=-dac_override` runs these as a user would")


def _heads_json(w: World, mutate: Callable[[dict], None]) -> Path:
    folder = w.root / "odd-heads"
    shutil.copytree(w.heads, folder)
    record = json.loads((folder / "heads.json").read_text())
    mutate(record)
    (folder / "heads.json").write_text(json.dumps(record))
    return folder


def _bad_modules_json(w: World) -> Path:
    folder = w.root / "model"
    shutil.copytree(w.model, folder)
    (folder / "modules.json").write_text("[{not json")
    return folder


# ---------------------------------------------------------------------------------------------
# The catalogue: (case, setup(world) -> argv, message regex)


@dataclass
class Case:
    name: str
    argv: Callable[[World], list[str]]
    message: str
    xfail: str | None = None


CASES = [
    # --- dataset files, read by import (build's own table covers corpus errors through build) ---
    Case("malformed JSONL line in queries",
         lambda w: (_lines(w.data / "queries.jsonl", ['{"_id": "q0", "text": "a"}', '{"_id": "q1", "text": ']), _import(w))[1],
         r"queries\.jsonl: line 2: malformed JSON"),
    Case("query without _id",
         lambda w: (_lines(w.data / "queries.jsonl", ['{"_id": "q0", "text": "a"}', '{"text": "b"}']), _import(w))[1],
         r"queries\.jsonl: line 2: missing '_id'"),
    Case("duplicate document ids",
         lambda w: (_append(w.data / "corpus.jsonl", '{"_id": "d3", "text": "again"}\n'), _import(w))[1],
         r"corpus\.jsonl: line 41: duplicate _id 'd3' \(first on line 4\)"),
    Case("empty queries file", lambda w: ((w.data / "queries.jsonl").write_text("\n"), _import(w))[1],
         r"queries\.jsonl: no records; the file is empty"),
    Case("truncated gzip corpus",
         lambda w: ((w.data / "corpus.jsonl.gz").write_bytes(gzip.compress((w.data / "corpus.jsonl").read_bytes())[:-30]),
                    (w.data / "corpus.jsonl").unlink(), _import(w))[2],
         r"corpus\.jsonl\.gz: cannot be read .*truncated or not UTF-8"),
    Case("JSON nested thousands deep", lambda w: (_append(w.data / "corpus.jsonl", "[" * 100_000 + "\n"), _import(w))[1],
         r"corpus\.jsonl: line 41: malformed JSON \(nested too deeply\)"),
    Case("binary junk as the queries file", lambda w: ((w.data / "queries.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff"), _import(w))[1],
         r"queries\.jsonl: cannot be read .*not UTF-8"),
    Case("dataset folder without a corpus", lambda w: ((w.data / "corpus.jsonl").unlink(), _eval(w))[1],
         r"no corpus\.jsonl or corpus\.jsonl\.gz; is this a BEIR dataset folder\?"),
    # --- qrels, read by eval and train-heads ---
    Case("qrels line with two columns", lambda w: (_append(w.data / "qrels" / "test.tsv", "q7\td1\r\n"), _eval(w))[1],
         r"test\.tsv: line \d+: expected 3 tab-separated columns \(query-id, corpus-id, score\), got 2"),
    Case("qrels score that is not an integer", lambda w: (_append(w.data / "qrels" / "train.tsv", "q1\td1\thigh\n"), _train(w))[1],
         r"train\.tsv: line \d+: score 'high' is not an integer"),
    Case("qrels field beyond the csv limit", lambda w: (_append(w.data / "qrels" / "test.tsv", "q7\t" + "d" * 200_000 + "\t1\n"), _eval(w))[1],
         r"test\.tsv: line \d+: not a qrels line \(field larger than field limit"),
    Case("empty split", lambda w: ((w.data / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n"), _eval(w))[1],
         r"test\.tsv: no judgements; the split is empty"),
    Case("unknown split", lambda w: _eval(w, "--split", "dev"), r"no qrels for split 'dev' .*splits here: test, train"),
    Case("qrels naming only unknown queries",
         lambda w: ((w.data / "qrels" / "test.tsv").write_text("qx1\td1\t1\nqx2\td2\t1\n"), _eval(w))[1],
         r"test\.tsv: none of its 2 judged queries .*wrong dataset or split\?"),
    Case("qrels naming unknown queries with --strict",
         lambda w: (_append(w.data / "qrels" / "test.tsv", "qx1\td1\t1\n"), _eval(w, "--strict"))[1],
         r"tiny --strict: 0 qrels name absent documents, 1 judged queries have no vector"),
    Case("qrels naming absent documents with --strict (ArguAna)",
         lambda w: (_append(w.data / "qrels" / "test.tsv", "q7\tgone1\t1\nq8\tgone2\t1\n"), _eval(w, "--strict"))[1],
         r"tiny --strict: 2 qrels name absent documents"),
    # --- dataset names ---
    Case("unknown dataset name", lambda w: ["eval", "--dataset", "nosuchset", "--data-dir", str(w.root / "data"), "--out", w.out()],
         r"dataset 'nosuchset' is not under"),
    Case("dataset path that traverses out", lambda w: ["eval", "--dataset", "../../nowhere", "--out", w.out()],
         r"dataset folder \.\./\.\./nowhere does not exist"),
    Case("dataset name with odd characters", lambda w: ["eval", "--dataset", "..hidden", "--data-dir", str(w.root / "data")],
         r"dataset name '\.\.hidden' is not allowed"),
    # --- stores ---
    Case("store path that is not a store", lambda w: _eval(w, store=_not_a_store(w)),
         r"mine: not a jepa-cache store \(no zarr\.json\); build one with `jepa-cache build`"),
    Case("incomplete store at eval", lambda w: _eval(w, store=_incomplete_store(w)),
         r"unfinished: the import of this store has not finished; re-run the same `jepa-cache import` to complete it"),
    Case("incomplete store at train-heads", lambda w: _train(w, store=_incomplete_store(w)), r"unfinished: the import of this store has not finished"),
    Case("store with a truncated shard at eval", lambda w: (_truncate_shard(w), _eval(w))[1],
         r"corpus/emb: unreadable .*a shard file is damaged: run `jepa-cache verify` and rebuild"),
    Case("store of another dataset",
         lambda w: ["eval", "--dataset", str(shutil.copytree(w.data, w.root / "data" / "other")), "--store", str(w.store), "--out", w.out()],
         r"a store of dataset 'tiny', not 'other'; pass that dataset's store"),
    # --- import ---
    Case("wrong embedding dimension on import", lambda w: [*_import(w)[:-4], "--model", str(w.model), "--out", w.out()],
         r"vectors are 16-d but the declared encoder .* makes 32-d vectors; pass the --model that made them"),
    Case("NaN in imported vectors",
         lambda w: (np.save(w.vectors / "queries.npy", np.where(np.arange(12)[:, None] == 3, np.nan, _unit(12, DIM, 3)).astype(np.float32)), _import(w))[1],
         r"queries: row 3 \(id 'q3'\) of .*queries\.npy holds NaN/inf \(as float16\); nothing was written"),
    Case("ids count mismatch", lambda w: (_lines(w.vectors / "corpus.ids.txt", [f"d{i}" for i in range(39)]), _import(w))[1],
         r"corpus: 40 vectors in .*corpus\.npy but 39 ids in .*corpus\.ids\.txt; rows and ids must match one to one"),
    Case("vectors in an unknown format", lambda w: _import(w, corpus=str(w.vectors / "corpus.ids.txt")),
         r"corpus\.ids\.txt: unknown vector format; use \.npy"),
    Case("declared model folder with broken modules.json", lambda w: [*_import(w)[:-4], "--model", str(_bad_modules_json(w)), "--out", w.out()],
         r"modules\.json: line 1: not valid JSON"),
    # --- heads ---
    Case("heads from another encoder at eval", lambda w: _eval(w, "--heads", str(_save_heads(w.root / "other-heads", "sha-of-other"))),
         r"made by encoder synthetic-encoder .* but these heads were trained on encoder sha-of-other; use a store of the same encoder"),
    Case("heads of another width than the store", lambda w: _eval(w, "--heads", str(_save_heads(w.root / "narrow-heads", "sha-of-synthetic-encoder", dim=8))),
         r"--heads .*narrow-heads: take 8-d vectors, but .*store holds 16-d ones; use heads trained on a store of this encoder"),
    Case("heads folder without heads", lambda w: _eval(w, "--heads", str(_not_a_store(w))), r"mine: holds no heads\.json; pass the folder train-heads wrote"),
    Case("heads.json without its weights record", lambda w: _eval(w, "--heads", str(_heads_json(w, lambda r: r.pop("weights")))),
         r"odd-heads/heads\.json: .*weights"),
    Case("heads.json whose weights file escapes its folder",
         lambda w: _eval(w, "--heads", str(_heads_json(w, lambda r: r["weights"].update(file="../heads.safetensors")))),
         r"odd-heads/heads\.json: weights file '\.\./heads\.safetensors' must be a bare file name"),
    # --- options ---
    Case("unknown strategy in train-heads", lambda w: _train(w, "--strategy", "full"),
         r"--strategy 'full': choose one of frozen-predictor, frozen-isotropy .*train-live"),
    Case("unknown strategy in train-live", lambda w: ["train-live", "--strategy", "magic", "--store", str(w.store), "--out", w.out()],
         r"--strategy 'magic': choose one of"),
    Case("output width the best preset cannot take", lambda w: _train(w, "--output-dim", "8"),
         r"--projection adapter .* needs --init identity and --output-dim 16 .*not 8 .*--preset jepa"),
    Case("object-store URL as --out", lambda w: [*_import(w)[:-2], "--out", "s3://bucket/store"],
         r"--out s3:/bucket/store: object-store URLs are not supported; use a local or shared \(NFS, Lustre\) folder"),
    Case("negative batch size", lambda w: _train(w, "--batch-size", "-4"), r"--batch-size -4: must be positive"),
    Case("k below 10", lambda w: _eval(w, "--k", "5"), r"--k 5: must be at least 10"),
    Case("unknown faiss index string", lambda w: _eval(w, "--faiss-index", "Bogus42"), r"--faiss-index 'Bogus42': not a FAISS index factory string \(could not parse index string Bogus42\); e\.g\. Flat"),
    Case("faiss index that cannot train on the corpus", lambda w: _eval(w, "--faiss-index", "IVF1024,Flat"),
         r"--faiss-index 'IVF1024,Flat': training failed on 40 rows"),
    Case("unknown similarity", lambda w: _eval(w, "--similarity", "dot"), r"--similarity 'dot': choose one of"),
    Case("--device cuda without CUDA at eval", lambda w: (_needs_no_cuda(), _eval(w, "--index", "torch", "--device", "cuda"))[1],
         r"--device cuda: CUDA is not available on this machine; use --device cpu"),
    Case("--device cuda without CUDA at train-heads", lambda w: (_needs_no_cuda(), _train(w)[:-2] + ["--device", "cuda"])[1],
         r"--device cuda: CUDA is not available on this machine; use --device cpu"),
    Case("malformed --device", lambda w: _train(w)[:-2] + ["--device", "gpu0"], r"--device 'gpu0': use auto, cpu, cuda or cuda:N"),
    Case("training on the split eval scores", lambda w: _train(w, "--train-split", "test"),
         r"--train-split test: that is the split eval scores, .*training queries; .*--allow-test-training"),
    Case("training through the encoder on the split eval scores",
         lambda w: ["train-live", "--strategy", "full", "--store", str(w.store), "--train-split", "test", "--out", w.out()],
         r"--train-split test: that is the split eval scores"),
    # --- recipes ---
    Case("recipe that is not TOML", lambda w: ["run", _recipe(w, "name = [unclosed\n"), "--runs-dir", w.out()], r"recipe\.toml: not valid TOML"),
    Case("recipe with an unknown strategy", lambda w: ["run", _recipe(w, GOOD_RECIPE.replace('name = "vanilla"', 'strategy = "magic"')), "--runs-dir", w.out()],
         r"recipe\.toml: strategies\[0\]\.strategy = 'magic' is not a strategy; choose one of"),
    Case("recipe with the old key kind", lambda w: ["run", _recipe(w, GOOD_RECIPE.replace('name = "vanilla"', 'kind = "vanilla"')), "--runs-dir", w.out()],
         r"recipe\.toml: strategies\[0\]\.kind: the key is now `strategy` \(same values\); rename it"),
    Case("recipe with seeds of the wrong type", lambda w: ["run", _recipe(w, GOOD_RECIPE + 'seeds = "0"\n'), "--runs-dir", w.out()],
         r"recipe\.toml: strategies\[0\]\.seeds must be list \(a list of integers\), got str '0'"),
    Case("recipe with an unknown option", lambda w: ["run", _recipe(w, GOOD_RECIPE.replace('name = "vanilla"', 'strategy = "frozen-predictor"\noptions = {btach_size = 4}')),
                                                      "--runs-dir", w.out()],
         r"recipe\.toml: strategies\[0\]\.options: unknown setting\(s\) btach_size"),
    Case("recipe whose name traverses out", lambda w: ["run", _recipe(w, GOOD_RECIPE.replace('name = "bad"', 'name = "../../elsewhere"')), "--runs-dir", w.out()],
         r"recipe\.toml: name: recipe name '\.\./\.\./elsewhere' is not allowed"),
    Case("recipe with a dataset path for a name", lambda w: ["run", _recipe(w, GOOD_RECIPE.replace('datasets = ["tiny"]', 'datasets = ["/etc"]')), "--runs-dir", w.out()],
         r"recipe\.toml: eval\.datasets: dataset name '/etc' is not allowed"),
    Case("recipe option of the wrong type", lambda w: ["run", _recipe(w, GOOD_RECIPE.replace('name = "vanilla"', 'strategy = "frozen-predictor"\noptions = {batch_size = "4"}')),
                                                        "--runs-dir", w.out()],
         r"recipe\.toml: strategies\[0\]\.options\.batch_size must be int, got str '4'"),
    Case("recipe option with a bad value", lambda w: ["run", _recipe(w, GOOD_RECIPE.replace('name = "vanilla"', 'strategy = "frozen-predictor"\noptions = {batch_size = -4}')),
                                                       "--runs-dir", w.out()],
         r"recipe\.toml: strategies\[0\] \(frozen-predictor\): --batch-size -4: must be positive"),
    Case("recipe strategy with a misspelt key", lambda w: ["run", _recipe(w, GOOD_RECIPE + "seed = [1]\n"), "--runs-dir", w.out()],
         r"recipe\.toml: strategies\[0\]: unknown key\(s\) seed; known: "),
    Case("recipe that trains on the split it scores",
         lambda w: ["run", _recipe(w, GOOD_RECIPE.replace('dataset = "tiny"', 'dataset = "tiny"\nsplit = "test"')), "--runs-dir", w.out()],
         r"recipe\.toml: train\.split = 'test' is the split eval scores on tiny, .*allow_test_training = true under \[train\]"),
    Case("recipe that does not exist", lambda w: ["run", str(w.root / "absent.toml")], r"absent\.toml: recipe not found"),
    # --- outputs ---
    Case("eval --out inside a file", lambda w: ((w.root / "a-file").write_text("x"), _eval(w)[:-2] + ["--out", str(w.root / "a-file" / "o")])[1],
         r"--out .*a-file/o: .*a-file is a file, not a folder; choose another --out"),
    Case("train-heads --out inside a file", lambda w: ((w.root / "a-file").write_text("x"), _train(w)[:6] + [str(w.root / "a-file" / "o")] + _train(w)[7:])[1],
         r"a-file: File exists; a file of that name is in the way; choose another path"),
    Case("unwritable eval --out", lambda w: _eval(w)[:-2] + ["--out", str(_locked_dir(w) / "o")], r"readonly is not writable; choose another --out"),
    Case("unwritable import --out", lambda w: _import(w)[:-2] + ["--out", str(_locked_dir(w) / "o")], r"readonly is not writable; choose another --out"),
    Case("unwritable train-heads --out", lambda w: _train(w)[:6] + [str(_locked_dir(w) / "o")] + _train(w)[7:],
         r"readonly/\.o\.lock: Permission denied; check the permissions, or choose another --out"),
    Case("verify of a folder that is not a store", lambda w: ["verify", str(_not_a_store(w))], r"mine: not a jepa-cache store"),
]


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=c.xfail) if c.xfail else ()) for c in CASES],
                         ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(case: Case, world: World, cli):
    argv = case.argv(world)
    before = snapshot(world.root)
    try:
        code, err = cli(argv)
    finally:
        if "chmod" in world.extra:
            world.extra["chmod"].chmod(0o700)
    assert code != 0, err
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert re.search(case.message, err), err
    assert snapshot(world.root) == before, "the command changed the disk"


def test_catalogue_has_at_least_25_cases():
    assert len([c for c in CASES if not c.xfail]) >= 25


def test_debug_shows_the_traceback(world, cli, capsys):
    """--debug re-raises: the UserError (and its traceback) reaches the caller."""
    with pytest.raises(UserError, match="--k 5: must be at least 10"):
        cli(["--debug", *_eval(world, "--k", "5")])


# ---------------------------------------------------------------------------------------------
# What is not an error: warned, counted, and scored as BEIR does


def _invoke(argv: list[str]):
    """A command that succeeds, through typer's CliRunner (stdout and the exit code)."""
    from typer.testing import CliRunner

    from jepa_cache.cli import app

    return CliRunner().invoke(app, argv, env={"COLUMNS": "200"})


def test_qrels_naming_absent_documents_warn_with_the_count_and_count_as_misses(world):
    """ArguAna's official qrels name 5 documents absent from its corpus: keep them as misses, say how many."""
    _append(world.data / "qrels" / "test.tsv", "q7\tgone1\t1\nq8\tgone2\t2\n")
    result = _invoke(_eval(world))
    assert result.exit_code == 0, result.output
    assert "tiny: 2 qrels name documents absent from the corpus (e.g. 'gone1'); they count as misses" in result.output
    results = json.loads((world.root / "out" / "results.json").read_text())["datasets"]["tiny"]
    assert results["qrels"]["absent_docs"] == 2 and set(results["qrels"]["absent_examples"]) == {"gone1", "gone2"}
    assert results["queries"]["judged"] == 6  # no query dropped: q7 and q8 keep their other judgements, the absent ones are misses


def test_qrels_naming_unknown_queries_warn_and_score_zero(world):
    _append(world.data / "qrels" / "test.tsv", "qx1\td1\t1\n")
    result = _invoke(_eval(world))
    assert result.exit_code == 0, result.output
    assert "tiny: 1 judged queries have no vector in" in result.output and "(e.g. 'qx1'); they score 0" in result.output
    results = json.loads((world.root / "out" / "results.json").read_text())["datasets"]["tiny"]
    assert results["queries"] == {"judged": 7, "searched": 6, "without_vector": 1}


# ---------------------------------------------------------------------------------------------
# Disk full: a clear line, and nothing half-written


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(args[0]) if args else None)


def test_disk_full_during_eval_leaves_no_partial_results(world, cli, monkeypatch):
    import jepa_cache.evaluate as ev

    monkeypatch.setattr(ev, "atomic_write_json", _disk_full)
    before = snapshot(world.root)
    code, err = cli(_eval(world))
    assert code == 2 and err.count("\n") == 1, err
    assert "No space left on device" in err and "results.json" in err and "free" in err
    assert snapshot(world.root) == before  # neither results.json nor the per-dataset files of the run


def test_disk_full_during_import_leaves_a_store_readers_refuse(world, cli, monkeypatch):
    from jepa_cache.store import open_store
    from jepa_cache.store_writer import StoreWriter

    real = StoreWriter.write_shard
    calls = {"n": 0}

    def full_after_one(self, section, index, vectors):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / section / "emb"))
        return real(self, section, index, vectors)

    monkeypatch.setattr(StoreWriter, "write_shard", full_after_one)
    code, err = cli(_import(world, "--out", str(world.root / "imported")))
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err, err
    with pytest.raises(UserError, match="has not finished"):
        open_store(world.root / "imported")
    assert not list((world.root / "imported").rglob("*.tmp")) and not list((world.root / "imported").rglob("*.partial"))
    monkeypatch.setattr(StoreWriter, "write_shard", real)
    code, err = cli(_import(world, "--out", str(world.root / "imported")))  # space freed: the same command finishes it
    assert code == 0, err
    assert open_store(world.root / "imported").complete


def test_disk_full_while_saving_heads_leaves_nothing_half_written(world, cli, monkeypatch):
    import jepa_cache.train as tr

    def disk_full(heads, folder, meta=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "heads.safetensors"))

    monkeypatch.setattr(tr, "save_heads", disk_full)
    before = snapshot(world.root)
    code, err = cli(_train(world))
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err, err
    assert snapshot(world.root) == before


def test_interrupted_eval_leaves_nothing(world, monkeypatch):
    """Ctrl-C after the per-dataset files were written, before results.json: the run's files go, none is half there."""
    import jepa_cache.evaluate as ev
    from jepa_cache.config import EvalConfig

    def interrupted(path, obj):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "atomic_write_json", interrupted)
    before = snapshot(world.root)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(EvalConfig(datasets=[str(world.data)], store=str(world.store), k=10, out=world.out()), log=lambda s: None)
    assert snapshot(world.root) == before


# ---------------------------------------------------------------------------------------------
# Property tests of the readers on arbitrary input (test_datasets.py holds the round trips and
# arbitrary JSON lines): whatever the bytes, a reader returns or raises a UserError naming the file.

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from jepa_cache.datasets import read_qrels  # noqa: E402

PROPS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
tsv_text = st.lists(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8), min_size=0, max_size=4)
                    .map("\t".join), min_size=0, max_size=6)


@PROPS
@given(lines=tsv_text, newline=st.sampled_from(["\n", "\r\n", "\r"]))
def test_arbitrary_qrels_parse_or_fail_naming_file_and_line(tmp_path_factory, lines, newline):
    path = tmp_path_factory.mktemp("t") / "test.tsv"
    path.write_bytes(newline.join(lines).encode("utf-8", "surrogatepass"))
    try:
        qrels = read_qrels(path)
    except UserError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
    else:
        assert qrels and all(isinstance(s, int) for docs in qrels.values() for s in docs.values())


@PROPS
@given(data=st.binary(max_size=200), gz=st.booleans())
def test_arbitrary_bytes_in_a_corpus_file_fail_naming_it(tmp_path_factory, data, gz):
    """Binary junk, bad UTF-8, a truncated or fake gzip: never anything but a UserError naming the file."""
    path = tmp_path_factory.mktemp("b") / ("corpus.jsonl.gz" if gz else "corpus.jsonl")
    path.write_bytes(data)
    try:
        read_corpus(path)
    except UserError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)


@PROPS
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_in_a_qrels_file_fail_naming_it(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("q") / "test.tsv"
    path.write_bytes(data)
    try:
        read_qrels(path)
    except UserError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)


def test_a_dataset_given_as_dot_is_named_after_its_folder(world, monkeypatch):
    """`--dataset .` inside a BEIR folder: the name (and so data/cache/<name>/...) is the folder's, never `.` or `..`."""
    from jepa_cache.store import default_store_path
    from jepa_cache.datasets import find_dataset

    monkeypatch.chdir(world.data)
    assert find_dataset(".").name == "tiny"
    monkeypatch.chdir(world.data / "qrels")
    assert find_dataset("..").name == "tiny"
    assert default_store_path(find_dataset("..").name, "m") == Path("data/cache/tiny/m")
