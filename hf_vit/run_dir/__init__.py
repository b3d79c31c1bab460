"""The output folder: what hf_vit owns in it, who is using it, and final outputs that are committed all at once.

Three mechanisms, all inside ``output_dir``, one module each; every name is imported from ``hf_vit.run_dir``
itself, as before the split:

* Ownership (:mod:`~hf_vit.run_dir.ownership`). ``.hf_vit_run.json`` names every top-level entry hf_vit created
  there; every other entry is foreign: hf_vit never deletes or overwrites it, and a foreign entry where an output must
  go (``README.md``, ``config.json``, ``checkpoint-<N>``, ...) stops a run before anything is written.
* The lock (here). ``.hf_vit_run.lock`` is held with ``flock`` by the main process from before its first write to its
  end, and names the holder (pid, host, start time, command). The kernel drops the lock when its holder dies, SIGKILL
  included, so a lock file whose lock is free was left by a run that is gone: it is taken over with a warning.
* Final outputs (:mod:`~hf_vit.run_dir.final_outputs`). :class:`FinalOutputs` stages the model, results, card and
  plots and commits them so that a kill at any moment leaves the previous set or the new one.

This module also checks a folder before a run uses it (:func:`check_output_dir_available`) and opens it for the run
(:func:`prepare_output_dir`); :mod:`~hf_vit.run_dir.files` holds the file primitives (:func:`atomic_write`,
:func:`fsync_dir`). Every name hf_vit keeps for its own bookkeeping starts with ``.hf_vit``; such entries are never
foreign.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shlex
import socket
import sys
from datetime import datetime
from pathlib import Path

from ..errors import UserError
from ..durable import check_deletable
from ..locations import local_path
from .files import DELETING_PREFIX, PARTIAL_PREFIX, atomic_write, delete_entry, fsync_dir
from .final_outputs import COMMIT, STAGING, FinalOutputs, recover_final_outputs
from .ownership import (BOOKKEEPING_PREFIX, FINAL_OUTPUTS, FINISHED, OUTPUT_NAMES, PREDICTION_FILES, RECORD,
                        TRACKER_DIR, base_name, created_by_hf_vit, is_bookkeeping, is_output_name, list_entries,
                        owned_entries, owns, read_record, record_created, write_record)

__all__ = [
    "BOOKKEEPING_PREFIX", "COMMIT", "FINAL_OUTPUTS", "FINISHED", "FinalOutputs", "LOCK", "OUTPUT_NAMES",
    "PREDICTION_FILES", "RECORD", "RunLock", "STAGING", "TRACKER_DIR", "analysis_output_dir", "atomic_write",
    "check_analysis_output", "check_output_dir_available", "check_outside_dataset", "created_by_hf_vit", "fsync_dir", "prepare_output_dir",
    "record_created", "recover_final_outputs",
]

logger = logging.getLogger("hf_vit.run_dir")

LOCK = ".hf_vit_run.lock"
# flock fails with these on filesystems without locks (some network mounts); the recorded holder then decides.
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
_CHECKPOINT = re.compile(r"checkpoint-\d+")


# ------------------------------------------------------------------------------------------------------ checks
def _check_contents(out: Path, overwrite: bool, resuming: bool) -> None:
    record = read_record(out)
    others = [n for n in list_entries(out) if not is_bookkeeping(n)]
    foreign = [n for n in others if not owns(record, n)]
    is_run = len(foreign) < len(others)  # some entry is hf_vit's
    if is_run and not (overwrite or resuming):
        raise UserError(f"output_dir {str(out)!r} already holds a run; pass --overwrite_output_dir, "
                        "--resume_from_checkpoint latest, or choose another folder")
    if foreign and not is_run and not overwrite:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UserError(f"output_dir {str(out)!r} holds files hf_vit did not write ({foreign[0]!r}{more}); choose "
                        "an empty folder, or pass --overwrite_output_dir to write beside them (they are never deleted)")
    clash = [n for n in foreign if is_output_name(n)]
    if clash:
        raise UserError(f"output_dir {str(out)!r} holds {clash[0]!r}, which hf_vit did not write but a run writes "
                        "there; move it out of the folder or choose another output_dir")


def _has_checkpoint(out: Path) -> bool:
    """Whether ``out`` holds a complete checkpoint (a ``checkpoint-<N>`` folder with its state file)."""
    return any(_CHECKPOINT.fullmatch(n) and (out / n / "trainer_state.json").is_file() for n in list_entries(out))


def check_output_dir_available(output_dir: str | os.PathLike, overwrite: bool, resuming: bool,
                     finished_needs_checkpoint: bool = True) -> None:
    """Refuse, with a one-line UserError and without writing anything, an output_dir a run may not use: a file; a
    folder another live run holds; a run folder unless ``overwrite`` or ``resuming``; a non-empty folder that is not
    an hf_vit run unless ``overwrite``; a folder where a foreign entry sits at an output's name, whatever the flags.
    With ``finished_needs_checkpoint`` (the default: a run's first check), a resume (``latest``) into a finished
    run that holds no checkpoint of its own is refused too — it would start over and replace the finished run's
    model and results. Read-only. Once this run's own main process holds the lock, the check reports the folder as
    in use, so other processes must not call it after that (:func:`prepare_output_dir` is the main process's call)."""
    out = Path(output_dir)
    if os.path.lexists(out) and not out.is_dir():
        raise UserError(f"output_dir {str(out)!r} is a file, not a folder; choose a folder path")
    if not out.is_dir():
        return
    try:
        fd = os.open(out / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        pass
    else:
        try:
            if not _try_lock(fd):
                raise UserError(_busy_message(out, _read_holder(fd)))
        finally:
            os.close(fd)  # a probe's flock ends with its file descriptor
    _check_contents(out, overwrite, resuming)
    if finished_needs_checkpoint and resuming and not overwrite and (out / FINISHED).is_file() \
            and not _has_checkpoint(out):
        raise UserError(f"output_dir {str(out)!r} holds a finished run and no checkpoint of it to resume from; a "
                        "resume would replace its model and results: pass --overwrite_output_dir to train it again, "
                        "or choose another output_dir")


def prepare_output_dir(output_dir: str | os.PathLike, overwrite: bool, resuming: bool,
                       command: str | None = None) -> RunLock:
    """Open ``output_dir`` for a run and return the held :class:`RunLock` (release it, or use it as a context
    manager, when the run ends). Call on the main process only, before anything is written.

    Runs :func:`check_output_dir_available`, takes the lock (creating the folder), checks again under the lock,
    finishes or discards final outputs an interrupted run left (:func:`recover_final_outputs`), removes hf_vit's
    leftovers of interrupted writes and deletions, and with ``overwrite`` (and not ``resuming``, which needs the
    checkpoints) deletes every entry hf_vit created there — never a foreign one. Returns the lock; raises UserError.
    """
    # The run checked that first (finished_needs_checkpoint); this is the check again, right before the lock.
    check_output_dir_available(output_dir, overwrite, resuming, finished_needs_checkpoint=False)
    lock = RunLock(output_dir, command).acquire()
    out = Path(output_dir)
    try:
        _check_contents(out, overwrite, resuming)  # again: the folder may have changed before the lock was ours
        record = read_record(out)
        leftovers = [n for n in list_entries(out) if n.startswith((PARTIAL_PREFIX, DELETING_PREFIX))]
        doomed = owned_entries(out, record) if overwrite and not resuming else []
        # Everything that is to go is checked first: a part that cannot be deleted stops the run before anything is.
        check_deletable([out / n for n in leftovers + doomed],
                        f"--overwrite_output_dir deletes what hf_vit wrote in {str(out)!r}" if doomed
                        else f"an interrupted hf_vit run left it in {str(out)!r}")
        recover_final_outputs(out)
        for name in leftovers:
            delete_entry(out, name)
        record = read_record(out)
        if doomed:
            # The finished marker goes first, so the folder never shows it beside a half-deleted set.
            for name in sorted(owned_entries(out, record), key=lambda n: (n != FINISHED, (out / n).is_dir(), n)):
                delete_entry(out, name)
        # Keep the record exact: names whose entries are gone (deleted, or recorded by a kill before creation) go.
        # A folder without a record gets one only when something changed, so a refused start leaves none behind.
        present = {*list_entries(out), *map(base_name, list_entries(out))}
        exact = {"created": [n for n in record["created"] if n in present],
                 "final": [n for n in record["final"] if (out / n).exists()]}
        if (out / RECORD).exists() or exact != record:
            write_record(out, exact)
    except BaseException:
        lock.release()
        raise
    return lock


def _real(path: str | os.PathLike) -> Path:
    if "\0" in str(path):  # no file system takes one (os calls raise ValueError)
        raise UserError(f"path {str(path)!r} contains a NUL character; pass a real path")
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(str(path)))))


