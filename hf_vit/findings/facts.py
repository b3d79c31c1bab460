"""The facts of finished runs that the findings are computed from, and the small rules for choosing and showing runs.

:func:`read_facts` reads every run folder (``all_results.json``, ``train_config.yaml``, ``log_history.json``,
``config.json``, through :func:`hf_vit.report.load_run`) into one :class:`RunFacts` per run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_vit.report import format_count, load_run

# config.json model types that are convolutional networks (the presets' and transformers' common ones).
CNN_TYPES = frozenset({"resnet", "convnext", "convnextv2", "regnet", "efficientnet", "mobilenet_v1", "mobilenet_v2",
                       "bit", "van"})


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


# --------------------------------------------------------------------------------------- choosing and showing runs
def format_accuracy(run: RunFacts) -> str:
    """``run``'s eval accuracy in percent with its standard error (``-`` when it has none)."""
    if run.accuracy is None:
        return "-"
    return f"{100 * run.accuracy:.2f}" + (f" ± {100 * run.se:.2f}" if run.se is not None else "")


def format_fraction(value: float) -> str:
    """A training-data fraction in percent, as the tables and plots show it."""
    return f"{100 * value:.4g}%"


def group_by_data(runs: list[RunFacts]) -> dict[str, list[RunFacts]]:
    """``runs`` by evaluation set (:attr:`RunFacts.data`), in order."""
    groups: dict[str, list[RunFacts]] = {}
    for run in runs:
        groups.setdefault(run.data, []).append(run)
    return groups


def best_at(runs: list[RunFacts], fraction: float) -> RunFacts:
    """The most accurate of ``runs`` trained on ``fraction`` of the training data."""
    return max((r for r in runs if r.fraction == fraction), key=lambda r: r.accuracy)


def scratch_runs(runs: list[RunFacts]) -> list[RunFacts]:
    """The runs trained from scratch that have an eval accuracy."""
    return [r for r in runs if r.source is None and r.accuracy is not None]
