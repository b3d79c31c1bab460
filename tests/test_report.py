"""Learning-curve and confusion plots (checked by the series they draw), the model card round trip and its wording per
model family, and the run comparison command."""

import json

import numpy as np
import pytest
import yaml
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.numpy import save_file

from hf_vit.errors import run_cli
from hf_vit.report import (load_run, main, plot_comparison, plot_confusion_matrix, plot_learning_curve,
                           write_model_card)
from hf_vit.scoring import compute_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LABELS = ["airplane", "automobile", "bird"]
SECRET = "hf_SECRETvalue123"


def assert_valid_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()


def log_history(epochs=3, steps_per_epoch=10, accuracy_start=0.3, ema=False):
    records = []
    for epoch in range(1, epochs + 1):
        for step in range((epoch - 1) * steps_per_epoch + 1, epoch * steps_per_epoch + 1, 5):
            records.append({"step": step, "epoch": step / steps_per_epoch, "train_loss": 2.0 / step,
                            "train_accuracy": 0.1 + step / 100,
                            "learning_rate": 1e-3 * (1 - step / (epochs * steps_per_epoch))})
        accuracy = accuracy_start + 0.1 * epoch
        record = {"step": epoch * steps_per_epoch, "epoch": float(epoch), "eval_accuracy": accuracy,
                  "eval_top5_accuracy": min(1.0, accuracy + 0.3), "eval_loss": 1.0 / epoch}
        if ema:
            record["eval_ema_accuracy"] = accuracy + 0.01
        records.append(record)
    return records


