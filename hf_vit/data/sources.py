"""Datasets and splits: open a Hub or local image-classification dataset, find its columns, carve the validation
split and the ``train_fraction`` subset by example key, and settle the number of training examples per epoch.

A row whose image is missing (None) has the key :data:`~hf_vit.data.keys.MISSING_IMAGE_KEY`: it is never carved into
validation and always kept by the subset, so it stays in train, where the collate skips and counts it (the README's
"skipped and counted", on every path).

Membership is decided by keys, not positions: the ``train_val_split`` carve-out and the ``train_fraction`` subset hash
each example's key (:func:`~hf_vit.data.keys.example_key`) with a seed, so the same examples are chosen in map-style
and streaming mode, with any number of processes or workers, on any machine. Images are left undecoded here (the
loader workers or the device decode them).

The LR schedule needs the examples per epoch: the split's length (map-style), else ``train_samples``, else an exact
count over the example keys of a local dataset (no decoding), else the Hub metadata (an estimate when
``train_val_split``/``train_fraction`` filter the stream).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

import datasets

from ..config import ArgumentParser, DataArguments, check_fields
from ..errors import UserError, raise_user_errors
from ..locations import local_path
from .keys import example_key, in_subset, in_validation

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels", "fine_label")


@dataclass(frozen=True)
class DataSource:
    """Which examples the data stage reads: the dataset, classified once as a local folder or a Hub id (``name`` as
    the user gave it; ``local_path``: the folder, ``~`` expanded, or None for a Hub id), its configuration and Hub
    revision, the splits and columns, the validation carve-out (``train_val_split`` of ``train_split`` when
    ``eval_split`` is unset, by ``split_seed``), the ``train_fraction`` subset, the epoch length of a stream, and the caps.

    Built from a run's :class:`DataArguments` by :meth:`from_args`, or by :meth:`named` where a command reads data
    that is not a run's (the eval command's split, a study's derived dataset). The field names are the settings'
    (``hf_vit.config.groups``), where their meanings are documented.
    """

    name: str
    local_path: str | None
    config_name: str | None = None
    revision: str | None = None
    train_split: str = "train"
    eval_split: str | None = None
    test_split: str | None = None
    train_val_split: float = 0.0
    split_seed: int = 0
    image_column_name: str | None = None
    label_column_name: str | None = None
    streaming: bool = False
    train_fraction: float = 1.0
    subset_seed: int = 0
    train_samples: int | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    stream_sharding: Literal["exact", "shards"] = "shards"

    @classmethod
    def named(cls, name: str, **fields) -> DataSource:
        """The dataset ``name`` (a Hub id or a local path, classified here), with ``fields`` as above."""
        return cls(name, local_path(name), **fields)

    @classmethod
    def from_args(cls, args: DataArguments) -> DataSource:
        """The source a run's data arguments describe."""
        return cls.named(args.dataset_name, config_name=args.dataset_config_name, revision=args.dataset_revision,
                         train_split=args.train_split, eval_split=args.eval_split, test_split=args.test_split,
                         train_val_split=args.train_val_split, split_seed=args.split_seed,
                         image_column_name=args.image_column_name, label_column_name=args.label_column_name,
                         streaming=args.streaming, train_fraction=args.train_fraction, subset_seed=args.subset_seed,
                         train_samples=args.train_samples, max_train_samples=args.max_train_samples,
                         max_eval_samples=args.max_eval_samples, stream_sharding=args.stream_sharding)

    @property
    def local_folder(self) -> str | None:
        """The local folder the dataset is, if it is one that exists."""
        return self.local_path if self.local_path is not None and os.path.isdir(self.local_path) else None


def as_source(data: DataSource | DataArguments) -> DataSource:
    """``data`` as a :class:`DataSource`; a run's :class:`DataArguments` is described by
    :meth:`DataSource.from_args`."""
    return data if isinstance(data, DataSource) else DataSource.from_args(data)


