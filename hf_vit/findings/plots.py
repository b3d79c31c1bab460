"""The figures beside findings.md: test accuracy against the training-data fraction and the learning curves (both drawn
from the runs' records alone; attention rollouts need the weights: ``python -m hf_vit.attention``).
"""

from __future__ import annotations

import os

from hf_vit.report import new_figure, plot_runs_against_epoch

from .facts import RunFacts, format_fraction
from .stats import cell_accuracy

CURVES = {"train_loss": "train loss", "train_accuracy": "train accuracy", "eval_accuracy": "validation accuracy"}


def fraction_series(cells: dict[str, list[RunFacts]]) -> dict[str, list[tuple[float, float, float]]]:
    """``{line label: [(fraction, mean test accuracy, SE across seeds)]}``: cells from scratch, one line per
    architecture on each evaluation set that holds cells at two or more training fractions."""
    scratch = [members for members in cells.values() if members[0].source is None
               and cell_accuracy(members, "test")[0] is not None]
    datasets = {m[0].data for m in scratch}
    series: dict[str, list[tuple[float, float, float]]] = {}
    for members in scratch:
        first = members[0]
        name = f"{first.family}: {first.label}" + (f", {first.data}" if len(datasets) > 1 else "")
        mean, se = cell_accuracy(members, "test")
        series.setdefault(name, []).append((first.fraction, mean, se or 0.0))
    return {name: sorted(points) for name, points in series.items() if len({f for f, _, _ in points}) > 1}


def plot_accuracy_vs_fraction(cells: dict[str, list[RunFacts]], path: str | os.PathLike):
    """Write a PNG of test accuracy against the training-data fraction, ViT and CNN lines on one axis with +-1 SE
    (across seeds) error bars (:func:`fraction_series`); returns the figure."""
    series = fraction_series(cells)
    figure = new_figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    for name, points in series.items():
        fractions, accuracies, errors = zip(*points)
        axes.errorbar(fractions, accuracies, yerr=errors, marker="o", capsize=3, label=name,
                      linestyle="-" if name.startswith("ViT") else "--")
    fractions = sorted({f for points in series.values() for f, _, _ in points})
    if fractions and max(fractions) / min(fractions) >= 5:
        axes.set_xscale("log")
    axes.set_xticks(fractions, [format_fraction(f) for f in fractions], minor=False)
    axes.minorticks_off()
    axes.set_xlabel("training-data fraction")
    axes.set_ylabel("test accuracy (error bars: 1 SE across seeds)")
    axes.grid(alpha=0.3)
    if series:
        axes.legend(fontsize=8)
    else:
        axes.text(0.5, 0.5, "no runs from scratch at two or more training fractions", ha="center", va="center",
                  transform=axes.transAxes)
    figure.savefig(path, dpi=100)
    return figure


def plot_learning_curves(cells: dict[str, list[RunFacts]], path: str | os.PathLike):
    """Write a PNG of train loss, train accuracy and validation accuracy against the epoch (:data:`CURVES`), one
    panel each and one line per cell (its first seed's run: a study of many cells stays readable); returns the
    figure."""
    return plot_runs_against_epoch({(members[0].name if len(members) == 1 else f"{cell} (seed {members[0].seed})"):
                                    members[0].history for cell, members in cells.items()}, CURVES, path)
