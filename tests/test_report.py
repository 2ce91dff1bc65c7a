"""The report's plots and terminal table: loss values readable, spectra told apart, seeds shown, Markdown when piped."""

from __future__ import annotations

import io
import json

import matplotlib
import numpy as np
import pytest

from jepa_cache import report


@pytest.fixture
def figure(monkeypatch):
    """The last figure a plot function drew (kept open instead of closed)."""
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    plt.close("all")
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    yield lambda: plt.gcf()
    plt.close("all")


def _numbers(labels) -> list[float]:
    return [float(t.get_text().replace("−", "-")) for t in labels if t.get_text()]


def test_loss_panels_keep_numeric_ticks_with_a_refit_phase(tmp_path, figure):
    steps = [{"step": i, "epoch": i // 5, "lr": 1e-3, "loss": 2.0 - i / 20, "contrastive": 1.5 - i / 30, "isotropy": 0.1,
              "phase": "fit" if i < 10 else "refit"} for i in range(20)]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    curves, phases = report.loss_curves(tmp_path / "steps.jsonl")
    assert set(curves) == {"loss", "contrastive", "isotropy"} and phases == ["fit"] * 10 + ["refit"] * 10
    report.plot_losses(tmp_path / "losses.png", {"best": curves}, {"best": phases})
    ax = figure().axes[0]
    ax.figure.canvas.draw()
    ticks = _numbers(ax.get_yticklabels())
    assert len(ticks) >= 3 and min(ticks) <= 0.5 and max(ticks) >= 1.5  # the loss values, not "fit" / "refit"
    assert {t.get_text() for t in ax.texts} == {"fit", "refit"}


def test_spectrum_separates_near_identical_strategies(tmp_path, figure):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 32)) * np.linspace(3, 0.2, 32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    spectra = {"vanilla": report.eigen_spectrum(x), "frozen-isotropy": report.eigen_spectrum(x @ (np.eye(32) + 0.02 * rng.standard_normal((32, 32))))}
    report.plot_spectra(tmp_path / "spectrum.png", spectra)
    left, right = figure().axes
    assert left.get_ylim()[1] <= 1.0  # a share of variance never exceeds 1
    ratio = next(line for line in right.lines if line.get_label() == "frozen-isotropy").get_ydata()
    assert np.abs(np.log(ratio)).max() > 0.01  # the difference vanilla vs frozen-isotropy is visible here
    assert any("eff. rank" in t.get_text() for t in left.get_legend().get_texts())


def test_ndcg_bars_show_every_seed(tmp_path, figure):
    scores = {("vanilla", "d"): [0.6], ("best", "d"): [0.70, 0.72, 0.75]}
    report.plot_bars(tmp_path / "ndcg.png", ["vanilla", "best"], ["d"], scores)
    ax = figure().axes[0]
    from matplotlib.collections import PathCollection

    dots = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections if isinstance(c, PathCollection)])
    assert sorted(np.round(dots, 4)) == [0.70, 0.72, 0.75]


def test_table_is_markdown_when_piped():
    out = io.StringIO()  # not a terminal
    long = "0.7457 ±0.0016<br>Δ +0.0900 [+0.0642, +0.1168] p=0.000*"
    report.print_table("study", ["strategy", "scifact (in-domain, imported)", "nfcorpus (zero-shot, imported)"], [["best", long, long]], file=out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "study" and lines[2] == "| strategy | scifact (in-domain, imported) | nfcorpus (zero-shot, imported) |"
    assert lines[4] == f"| best | {long} | {long} |"  # whole, not cut at 80 columns


def test_an_unchanged_run_is_no_significant_difference():
    """Means over seeds of equal per-query scores can differ in the last bit: Δ 0 and no star."""
    a = np.random.default_rng(0).random(300)
    b = (a + a + a) / 3  # the mean of three seeds that all scored the same
    d = report.paired_delta(a, b)
    assert d.delta == 0 and not d.significant and d.p_value == 1.0
    moved = report.paired_delta(a, a + 0.01)
    assert moved.significant and moved.low > 0