@dataclass
class DataSplits:
    """What the loop needs from the data stage."""

    train: datasets.Dataset | datasets.IterableDataset
    eval: datasets.Dataset | datasets.IterableDataset | None
    label_names: list[str]
    image_column: str
    label_column: str
    num_train_examples: int  # examples per epoch, for the LR schedule
    num_train_examples_source: str  # where that number came from (logged)
    num_eval_examples: int | None = None
    info: dict = field(default_factory=dict)
    source: DataSource | None = None  # what was read (the later stages' one answer to "is it a local folder?")
    test: datasets.Dataset | datasets.IterableDataset | None = None  # test_split, scored once after training


def open_dataset(data: DataSource | DataArguments) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Every split of the dataset (a Hub id, a local Hub-style folder, or a ``save_to_disk`` folder), streamed
    when ``streaming``; a path that does not exist or a dataset that cannot load is a one-line error."""
    args = as_source(data)
    name = args.local_path or args.name
    if args.local_path is not None and not os.path.exists(name):
        raise UserError(f"dataset path {args.name!r} does not exist; pass an existing folder or a Hub id")
    try:
        if args.local_folder and os.path.isfile(os.path.join(name, "dataset_dict.json")):
            loaded = datasets.load_from_disk(name)  # written by save_to_disk
            if args.streaming:
                loaded = datasets.IterableDatasetDict(
                    {k: v.to_iterable_dataset(num_shards=max(1, min(64, len(v) // 1000))) for k, v in loaded.items()})
            return loaded
        # A local folder has no revisions: the flag pins Hub data only.
        revision = None if args.local_path is not None else args.revision
        return datasets.load_dataset(name, args.config_name, streaming=args.streaming, revision=revision)
    except (FileNotFoundError, ConnectionError, OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        # DatasetsError: a folder whose files are no dataset (a run's checkpoint: JSON and pickles) fails to build.
        where = "local folder" if os.path.exists(name) else "Hub (unreachable offline: pass a local path instead)"
        raise UserError(
            f"cannot load dataset {args.name!r} from the {where}: {str(err).splitlines()[0]}") from None


def find_column(columns: list[str], requested: str | None, candidates: tuple[str, ...], what: str) -> str:
    """The requested column, or the single known name present; errors list the columns that exist."""
    if requested:
        if requested not in columns:
            raise UserError(f"{what} column {requested!r} not found; the dataset has columns {columns}: pass one of "
                            f"them as --{what}_column_name")
        return requested
    found = [c for c in candidates if c in columns]
    if not found:
        raise UserError(
            f"no {what} column found (looked for {list(candidates)}); the dataset has columns {columns}: "
            f"pass --{what}_column_name"
        )
    if len(found) > 1:
        raise UserError(f"ambiguous {what} column: {found} all exist (columns {columns}); pass --{what}_column_name")
    return found[0]


def local_data_files(data: DataSource | DataArguments, split: str) -> list[str]:
    """The data files of ``split`` of a local Hub-style folder; [] for a Hub id or a ``save_to_disk`` folder."""
    args = as_source(data)
    name = args.local_folder
    if name is None or os.path.isfile(os.path.join(name, "dataset_dict.json")):
        return []
    try:
        builder = datasets.load_dataset_builder(name, args.config_name)
        return [str(f) for f in (builder.config.data_files or {}).get(split, [])]
    except Exception:  # noqa: BLE001 - only an optimisation; callers fall back to a pass over the data
        return []


def count_rows(args: DataSource, split: str, ds) -> tuple[int | None, str]:
    """Examples in a split: its length, else the dataset metadata, else the parquet footers of local files."""
    if isinstance(ds, datasets.Dataset):
        return len(ds), "dataset length"
    info = ds.info.splits.get(split) if ds.info and ds.info.splits else None
    if info is not None and info.num_examples:
        return info.num_examples, "dataset metadata"
    files = local_data_files(args, split)
    if files and all(f.endswith(".parquet") for f in files):
        return sum(parquet_rows(f) for f in files), "parquet metadata"
    return None, "unknown"


def parquet_rows(path: str) -> int:
    """The row count in a parquet file's footer; a file that is not readable parquet is a one-line error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"dataset file {path!r} is not readable parquet ({str(err).splitlines()[0]}); replace or "
                        "remove it") from None


