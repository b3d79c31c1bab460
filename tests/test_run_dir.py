"""The output folder: foreign files are never touched, one run at a time holds it, final outputs are all-or-nothing."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hf_vit import run_dir
from hf_vit.errors import UserError
from hf_vit.run_dir import (COMMIT, FINISHED, LOCK, RECORD, STAGING, FinalOutputs, RunLock, atomic_write,
                            check_output_dir_available, created_by_hf_vit, prepare_output_dir, record_created,
                            recover_final_outputs)

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every path under ``folder`` with its bytes (files) and modification time: equal snapshots = untouched."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def one_line_error(call) -> str:
    with pytest.raises(UserError) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def foreign_folder(path: Path) -> Path:
    """Somebody else's files: a model card, a model config, a folder that looks like a stale checkpoint."""
    path.mkdir()
    (path / "README.md").write_text("my notes")
    (path / "config.json").write_text('{"mine": true}')
    (path / "checkpoint-old.tmp").mkdir()
    (path / "checkpoint-old.tmp" / "weights.bin").write_bytes(b"precious")
    return path


def finished_run(path: Path, foreign: bool = True) -> Path:
    """A run written through this module: config, two checkpoints, a committed set of final outputs; then a user
    adds files of their own beside it."""
    with prepare_output_dir(path, overwrite=False, resuming=False):
        record_created(path, "train_config.yaml")
        (path / "train_config.yaml").write_text("learning_rate: 0.001\n")
        for step in (2, 4):
            record_created(path, f"checkpoint-{step}")
            (path / f"checkpoint-{step}").mkdir()
            (path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        with FinalOutputs(path) as staging:
            for name in ("model.safetensors", "config.json", "README.md", FINISHED):
                (staging / name).write_text(f"run 1 {name}")
    if foreign:
        (path / "notes.txt").write_text("mine")
        (path / "checkpoint-old.tmp").mkdir()
    return path


# ----------------------------------------------------------------------------------------------- foreign files
def test_a_file_given_as_output_dir_is_refused(tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("x")
    assert "is a file" in one_line_error(lambda: prepare_output_dir(target, overwrite=True, resuming=False))
    assert target.read_text() == "x"


@pytest.mark.parametrize("resuming", [False, True])
def test_a_non_empty_foreign_folder_is_refused_without_overwrite_and_left_untouched(tmp_path, resuming):
    out = foreign_folder(tmp_path / "out")
    before = snapshot(out)
    message = one_line_error(lambda: prepare_output_dir(out, overwrite=False, resuming=resuming))
    assert "did not write" in message and "--overwrite_output_dir" in message
    assert snapshot(out) == before  # not even a lock file


def test_a_foreign_file_where_an_output_goes_is_refused_even_with_overwrite(tmp_path):
    out = foreign_folder(tmp_path / "out")
    before = snapshot(out)
    message = one_line_error(lambda: prepare_output_dir(out, overwrite=True, resuming=False))
    assert "'README.md'" in message and "move it out" in message
    assert snapshot(out) == before


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "log_history.json", "checkpoint-7",
                                  "checkpoint-7.tmp", "hf_vit"])
