"""findings.md: the study's designs judged by its runs, the tables, and the document around them.

:func:`write_findings` reads a study folder (or a folder of committed run records: the same files) and writes
``findings.md`` with, beside it, ``accuracy_vs_fraction.png`` (each cell's mean with its seed SE, ViT and CNN on one
axis) and ``learning_curves.png`` (train loss, train accuracy and validation accuracy per run). findings.md is a pure
function of the records: regenerating it from the same records gives the same bytes.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from hf_vit import durable
from hf_vit.errors import UserError
from hf_vit.report import format_count, format_duration, format_epochs

from .designs import Design, parse_designs
from .facts import RunFacts, format_fraction, read_facts
from .plots import plot_accuracy_vs_fraction, plot_learning_curves
from .stats import (BOOTSTRAP_RESAMPLES, CONFIDENCE, LAST_PART, RISE_POINTS, cell_accuracy, cells_of, converged,
                    last_part_rise)
from .verdicts import combine, judge

STUDY_RECORD = "study.json"  # what the study states about itself: designs, cells, commands (written before any run)

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


def _percent(value: float | None, se: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}" + (f" ± {100 * se:.2f}" if se is not None else "")


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def cells_table(cells: dict[str, list[RunFacts]]) -> str:
    rows = []
    for cell, members in cells.items():
        first = members[0]
        test, test_se = cell_accuracy(members, "test")
        train_eval, _ = cell_accuracy(members, "train_eval")
        rise = last_part_rise(members)
        rows.append([
            f"`{cell}`", first.family, first.label, first.start, first.data, format_fraction(first.fraction),
            ", ".join(str(r.seed) for r in members), _percent(test, test_se),
            " / ".join(_percent(r.accuracy("test")) for r in members), _percent(train_eval),
            "-" if rise is None else f"{rise:+.2f}" + ("" if converged(members) else " (rising)"),
            format_epochs(_mean(r.results.get("epoch") for r in members)),
            format_flops(_mean(r.training_flops for r in members)),
            format_duration(_mean(r.results.get("train_runtime") for r in members))])
    return _table(["cell", "family", "model", "start", "data", "train fraction", "seeds",
                   "test accuracy % (mean ± SE across seeds)", "per seed", "train-subset accuracy %",
                   f"validation rise over the last {100 * LAST_PART:g}% (points)", "epochs", "training compute",
                   "train time (mean)"], rows)


def fraction_table(cells: dict[str, list[RunFacts]]) -> str:
    """Test accuracy (mean ± SE across seeds) per model and training fraction, runs from scratch."""
    fractions = sorted({m[0].fraction for m in cells.values() if m[0].source is None})
    rows: dict[tuple, dict[float, str]] = {}
    for members in cells.values():
        first = members[0]
        if first.source is not None:
            continue
        rows.setdefault((first.family, first.label, first.data), {})[first.fraction] = _percent(
            *cell_accuracy(members, "test"))
    return _table(["family", "model", "data", *map(format_fraction, fractions)],
                  [[*key, *(found.get(f, "-") for f in fractions)] for key, found in rows.items()])


def runs_table(runs: list[RunFacts]) -> str:
    rows = []
    for r in runs:
        history = [h for h in r.history if isinstance(h, dict) and "eval_accuracy" in h]
        rows.append([f"`{r.name}`", f"`{r.cell}`", "-" if r.seed is None else str(r.seed),
                     _percent(r.accuracy("test")), _percent(r.accuracy("train_eval")),
                     _percent(history[-1]["eval_accuracy"] if history else None),
                     str(r.results.get("global_step", "-")), format_epochs(r.results.get("epoch")),
                     format_count(r.num_parameters), format_flops(r.training_flops),
                     format_duration(r.results.get("train_runtime"))])
    return _table(["run", "cell", "seed", "test accuracy %", "train-subset accuracy %", "final validation accuracy %",
                   "steps", "epochs", "params", "training compute", "train time"], rows)


def sets_table(runs: list[RunFacts]) -> str:
    """Which images each run was scored on: one row per scored set (fingerprint)."""
    sets: dict[tuple[str, str], list[str]] = {}
    sizes = {}
    for r in runs:
        for name, scored in r.scored.items():
            sets.setdefault((name, scored.fingerprint), []).append(r.name)
            sizes[(name, scored.fingerprint)] = len(scored.correct)
    rows = [[name, f"`{fingerprint[:16]}`", f"{sizes[(name, fingerprint)]:,}",
             f"all {len(members)} runs" if len(members) == len(runs) else ", ".join(f"`{m}`" for m in members)]
            for (name, fingerprint), members in sets.items()]
    return _table(["set", "fingerprint (SHA-256 of its sorted key/label rows)", "images", "scored runs"], rows)


def _design_text(number: int, design: Design, cells: dict[str, list[RunFacts]]) -> str:
    comparisons = judge(design, cells)
    regime = [f"fewer than {design.seeds} seeds in a cell"]
    if design.converged:
        regime.append("a cell whose validation accuracy still rose more than "
                      f"{RISE_POINTS:g} point over its last {100 * LAST_PART:g}% of steps")
    metric = {"difference": f"{design.metric} accuracy of the first cell minus the second (points)",
              "slope": f"least-squares slope of the pairs' {design.metric}-accuracy differences against log2 of the "
                       "training fraction (points per doubling of the training data)",
              "gap": f"accuracy of the final weights, in eval mode, on a fixed un-augmented subset of the cell's own "
                     f"training images minus its {design.metric} accuracy (points)"}[design.kind]
    lines = [f"### {number}. {design.title}: **{combine(comparisons)}**", "",
             f"- Report: {design.report}.", f"- Hypothesis: {design.hypothesis}",
             f"- Metric: {metric}. Supported when the whole {100 * CONFIDENCE:g}% interval lies above "
             f"{design.min_effect:+g}, contradicted when it lies below, else inconclusive.",
             f"- Not tested in this regime when: {'; or '.join(regime)}.", ""]
    lines += [f"- {c.line()}" for c in comparisons]
    return "\n".join(lines)


def read_study_record(folder: Path) -> dict:
    path = folder / STUDY_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder} has no {STUDY_RECORD}; pass the output folder of `python -m hf_vit.study` (or "
                        "a folder of its exported records)") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path} cannot be read as JSON ({err})") from None
    if not isinstance(record, dict) or not isinstance(record.get("runs"), list):
        raise UserError(f"{path} is not a study record (no runs list)")
    return record


# --------------------------------------------------------------------------------------------------- findings.md
def write_findings(runs_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> Path:
    """Judge a study folder's designs by its finished runs and write ``findings.md`` and its PNGs into
    ``output_dir`` (default: ``runs_dir``); returns the path of findings.md.

    ``runs_dir`` holds ``study.json`` (written by the study) and one folder per run, either the run itself or its
    record (:data:`hf_vit.findings.records.RECORD_FILES`); a run without ``all_results.json`` is not finished and left
    out, and said so."""
    runs_dir = Path(runs_dir)
    output_dir = Path(output_dir) if output_dir is not None else runs_dir
    record = read_study_record(runs_dir)
    entries = [r for r in record["runs"] if isinstance(r, dict) and isinstance(r.get("name"), str)]
    done = [e for e in entries if (runs_dir / e["name"] / "all_results.json").is_file()]
    facts = read_facts([(e["name"], runs_dir / e["name"]) for e in done],
                       cells={e["name"]: (e.get("cell") or e["name"], e.get("seed")) for e in done})
    cells = cells_of(facts)
    designs = parse_designs(record.get("findings"), sorted(set(cells) | {f.name for f in facts}),
                            str(runs_dir / STUDY_RECORD)) if done else []
    with durable.os_errors(output_dir):  # a full disk or a refused folder: one line
        output_dir.mkdir(parents=True, exist_ok=True)
        plot_accuracy_vs_fraction(cells, output_dir / "accuracy_vs_fraction.png")
        plot_learning_curves(cells, output_dir / "learning_curves.png")
    missing = [e["name"] for e in entries if e not in done]
    description = record.get("description") or ""
    findings = [_design_text(n, d, cells) for n, d in enumerate(designs, 1)] or [
        "The study states no designs (`findings:`), so nothing is judged."]
    text = f"""# Findings: {record.get("title") or runs_dir.name}