def split_examples(args: DataSource, split: str, ds, image_col: str, label_col: str):
    """Yield ``(key, label)`` for every example of a split without decoding an image.

    Reads only the path and label columns where it can — a map-style split's Arrow table, or local parquet files —
    and the bytes only of rows without a path; otherwise it makes one pass over the (undecoded) image column.
    """
    def from_table(paths, labels, read_bytes):
        paths, labels, raw = paths.to_pylist(), labels.to_pylist(), None
        for i, p in enumerate(paths):
            if not p and raw is None:
                raw = read_bytes()
            yield example_key({"path": p, "bytes": None if p else raw[i].as_py()}), labels[i]

    def struct_field(column, name):
        # pyarrow returns a projected nested column either as the struct or as the child itself
        column = column.combine_chunks()
        return column.field(name) if hasattr(column, "field") else column

    if isinstance(ds, datasets.Dataset) and ds._indices is None:
        column = ds.data.column(image_col)
        yield from from_table(struct_field(column, "path"), ds.data.column(label_col),
                              lambda: struct_field(column, "bytes"))
        return
    files = local_data_files(args, split)
    if files and all(f.endswith(".parquet") for f in files):
        import pyarrow.parquet as pq

        for f in files:
            table = pq.read_table(f, columns=[f"{image_col}.path", label_col])
            yield from from_table(struct_field(table.column(0), "path"), table.column(1),
                                  lambda: struct_field(pq.read_table(f, columns=[f"{image_col}.bytes"]).column(0),
                                                       "bytes"))
        return
    for batch in ds.select_columns([image_col, label_col]).iter(batch_size=1000):
        for image, label in zip(batch[image_col], batch[label_col]):
            yield example_key(image), label


def open_train(args: DataSource, loaded=None):
    """Load the dataset (unless ``loaded`` already holds it) and find the train split's image and label columns
    (errors list what exists)."""
    loaded = open_dataset(args) if loaded is None else loaded
    splits = list(loaded.keys())
    if args.train_split not in loaded:
        raise UserError(f"split {args.train_split!r} not found; the dataset has splits {splits} (set --train_split)")
    for flag in ("eval_split", "test_split"):
        if getattr(args, flag) and getattr(args, flag) not in loaded:
            raise UserError(f"split {getattr(args, flag)!r} not found; the dataset has splits {splits} (set --{flag})")
    raw_train = loaded[args.train_split]
    if raw_train.features is None and isinstance(raw_train, datasets.IterableDataset):
        raw_train = raw_train._resolve_features()  # some streamed datasets only know their columns after a peek
    columns = list(raw_train.features.keys()) if raw_train.features else list(raw_train.column_names or [])
    image_col = find_column(columns, args.image_column_name, IMAGE_COLUMNS, "image")
    label_col = find_column(columns, args.label_column_name, LABEL_COLUMNS, "label")
    label_feature = raw_train.features[label_col]
    if not isinstance(label_feature, datasets.ClassLabel):
        raise UserError(
            f"label column {label_col!r} is {label_feature}, not a ClassLabel; cast it with "
            "dataset.cast_column(label, ClassLabel(names=[...])) so the class names are known"
        )
    if not isinstance(raw_train.features[image_col], datasets.Image):
        raise UserError(f"column {image_col!r} is {raw_train.features[image_col]}, not an Image; "
                        f"pass --image_column_name (the dataset has columns {columns})")
    return loaded, raw_train, image_col, label_col, list(label_feature.names)