def test_every_output_name_held_by_a_foreign_entry_is_refused(tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    if "." in name and not name.endswith(".tmp"):
        (out / name).write_text("mine")
    else:
        (out / name).mkdir()
    before = snapshot(out)
    assert repr(name) in one_line_error(lambda: prepare_output_dir(out, overwrite=True, resuming=False))
    assert snapshot(out) == before


def test_overwrite_beside_foreign_files_writes_beside_them_and_never_deletes_them(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-old.tmp").mkdir()
    before = snapshot(out)
    with prepare_output_dir(out, overwrite=True, resuming=False):
        record_created(out, "checkpoint-3")
        (out / "checkpoint-3").mkdir()
    with prepare_output_dir(out, overwrite=True, resuming=False):  # the folder is now a run: overwrite clears it
        assert not (out / "checkpoint-3").exists()
    assert snapshot(out) == before


def test_a_run_folder_is_refused_unless_overwrite_or_resume(tmp_path):
    out = finished_run(tmp_path / "out")
    before = snapshot(out)
    message = one_line_error(lambda: prepare_output_dir(out, overwrite=False, resuming=False))
    assert "already holds a run" in message and "--resume_from_checkpoint latest" in message
    assert snapshot(out) == before


def test_resuming_a_run_deletes_nothing_even_with_overwrite(tmp_path):
    out = finished_run(tmp_path / "out")
    before = snapshot(out)
    with prepare_output_dir(out, overwrite=True, resuming=True):
        assert {k: v for k, v in snapshot(out).items() if not k.startswith(".hf_vit")} == \
            {k: v for k, v in before.items() if not k.startswith(".hf_vit")}


def test_overwrite_deletes_exactly_what_hf_vit_wrote(tmp_path):
    out = finished_run(tmp_path / "out")
    with prepare_output_dir(out, overwrite=True, resuming=False):
        left = sorted(p.name for p in out.iterdir() if not p.name.startswith(".hf_vit"))
        assert left == ["checkpoint-old.tmp", "notes.txt"]
        assert json.loads((out / RECORD).read_text()) == {"created": [], "final": []}
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-old.tmp", "notes.txt"]


def test_a_run_written_before_the_record_is_a_run_and_overwrite_deletes_only_its_known_files(tmp_path):
    out = tmp_path / "legacy"
    out.mkdir()
    for name in ("train_config.yaml", FINISHED, "model.safetensors", "README.md", "learning_curve.png", "notes.txt"):
        (out / name).write_text(name)
    for folder in ("checkpoint-3", "checkpoint-6.tmp", "hf_vit", "checkpoint-old.tmp", "data"):
        (out / folder).mkdir()
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")
    before = snapshot(out)
    assert "already holds a run" in one_line_error(lambda: prepare_output_dir(out, overwrite=False, resuming=False))
    assert snapshot(out) == before
    with prepare_output_dir(out, overwrite=False, resuming=True):
        assert not (out / RECORD).exists()  # opening it changes nothing...
        record_created(out, "checkpoint-9")  # ...the run's first write records it, its hf_vit files adopted
        record = json.loads((out / RECORD).read_text())
        assert record["created"] == ["README.md", FINISHED, "checkpoint-3", "checkpoint-6", "checkpoint-9", "hf_vit",
                                     "learning_curve.png", "model.safetensors", "train_config.yaml"]
        assert record["final"] == ["README.md", FINISHED, "learning_curve.png", "model.safetensors"]
    with prepare_output_dir(out, overwrite=True, resuming=False):
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".hf_vit")) == \
            ["checkpoint-old.tmp", "data", "notes.txt"]


def test_rotation_predicate_owns_hf_vit_checkpoints_and_their_tmp_forms_but_not_a_foreign_checkpoint_old_tmp(
        tmp_path):
    out = tmp_path / "out"
    with prepare_output_dir(out, overwrite=False, resuming=False):
        record_created(out, "checkpoint-5")
        (out / "checkpoint-5.tmp").mkdir()
        (out / "checkpoint-old.tmp").mkdir()  # appeared while the run was going
        assert created_by_hf_vit(out, "checkpoint-5") and created_by_hf_vit(out, "checkpoint-5.tmp")
        assert created_by_hf_vit(out, "checkpoint-5.deleting.tmp") and created_by_hf_vit(out, LOCK)
        assert not created_by_hf_vit(out, "checkpoint-old.tmp") and not created_by_hf_vit(out, "checkpoint-9.tmp")
        for stale in out.glob("checkpoint-*.tmp"):  # what checkpoint.rotate does with the predicate
            if created_by_hf_vit(out, stale.name):
                shutil.rmtree(stale)
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".hf_vit")) == ["checkpoint-old.tmp"]


def test_a_kill_between_recording_a_name_and_creating_it_is_forgotten_at_the_next_start(tmp_path):
    out = finished_run(tmp_path / "out", foreign=False)
    record_created(out, "checkpoint-6")  # killed right after: checkpoint-6.tmp never appeared
    with prepare_output_dir(out, overwrite=False, resuming=True):
        assert "checkpoint-6" not in json.loads((out / RECORD).read_text())["created"]


def test_a_run_that_wrote_nothing_leaves_no_trace(tmp_path):
    new, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    for out in (new, empty):
        with pytest.raises(RuntimeError), prepare_output_dir(out, overwrite=False, resuming=False):
            raise RuntimeError("the dataset failed to load")
    assert not new.exists() and list(empty.iterdir()) == []


