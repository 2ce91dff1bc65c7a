"""Ablation of the `best` preset: what each choice is worth, in-domain and zero-shot, over seeds.

Every variant is trained on a store of cached vectors with the same held-out dev slice (20% of
the training queries, seed 0, the same for every training seed) and scored on it after every
epoch; the dev column is the NDCG@10 of the epoch each variant keeps. Test columns are the BEIR
test splits, in-domain and zero-shot, scored by `jepa-cache eval` (FAISS Flat, pytrec_eval);
test is only reported, never used to choose. Each cell is the mean ± standard deviation over the
seeds. Trainable parameters and train seconds (the whole `train()` call: dev scoring and, for
`best`, the refit included) come from heads.json. Isotropy is measured on the in-domain corpus as
the index holds it (L2-normalised heads output): effective rank of its covariance, and the SIGReg
statistic per sample of the rows scaled by sqrt(d) (see `losses.isotropy_stats`).

    python pipelines/ablation.py                                   # both training sets, every variant, seeds 0 1 2
    python pipelines/ablation.py --train nfcorpus --variants B,best --seeds 0
    python pipelines/ablation.py --table-only                      # rebuild the tables from what is on disk

Stores: data/cache/<dataset>/all-mpnet-base-v2 (what `jepa-cache run` imports from
$JEPA_CACHE_REFERENCE; imported here when missing). Outputs: runs/ablation/<train>/<variant>-s<seed>/
(heads, eval, row.json), runs/ablation/ablation.{md,json}. Finished rows are reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EVAL = ("scifact", "nfcorpus", "arguana")
# Zero-shot *probes* that are not test: NFCorpus's dev split and SciFact's train queries. Choices
# made for zero-shot robustness look at these, never at the test columns.
PROBES = {"scifact": ("nfcorpus", "dev"), "nfcorpus": ("scifact", "train")}
OUT = ROOT / "runs" / "ablation"

# The base of the ablation: the `best` preset trained on the 80% slice, without the refit, and
# without a predictor (the rows below add one back). name -> (what it changes, overrides, strategy).
B = dict(preset="best", refit=False, lambda_isotropy=0.0, epochs=4)
VARIANTS: dict[str, tuple[str, dict, str]] = {
    "vanilla": ("all-mpnet-base-v2 as is", {}, "none"),
    "study": ("the study's heads and loss (preset study)", dict(preset="study", dev_fraction=0.2), "frozen-predictor"),
    "jepa": ("the preset jepa: PCA 768→512 linear + residual predictor, in-batch, SIGReg", dict(preset="jepa", dev_fraction=0.2), "frozen-predictor"),
    "B": ("adapter x+Wx (identity start), InfoNCE over the whole corpus, query epochs, lr 2e-4 const, 4 epochs, epoch chosen on dev", B, "frozen-isotropy"),
    "B-batch": ("B, in-batch negatives only", dict(B, negatives="batch"), "frozen-isotropy"),
    "B-mined": ("B, in-batch + 1 of 32 FAISS-mined hard negatives per query", dict(B, negatives="mined"), "frozen-isotropy"),
    "B-pairs": ("B, pair epochs (1 epoch = every pair)", dict(B, sampling="pairs", epochs=1), "frozen-isotropy"),
    "B-8ep": ("B, up to 8 epochs (dev picks)", dict(B, epochs=8), "frozen-isotropy"),
    "B-last": ("B, no dev selection: keep epoch 4", dict(B, select="last"), "frozen-isotropy"),
    "B-lr1e-3": ("B, lr 1e-3", dict(B, lr=1e-3), "frozen-isotropy"),
    "B-cosine": ("B, cosine decay instead of a constant rate", dict(B, schedule="cosine"), "frozen-isotropy"),
    "B-tau0.1": ("B, temperature 0.1", dict(B, temperature=0.1), "frozen-isotropy"),
    "B-wd30": ("B, weight decay 30 (towards the identity)", dict(B, weight_decay=30.0), "frozen-isotropy"),
    "B-rank32": ("B, low-rank adapter (rank 32)", dict(B, rank=32), "frozen-isotropy"),
    "B-linear": ("B, plain linear map at the (scaled) identity instead of x+Wx", dict(B, projection="linear"), "frozen-isotropy"),
    "B-resmlp": ("B, residual MLP projection (identity + zero-init MLP 768→1536→768)", dict(B, projection="residual"), "frozen-isotropy"),
    "B-512pca": ("B, linear 768→512 PCA init", dict(B, projection="linear", init="pca", output_dim=512), "frozen-isotropy"),
    "B+pred": ("B + JEPA predictor (residual MLP), λ_pred 0.5, training only", dict(B, predictor="residual", lambda_predictive=0.5), "frozen-predictor"),
    "B+pred-nosg": ("B+pred without stop-gradient", dict(B, predictor="residual", lambda_predictive=0.5, use_stopgrad=False), "frozen-predictor"),
    "B+pred-tower": ("B+pred, queries retrieved (and contrasted) through the predictor", dict(B, predictor="residual", lambda_predictive=0.5, query_tower="predictor"), "frozen-predictor"),
    "B+sigreg1": ("B + SIGReg λ 1.0 (256 directions)", dict(B, lambda_isotropy=1.0), "frozen-isotropy"),
    "B+sigreg0.1": ("B + SIGReg λ 0.1", dict(B, lambda_isotropy=0.1), "frozen-isotropy"),
    "B+sigreg1-1024": ("B + SIGReg λ 1.0, 1024 directions", dict(B, lambda_isotropy=1.0, directions=1024), "frozen-isotropy"),
    "B+sigreg3": ("B + SIGReg λ 3.0", dict(B, lambda_isotropy=3.0), "frozen-isotropy"),
    "B+sigreg10": ("B + SIGReg λ 10", dict(B, lambda_isotropy=10.0), "frozen-isotropy"),
    "B+sigreg3-8ep": ("B + SIGReg λ 3.0, up to 8 epochs", dict(B, lambda_isotropy=3.0, epochs=8), "frozen-isotropy"),
    "B+refit": ("B + refit on all training queries for the epoch dev chose", dict(preset="best", lambda_isotropy=0.0, epochs=4), "frozen-isotropy"),
    "best": ("the preset best: B + SIGReg λ 3 + refit", dict(preset="best"), "frozen-isotropy"),
}
# Post-hoc rows from the heads of a variant, no retraining: score blends with vanilla
# (alpha * cos_vanilla + (1 - alpha) * cos_heads) and weight interpolation towards the start
# (WiSE-FT: initial + beta * (trained - initial); for the adapter, x + beta * W x).
BLENDS = (0.25, 0.5)
INTERPOLATIONS = (0.25, 0.5, 0.75)
POSTHOC = ("B", "B-8ep", "B-lr1e-3", "B+pred-tower", "B+refit", "best")


def store_path(dataset: str) -> Path:
    return ROOT / "data" / "cache" / dataset / "all-mpnet-base-v2"


def ensure_store(dataset: str):
    from jepa_cache.config import ImportConfig
    from jepa_cache.importer import import_vectors
    from jepa_cache.store import open_store

    path = store_path(dataset)
    if (path / "zarr.json").is_file():
        return open_store(path)
    reference = Path(os.environ.get("JEPA_CACHE_REFERENCE", ROOT.parent / "shared" / "data" / "embeddings")) / dataset
    return import_vectors(ImportConfig(dataset=dataset, corpus=str(reference / "corpus.f32.npy"), corpus_ids=str(reference / "corpus.ids.txt"),
                                       queries=str(reference / "queries.f32.npy"), query_ids=str(reference / "queries.ids.txt"),
                                       out=str(path)), log=lambda s: None)


@functools.cache
def dev_set(train_ds: str):
    """The dev slice every variant is scored on (what `train` holds out with dev_fraction 0.2)."""
    import torch

    from jepa_cache.config import TrainConfig
    from jepa_cache.loop import DevSet
    from jepa_cache.pairs import load_pairs

    store = ensure_store(train_ds)
    _, dev_pairs = load_pairs(TrainConfig(store=str(store.path), dataset=train_ds), store).hold_out(0.2)
    return DevSet.from_pairs(dev_pairs, store, torch.from_numpy(store.corpus.vectors(np.float32)), torch.device("cpu"))


def test_ndcg(dataset: str, heads_dir: Path | None, out: Path, split: str = "test") -> float:
    from jepa_cache.config import EvalConfig
    from jepa_cache.evaluate import evaluate

    results = out / "results.json"
    if results.is_file():
        return json.loads(results.read_text())["datasets"][dataset]["metrics"]["ndcg@10"]
    r = evaluate(EvalConfig(datasets=[dataset], split=split, store=str(store_path(dataset)), heads=str(heads_dir) if heads_dir else None,
                            out=str(out)), log=lambda s: None)
    return r["datasets"][dataset]["metrics"]["ndcg@10"]


def isotropy(dataset: str, heads) -> dict[str, float]:
    import torch

    from jepa_cache.losses import isotropy_stats

    x = torch.from_numpy(ensure_store(dataset).corpus.vectors(np.float32))
    return isotropy_stats(heads.encode_documents(x) if heads is not None else x)


def run_variant(train_ds: str, name: str, seed: int, dev) -> dict:
    from jepa_cache.config import TrainConfig
    from jepa_cache.heads import load_heads
    from jepa_cache.train import train

    folder = OUT / train_ds / f"{name}-s{seed}"
    row_file = folder / "row.json"
    if row_file.is_file():
        return json.loads(row_file.read_text())
    what, overrides, strategy = VARIANTS[name]
    row: dict = {"train": train_ds, "variant": name, "seed": seed, "what": what}
    if strategy == "none":
        heads, heads_dir = None, None
        row.update(params=0, seconds=0.0, dev=dev.score(None), kept_epoch=None)
    else:
        heads_dir = folder / "heads"
        t0 = time.perf_counter()
        result = train(TrainConfig(store=str(store_path(train_ds)), dataset=train_ds, strategy=strategy, seed=seed,
                                   out=str(heads_dir), overwrite=True, device="cpu", **{"adapt": "none", **overrides}),
                       log=lambda s: None)  # the heads alone: per-document corrections are adapt_select.py's ablation
        heads = load_heads(heads_dir)
        record = result.dev
        row.update(params=heads.parameter_counts()["total"], seconds=round(time.perf_counter() - t0, 2),
                   config={k: v for k, v in dataclasses.asdict(result.config).items() if k not in ("store", "out")})
        if record and not result.config.refit:
            kept = record["best_epoch"] if record["best_epoch"] is not None else len(record["ndcg@10"]) - 1
            row.update(dev=record["ndcg@10"][kept], kept_epoch=kept, dev_curve=record["ndcg@10"])
        elif record:  # refit: the final heads saw the dev queries; report what the selection fit scored
            row.update(dev=record["ndcg@10"][record["best_epoch"]], kept_epoch=record["best_epoch"], dev_curve=record["ndcg@10"],
                       dev_note="selection fit (the refit heads trained on the dev queries)")
        else:
            row.update(dev=dev.score(heads), kept_epoch=result.config.epochs)
    row["test"] = {d: test_ndcg(d, heads_dir, folder / "eval" / d) for d in EVAL}
    probe, split = PROBES[train_ds]
    row["probe"] = {"dataset": probe, "split": split, "ndcg@10": test_ndcg(probe, heads_dir, folder / "eval" / f"{probe}-{split}", split)}
    row["isotropy"] = isotropy(train_ds, heads)
    folder.mkdir(parents=True, exist_ok=True)
    row_file.write_text(json.dumps(row, indent=1))
    return row


def scores_of(train_ds: str, encode_queries, encode_documents, dev) -> dict:
    """Dev, zero-shot probe and test NDCG@10 of any query/document encoders (exact search, BEIR conventions)."""
    import torch

    from jepa_cache.datasets import find_dataset, read_qrels
    from jepa_cache.metrics import score
    from jepa_cache.search import top_k

    def ndcg(queries, query_ids, corpus, corpus_ids, qrels) -> float:
        q, d = torch.as_tensor(queries), torch.as_tensor(corpus)
        hits = top_k(encode_documents(d).numpy(), encode_queries(q).numpy(), 11, "cos", "Flat")
        run = {qid: {corpus_ids[r]: float(s) for r, s in zip(rows, scores) if r >= 0 and corpus_ids[r] != qid}
               for qid, rows, scores in zip(query_ids, hits.indices, hits.scores)}
        return score(qrels, run, recall_at=10)[0]["ndcg@10"]

    out = {"dev": ndcg(dev.queries, dev.query_ids, dev.corpus, dev.corpus_ids, dev.qrels) if dev is not None else None}
    for d, split in [(d, "test") for d in EVAL] + [PROBES[train_ds]]:
        store = ensure_store(d)
        qrels = read_qrels(find_dataset(d).qrels_path(split))
        qids = [q for q in qrels if q in store.queries.row_of]
        queries = store.queries.vectors(np.float32, np.array([store.queries.row_of[q] for q in qids]))
        out[d if split == "test" else "probe"] = ndcg(queries, qids, store.corpus.vectors(np.float32), store.corpus.ids,
                                                      {q: qrels[q] for q in qids})
    return out


def posthoc(train_ds: str, name: str, seed: int, dev) -> dict:
    """Blends (B only) and interpolations of a variant's heads, cached beside its row."""
    import copy

    import torch
    import torch.nn.functional as F

    from jepa_cache.config import TrainConfig
    from jepa_cache.heads import load_heads
    from jepa_cache.loop import interpolate_heads
    from jepa_cache.resolve import build_heads, resolve_config

    folder = OUT / train_ds / f"{name}-s{seed}"
    cache = folder / "posthoc.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    heads = load_heads(folder / "heads")
    cfg = resolve_config(TrainConfig(**json.loads((folder / "heads" / "config.json").read_text())))
    if cfg.refit:
        dev = None  # the refit heads trained on the dev queries: no honest dev score
    torch.manual_seed(cfg.seed)
    corpus = torch.from_numpy(ensure_store(train_ds).corpus.vectors(np.float32))
    initial = build_heads(cfg, heads.config.input_dim, corpus).state_dict()
    out = {}
    for beta in INTERPOLATIONS:
        h = interpolate_heads(copy.deepcopy(heads), initial, beta)
        out[f"interpolate {beta}"] = scores_of(train_ds, h.encode_queries, h.encode_documents, dev)
    if name == "B":
        for a in BLENDS:
            def both(encode, a=a):
                return lambda x: torch.cat([a**0.5 * F.normalize(x, dim=1), (1 - a) ** 0.5 * F.normalize(encode(x), dim=1)], 1)
            out[f"blend {a}"] = scores_of(train_ds, both(heads.encode_queries), both(heads.encode_documents), dev)
    cache.write_text(json.dumps(out, indent=1))
    return out


