"""Durable file writes: the one home for fsync, write-to-temp-then-rename, and deletes that never leave half a thing.

Every command writes through these helpers (checkpoints, the manifest, the ownership record, final outputs, eval and
attention results, reports), so that each write has the same guarantees:

* :func:`write_bytes` / :func:`write_text` / :func:`write_json` / :func:`writing`: the new file is written under a
  temporary name beside the target, flushed to disk, then renamed over it; a kill, a full disk or a refused write
  leaves the old file (or none), never a truncated one.
* :func:`write_files`: a set of files (``eval_results.json`` + its plots) written in two phases — every file is
  written and flushed under a temporary name first, then all are renamed — so a failure while writing (a full disk)
  replaces none of them. :func:`publish_folder`: a whole folder written under a temporary name, flushed, and renamed
  into place (a checkpoint).
* :func:`remove_partial`: a temporary entry that was never complete removed without ceremony.
* :func:`delete`: an entry deleted only after every part of it was checked to be deletable (nothing is deleted when
  one part cannot be), a folder first renamed out of its name so a kill never leaves half of it under that name; a
  leftover of an interrupted deletion is deleted in place, never renamed again.
* :func:`os_errors`: the one translation of an ``OSError`` (ENOSPC, EDQUOT, EACCES, EPERM, EROFS, any other) — or of
  a library's error that wraps one (torch's zip writer reports a full disk as ``unexpected pos``) — into a one-line
  :class:`~hf_vit.errors.UserError` naming the file, what to free or fix, and what was kept.

Temporary names start with ``.hf_vit`` (bookkeeping: :mod:`hf_vit.run_dir` never counts them as a user's files and
removes those an interrupted run left).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import UserError

PARTIAL_PREFIX = ".hf_vit-partial-"  # an atomic write in progress
DELETING_PREFIX = ".hf_vit-deleting-"  # a folder being deleted

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EACCES, errno.EPERM}
# Words by which libraries that do their own I/O (torch's zip writer, safetensors' Rust writer) report an OS failure.
_FULL_WORDS = ("no space left", "disk quota", "os error 28", "errno 28", "unexpected pos", "file write failed")
_DENIED_WORDS = ("permission denied", "os error 13", "errno 13")
_READ_ONLY_WORDS = ("read-only file system", "os error 30", "errno 30")


# ------------------------------------------------------------------------------------------------------ errors
def _kind(err: BaseException) -> str | None:
    """'full', 'denied', 'read-only', 'other' for a failed write; None if ``err`` is not an I/O failure."""
    if isinstance(err, OSError):
        if err.errno in _FULL:
            return "full"
        if err.errno in _DENIED:
            return "denied"
        if err.errno == errno.EROFS:
            return "read-only"
    text = str(err).lower()
    for kind, words in (("full", _FULL_WORDS), ("denied", _DENIED_WORDS), ("read-only", _READ_ONLY_WORDS)):
        if any(w in text for w in words):
            return kind
    return "other" if isinstance(err, OSError) else None


def is_write_failure(err: BaseException) -> bool:
    """Whether ``err`` is (or wraps) an operating-system failure to write: an OSError, or a library's error that
    names one (a full disk, a refused permission, a read-only file system)."""
    return _kind(err) is not None


def failure_message(err: BaseException, path: str | os.PathLike, kept: str = "nothing was changed",
                    action: str = "write") -> str:
    """One line for a failed ``action`` (write, delete) on ``path``: what happened, what to free or fix, and ``kept``
    (what is intact)."""
    where = str(path)
    kind = _kind(err) or "other"
    text = str(err).strip()
    detail = (getattr(err, "strerror", None) or (text.splitlines()[0] if text else type(err).__name__))[:200]
    if kind == "full":
        return (f"no space left to {action} {where!r} ({detail}); free space on that file system (or choose an "
                f"output folder on another one) and rerun; {kept}")
    if kind == "denied":
        return (f"permission denied: cannot {action} {where!r} ({detail}); make it writable or choose another "
                f"folder; {kept}")
    if kind == "read-only":
        return f"cannot {action} {where!r}: the file system is read-only; choose a writable folder; {kept}"
    return f"cannot {action} {where!r} ({detail}); fix the folder or choose another one; {kept}"


@contextlib.contextmanager
def os_errors(path: str | os.PathLike, kept: str = "nothing was changed", action: str = "write") -> Iterator[None]:
    """Turn any write failure inside the block (see :func:`is_write_failure`) into a one-line UserError about
    ``path``; ``kept`` says what was left intact. Other exceptions pass through unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - only write failures are translated; everything else is re-raised
        if not is_write_failure(err):
            raise
        raise UserError(failure_message(err, getattr(err, "filename", None) or path, kept, action)) from None


# ------------------------------------------------------------------------------------------------------- fsync
def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's bytes, or a folder's entries (renames, creations, deletions), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_path


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under ``folder``, then every folder of it (deepest first), to disk."""
    folders = []
    for root, _dirs, names in os.walk(folder):
        folders.append(root)
        for name in names:
            fsync_path(os.path.join(root, name))
    for root in reversed(folders):
        fsync_path(root)


def _partial_name(path: Path) -> Path:
    # The target's name last: writers that pick a format from the suffix (matplotlib) see the target's.
    return path.with_name(f"{PARTIAL_PREFIX}{os.getpid()}.{secrets.token_hex(4)}.{path.name}")


# ------------------------------------------------------------------------------------------------------ writes
@contextlib.contextmanager
def writing(path: str | os.PathLike, kept: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that wants a file name (``savefig``, ``save_file``);
    when the block ends the file is flushed and renamed over ``path``. A failure inside the block or while flushing
    removes the temporary file and leaves ``path`` as it was (a write failure becomes a one-line UserError)."""
    path = Path(path)
    tmp = _partial_name(path)
    kept = kept or f"{path.name} was left as it was"
    try:
        with os_errors(path, kept):
            yield tmp
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_dir(path.parent)
    finally:
        if os.path.lexists(tmp):
            with contextlib.suppress(OSError):
                tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes | str, kept: str | None = None) -> Path:
    """Write ``data`` to ``path`` so that a kill or a failed write leaves the old file or the new one, flushed to
    disk; returns ``path``."""
    path = Path(path)
    with writing(path, kept) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
    return path


