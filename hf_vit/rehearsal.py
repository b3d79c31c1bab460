"""Rehearsal of a study (``python -m hf_vit.study STUDY --rehearse``): every run of the study, in order, through the
same ``parse_config`` + ``train`` as production and the same data topology, with a tiny model, a few steps, and
generated stand-ins for the datasets this machine cannot reach.

What a rehearsal changes in each run, and nothing else (:func:`rehearse_study`; the header printed by
:func:`describe` says it again for the study at hand):

* **Data**: a Hub id (a rehearsal never downloads) or a local path that does not exist is replaced by a stand-in
  written once under ``DIR/rehearsal_data/``: a Hub-style parquet folder with the real dataset's splits, columns,
  class count, shard count per split and row-group size (:data:`RECORDED`), every row of the real dataset or — where
  that is too heavy for 2 CPU cores (ImageNet-1k's 1,281,167 training rows) — a stated fraction of them, over the same
  shards; tiny images (8x8 PNG, 16x16 JPEG). Existing local folders are used as they are.
* **Model**: a ViT run from a preset gets hidden 32, 2 layers, 2 heads, MLP 64 and a patch of a quarter of the image,
  so the image size stays the run's; a CNN run gets a tiny ResNet or ConvNeXt preset of the same family at the run's
  image size (:data:`TINY_CNN_PRESETS`, added to the preset table); a run that starts from an earlier run keeps that
  run's (tiny) architecture and goes through the real head swap.
* **Length**: ``max_train_steps`` :data:`STEPS`, a checkpoint every :data:`CHECKPOINT_EVERY` steps, a log line every
  step, no warmup (the recipes' warmups are longer than the whole rehearsal); each run evaluates once, at its end
  (its ``eval_steps`` are kept, and lie past the rehearsal's few steps: an evaluation inside the loop would give the
  loader workers, alive until the loop ends, time to decode dozens of batches no step uses); a run that others start
  from, and the first run, are stopped by SIGTERM after their first checkpoint and resumed with
  ``--resume_from_checkpoint latest``.
* Kept as the study gives them: processes (the launch's), loader workers, accumulation, global batch, fractions,
  splits, streaming and its sharding, precision, augmentation, image size, the order of the runs and their links.

A rehearsal's accuracies mean nothing; it shows that every run starts, plans its epochs, reads its data, evaluates,
checkpoints, resumes, hands its weights on and ends with findings.md — before GPU hours are spent on it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import signal
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from hf_vit import durable
from hf_vit.config import read_run_config
from hf_vit.errors import UserError

# --------------------------------------------------------------------------------------------- the real datasets
# Where a figure comes from: CIFAR-10's from its Hub card (https://huggingface.co/datasets/uoft-cs/cifar10,
# dataset_info of commit e025e64 "Convert dataset to Parquet") and file listing (tree/main/plain_text:
# train-00000-of-00001.parquet 120 MB, test-00000-of-00001.parquet 23.9 MB). ImageNet-1k's row counts are the
# ILSVRC-2012 split sizes (1,281,167 / 50,000 / 100,000); its shard counts are the file names
# data/train-00000-of-00294.parquet, data/validation-00000-of-00014.parquet and data/test-00000-of-00028.parquet that
# public code reading https://huggingface.co/datasets/ILSVRC/imagenet-1k refers to (stored public material; the Hub
# itself cannot be reached from here); its bytes are that code's "294 shards of ~500MB" (~147 GB) and "~6.3 GB" for
# validation. Row-group sizes are UNVERIFIED for both: datasets' parquet writer of the time these files were written
# (2.x) wrote 100 rows per row group for image columns; the stand-ins do the same.
SOURCES = {
    "uoft-cs/cifar10": "Hub card dataset_info (commit e025e64) and file listing of uoft-cs/cifar10; row groups "
                       "unverified",
    "ILSVRC/imagenet-1k": "ILSVRC-2012 split sizes; shard counts from the file names public code uses for "
                          "ILSVRC/imagenet-1k (data/train-*-of-00294, validation-*-of-00014, test-*-of-00028); bytes "
                          "approximate, from the same code's comments; row groups unverified",
}


@dataclass(frozen=True)
class SplitRecord:
    rows: int
    shards: int
    bytes: int | None  # on the Hub, parquet; None where unknown


@dataclass(frozen=True)
class DatasetRecord:
    """What the rehearsal knows of a real dataset, and how its stand-in is made."""

    hub_id: str
    folder: str  # the parquet files' folder in the repository (plain_text/, data/)
    config_name: str
    image_column: str
    label_column: str
    num_classes: int
    splits: dict[str, SplitRecord]
    real_images: str  # what the real images are
    row_group_rows: int  # unverified, see above
    stand_in_size: int  # the stand-in's images are stand_in_size x stand_in_size
    stand_in_format: str  # PNG or JPEG
    stand_in_fraction: Fraction = Fraction(1)  # of the real rows (the shards and classes are all kept)
    unlabelled_splits: tuple[str, ...] = ()  # labels -1 (ImageNet's test split)
    image_paths: bool = True  # rows carry a file name (ImageNet's); without one a row's key is a hash of its bytes

    def stand_in_rows(self, split: str) -> int:
        return math.ceil(self.splits[split].rows * self.stand_in_fraction)


RECORDED: dict[str, DatasetRecord] = {
    "uoft-cs/cifar10": DatasetRecord(
        hub_id="uoft-cs/cifar10", folder="plain_text", config_name="plain_text", image_column="img",
        label_column="label", num_classes=10,
        splits={"train": SplitRecord(50_000, 1, 119_705_255), "test": SplitRecord(10_000, 1, 23_940_850)},
        real_images="32x32 PNG", row_group_rows=100, stand_in_size=8, stand_in_format="PNG", image_paths=False),
    "ILSVRC/imagenet-1k": DatasetRecord(
        hub_id="ILSVRC/imagenet-1k", folder="data", config_name="default", image_column="image",
        label_column="label", num_classes=1000,
        splits={"train": SplitRecord(1_281_167, 294, 147 * 10**9),
                "validation": SplitRecord(50_000, 14, 6_300_000_000),
                "test": SplitRecord(100_000, 28, None)},
        real_images="full-size JPEG photos (median ~500x375)", row_group_rows=100, stand_in_size=16,
        stand_in_format="JPEG", stand_in_fraction=Fraction(1, 16), unlabelled_splits=("test",)),
}
# A local copy is named after its Hub dataset (../shared/datasets/cifar10, /data/imagenet-1k).
ALIASES = {"cifar10": "uoft-cs/cifar10", "imagenet-1k": "ILSVRC/imagenet-1k", "imagenet": "ILSVRC/imagenet-1k"}
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STAND_IN_SPEC_FILE = "rehearsal_dataset.json"
GENERATOR_VERSION = 2  # bump when the stand-ins' content changes, so an old folder is rebuilt

# ------------------------------------------------------------------------------------------- the rehearsed run
STEPS = 4
CHECKPOINT_EVERY = 2
# Decoded batches the loader workers may hold at once, all processes together: each worker prefetches
# LOADER_PREFETCH micro-batches of uint8 images (hf_vit/data/loader.py). ImageNet's recipe on 2 processes x 16 workers
# (800 images of 224 px per micro-batch) would hold 15.4 GB — measured: the 23 GB development machine reached 20 GB.
LOADER_MEMORY_BUDGET = 5 * 2**30
LOADER_PREFETCH = 4
TINY_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TINY_CNN_PRESETS = {
    # ResNet-50's layout (bottleneck v1.5, its stem and strides) at 1/32 of the width, one block per stage.
    "resnet_rehearsal": dict(embedding_size=8, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                             layer_type="bottleneck", hidden_act="relu", downsample_in_first_stage=False,
                             downsample_in_bottleneck=False),
    # cnn_tiny_cifar's layout at 1/8 of the width, one block per stage.
    "convnext_rehearsal": dict(num_stages=3, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], drop_path_rate=0.0),
}


def register_tiny_presets() -> None:
    """Add the rehearsal's CNN presets to the preset table (the image size comes from the run's flag)."""
    from transformers import ConvNextConfig, ResNetConfig

    from hf_vit.models import presets

    classes = {"resnet_rehearsal": ResNetConfig, "convnext_rehearsal": ConvNextConfig}
    for name, fields in TINY_CNN_PRESETS.items():
        image = {"image_size": 224} if name.startswith("resnet") else {"image_size": 32, "patch_size": 4}
        presets.PRESETS.setdefault(name, dict(config_class=classes[name], **image, **fields))


def vit_patch(image_size: int) -> int:
    """The largest patch that divides the image and leaves at least 4 patches a side (224 -> 56, 32 -> 8)."""
    return max(p for p in range(1, image_size // 4 + 1) if image_size % p == 0)


# ------------------------------------------------------------------------------------------------- stand-ins
def record_for(dataset_name: str) -> DatasetRecord | None:
    """The recorded dataset a Hub id or a local copy's folder name stands for (a stand-in's folder stands for its
    stand-in: the record with the stand-in's rows)."""
    if dataset_name in RECORDED:
        return RECORDED[dataset_name]
    name = Path(dataset_name.rstrip("/")).name
    for record in RECORDED.values():
        if name == stand_in_folder(Path(), record).name:
            rows = {split: SplitRecord(record.stand_in_rows(split), real.shards, None)
                    for split, real in record.splits.items()}
            return dataclasses.replace(record, splits=rows, stand_in_fraction=Fraction(1))
    return RECORDED.get(ALIASES.get(name.lower(), ""))


