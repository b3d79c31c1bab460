"""Hostile use, round 3 (issue 19): other commands, other processes and a full disk around a run.

One group per class of fault; each group proves the rule that removes the class, not one example of it:

1. a run folder is written only by its run: eval and attention write beside it, never into it or a checkpoint;
2. a resume is the same run (its recorded identity) or refused; a finished run is never replaced without overwrite;
3. every write goes through hf_vit.durable: a full disk or a refused write leaves the last whole state, in one line;
   overwrite refuses before it deletes anything it cannot delete;
4. an output folder inside the dataset is refused;
5. a missing image is skipped and counted on every path;
6. push publishes only what a finished run (or its checkpoint) recorded as its own;
7. a truncated weight file is one line in every command;
8. success exits 0 whatever happened to stdout; SIGHUP is SIGTERM; an output path that is a file fails first;
9. decoding applies the EXIF orientation exactly as datasets/PIL do, on every decode path.

Disk faults are simulated by patching os functions (the tests run as root, so permissions would not bite).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from conftest import REPO
from hf_vit import durable
from hf_vit import checkpoint as ckpt
from hf_vit.errors import UserError, run_cli
from hf_vit.manifest import verify_manifest
from hf_vit.run_dir import FINISHED, LOCK, RECORD, FinalOutputs, RunLock, prepare_output_dir, record_created
from test_hostile import (CLASSES, args, data, finished, images, one_error_line, png_bytes, run,  # noqa: F401
                          saved_dataset, snapshot)


def in_process(main, argv) -> tuple[int, str, str]:
    """A command's main through the real entry wrapper, in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_cli(main, argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def disk_full(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def last_checkpoint(run_dir: Path) -> Path:
    return ckpt.complete_checkpoints(run_dir)[-1]


# 72 training examples in steps of 16: epochs of 4 steps, 8 in all; checkpoint-4 ends the first epoch.
BOUNDARY = "checkpoint-4"


def copy_run(finished: Path, tmp_path: Path, name: str = "run") -> Path:
    target = tmp_path / name
    shutil.copytree(finished, target)
    return target


def eval_argv(model: Path, data: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model), "--dataset_name", str(data), "--eval_split", "train",
            "--train_val_split", "0.25", "--split_seed", "3", "--dataloader_num_workers", "0", *extra]


# ------------------------------------------------------------------------------ 1. other commands never write a run
def test_eval_writes_beside_the_run_by_default_and_leaves_the_run_and_its_checkpoints_as_they_were(
        finished, data, tmp_path):
    from hf_vit import eval as hf_eval

    run_dir = copy_run(finished, tmp_path)
    before = snapshot(run_dir)
    code, out, err = in_process(hf_eval.main, eval_argv(run_dir, data))
    assert code == 0, err
    results = json.loads((tmp_path / "run-eval" / "eval_results.json").read_text())
    assert results["eval_samples"] > 0 and (tmp_path / "run-eval" / "confusion_matrix.png").is_file()
    last = last_checkpoint(run_dir)
    code, out, err = in_process(hf_eval.main, eval_argv(last, data))
    assert code == 0, err
    assert (tmp_path / "run-eval" / last.name / "eval_results.json").is_file()
    assert snapshot(run_dir) == before
    verify_manifest(last)  # a resume still accepts it


@pytest.mark.parametrize("where, message", [
    ("{run}", "would write into the run folder"),
    ("{run}/checkpoint-4", "lies inside the checkpoint"),
    ("{run}/checkpoint-4/sub", "lies inside the checkpoint"),
    ("{data}/results", "lies inside the dataset"),
    ("{file}", "is a file, not a folder"),
])
def test_eval_refuses_an_output_in_a_run_a_checkpoint_the_dataset_or_a_file_before_evaluating(
        finished, data, tmp_path, monkeypatch, where, message):
    import hf_vit.eval as hf_eval

    run_dir = copy_run(finished, tmp_path)
    (tmp_path / "a_file").write_text("mine")
    monkeypatch.setattr(hf_eval, "evaluate_classifier", lambda *a, **k: pytest.fail("evaluated before refusing"))
    before, data_before = snapshot(run_dir), snapshot(data)
    target = where.format(run=run_dir, data=data, file=tmp_path / "a_file")
    code, out, err = in_process(hf_eval.main, eval_argv(run_dir, data, "--output_dir", target))
    assert code == 2 and message in one_error_line(err)
    assert snapshot(run_dir) == before and snapshot(data) == data_before


