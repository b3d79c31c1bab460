"""What a finished run scores on its final weights: the validation carve-out fixed by split_seed (not the training
seed), test_split and train_eval_samples scored once after training, and the per-example predictions of every scored
set (hf_vit.predictions), the same rows on 1 and on 2 processes."""

from __future__ import annotations

import json

import datasets
import pytest

from conftest import run_script
from hf_vit.config import DataArguments, parse_config
from hf_vit.data import DataSource, example_key, load_splits, open_dataset
from hf_vit.errors import UserError
from hf_vit.predictions import read_predictions, scored_set_fingerprint, write_predictions
from hf_vit.run_dir import PREDICTION_FILES
from test_data import make_dataset

CORRUPT_TEST_ROW = 5

RUN_ARGS = ["--model_preset", "vit_tiny_cifar", "--image_size", "16", "--patch_size", "8", "--hidden_size", "32",
            "--intermediate_size", "64", "--num_hidden_layers", "1", "--num_attention_heads", "2",
            "--total_train_batch_size", "16", "--max_train_steps", "2", "--crop_padding", "2",
            "--train_val_split", "0.25", "--test_split", "test", "--train_eval_samples", "20",
            "--per_device_eval_batch_size", "8", "--report_to", "none", "--checkpointing_steps", "no",
            # Weights that barely move: 1 and 2 processes then predict alike, so their rows can be compared exactly.
            "--learning_rate", "1e-9", "--warmup_start_lr", "0", "--min_lr", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """96 train and 24 test 16 px images (save_to_disk); test row 5 is corrupt."""
    path = tmp_path_factory.mktemp("final") / "ds"
    test = make_dataset(24, seed=8, size=16, corrupt={CORRUPT_TEST_ROW: b"not an image"})
    datasets.DatasetDict({"train": make_dataset(96, seed=7, size=16), "test": test}).save_to_disk(str(path))
    return path


def run(data, out, *extra, nproc=1):
    run_script(["run_finetune.py", "--dataset_name", str(data), *RUN_ARGS, "--output_dir", str(out), *extra],
               nproc=nproc, timeout=300, env={"OMP_NUM_THREADS": "1"})
    return json.loads((out / "all_results.json").read_text())


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "one"
    return out, run(data, out, "--seed", "1", "--dataloader_num_workers", "0")


def test_split_seed_decides_the_carve_out_and_the_training_seed_does_not(data, finished, tmp_path):
    def val_keys(split_seed):
        return sorted(example_key(r["image"]) for r in
                      load_splits(DataArguments(dataset_name=str(data), train_val_split=0.25,
                                                split_seed=split_seed)).eval)

    assert val_keys(0) != val_keys(1)
    out, results = finished
    other = run(data, tmp_path / "seed2", "--seed", "2", "--dataloader_num_workers", "0", "--streaming")
    assert other["eval_fingerprint"] == results["eval_fingerprint"]  # another seed (and streamed): the same images
    assert sorted(k for _, k, _, _ in read_predictions(out / PREDICTION_FILES["eval"])) == val_keys(0)
    # The first training images of a stream are the map-style split's first ones.
    assert other["train_eval_fingerprint"] == results["train_eval_fingerprint"]


def test_final_sets_are_recorded_with_their_predictions(data, finished):
    out, results = finished
    splits = load_splits(parse_config(["--dataset_name", str(data), *RUN_ARGS]).data)
    test_rows = read_predictions(out / PREDICTION_FILES["test"])
    # One row per usable test image, in the split's order; the corrupt one has none.
    expected = [(i, example_key(r["image"]), r["label"]) for i, r in enumerate(splits.test) if i != CORRUPT_TEST_ROW]
    assert [row[:3] for row in test_rows] == expected
    assert all(0 <= row[3] < 4 for row in test_rows)
    assert (results["test_samples"], results["test_fingerprint"]) == (23, scored_set_fingerprint(test_rows))
    assert results["test_accuracy"] == sum(r[2] == r[3] for r in test_rows) / 23
    # The first 20 training images as the run trained on them: after the carve-out.
    train_rows = read_predictions(out / PREDICTION_FILES["train_eval"])
    first = splits.train.select(range(20))
    assert [row[:3] for row in train_rows] == [(i, example_key(r["image"]), r["label"]) for i, r in enumerate(first)]
    assert results["train_eval_samples"] == 20 and 0 <= results["train_eval_accuracy"] <= 1
    assert results["train_eval_fingerprint"] == scored_set_fingerprint(train_rows)
    eval_rows = read_predictions(out / PREDICTION_FILES["eval"])
    assert results["eval_samples"] == len(eval_rows) and results["eval_fingerprint"] == scored_set_fingerprint(eval_rows)
    assert [r[0] for r in eval_rows] == list(range(len(eval_rows)))
    assert (out / PREDICTION_FILES["eval"]).read_text().splitlines()[0] == "index,key,label,prediction"


def test_two_processes_write_the_same_rows(data, finished, tmp_path):
    out, results = finished
    two = tmp_path / "two"
    other = run(data, two, "--seed", "1", "--dataloader_num_workers", "1", nproc=2)
    for name, file in PREDICTION_FILES.items():
        assert read_predictions(two / file) == read_predictions(out / file), name
        assert other[f"{name}_fingerprint"] == results[f"{name}_fingerprint"]


def test_fingerprint_depends_on_the_examples_and_labels_only(tmp_path):
    rows = [(0, "a/1.jpg", 0, 3), (2, "a,b/2.jpg", 1, 1)]
    write_predictions(tmp_path / "p.csv", rows)
    assert read_predictions(tmp_path / "p.csv") == rows  # a key with a comma survives the CSV
    shuffled = [(9, "a,b/2.jpg", 1, 0), (4, "a/1.jpg", 0, 0)]
    assert scored_set_fingerprint(shuffled) == scored_set_fingerprint(rows)
    assert scored_set_fingerprint([(0, "a/1.jpg", 2, 3), rows[1]]) != scored_set_fingerprint(rows)


def test_a_bad_test_split_is_a_one_line_error(data):
    from hf_vit.plan import make_plan

    with pytest.raises(UserError, match=r"split 'nope' not found.*\['train', 'test'\].*--test_split"):
        make_plan(parse_config(["--dataset_name", str(data), *RUN_ARGS, "--test_split", "nope"]))
    with pytest.raises(UserError, match="test_split='train' is also the train_split"):
        make_plan(parse_config(["--dataset_name", str(data), *RUN_ARGS, "--test_split", "train"]))


def test_dataset_revision_reaches_the_hub_and_is_ignored_for_a_local_folder(data, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: calls.append(kw) or {})
    open_dataset(DataSource.named("someone/pinned-data", revision="v1.0"))
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    open_dataset(DataSource.named(str(folder), revision="v1.0"))
    assert [c["revision"] for c in calls] == ["v1.0", None]
