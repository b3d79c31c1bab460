"""Evaluation: score a classifier on eval data across processes, and its metrics through the packaged ``evaluate``
modules.

The training loop and the eval command (``python -m hf_vit.eval``) both call :func:`evaluate_classifier`: the logits
of every process are gathered once at the end, and :func:`compute_metrics` runs once, on the full evaluation set.
"""

from __future__ import annotations

import contextlib
import logging
from functools import lru_cache
from numbers import Number
from typing import Any

import evaluate
import numpy as np
import torch
from accelerate.utils import gather_object

from hf_vit.metrics import load_metric
from hf_vit.predictions import scored_set_fingerprint

logger = logging.getLogger("hf_vit")


@lru_cache(maxsize=None)
def _metric(name: str) -> evaluate.EvaluationModule:
    # In memory: nothing is written under ~/.cache, and ranks that call this at once cannot contend for a file lock.
    return load_metric(name, keep_in_memory=True)


def _label_first_top_scores(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Shrink (N, C) scores to (N, k + 1) with the same top-k hits when the label is taken to be class 0.

    Column 0 holds the label's score, the other k columns the k highest scores of the other classes (``np.partition``
    sorts NaN last, i.e. highest, and the metric counts a NaN as beating the label). Whether fewer than k other
    classes score at least as high as the label is decided by those k alone, so the hit is unchanged. Without this,
    ``evaluate`` turns an ImageNet-sized (50,000 x 1,000) matrix into Python lists and back, which takes ~15 s and
    gigabytes of memory.
    """
    n, c = logits.shape
    label_scores = logits[np.arange(n), labels]
    is_other = np.arange(c)[None, :] != labels[:, None]  # (N, C)
    others = logits[is_other].reshape(n, c - 1)  # (N, C-1)
    top_others = np.partition(others, c - 1 - k, axis=1)[:, c - 1 - k :]  # (N, k), unordered
    return np.concatenate([label_scores[:, None], top_others], axis=1)


def compute_metrics(logits: np.ndarray, labels: np.ndarray, label_names: list[str], k: int = 5) -> dict[str, Any]:
    """Accuracy, top-k accuracy, per-class metrics and the confusion matrix of one evaluation set.

    Args:
        logits: (N, C) float scores, one row per example.
        labels: (N,) int true class ids in [0, C).
        label_names: the C class names, in class-id order.
        k: top-k cut-off; clamped to C when there are fewer classes.

    Returns:
        ``{"accuracy": float, f"top{k}_accuracy": float, "per_class": {name: {"accuracy", "precision", "recall",
        "f1", "support"}}, "confusion_matrix": list[list[int]]}``, where ``k`` in the key is the clamped value
        (``top3_accuracy`` for 3 classes even when ``k=5`` was asked for).
    """
    logits = np.asarray(logits, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits of shape (N, C) and labels of shape (N,), got {logits.shape} and {labels.shape}."
        )
    n, num_labels = logits.shape
    if n == 0:
        raise ValueError("cannot compute metrics on an empty evaluation set.")
    if len(label_names) != num_labels:
        raise ValueError(f"got {len(label_names)} label names for logits with {num_labels} classes.")
    if labels.min() < 0 or labels.max() >= num_labels:
        raise ValueError(
            f"labels must be class ids in [0, {num_labels}); got values from {labels.min()} to {labels.max()}."
        )
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    k = min(k, num_labels)

    predictions = logits.argmax(axis=1)
    top_k_scores, top_k_labels = logits, labels
    if k + 1 < num_labels:
        top_k_scores, top_k_labels = _label_first_top_scores(logits, labels, k), np.zeros_like(labels)

    accuracy = _metric("accuracy").compute(predictions=predictions, references=labels)["accuracy"]
    top_k = _metric("top_k_accuracy").compute(predictions=top_k_scores, references=top_k_labels, k=k)
    per_class = _metric("per_class").compute(predictions=predictions, references=labels, num_labels=num_labels)
    confusion = _metric("confusion_matrix").compute(predictions=predictions, references=labels, num_labels=num_labels)
    return {
        "accuracy": accuracy,
        f"top{k}_accuracy": top_k["top_k_accuracy"],
        "per_class": {
            name: {key: per_class[key][i] for key in ("accuracy", "precision", "recall", "f1", "support")}
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": confusion["confusion_matrix"],
    }


def _cell(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, Number):
        return str(value).replace("|", "\\|")
    if isinstance(value, (int, np.integer)):
        return str(value)
    return f"{value:.4f}"


def format_results_table(results: dict[str, Any], label_names: list[str] | None = None) -> str:
    """Render ``results`` as Markdown: one row per scalar metric, then a per-class table when present.

    ``results`` is what :func:`compute_metrics` returns; extra scalar entries (``eval_loss``, ``eval_ema_accuracy``)
    get their own rows. ``label_names`` orders the per-class rows (default: the order of ``results["per_class"]``).
    """
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in results.items() if isinstance(value, Number)]
    per_class = results.get("per_class")
    if per_class:
        columns = ("accuracy", "precision", "recall", "f1", "support")
        lines += ["", "| class | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for name in label_names if label_names is not None else list(per_class):
            row = per_class[name]
            lines.append(f"| {_cell(name)} | " + " | ".join(_cell(row[column]) for column in columns) + " |")
    return "\n".join(lines)


def evaluate_classifier(model, eval_data, accelerator, mean: torch.Tensor, std: torch.Tensor,
                        label_names: list[str], predictions: bool = False) -> dict:
    """Evaluate ``model`` over ``eval_data`` (device batches, :class:`hf_vit.data.EvalData`) exactly once across
    processes; returns :func:`compute_metrics`'s dict plus ``loss`` (mean cross-entropy) and ``samples``, or None
    when no eval example was usable. With ``predictions``, also ``predictions``: the rows
    ``(index, key, label, prediction)`` of every scored example in the split's order (:mod:`hf_vit.predictions`),
    the same on any number of processes, and ``fingerprint``, their :func:`~hf_vit.predictions.scored_set_fingerprint`.

    Ranks may hold different numbers of eval examples, and the batches come from our own sharding rather than a
    loader accelerate prepared, so accelerate's ``gather_for_metrics`` cannot know what to drop: predictions are
    gathered once at the end (padded, then unpadded by the per-rank counts).
    """
    from .data import normalize

    model.eval()
    device = accelerator.device
    logits_all, labels_all, positions_all, keys_all, loss_sum, bad = [], [], [], [], 0.0, []
    # closing: an error mid-way shuts the loader workers down now, not at interpreter exit (where they could hang it)
    with torch.no_grad(), contextlib.closing(iter(eval_data)) as batches:
        for batch in batches:
            bad += batch.bad_keys
            if not len(batch.labels):
                continue
            with accelerator.autocast():
                logits = model(pixel_values=normalize(batch.pixel_values, mean, std)).logits.float()
            loss_sum += torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum").item()
            logits_all.append(logits)
            labels_all.append(batch.labels)
            positions_all += batch.positions
            keys_all += batch.keys
    if bad:
        logger.warning("%d eval images were unusable and left out of the evaluation, e.g. %s", len(bad), bad[:3])
    logits = torch.cat(logits_all) if logits_all else torch.zeros(0, len(label_names), device=device)
    labels = torch.cat(labels_all) if labels_all else torch.zeros(0, dtype=torch.long, device=device)
    counts = accelerator.gather(torch.tensor([len(labels)], device=device)).tolist()
    logits = accelerator.gather(accelerator.pad_across_processes(logits, dim=0))
    labels = accelerator.gather(accelerator.pad_across_processes(labels, dim=0))
    if predictions:  # positions travel as the labels do; the keys (strings) as objects, in the same rank order
        positions = torch.tensor(positions_all, dtype=torch.long, device=device)
        positions = accelerator.gather(accelerator.pad_across_processes(positions, dim=0))
        keys = gather_object(keys_all) if accelerator.num_processes > 1 else keys_all
    loss_total = accelerator.reduce(torch.tensor([loss_sum], device=device), "sum").item()
    # Unpad: each rank contributed max(counts) rows, of which its own count are real.
    width = max(counts) if counts else 0
    if width:
        keep = torch.cat([torch.arange(r * width, r * width + c) for r, c in enumerate(counts)])
        logits, labels = logits[keep], labels[keep]
        if predictions:
            positions = positions[keep]
    n = int(sum(counts))
    if not n:  # every eval image was unusable (the same answer on every rank: the counts are gathered)
        return None
    metrics = compute_metrics(logits.cpu().numpy(), labels.cpu().numpy(), label_names)
    metrics["loss"] = loss_total / max(1, n)
    metrics["samples"] = n
    if predictions:
        top1 = logits.argmax(dim=1).tolist()
        rows = sorted(zip(positions.tolist(), keys, labels.tolist(), top1))
        metrics["predictions"] = rows
        metrics["fingerprint"] = scored_set_fingerprint(rows)
    return metrics


def top_k_accuracy(metrics: dict) -> float:
    """The top-k accuracy of :func:`compute_metrics`'s dict (k = 5, or the class count when there are fewer)."""
    return next(v for k, v in metrics.items() if k.startswith("top") and k.endswith("_accuracy"))


def eval_results(metrics: dict, prefix: str = "eval_") -> dict:
    """The headline figures of :func:`evaluate_classifier`'s dict, named as in ``all_results.json``."""
    return {f"{prefix}accuracy": metrics["accuracy"], f"{prefix}top5_accuracy": top_k_accuracy(metrics),
            f"{prefix}loss": metrics["loss"], f"{prefix}samples": metrics["samples"]}
