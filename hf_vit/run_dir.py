"""The output folder: what hf_vit owns in it, who is using it, and final outputs that are committed all at once.

Three mechanisms, all inside ``output_dir``:

* Ownership. ``.hf_vit_run.json`` names every top-level entry hf_vit created there. A name is recorded *before* its
  entry is created, so a kill can leave a recorded name without its entry but never an entry of ours without its
  name. Entries derived from a recorded name (``checkpoint-6.tmp`` and ``checkpoint-6.deleting.tmp`` from
  ``checkpoint-6``) are ours too. A folder is an hf_vit run if one of the recorded entries exists; a folder written
  before the record existed (``train_config.yaml``, ``all_results.json`` or a complete ``checkpoint-<N>``, no record)
  is a run as well, and every entry of it with a name hf_vit writes is taken as hf_vit's (recorded when a run opens
  it). Every other entry is foreign: hf_vit never deletes or overwrites it, and a foreign entry where an output must
  go (``README.md``, ``config.json``, ``checkpoint-<N>``, ...) stops a run before anything is written.
* The lock. ``.hf_vit_run.lock`` is held with ``flock`` by the main process from before its first write to its end,
  and names the holder (pid, host, start time, command). The kernel drops the lock when its holder dies, SIGKILL
  included, so a lock file whose lock is free was left by a run that is gone: it is taken over with a warning.
* Final outputs. :class:`FinalOutputs` stages the model, results, card and plots and commits them so that a kill at
  any moment leaves the previous set or the new one (its docstring says exactly what is guaranteed).

Every name hf_vit keeps for its own bookkeeping starts with ``.hf_vit``; such entries are never foreign.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import socket
import sys
from datetime import datetime
from pathlib import Path

from .errors import UserError

logger = logging.getLogger("hf_vit.run_dir")

RECORD = ".hf_vit_run.json"
LOCK = ".hf_vit_run.lock"
STAGING = ".hf_vit_final.staging"
COMMIT = ".hf_vit_final.commit.json"
BOOKKEEPING_PREFIX = ".hf_vit"
_PARTIAL = ".hf_vit-partial-"  # an atomic write in progress
_DELETING = ".hf_vit-deleting-"  # a folder being deleted
FINISHED = "all_results.json"  # present in output_dir only beside a complete set of final outputs
TRACKER_DIR = "hf_vit"  # accelerate's tensorboard tracker logs into <project_dir>/<project name>
FINAL_OUTPUTS = ("model.safetensors", "model.safetensors.index.json", "config.json", "preprocessor_config.json",
                 FINISHED, "eval_results.json", "log_history.json", "README.md", "learning_curve.png",
                 "confusion_matrix.png")
OUTPUT_NAMES = frozenset({*FINAL_OUTPUTS, "train_config.yaml", TRACKER_DIR})
_OUTPUT_PATTERN = re.compile(r"checkpoint-\d+(\.tmp|\.deleting\.tmp)?|model-\d+-of-\d+\.safetensors")
_CHECKPOINT = re.compile(r"checkpoint-\d+")
_DERIVED_SUFFIXES = (".deleting.tmp", ".tmp")
# flock fails with these on filesystems without locks (some network mounts); the recorded holder then decides.
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def _is_output_name(name: str) -> bool:
    """True for a top-level name a run writes (final outputs, ``train_config.yaml``, ``checkpoint-<N>[.tmp]``)."""
    return name in OUTPUT_NAMES or bool(_OUTPUT_PATTERN.fullmatch(name))


# ----------------------------------------------------------------------------------------------- file primitives
def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (renames, creations, deletions) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` so that a kill leaves the old file or the new one, flushed to disk; returns path."""
    path = Path(path)
    tmp = path.with_name(f"{_PARTIAL}{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def _delete(out: Path, name: str) -> None:
    """Delete one entry; a folder is first renamed to a bookkeeping name, so a kill never leaves half of it under its
    own name."""
    path = out / name
    if path.is_dir() and not path.is_symlink():
        doomed = out / f"{_DELETING}{name}"
        if doomed.exists():
            shutil.rmtree(doomed)
        os.replace(path, doomed)
        shutil.rmtree(doomed)
    elif os.path.lexists(path):
        path.unlink()


# ---------------------------------------------------------------------------------------------------- ownership
def _is_bookkeeping(name: str) -> bool:
    return name.startswith(BOOKKEEPING_PREFIX)


def _base(name: str) -> str:
    for suffix in _DERIVED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def _is_legacy_run(out: Path) -> bool:
    """A run written before the ownership record existed."""
    return (any((out / m).exists() for m in ("train_config.yaml", FINISHED))
            or any(_CHECKPOINT.fullmatch(n) and (out / n / "trainer_state.json").is_file() for n in _entries(out)))


def _current_record(out: Path) -> dict:
    """The ownership record: ``created`` (names hf_vit made) and ``final`` (the committed final outputs). Without a
    record file, a legacy run's hf_vit-named entries are adopted; any other folder owns nothing yet."""
    try:
        text = (out / RECORD).read_text()
    except FileNotFoundError:
        if not _is_legacy_run(out):
            return {"created": [], "final": []}
        names = sorted({_base(n) for n in _entries(out) if _is_output_name(n)})
        return {"created": names, "final": [n for n in names if n in FINAL_OUTPUTS or n.startswith("model-")]}
    try:
        record = json.loads(text)
        return {"created": [str(n) for n in record["created"]], "final": [str(n) for n in record["final"]]}
    except (ValueError, KeyError, TypeError):
        raise UserError(f"output_dir {str(out)!r} holds an unreadable ownership record {RECORD}; delete that file to "
                        "have the folder judged by its files") from None


def _write_record(out: Path, record: dict) -> None:
    text = json.dumps({"created": sorted(set(record["created"])), "final": sorted(set(record["final"]))}, indent=1)
    with contextlib.suppress(FileNotFoundError):
        if (out / RECORD).read_text() == text:
            return
    atomic_write(out / RECORD, text)


def _owns(record: dict, name: str) -> bool:
    return _is_bookkeeping(name) or name in record["created"] or _base(name) in record["created"]


def _existing(out: Path, record: dict) -> list[str]:
    """The entries of output_dir that hf_vit created (recorded names and the ones derived from them)."""
    return [n for n in _entries(out) if not _is_bookkeeping(n) and _owns(record, n)]


def created_by_hf_vit(output_dir: str | os.PathLike, name: str) -> bool:
    """True if the top-level entry ``name`` of ``output_dir`` was created by hf_vit (or is its bookkeeping).

    Checkpoint rotation and the cleanup of stale ``checkpoint-*.tmp`` folders must delete only entries for which
    this holds: a user's ``checkpoint-old.tmp`` is not one.
    """
    return _owns(_current_record(Path(output_dir)), name)


def record_created(output_dir: str | os.PathLike, *names: str) -> None:
    """Record that hf_vit is about to create the top-level entries ``names`` in ``output_dir`` (call it *before*
    creating them: ``checkpoint-<N>`` before writing ``checkpoint-<N>.tmp``, ``train_config.yaml``, the tracker
    folder). Written atomically; a no-op for names already recorded."""
    out = Path(output_dir)
    for name in names:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"record_created takes a top-level name in output_dir, got {name!r}")
    record = _current_record(out)
    if not set(names) <= set(record["created"]) or not (out / RECORD).exists():
        _write_record(out, {**record, "created": [*record["created"], *names]})