def undecoded(ds, image_col: str, label_col: str):
    """Images left undecoded (the loader workers decode them), only the two columns kept.

    A label outside the ClassLabel's range is bad data like an undecodable image: the collate skips and counts it.
    A stream re-encodes every row with its features, which would raise on such a label inside a loader worker, so a
    stream reads its labels as plain integers (a lazy cast); a map-style split reads them from Arrow as they are (its
    cast would rewrite the whole table).
    """
    ds = ds.cast_column(image_col, datasets.Image(decode=False))
    if isinstance(ds, datasets.IterableDataset):
        ds = ds.cast_column(label_col, datasets.Value("int64"))
    keep = [image_col, label_col]
    return ds.remove_columns([c for c in ds.column_names if c not in keep]) if ds.column_names else ds


def load_splits(data: DataSource | DataArguments, loaded=None) -> DataSplits:
    """Load the train/eval splits of ``data`` (a :class:`DataSource`, or a run's DataArguments) with images left
    undecoded (decoding happens in the loader workers).

    Also settles the number of training examples per epoch (for the LR schedule) and says where it came from: the
    length of a map-style split; when streaming, ``train_samples`` if given, else an exact count over the keys of a
    local dataset, else the Hub metadata (an estimate once ``train_val_split``/``train_fraction`` filter the stream).
    ``loaded``: the result of :func:`open_dataset` when the caller has already opened the dataset.
    """
    args = as_source(data)
    loaded, raw_train, image_col, label_col, label_names = open_train(args, loaded)

    def prepare(ds):
        return undecoded(ds, image_col, label_col)

    train = prepare(raw_train)
    streaming = not isinstance(train, datasets.Dataset)
    n_total, source = count_rows(args, args.train_split, raw_train)
    eval_ds, n_eval, val_frac = None, None, 0.0
    if args.eval_split:
        eval_ds = prepare(loaded[args.eval_split])
        n_eval, _ = count_rows(args, args.eval_split, loaded[args.eval_split])
    elif args.train_val_split > 0:
        # Carve validation by a hash of each example's key: the same slice in map-style and streaming mode, on any
        # number of processes, every run with the same split_seed (whatever its training seed).
        if args.train_val_split >= 1 and n_total is None:
            raise UserError("train_val_split given as a count needs the size of the train split, which is unknown "
                            "here; give it as a fraction (e.g. 0.02) or pass an eval_split")
        val_frac = args.train_val_split if args.train_val_split < 1 else args.train_val_split / n_total
        eval_ds = train.filter(lambda img: in_validation(example_key(img), val_frac, args.split_seed), input_columns=[image_col])
        train = train.filter(lambda img: not in_validation(example_key(img), val_frac, args.split_seed),
                             input_columns=[image_col])
    if args.train_fraction < 1:
        train = select_subset(train, image_col, args.train_fraction, args.subset_seed)

    n_train = None
    if not streaming:
        n_train, source = len(train), "dataset length" + (" after the subset/validation filters"
                                                           if val_frac or args.train_fraction < 1 else "")
        n_eval = len(eval_ds) if isinstance(eval_ds, datasets.Dataset) else n_eval
    elif args.train_samples is not None:
        n_train, source = args.train_samples, "train_samples"
    elif args.local_folder and (val_frac or args.train_fraction < 1 or n_total is None):
        # A local stream: count exactly (keys only, nothing decoded), so the epoch length is not an estimate.
        n_train = n_val = 0
        for key, _ in split_examples(args, args.train_split, prepare(raw_train), image_col, label_col):
            if val_frac and in_validation(key, val_frac, args.split_seed):
                n_val += 1
            elif in_subset(key, args.train_fraction, args.subset_seed):
                n_train += 1
        source = "counted over the keys of the local files"
        n_eval = n_val if val_frac else n_eval
    elif n_total is not None:
        n_train = n_total
        if val_frac or args.train_fraction < 1:
            n_train = round(n_total * (1 - val_frac) * args.train_fraction)
            n_eval = round(n_total * val_frac) if val_frac else n_eval
            source += (f" x {1 - val_frac:.4g} (validation carve-out) x {args.train_fraction:.4g} (train_fraction), "
                       "an estimate")
            logger.warning("%d training examples per epoch is an estimate (%s); set --train_samples to the exact "
                           "count (`python -m hf_vit.data describe` prints it as selected_examples)", n_train, source)
    if args.max_train_samples is not None:
        if not streaming:
            train = train.select(range(min(len(train), args.max_train_samples)))
        elif args.stream_sharding == "exact":
            train = train.take(args.max_train_samples)
        # else (stream_sharding shards): the cap is the epoch length; each consumer takes its share of it from its own
        # range of the stream (hf_vit.data.sharding), so the examples come from every shard instead of the first ones.
        n_train = min(n_train, args.max_train_samples) if n_train is not None else args.max_train_samples
        source += ", capped by max_train_samples"
    if eval_ds is not None and args.max_eval_samples is not None:
        eval_ds = eval_ds.select(range(min(len(eval_ds), args.max_eval_samples))) \
            if isinstance(eval_ds, datasets.Dataset) else eval_ds.take(args.max_eval_samples)
        n_eval = min(n_eval, args.max_eval_samples) if n_eval is not None else args.max_eval_samples
    if n_train is None:
        raise UserError(
            f"the number of training examples per epoch of {args.name!r} is unknown when streaming; "
            "set --train_samples (used for the LR schedule)"
        )
    info = {"num_examples_in_split": n_total, "validation_fraction": val_frac}
    test = prepare(loaded[args.test_split]) if args.test_split else None
    return DataSplits(train, eval_ds, label_names, image_col, label_col, n_train, source, n_eval, info, args, test)


