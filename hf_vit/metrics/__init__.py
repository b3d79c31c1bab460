"""Classification metrics shipped with the package as ``evaluate`` modules, loadable with no network.

Each metric lives in ``METRICS_DIR/<name>/<name>.py``, the layout ``evaluate.load`` expects of a local module:

    accuracy          top-1 accuracy from predicted class ids
    top_k_accuracy    top-k accuracy from per-class scores (logits), ``k`` defaults to 5
    per_class         per-class accuracy (= recall), precision, recall, F1 and support, ``num_labels`` classes
    confusion_matrix  ``num_labels`` x ``num_labels`` counts, row = true class, column = predicted class
"""

from __future__ import annotations

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("accuracy", "top_k_accuracy", "per_class", "confusion_matrix")


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Load the packaged metric ``name`` (one of :data:`METRIC_NAMES`); ``kwargs`` go to ``evaluate.load``.

    The absolute path of the script is passed, so ``evaluate`` takes its local-file branch and never asks the Hub
    (a bare name such as ``"accuracy"`` would).
    """
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRIC_NAMES)}.")
    return evaluate.load(str(METRICS_DIR / name / f"{name}.py"), **kwargs)
