"""Learning-curve and confusion plots, the model card round trip, and the run comparison command."""

import json

import numpy as np
import pytest
import yaml
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.numpy import save_file

from hf_vit.errors import run_cli
from hf_vit.evaluation import compute_metrics
from hf_vit.report import main, plot_confusion_matrix, plot_learning_curve, write_model_card

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
                            "learning_rate": 1e-3 * (1 - step / (epochs * steps_per_epoch))})
        accuracy = accuracy_start + 0.1 * epoch
        record = {"step": epoch * steps_per_epoch, "epoch": float(epoch), "eval_accuracy": accuracy,
                  "eval_top5_accuracy": min(1.0, accuracy + 0.3), "eval_loss": 1.0 / epoch}
        if ema:
            record["eval_ema_accuracy"] = accuracy + 0.01
        records.append(record)
    return records


def results():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=50)
    logits = rng.standard_normal((50, 3)).astype(np.float32)
    logits[np.arange(50), labels] += 1.0
    return compute_metrics(logits, labels, LABELS, k=2)


def test_learning_curve_is_a_png(tmp_path):
    path = plot_learning_curve(log_history(ema=True), tmp_path / "learning_curve.png")
    assert_valid_png(path)


def test_learning_curve_tolerates_a_history_without_eval_records(tmp_path):
    train_only = [record for record in log_history() if "train_loss" in record]
    assert_valid_png(plot_learning_curve(train_only, tmp_path / "curve.png"))


@pytest.mark.parametrize("num_labels", [3, 100])
def test_confusion_matrix_is_a_png(tmp_path, num_labels):
    cm = np.random.default_rng(0).integers(0, 20, size=(num_labels, num_labels)).tolist()
    cm[0] = [0] * num_labels  # an absent class must not divide by zero
    path = plot_confusion_matrix(cm, [f"c{i}" for i in range(num_labels)], tmp_path / "cm.png")
    assert_valid_png(path)


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


def test_model_card_reads_a_flat_all_results_dict(tmp_path):
    flat = {"eval_accuracy": 0.91, "eval_top5_accuracy": 0.995, "eval_loss": 0.3, "epoch": 3.0}
    write_model_card(tmp_path, {}, flat, LABELS, "CPU", 12.0, "cifar10", "run")
    eval_results = ModelCard.load(tmp_path / "README.md").data.eval_results
    assert [(r.metric_type, r.metric_value) for r in eval_results] == [("accuracy", 0.91), ("top_5_accuracy", 0.995)]


def make_run(root, name, *, preset, accuracy, fraction, params_from):
    run_dir = root / name
    run_dir.mkdir()
    all_results = {"eval_accuracy": accuracy, "eval_top5_accuracy": accuracy + 0.05, "train_runtime": 754.2,
                   "epoch": 3.0}
    if params_from == "results":
        all_results["num_parameters"] = 5_717_416
    else:
        save_file({"weight": np.zeros((192, 768), dtype=np.float32), "bias": np.zeros(192, dtype=np.float32)},
                  str(run_dir / "model.safetensors"))
    (run_dir / "all_results.json").write_text(json.dumps(all_results))
    config = {"model_preset": preset, "model_name_or_path": None, "dataset_name": "cifar10",
              "train_fraction": fraction, "num_train_epochs": 3, "total_train_batch_size": 128}
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