def needs_stand_in(dataset_name: str) -> bool:
    """A Hub id (a rehearsal never downloads) or a local path that does not exist."""
    from hf_vit.locations import is_local_path

    path = os.path.expanduser(dataset_name)
    return not (is_local_path(path) and os.path.exists(path))


def stand_in_folder(root: Path, record: DatasetRecord) -> Path:
    return root / record.hub_id.replace("/", "__")


def class_names(record: DatasetRecord) -> list[str]:
    """The stand-in's ClassLabel names: CIFAR-10's own; for ImageNet torchvision's 1,000 category names (offline,
    made unique); otherwise ``class_0``, ``class_1``, ..."""
    if record.hub_id == "uoft-cs/cifar10":
        return list(CIFAR10_NAMES)
    if record.hub_id != "ILSVRC/imagenet-1k":
        return [f"class_{i}" for i in range(record.num_classes)]
    from torchvision.models import get_weight

    names = get_weight("ResNet50_Weights.IMAGENET1K_V1").meta["categories"]  # ships with torchvision: no download
    seen: dict[str, int] = {}
    unique = []
    for name in names:  # torchvision repeats two names ("crane", "maillot"); the Hub's ClassLabel names are unique
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return unique


def _encoded_images(record: DatasetRecord, labels, first_row: int, rng) -> list[bytes]:
    """Tiny images of classes ``labels`` (rows ``first_row``, ``first_row + 1``, ...): the class's colour plus noise,
    the row number written into the first pixels so that every image's bytes differ (the key of a row without a
    path is a hash of its bytes). Made in one array; the JPEGs encoded in one call of torchvision's encoder."""
    import numpy as np
    import PIL.Image
    import torch
    from torchvision.io import encode_jpeg

    size, n = record.stand_in_size, len(labels)
    classes = np.maximum(np.asarray(labels), 0)
    colours = np.stack([(classes * 37) % 256, (classes * 91) % 256, (classes * 151) % 256], axis=1)
    pixels = np.clip(colours[:, :, None, None] + rng.integers(-40, 41, (n, 3, size, size), dtype=np.int16), 0, 255
                     ).astype(np.uint8)
    rows = np.arange(first_row, first_row + n, dtype="<u4").view(np.uint8).reshape(n, 4)
    pixels.reshape(n, -1)[:, :4] = rows
    if record.stand_in_format == "JPEG":
        return [bytes(t.numpy()) for t in encode_jpeg(list(torch.from_numpy(pixels)), quality=90)] if n else []
    encoded = []
    for image in pixels.transpose(0, 2, 3, 1):  # PIL's PNG encoder is the faster one for tiny images
        buffer = io.BytesIO()
        PIL.Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def _readme(record: DatasetRecord, names: list[str], split_bytes: dict[str, int]) -> str:
    """The dataset card's YAML header: features, splits (rows, and bytes of the parquet files) and the config's data
    files, as on the Hub."""
    import yaml

    info = {
        "features": [{"name": record.image_column, "dtype": "image"},
                     {"name": record.label_column,
                      "dtype": {"class_label": {"names": {str(i): n for i, n in enumerate(names)}}}}],
        "splits": [{"name": split, "num_bytes": split_bytes[split], "num_examples": record.stand_in_rows(split)}
                   for split in record.splits],
    }
    config = {"config_name": record.config_name, "default": True,
              "data_files": [{"split": split, "path": f"{record.folder}/{split}-*"} for split in record.splits]}
    header = yaml.safe_dump({"dataset_info": {"config_name": record.config_name, **info}, "configs": [config]},
                            sort_keys=False)
    return (f"---\n{header}---\n\nGenerated stand-in for {record.hub_id} (hf_vit.rehearsal): the real splits, columns, "
            f"class count and shard counts, {record.stand_in_fraction} of the rows, {record.stand_in_size}x"
            f"{record.stand_in_size} {record.stand_in_format} images. Its pixels mean nothing.\n")


