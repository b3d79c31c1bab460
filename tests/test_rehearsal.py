"""Rehearsals (``python -m hf_vit.study STUDY --rehearse``): the stand-ins keep the recorded splits, columns, classes,
rows, shards and row groups; a rehearsal changes a run's data, model and length and nothing else; and a trimmed
report_scale.yaml (one fraction run and the pretrain -> fine-tune chain) rehearses end to end under 2 processes,
through the preemption and resume, the head swap and findings.md."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, run_script

from hf_vit.config import parse_config
from hf_vit.data.keys import example_key
from hf_vit.errors import UserError
from hf_vit.rehearsal import (RECORDED, DatasetRecord, SplitRecord, measured_layout, needs_stand_in, record_for,
                              rehearse_study, vit_patch, write_stand_in)
from hf_vit.study_file import load_study

TINY = DatasetRecord(hub_id="tiny/set", folder="data", config_name="default", image_column="image",
                     label_column="label", num_classes=3,
                     splits={"train": SplitRecord(250, 3, None), "validation": SplitRecord(40, 2, None)},
                     real_images="-", row_group_rows=30, stand_in_size=8, stand_in_format="JPEG",
                     stand_in_fraction=Fraction(1, 2), image_paths=False)


def expected_row_groups(rows: int, shards: int, per_group: int) -> int:
    """Row groups of ``rows`` dealt in order over ``shards`` files of ``per_group``-row groups."""
    return sum(math.ceil(((k + 1) * rows // shards - k * rows // shards) / per_group) for k in range(shards))


# ------------------------------------------------------------------------------------------------- the stand-ins
def test_a_stand_in_has_the_recorded_splits_shards_row_groups_classes_and_a_fraction_of_the_rows(tmp_path):
    folder = tmp_path / "tiny"
    assert write_stand_in(TINY, folder) is True

    layout = measured_layout(folder, TINY)
    # 250 x 1/2 = 125 rows over 3 shards (41/42/42 rows: 2 row groups of <= 30 each... 2+2+2), 40 x 1/2 = 20 over 2.
    assert layout["train"] == {"rows": 125, "shards": 3, "row_groups": 6, "bytes": layout["train"]["bytes"],
                               "classes": 3}
    assert layout["validation"] == {"rows": 20, "shards": 2, "row_groups": 2, "bytes": layout["validation"]["bytes"],
                                    "classes": 3}
    assert sorted(p.name for p in (folder / "data").iterdir()) == [
        "train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00002-of-00003.parquet",
        "validation-00000-of-00002.parquet", "validation-00001-of-00002.parquet"]

    # It loads like the Hub dataset: its splits, columns and class names, and the card's split sizes.
    loaded = datasets.load_dataset(str(folder))
    assert {name: len(split) for name, split in loaded.items()} == {"train": 125, "validation": 20}
    assert loaded["train"].features["label"].names == ["class_0", "class_1", "class_2"]
    stream = datasets.load_dataset(str(folder), streaming=True)
    assert stream["train"].num_shards == 3 and stream["train"].info.splits["train"].num_examples == 125
    # Rows without a path: each key is a hash of the bytes, so every image's bytes must differ.
    raw = loaded["train"].cast_column("image", datasets.Image(decode=False))["image"]
    assert all(image["path"] is None for image in raw)
    assert len({example_key(image) for image in raw}) == 125
    assert loaded["train"][0]["image"].size == (8, 8)


def test_a_stand_in_is_written_once_and_refused_when_the_record_changed(tmp_path):
    folder = tmp_path / "tiny"
    write_stand_in(TINY, folder)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    assert write_stand_in(TINY, folder) is False
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before
    changed = DatasetRecord(**{**TINY.__dict__, "stand_in_fraction": Fraction(1, 4)})
    with pytest.raises(UserError, match="another stand-in"):
        write_stand_in(changed, folder)
    assert not (tmp_path / ".tiny.tmp").exists()


def test_recorded_datasets_are_found_by_hub_id_or_local_folder_name_and_existing_folders_are_used_as_they_are(
        tmp_path):
    assert record_for("uoft-cs/cifar10") is RECORDED["uoft-cs/cifar10"]
    assert record_for("/data/imagenet-1k/") is RECORDED["ILSVRC/imagenet-1k"]
    assert record_for("/data/mnist") is None
    assert needs_stand_in("ILSVRC/imagenet-1k") and needs_stand_in(str(tmp_path / "missing"))
    assert not needs_stand_in(str(tmp_path))
    assert (vit_patch(224), vit_patch(32), vit_patch(384)) == (56, 8, 96)


def test_rehearsing_report_scale_changes_data_model_and_length_and_keeps_the_topology(tmp_path):
    study = load_study(str(REPO / "studies" / "report_scale.yaml"), str(tmp_path / "out"))
    before = {run.name: parse_config(run.argv()) for run in study.runs}
    rehearsal = rehearse_study(study)
    after = {run.name: parse_config(run.argv()) for run in study.runs}

    cifar, imagenet = (str(tmp_path / "out" / "rehearsal_data" / name) for name in
                       ("uoft-cs__cifar10", "ILSVRC__imagenet-1k"))
    assert {name: str(folder) for name, (_, folder) in rehearsal.stand_ins.items()} == {
        "uoft-cs/cifar10": cifar, "ILSVRC/imagenet-1k": imagenet}
    assert rehearsal.preempt == ["vit_base_scratch_f10_s1", "imagenet_pretrain"]
    for name, cfg in after.items():
        old = before[name]
        assert cfg.data.dataset_name == (imagenet if name == "imagenet_pretrain" else cifar)
        assert (cfg.train.max_train_steps, cfg.train.checkpointing_steps, cfg.train.warmup_epochs) == (4, "2", 0)
        # What the rehearsal keeps: the topology and the data selection.
        for group, keys in (("data", ["dataloader_num_workers", "train_fraction", "eval_split", "train_split",
                                      "train_val_split", "streaming", "stream_sharding", "augmentation",
                                      "crop_padding"]),
                            ("train", ["gradient_accumulation_steps", "mixed_precision", "eval_steps",
                                       "num_train_epochs", "learning_rate", "seed"])):
            for key in keys:
                assert getattr(getattr(cfg, group), key) == getattr(getattr(old, group), key), (name, key)
        # The global batch too, but where the loader workers' prefetched images would not fit in memory: ImageNet's
        # 16 workers x 4 micro-batches of 1,600 images of 224 px would hold 15.4 GB; at 400 they hold 3.9 GB.
        batch = 400 if name == "imagenet_pretrain" else old.train.total_train_batch_size
        assert cfg.train.total_train_batch_size == batch, name
    assert list(rehearsal.scaled) == ["imagenet_pretrain"] and "15.4 GB" in rehearsal.scaled["imagenet_pretrain"]
    vit = after["vit_base_scratch_f25_s1"].model
    assert (vit.model_preset, vit.hidden_size, vit.num_hidden_layers, vit.num_attention_heads, vit.patch_size,
            vit.image_size) == ("vit_base_patch16_224", 32, 2, 2, 56, 224)
    assert (after["resnet50_scratch_f10_s1"].model.model_preset, after["resnet50_scratch_f10_s1"].model.image_size) == \
        ("resnet_rehearsal", 224)
    finetuned = after["vit_base_finetuned_s1"].model
    assert finetuned.model_name_or_path == str(tmp_path / "out" / "imagenet_pretrain")
    assert finetuned.hidden_size is None and finetuned.model_preset is None  # the architecture is the checkpoint's
    assert after["imagenet_pretrain"].data.stream_sharding == "shards"


# -------------------------------------------------------------------------------------- a trimmed rehearsal, run
def trimmed_report_scale(folder: Path) -> str:
    """report_scale.yaml with its own entries cut to one fraction run (ViT-B/16 on 25% of CIFAR-10), one seed, and the
    pretrain -> fine-tune chain; for CI's 2 cores one loader worker per process (the recipes: 16), a global batch of
    32 (512 and 1,600), a shuffle buffer of 1,000 (20,000) and 500 evaluation images. The full rehearsal keeps the
    recipes' values (docs/rehearsal.md)."""
    study = yaml.safe_load((REPO / "studies" / "report_scale.yaml").read_text())
    grid_entry, pretrain, finetuned, _ = study["runs"]  # the labels-per-class sweep is left out
    grid_entry["grid"] = {"model": {"vit_base": grid_entry["grid"]["model"]["vit_base"]},
                          "data": {"f25": grid_entry["grid"]["data"]["f25"]}}
    grid_entry["seeds"] = finetuned["seeds"] = [1]
    study["runs"], study["findings"] = [grid_entry, pretrain, finetuned], []
    for entry in (grid_entry, finetuned):  # CI's 2 cores: the final scoring on 500 training images, not 10,000
        entry["train_eval_samples"] = 500
    for entry in (grid_entry["grid"]["model"]["vit_base"], pretrain, finetuned):
        entry["recipe"] = str((REPO / "studies" / entry["recipe"]).resolve())
    study["defaults"] = {"dataloader_num_workers": 1, "total_train_batch_size": 32, "shuffle_buffer_size": 1000,
                         "max_eval_samples": 500}
    path = folder / "trimmed.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return str(path)


