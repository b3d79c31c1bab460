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
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

from . import durable
from .errors import UserError
from .manifest import verify_manifest, write_manifest
from .run_dir import created_by_hf_vit, record_created

logger = logging.getLogger("hf_vit")

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
    from .hub import download_checkpoint
    from .locations import is_local_path

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

    A failed write on any rank (a full disk, a refused permission, a read-only file system) removes the partial
    folder and raises the same one-line UserError on every rank; the previous complete checkpoints are untouched.
    """
    from safetensors.torch import save_file

    name = f"checkpoint-{trainer_state['global_step']}"
    tmp = Path(output_dir) / f"{name}.tmp"
    kept = (f"the partial {name} was removed and the last complete checkpoint is intact (resume with "
            "--resume_from_checkpoint latest)")
    final, failure = None, None
    try:
        with durable.os_errors(tmp, kept):
            if accelerator.is_main_process:
                record_created(output_dir, name)  # before it exists: a kill can never leave an unowned checkpoint
                if tmp.exists():
                    shutil.rmtree(tmp)  # raises: a leftover that cannot go must fail the save (os_errors says why)
    except UserError as err:
        failure = str(err)
    _agree(accelerator, failure, tmp)
    try:
        with durable.os_errors(tmp, kept):
            accelerator.save_state(str(tmp), safe_serialization=True)
    except UserError as err:
        failure = str(err)
    # Every rank writes its own RNG state (and, under FSDP, its shard) into tmp: finalise only once all are done.
    _agree(accelerator, failure, tmp)
    if accelerator.is_main_process:
        try:
            with durable.os_errors(tmp, kept):
                accelerator.unwrap_model(model).config.save_pretrained(tmp)
                processor.save_pretrained(tmp)
                if ema is not None:
                    save_file({k: v.contiguous() for k, v in ema.module.state_dict().items()},
                              str(tmp / "ema.safetensors"))
                final = finalize(tmp, {**trainer_state,
                                       "n_averaged": int(ema.n_averaged) if ema is not None else 0})
        except UserError as err:
            failure = str(err)
    _agree(accelerator, failure, tmp)
    return final


def _agree(accelerator, failure: str | None, tmp: Path) -> None:
    """Meet the other ranks; if a save failed on any of them, remove the partial folder (to give back the space it
    took) and raise the first failure on every rank, so that none waits for a save that will not come."""
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        failures = [f for f in gather_object([failure]) if f]
        failure = failures[0] if failures else None
    else:
        accelerator.wait_for_everyone()
    if failure is not None:
        if accelerator.is_main_process:
            durable.remove_partial(tmp)
        raise UserError(failure)


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


def finalize(tmp_dir: Path, state: dict) -> Path:
    """Write the trainer state and the manifest last, flush every file to disk, then atomically rename
    ``checkpoint-N.tmp`` to ``checkpoint-N`` (:func:`hf_vit.durable.publish_folder`)."""
    durable.write_json(tmp_dir / STATE_FILE, state, indent=None)
    write_manifest(tmp_dir)
    return durable.publish_folder(tmp_dir, tmp_dir.with_suffix(""), doomed_suffix=".deleting.tmp")


def rotate(output_dir: str, limit: int | None) -> None:
    """Delete the oldest complete checkpoints beyond ``limit`` (only ever after a new one is complete), and stale
    ``.tmp`` folders left by a kill during a save. A folder that cannot be deleted is left, with a warning: the
    run goes on (its new checkpoint is complete)."""
    for stale in Path(output_dir).glob("checkpoint-*.tmp"):
        if created_by_hf_vit(output_dir, stale.name):
            durable.remove_partial(stale)
    if limit is None or limit <= 0:
        return
    ours = [c for c in complete_checkpoints(output_dir) if created_by_hf_vit(output_dir, c.name)]
    for old in ours[:-limit]:
        if durable.undeletable(old):
            logger.warning("cannot delete the old checkpoint %s (its folder is not writable); keeping it", old)
            continue
        try:
            durable.discard(old, old.with_name(f"{old.name}.deleting.tmp"))
        except OSError as err:
            logger.warning("could not delete the old checkpoint %s (%s); the next save retries", old, err)


# ------------------------------------------------------------------------------------------------ run identity
# The resolved settings that decide which examples a run sees, in which order, split how, through which model and
# schedule. A resume whose identity differs in any of them is another run (docs/reliability.md, "Resume identity").
IDENTITY_SETTINGS = (
    "seed", "dataset_config_name", "dataset_revision", "train_split", "eval_split", "train_val_split", "split_seed",
    "train_fraction", "subset_seed", "max_train_samples", "train_samples", "streaming", "shuffle_buffer_size",
    "stream_sharding", "total_train_batch_size", "model_preset", "model_name_or_path", "num_train_epochs",
    "max_train_steps", "learning_rate", "warmup_epochs", "warmup_start_lr", "min_lr", "head_lr_multiplier",
    "layer_decay",
)
# The model's architecture, from its resolved config (a preset's values, or the checkpoint's it started from).
IDENTITY_MODEL_FIELDS = ("model_type", "num_labels", "image_size", "patch_size", "hidden_size", "num_hidden_layers",
                         "num_attention_heads", "intermediate_size", "hidden_sizes", "depths")
IDENTITY_KEYS = (*IDENTITY_SETTINGS, "model", "dataset")
_FINGERPRINT_SAMPLES = 32


def dataset_fingerprint(data) -> str:
    """A cheap fingerprint of the dataset a run reads, before its own carving (``data``: a
    :class:`hf_vit.data.sources.DataSplits`, whose ``source`` says whether it is a local folder): the class names
    and the size of the train split, plus, for a map-style split, the keys of 32 examples evenly spread over the
    whole split (keys are paths or hashes of the bytes: a moved copy of the same data keeps its fingerprint, another
    dataset of the same size gets another), and for a stream the names and sizes of its local data files.
    Independent of the seed, the validation carve-out and the subset, which the identity records on their own;
    nothing is decoded."""
    import hashlib

    from .data.keys import example_key

    digest = hashlib.sha256(json.dumps([list(data.label_names), data.info.get("num_examples_in_split")]).encode())
    table = getattr(data.train, "data", None)  # a map-style split's whole Arrow table (filters only add indices)
    if table is not None and data.image_column in getattr(table, "column_names", []):
        column = table.column(data.image_column)
        n = len(column)
        for i in sorted({i * n // _FINGERPRINT_SAMPLES for i in range(_FINGERPRINT_SAMPLES)}) if n else []:
            image = column[i].as_py()
            digest.update(example_key(image if isinstance(image, dict) else None).encode() + b"\n")
    elif data.source is not None:
        for name, size in _data_files(data.source.local_folder):
            digest.update(f"{name}:{size}\n".encode())
    return digest.hexdigest()[:32]


def _data_files(root: str | None, limit: int = 100_000) -> list[tuple[str, int]]:
    """(name relative to the dataset folder ``root``, size) of a local dataset's files (at most ``limit``); none for
    a Hub id (``root`` None or no folder: its name and split sizes stand for it)."""
    if root is None or not os.path.isdir(root):
        return []
    found = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in sorted(names):
            path = os.path.join(folder, name)
            found.append((os.path.relpath(path, root), os.path.getsize(path)))
            if len(found) >= limit:
                return found
    return found


def run_identity(config: dict, model_config, data) -> dict:
    """The identity a checkpoint records: ``config`` (the run's flat settings, :meth:`RunConfig.to_dict`) restricted
    to :data:`IDENTITY_SETTINGS`, the model's architecture (``model_config``: its transformers config) and the
    dataset (``data``: its name, shown in messages, and :func:`dataset_fingerprint`, compared)."""
    model = {k: getattr(model_config, k) for k in IDENTITY_MODEL_FIELDS if getattr(model_config, k, None) is not None}
    return {**{k: config.get(k) for k in IDENTITY_SETTINGS},
            "model": json.loads(json.dumps(model, default=str)),
            "dataset": {"name": config.get("dataset_name"), "fingerprint": dataset_fingerprint(data)}}


def parse_accepted_changes(value: str | None) -> list[str]:
    """The keys named by ``--resume_accept_changes`` (comma-separated); an unknown key is a one-line error."""
    keys = [k.strip() for k in (value or "").split(",") if k.strip()]
    unknown = [k for k in keys if k not in IDENTITY_KEYS]
    if unknown:
        raise UserError(f"resume_accept_changes names {unknown}, which are not part of a run's identity; choose from "
                        f"{list(IDENTITY_KEYS)}")
    return keys


def identity_differences(saved: dict, current: dict) -> dict[str, tuple]:
    """``{key: (saved value, current value)}`` for every identity key recorded in both that differs (the dataset by
    its fingerprint)."""
    differ = {}
    for key in IDENTITY_KEYS:
        if key not in saved or key not in current:
            continue  # a checkpoint from before this key was recorded
        a, b = saved[key], current[key]
        if key == "dataset":
            if (a or {}).get("fingerprint") != (b or {}).get("fingerprint"):
                differ[key] = ((a or {}).get("name"), (b or {}).get("name"))
        elif a != b and not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)):
            differ[key] = (a, b)
    return differ


def check_identity(path: str, saved: dict | None, current: dict, accepted: list[str]) -> dict[str, tuple]:
    """Refuse, in one line naming what differs, a resume from checkpoint ``path`` (its recorded identity ``saved``)
    into a run whose identity ``current`` differs in a key not in ``accepted``. Returns the accepted differences
    (for the run to record). A checkpoint saved before identities were recorded is accepted with a warning."""
    if not saved:
        logger.warning("checkpoint %s records no run identity (saved by an older hf_vit); resuming without checking "
                       "that the seed, data and schedule are the same", path)
        return {}
    differ = identity_differences(saved, current)
    refused = {k: v for k, v in differ.items() if k not in accepted}
    if refused:
        def show(key, pair):
            if key == "dataset":
                return f"dataset (other examples: checkpoint {pair[0]!r}, this run {pair[1]!r})"
            return f"{key} (checkpoint {pair[0]!r}, this run {pair[1]!r})"

        listed = "; ".join(show(k, v) for k, v in refused.items())
        raise UserError(f"checkpoint {path!r} belongs to another run: {listed}; resume with the settings it was "
                        "written with, or pass --resume_accept_changes "
                        f"{','.join(refused)} to continue it deliberately with the new ones")
    return differ


def check_not_replacing_a_finished_run(resume_path: str, output_dir: str, overwrite: bool) -> None:
    """Refuse a resume from a checkpoint outside ``output_dir`` when ``output_dir`` holds a finished run (its
    ``all_results.json``): the resumed run would replace that run's model and results. ``--overwrite_output_dir``
    allows it."""
    out = Path(output_dir).resolve()
    inside = out in Path(resume_path).resolve().parents
    if not inside and not overwrite and (out / "all_results.json").is_file():
        raise UserError(f"output_dir {output_dir!r} holds a finished run, and resuming from {resume_path!r} (a "
                        "checkpoint of another folder) would replace its model and results; choose another "
                        "output_dir, or pass --overwrite_output_dir")
