"""The report's four findings, each judged by the numbers of the runs.

Every accuracy carries its standard error from the held-out count, ``sqrt(p (1 - p) / n)`` with ``n = eval_samples``;
a difference of two runs carries ``sqrt(SE1^2 + SE2^2)``. A finding is *supported* when the difference in its
direction exceeds ``Z`` standard errors, *contradicted* when it exceeds them the other way, and *inconclusive* in
between; *not tested* when the runs hold no comparison for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .facts import RunFacts, best_at, format_accuracy, format_fraction, group_by_data, scratch_runs

Z = 2.0


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


def combined_se(*errors: float | None) -> float | None:
    """The standard error of a sum or difference of independent estimates (None if any error is unknown)."""
    return None if any(e is None for e in errors) else math.sqrt(sum(e * e for e in errors))


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


def cnn_vs_vit(runs: list[RunFacts]) -> list[Comparison]:
    """Finding 1: per evaluation set, CNN minus ViT from scratch at the largest training fraction both have."""
    comparisons = []
    for data, group in group_by_data(scratch_runs(runs)).items():
        vits, cnns = _family_model(group, "ViT"), _family_model(group, "CNN")
        shared = {r.fraction for r in vits} & {r.fraction for r in cnns}
        if not shared:
            continue
        vit, cnn = best_at(vits, max(shared)), best_at(cnns, max(shared))
        compute = ""
        if vit.training_flops and cnn.training_flops:
            compute = f" The CNN used {cnn.training_flops / vit.training_flops:.2f}x the ViT's training compute"
            if vit.runtime and cnn.runtime:
                compute += f" and {cnn.runtime / vit.runtime:.2f}x its training time"
            compute += "."
        difference, se = cnn.accuracy - vit.accuracy, combined_se(cnn.se, vit.se)
        comparisons.append(Comparison(difference, se, (
            f"on {data} at {format_fraction(max(shared))} of the training data, {cnn.label} (`{cnn.name}`) reaches "
            f"{format_accuracy(cnn)}% and {vit.label} (`{vit.name}`) {format_accuracy(vit)}%: CNN - ViT = "
            f"{format_difference(difference, se)}.{compute}")))
    return comparisons


def data_dependence(runs: list[RunFacts]) -> list[Comparison]:
    """Finding 2: per evaluation set, how much more the ViT gains than the CNN from the smallest to the largest
    training fraction both have (equivalently, how much the CNN's lead shrinks)."""
    comparisons = []
    for data, group in group_by_data(scratch_runs(runs)).items():
        vits, cnns = _family_model(group, "ViT"), _family_model(group, "CNN")
        shared = sorted({r.fraction for r in vits} & {r.fraction for r in cnns})
        if len(shared) < 2:
            continue
        low, high = shared[0], shared[-1]
        v_low, v_high, c_low, c_high = (best_at(vits, low), best_at(vits, high), best_at(cnns, low),
                                        best_at(cnns, high))
        gain = (v_high.accuracy - v_low.accuracy) - (c_high.accuracy - c_low.accuracy)
        se = combined_se(v_low.se, v_high.se, c_low.se, c_high.se)
        leads = ", ".join(
            f"{100 * (best_at(cnns, f).accuracy - best_at(vits, f).accuracy):+.2f} at {format_fraction(f)}"
            for f in shared)
        comparisons.append(Comparison(gain, se, (
            f"on {data}, from {format_fraction(low)} to {format_fraction(high)} of the training data "
            f"{vits[0].label} gains "
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
        match = [s for s in scratch_runs(runs) if (s.data, s.fraction, s.num_parameters) ==
                 (run.data, run.fraction, run.num_parameters)]
        pairs.append((run, max(match, key=lambda s: s.accuracy) if match else None))
    return pairs


def pretraining_gain(runs: list[RunFacts]) -> list[Comparison]:
    """Finding 3: fully fine-tuned minus from scratch, for every pair."""
    comparisons = []
    for tuned, scratch in pretraining_pairs(runs):
        if scratch is None or tuned.frozen:
            continue
        difference, se = tuned.accuracy - scratch.accuracy, combined_se(tuned.se, scratch.se)
        comparisons.append(Comparison(difference, se, (
            f"on {tuned.data}, {tuned.label} fine-tuned {tuned.start} (`{tuned.name}`) reaches "
            f"{format_accuracy(tuned)}% and from scratch (`{scratch.name}`) {format_accuracy(scratch)}%: gain "
            f"{format_difference(difference, se)}.")))
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
            f"`{run.name}`: train {100 * run.train_accuracy:.2f}%, eval {format_accuracy(run)}%: gap "
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
