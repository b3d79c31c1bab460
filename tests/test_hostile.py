"""Hostile inputs, class by class (issue 12): no hang, no lost or mixed-up file, no silent half-resume, no traceback.

Runs are tiny (a one-block ViT on generated 8x8 images) and go through the real entry wrapper, in this process where
a signal or a patched function must land in a chosen phase, or as a subprocess where the exit code and the process
tree are the point.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from hf_vit.config import parse_config
from hf_vit.errors import run_cli
from hf_vit.trainer import train

CLASSES = [f"class_{i}" for i in range(4)]


def images(n: int, seed: int = 0) -> list[PIL.Image.Image]:
    """``n`` 8x8 images whose mean colour says their class (i % 4): learnable, tiny."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = np.zeros((8, 8, 3), dtype=np.float32)
        base[..., i % 3] = 60 + 60 * (i % 4)
        out.append(PIL.Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)))
    return out


def png_bytes(n: int) -> list[bytes]:
    out = []
    for img in images(n):
        buffer = io.BytesIO()
        img.save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def not_an_image(i: int) -> bytes:
    return b"not an image %d" % i


def saved_dataset(folder: Path, n: int = 96, bad: set[int] = frozenset()) -> Path:
    """A ``save_to_disk`` dataset (img/label) of ``n`` images; the examples in ``bad`` hold bytes that are no image."""
    rows = [{"bytes": not_an_image(i) if i in bad else data, "path": None} for i, data in enumerate(png_bytes(n))]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    ds = datasets.Dataset.from_dict({"img": rows, "label": [i % 4 for i in range(n)]}, features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(folder))
    return folder


def parquet_stream(folder: Path, n: int = 200, label_overrides: dict[int, int] | None = None,
                   corrupt_pages: bool = False) -> Path:
    """A Hub-style parquet folder; ``label_overrides`` writes labels outside the ClassLabel into the file, and
    ``corrupt_pages`` damages the second shard's data pages (its footer stays readable)."""
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    ds = datasets.Dataset.from_dict({"img": images(n), "label": [i % 4 for i in range(n)]}, features=features)
    (folder / "data").mkdir(parents=True)
    shard = folder / "data" / "train-00000-of-00002.parquet"
    ds.to_parquet(str(shard))
    table = pq.read_table(shard)
    labels = table.column("label").to_pylist()
    for row, label in (label_overrides or {}).items():
        labels[row] = label
    table = table.set_column(table.schema.get_field_index("label"), table.schema.field("label"),
                             pa.array(labels, type=table.schema.field("label").type))
    pq.write_table(table, shard)
    second = folder / "data" / "train-00001-of-00002.parquet"
    data = bytearray(shard.read_bytes())
    if corrupt_pages:
        for i in range(2000, min(len(data) - 2000, 20000), 7):
            data[i] ^= 0x5A
    second.write_bytes(bytes(data))
    return folder


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset_name", str(data), "--output_dir", str(out), "--model_preset", "vit_tiny_cifar",
            "--hidden_size", "16", "--num_hidden_layers", "1", "--num_attention_heads", "1", "--intermediate_size",
            "16", "--image_size", "8", "--patch_size", "4", "--total_train_batch_size", "16",
            "--dataloader_num_workers", "0", "--report_to", "none", "--train_val_split", "0.25", "--seed", "3",
            "--split_seed", "3", "--num_train_epochs", "2", "--logging_steps", "1", *extra]