def check_outside_dataset(output: str | os.PathLike, dataset, what: str = "output_dir") -> None:
    """Refuse (one line) an output path that lies inside the local dataset being read: an image-folder dataset would
    gain a class of the run's files, a parquet folder would stop loading. ``dataset``: the
    :class:`hf_vit.data.DataSource` being read (already classified), or a dataset name as a user gave it (classified
    here by :func:`hf_vit.locations.local_path`); None or a Hub id passes."""
    if dataset is None or isinstance(dataset, str):
        name, folder = dataset, (local_path(dataset) if dataset else None)
    else:
        name, folder = dataset.name, dataset.local_path
    if folder is None or not os.path.exists(folder):
        return
    data, target = _real(folder), _real(output)
    if target == data or data in target.parents:
        raise UserError(f"{what} {str(output)!r} lies inside the dataset {name!r} being read; its files "
                        "would become part of the data: choose a folder outside the dataset")


def analysis_output_dir(model_path: str | os.PathLike) -> Path:
    """Where a command that reads a run (``hf_vit.eval``, ``hf_vit.attention``) writes by default: a sibling of the
    run folder, ``<run>-eval/`` (for a ``checkpoint-<N>`` of a run: ``<run>-eval/checkpoint-<N>/``), never the run
    folder itself; for a model that is no local folder (a Hub id), ``./eval_<name>``."""
    path = Path(os.path.expanduser(str(model_path)))
    if not path.is_dir():
        return Path.cwd() / ("eval_" + path.name)
    path = _real(path)
    if _CHECKPOINT.fullmatch(path.name):
        return path.parent.with_name(path.parent.name + "-eval") / path.name
    return path.with_name(path.name + "-eval")