# ------------------------------------------------------------------------------------------------------ checks
def _check_contents(out: Path, overwrite: bool, resuming: bool) -> None:
    record = _current_record(out)
    others = [n for n in _entries(out) if not _is_bookkeeping(n)]
    foreign = [n for n in others if not _owns(record, n)]
    is_run = len(foreign) < len(others)  # some entry is hf_vit's
    if is_run and not (overwrite or resuming):
        raise UserError(f"output_dir {str(out)!r} already holds a run; pass --overwrite_output_dir, "
                        "--resume_from_checkpoint latest, or choose another folder")
    if foreign and not is_run and not overwrite:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UserError(f"output_dir {str(out)!r} holds files hf_vit did not write ({foreign[0]!r}{more}); choose "
                        "an empty folder, or pass --overwrite_output_dir to write beside them (they are never deleted)")
    clash = [n for n in foreign if _is_output_name(n)]
    if clash:
        raise UserError(f"output_dir {str(out)!r} holds {clash[0]!r}, which hf_vit did not write but a run writes "
                        "there; move it out of the folder or choose another output_dir")


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool, resuming: bool) -> None:
    """Refuse, with a one-line UserError and without writing anything, an output_dir a run may not use: a file; a
    folder another live run holds; a run folder unless ``overwrite`` or ``resuming``; a non-empty folder that is not
    an hf_vit run unless ``overwrite``; a folder where a foreign entry sits at an output's name, whatever the flags.
    Read-only. Once this run's own main process holds the lock, the check reports the folder as in use, so other
    processes must not call it after that (:func:`prepare_output_dir` is the main process's call)."""
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