def write_text(path: str | os.PathLike, text: str, kept: str | None = None) -> Path:
    return write_bytes(path, text.encode("utf-8"), kept)


def write_json(path: str | os.PathLike, value, indent: int | None = 2, kept: str | None = None) -> Path:
    return write_bytes(path, json.dumps(value, indent=indent).encode("utf-8"), kept)


Writer = bytes | str | Callable[[Path], object]


def write_files(folder: str | os.PathLike, files: dict[str, Writer], kept: str | None = None) -> list[Path]:
    """Write a set of files into ``folder`` (created if needed): each value is the bytes/text of the file or a
    function that writes it to the path it is given. Every file is written and flushed under a temporary name before
    any is renamed, so a failure while writing (a full disk, a refused permission) replaces none of them; returns the
    paths written."""
    folder = Path(folder)
    kept = kept or f"the files in {str(folder)!r} were left as they were"
    staged: dict[str, Path] = {}
    try:
        with os_errors(folder, kept):
            folder.mkdir(parents=True, exist_ok=True)
            for name, writer in files.items():
                tmp = staged[name] = _partial_name(folder / name)
                if callable(writer):
                    writer(tmp)
                else:
                    tmp.write_bytes(writer.encode("utf-8") if isinstance(writer, str) else writer)
                fsync_path(tmp)
            for name, tmp in staged.items():
                os.replace(tmp, folder / name)
            fsync_dir(folder)
    finally:
        for tmp in staged.values():
            if os.path.lexists(tmp):
                with contextlib.suppress(OSError):
                    tmp.unlink()
    return [folder / name for name in files]


def publish_folder(tmp_dir: str | os.PathLike, final: str | os.PathLike, doomed_suffix: str = ".deleting.tmp") -> Path:
    """Flush every file of the complete folder ``tmp_dir`` to disk and rename it to ``final`` (atomic). An existing
    ``final`` (an earlier attempt at the same name) is first renamed to ``<final><doomed_suffix>`` and deleted, so no
    moment shows a half folder under the final name. Returns ``final``. Raises OSError; callers translate it."""
    tmp_dir, final = Path(tmp_dir), Path(final)
    # Without the flush a power loss after the rename can leave a complete-looking folder of empty files.
    fsync_tree(tmp_dir)
    if final.exists():
        discard(final, final.with_name(final.name + doomed_suffix))
    os.replace(tmp_dir, final)
    fsync_dir(final.parent)
    return final


# ----------------------------------------------------------------------------------------------------- deletes
def undeletable(path: str | os.PathLike) -> list[str]:
    """The parts of ``path`` (a file or a folder tree) that cannot be deleted: an entry can be deleted when its
    parent folder is writable and searchable, so a tree is checked folder by folder. Empty when all of it can go."""
    path = Path(path)
    if not os.path.lexists(path):
        return []
    problems = []
    if not os.access(path.parent, os.W_OK | os.X_OK):
        problems.append(str(path))
    if path.is_dir() and not path.is_symlink():
        for root, dirs, names in os.walk(path):
            if (dirs or names) and not os.access(root, os.W_OK | os.X_OK):
                problems.append(root)
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    return problems


def check_deletable(paths: list[str | os.PathLike], what: str) -> None:
    """Refuse, before anything is deleted, when any part of ``paths`` cannot be deleted: a one-line UserError naming
    the first such part (``what`` says why they were to be deleted)."""
    for path in paths:
        problems = undeletable(path)
        if problems:
            more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
            raise UserError(f"cannot delete {problems[0]!r}{more} ({what}): its folder is not writable; make it "
                            "writable or move it away, then rerun; nothing was deleted")


def discard(folder: str | os.PathLike, doomed: str | os.PathLike) -> None:
    """Rename ``folder`` to ``doomed`` (atomic: it leaves its name whole), then delete it. A ``doomed`` left by an
    interrupted deletion is deleted first, in place."""
    folder, doomed = Path(folder), Path(doomed)
    if os.path.lexists(doomed):
        _remove(doomed)
    os.replace(folder, doomed)
    _remove(doomed)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_partial(path: str | os.PathLike) -> None:
    """Remove, as far as possible and without raising, a temporary entry that was never complete (a checkpoint's
    ``.tmp`` folder, a final-outputs staging folder): it is no result, so half of it left behind by a kill is only
    space, which the next run's cleanup frees — no rename first, no check that all of it can go (:func:`delete` is
    for entries that were complete)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def delete(path: str | os.PathLike, what: str = "hf_vit's own files") -> None:
    """Delete the file or folder ``path`` after checking that all of it can be deleted (else a one-line UserError
    and nothing deleted). A folder is first renamed to ``.hf_vit-deleting-<name>`` so a kill never leaves half of it
    under its own name; a folder that already carries that prefix (left by an interrupted deletion) is deleted where
    it is, never renamed again."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    check_deletable([path], what)
    kept = f"{path.name} may be partly deleted; rerun to finish"
    with os_errors(path, kept, action="delete"):
        if path.is_dir() and not path.is_symlink() and not path.name.startswith(DELETING_PREFIX):
            discard(path, path.with_name(f"{DELETING_PREFIX}{path.name}"))
        else:
            _remove(path)