def test_eval_and_attention_refuse_any_folder_inside_a_run_in_progress(finished, data, tmp_path):
    from hf_vit import attention
    from hf_vit import eval as hf_eval

    run_dir = copy_run(finished, tmp_path)
    with RunLock(run_dir, command="run_finetune.py holder"):
        code, _, err = in_process(hf_eval.main, eval_argv(run_dir, data, "--output_dir", str(run_dir / "evals")))
        assert code == 2 and "which a training run is using" in one_error_line(err)
        code, _, err = in_process(attention.main, [str(run_dir), "--output", str(run_dir / "figs" / "a.png")])
        assert code == 2 and "which a training run is using" in one_error_line(err)
    assert not (run_dir / "evals").exists() and not (run_dir / "figs").exists()


def test_a_full_disk_during_eval_leaves_the_previous_results_whole_and_says_so(finished, data, tmp_path, monkeypatch):
    from hf_vit import eval as hf_eval

    out = tmp_path / "evals"
    code, _, err = in_process(hf_eval.main, eval_argv(finished, data, "--output_dir", str(out)))
    assert code == 0, err
    previous = snapshot(out)
    real_fsync, calls = os.fsync, []

    def full_on_the_second_file(fd):
        calls.append(fd)
        if len(calls) == 2:
            disk_full()
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_on_the_second_file)
    code, _, err = in_process(hf_eval.main, eval_argv(finished, data, "--output_dir", str(out), "--split_seed", "4"))
    monkeypatch.undo()
    line = one_error_line(err)
    assert code == 2 and "no space left" in line and "left whole" in line
    assert snapshot(out) == previous  # all three old files, no new one, no partial file


def test_attention_on_a_checkpoint_writes_beside_the_run_atomically_and_the_checkpoint_still_verifies(
        finished, data, tmp_path, monkeypatch):
    from hf_vit import attention

    run_dir = copy_run(finished, tmp_path)
    before = snapshot(run_dir)
    argv = [str(run_dir / BOUNDARY), "--images", "2"]  # the checkpoint's data: its run's train_config.yaml
    code, out, err = in_process(attention.main, argv)
    assert code == 0, err
    figure = tmp_path / "run-eval" / BOUNDARY / "attention_rollout.png"
    first = figure.read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and snapshot(run_dir) == before
    verify_manifest(run_dir / BOUNDARY)
    monkeypatch.setattr(os, "fsync", disk_full)
    code, out, err = in_process(attention.main, argv + ["--images", "1"])
    monkeypatch.undo()
    assert code == 2 and "no space left" in one_error_line(err)
    assert figure.read_bytes() == first and sorted(p.name for p in figure.parent.iterdir()) == [figure.name]


# ---------------------------------------------------------------------------------- 2. a resume is the same run
@pytest.mark.parametrize("change, names", [
    (["--seed", "4"], ["seed (checkpoint 3, this run 4)"]),
    (["--total_train_batch_size", "8"], ["total_train_batch_size"]),
    (["--train_val_split", "0.3"], ["train_val_split"]),
    (["--num_train_epochs", "3"], ["num_train_epochs"]),
    (["--learning_rate", "0.01"], ["learning_rate"]),
])
def test_a_resume_with_another_identity_is_refused_naming_what_differs(finished, data, tmp_path, change, names):
    """At an epoch boundary the mid-epoch layout check does not apply; the identity does."""
    out = tmp_path / "resumed"
    code, err = run(args(data, out, "--resume_from_checkpoint", str(finished / BOUNDARY), *change))
    line = one_error_line(err)
    assert code == 2 and "belongs to another run" in line and "--resume_accept_changes" in line
    assert all(n in line for n in names), line
    assert not out.exists()


