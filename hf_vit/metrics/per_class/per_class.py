"""Per-class accuracy, precision, recall, F1 and support as an offline ``evaluate`` module."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    "Per-class classification metrics. A class's accuracy is the fraction of its examples predicted correctly, i.e. "
    "its recall. Precision, recall and F1 are 0.0 where undefined (no predictions of, or no examples of, the class)."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids, shape (N,).
    references (`list[int]`): true class ids, shape (N,).
    num_labels (`int`, optional): number of classes C. Classes absent from both inputs still get a row of zeros.
        Defaults to 1 + the largest class id seen.
Returns:
    accuracy, precision, recall, f1 (`list[float]`), support (`list[int]`): each of length C, indexed by class id.
Examples:
    >>> metric = evaluate.load("hf_vit/metrics/per_class")
    >>> metric.compute(predictions=[0, 0, 1], references=[0, 1, 1], num_labels=3)["recall"]
    [1.0, 0.5, 0.0]
"""


def _safe_divide(numerator, denominator):
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PerClass(evaluate.Metric):
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
        correct = predictions == references
        true_positives = np.bincount(references[correct], minlength=num_labels).astype(np.float64)
        support = np.bincount(references, minlength=num_labels)
        predicted = np.bincount(predictions, minlength=num_labels)
        precision = _safe_divide(true_positives, predicted)
        recall = _safe_divide(true_positives, support)
        f1 = _safe_divide(2 * precision * recall, precision + recall)
        return {
            "accuracy": recall.tolist(),
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": support.tolist(),
        }
