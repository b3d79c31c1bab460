"""The packaged evaluate metrics agree with scikit-learn, load offline, and feed compute_metrics."""

import socket

import evaluate
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

from hf_vit.scoring import compute_metrics, format_results_table
from hf_vit.metrics import METRIC_NAMES, METRICS_DIR, load_metric

NUM_LABELS = 7
ABSENT = 6  # a class that is neither predicted nor present in the references


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    references = rng.integers(0, NUM_LABELS - 1, size=200)
    logits = rng.standard_normal((200, NUM_LABELS)).astype(np.float32)
    logits[:, ABSENT] = -10.0
    logits[np.arange(200), references] += 1.0  # better than chance, worse than perfect
    # Class 5 occurs in the references but is never predicted, so its precision is undefined (reported as 0).
    logits[:, 5] = -10.0
    return logits, references, logits.argmax(axis=1)


@pytest.fixture(scope="module")
def metrics():
    return {name: load_metric(name, keep_in_memory=True) for name in METRIC_NAMES}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_every_metric_loads_from_its_folder_with_the_network_blocked(no_network):
    for name in METRIC_NAMES:
        folder = METRICS_DIR / name
        assert (folder / f"{name}.py").is_file()
        assert isinstance(evaluate.load(str(folder)), evaluate.Metric)
        assert isinstance(load_metric(name), evaluate.Metric)


def test_load_metric_rejects_unknown_names():
    with pytest.raises(ValueError, match="top_k_accuracy"):
        load_metric("bleu")


def test_accuracy_matches_sklearn(metrics, data):
    _, references, predictions = data
    result = metrics["accuracy"].compute(predictions=predictions, references=references)
    assert result["accuracy"] == pytest.approx(accuracy_score(references, predictions))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_accuracy_matches_sklearn(metrics, data, k):
    logits, references, _ = data
    result = metrics["top_k_accuracy"].compute(predictions=logits, references=references, k=k)
    expected = top_k_accuracy_score(references, logits, k=k, labels=range(NUM_LABELS))
    assert result["top_k_accuracy"] == pytest.approx(expected)


def test_top_k_accuracy_defaults_to_k_5(metrics, data):
    logits, references, _ = data
    result = metrics["top_k_accuracy"].compute(predictions=logits, references=references)
    assert result["top_k_accuracy"] == pytest.approx(top_k_accuracy_score(references, logits, k=5, labels=range(7)))


def test_top_k_accuracy_counts_ties_and_nans_against_the_label(metrics):
    constant = np.zeros((4, 10), dtype=np.float32)  # an untrained zero-initialised head
    assert metrics["top_k_accuracy"].compute(predictions=constant, references=[0, 3, 5, 9], k=5)["top_k_accuracy"] == 0
    nan_row = np.full((1, 10), np.nan, dtype=np.float32)
    assert metrics["top_k_accuracy"].compute(predictions=nan_row, references=[2], k=5)["top_k_accuracy"] == 0


def test_per_class_matches_sklearn_and_keeps_absent_classes(metrics, data):
    _, references, predictions = data
    assert ABSENT not in predictions and ABSENT not in references and 5 not in predictions
    result = metrics["per_class"].compute(predictions=predictions, references=references, num_labels=NUM_LABELS)
    precision, recall, f1, support = precision_recall_fscore_support(
        references, predictions, labels=range(NUM_LABELS), zero_division=0
    )
    for key, expected in (("precision", precision), ("recall", recall), ("f1", f1), ("support", support)):
        assert len(result[key]) == NUM_LABELS
        np.testing.assert_allclose(result[key], expected, err_msg=key)
    np.testing.assert_allclose(result["accuracy"], recall)
    assert [result[key][ABSENT] for key in ("accuracy", "precision", "recall", "f1", "support")] == [0, 0, 0, 0, 0]


def test_confusion_matrix_matches_sklearn_with_rows_as_true_labels(metrics, data):
    _, references, predictions = data
    result = metrics["confusion_matrix"].compute(predictions=predictions, references=references, num_labels=NUM_LABELS)
    expected = confusion_matrix(references, predictions, labels=range(NUM_LABELS))
    assert result["confusion_matrix"] == expected.tolist()
    tiny = metrics["confusion_matrix"].compute(predictions=[1], references=[0], num_labels=2)["confusion_matrix"]
    assert tiny == [[0, 1], [0, 0]]


def test_compute_metrics_returns_every_metric_keyed_by_label_name(data):
    logits, references, predictions = data
    names = [f"class_{i}" for i in range(NUM_LABELS)]
    results = compute_metrics(logits, references, names)
    assert set(results) == {"accuracy", "top5_accuracy", "per_class", "confusion_matrix"}
    assert results["accuracy"] == pytest.approx(accuracy_score(references, predictions))
    assert results["top5_accuracy"] == pytest.approx(top_k_accuracy_score(references, logits, k=5, labels=range(7)))
    assert list(results["per_class"]) == names
    assert set(results["per_class"]["class_0"]) == {"accuracy", "precision", "recall", "f1", "support"}
    assert results["per_class"]["class_6"]["support"] == 0
    assert np.array(results["confusion_matrix"]).shape == (NUM_LABELS, NUM_LABELS)
    assert isinstance(results["accuracy"], float)


def test_compute_metrics_top_k_shortcut_matches_the_full_score_matrix(metrics):
    # compute_metrics hands the top-k module only the label's score and the k best others; on a wide matrix with
    # ties, NaNs and infinities the result must equal the module's on all C columns.
    rng = np.random.default_rng(1)
    logits = rng.integers(-3, 4, size=(300, 40)).astype(np.float32)
    logits[rng.random(logits.shape) < 0.02] = np.nan
    logits[rng.random(logits.shape) < 0.02] = -np.inf
    logits[rng.random(logits.shape) < 0.02] = np.inf
    logits[:5] = np.nan  # whole rows, so some labels score NaN too
    labels = rng.integers(0, 40, size=300)
    for k in (1, 5, 38):
        full = metrics["top_k_accuracy"].compute(predictions=logits, references=labels, k=k)["top_k_accuracy"]
        assert compute_metrics(logits, labels, [str(i) for i in range(40)], k=k)[f"top{k}_accuracy"] == full


def test_compute_metrics_clamps_k_to_the_number_of_classes():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]], dtype=np.float32)
    results = compute_metrics(logits, np.array([2, 0]), ["a", "b", "c"], k=5)
    assert "top5_accuracy" not in results
    assert results["top3_accuracy"] == 1.0
    assert results["accuracy"] == 0.5


def test_compute_metrics_rejects_mismatched_label_names():
    with pytest.raises(ValueError, match="label names"):
        compute_metrics(np.zeros((2, 3), dtype=np.float32), np.array([0, 1]), ["a", "b"])


def test_format_results_table_is_markdown_with_a_row_per_class(data):
    logits, references, _ = data
    names = [f"class_{i}" for i in range(NUM_LABELS)]
    table = format_results_table(compute_metrics(logits, references, names), names)
    lines = table.splitlines()
    assert lines[0] == "| metric | value |"
    assert any(line.startswith("| top5_accuracy | ") for line in lines)
    assert "| class | accuracy | precision | recall | f1 | support |" in lines
    assert sum(line.startswith("| class_") for line in lines) == NUM_LABELS
