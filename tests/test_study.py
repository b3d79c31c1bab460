"""Studies (``python -m hf_vit.study``): the study file (grid, precedence, references, one-line errors), derived
datasets, the run folders' states, a tiny study killed during its second run and restarted, and findings.md — whose
numbers must equal the runs' own all_results.json and whose verdicts must follow from them."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from conftest import CIFAR10, REPO, run_script
from PIL import Image

from hf_vit.config import parse_config
from hf_vit.errors import UserError, run_cli
from hf_vit.study import build_dataset, fresh_accelerate_state, main, run_status, run_study
from hf_vit.study_file import load_study

CLASSES = ["c0", "c1", "c2", "c3"]
TINY_VIT = {"model_preset": "vit_tiny_cifar", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 1,
            "intermediate_size": 16, "image_size": 8, "patch_size": 4, "max_train_steps": 3,
            "dataloader_num_workers": 0, "report_to": "none"}


# ------------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """64 8x8 images, 4 classes, 16 per class in interleaved order (a class is a colour), saved with save_to_disk."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(64):
        label = i % 4
        pixels = rng.integers(0, 60, size=(8, 8, 3), dtype=np.uint8)
        pixels[:, :, label % 3] += 150
        if label == 3:
            pixels[:4] = 255
        images.append(Image.fromarray(pixels))
        labels.append(label)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    path = tmp_path_factory.mktemp("tiny") / "data"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)}
                         ).save_to_disk(str(path))
    return path


def write_study(folder: Path, study: dict, name: str = "study.yaml") -> str:
    path = folder / name
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return str(path)


def write_recipe(folder: Path, name: str, values: dict) -> str:
    (folder / name).write_text(yaml.safe_dump(values))
    return name


