"""File primitives that a kill cannot leave half done: a file written atomically, a folder's entries flushed to
disk, and an entry deleted without ever leaving half of a folder under its own name.

The names of their temporary entries start with ``.hf_vit`` (bookkeeping, never foreign: see
:mod:`hf_vit.run_dir.ownership`); :func:`hf_vit.run_dir.prepare_output_dir` removes those an interrupted run left.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

PARTIAL_PREFIX = ".hf_vit-partial-"  # an atomic write in progress
DELETING_PREFIX = ".hf_vit-deleting-"  # a folder being deleted


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
    tmp = path.with_name(f"{PARTIAL_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
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


def delete_entry(out: Path, name: str) -> None:
    """Delete the entry ``name`` of the folder ``out``; a folder is first renamed to a bookkeeping name, so a kill
    never leaves half of it under its own name."""
    path = out / name
    if path.is_dir() and not path.is_symlink():
        doomed = out / f"{DELETING_PREFIX}{name}"
        if doomed.exists():
            shutil.rmtree(doomed)
        os.replace(path, doomed)
        shutil.rmtree(doomed)
    elif os.path.lexists(path):
        path.unlink()
