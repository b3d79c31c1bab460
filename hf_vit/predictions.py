"""Per-example predictions of a scored set: the rows a finished run writes (``predictions_eval.csv``,
``predictions_test.csv``, ``predictions_train_eval.csv``), and the fingerprint that says two runs scored the same
examples, so that their predictions can be compared example by example (a paired test).

A row is ``(index, key, label, prediction)``: the example's position in the split as loaded, its
:func:`hf_vit.data.keys.example_key`, its label and the top-1 predicted class. An example the collate skipped as
unusable has no row.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os

from . import durable
from .errors import UserError

HEADER = ("index", "key", "label", "prediction")

Row = tuple[int, str, int, int]


def lines_fingerprint(lines) -> str:
    """SHA-256 (hex) of ``lines`` (each ending in a newline) in the order given: the one rule behind every fingerprint
    of a set of examples (a scored set's, a study's pinned source and derived datasets)."""
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode())
    return digest.hexdigest()


def scored_set_fingerprint(rows: list[Row]) -> str:
    """SHA-256 (hex) of the sorted lines ``f"{key}\\t{label}\\n"`` of ``rows``: the same for two scorings of the same
    examples, whatever their order or the processes that scored them, and whatever the model predicted."""
    return lines_fingerprint(sorted(f"{key}\t{label}\n" for _, key, label, _ in rows))


def write_predictions(path: str | os.PathLike, rows: list[Row]) -> None:
    """Write ``rows`` as CSV (header ``index,key,label,prediction``, one line per row, in the given order) through
    :mod:`hf_vit.durable`."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")  # quotes a key only when it holds a comma or a quote
    writer.writerow(HEADER)
    writer.writerows((int(i), key, int(label), int(prediction)) for i, key, label, prediction in rows)
    durable.write_text(path, text.getvalue())


def read_predictions(path: str | os.PathLike) -> list[Row]:
    """The rows of a file :func:`write_predictions` wrote, as ``(index, key, label, prediction)`` tuples; a
    ``.gz`` file (a study's committed record, :func:`hf_vit.findings.export_records`) is read through gzip. A file
    that cannot be read or is not one (another header, a short or non-integer row, bad gzip) is a one-line
    UserError naming it."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if tuple(header or ()) != HEADER:
                raise UserError(f"{path}: not a predictions file (header {header}, expected {','.join(HEADER)})")
            return [(int(i), key, int(label), int(prediction)) for i, key, label, prediction in reader]
    except (OSError, EOFError, UnicodeDecodeError, ValueError, csv.Error) as err:  # BadGzipFile is an OSError
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: not a readable predictions file ({detail})") from None