def select_subset(ds, image_col: str, fraction: float, subset_seed: int):
    """Keep the examples whose key hashes below ``fraction`` — the same examples in any mode, process count or
    machine (the seed's ~2/3 ImageNet subset is ``train_fraction 0.69``)."""
    return ds.filter(lambda img: in_subset(example_key(img), fraction, subset_seed), input_columns=[image_col])


def describe(data: DataSource | DataArguments) -> dict:
    """JSON-able summary of the training split and of its ``train_fraction`` subset, without decoding an image.

    ``subset_fingerprint`` is a SHA-256 over the sorted keys of the selected examples: two users whose fingerprints
    match train on the same examples (before the ``train_val_split`` carve-out, which then depends on ``split_seed``).
    """
    args = as_source(data)
    _, raw_train, image_col, label_col, label_names = open_train(args)
    counts = [0] * len(label_names)
    selected, total, bad_labels = [], 0, 0
    for key, label in split_examples(args, args.train_split, undecoded(raw_train, image_col, label_col), image_col,
                                     label_col):
        total += 1
        if in_subset(key, args.train_fraction, args.subset_seed):
            selected.append(key)
            if label is not None and 0 <= label < len(label_names):
                counts[label] += 1
            else:
                bad_labels += 1
    selected.sort()
    hasher = hashlib.sha256()
    for key in selected:
        hasher.update(key.encode() + b"\n")
    summary = {
        "dataset_name": args.name,
        "split": args.train_split,
        "streaming": args.streaming,
        "num_examples": total,
        "num_classes": len(label_names),
        "train_fraction": args.train_fraction,
        "subset_seed": args.subset_seed,
        "selected_examples": len(selected),
        "class_counts": dict(zip(label_names, counts)),
        "subset_fingerprint": hasher.hexdigest(),
    }
    duplicates = len(selected) - len(set(selected))
    if duplicates:
        summary["duplicate_keys"] = duplicates  # examples that share a path: they are kept or dropped together
    if bad_labels:
        summary["labels_out_of_range"] = bad_labels
    return summary


def main(argv: list[str] | None = None) -> None:
    """``python -m hf_vit.data describe --dataset_name NAME [--train_fraction F] [--streaming]``: print
    :func:`describe` as JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "describe":
        raise UserError("usage: python -m hf_vit.data describe --dataset_name NAME [--train_fraction F] [--streaming]")
    parser = raise_user_errors(ArgumentParser(DataArguments))
    (args,) = parser.parse_args_into_dataclasses(argv[1:])
    check_fields(args)
    print(json.dumps(describe(args), indent=2))