def test_an_unreadable_ownership_record_is_a_one_line_error(tmp_path):
    out = finished_run(tmp_path / "out")
    (out / RECORD).write_text("{not json")
    assert RECORD in one_line_error(lambda: prepare_output_dir(out, overwrite=True, resuming=False))


def test_atomic_write_killed_before_the_rename_keeps_the_old_file_and_no_partial(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write(target, "old")

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


# -------------------------------------------------------------------------------------------------------- lock
HOLDER = """
import os, sys, time
from hf_vit.run_dir import RunLock
RunLock(sys.argv[1], command="run_finetune.py --config r.yaml").acquire()
child = os.fork() if sys.argv[2] == "fork" else 0
if child == 0 and sys.argv[2] == "fork":
    os.write(1, b"child-running\\n")  # one write each: the two processes share the pipe
    time.sleep(120)  # a dataloader worker outliving its parent
    os._exit(0)
os.write(1, f"locked {child}\\n".encode())
time.sleep(120)
"""


def start_holder(out: Path, fork: bool = False) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), "fork" if fork else "-"], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    lines = sorted(proc.stdout.readline().split() for _ in range(2 if fork else 1))
    assert lines[-1][:1] == ["locked"], "the holder did not take the lock"
    return proc, int(lines[-1][1])


def test_a_live_run_holding_the_folder_refuses_a_second_run_naming_pid_host_and_start_time(tmp_path):
    out = tmp_path / "out"
    proc, _ = start_holder(out)
    try:
        holder = json.loads((out / LOCK).read_text())
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", holder["started"])
        before = snapshot(out)
        for attempt in (lambda: prepare_output_dir(out, overwrite=True, resuming=True), lambda: RunLock(out).acquire()):
            message = one_line_error(attempt)
            assert f"pid {proc.pid} on host {socket.gethostname()}, started {holder['started']}" in message
            assert "run_finetune.py --config r.yaml" in message and "in use by another hf_vit run" in message
        assert snapshot(out) == before
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_left_by_a_sigkilled_run_is_taken_over_and_the_warning_names_it(tmp_path, caplog):
    out = tmp_path / "out"
    proc, _ = start_holder(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / LOCK).exists()  # the file stays; the kernel dropped the lock with the process
    with caplog.at_level(logging.WARNING, logger="hf_vit.run_dir"), \
            prepare_output_dir(out, overwrite=False, resuming=False):
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    assert f"pid {proc.pid}" in caplog.text and "is gone; taking over its lock" in caplog.text
    assert not (out / LOCK).exists()


def test_a_forked_child_of_a_killed_run_does_not_keep_its_lock(tmp_path):
    out = tmp_path / "out"
    proc, child = start_holder(out, fork=True)
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.kill(child, 0)  # the child is still alive...
        RunLock(out).acquire().release()  # ...and the lock is free all the same
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_lock_is_released_when_the_run_raises(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError), RunLock(out):
        (out / "notes.txt").write_text("written during the run")
        raise ValueError("a bug")
    assert not (out / LOCK).exists()
    with RunLock(out):
        pass


def test_an_output_dir_that_cannot_be_written_is_a_one_line_error(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", denied)  # as for a non-root user under a read-only parent
    assert "cannot write into output_dir" in one_line_error(lambda: RunLock(tmp_path / "out").acquire())


def test_on_a_filesystem_without_locks_the_recorded_holder_decides(tmp_path, monkeypatch, caplog):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_dir.fcntl, "flock", no_flock)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    for pid, live in ((os.getpid(), True), (int(dead.stdout), False)):
        (out / LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "t", "command": "c"}))
        if live:
            assert f"pid {pid}" in one_line_error(lambda: RunLock(out).acquire())
        else:
            with caplog.at_level(logging.WARNING, logger="hf_vit.run_dir"), RunLock(out):
                pass
            assert f"pid {pid}" in caplog.text and "is gone" in caplog.text


# ----------------------------------------------------------------------------------------------- final outputs
OLD = {"model.safetensors": b"old weights", "config.json": b"old config", "README.md": b"old card",
       FINISHED: b"old results", "confusion_matrix.png": b"old plot"}
