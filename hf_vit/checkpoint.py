"""Checkpoints that cannot be half-written: save into ``checkpoint-<step>.tmp``, rename into place when complete.

A checkpoint folder holds accelerate's ``save_state`` output (model.safetensors, optimizer, grad scaler, per-process
RNG states), ``ema.safetensors`` when an EMA is kept, the model ``config.json`` and image processor (so a pushed
checkpoint loads on its own), and ``trainer_state.json`` (step, epoch, position in the epoch, counters, log history).
``trainer_state.json`` is written last, and the rename is atomic, so a folder without ``.tmp`` is always complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .errors import UserError

STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def resolve_resume_path(resume: str, output_dir: str, token: str | None = None) -> str | None:
    """``latest`` -> newest complete checkpoint in output_dir (None if there is none yet: start fresh);
    a folder -> itself if it holds a checkpoint; ``user/repo`` on the Hub -> its downloaded ``last-checkpoint``."""
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        return str(found[-1]) if found else None
    if os.path.isdir(resume):
        if not os.path.isfile(os.path.join(resume, STATE_FILE)):
            raise UserError(
                f"resume_from_checkpoint {resume!r} holds no checkpoint (no {STATE_FILE}); "
                "pass a checkpoint-<step> folder or 'latest'"
            )
        return resume
    if resume.count("/") == 1 and not resume.startswith((".", "/")):
        from .hub import download_checkpoint

        return download_checkpoint(resume, token=token)
    raise UserError(f"resume_from_checkpoint {resume!r} does not exist; pass a checkpoint folder, 'latest' or a Hub id")


def read_state(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def finalize(tmp_dir: Path, state: dict) -> Path:
    """Write the trainer state last, then atomically rename ``checkpoint-N.tmp`` -> ``checkpoint-N``."""
    with open(tmp_dir / STATE_FILE, "w") as f:
        json.dump(state, f)
    final = tmp_dir.with_suffix("")
    if final.exists():  # a checkpoint of the same step from an earlier, interrupted attempt
        shutil.rmtree(final)
    os.replace(tmp_dir, final)
    return final


def rotate(output_dir: str, limit: int | None) -> None:
    """Delete the oldest complete checkpoints beyond ``limit`` (only ever after a new one is complete), and stale
    ``.tmp`` folders left by a kill during a save."""
    for stale in Path(output_dir).glob("checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if limit is None or limit <= 0:
        return
    for old in complete_checkpoints(output_dir)[:-limit]:
        shutil.rmtree(old, ignore_errors=True)
