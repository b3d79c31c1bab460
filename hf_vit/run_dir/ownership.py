"""What hf_vit owns in ``output_dir``: the ownership record and the names a run writes.

``.hf_vit_run.json`` names every top-level entry hf_vit created there. A name is recorded *before* its entry is
created, so a kill can leave a recorded name without its entry but never an entry of ours without its name. Entries
derived from a recorded name (``checkpoint-6.tmp`` and ``checkpoint-6.deleting.tmp`` from ``checkpoint-6``) are ours
too. A folder is an hf_vit run if one of the recorded entries exists; a folder written before the record existed
(``train_config.yaml``, ``all_results.json`` or a complete ``checkpoint-<N>``, no record) is a run as well, and every
entry of it with a name hf_vit writes is taken as hf_vit's (recorded when a run opens it). Every other entry is
foreign: hf_vit never deletes or overwrites it.

Every name hf_vit keeps for its own bookkeeping starts with ``.hf_vit``; such entries are never foreign.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from ..errors import UserError
from .files import atomic_write

RECORD = ".hf_vit_run.json"
BOOKKEEPING_PREFIX = ".hf_vit"
FINISHED = "all_results.json"  # present in output_dir only beside a complete set of final outputs
TRACKER_DIR = "hf_vit"  # accelerate's tensorboard tracker logs into <project_dir>/<project name>
# The per-example predictions of each scored set (hf_vit.predictions), by set: the final eval, test_split and the
# train_eval_samples images.
PREDICTION_FILES = {"eval": "predictions_eval.csv", "test": "predictions_test.csv",
                    "train_eval": "predictions_train_eval.csv"}
# The one list of a run's final files: what hf_vit.outputs writes, FinalOutputs commits as a set, the ownership record
# names as "final", and hf_vit.hub publishes (with the weight shards of a model too large for one file).
FINAL_OUTPUTS = ("model.safetensors", "model.safetensors.index.json", "config.json", "preprocessor_config.json",
                 FINISHED, "eval_results.json", "log_history.json", "README.md", "learning_curve.png",
                 "confusion_matrix.png", *PREDICTION_FILES.values())
OUTPUT_NAMES = frozenset({*FINAL_OUTPUTS, "train_config.yaml", TRACKER_DIR})
_WEIGHT_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")  # save_pretrained's shards, named in the index
_OUTPUT_PATTERN = re.compile(r"checkpoint-\d+(\.tmp|\.deleting\.tmp)?|" + _WEIGHT_SHARD.pattern)
_CHECKPOINT = re.compile(r"checkpoint-\d+")
_DERIVED_SUFFIXES = (".deleting.tmp", ".tmp")


def is_output_name(name: str) -> bool:
    """True for a top-level name a run writes (final outputs, ``train_config.yaml``, ``checkpoint-<N>[.tmp]``)."""
    return name in OUTPUT_NAMES or bool(_OUTPUT_PATTERN.fullmatch(name))


def is_final_output(name: str) -> bool:
    """True for the name of one of a run's final files (:data:`FINAL_OUTPUTS`, or a weight shard)."""
    return name in FINAL_OUTPUTS or bool(_WEIGHT_SHARD.fullmatch(name))


def is_bookkeeping(name: str) -> bool:
    """True for a name hf_vit keeps for its own bookkeeping (``.hf_vit*``)."""
    return name.startswith(BOOKKEEPING_PREFIX)


def base_name(name: str) -> str:
    """The recorded name an entry derives from: ``checkpoint-6`` for ``checkpoint-6.tmp``."""
    for suffix in _DERIVED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_entries(out: Path) -> list[str]:
    """The sorted top-level names in the folder ``out`` (none if it is not a folder)."""
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def _is_legacy_run(out: Path) -> bool:
    """A run written before the ownership record existed."""
    return (any((out / m).exists() for m in ("train_config.yaml", FINISHED))
            or any(_CHECKPOINT.fullmatch(n) and (out / n / "trainer_state.json").is_file() for n in list_entries(out)))


def read_record(out: Path) -> dict:
    """The ownership record: ``created`` (names hf_vit made) and ``final`` (the committed final outputs). Without a
    record file, a legacy run's hf_vit-named entries are adopted; any other folder owns nothing yet."""
    try:
        text = (out / RECORD).read_text()
    except FileNotFoundError:
        if not _is_legacy_run(out):
            return {"created": [], "final": []}
        names = sorted({base_name(n) for n in list_entries(out) if is_output_name(n)})
        return {"created": names, "final": [n for n in names if is_final_output(n)]}
    try:
        record = json.loads(text)
        return {"created": [str(n) for n in record["created"]], "final": [str(n) for n in record["final"]]}
    except (ValueError, KeyError, TypeError):
        raise UserError(f"output_dir {str(out)!r} holds an unreadable ownership record {RECORD}; delete that file to "
                        "have the folder judged by its files") from None


def write_record(out: Path, record: dict) -> None:
    """Write the ownership record ``{created, final}`` atomically (nothing if it is unchanged)."""
    text = json.dumps({"created": sorted(set(record["created"])), "final": sorted(set(record["final"]))}, indent=1)
    with contextlib.suppress(FileNotFoundError):
        if (out / RECORD).read_text() == text:
            return
    atomic_write(out / RECORD, text)


def owns(record: dict, name: str) -> bool:
    """True if the ownership ``record`` makes the top-level entry ``name`` hf_vit's."""
    return is_bookkeeping(name) or name in record["created"] or base_name(name) in record["created"]


def owned_entries(out: Path, record: dict) -> list[str]:
    """The entries of output_dir that hf_vit created (recorded names and the ones derived from them)."""
    return [n for n in list_entries(out) if not is_bookkeeping(n) and owns(record, n)]


def created_by_hf_vit(output_dir: str | os.PathLike, name: str) -> bool:
    """True if the top-level entry ``name`` of ``output_dir`` was created by hf_vit (or is its bookkeeping).

    Checkpoint rotation and the cleanup of stale ``checkpoint-*.tmp`` folders must delete only entries for which
    this holds: a user's ``checkpoint-old.tmp`` is not one.
    """
    return owns(read_record(Path(output_dir)), name)


def record_created(output_dir: str | os.PathLike, *names: str) -> None:
    """Record that hf_vit is about to create the top-level entries ``names`` in ``output_dir`` (call it *before*
    creating them: ``checkpoint-<N>`` before writing ``checkpoint-<N>.tmp``, ``train_config.yaml``, the tracker
    folder). Written atomically; a no-op for names already recorded."""
    out = Path(output_dir)
    for name in names:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"record_created takes a top-level name in output_dir, got {name!r}")
    record = read_record(out)
    if not set(names) <= set(record["created"]) or not (out / RECORD).exists():
        write_record(out, {**record, "created": [*record["created"], *names]})
