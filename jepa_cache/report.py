"""The strategy comparison: paired statistics over queries, a Markdown/rich table and plots.

A delta in NDCG@10 is only reported together with its 95% confidence interval (paired bootstrap
over queries) and a paired sign-flip permutation p-value, so +0.005 on 300 queries is never sold
as a win.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from .files import atomic_write_bytes, atomic_write_json
from .heads import load_heads
from .losses import effective_rank
from .store import open_store


@dataclass(frozen=True)
class PairedDelta:
    delta: float  # mean(b - a)
    low: float  # 95% bootstrap interval
    high: float
    p_value: float  # two-sided paired sign-flip permutation test

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    def format(self) -> str:
        star = "*" if self.significant else ""
        return f"{self.delta:+.4f} [{self.low:+.4f}, {self.high:+.4f}] p={self.p_value:.3f}{star}"


def paired_delta(a: Sequence[float], b: Sequence[float], samples: int = 10_000, seed: int = 0) -> PairedDelta:
    """Delta of means of b over a on the same queries, with bootstrap CI and permutation p-value.

    Shape:
        a, b: [queries] per-query metric of the baseline and the candidate, same query order.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired metrics need equal, non-empty 1-d shapes, got {a.shape} and {b.shape}")
    diff = np.round(b - a, 12)  # means over seeds of equal values may differ in the last bit: that is no difference
    rng = np.random.default_rng(seed)
    boot = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    low, high = np.quantile(boot, [0.025, 0.975])
    signs = rng.choice([-1.0, 1.0], size=(samples, len(diff)))
    null = np.abs((signs * diff).mean(axis=1))
    p = (1 + np.count_nonzero(null >= abs(diff.mean()) - 1e-15)) / (samples + 1)
    return PairedDelta(float(diff.mean()), float(low), float(high), float(p))


