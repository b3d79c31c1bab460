"""The designs of a study's findings, stated in the study file before any run trains.

Each design names the claim it checks, the report's figure, its hypothesis, the cells it compares, the metric, the
minimum effect that counts as support, and when its verdict is *not tested in this regime* (too few seeds, or a cell
still improving when it stopped). Three kinds cover the course report's four findings:

* ``difference``: for each pair ``[a, b]``, test accuracy of cell ``a`` minus cell ``b`` (points);
* ``slope``: the pairs' differences ``a - b`` against log2 of their training fraction, by least squares: the change of
  the difference per doubling of the training data (points per doubling);
* ``gap``: for each cell, accuracy of its final weights on a fixed un-augmented subset of its own training images
  minus its test accuracy (points).

A cell is the set of runs of a study entry that differ only by their seed (``seeds: [...]``), or one run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hf_vit.errors import UserError

KINDS = ("difference", "slope", "gap")
DESIGN_KEYS = ("title", "report", "hypothesis", "kind", "pairs", "cells", "metric", "min_effect", "seeds",
               "converged")
# The scored sets a design may use (the all_results.json prefix and the predictions_<name>.csv file of each run).
METRICS = ("test", "eval")
MIN_SEEDS = 3


@dataclass
class Design:
    """One finding's design (the keys of a ``findings:`` entry)."""

    title: str
    report: str
    hypothesis: str
    kind: str
    pairs: list[tuple[str, str]] = field(default_factory=list)
    cells: list[str] = field(default_factory=list)
    metric: str = "test"
    min_effect: float = 0.0  # points: supported when the whole interval lies above it, contradicted when below
    seeds: int = MIN_SEEDS  # fewer seeds in any cell: not tested in this regime
    converged: bool = True  # every cell must pass the convergence rule, else not tested in this regime

    def all_cells(self) -> list[str]:
        return list(dict.fromkeys([c for pair in self.pairs for c in pair] + self.cells))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pairs": [list(p) for p in self.pairs]}


def _text(value: Any, key: str, where: str, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{path}: {where}: {key} must be a non-empty text")
    return " ".join(value.split())


def parse_designs(raw: Any, cells: list[str], path: str) -> list[Design]:
    """The ``findings:`` list of a study file (or of a study record) as :class:`Design` objects; every mistake is a
    one-line error naming the file and the key. ``cells`` are the study's cells and run names."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise UserError(f"{path}: findings must be a list of designs (keys: {', '.join(DESIGN_KEYS)})")
    designs = []
    for index, entry in enumerate(raw):
        where = f"findings[{index}]"
        if not isinstance(entry, dict):
            raise UserError(f"{path}: {where} must be a mapping with keys {', '.join(DESIGN_KEYS)}")
        unknown = sorted(set(entry) - set(DESIGN_KEYS))
        if unknown:
            raise UserError(f"{path}: {where} has unknown key {unknown[0]!r}; a design has {', '.join(DESIGN_KEYS)}")
        kind = entry.get("kind")
        if kind not in KINDS:
            raise UserError(f"{path}: {where}: kind must be one of {', '.join(KINDS)} (got {kind!r})")
        pairs = entry.get("pairs") or []
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise UserError(f"{path}: {where}: pairs must be a list of [cell, cell]")
        chosen = entry.get("cells") or []
        if not isinstance(chosen, list):
            raise UserError(f"{path}: {where}: cells must be a list of cells")
        if kind == "gap" and (pairs or not chosen):
            raise UserError(f"{path}: {where}: a gap design names cells (and no pairs)")
        if kind != "gap" and (chosen or not pairs or (kind == "slope" and len(pairs) < 3)):
            raise UserError(f"{path}: {where}: a {kind} design names pairs (and no cells)"
                            + (", at least 3 for a slope" if kind == "slope" else ""))
        for cell in [c for pair in pairs for c in pair] + chosen:
            if cell not in cells:
                raise UserError(f"{path}: {where}: {cell!r} is not a cell or run of the study")
        metric = entry.get("metric", "test")
        if metric not in METRICS:
            raise UserError(f"{path}: {where}: metric must be one of {', '.join(METRICS)}")
        min_effect, seeds = entry.get("min_effect", 0.0), entry.get("seeds", MIN_SEEDS)
        if not isinstance(min_effect, (int, float)) or isinstance(min_effect, bool):
            raise UserError(f"{path}: {where}: min_effect must be a number of points")
        if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
            raise UserError(f"{path}: {where}: seeds must be an integer >= 1")
        if not isinstance(entry.get("converged", True), bool):
            raise UserError(f"{path}: {where}: converged must be true or false")
        designs.append(Design(
            title=_text(entry.get("title"), "title", where, path), report=_text(entry.get("report"), "report", where,
                                                                                  path),
            hypothesis=_text(entry.get("hypothesis"), "hypothesis", where, path), kind=kind,
            pairs=[(str(a), str(b)) for a, b in pairs], cells=[str(c) for c in chosen], metric=metric,
            min_effect=float(min_effect), seeds=seeds, converged=entry.get("converged", True)))
    return designs