def stand_in_spec(record: DatasetRecord) -> dict:
    """What a stand-in folder records about how it was made (compared when a rehearsal finds it built)."""
    spec = dataclasses.asdict(record)
    spec["stand_in_fraction"] = str(record.stand_in_fraction)
    spec["splits"] = {split: {"real_rows": rec.rows, "rows": record.stand_in_rows(split), "shards": rec.shards}
                      for split, rec in record.splits.items()}
    return json.loads(json.dumps({"generator_version": GENERATOR_VERSION, **spec}))  # as read back from the file


def write_stand_in(record: DatasetRecord, folder: Path, seed: int = 0) -> bool:
    """Write the stand-in of ``record`` at ``folder`` unless it is there (built from the same spec); True if written.

    Each split is ``{folder}/{record.folder}/{split}-0000k-of-0000n.parquet`` with the real shard count, rows dealt
    over the shards in order, ``record.row_group_rows`` rows per row group, the datasets features in the schema and
    a README.md whose YAML gives the features, splits and data files as the Hub's card does. Labels are balanced
    over the classes and shuffled (``-1`` in unlabelled splits). Written into ``.<name>.tmp`` and renamed when whole.
    """
    import datasets
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    spec = stand_in_spec(record)
    if folder.is_dir():
        try:
            recorded = json.loads((folder / STAND_IN_SPEC_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            recorded = None
        if recorded != spec:
            raise UserError(f"{folder} holds another stand-in than this rehearsal makes for {record.hub_id}; delete "
                            "it to rebuild")
        return False
    names = class_names(record)
    features = datasets.Features({record.image_column: datasets.Image(),
                                  record.label_column: datasets.ClassLabel(names=names)})
    schema = features.arrow_schema
    partial = folder.with_name(f".{folder.name}.tmp")
    durable.remove_partial(partial)
    (partial / record.folder).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    suffix = ".png" if record.stand_in_format == "PNG" else ".JPEG"
    for split, real in record.splits.items():
        rows = record.stand_in_rows(split)
        if split in record.unlabelled_splits:
            labels = np.full(rows, -1)
        else:
            labels = rng.permutation(np.arange(rows) % record.num_classes)
        for shard in range(real.shards):
            begin, end = shard * rows // real.shards, (shard + 1) * rows // real.shards
            encoded = _encoded_images(record, labels[begin:end], begin, rng)
            # ImageNet's rows carry a file name; the CIFAR-10 stand-in's carry none (unverified for the Hub copy), so
            # that its keys come from the bytes, the slower of the two ways.
            paths = [f"{split}_{row:08d}_{max(int(labels[row]), 0):04d}{suffix}" for row in range(begin, end)] \
                if record.image_paths else [None] * (end - begin)
            image = pa.StructArray.from_arrays([pa.array(encoded, pa.binary()), pa.array(paths, pa.string())],
                                               names=["bytes", "path"])
            table = pa.Table.from_arrays([image, pa.array(labels[begin:end], type=pa.int64())], schema=schema)
            name = f"{split}-{shard:05d}-of-{real.shards:05d}.parquet"
            pq.write_table(table, partial / record.folder / name, row_group_size=record.row_group_rows)
    split_bytes = {split: sum(f.stat().st_size for f in (partial / record.folder).glob(f"{split}-*.parquet"))
                   for split in record.splits}
    (partial / "README.md").write_text(_readme(record, names, split_bytes), encoding="utf-8")
    (partial / STAND_IN_SPEC_FILE).write_text(json.dumps(spec, indent=1), encoding="utf-8")
    durable.publish_folder(partial, folder)
    return True


def measured_layout(folder: Path, record: DatasetRecord) -> dict[str, dict[str, int]]:
    """Per split of a written stand-in, read back from its parquet footers: rows, shards, row groups, bytes, and the
    number of classes its labels use."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    layout = {}
    for split in record.splits:
        files = sorted((folder / record.folder).glob(f"{split}-*.parquet"))
        metas = [pq.ParquetFile(f).metadata for f in files]
        labels = set()
        for f in files:
            labels |= set(pc.unique(pq.read_table(f, columns=[record.label_column]).column(0)).to_pylist())
        layout[split] = {"rows": sum(m.num_rows for m in metas), "shards": len(files),
                         "row_groups": sum(m.num_row_groups for m in metas),
                         "bytes": sum(f.stat().st_size for f in files), "classes": len(labels - {-1})}
    return layout


def recorded_unit_rows(record: DatasetRecord, split: str) -> list[int]:
    """Rows per parquet row group of the real split, in file order (rows dealt evenly over the recorded shards)."""
    real = record.splits[split]
    units = []
    for shard in range(real.shards):
        rows = (shard + 1) * real.rows // real.shards - shard * real.rows // real.shards
        units += [record.row_group_rows] * (rows // record.row_group_rows)
        units += [rows % record.row_group_rows] if rows % record.row_group_rows else []
    return units


def recorded_data_facts(args):
    """The plan's dataset facts (:class:`hf_vit.plan.DataFacts`) of ``args.dataset_name`` from :data:`RECORDED`, for a
    dataset that cannot be reached (the Hub offline, a local copy on another machine); None when it has no record.
    The epoch length is estimated as the loader estimates a Hub stream's: rows x (1 - validation carve-out) x
    train_fraction."""
    from hf_vit.plan import DataFacts

    record = record_for(args.dataset_name)
    if record is None or args.train_split not in record.splits:
        return None
    rows = record.splits[args.train_split].rows
    if args.eval_split:
        carve, eval_rows = 0.0, record.splits[args.eval_split].rows if args.eval_split in record.splits else None
    else:
        carve = args.train_val_split if args.train_val_split < 1 else args.train_val_split / rows
        eval_rows = round(rows * carve) if carve else None
    train = round(rows * (1 - carve) * args.train_fraction)
    if args.max_train_samples is not None:
        train = min(train, args.max_train_samples)
    if eval_rows is not None and args.max_eval_samples is not None:
        eval_rows = min(eval_rows, args.max_eval_samples)
    units = recorded_unit_rows(record, args.train_split) if args.streaming else None
    return DataFacts(num_train_examples=train, num_eval_examples=eval_rows, num_classes=record.num_classes,
                     streaming=args.streaming, raw_train_rows=rows, unit_rows=units,
                     num_units=len(units) if units else None, train_bytes=record.splits[args.train_split].bytes,
                     source=f"recorded metadata of {record.hub_id} (hf_vit/rehearsal.py; an estimate)",
                     has_eval=eval_rows is not None)


# ------------------------------------------------------------------------------------------ the rehearsed study
@dataclass
class Rehearsal:
    """How a study is rehearsed: the stand-ins to build, the runs to preempt and resume, and what was scaled."""

    root: Path  # DIR/rehearsal_data
    stand_ins: dict[str, tuple[DatasetRecord, Path]] = field(default_factory=dict)  # dataset name -> its stand-in
    preempt: list[str] = field(default_factory=list)  # runs stopped by SIGTERM after their first checkpoint
    models: dict[str, str] = field(default_factory=dict)  # run -> the tiny model it trains
    scaled: dict[str, str] = field(default_factory=dict)  # run -> what else was scaled for this machine, and why

    def build_stand_ins(self, say=print) -> None:
        """Write every stand-in that is not there yet (call on one process)."""
        import time

        for name, (record, folder) in self.stand_ins.items():
            start = time.time()
            written = write_stand_in(record, folder)
            say(f"stand-in for {name}: {'written' if written else 'already written'} at {folder}"
                + (f" ({time.time() - start:.1f} s)" if written else ""))


def _run_config(run):
    from hf_vit.config import parse_config

    return parse_config(run.argv())


def rehearse_study(study, steps: int = STEPS, checkpoint_every: int = CHECKPOINT_EVERY) -> Rehearsal:
    """Turn ``study`` (a loaded :class:`~hf_vit.study_file.Study`) into its rehearsal, in place: each run's flags get
    the stand-in data, the tiny model and the few steps; returns what was done (:class:`Rehearsal`)."""
    from hf_vit.models import PRESETS, vit
    from hf_vit.models.presets import SUPPORTED_MODEL_TYPES

    register_tiny_presets()
    rehearsal = Rehearsal(study.output_dir / "rehearsal_data")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    folders_to_configs = {}

    def size_of(cfg) -> int:
        if cfg.model.image_size:
            return cfg.model.image_size
        if cfg.model.model_name_or_path:
            return size_of(folders_to_configs[cfg.model.model_name_or_path])
        return PRESETS[cfg.model.model_preset]["image_size"]

    def stand_in(name: str, where: str) -> str:
        if not needs_stand_in(name):
            return name
        record = record_for(name)
        if record is None:
            raise UserError(f"{where}: dataset {name!r} cannot be reached here and the rehearsal has no record of it "
                            f"(it knows {sorted(RECORDED)}); pass a local copy with --set dataset_name=...")
        rehearsal.stand_ins.setdefault(name, (record, stand_in_folder(rehearsal.root, record)))
        return str(rehearsal.stand_ins[name][1])

    for dataset in study.datasets:
        dataset.source = stand_in(dataset.source, f"datasets.{dataset.name}")
    folders = {str(run.output_dir): run.name for run in study.runs}
    started_from = set()
    for run in study.runs:
        cfg = _run_config(run)
        folders_to_configs[str(run.output_dir)] = cfg
        if "dataset_name" not in run.referenced:
            run.flags["dataset_name"] = stand_in(cfg.data.dataset_name, f"run {run.name!r}")
        source = cfg.model.model_name_or_path
        if source:
            if source not in folders:
                raise UserError(f"run {run.name!r} starts from {source!r}, which a rehearsal cannot reach; rehearse "
                                "a study whose fine-tuning starts from one of its own runs")
            started_from.add(folders[source])
            rehearsal.models[run.name] = f"the tiny model of {folders[source]}, new head where the labels differ"
        else:
            preset = PRESETS.get(cfg.model.model_preset)
            if preset is None:
                raise UserError(f"run {run.name!r}: unknown model_preset {cfg.model.model_preset!r}")
            model_type = preset["config_class"].model_type
            size = cfg.model.image_size or preset["image_size"]
            if model_type in vit.MODEL_TYPES:
                tiny = {**TINY_VIT, "patch_size": vit_patch(size), "image_size": size}
                run.flags.update({key: str(value) for key, value in tiny.items()})
                rehearsal.models[run.name] = (f"ViT hidden 32, 2 layers, 2 heads, MLP 64, patch {tiny['patch_size']} "
                                              f"at {size} px")
            elif model_type in ("resnet", "convnext"):
                tiny_preset = f"{model_type}_rehearsal"
                run.flags.update({"model_preset": tiny_preset, "image_size": str(size)})
                if model_type == "convnext":
                    run.flags["patch_size"] = str(cfg.model.patch_size or preset["patch_size"])
                rehearsal.models[run.name] = f"{tiny_preset} at {size} px"
            else:
                raise UserError(f"run {run.name!r}: no rehearsal model for model type {model_type!r} "
                                f"({SUPPORTED_MODEL_TYPES})")
        batch = _batch_within_memory(cfg, processes, run.flags.get("image_size") or size_of(cfg))
        if batch != cfg.train.total_train_batch_size:
            per_process = batch // (processes * cfg.train.gradient_accumulation_steps)
            rehearsal.scaled[run.name] = (
                f"total_train_batch_size {cfg.train.total_train_batch_size} -> {batch} ({per_process} per process; "
                f"the recipe's on 8 GPUs: {cfg.train.total_train_batch_size // 8} per GPU): {processes} processes x "
                f"{cfg.data.dataloader_num_workers} loader workers x {LOADER_PREFETCH} prefetched micro-batches of "
                f"the recipe's would hold {_loader_bytes(cfg, processes, cfg.train.total_train_batch_size, size_of(cfg)) / 1e9:.1f} "
                f"GB of decoded images, more than the rehearsal's {LOADER_MEMORY_BUDGET / 2**30:.0f} GiB")
            run.flags["total_train_batch_size"] = str(batch)
        run.flags.update({"max_train_steps": str(steps), "checkpointing_steps": str(checkpoint_every), "logging_steps": "1", "warmup_epochs": "0",
                          "push_to_hub": "false"})
    # Preempt and resume the first run, and every run others start from (its resume is what the chain rests on).
    rehearsal.preempt = [run.name for i, run in enumerate(study.runs) if i == 0 or run.name in started_from]
    return rehearsal


def _loader_bytes(cfg, processes: int, global_batch: int | None, image_size: int) -> int:
    """Bytes of decoded images the run's loader workers hold when every prefetch slot is full."""
    workers = 0 if cfg.data.data_on_device else cfg.data.dataloader_num_workers
    if not workers or not global_batch:
        return 0
    micro = global_batch // (processes * cfg.train.gradient_accumulation_steps)
    return processes * workers * LOADER_PREFETCH * micro * 3 * image_size * image_size


def _batch_within_memory(cfg, processes: int, image_size) -> int | None:
    """The run's global batch, halved while its loader would hold more than :data:`LOADER_MEMORY_BUDGET` (and the
    halves still divide over the processes and accumulation steps)."""
    batch, step = cfg.train.total_train_batch_size, processes * cfg.train.gradient_accumulation_steps
    while batch and _loader_bytes(cfg, processes, batch, int(image_size)) > LOADER_MEMORY_BUDGET and \
            batch % 2 == 0 and (batch // 2) % step == 0:
        batch //= 2
    return batch


def describe(study, rehearsal: Rehearsal, processes: int) -> str:
    """The rehearsal's header: what runs, what is scaled and why."""
    lines = [
        f"REHEARSAL of {study.path} -> {study.output_dir}: {len(study.runs)} runs on {processes} process(es).",
        "THE ACCURACIES OF A REHEARSAL MEAN NOTHING: tiny models, a few steps, generated images. It checks that every "
        "run starts, plans its epochs, reads its data, evaluates, checkpoints, resumes and hands its weights on.",
        "Same code: each run goes through parse_config + train as in production, with the command line printed "
        "when it starts.",
        "Kept as the study gives them: processes (this launch's), loader workers, gradient accumulation, the global "
        "batch, train_fraction, splits and held-out sets, streaming and stream_sharding, mixed precision, "
        "augmentation, image size, the order of the runs and the links between them.",
        f"Scaled: max_train_steps {STEPS}, a checkpoint every {CHECKPOINT_EVERY} steps, a log line every step, "
        "warmup_epochs 0 (the recipes' warmups last longer than a rehearsal; the run plan checks the real ones), no "
        "Hub push. Each run evaluates once, at its end: its eval_steps are kept and lie past its few steps (an "
        "evaluation inside the loop would leave the loader workers decoding batches no step uses, for minutes on 2 "
        "cores).",
        "Models (a few steps of the real ones would take hours on a CPU):",
        *[f"  {name}: {model}" for name, model in rehearsal.models.items()],
        *(["Scaled for this machine's memory:"] + [f"  {name}: {why}" for name, why in rehearsal.scaled.items()]
          if rehearsal.scaled else []),
        f"Preempted by SIGTERM after their first checkpoint, then resumed (--resume_from_checkpoint latest): "
        f"{', '.join(rehearsal.preempt) or 'none'}.",
    ]
    if rehearsal.stand_ins:
        lines.append("Data that cannot be reached here, replaced by generated stand-ins (hf_vit/rehearsal.py RECORDED):")
    for name, (record, folder) in rehearsal.stand_ins.items():
        splits = ", ".join(
            f"{split} {record.stand_in_rows(split):,} rows" + (
                f" ({record.stand_in_fraction} of {real.rows:,})" if record.stand_in_fraction != 1 else "")
            + f" in {real.shards} shard(s)" for split, real in record.splits.items())
        why = (f"; {record.stand_in_fraction} of the rows, every shard kept: all of them would take more than the "
               "rehearsal's 10 minutes on 2 cores to write and count" if record.stand_in_fraction != 1 else
               "; all the rows")
        lines.append(f"  {name} -> {folder}: {splits}; {record.num_classes} classes; {record.row_group_rows} rows per "
                     f"row group; {record.stand_in_size}x{record.stand_in_size} {record.stand_in_format} images "
                     f"(real: {record.real_images}){why}")
    return "\n".join(lines)


class Preempter:
    """Send this process SIGTERM as soon as ``folder`` holds a complete checkpoint — the signal a cluster sends
    before it preempts a job; the trainer finishes the step, saves a checkpoint and returns ``preempted``.

    Only the main process signals itself: the trainer's stop flag is reduced over the ranks, so every rank stops at
    the same step.
    """

    def __init__(self, folder: Path):
        self.folder, self.done = folder, threading.Event()
        self.fired = False
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        from hf_vit.checkpoint import complete_checkpoints

        while not self.done.wait(0.02):
            if complete_checkpoints(self.folder):
                self.fired = True
                os.kill(os.getpid(), signal.SIGTERM)
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


# ------------------------------------------------------------------------------------------------ per-run report
def run_summary(folder: Path) -> dict:
    """What a finished (or failed) rehearsed run did, read from its folder: steps, epochs, steps per epoch, examples
    used per epoch of those available, evaluations, checkpoints."""
    from hf_vit.checkpoint import complete_checkpoints

    summary: dict = {}
    results_path = folder / "all_results.json"
    if results_path.is_file():
        results = json.loads(results_path.read_text(encoding="utf-8"))
        summary.update(steps=results.get("global_step"), epoch=results.get("epoch"),
                       eval_accuracy=results.get("eval_accuracy"), eval_samples=results.get("eval_samples"),
                       seen=results.get("train_samples_seen"))
    config = read_run_config(folder, known_only=False)
    if config:
        summary["global_batch"] = config.get("total_train_batch_size")
    checkpoints = complete_checkpoints(folder)
    if checkpoints:
        state = json.loads((checkpoints[-1] / "trainer_state.json").read_text(encoding="utf-8"))
        plan = state.get("epoch_plan") or {}
        summary.update(available=plan.get("num_train_examples"), steps_per_epoch=plan.get("steps_per_epoch"))
        history = state.get("log_history", [])
    else:
        history = []
    history_path = folder / "log_history.json"
    if history_path.is_file():
        history = json.loads(history_path.read_text(encoding="utf-8"))
    summary["evaluations"] = [r["step"] for r in history if "eval_accuracy" in r]
    return summary


def summary_line(summary: dict) -> str:
    """``6 steps (0.67 epoch of 9 steps), 4,608 of 4,975 train examples used per epoch (92.6%), evaluated at ...``"""
    parts = []
    if summary.get("steps") is not None:
        epoch = summary.get("epoch") or 0
        per_epoch = summary.get("steps_per_epoch")
        parts.append(f"{summary['steps']} steps ({epoch:.3g} epochs" + (f" of {per_epoch} steps)" if per_epoch
                                                                           else ")"))
    per_epoch, batch, available = summary.get("steps_per_epoch"), summary.get("global_batch"), summary.get("available")
    if per_epoch and batch and available:
        used = per_epoch * batch
        parts.append(f"{used:,} of {available:,} train examples used per epoch ({100 * used / available:.1f}%)")
    if summary.get("evaluations"):
        parts.append(f"evaluated at steps {summary['evaluations']} on {summary.get('eval_samples') or '?'} images")
    return ", ".join(parts)