def cell(values: list[float], digits: int = 4) -> str:
    if not values or any(v is None for v in values):
        return "–"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {float(np.std(values, ddof=1)):.{digits}f}"


def table(rows: list[dict], train_ds: str, seeds: list[int]) -> str:
    mine = [r for r in rows if r["train"] == train_ds and r["seed"] in seeds]
    zero = [d for d in EVAL if d != train_ds]
    probe = "/".join(PROBES[train_ds])
    head = (f"| variant | params | train s | {train_ds} dev | {probe} probe | {train_ds} test | " + " | ".join(f"{d} (zero-shot)" for d in zero)
            + " | eff. rank | SIGReg/N |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    vanilla = [r for r in mine if r["variant"] == "vanilla"]
    base = {d: float(np.mean([r["test"][d] for r in vanilla])) for d in EVAL} if vanilla else None
    for name in VARIANTS:
        got = [r for r in mine if r["variant"] == name]
        if not got:
            continue
        tests = [cell([r["test"][d] for r in got]) for d in (train_ds, *zero)]
        if base and name != "vanilla":
            tests = [f"{t} ({np.mean([r['test'][d] for r in got]) - base[d]:+.4f})" for t, d in zip(tests, (train_ds, *zero))]
        iso = [r["isotropy"] for r in got]
        dev_mark = " †" if any(r.get("dev_note") for r in got) else ""
        lines.append(f"| {name} | {got[0]['params']:,} | {cell([r['seconds'] for r in got], 1)} | {cell([r['dev'] for r in got])}{dev_mark} | "
                     f"{cell([r['probe']['ndcg@10'] for r in got])} | "
                     + " | ".join(tests) + f" | {np.mean([i['effective_rank'] for i in iso]):.0f} | {np.mean([i['sigreg'] for i in iso]):.4f} |")
        extra = [r.get("posthoc", {}) for r in got]
        for key in (extra[0] if all(extra) else {}):
            b = [x[key] for x in extra]
            vals = [cell([x[d] for x in b]) for d in (train_ds, *zero)]
            if base:
                vals = [f"{v} ({np.mean([x[d] for x in b]) - base[d]:+.4f})" for v, d in zip(vals, (train_ds, *zero))]
            lines.append(f"| {name} + {key.replace('blend', 'blend α=').replace('interpolate', 'interpolate β=')} | {got[0]['params']:,} | – | "
                         f"{cell([x['dev'] for x in b])} | {cell([x['probe'] for x in b])} | " + " | ".join(vals) + " | – | – |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", default="scifact,nfcorpus", help="training datasets, comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; known: " + ", ".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the tensors are small; 1 is best on a busy CPU)")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the tables from finished rows")
    args = parser.parse_args()
    os.environ.setdefault("JEPA_CACHE_DATA", str(ROOT.parent / "shared" / "data" / "beir"))
    import torch

    torch.set_num_threads(args.threads)
    train_sets = [t for t in args.train.split(",") if t]
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if not args.table_only:
        for d in EVAL:
            ensure_store(d)
        for train_ds in train_sets:
            dev = dev_set(train_ds)
            for name in names:
                for seed in ([0] if name == "vanilla" else seeds):
                    t0 = time.perf_counter()
                    row = run_variant(train_ds, name, seed, dev)
                    print(f"[{train_ds}] {name} s{seed}: dev {row['dev']:.4f} test "
                          + " ".join(f"{d} {v:.4f}" for d, v in row["test"].items()) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = [json.loads(p.read_text()) for p in sorted(OUT.glob("*/*/row.json"))]
    for r in rows:
        if r["variant"] in POSTHOC and (not args.table_only or (OUT / r["train"] / f"{r['variant']}-s{r['seed']}" / "posthoc.json").is_file()):
            r["posthoc"] = posthoc(r["train"], r["variant"], r["seed"], dev_set(r["train"]))
    for r in rows:  # vanilla is deterministic: one row stands for every seed
        if r["variant"] == "vanilla":
            r["seed"] = seeds[0]
    md = ["# Ablation of the `best` preset", "",
          "NDCG@10, mean ± s.d. over seeds " + ", ".join(map(str, seeds)) + "; (±x) = difference of the mean from vanilla. "
          "dev: 20% of the training queries held out (seed 0), the epoch each variant keeps (†: a refit variant: the dev score "
          "of its selection fit; the refit heads themselves trained on the dev queries, so they have none); probe: a zero-shot "
          "split that is not test (NFCorpus dev for SciFact-trained heads, SciFact train queries for NFCorpus-trained ones); "
          "test: BEIR test splits, only reported. eff. rank and SIGReg/N: isotropy of the in-domain corpus as indexed.", ""]
    for train_ds in sorted({r["train"] for r in rows}):
        md += [f"## trained on {train_ds}", "", table(rows, train_ds, seeds), ""]
    md += ["## variants", "", *(f"- **{n}**: {w}" for n, (w, _, _) in VARIANTS.items())]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ablation.md").write_text("\n".join(md) + "\n")
    (OUT / "ablation.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(md))
    print(f"\nwritten: {OUT / 'ablation.md'}, {OUT / 'ablation.json'}")


if __name__ == "__main__":
    main()
