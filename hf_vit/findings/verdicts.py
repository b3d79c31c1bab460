"""Each design of a study judged by its runs.

A comparison's verdict follows from its estimate's interval (:mod:`hf_vit.findings.stats`) and the design's minimum
effect ``m`` (points, oriented so that positive supports the claim):

* **supported** when the whole interval lies above ``m``;
* **contradicted** when the whole interval lies below ``m`` (for ``m = 0``: the opposite direction is established);
* **inconclusive** when the interval contains ``m``;
* **not tested in this regime** when a cell has fewer seeds than the design needs, or a cell the design needs
  converged still rose by more than the rule allows over its last steps; the numbers are still shown.

A design with several comparisons (pairs, cells) gets their common verdict, or ``mixed`` with the counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .designs import Design
from .facts import RunFacts, format_fraction
from .stats import LAST_PART, RISE_POINTS, Estimate, converged, estimate, last_part_rise, slope_weights

NOT_TESTED = "not tested in this regime"


def verdict(low: float, high: float, min_effect: float) -> str:
    if low > min_effect:
        return "supported"
    if high < min_effect:
        return "contradicted"
    return "inconclusive"


@dataclass
class Comparison:
    """One judged quantity of a design: what it compares, its estimate and its verdict."""

    text: str
    estimate: Estimate | None
    verdict: str
    unit: str = "points"

    def line(self) -> str:
        value = self.estimate.describe(self.unit) if self.estimate is not None else "no estimate"
        return f"{self.verdict}: {self.text}: {value}."


def combine(comparisons: list[Comparison]) -> str:
    """One verdict for a design: the common verdict of its comparisons, or ``mixed`` with the counts."""
    if not comparisons:
        return "not tested (no runs for it)"
    verdicts = [c.verdict.split(" (")[0] for c in comparisons]
    if len(set(verdicts)) == 1:
        return verdicts[0]
    return "mixed (" + ", ".join(f"{verdicts.count(v)} {v}" for v in dict.fromkeys(verdicts)) + ")"


def _regime(design: Design, cells: dict[str, list[RunFacts]], needed: list[str]) -> str | None:
    """Why the comparison over ``needed`` cells is not tested in this regime (None when it is)."""
    few = [f"`{c}` ({len(cells[c])})" for c in needed if len(cells[c]) < design.seeds]
    if few:
        return f"{NOT_TESTED} (fewer than {design.seeds} seeds: {', '.join(few)})"
    if design.converged:
        rising = [c for c in needed if not converged(cells[c])]
        if rising:
            rises = ", ".join(f"`{c}` {_rise(cells[c])}" for c in rising)
            return (f"{NOT_TESTED} (still rising: validation accuracy rose more than {RISE_POINTS:g} point over the "
                    f"last {100 * LAST_PART:g}% of the steps: {rises})")
    return None


def _rise(members: list[RunFacts]) -> str:
    rise = last_part_rise(members)
    return "no validation curve" if rise is None else f"{rise:+.2f}"


def _judged(design: Design, cells, needed: list[str], terms, text: str, unit: str = "points") -> Comparison:
    missing = [c for c in needed if c not in cells]
    if missing:
        return Comparison(text, None, f"not tested (no finished run of `{missing[0]}`)", unit)
    found = estimate(terms, cells)
    if found is None:
        return Comparison(text, None, f"not tested (a run of {', '.join(needed)} has no {design.metric} accuracy)",
                          unit)
    regime = _regime(design, cells, needed)
    low, high = found.interval
    return Comparison(text, found, regime or verdict(low, high, design.min_effect), unit)


def judge(design: Design, cells: dict[str, list[RunFacts]]) -> list[Comparison]:
    """The design's comparisons over ``cells`` (:func:`hf_vit.findings.stats.cells_of`)."""
    metric = design.metric
    if design.kind == "difference":
        return [_judged(design, cells, [a, b], [(a, metric, 1.0), (b, metric, -1.0)],
                        f"`{a}` - `{b}`") for a, b in design.pairs]
    if design.kind == "gap":
        return [_judged(design, cells, [c], [(c, "train_eval", 1.0), (c, metric, -1.0)],
                        f"`{c}`: accuracy on its own training images - {metric} accuracy") for c in design.cells]
    # slope: y = a - b against log2 of the training fraction, per doubling.
    needed = [c for pair in design.pairs for c in pair]
    missing = [c for c in needed if c not in cells]
    text = "slope of " + ", ".join(f"`{a}` - `{b}`" for a, b in design.pairs) + " against log2(training fraction)"
    if missing:
        return [Comparison(text, None, f"not tested (no finished run of `{missing[0]}`)", "points per doubling")]
    fractions = [cells[a][0].fraction for a, _ in design.pairs]
    if any(cells[b][0].fraction != f for (_, b), f in zip(design.pairs, fractions)) or len(set(fractions)) < 3:
        return [Comparison(text, None, "not tested (each pair must share a training fraction, and at least 3 "
                                       "fractions differ)", "points per doubling")]
    weights = slope_weights([math.log2(f) for f in fractions])
    terms = [term for (a, b), w in zip(design.pairs, weights) for term in ((a, metric, w), (b, metric, -w))]
    text += " (" + ", ".join(map(format_fraction, fractions)) + ")"
    return [_judged(design, cells, needed, terms, text, "points per doubling")]