def eigen_spectrum(x: np.ndarray) -> np.ndarray:
    """Eigenvalues of the covariance of the rows of x, largest first."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    s = np.linalg.svd(x, compute_uv=False)
    return (s**2) / max(len(x) - 1, 1)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(path: Path, strategies: Sequence[str], datasets: Sequence[str],
              scores: dict[tuple[str, str], list[float]]) -> None:
    """NDCG@10 bars (mean over seeds), one group per dataset, one bar per strategy; each seed a dot, range a whisker."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(2.2 + 1.8 * len(datasets), 3.8))
    width = 0.8 / max(len(strategies), 1)
    for i, s in enumerate(strategies):
        xs = np.arange(len(datasets)) + i * width
        runs = [np.asarray(scores.get((s, d), [np.nan]), dtype=float) for d in datasets]
        means = np.array([r.mean() for r in runs])
        ax.bar(xs, means, width, label=s, alpha=0.85)
        spread = np.array([[m - r.min() for m, r in zip(means, runs)], [r.max() - m for m, r in zip(means, runs)]])
        if any(len(r) > 1 for r in runs):
            ax.errorbar(xs, means, yerr=spread, fmt="none", ecolor="black", elinewidth=1, capsize=3)
            for x, r in zip(xs, runs):
                if len(r) > 1:
                    ax.scatter(np.full(len(r), x), r, s=8, color="black", zorder=3)
    ax.set_xticks(np.arange(len(datasets)) + width * (len(strategies) - 1) / 2, datasets)
    ax.set_ylabel("NDCG@10")
    ax.set_title("bar: mean over seeds; dots: each seed; whisker: their range", fontsize=8)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(path: Path, curves: dict[str, dict[str, list[float]]],
                phases: dict[str, list[str]] | None = None) -> None:
    """Loss parts per step, one panel per strategy; the refit phase (retraining on every query) shaded and labelled."""
    if not curves:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), squeeze=False)
    for ax, (name, parts) in zip(axes[0], curves.items()):
        for part, values in parts.items():
            ax.plot(values, label=part, lw=1)
        labels = (phases or {}).get(name) or []
        starts = [i for i, p in enumerate(labels) if i == 0 or p != labels[i - 1]]
        for j, start in enumerate(starts):
            stop = starts[j + 1] if j + 1 < len(starts) else len(labels)
            if labels[start] != "fit":
                ax.axvspan(start - 0.5, stop - 0.5, color="grey", alpha=0.12, lw=0)
            ax.text((start + stop - 1) / 2, 1.0, labels[start], transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=7)
        ax.set_title(name, fontsize=9, pad=14 if labels else 6)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("weighted loss term")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spectra(path: Path, spectra: dict[str, np.ndarray], baseline: str = "vanilla") -> None:
    """Left: share of variance per principal component (log scale; flatter = more isotropic).
    Right: each spectrum of the baseline's width divided by the baseline's, component by component,
    where heads that barely move the geometry (and overlap on the left) still show how they
    redistribute the variance."""
    plt = _pyplot()
    floor = 1e-9  # normalised vectors leave one ~0 eigenvalue: drop it rather than squash the axis
    shares = {name: (eig / eig.sum())[eig / eig.sum() > floor] for name, eig in spectra.items()}
    styles = ["-", "--", "-.", ":"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (name, share) in enumerate(shares.items()):
        label = f"{name} (eff. rank {effective_rank(spectra[name]):.1f})"
        left.semilogy(np.arange(1, len(share) + 1), share, label=label, lw=1.2, ls=styles[i % len(styles)])
        # same width: comparable
        if baseline in shares and name != baseline and len(spectra[name]) == len(spectra[baseline]):
            n = min(len(share), len(shares[baseline]))
            right.plot(np.arange(1, n + 1), share[:n] / shares[baseline][:n], label=name, lw=1.2,
                       ls=styles[i % len(styles)], color=left.lines[-1].get_color())
    values = np.concatenate(list(shares.values()))
    left.set_ylim(values.min() / 2, values.max() * 2)
    left.set_xlabel("principal component")
    left.set_ylabel("share of variance")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    right.axhline(1.0, color="black", lw=0.8)
    right.set_xlabel("principal component")
    right.set_ylabel(f"share / {baseline}'s share")
    right.set_title(f"heads of {baseline}'s width", fontsize=8)
    right.grid(alpha=0.3)
    if right.lines[1:]:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


HEADLINE = "ndcg@10"


def loss_curves(path: Path) -> tuple[dict[str, list[float]], list[str]]:
    """From a heads folder's steps.jsonl: each loss term per step, and each step's phase (fit / refit, or none)."""
    steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    parts = [k for k, v in (steps[0].items() if steps else ()) if k not in ("step", "epoch", "lr", "grad_norm")
             and isinstance(v, (int, float)) and not isinstance(v, bool)]  # "phase" is a label, not a curve
    return {k: [st[k] for st in steps] for k in parts}, [st["phase"] for st in steps if "phase" in st]


def _per_query(paths: Sequence[str]) -> dict[str, float]:
    """Per-query NDCG@10, averaged over the seeds' eval outputs."""
    import pyarrow.parquet as pq

    total: dict[str, float] = {}
    for path in paths:
        table = pq.read_table(path, columns=["query_id", HEADLINE]).to_pydict()
        for q, v in zip(table["query_id"], table[HEADLINE]):
            total[q] = total.get(q, 0.0) + v / len(paths)
    return total


def _spectra(train_store, heads: dict[str, tuple[str, str]]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Eigen-spectra of the training corpus before and after each strategy's heads.

    `heads`: strategy -> (heads path, path of the store its documents come from: the base store for the
    cached strategies, the fine-tuned encoder's own store for full and hybrid).
    """
    rows = np.arange(min(train_store.corpus.rows, 4000))
    spectra = {"vanilla": eigen_spectrum(train_store.corpus.vectors(np.float32, rows))}
    for name, (path, store) in heads.items():
        docs = open_store(store).corpus.vectors(np.float32, rows)
        with torch.no_grad():
            projected = load_heads(path).encode_documents(torch.from_numpy(docs)).numpy()
        spectra[name] = eigen_spectrum(projected)
    return spectra, {n: effective_rank(e) for n, e in spectra.items()}


def _cells(by: dict[tuple[str, str], list[dict]], baseline: str | None) -> dict[tuple[str, str], dict]:
    """Per (strategy, dataset): mean scores over seeds, their spread, and the paired delta against the baseline."""
    cells: dict[tuple[str, str], dict] = {}
    for (s, d), group in by.items():
        scores = [g["metrics"][HEADLINE] for g in group]
        cell = {"ndcg@10": float(np.mean(scores)), "spread": float(np.max(scores) - np.min(scores)),
                "seeds": len(group),
                "recall@100": float(np.mean([g["metrics"].get("recall@100", np.nan) for g in group])),
                "mrr@10": float(np.mean([g["metrics"].get("mrr@10", np.nan) for g in group])),
                "store": group[0]["store_source"]}
        if baseline and s != baseline:
            a = _per_query([g["per_query"] for g in by[(baseline, d)]])
            b = _per_query([g["per_query"] for g in group])
            qs = sorted(a)
            cell["delta"] = paired_delta([a[q] for q in qs], [b[q] for q in qs])
        cells[(s, d)] = cell
    return cells


def _table(recipe, strategies: list[str], datasets: list[str], cells: dict, info: dict) -> tuple[list[str], list[list]]:
    """The comparison table's header and rows, one row per strategy."""
    header = ["strategy", "trainable params", "corrected docs", "train s"] + [
        f"{d} ({'in-domain' if d == recipe.train_dataset else 'zero-shot'}, {cells[(strategies[0], d)]['store']})"
        for d in datasets]
    md_rows = []
    for s in strategies:
        row = [s, f"{info[s]['trainable_params']:,}", f"{info[s]['corrected_docs']:,}",
               f"{info[s]['train_seconds']:.1f}"]
        for d in datasets:
            c = cells[(s, d)]
            text = f"{c['ndcg@10']:.4f}" + (f" ±{c['spread'] / 2:.4f}" if c["seeds"] > 1 else "")
            if "delta" in c:
                text += f"<br>Δ {c['delta'].format()}"
            row.append(text)
        md_rows.append(row)
    return header, md_rows


def _plots(root: Path, recipe, by: dict, info: dict, strategies: list[str], datasets: list[str],
           stores: dict) -> dict[str, float]:
    """ndcg.png, losses.png and spectrum.png under `root`; the effective rank of each strategy's vectors."""
    heads_first = {s: by[(s, datasets[0])][0]["heads"] for s in strategies if by[(s, datasets[0])][0]["heads"]}
    train_store = stores[recipe.train_dataset]
    # each strategy's documents as its encoder made them;
    # a changed encoder not scored on the training set has no spectrum here
    own_store = {s: (by[(s, recipe.train_dataset)][0]["store"] if (s, recipe.train_dataset) in by
                     else str(train_store.path) if info[s]["strategy"] not in ("full", "hybrid") else None)
                 for s in heads_first}
    spectra, ranks = _spectra(train_store, {s: (path, own_store[s]) for s, path in heads_first.items()
                                            if own_store[s] is not None})
    plot_bars(root / "ndcg.png", strategies, datasets,
              {key: [g["metrics"][HEADLINE] for g in group] for key, group in by.items()})
    curves, phases = {}, {}
    for s, path in heads_first.items():
        curves[s], phases[s] = loss_curves(Path(path) / "steps.jsonl")
    plot_losses(root / "losses.png", curves, phases)
    plot_spectra(root / "spectrum.png", spectra)
    return ranks


def _markdown(recipe, baseline: str | None, header: list[str], md_rows: list[list], ranks: dict[str, float]) -> str:
    """report.md's text: what was compared, the table, effective ranks and the plots."""
    md = [f"# {recipe.name}: strategy comparison", "",
          f"Encoder `{recipe.model}`; trained on {recipe.train_dataset}/{recipe.train_split}; evaluated on the "
          f"{recipe.eval_split} split. NDCG@10 (mean over seeds, ± half the range); Δ against `{baseline}` "
          "with a 95% paired-bootstrap interval over queries and a paired sign-flip p-value "
          "(* = interval excludes 0).", "",
          markdown_table(header, md_rows), "",
          "Effective rank of the training corpus' vectors (exp of the spectral entropy; higher = more isotropic): "
          + ", ".join(f"{n} {r:.1f}" for n, r in ranks.items()), "",
          "![NDCG@10](ndcg.png)", "", "![loss parts per step](losses.png)", "", "![eigen-spectrum](spectrum.png)", ""]
    return "\n".join(md)


def write_report(root: Path, recipe, rows: list[dict], stores: dict) -> dict:
    """results.json + report.md + plots under `root`, and the same table on screen."""
    root.mkdir(parents=True, exist_ok=True)
    strategies = list(dict.fromkeys(r["name"] for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    by = {}
    for r in rows:
        by.setdefault((r["name"], r["dataset"]), []).append(r)
    baseline = next((r["name"] for r in rows if r["strategy"] == "vanilla"), None)
    cells = _cells(by, baseline)
    info = {s: {"strategy": by[(s, datasets[0])][0]["strategy"],
                "trainable_params": by[(s, datasets[0])][0]["trainable_params"],
                "corrected_docs": by[(s, datasets[0])][0].get("corrected_docs", 0),
                "train_seconds": float(np.mean([g["train_seconds"] for g in by[(s, datasets[0])]]))}
            for s in strategies}

    header, md_rows = _table(recipe, strategies, datasets, cells, info)
    ranks = _plots(root, recipe, by, info, strategies, datasets, stores)
    atomic_write_bytes(root / "report.md", _markdown(recipe, baseline, header, md_rows, ranks).encode())
    summary = {
        "recipe": recipe, "baseline": baseline, "strategies": info, "effective_rank": ranks,
        "results": [{"name": s, "dataset": d,
                     **{k: (vars(v) if isinstance(v, PairedDelta) else v) for k, v in c.items()}}
                    for (s, d), c in cells.items()],
        "runs": rows,
    }
    atomic_write_json(root / "results.json", summary)

    print_table(f"{recipe.name}: NDCG@10 ({recipe.eval_split})", header, md_rows)
    print(f"report: {root / 'report.md'}")
    return summary


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]], file=None) -> None:
    """A rich table on a terminal; plain Markdown when the output is piped or redirected (never cut at 80 columns)."""
    file = file or sys.stdout
    if not file.isatty():
        print(f"{title}\n\n{markdown_table(header, rows)}", file=file)
        return
    table = Table(title=title, show_lines=True)
    for h in header:
        table.add_column(h, justify="left" if h == "strategy" else "right")
    for row in rows:
        table.add_row(*[str(c).replace("<br>", "\n") for c in row])
    Console(file=file).print(table)