def test_a_resume_on_another_dataset_of_the_same_size_is_refused(finished, tmp_path):
    other = saved_dataset(tmp_path / "other")
    rows = datasets.load_from_disk(str(other))["train"]
    # Same classes, same size, other pixels.
    shifted = rows.cast_column("img", datasets.Image(decode=False)).map(
        lambda row, i: {"img": {"bytes": png_bytes(96)[(i + 1) % 96], "path": None}}, with_indices=True)
    datasets.DatasetDict({"train": shifted.cast_column("img", datasets.Image())}).save_to_disk(str(tmp_path / "o2"))
    code, err = run(args(tmp_path / "o2", tmp_path / "resumed", "--resume_from_checkpoint",
                         str(finished / BOUNDARY)))
    line = one_error_line(err)
    assert code == 2 and "dataset (other examples" in line


def test_an_accepted_change_resumes_and_every_later_checkpoint_records_it(finished, data, tmp_path):
    out = tmp_path / "resumed"
    code, err = run(args(data, out, "--resume_from_checkpoint", str(finished / BOUNDARY), "--seed", "4",
                         "--resume_accept_changes", "seed", "--checkpointing_steps", "2"))
    assert code == 0, err
    state = json.loads((last_checkpoint(out) / "trainer_state.json").read_text())
    assert state["accepted_changes"] == [{"key": "seed", "checkpoint": 3, "now": 4, "at_step": 4}]
    assert state["identity"]["seed"] == 4


def test_an_unknown_key_to_accept_is_one_line(finished, data, tmp_path):
    code, err = run(args(data, tmp_path / "r", "--resume_from_checkpoint", str(finished / BOUNDARY),
                         "--resume_accept_changes", "sead"))
    assert code == 2 and "not part of a run's identity" in one_error_line(err)


def test_the_same_settings_resume_and_a_checkpoint_records_its_identity(finished, data, tmp_path):
    state = json.loads((finished / BOUNDARY / "trainer_state.json").read_text())
    identity = state["identity"]
    assert identity["seed"] == 3 and identity["model"]["hidden_size"] == 16 and identity["dataset"]["fingerprint"]
    code, err = run(args(data, tmp_path / "resumed", "--resume_from_checkpoint", str(finished / BOUNDARY)))
    assert code == 0, err


def test_a_finished_run_is_never_replaced_by_a_resume_without_overwrite(finished, data, tmp_path):
    target = copy_run(finished, tmp_path, "target")
    for folder in ckpt.complete_checkpoints(target):
        shutil.rmtree(folder)  # a finished run without checkpoints
    other = copy_run(finished, tmp_path, "other")
    before = snapshot(target)
    code, err = run(args(data, target, "--resume_from_checkpoint", str(other / BOUNDARY)))
    assert code == 2 and "holds a finished run" in one_error_line(err)
    code, err = run(args(data, target, "--resume_from_checkpoint", "latest"))
    line = one_error_line(err)
    assert code == 2 and "holds a finished run and no checkpoint" in line and "--overwrite_output_dir" in line
    assert snapshot(target) == before


# -------------------------------------------------------------------------------------- 3. durable writes
def test_durable_write_on_a_full_disk_keeps_the_old_file_and_leaves_no_partial(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    durable.write_json(target, {"v": 1})
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(UserError) as err:
        durable.write_json(target, {"v": 2})
    monkeypatch.undo()
    assert "no space left" in str(err.value) and str(target) in str(err.value) and "\n" not in str(err.value)
    assert json.loads(target.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["state.json"]


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left"), (errno.EDQUOT, "no space left"),
                                         (errno.EACCES, "permission denied"), (errno.EPERM, "permission denied"),
                                         (errno.EROFS, "read-only"), (errno.EIO, "cannot write")])