def flags(run) -> dict[str, str]:
    """A run's argv as {flag: value}."""
    argv = run.argv()
    return {argv[i][2:]: argv[i + 1] for i in range(0, len(argv), 2)}


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """{relative path: (mtime_ns, sha256)} of every file under ``folder``."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def markdown_table(text: str, first_header: str, after: str = "") -> list[dict[str, str]]:
    """The rows of the first Markdown table after the line ``after`` whose header starts with ``| first_header |``,
    as dicts by column."""
    lines = text.splitlines()
    begin = next(i for i, line in enumerate(lines) if line.startswith(after)) if after else 0
    start = next(i for i, line in enumerate(lines) if i >= begin and line.startswith(f"| {first_header} |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))))
    return rows


def study_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------------ the study file
def test_grid_expands_labelled_variants_times_flag_values_into_named_run_folders(tmp_path):
    (tmp_path / "studies").mkdir()
    write_recipe(tmp_path, "vit.yaml", {"model_preset": "vit_tiny_cifar"})
    write_recipe(tmp_path, "cnn.yaml", {"model_preset": "cnn_tiny_cifar"})
    path = write_study(tmp_path / "studies", {"runs": [
        {"name": "{model}_f{train_fraction}", "learning_rate": 0.002, "grid": {
            "model": {"vit": {"recipe": "../vit.yaml"}, "cnn": {"recipe": "../cnn.yaml", "learning_rate": 0.004}},
            "train_fraction": [0.1, 1.0]}},
        {"name": "single", "recipe": "../vit.yaml"},
    ]})
    study = load_study(path, str(tmp_path / "out"))

    assert [run.name for run in study.runs] == ["vit_f0.1", "vit_f1.0", "cnn_f0.1", "cnn_f1.0", "single"]
    # Recipes are relative to the study file's folder.
    assert [run.recipe for run in study.runs] == [str(tmp_path / recipe) for recipe in
                                                  ("vit.yaml", "vit.yaml", "cnn.yaml", "cnn.yaml", "vit.yaml")]
    assert [flags(run) for run in study.runs[:4]] == [
        {"config": run.recipe, "learning_rate": lr, "train_fraction": fraction,
         "output_dir": str(tmp_path / "out" / name)}
        for run, name, lr, fraction in zip(study.runs, ["vit_f0.1", "vit_f1.0", "cnn_f0.1", "cnn_f1.0"],
                                           ["0.002", "0.002", "0.004", "0.004"], ["0.1", "1.0", "0.1", "1.0"])]


def test_flags_override_in_order_recipe_defaults_run_variant_grid_then_command_line(tmp_path):
    recipe = write_recipe(tmp_path, "recipe.yaml", {"learning_rate": 0.1, "weight_decay": 0.1, "seed": 1,
                                                    "label_smoothing": 0.1, "min_lr": 0.1, "warmup_epochs": 0.1})
    path = write_study(tmp_path, {
        "defaults": {"weight_decay": 0.2, "seed": 2, "label_smoothing": 0.2, "min_lr": 0.2, "warmup_epochs": 0.2},
        "runs": [{"name": "run_{x}", "recipe": recipe, "seed": 3, "label_smoothing": 0.3, "min_lr": 0.3,
                  "warmup_epochs": 0.3, "grid": {"x": {"a": {"label_smoothing": 0.4, "min_lr": 0.4,
                                                             "warmup_epochs": 0.4}}}}]})
    study = load_study(path, str(tmp_path / "out"), ["min_lr=0.5", "warmup_epochs=0.5", "run_{x}.warmup_epochs=0.6"])
    cfg = parse_config(study.runs[0].argv())
    # A --set default sits with the study's defaults: below the run's own flags.
    assert (cfg.train.learning_rate, cfg.train.weight_decay, cfg.train.seed, cfg.train.label_smoothing,
            cfg.train.min_lr, cfg.train.warmup_epochs) == (0.1, 0.2, 3, 0.4, 0.4, 0.6)
    by_run_name = load_study(path, str(tmp_path / "out"), ["run_a.seed=7"])
    assert parse_config(by_run_name.runs[0].argv()).train.seed == 7


def test_references_name_earlier_run_folders_derived_datasets_and_defaults(tmp_path):
    path = write_study(tmp_path, {
        "defaults": {"dataset_name": "/data/cifar10"},
        "datasets": {"half": {"source": "${defaults.dataset_name}", "classes": ["c0", "c1"],
                              "splits": {"validation": {"take": 2}, "train": {"skip": 2}}}},
        "runs": [{"name": "pretrain", "dataset_name": "${datasets.half}"},
                 {"name": "finetune", "model_name_or_path": "${runs.pretrain}"}]})
    study = load_study(path, str(tmp_path / "out"), ["dataset_name=/local/cifar10"])
    assert study.datasets[0].source == "/local/cifar10" and study.datasets[0].path == tmp_path / "out" / "data" / "half"
    assert flags(study.runs[0])["dataset_name"] == str(tmp_path / "out" / "data" / "half")
    assert flags(study.runs[1])["model_name_or_path"] == str(tmp_path / "out" / "pretrain")
    assert flags(study.runs[1])["dataset_name"] == "/local/cifar10"
    assert study.runs[1].referenced == {"model_name_or_path"}


GOOD_RUN = {"name": "a", "model_preset": "vit_tiny_cifar"}
BAD_STUDIES = {
    "unknown study key": ({"rnus": [], "runs": [GOOD_RUN]}, [], "'rnus'"),
    "unknown run key": ({"runs": [{**GOOD_RUN, "learning_rte": 0.1}]}, [], "'learning_rte'"),
    "managed key": ({"runs": [{**GOOD_RUN, "output_dir": "/x"}]}, [], "'output_dir'"),
    "null flag": ({"runs": [{**GOOD_RUN, "crop_padding": None}]}, [], "crop_padding"),
    "later run": ({"runs": [{**GOOD_RUN, "model_name_or_path": "${runs.b}"}, {"name": "b"}]}, [], "${runs.b}"),
    "own run": ({"runs": [{**GOOD_RUN, "model_name_or_path": "${runs.a}"}]}, [], "${runs.a}"),
    "unknown dataset": ({"runs": [{**GOOD_RUN, "dataset_name": "${datasets.x}"}]}, [], "${datasets.x}"),
    "not a reference": ({"runs": [{**GOOD_RUN, "dataset_name": "${run.a}"}]}, [], "${run.a}"),
    "grid name": ({"runs": [{"name": "a", "grid": {"seed": [1, 2]}}]}, [], "{seed}"),
    "unknown placeholder": ({"runs": [{"name": "a_{x}"}]}, [], "{x}"),
    "same name": ({"runs": [GOOD_RUN, GOOD_RUN]}, [], "'a'"),
    "overlapping splits": ({"datasets": {"d": {"source": "x", "splits": {"train": {"skip": 0, "take": 5},
                                                                         "validation": {"skip": 3}}}},
                            "runs": [GOOD_RUN]}, [], "datasets.d"),
    "set unknown run": ({"runs": [GOOD_RUN]}, ["b.seed=1"], "'b'"),
    "set unknown flag": ({"runs": [GOOD_RUN]}, ["sede=1"], "'sede'"),
    "bad recipe key": ({"runs": [{**GOOD_RUN, "recipe": "bad.yaml"}]}, [], "learning_rte"),
    "seeds not a list": ({"runs": [{**GOOD_RUN, "seeds": 3}]}, [], "seeds must be"),
    "negative seed": ({"runs": [{**GOOD_RUN, "seeds": [1, -2]}]}, [], "seeds must be"),
    "repeated seed": ({"runs": [{**GOOD_RUN, "seeds": [1, 1]}]}, [], "seeds must be"),
    "seed and seeds": ({"runs": [{**GOOD_RUN, "seed": 4, "seeds": [1, 2]}]}, [], "keep seeds"),
    "short pin": ({"datasets": {"d": {"source": "x", "source_fingerprint": "abc", "splits": {"train": {}}}},
                   "runs": [GOOD_RUN]}, [], "source_fingerprint"),
    "tuned_on fraction": ({"datasets": {"d": {"source": "x", "tuned_on": {"fraction": 1.5, "seed": 1},
                                              "splits": {"train": {}}}}, "runs": [GOOD_RUN]}, [], "tuned_on"),
    "tuned_on keys": ({"datasets": {"d": {"source": "x", "tuned_on": {"fraction": 0.1},
                                          "splits": {"train": {}}}}, "runs": [GOOD_RUN]}, [], "tuned_on"),
}


@pytest.mark.parametrize("case", list(BAD_STUDIES))
def test_a_mistake_in_the_study_is_a_one_line_error_naming_the_file_and_the_key(tmp_path, capsys, case):
    study, sets, key = BAD_STUDIES[case]
    write_recipe(tmp_path, "bad.yaml", {"learning_rte": 0.1})
    path = write_study(tmp_path, study)
    err = study_error(capsys, [path, "--output_dir", str(tmp_path / "out"), "--dry_run",
                               *[arg for item in sets for arg in ("--set", item)]])
    assert key in err
    if not case.startswith("set "):
        assert path in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- run folders
def fake_run(study, name: str, state: str) -> None:
    """Make the folder of study run ``name`` look ``done``, ``resume`` or ``restart`` (with its real config)."""
    run = next(run for run in study.runs if run.name == name)
    run.output_dir.mkdir(parents=True)
    (run.output_dir / "train_config.yaml").write_text(yaml.safe_dump(parse_config(run.argv()).to_dict()))
    if state == "done":
        (run.output_dir / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.5}))
    if state == "resume":  # a complete checkpoint: the folder holds its state file
        (run.output_dir / "checkpoint-3").mkdir()
        (run.output_dir / "checkpoint-3" / "trainer_state.json").write_text("{}")


def test_dry_run_prints_each_runs_state_and_command_and_trains_nothing(tmp_path, capsys):
    path = write_study(tmp_path, {"defaults": {**TINY_VIT, "dataset_name": "/data/x"},
                                  "runs": [{"name": "r_{seed}", "grid": {"seed": [1, 2, 3, 4]}}]})
    study = load_study(path, str(tmp_path / "out"))
    for name, state in (("r_1", "done"), ("r_2", "resume"), ("r_3", "restart")):
        fake_run(study, name, state)
    before = snapshot(tmp_path / "out")

    main([path, "--output_dir", str(tmp_path / "out"), "--dry_run"])

    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("run ")]
    assert [line.split(":")[0] for line in lines] == ["run 1/4 r_1 (done)", "run 2/4 r_2 (resume)",
                                                      "run 3/4 r_3 (restart)", "run 4/4 r_4 (new)"]
    assert lines[1].endswith("--resume_from_checkpoint latest")
    assert lines[2].endswith("--overwrite_output_dir true")
    assert all("python run_finetune.py --model_preset vit_tiny_cifar" in line and "--dataset_name /data/x" in line
               for line in lines)
    assert snapshot(tmp_path / "out") == before
    assert [run_status(run) for run in study.runs] == ["done", "resume", "restart", "new"]


def test_a_finished_run_made_with_other_settings_stops_the_study_but_logging_flags_do_not(tmp_path, capsys):
    study_file = {"defaults": {**TINY_VIT, "dataset_name": "/data/x", "learning_rate": 0.001, "logging_steps": 5},
                  "runs": [{"name": "a"}]}
    path = write_study(tmp_path, study_file)
    fake_run(load_study(path, str(tmp_path / "out")), "a", "done")

    main([path, "--output_dir", str(tmp_path / "out"), "--dry_run", "--set", "logging_steps=50"])
    err = study_error(capsys, [path, "--output_dir", str(tmp_path / "out"), "--dry_run",
                               "--set", "learning_rate=0.002"])
    assert "learning_rate=0.001" in err and "learning_rate=0.002" in err and "delete" in err


# --------------------------------------------------------------------------------------------- derived datasets
def test_a_derived_dataset_keeps_the_chosen_classes_relabelled_and_cut_per_class_in_source_order(tmp_path,
                                                                                                   tiny_data):
    path = write_study(tmp_path, {"datasets": {"half": {
        "source": str(tiny_data), "classes": ["c3", "c1"],
        "splits": {"validation": {"take": 3}, "train": {"skip": 3, "take": 10}}}}, "runs": [GOOD_RUN]})
    spec = load_study(path, str(tmp_path / "out")).datasets[0]

    assert build_dataset(spec) is True
    built = datasets.load_from_disk(str(spec.path))
    source = datasets.load_from_disk(str(tiny_data))["train"]
    assert built["train"].features["label"].names == ["c3", "c1"]

    def rows_of(split):  # (source row, new label), matched by the image bytes
        index = {image["bytes"]: row for row, image in enumerate(
            source.cast_column("image", datasets.Image(decode=False))["image"])}
        images = built[split].cast_column("image", datasets.Image(decode=False))["image"]
        return [(index[image["bytes"]], label) for image, label in zip(images, built[split]["label"])]

    # Class c3 holds source rows 3, 7, 11, ... and c1 rows 1, 5, 9, ...: per class the first 3 are validation, the
    # next 10 train; the source's order is kept and c3 -> 0, c1 -> 1.
    c3, c1 = list(range(3, 64, 4)), list(range(1, 64, 4))
    assert rows_of("validation") == sorted([(r, 0) for r in c3[:3]] + [(r, 1) for r in c1[:3]])
    assert rows_of("train") == sorted([(r, 0) for r in c3[3:13]] + [(r, 1) for r in c1[3:13]])

    before = snapshot(spec.path)
    assert build_dataset(spec) is False and snapshot(spec.path) == before
    changed = load_study(path, str(tmp_path / "out"), []).datasets[0]
    changed.splits["train"] = (3, 5)
    with pytest.raises(Exception, match="another spec"):
        build_dataset(changed)


def test_a_pinned_source_is_checked_and_images_looked_at_before_fall_in_train_only(tmp_path, tiny_data):
    from hf_vit.data import example_key, in_validation

    spec = {"source": str(tiny_data), "tuned_on": {"fraction": 0.5, "seed": 42},
            "splits": {"test": {"take": 3}, "train": {"skip": 3}}}
    path = write_study(tmp_path, {"datasets": {"all": {**spec, "source_fingerprint": "0" * 64}}, "runs": [GOOD_RUN]})
    with pytest.raises(UserError, match="is not the pinned copy") as error:
        build_dataset(load_study(path, str(tmp_path / "out")).datasets[0])
    pin = str(error.value).split("this one ")[1].split(")")[0]

    path = write_study(tmp_path, {"datasets": {"all": {**spec, "source_fingerprint": pin}}, "runs": [GOOD_RUN]})
    dataset = load_study(path, str(tmp_path / "out")).datasets[0]
    assert build_dataset(dataset) is True
    built = datasets.load_from_disk(str(dataset.path))

    def keys(split):
        return [example_key(image) for image in
                built[split].cast_column("image", datasets.Image(decode=False))["image"]]

    looked_at = {k for k in keys("train") + keys("test") if in_validation(k, 0.5, 42)}
    assert looked_at and not looked_at & set(keys("test"))  # 3 per class are held out, none of them looked at
    assert len(keys("test")) == 12 and len(keys("train")) == 52
    record = json.loads((dataset.path / "study_dataset.json").read_text())
    assert record["source_fingerprint"] == pin and len(record["fingerprint"]) == 64


def test_a_finished_run_is_reused_only_while_its_config_dataset_and_upstream_results_are_unchanged(tmp_path,
                                                                                                  tiny_data):
    path = write_tiny_study(tmp_path, tiny_data, finetune_steps=2)
    out = tmp_path / "out"
    run_study(load_study(path, str(out)))
    again = run_study(load_study(path, str(out)))  # everything unchanged: both reused
    assert again == out / "findings.md"
    inputs = json.loads((out / ".study" / "finetune.json").read_text())
    assert inputs["upstream"]["model_name_or_path"] and inputs["datasets"]["dataset_name"]
    assert inputs["config"]["max_train_steps"] == 2

    # The upstream run's results changed (as when it is redone): the fine-tune made from the old one is stale.
    results = json.loads((out / "pretrain" / "all_results.json").read_text())
    (out / "pretrain" / "all_results.json").write_text(json.dumps({**results, "eval_accuracy": 0.123}))
    with pytest.raises(UserError, match="'finetune' .* started from a run whose results were different"):
        run_study(load_study(path, str(out)))
    (out / "pretrain" / "all_results.json").write_text(json.dumps(results))

    # Any setting of the resolved config, not only the ones the study file names: here a default that changed since
    # the run was made (as a new release's would).
    (out / ".study" / "finetune.json").write_text(json.dumps(
        {**inputs, "config": {**inputs["config"], "weight_decay": 0.07}}))
    with pytest.raises(UserError, match="weight_decay=0.07 but the study now gives weight_decay=0.05"):
        run_study(load_study(path, str(out)))


def test_a_killed_dataset_build_leaves_no_finished_looking_folder_and_is_redone(tmp_path, tiny_data):
    path = write_study(tmp_path, {"datasets": {"all": {"source": str(tiny_data), "splits": {"train": {}}}},
                                  "runs": [GOOD_RUN]})
    spec = load_study(path, str(tmp_path / "out")).datasets[0]
    partial = spec.path.with_name(f".{spec.path.name}.tmp")
    partial.mkdir(parents=True)
    (partial / "half_written.arrow").write_bytes(b"\0" * 10)

    assert build_dataset(spec) is True
    assert not partial.exists() and len(datasets.load_from_disk(str(spec.path))["train"]) == 64


def test_a_fresh_accelerate_state_between_runs_forgets_the_last_runs_precision_and_keeps_the_process(tmp_path):
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    Accelerator(mixed_precision="bf16", cpu=True)
    process = PartialState()
    state = fresh_accelerate_state()
    assert state.initialized and state.process_index == process.process_index and not AcceleratorState._shared_state
    # Without the reset accelerate refuses a second Accelerator with another mixed precision.
    assert Accelerator(mixed_precision="no", cpu=True).mixed_precision == "no"


# ---------------------------------------------------------------------------------------- killed and restarted
def write_tiny_study(folder: Path, data: Path, finetune_steps: int) -> str:
    """Two runs: pretrain on two classes, then fine-tune from it on the other two (in bf16, where the first ran in
    fp32, so the second Accelerator of the process needs other settings than the first)."""
    return write_study(folder, {
        "defaults": {**TINY_VIT, "dataset_name": str(data), "total_train_batch_size": 8, "logging_steps": 1,
                     "checkpointing_steps": "1", "eval_split": "validation"},
        "datasets": {name: {"source": "${defaults.dataset_name}", "classes": classes,
                            "splits": {"validation": {"take": 4}, "train": {"skip": 4}}}
                     for name, classes in (("first", ["c0", "c1"]), ("second", ["c2", "c3"]))},
        "runs": [{"name": "pretrain", "dataset_name": "${datasets.first}"},
                 {"name": "finetune", "dataset_name": "${datasets.second}", "model_name_or_path": "${runs.pretrain}",
                  "max_train_steps": finetune_steps, "mixed_precision": "bf16"}]})


def test_tiny_study_killed_during_its_second_run_finishes_on_restart_with_every_run_done_once(tmp_path, tiny_data):
    """The tiny study in one process, SIGKILLed once its second run has a checkpoint; the same command again skips
    the first run, resumes the second, and writes findings whose numbers are the runs' own."""
    steps = 40  # enough checkpointed steps that the kill lands inside the second run
    path = write_tiny_study(tmp_path, tiny_data, steps)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "hf_vit.study", path, "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while not (out / "finetune").is_dir() or not any(p.name.startswith("checkpoint-") and not
                                                          p.name.endswith("tmp") for p in (out / "finetune").iterdir()):
            assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "the second run never wrote a checkpoint"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert (out / "pretrain" / "all_results.json").is_file() and not (out / "finetune" / "all_results.json").exists()
    pretrain_files, data_files = snapshot(out / "pretrain"), snapshot(out / "data")

    restart = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert restart.returncode == 0, restart.stdout[-3000:] + restart.stderr[-3000:]
    log = restart.stdout
    assert "dataset first: already built" in log and "dataset second: already built" in log
    assert "run 1/2 pretrain: done, skipped" in log and "run 2/2 finetune: resuming" in log
    assert snapshot(out / "pretrain") == pretrain_files and snapshot(out / "data") == data_files

    results = {name: json.loads((out / name / "all_results.json").read_text()) for name in ("pretrain", "finetune")}
    assert results["finetune"]["global_step"] == steps
    train_steps = [r["step"] for r in json.loads((out / "finetune" / "log_history.json").read_text())
                   if "train_loss" in r]
    assert train_steps == list(range(1, steps + 1))  # every step trained (and logged) once across the two sessions

    findings = (out / "findings.md").read_text()
    rows = {row["run"]: row for row in markdown_table(findings, "run")}
    assert set(rows) == {"`pretrain`", "`finetune`"}
    for name, result in results.items():
        row = rows[f"`{name}`"]
        assert row["final validation accuracy %"] == f"{100 * result['eval_accuracy']:.2f}"
        assert row["epochs"] == f"{round(result['epoch'], 2):g}" and row["steps"] == str(result["global_step"])
    cells = {row["cell"]: row for row in markdown_table(findings, "cell")}
    assert cells["`finetune`"]["start"] == "from pretrain"
    for png in ("accuracy_vs_fraction.png", "learning_curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_a_run_stopped_by_a_signal_ends_the_study_before_the_next_run_and_without_findings(tmp_path, monkeypatch,
                                                                                          capsys):
    import hf_vit.trainer

    trained = []

    def preempted_train(cfg):  # what train returns when SIGTERM/SIGINT stopped it after saving a checkpoint
        trained.append(Path(cfg.train.output_dir).name)
        return {"preempted": True, "global_step": 1}

    monkeypatch.setattr(hf_vit.trainer, "train", preempted_train)
    path = write_study(tmp_path, {"defaults": {**TINY_VIT, "dataset_name": "/data/x"},
                                  "runs": [{"name": "first"}, {"name": "second"}]})
    assert run_study(load_study(path, str(tmp_path / "out"))) is None
    assert trained == ["first"] and not (tmp_path / "out" / "findings.md").exists()
    assert "run the same command again" in capsys.readouterr().out


