"""Top-k accuracy as an offline ``evaluate`` module: a hit when the label is among the k highest-scoring classes."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    "Top-k accuracy: the fraction of examples whose reference class is among the k classes with the highest score."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[float]]`): per-class scores (logits or probabilities), shape (N, C).
    references (`list[int]`): true class ids, shape (N,).
    k (`int`, default 5): how many of the highest-scoring classes count as a hit; must be 1 <= k <= C.
Returns:
    top_k_accuracy (`float`): in [0, 1]; 0.0 when there are no examples.
Examples:
    >>> metric = evaluate.load("hf_vit/metrics/top_k_accuracy")
    >>> metric.compute(predictions=[[0.1, 0.5, 0.4], [0.8, 0.15, 0.05]], references=[2, 1], k=2)
    {'top_k_accuracy': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=5):
        references = np.asarray(references, dtype=np.int64)
        if references.size == 0:
            return {"top_k_accuracy": 0.0}
        scores = np.asarray(predictions, dtype=np.float32).reshape(len(references), -1)  # (N, C)
        num_classes = scores.shape[1]
        if not 1 <= k <= num_classes:
            raise ValueError(f"k must be between 1 and the number of classes ({num_classes}), got k={k}.")
        # The label's rank is the number of other classes scoring at least as high; no (N, C) sort is needed.
        # Ties and NaNs count against the label, so constant logits (an untrained zero-initialised head) score
        # 0 rather than 100%.
        if references.min() < 0 or references.max() >= num_classes:
            raise ValueError(f"references must be class ids in [0, {num_classes}); got ids outside that range.")
        label_scores = scores[np.arange(len(references)), references]
        rank = (~(scores < label_scores[:, None])).sum(axis=1) - 1
        return {"top_k_accuracy": float(np.mean(rank < k))}
