"""Findings: the course report's tables regenerated from finished runs, each of its findings judged by the numbers.

:func:`write_findings` reads every run folder (``all_results.json``, ``train_config.yaml``, ``log_history.json``,
``config.json``) and writes ``findings.md`` with, beside it, ``accuracy_vs_fraction.png`` (ViT and CNN on one axis),
``learning_curves.png`` (train loss, train accuracy and eval accuracy per run, side by side) and, for ViT runs,
``attention_<run>.png`` (:func:`hf_vit.attention.rollout_figure`). :mod:`hf_vit.study` calls it after its runs.

Every accuracy carries its standard error from the held-out count, ``sqrt(p (1 - p) / n)`` with ``n = eval_samples``;
a difference of two runs carries ``sqrt(SE1^2 + SE2^2)``. A finding is *supported* when the difference in its
direction exceeds ``Z`` standard errors, *contradicted* when it exceeds them the other way, and *inconclusive* in
between; *not tested* when the runs hold no comparison for it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_vit.errors import UserError
from hf_vit.report import format_count, format_duration, format_epochs, load_run, new_figure, plot_runs_against_epoch

Z = 2.0
# config.json model types that are convolutional networks (the presets' and transformers' common ones).
CNN_TYPES = frozenset({"resnet", "convnext", "convnextv2", "regnet", "efficientnet", "mobilenet_v1", "mobilenet_v2",
                       "bit", "van"})
NEWLINE = "\n"  # f-string expressions cannot hold a backslash before Python 3.12
CURVES = {"train_loss": "train loss", "train_accuracy": "train accuracy", "eval_accuracy": "eval accuracy"}


@dataclass
class RunFacts:
    """What the findings need from one finished run folder."""

    name: str
    dir: Path
    family: str  # "ViT", "CNN", or the model type when it is neither
    model: str  # the architecture: its preset, or the model it started from
    data: str  # dataset and what it was scored on, e.g. "cifar10 [0.1 of train held out]"
    fraction: float
    source: str | None  # model_name_or_path: a run of the study by name, else as given
    frozen: bool
    accuracy: float | None
    eval_samples: int | None
    train_accuracy: float | None
    num_parameters: int | None
    flops_per_image: float | None
    samples_seen: float | None
    runtime: float | None
    epochs: float | None
    history: list

    @property
    def se(self) -> float | None:
        """The standard error of ``accuracy`` from the held-out count."""
        if self.accuracy is None or not self.eval_samples:
            return None
        return math.sqrt(self.accuracy * (1 - self.accuracy) / self.eval_samples)

    @property
    def training_flops(self) -> float | None:
        if self.flops_per_image is None or self.samples_seen is None:
            return None
        return self.flops_per_image * self.samples_seen

    @property
    def start(self) -> str:
        if self.source is None:
            return "scratch"
        return f"from {self.source}" + (" (frozen backbone)" if self.frozen else "")

    @property
    def label(self) -> str:
        return f"{self.model} ({format_count(self.num_parameters)})"


def _family(model_type: str | None, preset: str | None) -> str:
    model_type = model_type or ("vit" if str(preset or "").startswith("vit") else None)
    if model_type == "vit":
        return "ViT"
    if model_type in CNN_TYPES:
        return "CNN"
    return model_type or "?"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _dataset_label(name: Any, root: str | os.PathLike | None) -> str:
    """A dataset name, with a folder inside ``root`` (a study's derived datasets) shown relative to it."""
    if root is not None and isinstance(name, str) and os.path.isdir(name):
        relative = os.path.relpath(os.path.realpath(name), os.path.realpath(root))
        if not relative.startswith(".."):
            return relative
    return str(name)


def read_facts(runs: list[tuple[str, str | os.PathLike]], root: str | os.PathLike | None = None) -> list[RunFacts]:
    """``[(name, run folder)]`` of finished runs -> their :class:`RunFacts`; a run started from another run of the
    list names that run as its ``source`` and takes its architecture label. Datasets inside ``root`` are named
    relative to it."""
    loaded = [(name, load_run(folder)) for name, folder in runs]
    by_dir = {os.path.realpath(run["dir"]): name for name, run in loaded}
    facts: dict[str, RunFacts] = {}
    for name, run in loaded:
        config, results = run["config"], run["results"]
        source = config.get("model_name_or_path")
        if source:
            source = by_dir.get(os.path.realpath(source), str(source))
        preset = config.get("model_preset")
        model = preset or (facts[source].model if source in facts else os.path.basename(str(source or "")) or
                           run["model_type"] or "?")
        eval_split = config.get("eval_split")
        held_out = f"[{eval_split}]" if eval_split else f"[{config.get('train_val_split', '?')} of train held out]"
        samples = _number(results.get("eval_samples"))
        facts[name] = RunFacts(
            name=name, dir=Path(run["dir"]), family=_family(run["model_type"], preset), model=str(model),
            data=f"{_dataset_label(config.get('dataset_name', '?'), root)} {held_out}",
            fraction=float(config.get("train_fraction") or 1.0), source=source or None,
            frozen=bool(config.get("freeze_backbone")), accuracy=_number(results.get("eval_accuracy")),
            eval_samples=int(samples) if samples else None, train_accuracy=_number(results.get("train_accuracy")),
            num_parameters=run["num_parameters"], flops_per_image=_number(results.get("training_flops_per_image")),
            samples_seen=_number(results.get("train_samples_seen")), runtime=_number(results.get("train_runtime")),
            epochs=_number(results.get("epoch")), history=run["history"])
    return list(facts.values())


# --------------------------------------------------------------------------------------------------- judging
def verdict(difference: float, se: float | None) -> str:
    """``supported`` / ``contradicted`` / ``inconclusive`` for a difference oriented so that positive supports."""
    if se is None:
        return "inconclusive (no eval_samples to size the error)"
    if difference > Z * se:
        return "supported"
    if difference < -Z * se:
        return "contradicted"
    return "inconclusive"


def format_difference(difference: float, se: float | None) -> str:
    """``+7.21 ± 0.92 points (+7.8 SE)`` for accuracies given as fractions."""
    points = f"{100 * difference:+.2f}"
    if se is None:
        return f"{points} points"
    return f"{points} ± {100 * se:.2f} points" + (f" ({difference / se:+.1f} SE)" if se > 0 else "")


@dataclass
class Comparison:
    """One difference in a finding's direction (positive supports it), its standard error and what it compares."""

    difference: float
    se: float | None
    text: str

    @property
    def verdict(self) -> str:
        return verdict(self.difference, self.se)


def combine(comparisons: list[Comparison]) -> str:
    """One verdict for a finding: the common verdict of its comparisons, or ``mixed`` with the counts."""
    if not comparisons:
        return "not tested"
    verdicts = [c.verdict for c in comparisons]
    if len(set(verdicts)) == 1:
        return verdicts[0]
    return "mixed (" + ", ".join(f"{verdicts.count(v)} {v}" for v in dict.fromkeys(verdicts)) + ")"


def _se_sum(*errors: float | None) -> float | None:
    return None if any(e is None for e in errors) else math.sqrt(sum(e * e for e in errors))


def _acc(run: RunFacts) -> str:
    if run.accuracy is None:
        return "-"
    return f"{100 * run.accuracy:.2f}" + (f" ± {100 * run.se:.2f}" if run.se is not None else "")


def _fraction(value: float) -> str:
    return f"{100 * value:.4g}%"


def _groups(runs: list[RunFacts]) -> dict[str, list[RunFacts]]:
    groups: dict[str, list[RunFacts]] = {}
    for run in runs:
        groups.setdefault(run.data, []).append(run)
    return groups


def _family_model(runs: list[RunFacts], family: str) -> list[RunFacts]:
    """The runs of one model of ``family``: the one with the most runs (ties: the best at its largest fraction)."""
    models: dict[str, list[RunFacts]] = {}
    for run in runs:
        if run.family == family:
            models.setdefault(run.label, []).append(run)
    if not models:
        return []

    def rank(item):
        largest = max(item[1], key=lambda r: (r.fraction, r.accuracy))
        return len(item[1]), largest.fraction, largest.accuracy
    return max(models.items(), key=rank)[1]


def _best_at(runs: list[RunFacts], fraction: float) -> RunFacts:
    return max((r for r in runs if r.fraction == fraction), key=lambda r: r.accuracy)


def _scratch(runs: list[RunFacts]) -> list[RunFacts]:
    return [r for r in runs if r.source is None and r.accuracy is not None]


def cnn_vs_vit(runs: list[RunFacts]) -> list[Comparison]:
    """Finding 1: per evaluation set, CNN minus ViT from scratch at the largest training fraction both have."""
    comparisons = []
    for data, group in _groups(_scratch(runs)).items():
        vits, cnns = _family_model(group, "ViT"), _family_model(group, "CNN")
        shared = {r.fraction for r in vits} & {r.fraction for r in cnns}
        if not shared:
            continue
        vit, cnn = _best_at(vits, max(shared)), _best_at(cnns, max(shared))
        compute = ""
        if vit.training_flops and cnn.training_flops:
            compute = f" The CNN used {cnn.training_flops / vit.training_flops:.2f}x the ViT's training compute"
            if vit.runtime and cnn.runtime:
                compute += f" and {cnn.runtime / vit.runtime:.2f}x its training time"
            compute += "."
        difference, se = cnn.accuracy - vit.accuracy, _se_sum(cnn.se, vit.se)
        comparisons.append(Comparison(difference, se, (
            f"on {data} at {_fraction(max(shared))} of the training data, {cnn.label} (`{cnn.name}`) reaches "
            f"{_acc(cnn)}% and {vit.label} (`{vit.name}`) {_acc(vit)}%: CNN - ViT = "
            f"{format_difference(difference, se)}.{compute}")))
    return comparisons


def data_dependence(runs: list[RunFacts]) -> list[Comparison]:
    """Finding 2: per evaluation set, how much more the ViT gains than the CNN from the smallest to the largest
    training fraction both have (equivalently, how much the CNN's lead shrinks)."""
    comparisons = []
    for data, group in _groups(_scratch(runs)).items():
        vits, cnns = _family_model(group, "ViT"), _family_model(group, "CNN")
        shared = sorted({r.fraction for r in vits} & {r.fraction for r in cnns})
        if len(shared) < 2:
            continue
        low, high = shared[0], shared[-1]
        v_low, v_high, c_low, c_high = (_best_at(vits, low), _best_at(vits, high), _best_at(cnns, low),
                                        _best_at(cnns, high))
        gain = (v_high.accuracy - v_low.accuracy) - (c_high.accuracy - c_low.accuracy)
        se = _se_sum(v_low.se, v_high.se, c_low.se, c_high.se)
        leads = ", ".join(f"{100 * (_best_at(cnns, f).accuracy - _best_at(vits, f).accuracy):+.2f} at {_fraction(f)}"
                          for f in shared)
        comparisons.append(Comparison(gain, se, (
            f"on {data}, from {_fraction(low)} to {_fraction(high)} of the training data {vits[0].label} gains "
            f"{100 * (v_high.accuracy - v_low.accuracy):+.2f} points and {cnns[0].label} "
            f"{100 * (c_high.accuracy - c_low.accuracy):+.2f}: the ViT gains {format_difference(gain, se)} more. "
            f"The CNN's lead (points): {leads}.")))
    return comparisons


def pretraining_pairs(runs: list[RunFacts]) -> list[tuple[RunFacts, RunFacts | None]]:
    """Each run started from a checkpoint, with the run from scratch it is compared with (None when there is none):
    the same evaluation set, training fraction and parameter count."""
    pairs = []
    for run in runs:
        if run.source is None or run.accuracy is None:
            continue
        match = [s for s in _scratch(runs) if (s.data, s.fraction, s.num_parameters) ==
                 (run.data, run.fraction, run.num_parameters)]
        pairs.append((run, max(match, key=lambda s: s.accuracy) if match else None))
    return pairs


def pretraining_gain(runs: list[RunFacts]) -> list[Comparison]:
    """Finding 3: fully fine-tuned minus from scratch, for every pair."""
    comparisons = []
    for tuned, scratch in pretraining_pairs(runs):
        if scratch is None or tuned.frozen:
            continue
        difference, se = tuned.accuracy - scratch.accuracy, _se_sum(tuned.se, scratch.se)
        comparisons.append(Comparison(difference, se, (
            f"on {tuned.data}, {tuned.label} fine-tuned {tuned.start} (`{tuned.name}`) reaches {_acc(tuned)}% "
            f"and from scratch (`{scratch.name}`) {_acc(scratch)}%: gain {format_difference(difference, se)}.")))
    return comparisons


def generalisation_gap(runs: list[RunFacts]) -> tuple[list[Comparison], str]:
    """Finding 4: train minus eval accuracy, for the pretraining runs (the runs others start from) when the study
    has any, else for every ViT run; returns the comparisons and which runs they cover."""
    sources = {r.source for r in runs}
    chosen, which = [r for r in runs if r.name in sources], "the pretraining runs"
    if not chosen:
        chosen, which = [r for r in runs if r.family == "ViT"], "the ViT runs"
    comparisons = []
    for run in chosen:
        if run.train_accuracy is None or run.accuracy is None:
            continue
        difference = run.train_accuracy - run.accuracy
        comparisons.append(Comparison(difference, run.se, (
            f"`{run.name}`: train {100 * run.train_accuracy:.2f}%, eval {_acc(run)}%: gap "
            f"{format_difference(difference, run.se)}.")))
    return comparisons, which


FINDINGS = (
    ("From scratch, a CNN beats a ViT on the same small dataset",
     ("ResNet-50-class CNNs reach 93-95% on CIFAR-10 where ViT-B/16 reaches 85%: a CNN's inductive bias wins on "
      "small data"), "a ViT and a CNN trained from scratch on the same data"),
    ("A ViT depends more on data than a CNN: the CNN's lead shrinks as the training data grows",
     "ViT needs much more data than a CNN; the gap closes as data grows",
     "a ViT and a CNN from scratch at two or more shared training fractions"),
    ("Pretraining lifts the ViT", "ViT-B/16 from 85% (scratch) to 95% (pretrained on ImageNet, fine-tuned)",
     "a fine-tuned run and a scratch run of the same architecture on the same data"),
    ("Train accuracy well above validation accuracy shows a generalisation gap",
     "84% train vs 56% validation accuracy in pretraining", "runs that record train_accuracy"),
)


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
    rows = [[f"`{r.name}`", r.model, r.family, r.start, r.data, _fraction(r.fraction), format_epochs(r.epochs),
             _acc(r), "-" if r.train_accuracy is None else f"{100 * r.train_accuracy:.2f}",
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
    return _table(["family", "model", "start", "data", *map(_fraction, fractions)],
                  [[*key, *(_acc(cells[f]) if f in cells else "-" for f in fractions)] for key, cells in rows.items()])


def pretraining_table(runs: list[RunFacts]) -> str:
    rows = []
    for tuned, scratch in pretraining_pairs(runs):
        if scratch is None:
            rows.append([tuned.data, tuned.label, "-", f"`{tuned.name}` {tuned.start}: {_acc(tuned)}", "-", "-"])
            continue
        difference, se = tuned.accuracy - scratch.accuracy, _se_sum(tuned.se, scratch.se)
        rows.append([f"{tuned.data}, {_fraction(tuned.fraction)}", tuned.label, f"`{scratch.name}`: {_acc(scratch)}",
                     f"`{tuned.name}` {tuned.start}: {_acc(tuned)}", format_difference(difference, se),
                     verdict(difference, se)])
    return _table(["data", "model", "from scratch %", "pretrained %", "gain", "verdict"], rows)


def gap_table(runs: list[RunFacts]) -> str:
    rows = []
    for r in runs:
        if r.train_accuracy is None or r.accuracy is None:
            continue
        difference = r.train_accuracy - r.accuracy
        rows.append([f"`{r.name}`", f"{100 * r.train_accuracy:.2f}", _acc(r), format_difference(difference, r.se),
                     verdict(difference, r.se)])
    return _table(["run", "train accuracy %", "eval accuracy % ± SE", "train - eval", "train above eval?"], rows)


# --------------------------------------------------------------------------------------------------- plots
def fraction_series(runs: list[RunFacts]) -> dict[str, list[tuple[float, float, float]]]:
    """``{line label: [(fraction, accuracy, SE)]}``: runs from scratch, one line per architecture on each evaluation
    set that holds runs at two or more training fractions; the best run at each fraction."""
    groups = {data: group for data, group in _groups(_scratch(runs)).items()
              if len({r.fraction for r in group}) > 1}
    series: dict[str, list[tuple[float, float, float]]] = {}
    for data, group in groups.items():
        for label in dict.fromkeys(r.label for r in group):
            mine = [r for r in group if r.label == label]
            name = f"{mine[0].family}: {label}" + (f", {data}" if len(groups) > 1 else "")
            series[name] = [(f, _best_at(mine, f).accuracy, _best_at(mine, f).se or 0.0)
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
    axes.set_xticks(fractions, [_fraction(f) for f in fractions], minor=False)
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


def _attention_figures(runs: list[RunFacts], output_dir: Path) -> list[str]:
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
    plot_runs_against_epoch({r.name: r.history for r in facts}, CURVES, output_dir / "learning_curves.png")

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

{NEWLINE.join(_attention_figures(facts, output_dir))}
"""
    if commands:
        text += "\n## How each run was made\n\n" + "\n".join(
            f"- `{name}`: `{command}`" for name, command in commands.items()) + "\n"
    path = output_dir / "findings.md"
    partial = output_dir / "findings.md.partial"
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    return path