def test_under_a_two_process_launch_every_process_runs_the_study_and_only_the_main_one_reports(tmp_path, tiny_data):
    path = write_tiny_study(tmp_path, tiny_data, finetune_steps=3)
    out = tmp_path / "out"
    launch = run_script(["-m", "hf_vit.study", path, "--output_dir", str(out)], nproc=2, timeout=300,
                        env={"OMP_NUM_THREADS": "1"})
    for name in ("pretrain", "finetune"):
        assert json.loads((out / name / "all_results.json").read_text())["global_step"] == 3
    assert launch.stdout.count("[study] run 2/2 finetune: training") == 1  # one voice, not one per process
    assert (out / "findings.md").is_file()


# ------------------------------------------------------------------------------------------------- study files
@pytest.mark.parametrize("study_file", sorted((REPO / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_every_study_file_in_the_repository_loads_and_dry_runs(tmp_path, capsys, study_file):
    sets = ["dataset_name=" + str(CIFAR10)] if "cifar10_cpu" in study_file.name else []
    study = load_study(str(study_file), str(tmp_path / "out"), sets)
    assert study.runs and len({run.name for run in study.runs}) == len(study.runs)
    missing = sorted({run.recipe for run in study.runs if run.recipe and not os.path.isfile(run.recipe)})
    if missing:
        pytest.skip(f"recipes not written yet: {missing}")
    main([str(study_file), "--output_dir", str(tmp_path / "out"), "--dry_run",
          *[arg for item in sets for arg in ("--set", item)]])
    out = capsys.readouterr().out
    assert out.count("(new): python run_finetune.py") == len(study.runs)


# ---------------------------------------------------------------------------------------------------- groups
def test_a_set_for_a_group_reaches_only_its_runs_below_a_set_for_one_run(tmp_path):
    path = write_study(tmp_path, {"defaults": {"seed": 1}, "runs": [
        {"name": "a_{learning_rate}", "group": "small", "grid": {"learning_rate": [0.1, 0.2]}},
        {"name": "b", "group": "small", "seed": 2},
        {"name": "c", "group": "large"}]})
    study = load_study(path, str(tmp_path / "out"), ["small.seed=5", "b.seed=6", "large.label_smoothing=0.1"])
    seeds = {run.name: parse_config(run.argv()).train.seed for run in study.runs}
    assert seeds == {"a_0.1": 5, "a_0.2": 5, "b": 6, "c": 1}
    assert [run.group for run in study.runs] == ["small", "small", "small", "large"]
    assert parse_config(study.runs[3].argv()).train.label_smoothing == 0.1
    assert all(parse_config(run.argv()).train.label_smoothing == 0.0 for run in study.runs[:3])


@pytest.mark.parametrize("study, sets, key", [
    ({"runs": [{"name": "a", "group": "a"}]}, [], "group 'a'"),
    ({"runs": [{"name": "a", "group": "x y"}]}, [], "group must be"),
    ({"runs": [{"name": "a", "group": "g"}]}, ["h.seed=1"], "groups: ['g']"),
])
def test_a_bad_group_is_a_one_line_error(tmp_path, capsys, study, sets, key):
    path = write_study(tmp_path, study)
    err = study_error(capsys, [path, "--output_dir", str(tmp_path / "out"), "--dry_run",
                               *[arg for item in sets for arg in ("--set", item)]])
    assert key in err


def test_report_scale_cifar_settings_reach_only_the_cifar_runs_and_imagenet_streams_by_shards(tmp_path):
    study = load_study(str(REPO / "studies" / "report_scale.yaml"), str(tmp_path / "out"),
                       ["cifar10.dataset_name=/data/cifar10", "cifar10.eval_split=",
                        "imagenet.dataset_name=/data/imagenet-1k"])
    configs = {run.name: parse_config(run.argv()) for run in study.runs}
    assert len(configs) == 40  # 13 CIFAR-10 cells x 3 seeds and the pretraining
    for name, cfg in configs.items():
        if name == "imagenet_pretrain":
            assert (cfg.data.dataset_name, cfg.data.eval_split, cfg.data.streaming, cfg.data.stream_sharding) == \
                ("/data/imagenet-1k", "validation", True, "shards")
        else:
            assert (cfg.data.dataset_name, cfg.data.eval_split) == ("/data/cifar10", ""), name  # "": carve
    assert configs["vit_base_finetuned_s1"].model.model_name_or_path == str(tmp_path / "out" / "imagenet_pretrain")
