"""The facts of finished runs that the findings are computed from, and how a training fraction is shown.

:func:`read_facts` reads every run folder or record (``all_results.json``, ``train_config.yaml``, ``log_history.json``,
``config.json``, through :func:`hf_vit.report.load_run`, and ``predictions_*.csv[.gz]``) into one :class:`RunFacts`
per run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hf_vit.report import format_count, load_run
from hf_vit.predictions import read_predictions, scored_set_fingerprint
from hf_vit.run_dir import PREDICTION_FILES

# config.json model types that are convolutional networks (the presets' and transformers' common ones).
CNN_TYPES = frozenset({"resnet", "convnext", "convnextv2", "regnet", "efficientnet", "mobilenet_v1", "mobilenet_v2",
                       "bit", "van"})


@dataclass
class ScoredSet:
    """What one run's final weights scored on one set of images (``predictions_<name>.csv``): which images (the
    set's fingerprint, rows in the set's order) and whether each was right."""

    fingerprint: str
    indices: np.ndarray
    correct: np.ndarray  # bool, one per row

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.correct) else float("nan")


@dataclass
class RunFacts:
    """What the findings need from one finished run folder (or its committed record)."""

    name: str
    dir: Path
    cell: str  # the runs that differ only by their seed share a cell
    seed: int | None
    family: str  # "ViT", "CNN", or the model type when it is neither
    model: str  # the architecture: its preset, or the model it started from
    data: str  # dataset and what it was scored on, e.g. "cifar10 [test]"
    fraction: float
    source: str | None  # model_name_or_path: a run of the study by name, else as given
    frozen: bool
    results: dict
    num_parameters: int | None
    history: list
    scored: dict[str, ScoredSet] = field(default_factory=dict)  # "test", "eval", "train_eval"

    def accuracy(self, metric: str) -> float | None:
        """Accuracy on a scored set: from its predictions when the run saved them, else from all_results.json."""
        if metric in self.scored:
            return self.scored[metric].accuracy
        return _number(self.results.get(f"{metric}_accuracy"))

    @property
    def training_flops(self) -> float | None:
        flops, seen = _number(self.results.get("training_flops_per_image")), _number(
            self.results.get("train_samples_seen"))
        return None if flops is None or seen is None else flops * seen

    @property
    def start(self) -> str:
        if self.source is None:
            return "scratch"
        return f"from {self.source}" + (" (frozen backbone)" if self.frozen else "")

    @property
    def label(self) -> str:
        return f"{self.model} ({format_count(self.num_parameters)})"


def _family(model_type: str | None, preset: str | None) -> str:
    preset = str(preset or "")
    model_type = model_type or ("vit" if preset.startswith("vit") else "resnet" if preset.startswith(("cnn", "resnet"))
                                else None)
    if model_type == "vit":
        return "ViT"
    if model_type in CNN_TYPES:
        return "CNN"
    return model_type or "?"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _dataset_label(name: Any) -> str:
    """A dataset's name as the findings show it, the same wherever the runs or their records lie: a study's derived
    dataset (``DIR/data/NAME``) as ``data/NAME``, another local folder by its last component, a Hub id as given."""
    name = str(name)
    parts = name.replace("\\", "/").rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "data":
        return "/".join(parts[-2:])
    if os.path.isabs(name) or name.startswith(".") or os.path.isdir(name):
        return parts[-1]
    return name


def read_scored(folder: Path) -> dict[str, ScoredSet]:
    """The run's per-example predictions (``predictions_<set>.csv``, or ``.csv.gz`` in a committed record)."""
    scored = {}
    for name, file_name in PREDICTION_FILES.items():
        for candidate in (folder / file_name, folder / f"{file_name}.gz"):
            if candidate.is_file():
                rows = read_predictions(candidate)
                scored[name] = ScoredSet(scored_set_fingerprint(rows), np.array([r[0] for r in rows]),
                                         np.array([r[2] == r[3] for r in rows], dtype=bool))
                break
    return scored


def read_facts(runs: list[tuple[str, str | os.PathLike]],
               cells: dict[str, tuple[str, int | None]] | None = None) -> list[RunFacts]:
    """``[(name, run folder)]`` of finished runs -> their :class:`RunFacts`; a run started from another run of the
    list names that run as its ``source`` and takes its architecture label. ``cells``: ``{name: (cell, seed)}`` as the study recorded them (else each run is its own cell)."""
    loaded = [(name, load_run(folder)) for name, folder in runs]
    by_dir = {os.path.realpath(run["dir"]): name for name, run in loaded}
    by_name = {os.path.basename(os.path.normpath(str(run["config"].get("output_dir", "")))): name
               for name, run in loaded}
    facts: dict[str, RunFacts] = {}
    for name, run in loaded:
        config, results = run["config"], run["results"]
        source = config.get("model_name_or_path")
        if source:
            # A committed record lies elsewhere than the run did: the upstream run is found by its folder's name.
            source = by_dir.get(os.path.realpath(source)) or by_name.get(os.path.basename(os.path.normpath(source)),
                                                                         str(source))
        preset = config.get("model_preset")
        model = preset or (facts[source].model if source in facts else os.path.basename(str(source or "")) or
                           run["model_type"] or "?")
        family = _family(run["model_type"], preset)
        if family == "?" and source in facts:
            family = facts[source].family
        held_out = next((f"[{config[key]}]" for key in ("test_split", "eval_split") if config.get(key)),
                        f"[{config.get('train_val_split', '?')} of train held out]")
        cell, seed = (cells or {}).get(name, (name, config.get("seed")))
        facts[name] = RunFacts(
            name=name, dir=Path(run["dir"]), cell=cell, seed=seed, family=family, model=str(model),
            data=f"{_dataset_label(config.get('dataset_name', '?'))} {held_out}",
            fraction=float(config.get("train_fraction") or 1.0), source=source or None,
            frozen=bool(config.get("freeze_backbone")), results=results, num_parameters=run["num_parameters"],
            history=run["history"], scored=read_scored(Path(run["dir"])))
    return list(facts.values())


# ------------------------------------------------------------------------------------------------------ showing
def format_fraction(value: float) -> str:
    """A training-data fraction in percent, as the tables and plots show it."""
    return f"{100 * value:.4g}%"
