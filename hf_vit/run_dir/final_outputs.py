"""Final outputs committed all at once: :class:`FinalOutputs` stages the model, results, card and plots and commits
them into ``output_dir`` so that a kill at any moment leaves the previous set or the new one (its docstring says
exactly what is guaranteed); :func:`recover_final_outputs` finishes or discards a commit a kill interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from ..durable import failure_message, fsync_dir, fsync_tree, is_write_failure, os_errors, remove_partial
from ..errors import UserError
from .files import atomic_write
from .ownership import FINISHED, list_entries, owns, read_record, write_record

# The output folder's one logger, whichever of its modules logs: log filters (and tests) select it by this name.
logger = logging.getLogger("hf_vit.run_dir")

STAGING = ".hf_vit_final.staging"
COMMIT = ".hf_vit_final.commit.json"
_KEPT = "the previous final outputs (if any) are intact and the run's checkpoints are kept"


class FinalOutputs:
    """Stage the final outputs, then commit them into ``output_dir`` so that a kill leaves the old set or the new one.

    Usage (main process, holding the :class:`~hf_vit.run_dir.RunLock`)::

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
            remove_partial(self.staging)  # frees what a full disk let us write
            if isinstance(exc, Exception) and not isinstance(exc, UserError) and is_write_failure(exc):
                raise UserError(failure_message(exc, getattr(exc, "filename", None) or self.output_dir, _KEPT)) \
                    from None
            return
        with os_errors(self.output_dir, _KEPT):
            self.commit()

    def commit(self) -> None:
        out, staging = self.output_dir, self.staging
        new = list_entries(staging)
        record = read_record(out)
        try:
            for name in new:
                if not (staging / name).is_file() or (staging / name).is_symlink():
                    raise ValueError(f"final outputs are plain files; {staging / name} is not one")
            clash = [n for n in new if os.path.lexists(out / n) and not owns(record, n)]
            if clash:
                raise UserError(f"output_dir {str(out)!r} holds {clash[0]!r}, which hf_vit did not write; move it out "
                                "of the folder and rerun (the final outputs were not written)")
            fsync_tree(staging)
        except BaseException:
            remove_partial(staging)
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
    record = read_record(out)
    write_record(out, {"created": [*record["created"], *new], "final": new})
    if (staging / FINISHED).exists() or FINISHED in remove:
        (out / FINISHED).unlink(missing_ok=True)
    # Plain renames, not durable.write_*: the staged files were flushed before the marker (fsync_tree), and this
    # step is the set's commit, replayed from the marker after a kill — each rename must be repeatable as it is.
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
    remove_partial(staging)


def recover_final_outputs(output_dir: str | os.PathLike) -> bool:
    """Finish a commit of final outputs that a kill interrupted after its commit point, or discard a staging folder
    it left before it; returns True if there was anything to do (and logs a warning saying which). Call holding the
    :class:`~hf_vit.run_dir.RunLock`; :func:`~hf_vit.run_dir.prepare_output_dir` and :class:`FinalOutputs` call it."""
    out = Path(output_dir)
    if (out / COMMIT).exists():
        _roll_forward(out)
        logger.warning("output_dir %s: finished committing the final outputs of an interrupted run", out)
        return True
    if (out / STAGING).exists():
        staged = list_entries(out / STAGING)
        shutil.rmtree(out / STAGING)
        if not staged:  # a kill after a commit had moved everything in: only the empty folder was left
            return False
        logger.warning("output_dir %s: discarded final outputs an interrupted run had not committed; the previous "
                       "ones are intact", out)
        return True
    return False