def test_every_os_error_of_a_write_is_one_line_naming_the_file_and_what_to_do(tmp_path, monkeypatch, code, words):
    def failing(*a, **k):
        raise OSError(code, os.strerror(code))

    files = {"a.json": "1", "b.json": "2", "c.png": lambda path: Path(path).write_bytes(b"png")}
    durable.write_files(tmp_path, files)
    before = snapshot(tmp_path)
    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(UserError) as err:
        durable.write_files(tmp_path, {"a.json": "new", "b.json": "new", "c.png": b"new"})
    monkeypatch.undo()
    assert words in str(err.value) and "left as they were" in str(err.value)
    assert snapshot(tmp_path) == before


def test_torch_reports_a_full_disk_as_unexpected_pos_and_that_is_translated_too():
    err = RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                       "data/3: file write failed; unexpected pos 3894912 vs 3894804")
    assert durable.is_write_failure(err) and "no space left" in durable.failure_message(err, "/x/optimizer.bin")
    assert not durable.is_write_failure(RuntimeError("size mismatch for weight"))


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_the_last_checkpoint_survives(data, tmp_path,
                                                                                        monkeypatch):
    from accelerate import Accelerator

    real, saves = Accelerator.save_state, []

    def full_at_the_second_save(self, output_dir=None, **kwargs):
        saves.append(output_dir)
        if len(saves) == 2:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "optimizer.bin").write_bytes(b"half")  # what a full disk leaves
            raise RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 3894912 vs 3894804")
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_at_the_second_save)
    out = tmp_path / "run"
    code, err = run(args(data, out, "--checkpointing_steps", "2"))
    line = one_error_line(err)
    assert code == 2 and "no space left" in line and "checkpoint-4" in line and "last complete checkpoint" in line
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["checkpoint-2"]
    verify_manifest(out / "checkpoint-2")
    assert not list(out.glob("checkpoint-*.tmp")) and not (out / LOCK).exists()


def test_a_full_disk_during_the_final_save_keeps_the_previous_outputs_and_the_checkpoints(finished, data, tmp_path,
                                                                                         monkeypatch):
    from transformers import PreTrainedModel

    out = copy_run(finished, tmp_path)
    before = {n: (out / n).read_bytes() for n in ("model.safetensors", FINISHED, "README.md")}
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    last = last_checkpoint(out).name
    code, err = run(args(data, out, "--resume_from_checkpoint", "latest"))  # at the end: evaluate and save again
    line = one_error_line(err)
    assert code == 2 and "no space left" in line and "previous final outputs" in line
    assert {n: (out / n).read_bytes() for n in before} == before
    assert last_checkpoint(out).name == last
    assert not [p.name for p in out.iterdir() if p.name.startswith(".hf_vit") and p.name != RECORD]


def test_overwrite_refuses_before_deleting_anything_when_one_checkpoint_cannot_be_deleted(finished, data, tmp_path,
                                                                                        monkeypatch):
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    real_access = os.access
    # As for a folder the user cannot write into (root ignores permissions, so the check is patched).
    monkeypatch.setattr(os, "access", lambda p, mode, **k: "checkpoint-6" not in str(p) and real_access(p, mode, **k))
    code, err = run(args(data, out, "--overwrite_output_dir", "true"))
    line = one_error_line(err)
    assert code == 2 and "checkpoint-6" in line and "nothing was deleted" in line
    assert snapshot(out) == before