def run(argv: list[str]) -> tuple[int, str]:
    """The training entry point in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            run_cli(lambda a: train(parse_config(a)), argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return saved_dataset(tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    """A finished run with checkpoints (every 2 steps) to resume from or damage copies of."""
    out = tmp_path_factory.mktemp("finished") / "run"
    code, err = run(args(data, out, "--checkpointing_steps", "2", "--checkpoints_total_limit", "10"))
    assert code == 0, err
    return out


def checkpoint_copy(finished: Path, tmp_path: Path, step: int = 4) -> Path:
    import shutil

    copy = tmp_path / f"checkpoint-{step}"
    shutil.copytree(finished / f"checkpoint-{step}", copy)
    return copy


# ---------------------------------------------------------------------------------------------------- 1. hangs
def test_a_checkpoint_mid_epoch_of_another_epoch_length_is_refused_naming_the_settings(finished, data, tmp_path):
    """Saved at step 2 of a 4-step epoch, resumed where the epoch holds 1 step: refused (it used to spin forever)."""
    state = json.loads((finished / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step_in_epoch"] == 2
    code, err = run(args(data, tmp_path / "run", "--resume_from_checkpoint", str(finished / "checkpoint-2"),
                         "--max_train_samples", "16"))
    assert code == 2
    line = one_error_line(err)
    assert "mid-epoch" in line and "max_train_samples" in line and not (tmp_path / "run").exists()


def test_an_edited_trainer_state_is_refused_before_anything_loads(finished, data, tmp_path):
    copy = checkpoint_copy(finished, tmp_path, step=2)
    state = json.loads((copy / "trainer_state.json").read_text())
    (copy / "trainer_state.json").write_text(json.dumps({**state, "step_in_epoch": 99}))
    code, err = run(args(data, tmp_path / "run", "--resume_from_checkpoint", str(copy)))
    assert code == 2 and "trainer_state.json is altered" in one_error_line(err)


def test_a_streamed_label_outside_the_class_list_is_skipped_and_counted(tmp_path):
    """datasets raises while encoding such a row, inside the loader worker: it used to hang the run."""
    stream = parquet_stream(tmp_path / "ds", label_overrides={row: 57 for row in range(5, 200, 20)})
    code, err = run(args(stream, tmp_path / "run", "--streaming", "true", "--max_train_steps", "12",
                         "--dataloader_num_workers", "1", "--train_samples", "300", "--train_val_split", "0.1",
                         "--max_bad_sample_fraction", "0.5"))
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert results["train_skipped_samples"] >= 1 and results["global_step"] == 12


def test_an_unexpected_error_in_a_loader_worker_ends_the_process_with_exit_1_and_no_worker_left(tmp_path):
    stream = parquet_stream(tmp_path / "ds", corrupt_pages=True)
    command = [sys.executable, "run_finetune.py", *args(stream, tmp_path / "run", "--streaming", "true",
                                                        "--max_train_steps", "40", "--dataloader_num_workers", "2",
                                                        "--train_samples", "380", "--train_val_split", "0.1")]
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the run hung after a loader worker failed")
    assert proc.returncode == 1, stderr[-3000:]
    assert "DataLoader worker" in stderr and time.monotonic() - start < 120
    left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes of the run still alive: {left}"


# ------------------------------------------------------------------------------------------- 2. files and lock
def test_a_folder_of_someone_elses_files_is_refused_and_left_untouched(data, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "checkpoint-old.tmp").mkdir()
    before = snapshot(out)
    code, err = run(args(data, out))
    assert code == 2 and "did not write" in one_error_line(err) and snapshot(out) == before


def test_overwrite_writes_beside_foreign_files_and_never_deletes_them(data, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "checkpoint-old.tmp").mkdir()
    code, err = run(args(data, out, "--overwrite_output_dir", "true", "--checkpointing_steps", "1",
                         "--checkpoints_total_limit", "1"))
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "my notes" and (out / "checkpoint-old.tmp").is_dir()
    assert (out / "all_results.json").is_file() and len(list(out.glob("checkpoint-[0-9]*"))) == 1


def test_a_foreign_file_where_an_output_goes_is_refused_even_with_overwrite(data, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my readme")
    code, err = run(args(data, out, "--overwrite_output_dir", "true"))
    assert code == 2 and "README.md" in one_error_line(err)
    assert (out / "README.md").read_text() == "my readme" and sorted(p.name for p in out.iterdir()) == ["README.md"]


HOLD_LOCK = """
import sys, time
from hf_vit.run_dir import RunLock
lock = RunLock(sys.argv[1], command="holder-command").acquire()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_a_second_run_on_a_folder_in_use_gets_one_line_naming_the_holder(finished, data):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(finished), "60"], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(finished)
        code, err = run(args(data, finished, "--resume_from_checkpoint", "latest"))
        line = one_error_line(err)
        assert code == 2 and "in use by another hf_vit run" in line
        assert f"pid {holder.pid}" in line and "holder-command" in line and "started 20" in line
        assert snapshot(finished) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over_and_said(data, tmp_path, caplog):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), "60"], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()  # SIGKILL: no chance to release
    holder.wait()
    assert (out / ".hf_vit_run.lock").exists()
    code, err = run(args(data, out, "--max_train_steps", "2"))
    assert code == 0, err
    assert any("is gone; taking over its lock" in r.getMessage() and str(holder.pid) in r.getMessage()
               for r in caplog.records)


# ---------------------------------------------------------------------------------------------- 3. the manifest
@pytest.mark.parametrize("damage, words", [
    ("truncate", "random_states_0.pkl is truncated"),
    ("replace", "random_states_0.pkl was altered"),
    ("delete", "is missing random_states_0.pkl"),
    ("no manifest", "has no manifest.json"),
])
def test_a_damaged_checkpoint_is_refused_before_anything_loads(finished, data, tmp_path, damage, words):
    copy = checkpoint_copy(finished, tmp_path)
    rng_state = copy / "random_states_0.pkl"
    if damage == "truncate":
        rng_state.write_bytes(rng_state.read_bytes()[:100])
    elif damage == "replace":  # the same size, other bytes: only the hash tells
        raw = bytearray(rng_state.read_bytes())
        raw[-20] ^= 0xFF
        rng_state.write_bytes(bytes(raw))
    elif damage == "delete":
        rng_state.unlink()
    else:
        (copy / "manifest.json").unlink()
    code, err = run(args(data, tmp_path / "run", "--resume_from_checkpoint", str(copy)))
    assert code == 2 and words in one_error_line(err) and not (tmp_path / "run").exists()