def _is_run_folder(folder: Path) -> bool:
    try:
        return bool(owned_entries(folder, read_record(folder))) or (folder / LOCK).exists()
    except UserError:  # an unreadable record still marks a run
        return True
    except OSError:  # a folder we cannot list is no run of ours
        return False


def _locked_by_a_run(folder: Path) -> dict | None:
    """The holder of a live run lock on ``folder`` (a dict, maybe empty), else None."""
    try:
        fd = os.open(folder / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        return None if _try_lock(fd) else _read_holder(fd)
    finally:
        os.close(fd)


def check_analysis_output(output: str | os.PathLike, what: str = "--output_dir") -> None:
    """Refuse (one line, before anything runs) an output path of another command (eval, attention, report) that
    would write into a run: an existing file where a folder goes, a path inside a ``checkpoint-<N>`` folder (the
    checkpoint would no longer match its manifest), or a path in or under an hf_vit run folder (a run folder is
    written only by its run: its results would be overwritten, or, while it trains, its final commit would fail)."""
    target = _real(output)
    if what == "--output_dir" and target.exists() and not target.is_dir():
        raise UserError(f"{what} {str(output)!r} is a file, not a folder; pass a folder path")
    for folder in (target, *target.parents):
        if _CHECKPOINT.fullmatch(folder.name.removesuffix(".tmp")) and (
                (folder / "trainer_state.json").exists() or (folder / "manifest.json").exists()
                or _is_run_folder(folder.parent)):
            raise UserError(f"{what} {str(output)!r} lies inside the checkpoint {str(folder)!r}, which must stay as "
                            "it was saved; write elsewhere (the default is a sibling of the run folder)")
        if folder.is_dir() and _is_run_folder(folder):
            holder = _locked_by_a_run(folder)
            if holder is not None:
                raise UserError(f"{what} {str(output)!r} lies inside {str(folder)!r}, which a training run is using "
                                f"({_describe(holder)}); choose a folder outside it")
            raise UserError(f"{what} {str(output)!r} would write into the run folder {str(folder)!r}, which only its "
                            "training run writes; choose a folder outside it (the default is "
                            f"{str(folder.with_name(folder.name + '-eval'))!r})")


# -------------------------------------------------------------------------------------------------------- lock
_HELD: set[int] = set()  # lock descriptors held by this process


def _close_held_in_child() -> None:
    # A forked child (a dataloader worker) must not keep the run's lock alive after the run itself dies.
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0))
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _holder_gone(holder: dict) -> bool:
    """True if the recorded holder ran on this host and its process no longer exists."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` without waiting; False if a live run holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno not in _NO_LOCKS:
            raise
        holder = _read_holder(fd)
        return not holder or _holder_gone(holder)


def _describe(holder: dict) -> str:
    if not holder:
        return "a run that had not yet written its details"
    command = " ".join(str(holder.get("command", "?")).split())
    command = command if len(command) <= 200 else command[:200] + " ..."
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}, "
            f"command: {command}")


def _busy_message(out: Path, holder: dict) -> str:
    return (f"output_dir {str(out)!r} is in use by another hf_vit run ({_describe(holder)}); wait for it to end or "
            "choose another output_dir")


class RunLock:
    """The run lock on ``output_dir``: ``acquire()`` (or ``with RunLock(dir):``) creates the folder if needed, takes
    the lock and records the holder; ``release()`` removes the lock file (and the folder again if this lock created
    it and nothing but bookkeeping is in it).

    A second live holder gets a UserError naming the first (pid, host, start time, command). A lock file whose lock
    is free (its run was killed) is taken over with a warning naming the run that left it. The lock is released on
    exceptions and, by the kernel, when the process dies; forked children do not hold it.
    """

    def __init__(self, output_dir: str | os.PathLike, command: str | None = None):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK
        self.command = command if command is not None else shlex.join(sys.argv)
        self.holder: dict = {}
        self._fd: int | None = None
        self._owner_pid = os.getpid()
        self._created_dir = False

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        self._created_dir = not self.output_dir.exists()
        while True:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except PermissionError as err:
                raise UserError(f"cannot write into output_dir {str(self.output_dir)!r} ({err.strerror}); choose a "
                                "folder you can write to") from None
            if not _try_lock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise UserError(_busy_message(self.output_dir, holder))
            try:  # the previous holder may have removed the file between our open and our lock: lock the new one
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = _read_holder(fd)
        if previous:
            logger.warning("output_dir %s: the run that held it (%s) is gone; taking over its lock", self.output_dir,
                           _describe(previous))
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(),
                       "started": datetime.now().astimezone().isoformat(timespec="seconds"), "command": self.command}
        # Written in place, not through durable.write_*: the lock is on this file's inode, which a rename would replace.
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.holder).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        _HELD.add(fd)
        return self

    def release(self) -> None:
        if self._fd is None or os.getpid() != self._owner_pid:
            return
        out = self.output_dir
        with contextlib.suppress(UserError, OSError):  # never mask the error a run is ending with
            if (out / RECORD).exists() and not owned_entries(out, read_record(out)):
                (out / RECORD).unlink()  # a run that wrote nothing leaves nothing behind
        # Unlinked while still locked: a run waiting on this file finds it gone and locks a fresh one.
        self.path.unlink(missing_ok=True)
        if self._created_dir and not list_entries(out):
            with contextlib.suppress(OSError):
                out.rmdir()
        _HELD.discard(self._fd)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