def test_a_leftover_deleting_folder_is_deleted_in_place_never_renamed_again(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with prepare_output_dir(out, overwrite=False, resuming=False):
        record_created(out, "checkpoint-2")
        (out / "checkpoint-2").mkdir()
        (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    real_rmtree = shutil.rmtree

    def refused(path, *a, **k):
        raise OSError(errno.EBUSY, "Device or resource busy", str(path))

    monkeypatch.setattr(shutil, "rmtree", refused)
    with pytest.raises(UserError, match="cannot delete"):
        prepare_output_dir(out, overwrite=True, resuming=False)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".hf_vit-deleting-")]
    assert leftovers == [".hf_vit-deleting-checkpoint-2"]
    for _ in range(2):  # every later run tries again, in place
        with pytest.raises(UserError, match="cannot delete"):
            prepare_output_dir(out, overwrite=True, resuming=False)
        assert not list(out.glob(".hf_vit-deleting-.hf_vit-deleting-*"))
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    with prepare_output_dir(out, overwrite=True, resuming=False):
        pass
    assert not list(out.glob(".hf_vit-deleting-*"))


def test_a_failed_commit_of_final_outputs_leaves_the_previous_set(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with prepare_output_dir(out, overwrite=False, resuming=False):
        with FinalOutputs(out) as staging:
            (staging / FINISHED).write_text("old")
        with pytest.raises(UserError, match="no space left"):
            with FinalOutputs(out) as staging:
                (staging / "model.safetensors").write_text("new")
                disk_full()
    assert (out / FINISHED).read_text() == "old" and not (out / "model.safetensors").exists()


# ------------------------------------------------------------------------------ 4. output inside the dataset
def test_an_output_dir_inside_the_dataset_is_refused(data, tmp_path):
    before = snapshot(data)
    for inside in (data / "run", data / "train" / "deeper" / "run", data):
        code, err = run(args(data, inside))
        assert code == 2 and "lies inside the dataset" in one_error_line(err)
    assert snapshot(data) == before


def test_an_imagefolder_dataset_never_gains_a_class_named_after_a_run(tmp_path):
    folder = tmp_path / "images"
    for i, img in enumerate(images(16)):
        (folder / "train" / CLASSES[i % 4]).mkdir(parents=True, exist_ok=True)
        img.save(folder / "train" / CLASSES[i % 4] / f"{i}.png")
    code, err = run(args(folder, folder / "train" / "my-run"))
    assert code == 2 and "lies inside the dataset" in one_error_line(err)
    assert sorted(p.name for p in (folder / "train").iterdir()) == CLASSES


# ----------------------------------------------------------------------------------------- 5. a missing image
def dataset_with_missing_images(folder: Path, missing: set[int], n: int = 96) -> Path:
    rows = [None if i in missing else {"bytes": b, "path": None} for i, b in enumerate(png_bytes(n))]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    ds = datasets.Dataset.from_dict({"img": rows, "label": [i % 4 for i in range(n)]}, features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(folder / "saved"))
    (folder / "parquet" / "data").mkdir(parents=True)
    ds.to_parquet(str(folder / "parquet" / "data" / "train-00000-of-00001.parquet"))
    return folder


@pytest.mark.parametrize("mode", ["map", "streaming", "subset"])
def test_a_missing_image_is_kept_in_train_skipped_and_counted(tmp_path, mode):
    """The default train_val_split carve-out and the train_fraction subset used to crash on a None image."""
    missing = {5, 17, 40}
    folder = dataset_with_missing_images(tmp_path, missing)
    extra = {"map": [], "subset": ["--train_fraction", "0.9"],
             "streaming": ["--streaming", "true", "--train_samples", "72"]}[mode]
    data = folder / ("parquet" if mode == "streaming" else "saved")
    out = tmp_path / "run"
    code, err = run(args(data, out, "--num_train_epochs", "1", "--max_bad_sample_fraction", "0.2",
                         "--total_train_batch_size", "8", *extra))
    assert code == 0, err
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_skipped_samples"] == len(missing), results  # every missing one trained on: in train


def test_the_missing_image_rule_agrees_on_every_path():
    from hf_vit.data.keys import MISSING_IMAGE_KEY, example_key, in_subset, in_validation

    for image in (None, {"bytes": None, "path": None}, {"bytes": None, "path": ""}):
        assert example_key(image) == MISSING_IMAGE_KEY
    assert not any(in_validation(MISSING_IMAGE_KEY, 0.999, s) for s in range(50))
    assert all(in_subset(MISSING_IMAGE_KEY, 0.001, s) for s in range(50))


# ----------------------------------------------------------------------------------------------------- 6. push
@pytest.fixture
def fake_hub(monkeypatch):
    import hf_vit.hub as hub
    from test_hub import FakeApi

    api = FakeApi()
    monkeypatch.setattr(hub, "HfApi", lambda token=None: api)
    return api


def push(argv):
    from hf_vit import push as push_cli

    return in_process(push_cli.main, argv)


def test_push_refuses_what_is_not_a_finished_run_and_creates_no_repo(tmp_path, fake_hub):
    crashed = tmp_path / "crashed"
    with prepare_output_dir(crashed, overwrite=False, resuming=False):
        record_created(crashed, "train_config.yaml")
        (crashed / "train_config.yaml").write_text("seed: 1\n")
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "passport.png").write_bytes(b"private")
    (scans / "all_results.json").write_text("{}")
    for folder, words in ((crashed, "the run did not finish"), (scans, "not a finished hf_vit run")):
        code, _, err = push([str(folder), "--hub_model_id", "alice/x"])
        assert code == 2 and words in one_error_line(err)
    assert fake_hub.calls == []


