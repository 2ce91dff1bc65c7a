"""The strategy comparison: paired statistics over queries, a Markdown/rich table and plots.

A delta in NDCG@10 is only reported together with its 95% confidence interval (paired bootstrap
over queries) and a paired sign-flip permutation p-value, so +0.005 on 300 queries is never sold
as a win.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


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
    diff = b - a
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


def plot_bars(path: Path, strategies: Sequence[str], datasets: Sequence[str], ndcg: dict[tuple[str, str], float]) -> None:
    """NDCG@10 bars, one group per dataset, one bar per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(datasets), 3.6))
    width = 0.8 / max(len(strategies), 1)
    for i, s in enumerate(strategies):
        xs = np.arange(len(datasets)) + i * width
        ax.bar(xs, [ndcg.get((s, d), np.nan) for d in datasets], width, label=s)
    ax.set_xticks(np.arange(len(datasets)) + width * (len(strategies) - 1) / 2, datasets)
    ax.set_ylabel("NDCG@10")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(path: Path, curves: dict[str, dict[str, list[float]]]) -> None:
    """Loss parts per step, one panel per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        return
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), squeeze=False)
    for ax, (name, parts) in zip(axes[0], curves.items()):
        for part, values in parts.items():
            ax.plot(values, label=part, lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spectra(path: Path, spectra: dict[str, np.ndarray]) -> None:
    """Normalised covariance eigenvalues (log scale): flatter means more isotropic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, eig in spectra.items():
        ax.semilogy(eig / eig.sum(), label=name, lw=1)
    ax.set_ylim(bottom=1e-7)  # normalised vectors leave one ~0 eigenvalue; don't let it squash the plot
    ax.set_xlabel("component")
    ax.set_ylabel("share of variance")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


HEADLINE = "ndcg@10"


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
    import torch

    from .heads import load_heads
    from .losses import effective_rank
    from .store import open_store

    rows = np.arange(min(train_store.corpus.rows, 4000))
    spectra = {"vanilla": eigen_spectrum(train_store.corpus.vectors(np.float32, rows))}
    for name, (path, store) in heads.items():
        docs = open_store(store).corpus.vectors(np.float32, rows)
        with torch.no_grad():
            projected = load_heads(path).encode_documents(torch.from_numpy(docs)).numpy()
        spectra[name] = eigen_spectrum(projected)
    return spectra, {n: effective_rank(e) for n, e in spectra.items()}


