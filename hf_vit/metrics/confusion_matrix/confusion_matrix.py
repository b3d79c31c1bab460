"""Confusion matrix as an offline ``evaluate`` module: entry [i][j] counts examples of class i predicted as j."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Confusion matrix of shape (C, C): rows are true classes, columns are predicted classes."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids, shape (N,).
    references (`list[int]`): true class ids, shape (N,).
    num_labels (`int`, optional): number of classes C; defaults to 1 + the largest class id seen.
Returns:
    confusion_matrix (`list[list[int]]`): C x C counts, row = true class, column = predicted class.
Examples:
    >>> metric = evaluate.load("hf_vit/metrics/confusion_matrix")
    >>> metric.compute(predictions=[0, 0, 1], references=[0, 1, 1], num_labels=2)
    {'confusion_matrix': [[1, 0], [1, 1]]}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ConfusionMatrix(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            format="numpy",
        )

    def _compute(self, predictions, references, num_labels=None):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if num_labels is None:
            num_labels = int(max(predictions.max(initial=-1), references.max(initial=-1))) + 1
        if predictions.size and (min(predictions.min(), references.min()) < 0 or
                                 max(predictions.max(), references.max()) >= num_labels):
            raise ValueError(f"class ids must lie in [0, {num_labels}); got ids outside that range.")
        # Each (true, predicted) pair maps to one cell of the flattened matrix.
        counts = np.bincount(references * num_labels + predictions, minlength=num_labels * num_labels)
        return {"confusion_matrix": counts.reshape(num_labels, num_labels).tolist()}
