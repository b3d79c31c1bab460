"""Top-1 accuracy as an offline ``evaluate`` module: the fraction of predicted class ids equal to the label."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-1 accuracy: the fraction of examples whose predicted class id equals the reference class id."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids, shape (N,).
    references (`list[int]`): true class ids, shape (N,).
Returns:
    accuracy (`float`): in [0, 1]; 0.0 when there are no examples.
Examples:
    >>> metric = evaluate.load("hf_vit/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 2])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
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

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if references.size == 0:
            return {"accuracy": 0.0}
        return {"accuracy": float(np.mean(predictions == references))}
