"""The eval command, the folder every run leaves behind (results, plots, model card, tracker logs) and its interop
with transformers — all from one short training run on CIFAR-10 (the shared copy, or conftest's stand-in)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CIFAR10, TINY_ARGS, run_script
from hf_vit import eval as hf_eval
from hf_vit.errors import UserError, run_cli

# Ten steps are enough: the tests need a finished run folder, not a good model.
RUN_ARGS = [*TINY_ARGS, "--max_train_samples", "320", "--num_train_epochs", "1", "--warmup_epochs", "0.25",
            "--checkpointing_steps", "no", "--report_to", "tensorboard"]


def eval_args(model_dir, *extra) -> list[str]:
    """The eval command on the validation slice the training run carved out (TINY_ARGS: 2% of train, split_seed 0,
    capped at 128 examples)."""
    return ["--model_name_or_path", str(model_dir), "--dataset_name", str(CIFAR10), "--eval_split", "train",
            "--train_val_split", "0.02", "--split_seed", "0", "--max_eval_samples", "128",
            "--per_device_eval_batch_size", "16", "--dataloader_num_workers", "0", *extra]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cifar10_path):
    out = tmp_path_factory.mktemp("eval") / "run"
    run_script(["run_finetune.py", *RUN_ARGS, "--output_dir", str(out)])
    return out


@pytest.fixture(scope="module")
def single_process_eval(run_dir, tmp_path_factory):
    """``python -m hf_vit.eval`` in this process (saves a second interpreter start): (output dir, stdout)."""
    out = tmp_path_factory.mktemp("eval_1proc")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # accelerate's state it leaves is reset by conftest's autouse fixture
        hf_eval.main(eval_args(run_dir, "--output_dir", str(out)))
    return out, stdout.getvalue()


def read_json(path):
    return json.loads(path.read_text())


def assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()


def same_picture(a, b) -> bool:
    with Image.open(a) as first, Image.open(b) as second:
        return np.array_equal(np.asarray(first.convert("RGB")), np.asarray(second.convert("RGB")))


# ------------------------------------------------------------------------------------------------ the eval command
def test_eval_of_the_carved_validation_slice_reproduces_the_training_runs_final_eval(run_dir, single_process_eval):
    out, stdout = single_process_eval
    trained = read_json(run_dir / "all_results.json")
    trained_eval = read_json(run_dir / "eval_results.json")
    results = read_json(out / "eval_results.json")
    assert results["eval_samples"] == trained["eval_samples"] == 128
    assert results["eval_accuracy"] == trained["eval_accuracy"]
    assert results["eval_top5_accuracy"] == trained["eval_top5_accuracy"]
    # Batches of 16 here, of 256 in training: the per-example losses are summed in another order.
    assert results["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-5)
    assert results["confusion_matrix"] == trained_eval["confusion_matrix"]
    assert results["per_class"] == trained_eval["per_class"]
    assert set(results["per_class"]) == {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                         "ship", "truck"}
    matrix = read_json(out / "confusion_matrix.json")
    assert matrix["confusion_matrix"] == results["confusion_matrix"] and matrix["label_names"][0] == "airplane"
    assert sum(map(sum, matrix["confusion_matrix"])) == 128
    assert_png(out / "confusion_matrix.png")
    assert f"| eval_accuracy | {trained['eval_accuracy']:.4f} |" in stdout
    assert "| class | accuracy | precision | recall | f1 | support |" in stdout


def test_two_processes_give_the_same_results_as_one(run_dir, single_process_eval, tmp_path):
    one = read_json(single_process_eval[0] / "eval_results.json")
    proc = run_script(["-m", "hf_vit.eval", *eval_args(run_dir, "--output_dir", str(tmp_path))], nproc=2)
    two = read_json(tmp_path / "eval_results.json")
    assert "2 process(es)" in proc.stderr  # really split over two ranks (16-example blocks, 8 per rank)
    assert proc.stdout.count("| eval_accuracy |") == 1  # the table is printed once, by the main process
    assert two["eval_loss"] == pytest.approx(one.pop("eval_loss"), rel=1e-6)
    assert {k: v for k, v in two.items() if k != "eval_loss"} == one


def eval_error(args, capsys) -> str:
    """The one ``error:`` line the eval command ends with (before it, stderr may hold the progress bars of a dataset
    prepared for the first time on this machine)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(hf_eval.main, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, err
    return lines[-1]


def test_a_model_whose_labels_differ_from_the_dataset_is_a_one_line_error(run_dir, imagenet_sample_path, capsys):
    err = eval_error(["--model_name_or_path", str(run_dir), "--dataset_name", str(imagenet_sample_path),
                      "--eval_split", "train", "--dataloader_num_workers", "0"], capsys)
    assert str(run_dir) in err and str(imagenet_sample_path) in err
    assert "10 classes ['airplane'" in err and "1000 classes ['tench'" in err


def test_same_class_count_but_other_names_names_the_first_difference():
    with pytest.raises(UserError, match=r"class 1 is 'car' in model 'm' but 'automobile' in dataset 'd'"):
        hf_eval.check_labels(["airplane", "car"], ["airplane", "automobile"], "m", "d")


@pytest.mark.parametrize("split_args, message", [
    (["--eval_split", "test"], "split 'test' not found; dataset '{data}' has splits ['train']"),
    ([], "pass --eval_split; dataset '{data}' has splits ['train']"),
])
def test_a_missing_split_is_a_one_line_error_listing_the_splits(run_dir, capsys, split_args, message):
    err = eval_error(["--model_name_or_path", str(run_dir), "--dataset_name", str(CIFAR10), *split_args], capsys)
    assert err == "error: " + message.format(data=CIFAR10)


def test_results_go_beside_a_local_model_or_to_eval_name_for_a_hub_id(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoint-4").mkdir(parents=True)
    # Never into the run folder or a checkpoint: a sibling <run>-eval (its checkpoints in sub-folders of it).
    assert hf_eval.default_output_dir(str(run)) == str(tmp_path / "run-eval")
    assert hf_eval.default_output_dir(str(run / "checkpoint-4")) == str(tmp_path / "run-eval" / "checkpoint-4")
    monkeypatch.chdir(tmp_path)
    assert hf_eval.default_output_dir("google/vit-base-patch16-224") == str(tmp_path / "eval_vit-base-patch16-224")


# ------------------------------------------------------------------------------------------------ the run folder
def test_run_folder_holds_results_plots_and_a_model_card_that_parses_back(run_dir, tmp_path):
    from huggingface_hub import ModelCard

    from hf_vit.report import plot_confusion_matrix, plot_learning_curve

    for name in ("all_results.json", "eval_results.json", "learning_curve.png", "confusion_matrix.png", "README.md"):
        assert (run_dir / name).is_file(), name
    assert_png(run_dir / "learning_curve.png")
    assert_png(run_dir / "confusion_matrix.png")
    # Each plot is the picture of this run's numbers, pixel for pixel, and not the picture of no numbers.
    plot_learning_curve(read_json(run_dir / "log_history.json"), tmp_path / "curve.png")
    plot_learning_curve([], tmp_path / "no_curve.png")
    assert same_picture(run_dir / "learning_curve.png", tmp_path / "curve.png")
    assert not same_picture(run_dir / "learning_curve.png", tmp_path / "no_curve.png")
    names = [read_json(run_dir / "config.json")["id2label"][str(i)] for i in range(10)]
    plot_confusion_matrix(read_json(run_dir / "eval_results.json")["confusion_matrix"], names, tmp_path / "cm.png")
    plot_confusion_matrix([[0] * 10 for _ in range(10)], names, tmp_path / "no_cm.png")
    assert same_picture(run_dir / "confusion_matrix.png", tmp_path / "cm.png")
    assert not same_picture(run_dir / "confusion_matrix.png", tmp_path / "no_cm.png")
    results = read_json(run_dir / "all_results.json")
    card = ModelCard.load(run_dir / "README.md")
    parsed = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert parsed == {"accuracy": results["eval_accuracy"], "top_5_accuracy": results["eval_top5_accuracy"]}
    assert {r.task_type for r in card.data.eval_results} == {"image-classification"}
    assert {r.dataset_name for r in card.data.eval_results} == {str(CIFAR10)}


def test_report_prints_a_table_row_per_run(run_dir, tmp_path, capsys):
    from hf_vit.report import main as report_main

    # A second run folder: the same run under another name (a second training run would double the test's time).
    other = tmp_path / "run_copy"
    other.mkdir()
    for name in ("all_results.json", "train_config.yaml", "log_history.json", "config.json"):
        shutil.copy(run_dir / name, other / name)
    report_main([str(run_dir), str(other)])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert table[0].startswith("| run | model | params | data | epochs | eval accuracy | top-5 |")
    rows = table[2:]
    accuracy = f"{read_json(run_dir / 'all_results.json')['eval_accuracy']:.4f}"
    assert len(rows) == 2
    assert rows[0].startswith("| run | vit_tiny_cifar |") and rows[1].startswith("| run_copy | vit_tiny_cifar |")
    assert all(accuracy in row for row in rows)


def test_tensorboard_tracker_logs_the_loop_scalars_under_output_dir(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(run_dir.glob("hf_vit/**/events.out.tfevents.*"))
    events = EventAccumulator(str(run_dir / "hf_vit"))
    events.Reload()
    assert {"train_loss", "learning_rate", "eval_accuracy", "eval_top5_accuracy", "eval_loss"} <= \
        set(events.Tags()["scalars"])
    final = events.Scalars("eval_accuracy")[-1]
    results = read_json(run_dir / "all_results.json")
    assert final.step == results["global_step"]
    assert final.value == pytest.approx(results["eval_accuracy"])


def test_report_to_auto_picks_tensorboard_and_an_unavailable_tracker_is_an_error():
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    from hf_vit.runtime import trackers as _trackers

    assert _trackers("auto") == ["tensorboard"]  # tensorboard is a test dependency
    assert _trackers("tensorboard") == ["tensorboard"]
    assert _trackers("none") is None
    with pytest.raises(UserError, match="'tensorbored' is not a tracker"):
        _trackers("tensorbored")
    missing = sorted(set(LOGGER_TYPE_TO_CLASS) - {str(t) for t in get_available_trackers()})
    if missing:
        with pytest.raises(UserError, match=f"report_to '{missing[0]}' needs the {missing[0]} package"):
            _trackers(f"tensorboard,{missing[0]}")


# ------------------------------------------------------------------------------------------------------ interop
def test_auto_classes_load_the_run_folder_offline(run_dir):
    from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTForImageClassification

    model = AutoModelForImageClassification.from_pretrained(run_dir)
    processor = AutoImageProcessor.from_pretrained(run_dir)
    assert isinstance(model, ViTForImageClassification)
    assert [model.config.id2label[i] for i in range(10)][:3] == ["airplane", "automobile", "bird"]
    assert (processor.size["height"], processor.size["width"]) == (32, 32)


def test_pipeline_predicts_the_same_label_as_the_eval_loop_on_raw_cifar_images(run_dir):
    import datasets
    from transformers import AutoImageProcessor, ViTForImageClassification, pipeline

    from hf_vit.data import ImageSpec, eval_transform, normalize

    images = list(datasets.load_dataset(str(CIFAR10), split="train").select(range(48))["img"])
    classifier = pipeline("image-classification", model=str(run_dir), device="cpu")
    predicted = [out[0] for out in classifier(images, top_k=1)]

    # The eval loop's path: the checkpoint's image processor -> eval_transform (uint8) -> normalize -> the model.
    model = ViTForImageClassification.from_pretrained(run_dir).eval()
    spec = ImageSpec.from_processor(AutoImageProcessor.from_pretrained(run_dir))
    pixels = torch.stack([eval_transform(spec)(image) for image in images])
    with torch.no_grad():
        logits = model(pixel_values=normalize(pixels, torch.tensor(spec.mean), torch.tensor(spec.std))).logits
    probs = logits.softmax(-1)
    assert [p["label"] for p in predicted] == [model.config.id2label[i] for i in probs.argmax(-1).tolist()]
    assert np.allclose([p["score"] for p in predicted], probs.max(-1).values.numpy(), atol=1e-4)
    assert len({p["label"] for p in predicted}) > 1  # a model that predicts one class would prove little
