"""Checkpoint integrity: a manifest of every file's size and SHA-256, written when a checkpoint is saved and checked
before a resume loads anything.

accelerate's ``load_state`` skips an unreadable ``random_states_<rank>.pkl`` with an INFO line, so a truncated or
replaced file would resume silently inexact. :func:`verify_manifest` finds a missing, truncated, altered (same size,
other bytes) or added file first, by its size and hash alone, without unpickling or deserialising anything.

The manifest lies beside the files it describes: it proves the files are the ones saved (against truncation, a
failing disk, a copy gone wrong, a file swapped by mistake or on purpose without rewriting the manifest), not who
saved them — anyone who can rewrite the checkpoint can rewrite its manifest too.

``python -m hf_vit.manifest verify CHECKPOINT`` checks a folder; ``python -m hf_vit.manifest write CHECKPOINT`` writes
the manifest of a checkpoint saved before manifests existed (when you trust its files).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

from . import durable
from .errors import UserError, raise_user_errors, run_cli

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 1 << 20  # streamed: a checkpoint's optimizer state can be larger than the memory to spare


def _files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder`` but the manifest, by relative POSIX path."""
    found = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            found[path.relative_to(folder).as_posix()] = path
    found.pop(MANIFEST, None)
    return dict(sorted(found.items()))


def _sha256(path: Path) -> tuple[int, str]:
    """(size, hex SHA-256) of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
    return size, digest.hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """Write ``folder/manifest.json`` (atomically): the relative path, size and SHA-256 of every other file under
    ``folder``. Returns its path. Call it after the last file of the checkpoint is written."""
    folder = Path(folder)
    files = {}
    for rel, path in _files(folder).items():
        size, sha = _sha256(path)
        files[rel] = {"size": size, "sha256": sha}
    return durable.write_text(folder / MANIFEST,
                              json.dumps({"format": FORMAT, "algorithm": "sha256", "files": files}, indent=1))


def _read(folder: Path) -> dict[str, dict]:
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"checkpoint {str(folder)!r} has no {MANIFEST}, so truncated or altered files cannot be "
                        "detected; resume from another checkpoint, or if you trust this one write its manifest with "
                        f"`python -m hf_vit.manifest write {folder}`")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest["format"] != FORMAT or not all(
                isinstance(e["size"], int) and isinstance(e["sha256"], str) for e in files.values()):
            raise ValueError("unexpected layout")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"checkpoint {str(folder)!r} has an unreadable {MANIFEST} ({err}); resume from another "
                        "checkpoint") from None
    return files


def verify_manifest(folder: str | os.PathLike) -> None:
    """Check every file of ``folder`` against its manifest; raise a one-line UserError naming the first file that is
    missing, truncated or resized, not listed, or altered (checked in that order: sizes before any hashing), and
    refuse a folder without a manifest. Returns None when all files match."""
    folder = Path(folder)
    expected = _read(folder)
    present = _files(folder)
    fix = "resume from another checkpoint"
    for rel, entry in sorted(expected.items()):
        if rel not in present:
            raise UserError(f"checkpoint {str(folder)!r} is missing {rel} (listed in its {MANIFEST}); {fix}")
        size = present[rel].stat().st_size
        if size != entry["size"]:
            what = "truncated" if size < entry["size"] else "altered"
            raise UserError(f"checkpoint {str(folder)!r}: {rel} is {what} ({size} bytes, {entry['size']} when saved); "
                            f"{fix}")
    extra = [rel for rel in present if rel not in expected]
    if extra:
        raise UserError(f"checkpoint {str(folder)!r} holds {extra[0]}, which its {MANIFEST} does not list (added "
                        f"after the save); remove it if it does not belong, or {fix}")
    for rel, entry in sorted(expected.items()):
        if _sha256(present[rel])[1] != entry["sha256"]:
            raise UserError(f"checkpoint {str(folder)!r}: {rel} was altered after the save (its SHA-256 differs "
                            f"from the {MANIFEST}'s); {fix}")


def main(argv: list[str] | None = None) -> None:
    parser = raise_user_errors(argparse.ArgumentParser(prog="python -m hf_vit.manifest",
                                                       description=__doc__.split("\n\n")[0]))
    parser.add_argument("action", choices=["verify", "write"])
    parser.add_argument("checkpoint", help="a checkpoint-<step> folder")
    args = parser.parse_args(argv)
    folder = Path(args.checkpoint)
    if not folder.is_dir():
        raise UserError(f"checkpoint {args.checkpoint!r} is not a folder; pass a checkpoint-<step> folder")
    if args.action == "verify":
        verify_manifest(folder)
        print(f"{folder}: all {len(_read(folder))} files match its {MANIFEST}")
    else:
        if (folder / MANIFEST).exists():
            raise UserError(f"checkpoint {str(folder)!r} already has a {MANIFEST}; check it with `python -m "
                            "hf_vit.manifest verify`, or delete it first if you trust the files as they are now")
        print(f"wrote {write_manifest(folder)}")


if __name__ == "__main__":
    run_cli(main)