def test_push_uploads_only_the_files_the_run_recorded_and_a_new_repo_is_public_unless_private(finished, tmp_path,
                                                                                             fake_hub):
    run_dir = copy_run(finished, tmp_path)
    (run_dir / "scan.png").write_bytes(b"private")  # a user's file with a name a run could have written
    (run_dir / "notes.json").write_text("{}")
    code, out, err = push([str(run_dir), "--hub_model_id", "alice/x", "--include_checkpoints"])
    assert code == 0, err
    final = fake_hub.uploads[-1].files
    assert {"model.safetensors", FINISHED, "README.md", "train_config.yaml"} <= final
    assert "scan.png" not in final and "notes.json" not in final
    assert fake_hub.uploads[1].path_in_repo == "last-checkpoint"
    assert fake_hub.uploads[1].files == set(json.loads((last_checkpoint(run_dir) / "manifest.json").read_text())
                                            ["files"]) | {"manifest.json"}
    assert [kw["private"] for call, kw in fake_hub.calls if call == "create_repo"] == [False]


def test_push_of_a_named_checkpoint_verifies_it_and_an_altered_one_is_refused(finished, tmp_path, fake_hub):
    run_dir = copy_run(finished, tmp_path)
    code, _, err = push([str(run_dir / "checkpoint-6"), "--hub_model_id", "alice/x", "--private"])
    assert code == 0, err
    assert [(u.folder, u.path_in_repo) for u in fake_hub.uploads] == [("checkpoint-6", ""),
                                                                       ("checkpoint-6", "last-checkpoint")]
    with open(run_dir / "checkpoint-4" / "model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x00")
    calls = len(fake_hub.calls)
    code, _, err = push([str(run_dir / "checkpoint-4"), "--hub_model_id", "alice/x"])
    assert code == 2 and "altered" in one_error_line(err) and len(fake_hub.calls) == calls


def test_push_refuses_a_run_in_progress(finished, tmp_path, fake_hub):
    run_dir = copy_run(finished, tmp_path)
    with RunLock(run_dir, command="holder"):
        code, _, err = push([str(run_dir), "--hub_model_id", "alice/x"])
    assert code == 2 and "in use by another hf_vit run" in one_error_line(err) and fake_hub.calls == []