def prepare_output_dir(output_dir: str | os.PathLike, overwrite: bool, resuming: bool,
                       command: str | None = None) -> RunLock:
    """Open ``output_dir`` for a run and return the held :class:`RunLock` (release it, or use it as a context
    manager, when the run ends). Call on the main process only, before anything is written.

    Runs :func:`check_output_dir`, takes the lock (creating the folder), checks again under the lock, finishes or
    discards final outputs an interrupted run left (:func:`recover_final_outputs`), removes hf_vit's leftovers of
    interrupted writes and deletions, and with ``overwrite`` (and not ``resuming``, which needs the checkpoints)
    deletes every entry hf_vit created there — never a foreign one. Returns the lock; raises UserError.
    """
    check_output_dir(output_dir, overwrite, resuming)
    lock = RunLock(output_dir, command).acquire()
    out = Path(output_dir)
    try:
        _check_contents(out, overwrite, resuming)  # again: the folder may have changed before the lock was ours
        recover_final_outputs(out)
        for name in _entries(out):
            if name.startswith((_PARTIAL, _DELETING)):
                _delete(out, name)
        record = _current_record(out)
        if overwrite and not resuming:
            # The finished marker goes first, so the folder never shows it beside a half-deleted set.
            for name in sorted(_existing(out, record), key=lambda n: (n != FINISHED, (out / n).is_dir(), n)):
                _delete(out, name)
        # Keep the record exact: names whose entries are gone (deleted, or recorded by a kill before creation) go.
        # A folder without a record gets one only when something changed, so a refused start leaves none behind.
        present = {*_entries(out), *map(_base, _entries(out))}
        exact = {"created": [n for n in record["created"] if n in present],
                 "final": [n for n in record["final"] if (out / n).exists()]}
        if (out / RECORD).exists() or exact != record:
            _write_record(out, exact)
    except BaseException:
        lock.release()
        raise
    return lock


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
            if (out / RECORD).exists() and not _existing(out, _current_record(out)):
                (out / RECORD).unlink()  # a run that wrote nothing leaves nothing behind
        # Unlinked while still locked: a run waiting on this file finds it gone and locks a fresh one.
        self.path.unlink(missing_ok=True)
        if self._created_dir and not _entries(out):
            with contextlib.suppress(OSError):
                out.rmdir()
        _HELD.discard(self._fd)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------------------ final outputs