def test_a_trimmed_report_scale_rehearses_end_to_end_under_two_processes(tmp_path):
    out = tmp_path / "out"
    launch = run_script(["-m", "hf_vit.study", trimmed_report_scale(tmp_path), "--output_dir", str(out),
                         "--rehearse"], nproc=2, timeout=400, env={"OMP_NUM_THREADS": "1"})
    log = launch.stdout
    assert "THE ACCURACIES OF A REHEARSAL MEAN NOTHING" in log

    # The stand-ins, read back from their files: the recorded shard counts and classes, all CIFAR-10 rows, 1/16 of
    # ImageNet's.
    for hub_id, name in (("uoft-cs/cifar10", "uoft-cs__cifar10"), ("ILSVRC/imagenet-1k", "ILSVRC__imagenet-1k")):
        record = RECORDED[hub_id]
        layout = measured_layout(out / "rehearsal_data" / name, record)
        for split, real in record.splits.items():
            rows = math.ceil(real.rows * record.stand_in_fraction)
            classes = 0 if split in record.unlabelled_splits else record.num_classes
            assert (layout[split]["rows"], layout[split]["shards"], layout[split]["row_groups"],
                    layout[split]["classes"]) == (rows, real.shards, expected_row_groups(rows, real.shards, 100),
                                                  classes), (hub_id, split)
    assert pq.ParquetFile(next((out / "rehearsal_data" / "uoft-cs__cifar10" / "plain_text").glob("test-*"))
                          ).schema_arrow.names == ["img", "label"]

    results = {name: json.loads((out / name / "all_results.json").read_text())
               for name in ("vit_base_scratch_f25_s1", "imagenet_pretrain", "vit_base_finetuned_s1")}
    assert all(result["global_step"] == 4 for result in results.values())
    assert all(result["eval_samples"] == 500 for result in results.values())

    # The first run and the run the chain starts from were stopped by SIGTERM after a checkpoint, then resumed:
    # every step trained once over the two sessions.
    for name in ("vit_base_scratch_f25_s1", "imagenet_pretrain"):
        assert f"{name}: preempted by SIGTERM at step" in log
        history = json.loads((out / name / "log_history.json").read_text())
        assert [r["step"] for r in history if "train_loss" in r] == [1, 2, 3, 4]

    # The chain: the tiny pretrained ViT (1,000 ImageNet classes) is loaded with a new 10-class head.
    pretrained = json.loads((out / "imagenet_pretrain" / "config.json").read_text())
    finetuned = json.loads((out / "vit_base_finetuned_s1" / "config.json").read_text())
    assert (pretrained["hidden_size"], pretrained["patch_size"], pretrained["image_size"],
            len(pretrained["id2label"])) == (32, 56, 224, 1000)
    assert (finetuned["hidden_size"], len(finetuned["id2label"])) == (32, 10)
    assert "new 10-class head" in launch.stderr and f"Loaded {out / 'imagenet_pretrain'}" in launch.stderr
    saved = yaml.safe_load((out / "vit_base_finetuned_s1" / "train_config.yaml").read_text())
    assert saved["model_name_or_path"] == str(out / "imagenet_pretrain")

    # One line per run, and findings.md that says what it is.
    summary = [line.strip() for line in log[log.index("[rehearsal] runs"):].splitlines()[1:4]]
    assert [line.split(":")[0] for line in summary] == ["vit_base_scratch_f25_s1", "imagenet_pretrain",
                                                        "vit_base_finetuned_s1"]
    assert all(": ok in " in line and "4 steps" in line for line in summary)
    findings = (out / "findings.md").read_text()
    assert "REHEARSAL" in findings and "mean nothing" in findings
    for name in results:
        assert f"`{name}`" in findings
