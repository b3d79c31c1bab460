"""The records of a study's runs: the few small files findings.md is computed from, committed next to it.

A run folder holds weights, checkpoints and logs; its record holds only :data:`RECORD_FILES` (predictions gzipped),
enough for ``python -m hf_vit.findings`` to regenerate findings.md and for anyone to re-check every number without
retraining.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

from hf_vit import durable
from hf_vit.errors import UserError
from hf_vit.run_dir import PREDICTION_FILES

from .document import STUDY_RECORD, read_study_record

RECORD_FILES = ("all_results.json", "log_history.json", "train_config.yaml", "config.json")


def export_records(study_dir: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Copy the study record and every finished run's :data:`RECORD_FILES` and predictions (gzipped, with a fixed
    timestamp so that the same predictions give the same bytes) from ``study_dir`` into ``dest/<run>/``; returns the
    runs exported. A run already in ``dest`` is replaced as a whole."""
    study_dir, dest = Path(study_dir), Path(dest)
    if study_dir.resolve() == dest.resolve():
        raise UserError(f"--export_records {dest}: that is the study folder itself; give another folder")
    record = read_study_record(study_dir)
    # A full disk or a refused folder: one line; every run already exported is whole (each is published as a folder).
    with durable.os_errors(dest, kept="the runs exported before it are whole"):
        return _export(study_dir, dest, record)


def _export(study_dir: Path, dest: Path, record: dict) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    exported = []
    for entry in record["runs"]:
        run = study_dir / entry["name"]
        if not (run / "all_results.json").is_file():
            continue
        partial = dest / f".{entry['name']}.tmp"
        durable.remove_partial(partial)
        partial.mkdir()
        for name in RECORD_FILES:
            if (run / name).is_file():
                shutil.copyfile(run / name, partial / name)
        for file_name in PREDICTION_FILES.values():
            source = run / file_name
            if source.is_file():
                with gzip.GzipFile(partial / (source.name + ".gz"), "wb", mtime=0) as out:
                    out.write(source.read_bytes())
        durable.publish_folder(partial, dest / entry["name"])
        exported.append(entry["name"])
    durable.write_text(dest / STUDY_RECORD, (study_dir / STUDY_RECORD).read_text(encoding="utf-8"))
    return exported
