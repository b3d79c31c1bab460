"""Checkpoints that cannot be half-written: save into ``checkpoint-<step>.tmp``, rename into place when complete.

A checkpoint folder holds accelerate's ``save_state`` output (model.safetensors, optimizer.bin, scaler.pt under fp16,
one random_states_<rank>.pkl per process), ``ema.safetensors`` when an EMA is kept, the model ``config.json`` and image
processor (so a pushed checkpoint loads on its own), and ``trainer_state.json`` (step, epoch, position in the epoch,
counters, log history), then ``manifest.json`` (every file's size and SHA-256: a resume verifies it before loading
anything, so a truncated, altered or missing file is refused). The state and manifest are written last and every file
is flushed to disk before the rename, and the rename is atomic, so a ``checkpoint-<step>`` folder is always complete —
after a SIGKILL, and after a power loss.

Whatever must disappear (an old checkpoint beyond ``checkpoints_total_limit``, an earlier checkpoint of the same step)
is first renamed to a ``.tmp`` name and only then deleted, so a kill during a deletion never leaves a half-deleted
folder under a checkpoint name. Stale ``.tmp`` folders are removed at the next save. Only checkpoints hf_vit created
in the folder are ever rotated or cleaned up (:mod:`hf_vit.run_dir` keeps the record).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

from .errors import UserError
from .manifest import verify_manifest, write_manifest
from .run_dir import created_by_hf_vit, record_created

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
            newest = complete_checkpoints(resume)
            hint = f" (it holds {newest[-1].name}: pass that folder)" if newest else ""
            raise UserError(
                f"resume_from_checkpoint {resume!r} holds no checkpoint (no {STATE_FILE}){hint}; "
                "pass a checkpoint-<step> folder or 'latest'"
            )
        return resume
    from .hub import download_checkpoint, is_local_path

    if resume.count("/") == 1 and not is_local_path(resume):  # user/repo: a checkpoint pushed to the Hub
        return download_checkpoint(resume, token=token)
    raise UserError(f"resume_from_checkpoint {resume!r} does not exist; pass a checkpoint folder, 'latest' or a Hub id")


def missing_files(path: str, num_processes: int, with_ema: bool, with_scaler: bool) -> list[str]:
    """Files a resume needs that ``path`` lacks. accelerate's ``load_state`` skips unreadable RNG states with only an
    INFO log line, which would make a resume silently inexact, so their presence is checked here."""
    needed = ["model.safetensors", "optimizer.bin", *(f"random_states_{i}.pkl" for i in range(num_processes))]
    if with_ema:
        needed.append("ema.safetensors")
    if with_scaler:
        needed.append("scaler.pt")
    return [name for name in needed if not os.path.isfile(os.path.join(path, name))]


def read_state(path: str) -> dict:
    """The loop state saved in ``path/trainer_state.json``; an unreadable or malformed file is a one-line error."""
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"checkpoint {path!r} has an unreadable {STATE_FILE} ({str(err).splitlines()[0]}); resume "
                        "from another checkpoint") from None
    counters = ("global_step", "epoch", "step_in_epoch", "samples_seen", "bad_samples")
    bad = [k for k in counters if not isinstance(state.get(k), int) or isinstance(state.get(k), bool)
           or state[k] < 0] if isinstance(state, dict) else ["all"]
    if bad:
        raise UserError(f"checkpoint {path!r} has a malformed {STATE_FILE} (fields {bad} are not counts); resume "
                        "from another checkpoint")
    return state


def save(accelerator, output_dir: str, trainer_state: dict, model, processor, ema=None) -> Path | None:
    """Save the whole training state as ``output_dir/checkpoint-<global_step>``, atomically (every rank takes part).

    accelerate's ``save_state`` writes the model, optimizer, scaler and each rank's RNG states; the main process adds
    the model config and image processor (so the folder loads on its own), the EMA weights and the loop state, then
    :func:`finalize` renames the folder into place. Returns the folder on the main process, else None.
    """
    from safetensors.torch import save_file

    name = f"checkpoint-{trainer_state['global_step']}"
    tmp = Path(output_dir) / f"{name}.tmp"
    if accelerator.is_main_process:
        record_created(output_dir, name)  # before it exists: a kill can never leave an unowned checkpoint
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    # Every rank writes its own RNG state (and, under FSDP, its shard) into tmp: finalise only once all are done.
    accelerator.wait_for_everyone()
    final = None
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.module.state_dict().items()}, str(tmp / "ema.safetensors"))
        final = finalize(tmp, {**trainer_state, "n_averaged": int(ema.n_averaged) if ema is not None else 0})
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: str, layout: dict, ema=None) -> dict:
    """Restore model, optimizer, scaler, RNG states and EMA from checkpoint ``path``; return its loop state.

    Refused with a one-line error: another process count, another data layout mid-epoch (the position would mean
    other examples), a missing file, or tensors that do not fit the model and optimizer being built.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    verify_manifest(path)  # sizes and hashes first: nothing is unpickled or deserialised from a damaged folder
    saved = read_state(path)
    saved_layout = saved.get("layout", {})
    if saved_layout.get("num_processes") != accelerator.num_processes:
        raise UserError(
            f"checkpoint {path!r} was written by {saved_layout.get('num_processes')} processes, this run has "
            f"{accelerator.num_processes}; resume with the same --num_processes (the data position and per-process "
            "RNG states are per process)"
        )
    if saved["step_in_epoch"] and saved_layout != layout:
        raise UserError(
            f"checkpoint {path!r} is mid-epoch with data layout {saved_layout}, this run has {layout}; "
            "resume with the same dataloader_num_workers and batch sizes"
        )
    n_averaged = saved.pop("n_averaged", 0)
    missing = missing_files(path, accelerator.num_processes, with_ema=ema is not None and n_averaged > 0,
                            with_scaler=accelerator.scaler is not None)
    if missing:
        raise UserError(f"checkpoint {path!r} is incomplete (missing {missing}); resume from another checkpoint")
    try:
        # Loads model.safetensors, and optimizer.bin / random_states_<rank>.pkl / scaler.pt with weights_only=True.
        accelerator.load_state(path)
    except (RuntimeError, ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        raise UserError(f"checkpoint {path!r} does not fit this run ({str(err).splitlines()[0][:300]}); resume "
                        "with the model and optimizer settings it was written with") from None
    if ema is not None and os.path.isfile(os.path.join(path, "ema.safetensors")):
        ema.module.load_state_dict(load_file(os.path.join(path, "ema.safetensors"), device=str(accelerator.device)))
        ema.n_averaged.fill_(n_averaged)
    return saved


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(folder: Path) -> None:
    """Rename ``folder`` out of the checkpoint namespace (atomic), then delete it."""
    doomed = folder.with_name(f"{folder.name}.deleting.tmp")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def finalize(tmp_dir: Path, state: dict) -> Path:
    """Write the trainer state and the manifest last, flush every file to disk, then atomically rename
    ``checkpoint-N.tmp`` to ``checkpoint-N``."""
    with open(tmp_dir / STATE_FILE, "w") as f:
        json.dump(state, f)
    write_manifest(tmp_dir)
    # Without the flush a power loss after the rename can leave a complete-looking folder of empty files.
    for file in tmp_dir.rglob("*"):
        if file.is_file():
            _fsync(file)
    _fsync(tmp_dir)
    final = tmp_dir.with_suffix("")
    if final.exists():  # a checkpoint of the same step from an earlier, interrupted attempt
        _discard(final)
    os.replace(tmp_dir, final)
    _fsync(final.parent)
    return final


def rotate(output_dir: str, limit: int | None) -> None:
    """Delete the oldest complete checkpoints beyond ``limit`` (only ever after a new one is complete), and stale
    ``.tmp`` folders left by a kill during a save."""
    for stale in Path(output_dir).glob("checkpoint-*.tmp"):
        if created_by_hf_vit(output_dir, stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    if limit is None or limit <= 0:
        return
    ours = [c for c in complete_checkpoints(output_dir) if created_by_hf_vit(output_dir, c.name)]
    for old in ours[:-limit]:
        _discard(old)
