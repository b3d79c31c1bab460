"""The figures beside findings.md: accuracy against the training-data fraction, the learning curves, and the
attention rollouts of the ViT runs (:func:`hf_vit.attention.rollout_figure`).
"""

from __future__ import annotations

import os
from pathlib import Path

from hf_vit.errors import UserError
from hf_vit.report import new_figure, plot_runs_against_epoch

from .facts import RunFacts, best_at, format_fraction, group_by_data, scratch_runs

CURVES = {"train_loss": "train loss", "train_accuracy": "train accuracy", "eval_accuracy": "eval accuracy"}


def fraction_series(runs: list[RunFacts]) -> dict[str, list[tuple[float, float, float]]]:
    """``{line label: [(fraction, accuracy, SE)]}``: runs from scratch, one line per architecture on each evaluation
    set that holds runs at two or more training fractions; the best run at each fraction."""
    groups = {data: group for data, group in group_by_data(scratch_runs(runs)).items()
              if len({r.fraction for r in group}) > 1}
    series: dict[str, list[tuple[float, float, float]]] = {}
    for data, group in groups.items():
        for label in dict.fromkeys(r.label for r in group):
            mine = [r for r in group if r.label == label]
            name = f"{mine[0].family}: {label}" + (f", {data}" if len(groups) > 1 else "")
            series[name] = [(f, best_at(mine, f).accuracy, best_at(mine, f).se or 0.0)
                            for f in sorted({r.fraction for r in mine})]
    return series


def plot_accuracy_vs_fraction(runs: list[RunFacts], path: str | os.PathLike):
    """Write a PNG of eval accuracy against the training-data fraction, ViT and CNN lines on one axis with +-1 SE
    error bars (:func:`fraction_series`); returns the figure."""
    series = fraction_series(runs)
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
    axes.set_ylabel("eval accuracy (error bars: 1 SE)")
    axes.grid(alpha=0.3)
    if series:
        axes.legend(fontsize=8)
    else:
        axes.text(0.5, 0.5, "no runs from scratch at two or more training fractions", ha="center", va="center",
                  transform=axes.transAxes)
    figure.savefig(path, dpi=100)
    return figure


def plot_learning_curves(runs: list[RunFacts], path: str | os.PathLike):
    """Write a PNG of train loss, train accuracy and eval accuracy against the epoch (:data:`CURVES`), one panel
    each and one line per run; returns the figure."""
    return plot_runs_against_epoch({r.name: r.history for r in runs}, CURVES, path)


def attention_figures(runs: list[RunFacts], output_dir: Path) -> list[str]:
    """Markdown lines for the attention-rollout figures of the ViT runs (or why there are none)."""
    vits = [r for r in runs if r.family == "ViT"]
    if not vits:
        return ["No ViT run, so no attention rollout."]
    try:
        from hf_vit.attention import rollout_figure
    except ImportError as err:
        return [f"Attention rollout left out: `hf_vit.attention.rollout_figure` cannot be imported ({err})."]
    lines = []
    for run in vits:
        name = f"attention_{run.name}.png"
        try:
            rollout_figure(str(run.dir), images=8, output=str(output_dir / name))
        except UserError as err:
            lines.append(f"- `{run.name}`: no attention rollout ({err}).")
            continue
        lines.append(f"- `{run.name}`:\n\n  ![attention rollout of {run.name}]({name})")
    return lines