# ------------------------------------------------------------------------------------- 7. a broken weight file
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_model_safetensors_is_one_line_in_every_command(finished, data, tmp_path):
    from hf_vit import attention, report
    from hf_vit import eval as hf_eval
    from hf_vit.trainer import train
    from hf_vit.config import parse_config

    run_dir = copy_run(finished, tmp_path)
    truncate(run_dir / "model.safetensors")
    (run_dir / FINISHED).write_text(json.dumps({k: v for k, v in json.loads((run_dir / FINISHED).read_text()).items()
                                                if k != "num_parameters"}))  # so the report counts the weights
    commands = {
        "eval": (hf_eval.main, eval_argv(run_dir, data, "--output_dir", str(tmp_path / "e"))),
        "attention": (attention.main, [str(run_dir), "--output", str(tmp_path / "a.png")]),
        "report": (report.main, [str(run_dir)]),
        "fine-tune": (lambda a: train(parse_config(a)), args(data, tmp_path / "ft", "--model_name_or_path",
                                                             str(run_dir))),
    }
    for name, (main, argv) in commands.items():
        code, _, err = in_process(main, argv)
        line = one_error_line(err)
        assert code == 2 and ("model.safetensors" in line or str(run_dir) in line), (name, line)


# ------------------------------------------------------------------------ 8. exit status, signals, output paths
def test_a_command_whose_stdout_reader_went_away_exits_0_without_a_traceback(finished):
    proc = subprocess.Popen([sys.executable, "-m", "hf_vit.report", str(finished)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    proc.stdout.close()  # `| head -0`: the reader is gone before the first line
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err


def test_the_stdout_guard_drops_output_after_a_broken_pipe_and_restores_stdout():
    from hf_vit.errors import _GoneStdout

    class Closed(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    guard = _GoneStdout(Closed())
    assert guard.write("line\n") == 5 and guard.gone and guard.write("more") == 4
    before = sys.stdout
    run_cli(lambda argv: print("done"), [])
    assert sys.stdout is before


def test_sighup_is_handled_like_sigterm():
    from hf_vit.runtime import Preemption

    previous = signal.getsignal(signal.SIGHUP)
    with Preemption() as preemption:
        os.kill(os.getpid(), signal.SIGHUP)
        assert preemption.requested
    assert signal.getsignal(signal.SIGHUP) == previous


def test_sighup_during_training_saves_a_checkpoint_releases_the_lock_and_exits_0(data, tmp_path, monkeypatch):
    import hf_vit.trainer as trainer

    real, calls = trainer.evaluate_classifier, []

    def hung_up(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGHUP)  # the terminal that started the run was closed
        return real(*a, **k)

    monkeypatch.setattr(trainer, "evaluate_classifier", hung_up)
    out = tmp_path / "run"
    code, err = run(args(data, out, "--max_train_steps", "6", "--eval_steps", "4", "--checkpointing_steps", "no"))
    assert code == 0, err
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["checkpoint-5"]
    assert not (out / LOCK).exists() and not (out / FINISHED).exists()


def test_an_attention_output_that_is_a_folder_or_a_report_output_that_is_a_file_fails_before_anything_runs(
        finished, tmp_path):
    from hf_vit import report

    (tmp_path / "f").write_text("mine")
    code, out, err = in_process(report.main, [str(finished), "--output_dir", str(tmp_path / "f")])
    assert code == 2 and "is a file, not a folder" in one_error_line(err) and out == ""
    assert (tmp_path / "f").read_text() == "mine"


# -------------------------------------------------------------------------------------- 9. EXIF orientation
def oriented_jpeg(orientation: int, size=(80, 48), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = orientation
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def reference(data: bytes) -> np.ndarray:
    """What datasets' Image feature (and pipeline()) give: the image turned upright by PIL."""
    feature = datasets.Image()
    return np.asarray(feature.decode_example({"bytes": data, "path": None}).convert("RGB"))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_decode_path_applies_the_exif_orientation_exactly_as_datasets_does(orientation):
    from hf_vit.data.decoding import decode_box, decode_reduced, open_image, to_uint8_tensor
    from hf_vit.data.device_data import _decode_jpeg_fast

    data = oriented_jpeg(orientation)
    image = {"bytes": data, "path": None}
    want = reference(data)
    assert want.shape[:2] == ((80, 48) if orientation >= 5 else (48, 80))
    assert np.array_equal(to_uint8_tensor(open_image(image)).permute(1, 2, 0).numpy(), want)
    assert np.array_equal(decode_reduced(open_image(image), 1).numpy(), want)
    box = (3, 5, 30, 20)  # the partial JPEG decoder's path (a crop), on the upright image
    assert np.array_equal(decode_box(open_image(image), 1, box).numpy(), want[3:33, 5:25])
    assert np.array_equal(_decode_jpeg_fast(image).permute(1, 2, 0).numpy(), want)


def test_the_loader_and_the_device_jpeg_path_train_on_the_upright_image():
    from torchvision.transforms import RandomResizedCrop, v2

    from hf_vit.data.decoding import open_image
    from hf_vit.data.device_jpeg import DeviceJpegDecoder, JpegPlanCollate
    from hf_vit.data.loader import DecodeCollate
    from hf_vit.data.transforms import RandomResizedCropDecode

    # At 32 px no crop of these 80x48 images is decoded at a DCT reduction, so the device's full decode + crop is
    # bit-identical to the loader's on a CPU "device".
    transform = v2.Compose([RandomResizedCropDecode(32, (0.3, 1.0)), v2.RandomHorizontalFlip()])
    transform.image_size = 32
    rows = [{"img": {"bytes": oriented_jpeg(o, seed=o), "path": f"c/{o}.jpg"}, "label": o % 4} for o in range(1, 9)]
    cpu = DecodeCollate(transform, "img", "label", 4, seed=1, train=True)(rows)
    planned = JpegPlanCollate(transform, "img", "label", 4, seed=1)
    assert [planned.plan(r) is not None for r in rows] == [True] + [False] * 7  # turned ones decode on the CPU
    device = DeviceJpegDecoder(transform, torch.device("cpu"))(planned(rows))
    order = {k: i for i, k in enumerate(device.keys)}
    assert torch.equal(device.pixel_values[[order[k] for k in cpu.keys]], cpu.pixel_values)
    # The crop box is drawn on the upright image, as the PIL reference draws it (a transposed one is 48 x 80).
    upright = PIL.Image.fromarray(reference(rows[5]["img"]["bytes"]))
    assert upright.size == open_image(rows[5]["img"]).size == (48, 80)
    torch.manual_seed(0)
    box = RandomResizedCrop.get_params(upright, (0.3, 1.0), (3 / 4, 4 / 3))
    torch.manual_seed(0)
    assert RandomResizedCrop.get_params(open_image(rows[5]["img"]), (0.3, 1.0), (3 / 4, 4 / 3)) == box


def test_identity_compares_numbers_by_value_and_a_checkpoint_without_one_resumes_with_a_warning(caplog):
    saved = {"seed": 3, "num_train_epochs": 2, "model": {"hidden_size": 16},
             "dataset": {"name": "/a/cifar10", "fingerprint": "f1"}}
    moved = {**saved, "num_train_epochs": 2.0, "dataset": {"name": "/b/cifar10", "fingerprint": "f1"}}
    assert ckpt.identity_differences(saved, moved) == {}  # the same data moved elsewhere is the same run
    other = {**moved, "model": {"hidden_size": 32}, "dataset": {"name": "/b/cifar10", "fingerprint": "f2"}}
    assert set(ckpt.identity_differences(saved, other)) == {"model", "dataset"}
    assert ckpt.check_identity("/x/checkpoint-4", saved, other, ["model", "dataset"]) == {
        "model": ({"hidden_size": 16}, {"hidden_size": 32}), "dataset": ("/a/cifar10", "/b/cifar10")}
    with caplog.at_level("WARNING", logger="hf_vit"):
        assert ckpt.check_identity("/x/checkpoint-4", None, other, []) == {}
    assert "records no run identity" in caplog.text