def plotted(axes) -> dict[str, tuple[list, list]]:
    """{line label: (xs, ys)} of the lines drawn on ``axes``."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.get_lines()}


def expected(history, key, x="step"):
    records = [r for r in history if key in r]
    return [r[x] for r in records], [r[key] for r in records]


def results():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=50)
    logits = rng.standard_normal((50, 3)).astype(np.float32)
    logits[np.arange(50), labels] += 1.0
    return compute_metrics(logits, labels, LABELS, k=2)


def test_learning_curve_plots_loss_train_and_eval_accuracy_and_learning_rate_per_step(tmp_path):
    history = log_history(ema=True)
    figure = plot_learning_curve(history, tmp_path / "learning_curve.png")

    assert_valid_png(tmp_path / "learning_curve.png")
    loss_axes, accuracy_axes, lr_axes = figure.axes
    assert plotted(loss_axes) == {"train loss": expected(history, "train_loss"),
                                  "eval loss": expected(history, "eval_loss")}
    assert plotted(accuracy_axes) == {"train accuracy": expected(history, "train_accuracy"),
                                      "eval accuracy": expected(history, "eval_accuracy"),
                                      "eval accuracy (EMA)": expected(history, "eval_ema_accuracy")}
    assert plotted(lr_axes) == {"learning rate": expected(history, "learning_rate")}


def test_learning_curve_tolerates_a_history_without_eval_records_or_train_accuracy(tmp_path):
    train_only = [{k: v for k, v in record.items() if k != "train_accuracy"}
                  for record in log_history() if "train_loss" in record]
    figure = plot_learning_curve(train_only, tmp_path / "curve.png")
    assert_valid_png(tmp_path / "curve.png")
    loss_axes, accuracy_axes, _ = figure.axes
    assert list(plotted(loss_axes)) == ["train loss"]
    assert plotted(accuracy_axes) == {}


@pytest.mark.parametrize("num_labels", [3, 100])
def test_confusion_matrix_shows_row_fractions_and_counts_while_readable(tmp_path, num_labels):
    cm = np.random.default_rng(0).integers(0, 20, size=(num_labels, num_labels)).tolist()
    cm[0] = [0] * num_labels  # an absent class must not divide by zero
    figure = plot_confusion_matrix(cm, [f"c{i}" for i in range(num_labels)], tmp_path / "cm.png")

    assert_valid_png(tmp_path / "cm.png")
    axes = figure.axes[0]
    counts = np.array(cm, dtype=float)
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    np.testing.assert_allclose(axes.images[0].get_array(), fractions)
    cell_texts = [text.get_text() for text in axes.texts]
    assert cell_texts == ([str(value) for row in cm for value in row] if num_labels <= 20 else [])


def test_model_card_round_trips_eval_results_and_leaks_no_token(tmp_path):
    metrics = results()
    config = {"model_preset": "vit_tiny", "learning_rate": 1e-3, "num_train_epochs": 3, "hub_token": SECRET,
              "push_to_hub_token": SECRET, "mixup_alpha": 0.8, "output_dir": str(tmp_path),
              "hub": {"repo_id": "me/vit", "HF_TOKEN": SECRET}}
    card = write_model_card(tmp_path, config, metrics, LABELS, hardware="1x NVIDIA H200", train_runtime=3725.0,
                            dataset_name="uoft-cs/cifar10", model_name="vit-tiny-cifar10")

    text = (tmp_path / "README.md").read_text()
    assert SECRET not in text and "token" not in text.lower()
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.content == card.content
    data = loaded.data
    assert data.library_name == "transformers"
    assert data.tags == ["image-classification", "vision", "vit", "hf_vit"]
    assert data.datasets == ["uoft-cs/cifar10"]
    assert data.metrics == ["accuracy"]
    values = {result.metric_type: result.metric_value for result in data.eval_results}
    assert values == {"accuracy": metrics["accuracy"], "top_2_accuracy": metrics["top2_accuracy"]}
    assert all(result.dataset_name == "uoft-cs/cifar10" for result in data.eval_results)
    assert "| mixup_alpha | 0.8 |" in text
    assert "1x NVIDIA H200" in text and "1h 02m" in text
    assert "| bird | " in text  # the per-class results table


@pytest.mark.parametrize("preset, model_type, tag, family", [
    ("vit_tiny_cifar", "vit", "vit", "Vision Transformer"),
    ("vit_tiny_cifar", None, "vit", "Vision Transformer"),  # a trainer that does not pass model_type yet
    ("resnet50", "resnet", "resnet", "ResNet"),
    ("cnn_tiny_cifar", "convnext", "convnext", "ConvNeXt"),
    ("cnn_tiny_cifar", None, None, None),
])
def test_model_card_names_the_model_family_and_never_calls_a_cnn_a_vision_transformer(tmp_path, preset, model_type,
                                                                                        tag, family):
    card = write_model_card(tmp_path, {"model_preset": preset}, {"eval_accuracy": 0.9}, LABELS, "CPU", 1.0,
                            "cifar10", "run", model_type=model_type)
    assert ModelCard.load(tmp_path / "README.md").data.tags == \
        ["image-classification", "vision", *([tag] if tag else []), "hf_vit"]
    assert (f"A {preset} ({family}) image classifier" if family else f"A {preset} image classifier") in card.content
    if tag != "vit":
        assert "Vision Transformer" not in card.content and "vit" not in card.data.tags


def test_model_card_reads_a_flat_all_results_dict(tmp_path):
    flat = {"eval_accuracy": 0.91, "eval_top5_accuracy": 0.995, "eval_loss": 0.3, "epoch": 3.0}
    write_model_card(tmp_path, {}, flat, LABELS, "CPU", 12.0, "cifar10", "run")
    eval_results = ModelCard.load(tmp_path / "README.md").data.eval_results
    assert [(r.metric_type, r.metric_value) for r in eval_results] == [("accuracy", 0.91), ("top_5_accuracy", 0.995)]


def make_run(root, name, *, preset, accuracy, fraction, params_from):
    run_dir = root / name
    run_dir.mkdir()
    # Stopped early (max_train_steps): 3 of the 10 configured epochs were run.
    all_results = {"eval_accuracy": accuracy, "eval_top5_accuracy": accuracy + 0.05, "train_runtime": 754.2,
                   "epoch": 3.0}
    if params_from == "results":
        all_results["num_parameters"] = 5_717_416
    else:
        save_file({"weight": np.zeros((192, 768), dtype=np.float32), "bias": np.zeros(192, dtype=np.float32)},
                  str(run_dir / "model.safetensors"))
    (run_dir / "all_results.json").write_text(json.dumps(all_results))
    config = {"model_preset": preset, "model_name_or_path": None, "dataset_name": "cifar10",
              "train_fraction": fraction, "num_train_epochs": 10, "total_train_batch_size": 128}
    (run_dir / "train_config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "log_history.json").write_text(json.dumps(log_history(accuracy_start=accuracy - 0.3)))
    return run_dir


def test_report_compares_runs_in_a_markdown_table_and_writes_files(tmp_path, capsys):
    tiny = make_run(tmp_path, "tiny", preset="vit_tiny", accuracy=0.81, fraction=1.0, params_from="results")
    small = make_run(tmp_path, "small", preset="vit_small", accuracy=0.88, fraction=0.1, params_from="weights")
    out = tmp_path / "comparison"

    main([str(tiny), str(small), "--output_dir", str(out)])

    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| run | model | params | data | epochs | eval accuracy | top-5 | train time |"
    assert lines[2] == "| tiny | vit_tiny | 5.7M | cifar10 | 3 | 0.8100 | 0.8600 | 12m 34s |"
    assert lines[3] == "| small | vit_small | 147.6K | cifar10 (10%) | 3 | 0.8800 | 0.9300 | 12m 34s |"
    assert "| small | vit_small |" in (out / "comparison.md").read_text()
    assert_valid_png(out / "comparison.png")


def test_report_shows_fractional_epochs_actually_run(tmp_path, capsys):
    run = make_run(tmp_path, "run", preset="vit_tiny", accuracy=0.5, fraction=1.0, params_from="results")
    results = json.loads((run / "all_results.json").read_text())
    (run / "all_results.json").write_text(json.dumps({**results, "epoch": 2.456}))
    main([str(run)])
    assert "| run | vit_tiny | 5.7M | cifar10 | 2.46 | 0.5000 |" in capsys.readouterr().out


def test_comparison_plot_draws_each_runs_eval_accuracy_against_epoch(tmp_path):
    tiny = make_run(tmp_path, "tiny", preset="vit_tiny", accuracy=0.81, fraction=1.0, params_from="results")
    small = make_run(tmp_path, "small", preset="vit_small", accuracy=0.88, fraction=0.1, params_from="results")
    runs = [load_run(tiny), load_run(small)]
    figure = plot_comparison(runs, ["tiny", "small"], tmp_path / "comparison.png")
    assert_valid_png(tmp_path / "comparison.png")
    assert plotted(figure.axes[0]) == {name: expected(run["history"], "eval_accuracy", x="epoch")
                                       for name, run in zip(["tiny", "small"], runs)}


@pytest.mark.parametrize("problem", ["missing", "no_results"])
def test_report_rejects_a_directory_that_is_not_a_finished_run(tmp_path, capsys, problem):
    run_dir = tmp_path / "run"
    if problem == "no_results":
        run_dir.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(run_dir)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(run_dir) in err and len(err.splitlines()) == 1
    assert ("does not exist" if problem == "missing" else "all_results.json") in err