def write_report(root: Path, recipe, rows: list[dict], stores: dict) -> dict:
    """results.json + report.md + plots under `root`, and the same table on screen."""
    from rich.console import Console
    from rich.table import Table

    from .files import atomic_write_bytes, atomic_write_json

    root.mkdir(parents=True, exist_ok=True)
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    by = {}
    for r in rows:
        by.setdefault((r["strategy"], r["dataset"]), []).append(r)
    baseline = next((r["strategy"] for r in rows if r["kind"] == "vanilla"), None)
    cells: dict[tuple[str, str], dict] = {}
    for (s, d), group in by.items():
        scores = [g["metrics"][HEADLINE] for g in group]
        cell = {"ndcg@10": float(np.mean(scores)), "spread": float(np.max(scores) - np.min(scores)), "seeds": len(group),
                "recall@100": float(np.mean([g["metrics"].get("recall@100", np.nan) for g in group])),
                "mrr@10": float(np.mean([g["metrics"].get("mrr@10", np.nan) for g in group])),
                "store": group[0]["store_source"]}
        if baseline and s != baseline:
            a = _per_query([g["per_query"] for g in by[(baseline, d)]])
            b = _per_query([g["per_query"] for g in group])
            qs = sorted(a)
            cell["delta"] = paired_delta([a[q] for q in qs], [b[q] for q in qs])
        cells[(s, d)] = cell
    info = {s: {"kind": by[(s, datasets[0])][0]["kind"],
                "trainable_params": by[(s, datasets[0])][0]["trainable_params"],
                "train_seconds": float(np.mean([g["train_seconds"] for g in by[(s, datasets[0])]]))} for s in strategies}

    header = ["strategy", "trainable params", "train s"] + [
        f"{d} ({'in-domain' if d == recipe.train_dataset else 'zero-shot'}, {cells[(strategies[0], d)]['store']})" for d in datasets]
    md_rows, screen_rows = [], []
    for s in strategies:
        row = [s, f"{info[s]['trainable_params']:,}", f"{info[s]['train_seconds']:.1f}"]
        for d in datasets:
            c = cells[(s, d)]
            text = f"{c['ndcg@10']:.4f}" + (f" ±{c['spread'] / 2:.4f}" if c["seeds"] > 1 else "")
            if "delta" in c:
                text += f"<br>Δ {c['delta'].format()}"
            row.append(text)
        md_rows.append(row)
        screen_rows.append([x.replace("<br>", "\n") for x in row])

    heads_first = {s: by[(s, datasets[0])][0]["heads"] for s in strategies if by[(s, datasets[0])][0]["heads"]}
    train_store = stores[recipe.train_dataset]
    # each strategy's documents as its encoder made them; a changed encoder not scored on the training set has no spectrum here
    own_store = {s: (by[(s, recipe.train_dataset)][0]["store"] if (s, recipe.train_dataset) in by
                     else str(train_store.path) if info[s]["kind"] not in ("full", "hybrid") else None) for s in heads_first}
    spectra, ranks = _spectra(train_store, {s: (path, own_store[s]) for s, path in heads_first.items() if own_store[s] is not None})
    plot_bars(root / "ndcg.png", strategies, datasets, {k: v["ndcg@10"] for k, v in cells.items()})
    curves = {}
    for s, path in heads_first.items():
        steps = [json.loads(line) for line in (Path(path) / "steps.jsonl").read_text().splitlines() if line.strip()]
        parts = [k for k in steps[0] if k not in ("step", "epoch", "lr", "grad_norm")] if steps else []
        curves[s] = {k: [st[k] for st in steps] for k in parts}
    plot_losses(root / "losses.png", curves)
    plot_spectra(root / "spectrum.png", spectra)

    md = [f"# {recipe.name}: strategy comparison", "",
          f"Encoder `{recipe.model}`; trained on {recipe.train_dataset}/{recipe.train_split}; evaluated on the "
          f"{recipe.eval_split} split. NDCG@10 (mean over seeds, ± half the range); Δ against `{baseline}` with a 95% "
          "paired-bootstrap interval over queries and a paired sign-flip p-value (* = interval excludes 0).", "",
          markdown_table(header, md_rows), "",
          "Effective rank of the training corpus' vectors (exp of the spectral entropy; higher = more isotropic): "
          + ", ".join(f"{n} {r:.1f}" for n, r in ranks.items()), "",
          "![NDCG@10](ndcg.png)", "", "![loss parts per step](losses.png)", "", "![eigen-spectrum](spectrum.png)", ""]
    atomic_write_bytes(root / "report.md", "\n".join(md).encode())
    summary = {
        "recipe": recipe, "baseline": baseline, "strategies": info, "effective_rank": ranks,
        "results": [{"strategy": s, "dataset": d, **{k: (vars(v) if isinstance(v, PairedDelta) else v) for k, v in c.items()}}
                    for (s, d), c in cells.items()],
        "runs": rows,
    }
    atomic_write_json(root / "results.json", summary)

    table = Table(title=f"{recipe.name}: NDCG@10 ({recipe.eval_split})", show_lines=True)
    for h in header:
        table.add_column(h, justify="left" if h == "strategy" else "right")
    for row in screen_rows:
        table.add_row(*row)
    Console().print(table)
    Console().print(f"report: {root / 'report.md'}")
    return summary
