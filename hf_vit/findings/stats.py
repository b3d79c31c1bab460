"""Cells of seeds, the convergence rule, and the one estimate every finding is judged by.

Every quantity a finding judges is a linear contrast of cell accuracies, ``L = sum_j w_j * acc(cell_j, set_j)``: a
difference of two cells, a least-squares slope over several, or train-subset minus test accuracy. Its uncertainty has
two parts, both reported:

* **seeds**: the contrast computed per seed (the k-th seed of each cell together), its standard error across seeds
  ``sd(L_s) / sqrt(k)`` — how much the answer moves with the training randomness;
* **examples**: a paired bootstrap over the scored images: the images of a set are resampled together for every cell
  scored on it (same fingerprint), so that two models' shared hard and easy images cancel; its standard error is the
  spread of the resampled contrast of the seed-averaged per-image correctness — how much it would move on another
  test set of the same size.

The interval is ``L ± t(0.975, df) * sqrt(SE_seeds^2 + SE_examples^2)``, Student's t with Welch-Satterthwaite's
degrees of freedom: ``k - 1`` when the seed spread dominates (with 3 seeds, 4.3 standard errors each side), more as the
images' part takes over. A cell's accuracy is the mean over its seeds; no maximum over runs is taken anywhere.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

from .facts import RunFacts

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed: findings.md is regenerated exactly from the same records
# The convergence rule: a cell whose seed-mean validation curve still rose by more than RISE_POINTS over the last
# LAST_PART of its steps was stopped while improving (its number measures the budget, not the model).
RISE_POINTS = 1.0
LAST_PART = 0.2


def cells_of(runs: list[RunFacts]) -> dict[str, list[RunFacts]]:
    """``{cell: its runs ordered by seed}``, cells in the order their first run appears."""
    cells: dict[str, list[RunFacts]] = {}
    for run in runs:
        cells.setdefault(run.cell, []).append(run)
    return {cell: sorted(members, key=lambda r: (r.seed is None, r.seed or 0)) for cell, members in cells.items()}


def cell_accuracy(members: list[RunFacts], metric: str) -> tuple[float | None, float | None]:
    """(mean over seeds, standard error across seeds) of a cell's accuracy; the SE is None for one run."""
    values = [v for v in (r.accuracy(metric) for r in members) if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


def validation_curve(members: list[RunFacts]) -> list[tuple[int, float]]:
    """The cell's seed-mean ``eval_accuracy`` curve ``[(step, accuracy)]`` from the runs' log histories (steps that
    every seed evaluated at)."""
    per_run = [{int(r["step"]): float(r["eval_accuracy"]) for r in run.history
                if isinstance(r, dict) and "eval_accuracy" in r and "step" in r} for run in members]
    if not per_run or not all(per_run):
        return []
    steps = sorted(set.intersection(*(set(curve) for curve in per_run)))
    return [(step, statistics.fmean(curve[step] for curve in per_run)) for step in steps]


def last_part_rise(members: list[RunFacts]) -> float | None:
    """Points the cell's validation curve rose from the start of its last :data:`LAST_PART` of steps to its end (None
    without at least two evaluations in that span's reach)."""
    curve = validation_curve(members)
    if len(curve) < 2:
        return None
    last_step, last = curve[-1]
    start = next(acc for step, acc in curve if step >= (1 - LAST_PART) * last_step)
    return 100 * (last - start)


def converged(members: list[RunFacts]) -> bool:
    """Whether the cell passes the convergence rule: a rise of exactly :data:`RISE_POINTS` passes (a rise of 12 in
    1,200 image-scores computes as 1.0000000000000009 points; the rule is "more than")."""
    rise = last_part_rise(members)
    return rise is not None and round(rise, 9) <= RISE_POINTS


@dataclass
class Estimate:
    """A contrast's value and uncertainty, in points."""

    value: float
    seeds: int
    se_seeds: float | None
    se_examples: float | None
    images: int  # scored images the paired bootstrap resampled (all sets together)

    @property
    def se(self) -> float:
        return math.sqrt((self.se_seeds or 0.0) ** 2 + (self.se_examples or 0.0) ** 2)

    @property
    def degrees_of_freedom(self) -> float:
        """Welch-Satterthwaite's: ``seeds - 1`` when the seed spread dominates the error, growing without bound as
        the images' part (estimated from thousands of images) takes over."""
        if self.seeds < 2 or not self.se_seeds:
            return math.inf
        return (self.seeds - 1) * (self.se / self.se_seeds) ** 4

    @property
    def critical(self) -> float:
        """Student's t quantile at :attr:`degrees_of_freedom` (the normal's when they are unbounded)."""
        q = 0.5 + CONFIDENCE / 2
        df = self.degrees_of_freedom
        return float(scipy_stats.norm.ppf(q)) if math.isinf(df) else float(scipy_stats.t.ppf(q, df))

    @property
    def interval(self) -> tuple[float, float]:
        half = self.critical * self.se
        return self.value - half, self.value + half

    def describe(self, unit: str = "points") -> str:
        low, high = self.interval
        parts = [f"SE across {self.seeds} seeds {self.se_seeds:.2f}" if self.se_seeds is not None
                 else f"{self.seeds} seed"]
        if self.se_examples is not None:
            parts.append(f"paired bootstrap over {self.images:,} images {self.se_examples:.2f}")
        return (f"{self.value:+.2f} {unit}, {100 * CONFIDENCE:g}% interval [{low:+.2f}, {high:+.2f}] "
                f"({'; '.join(parts)})")


def _bootstrap_variance(values: np.ndarray, rng: np.random.Generator) -> float:
    """Variance of the mean of ``values`` over :data:`BOOTSTRAP_RESAMPLES` resamples of its entries."""
    n, means = len(values), []
    for chunk in range(0, BOOTSTRAP_RESAMPLES, 250):
        draws = rng.integers(0, n, size=(min(250, BOOTSTRAP_RESAMPLES - chunk), n))
        means.append(values[draws].mean(axis=1))
    return float(np.var(np.concatenate(means), ddof=1))


def estimate(terms: list[tuple[str, str, float]], cells: dict[str, list[RunFacts]]) -> Estimate | None:
    """The contrast ``sum(weight * accuracy(cell, metric))`` over ``terms`` ``[(cell, metric, weight)]`` in points;
    None when a cell lacks that metric. Seeds are matched by rank (the first seed of each cell together, ...), so
    every cell contributes the same number ``k`` of seeds: the fewest any term's cell has."""
    k = min(len(cells[cell]) for cell, _, _ in terms)
    per_seed = []
    for i in range(k):
        values = [cells[cell][i].accuracy(metric) for cell, metric, _ in terms]
        if any(v is None for v in values):
            return None
        per_seed.append(100 * sum(w * v for (_, _, w), v in zip(terms, values)))
    se_seeds = statistics.stdev(per_seed) / math.sqrt(k) if k > 1 else None
    # Paired over images: per scored set (fingerprint), the weighted seed-mean correctness of each image.
    per_set: dict[str, np.ndarray] = {}
    for cell, metric, weight in terms:
        sets = [run.scored.get(metric) for run in cells[cell][:k]]
        if any(s is None for s in sets) or len({(s.fingerprint, len(s.correct)) for s in sets}) != 1:
            per_set = {}  # without the same images in every seed, there is nothing to pair
            break
        mean_correct = np.mean([s.correct for s in sets], axis=0)
        key = sets[0].fingerprint
        per_set[key] = per_set.get(key, 0.0) + weight * mean_correct
    se_examples, images = None, 0
    if per_set:
        rng = np.random.default_rng(BOOTSTRAP_SEED)
        se_examples = 100 * math.sqrt(sum(_bootstrap_variance(values, rng) for _, values in sorted(per_set.items())))
        images = sum(len(values) for values in per_set.values())
    return Estimate(statistics.fmean(per_seed), k, se_seeds, se_examples, images)


def slope_weights(xs: list[float]) -> list[float]:
    """Least-squares weights: ``sum(w_i * y_i)`` is the slope of ``y`` against ``xs``."""
    mean = statistics.fmean(xs)
    spread = sum((x - mean) ** 2 for x in xs)
    return [(x - mean) / spread for x in xs]
