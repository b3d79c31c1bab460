"""File primitives of the output folder, from :mod:`hf_vit.durable` (the one home of durable writes): a file written
atomically, a folder's entries flushed to disk, and an entry deleted without ever leaving half of a folder under its
own name (and only when all of it can be deleted).

The names of their temporary entries start with ``.hf_vit`` (bookkeeping, never foreign: see
:mod:`hf_vit.run_dir.ownership`); :func:`hf_vit.run_dir.prepare_output_dir` removes those an interrupted run left.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import durable
from ..durable import DELETING_PREFIX, PARTIAL_PREFIX, fsync_dir

__all__ = ["DELETING_PREFIX", "PARTIAL_PREFIX", "atomic_write", "delete_entry", "fsync_dir"]


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` so that a kill leaves the old file or the new one, flushed to disk; returns path.
    A failed write (full disk, refused permission) is a one-line UserError and leaves the old file."""
    return durable.write_bytes(path, data)


def delete_entry(out: Path, name: str) -> None:
    """Delete the entry ``name`` of the folder ``out`` (see :func:`hf_vit.durable.delete`)."""
    durable.delete(out / name, what=f"hf_vit's own entry of output_dir {str(out)!r}")