class FinalOutputs:
    """Stage the final outputs, then commit them into ``output_dir`` so that a kill leaves the old set or the new one.

    Usage (main process, holding the :class:`RunLock`)::

        with FinalOutputs(output_dir) as staging:       # a fresh folder inside output_dir
            model.save_pretrained(staging); ...          # every final file goes into `staging`
        # committed here; an exception inside the block leaves output_dir as it was

    The commit: (1) every staged file and the staging folder are flushed to disk; (2) the commit marker
    (``.hf_vit_final.commit.json``: the names to move in and the previous set's names to remove) is written
    atomically — this is the commit point; (3) roll forward: the names are recorded as hf_vit's, ``all_results.json``
    is removed, every other staged file is renamed into place, files of the previous set that the new one lacks are
    removed, ``all_results.json`` is renamed in last, the folder is flushed, and the marker and staging folder go.

    Guarantees: a kill before the commit point leaves the previous set untouched (the next
    :func:`recover_final_outputs` discards the staging folder); a kill after it leaves the marker, and the next
    :func:`recover_final_outputs` finishes step 3 (every step is idempotent), so after recovery output_dir holds
    exactly the previous set or exactly the new one. Before recovery, ``all_results.json`` is present only beside a
    complete, consistent set: a reader that waits for it never sees a mix. Only names listed in the record as final
    outputs are ever removed; a foreign file at a staged name stops the commit before the commit point.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.staging = self.output_dir / STAGING

    def __enter__(self) -> Path:
        recover_final_outputs(self.output_dir)
        self.staging.mkdir(parents=True)
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        self.commit()

    def commit(self) -> None:
        out, staging = self.output_dir, self.staging
        new = _entries(staging)
        record = _current_record(out)
        try:
            for name in new:
                if not (staging / name).is_file() or (staging / name).is_symlink():
                    raise ValueError(f"final outputs are plain files; {staging / name} is not one")
            clash = [n for n in new if os.path.lexists(out / n) and not _owns(record, n)]
            if clash:
                raise UserError(f"output_dir {str(out)!r} holds {clash[0]!r}, which hf_vit did not write; move it out "
                                "of the folder and rerun (the final outputs were not written)")
            for name in new:
                fd = os.open(staging / name, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_dir(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        remove = [n for n in record["final"] if n not in new]
        atomic_write(out / COMMIT, json.dumps({"new": new, "remove": remove}))  # the commit point
        _roll_forward(out)


def _roll_forward(out: Path) -> None:
    """Step 3 of the commit protocol, from the marker; safe to repeat after a kill at any point of it."""
    staging = out / STAGING
    try:
        plan = json.loads((out / COMMIT).read_text())
        new, remove = [str(n) for n in plan["new"]], [str(n) for n in plan["remove"]]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"output_dir {str(out)!r} holds an unreadable {COMMIT}; delete it and {STAGING} to keep the "
                        "previous final outputs") from None
    record = _current_record(out)
    _write_record(out, {"created": [*record["created"], *new], "final": new})
    if (staging / FINISHED).exists() or FINISHED in remove:
        (out / FINISHED).unlink(missing_ok=True)
    for name in new:
        if name != FINISHED and (staging / name).exists():
            os.replace(staging / name, out / name)
    for name in remove:
        (out / name).unlink(missing_ok=True)
    if (staging / FINISHED).exists():
        os.replace(staging / FINISHED, out / FINISHED)
    fsync_dir(out)
    (out / COMMIT).unlink()
    fsync_dir(out)
    shutil.rmtree(staging, ignore_errors=True)


def recover_final_outputs(output_dir: str | os.PathLike) -> bool:
    """Finish a commit of final outputs that a kill interrupted after its commit point, or discard a staging folder
    it left before it; returns True if there was anything to do (and logs a warning saying which). Call holding the
    :class:`RunLock`; :func:`prepare_output_dir` and :class:`FinalOutputs` call it."""
    out = Path(output_dir)
    if (out / COMMIT).exists():
        _roll_forward(out)
        logger.warning("output_dir %s: finished committing the final outputs of an interrupted run", out)
        return True
    if (out / STAGING).exists():
        staged = _entries(out / STAGING)
        shutil.rmtree(out / STAGING)
        if not staged:  # a kill after a commit had moved everything in: only the empty folder was left
            return False
        logger.warning("output_dir %s: discarded final outputs an interrupted run had not committed; the previous "
                       "ones are intact", out)
        return True
    return False
