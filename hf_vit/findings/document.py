"""findings.md: the course report's tables regenerated from finished runs, and the document around them.

:func:`write_findings` writes ``findings.md`` with, beside it, ``accuracy_vs_fraction.png`` (ViT and CNN on one axis),
``learning_curves.png`` (train loss, train accuracy and eval accuracy per run, side by side) and, for ViT runs,
``attention_<run>.png`` (:mod:`hf_vit.findings.plots`).
"""

from __future__ import annotations

import os
from pathlib import Path

from hf_vit import durable
from hf_vit.report import format_count, format_duration, format_epochs

from .facts import RunFacts, format_accuracy, format_fraction, read_facts
from .plots import attention_figures, plot_accuracy_vs_fraction, plot_learning_curves
from .verdicts import (FINDINGS, Z, cnn_vs_vit, combine, combined_se, data_dependence, format_difference,
                       generalisation_gap, pretraining_gain, pretraining_pairs, verdict)

NEWLINE = "\n"  # f-string expressions cannot hold a backslash before Python 3.12


# --------------------------------------------------------------------------------------------------- tables
def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def format_flops(flops: float | None) -> str:
    """``12.3 TFLOP``: the largest unit (GFLOP to EFLOP) that keeps the number at or above 1."""
    if flops is None:
        return "-"
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops / 1e9:.3g} GFLOP"


def runs_table(runs: list[RunFacts]) -> str:
    rows = [[f"`{r.name}`", r.model, r.family, r.start, r.data, format_fraction(r.fraction),
             format_epochs(r.epochs), format_accuracy(r),
             "-" if r.train_accuracy is None else f"{100 * r.train_accuracy:.2f}",
             format_count(r.num_parameters),
             "-" if r.flops_per_image is None else f"{r.flops_per_image / 1e9:.3g}", format_flops(r.training_flops),
             format_duration(r.runtime)] for r in runs]
    return _table(["run", "model", "family", "start", "data", "train fraction", "epochs", "eval accuracy % ± SE",
                   "train accuracy %", "params", "training GFLOP / image", "training compute", "train time"], rows)


def fraction_table(runs: list[RunFacts]) -> str:
    fractions = sorted({r.fraction for r in runs})
    rows: dict[tuple, dict[float, RunFacts]] = {}
    for r in runs:
        rows.setdefault((r.family, r.label, r.start, r.data), {})[r.fraction] = r
    return _table(["family", "model", "start", "data", *map(format_fraction, fractions)],
                  [[*key, *(format_accuracy(cells[f]) if f in cells else "-" for f in fractions)]
                   for key, cells in rows.items()])


def pretraining_table(runs: list[RunFacts]) -> str:
    rows = []
    for tuned, scratch in pretraining_pairs(runs):
        if scratch is None:
            rows.append([tuned.data, tuned.label, "-", f"`{tuned.name}` {tuned.start}: {format_accuracy(tuned)}",
                         "-", "-"])
            continue
        difference, se = tuned.accuracy - scratch.accuracy, combined_se(tuned.se, scratch.se)
        rows.append([f"{tuned.data}, {format_fraction(tuned.fraction)}", tuned.label,
                     f"`{scratch.name}`: {format_accuracy(scratch)}",
                     f"`{tuned.name}` {tuned.start}: {format_accuracy(tuned)}", format_difference(difference, se),
                     verdict(difference, se)])
    return _table(["data", "model", "from scratch %", "pretrained %", "gain", "verdict"], rows)


def gap_table(runs: list[RunFacts]) -> str:
    rows = []
    for r in runs:
        if r.train_accuracy is None or r.accuracy is None:
            continue
        difference = r.train_accuracy - r.accuracy
        rows.append([f"`{r.name}`", f"{100 * r.train_accuracy:.2f}", format_accuracy(r),
                     format_difference(difference, r.se), verdict(difference, r.se)])
    return _table(["run", "train accuracy %", "eval accuracy % ± SE", "train - eval", "train above eval?"], rows)


# --------------------------------------------------------------------------------------------------- findings.md
def write_findings(runs: list[tuple[str, str | os.PathLike]], output_dir: str | os.PathLike, title: str = "study",
                   description: str = "", study_path: str | None = None,
                   commands: dict[str, str] | None = None) -> Path:
    """Write ``output_dir/findings.md`` and its PNGs for ``runs`` (``[(name, finished run folder)]``); returns the
    path of findings.md. ``commands`` (``{name: command line}``) are listed at the end, so a reader can redo a run."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    facts = read_facts(runs, root=output_dir)
    plot_accuracy_vs_fraction(facts, output_dir / "accuracy_vs_fraction.png")
    plot_learning_curves(facts, output_dir / "learning_curves.png")

    judged = [cnn_vs_vit(facts), data_dependence(facts), pretraining_gain(facts)]
    gap_comparisons, gap_runs = generalisation_gap(facts)
    judged.append(gap_comparisons)
    findings = []
    for number, ((claim, report, needs), comparisons) in enumerate(zip(FINDINGS, judged), 1):
        verdict = combine(comparisons)
        body = [f"{number}. **{claim}** (report: {report}). Verdict: **{verdict}**."]
        if number == 4 and comparisons:
            body.append(f"   Judged on {gap_runs}.")
        body += [f"   - {c.verdict}: {c.text}" for c in comparisons]
        if not comparisons:
            body.append(f"   These runs hold no comparison for it (it needs {needs}).")
        findings.append("\n".join(body))

    source = f" from `{study_path}`" if study_path else ""
    intro = f"{description}\n\n" if description else ""
    text = f"""# Findings: {title}

{intro}{len(facts)} runs{source}, every number read from the runs' own
`all_results.json` (eval accuracy on `eval_samples` held-out images). Standard errors: `sqrt(p (1 - p) / n)` with
`n = eval_samples`; a difference carries `sqrt(SE1^2 + SE2^2)`, which overstates its error when both runs were scored
on the same images (their errors are then correlated), so the verdicts are on the cautious side. A finding is
**supported** when the difference in its direction exceeds {Z:g} SE, **contradicted** when it exceeds {Z:g} SE the
other way, **inconclusive** in between.

## The report's findings, checked

{NEWLINE.join(findings)}

## Accuracy per model and training-data fraction

Eval accuracy % ± SE.

{fraction_table(facts)}

![eval accuracy against training-data fraction](accuracy_vs_fraction.png)

## Runs

Epochs are those actually run. Training compute = training FLOPs per image x images seen; train time is what the run
recorded (for a resumed run, its last session). Train accuracy is the trainer's: the mean over its last logging
window of training batches (augmented, while the weights still move), not the final model on a fixed set; it
carries no SE here.

{runs_table(facts)}

## Scratch vs pretrained

{pretraining_table(facts)}

## Train vs validation accuracy

The gap's SE is the eval accuracy's (the train accuracy averages over many more images).

{gap_table(facts)}

## Learning curves

![train loss, train accuracy and eval accuracy per run](learning_curves.png)

## Attention rollout

{NEWLINE.join(attention_figures(facts, output_dir))}
"""
    if commands:
        text += "\n## How each run was made\n\n" + "\n".join(
            f"- `{name}`: `{command}`" for name, command in commands.items()) + "\n"
    return durable.write_text(output_dir / "findings.md", text)