NEW = {"model.safetensors": b"new weights!", "config.json": b"new config", "README.md": b"new card",
       FINISHED: b"new results", "learning_curve.png": b"new plot"}


def final_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.name in OLD or p.name in NEW}


class Killed(BaseException):
    """Stands for a SIGKILL: nothing of ours catches it, no cleanup runs after it."""


def test_final_outputs_killed_at_every_step_of_the_commit_leave_the_old_or_the_new_set(tmp_path, monkeypatch):
    template = tmp_path / "template"
    with prepare_output_dir(template, overwrite=False, resuming=False):
        with FinalOutputs(template) as staging:
            for name, data in OLD.items():
                (staging / name).write_bytes(data)
        (template / "notes.txt").write_text("foreign")
        record_created(template, "checkpoint-3")
        (template / "checkpoint-3").mkdir()
    real = {name: getattr(os, name) for name in ("replace", "rename", "unlink", "rmdir", "fsync")}
    outcomes = []
    for kill_at in range(200):
        out = tmp_path / f"attempt-{kill_at}"
        shutil.copytree(template, out)
        calls = [0]

        def faulty(name, calls=calls, kill_at=kill_at):
            def call(*args, **kwargs):
                calls[0] += 1
                if calls[0] > kill_at:
                    raise Killed
                return real[name](*args, **kwargs)
            return call

        for name in real:
            monkeypatch.setattr(os, name, faulty(name))
        try:
            with FinalOutputs(out) as staging:
                for name, data in NEW.items():
                    (staging / name).write_bytes(data)
            finished = True
        except Killed:
            finished = False
        finally:
            for name, fn in real.items():
                monkeypatch.setattr(os, name, fn)
        # Before any recovery, a reader that trusts all_results.json never sees a mixed set.
        if (out / FINISHED).exists():
            assert final_files(out) in (OLD, NEW), kill_at
        with prepare_output_dir(out, overwrite=False, resuming=True):  # what the next run on the folder does
            pass
        files = final_files(out)
        assert files in (OLD, NEW), (kill_at, files)
        outcomes.append("new" if files == NEW else "old")
        assert (out / "notes.txt").read_text() == "foreign" and (out / "checkpoint-3").is_dir()
        assert not [p.name for p in out.iterdir() if p.name.startswith(".hf_vit") and p.name != RECORD]
        assert json.loads((out / RECORD).read_text())["final"] == sorted(files)
        if finished:
            assert files == NEW
            break
    else:
        pytest.fail("the commit never finished")
    # The kills landed on both sides of the commit point.
    assert outcomes[0] == "old" and outcomes[-1] == "new" and len(outcomes) > 10


def test_an_error_while_writing_final_outputs_leaves_the_previous_ones(tmp_path):
    out = finished_run(tmp_path / "out")
    before = snapshot(out)
    with pytest.raises(RuntimeError), FinalOutputs(out) as staging:
        (staging / "model.safetensors").write_text("half")
        raise RuntimeError("plotting failed")
    assert snapshot(out) == before


def test_a_foreign_file_that_appears_at_an_output_name_stops_the_commit_and_survives(tmp_path):
    out = tmp_path / "out"
    with prepare_output_dir(out, overwrite=False, resuming=False):
        (out / "README.md").write_text("the user's card")
        with pytest.raises(UserError, match="'README.md', which hf_vit did not write"), FinalOutputs(out) as staging:
            (staging / "README.md").write_text("our card")
            (staging / FINISHED).write_text("{}")
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".hf_vit")) == ["README.md"]
        assert (out / "README.md").read_text() == "the user's card"


def test_recovery_reports_nothing_on_a_clean_folder(tmp_path):
    out = finished_run(tmp_path / "out")
    assert recover_final_outputs(out) is False
    assert not (out / STAGING).exists() and not (out / COMMIT).exists()


def test_check_output_dir_writes_nothing_on_success(tmp_path):
    out = finished_run(tmp_path / "out")
    before = snapshot(out)
    check_output_dir_available(out, overwrite=False, resuming=True)
    check_output_dir_available(tmp_path / "absent", overwrite=False, resuming=False)
    assert snapshot(out) == before and not (tmp_path / "absent").exists()