{description + NEWLINE + NEWLINE if description else ""}{len(facts)} finished runs in {len(cells)} cells, from \
`{record.get("study_path", "?")}`{f"; not finished: {', '.join(missing)}" if missing else ""}. Every number below is
computed from the runs' records (`all_results.json`, `log_history.json`, `train_config.yaml`, `predictions_*.csv`)
by `python -m hf_vit.findings DIR`, which regenerates this file exactly.

## How the findings are judged

- A **cell** is the runs that differ only by their training seed. Its accuracy is the mean over its seeds, with the
  standard error across seeds; no maximum over runs is taken.
- Every run of a study is scored on the same images: the held-out splits are fixed before training (split seed,
  per-class cuts), and each run records the fingerprint of every set it was scored on (below). The designs judge
  **test** accuracy, from the final weights on a split that nothing during training looked at; the learning curves
  and the convergence rule use the **validation** split, which the findings never score.
- Each finding's quantity is a contrast of cell accuracies. Its uncertainty combines the SE across seeds (the
  contrast computed seed by seed) and a **paired bootstrap** over the scored images ({BOOTSTRAP_RESAMPLES:,}
  resamples, seed fixed): images are resampled together for every cell scored on them, so shared easy and hard
  images cancel. The {100 * CONFIDENCE:g}% interval is the estimate ± Student's t x sqrt(SE_seeds^2 + SE_images^2), with
  Welch-Satterthwaite's degrees of freedom (seeds - 1 when the seed spread dominates).
- **Convergence rule**: a cell whose seed-mean validation accuracy rose more than {RISE_POINTS:g} point over the
  last {100 * LAST_PART:g}% of its steps was still improving when it stopped.
- The designs, hypotheses, thresholds and regime rules below were written in the study file before its runs.

## The report's findings, checked

{(NEWLINE + NEWLINE).join(findings)}

## Cells

{cells_table(cells)}

## Test accuracy per model and training fraction (from scratch)

Mean ± SE across seeds, in %.

{fraction_table(cells)}

![test accuracy against training fraction](accuracy_vs_fraction.png)

## Scored sets

{sets_table(facts)}

## Runs

Train-subset accuracy: the final weights in eval mode, without augmentation, on a fixed subset of the run's own
training images. Final validation accuracy: the last point of the run's learning curve.

{runs_table(facts)}

## Learning curves

![train loss, train accuracy and validation accuracy per cell (its first seed)](learning_curves.png)
"""
    commands = {e["name"]: e["command"] for e in done if e.get("command")}
    if commands:
        text += "\n## How each run was made\n\n" + "\n".join(
            f"- `{name}`: `{command}`" for name, command in commands.items()) + "\n"
    return durable.write_text(output_dir / "findings.md", text)