def test_a_corrupt_trainer_state_behind_a_valid_manifest_is_one_line_not_a_json_traceback(finished, data, tmp_path):
    from hf_vit.manifest import write_manifest

    copy = checkpoint_copy(finished, tmp_path)
    (copy / "trainer_state.json").write_text('{"global_step": 4, "epoch": ')
    (copy / "manifest.json").unlink()
    write_manifest(copy)  # as if written so: the manifest matches, the state does not parse
    code, err = run(args(data, tmp_path / "run", "--resume_from_checkpoint", str(copy)))
    assert code == 2 and "unreadable trainer_state.json" in one_error_line(err)


# --------------------------------------------------------------------------------------------------- SIGTERM
@pytest.mark.parametrize("phase", ["evaluation", "final evaluation", "final save"])
def test_sigterm_in_evaluation_or_the_final_save_lets_it_finish_and_exits_0(data, tmp_path, monkeypatch, phase):
    """The signal lands inside the phase (sent by a patched function of that phase); the run ends exit 0 with the
    newest complete state on disk: a checkpoint when it stopped mid-training, every final output when it ended.
    Six steps, evaluated at step 4 (in the loop) and at step 6 (the final evaluation)."""
    import hf_vit.trainer as trainer

    target = "write_final_outputs" if phase == "final save" else "evaluate_classifier"
    real, calls = getattr(trainer, target), []

    def signalled(*a, **k):
        calls.append(1)
        if len(calls) == (2 if phase == "final evaluation" else 1):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(trainer, target, signalled)
    out = tmp_path / "run"
    code, err = run(args(data, out, "--max_train_steps", "6", "--eval_steps", "4", "--checkpointing_steps", "no"))
    assert code == 0, err
    if phase == "evaluation":  # the step after the evaluation stops the loop and saves it
        assert not (out / "all_results.json").exists()
        assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-5"]
    else:
        results = json.loads((out / "all_results.json").read_text())
        assert results["global_step"] == 6 and "eval_accuracy" in results
        assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


# --------------------------------------------------------------------------------------------- 5. data at the edges
def test_an_empty_eval_split_is_refused_before_anything_is_written(data, tmp_path):
    code, err = run(args(data, tmp_path / "run", "--train_val_split", "1e-9"))
    assert code == 2 and "holds no examples" in one_error_line(err) and not (tmp_path / "run").exists()


def test_an_eval_set_of_undecodable_images_still_saves_everything_and_says_evaluation_was_skipped(tmp_path, caplog):
    # Validation is carved by key (a hash of the bytes), and damaging an image changes its key: damage every example
    # that would be in validation either way, so that every validation example is unusable.
    from hf_vit.data.keys import example_key, in_validation

    def in_val(data: bytes) -> bool:
        return in_validation(example_key({"bytes": data, "path": None}), 0.25, 3)

    bad = {i for i, data in enumerate(png_bytes(96)) if in_val(data) or in_val(not_an_image(i))}
    ds = saved_dataset(tmp_path / "ds", n=96, bad=bad)
    out = tmp_path / "run"
    code, err = run(args(ds, out, "--max_bad_sample_fraction", "1"))
    assert code == 0, err
    results = json.loads((out / "all_results.json").read_text())
    assert "eval_accuracy" not in results and (out / "model.safetensors").is_file()
    assert not (out / "eval_results.json").exists()
    assert any("evaluation skipped" in r.getMessage() for r in caplog.records)


def test_half_the_images_undecodable_stops_the_run_after_its_first_step(tmp_path):
    ds = saved_dataset(tmp_path / "ds", n=96, bad=set(range(0, 96, 2)))
    out = tmp_path / "run"
    code, err = run(args(ds, out, "--checkpointing_steps", "1"))
    line = one_error_line(err)
    assert code == 2 and "training images were unusable" in line and "max_bad_sample_fraction" in line
    assert not list(out.glob("checkpoint-*"))  # stopped at step 1, before its checkpoint


def test_the_stop_rule_tolerates_a_rate_at_the_limit_and_catches_one_clearly_above():
    from hf_vit.guards import bad_fraction_lower_bound

    assert bad_fraction_lower_bound(16, 32) > 0.01  # half bad: one batch is proof enough
    assert bad_fraction_lower_bound(6, 64) > 0.01  # 10% bad against a 1% limit: after two batches
    assert bad_fraction_lower_bound(1, 32) < 0.01  # one bad image in a batch is no proof
    assert bad_fraction_lower_bound(100, 10_000) < 0.01 and bad_fraction_lower_bound(140, 10_000) < 0.01
    assert bad_fraction_lower_bound(300, 10_000) > 0.01
