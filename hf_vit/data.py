"""Data stage: load a Hub or local image-classification dataset, shard it exactly over processes x workers, decode and
augment it into uint8 batches.

Design (why it is built this way):

* **One sharding rule for map-style and streaming data.** An epoch is a fixed order of examples (a seeded permutation,
  or the seeded shuffled stream) cut into *blocks* of ``per_device_batch`` examples. With N processes x W workers there
  are C = N*W consumers; block b goes to consumer ``b % C``, and only complete *rounds* of C blocks are used. So every
  example of an epoch reaches exactly one consumer, every rank runs the same number of micro-batches (no DDP hang), and
  the last incomplete round (< C x per_device_batch examples) is dropped — that is the last-batch policy.
  We do not hand the train loader to ``accelerator.prepare``: for a ``datasets.IterableDataset`` accelerate shards by
  files (``dataset.shard``) — unequal example counts per rank — and on top of ``split_dataset_by_node`` it shards twice
  (accelerate#3547). Here the rule above is the only sharding.
* **Exact resume by count.** The order depends only on (seed, epoch), augmentation randomness only on (seed, epoch,
  example key), so restarting an epoch and skipping the first k micro-batches — without decoding them — reproduces
  the uninterrupted run bit for bit.
* **uint8 until the device.** Workers decode and crop to the final size and hand over uint8 tensors (4x less to copy
  than float32); conversion and normalisation happen batched on the device (:func:`normalize`).
* **Reduced-size JPEG decoding.** The random-resized crop box is chosen from the header size, then the JPEG is decoded
  at the largest DCT scale (1/2, 1/4, 1/8) that still leaves the crop at least as large as the output
  (``PIL.Image.draft``) — full quality for the pixels used, a fraction of the decode cost for large photos.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field

import datasets
import numpy as np
import PIL.Image
import torch
from torchvision import transforms as tv_transforms
from torchvision.transforms import v2
from transformers import DeiTImageProcessor, ViTImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .config import DataArguments
from .errors import UserError

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels", "fine_label")


# ----------------------------------------------------------------------------------------------------------- loading
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


def example_key(image: dict) -> str:
    """Stable identity of an example: the file path when the dataset has one, else a hash of the image bytes."""
    if image.get("path"):
        return os.path.basename(image["path"]) if image.get("bytes") is None else image["path"]
    return hashlib.blake2b(image["bytes"] or b"", digest_size=12).hexdigest()


def _unit_hash(key: str, seed: int, salt: str) -> float:
    """Deterministic number in [0, 1) from (key, seed): the same on every machine, process and worker."""
    digest = hashlib.blake2b(f"{salt}:{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def is_local_path(name: str) -> bool:
    return os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1


def _load(args: DataArguments, split: str | None):
    name = os.path.expanduser(args.dataset_name)
    if is_local_path(name) and not os.path.exists(name):
        raise UserError(f"dataset path {args.dataset_name!r} does not exist; pass an existing folder or a Hub id")
    try:
        if os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_dict.json")):
            loaded = datasets.load_from_disk(name)  # written by save_to_disk
            if args.streaming:
                loaded = datasets.IterableDatasetDict({k: v.to_iterable_dataset(num_shards=max(1, min(64, len(v) // 1000)))
                                                       for k, v in loaded.items()})
            return loaded
        return datasets.load_dataset(name, args.dataset_config_name, streaming=args.streaming)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as err:
        where = "local folder" if os.path.exists(name) else "Hub (unreachable offline: pass a local path instead)"
        raise UserError(f"cannot load dataset {args.dataset_name!r} from the {where}: {str(err).splitlines()[0]}") from None


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


def _count_rows(args: DataArguments, split: str, ds) -> tuple[int | None, str]:
    """Examples in a split: from the dataset metadata, else parquet footers of local files, else None."""
    if isinstance(ds, datasets.Dataset):
        return len(ds), "dataset length"
    info = ds.info.splits.get(split) if ds.info and ds.info.splits else None
    if info is not None and info.num_examples:
        return info.num_examples, "dataset metadata"
    if os.path.isdir(args.dataset_name):
        try:
            import pyarrow.parquet as pq

            builder = datasets.load_dataset_builder(args.dataset_name, args.dataset_config_name)
            files = builder.config.data_files.get(split, [])
            if files and all(str(f).endswith(".parquet") for f in files):
                return sum(pq.ParquetFile(f).metadata.num_rows for f in files), "parquet metadata"
        except Exception:  # counting is best effort; train_samples is the documented fallback
            pass
    return None, "unknown"


def load_splits(args: DataArguments, seed: int) -> DataSplits:
    """Load train/eval splits with images left undecoded (decoding happens in the loader workers)."""
    loaded = _load(args, args.train_split)
    splits = list(loaded.keys())
    if args.train_split not in loaded:
        raise UserError(f"split {args.train_split!r} not found; the dataset has splits {splits} (set --train_split)")
    if args.eval_split and args.eval_split not in loaded:
        raise UserError(f"split {args.eval_split!r} not found; the dataset has splits {splits} (set --eval_split)")
    train = loaded[args.train_split]
    columns = list(train.features.keys()) if train.features else list(train.column_names or [])
    image_col = find_column(columns, args.image_column_name, IMAGE_COLUMNS, "image")
    label_col = find_column(columns, args.label_column_name, LABEL_COLUMNS, "label")
    label_feature = train.features[label_col]
    if not isinstance(label_feature, datasets.ClassLabel):
        raise UserError(
            f"label column {label_col!r} is {label_feature}, not a ClassLabel; cast it with "
            "dataset.cast_column(label, ClassLabel(names=[...])) so the class names are known"
        )
    if not isinstance(train.features[image_col], datasets.Image):
        raise UserError(f"column {image_col!r} is {train.features[image_col]}, not an Image; pass --image_column_name")
    label_names = list(label_feature.names)

    def prepare(ds):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
        keep = [image_col, label_col]
        return ds.remove_columns([c for c in ds.column_names if c not in keep]) if ds.column_names else ds

    train = prepare(train)
    n_train, source = _count_rows(args, args.train_split, loaded[args.train_split])
    eval_ds, n_eval = None, None
    if args.eval_split:
        eval_ds = prepare(loaded[args.eval_split])
        n_eval, _ = _count_rows(args, args.eval_split, loaded[args.eval_split])
    elif args.train_val_split > 0:
        # Carve validation by a hash of each example's key: the same slice in map-style and streaming mode, on any
        # number of processes, every run with the same seed.
        frac = args.train_val_split if args.train_val_split < 1 else args.train_val_split / max(1, n_train or 1)
        in_val = lambda img: _unit_hash(example_key(img), seed, "val") < frac  # noqa: E731
        eval_ds = train.filter(in_val, input_columns=[image_col])
        train = train.filter(lambda img: not in_val(img), input_columns=[image_col])
        if n_train is not None:
            n_eval = len(eval_ds) if isinstance(eval_ds, datasets.Dataset) else round(n_train * frac)
            n_train = len(train) if isinstance(train, datasets.Dataset) else n_train - n_eval
            source += f" minus the {frac:.2%} validation carve-out"
    if args.train_fraction < 1:
        train = select_subset(train, image_col, args.train_fraction, args.subset_seed)
        if isinstance(train, datasets.Dataset):
            n_train, source = len(train), "selected subset"
        elif n_train is not None:
            n_train, source = round(n_train * args.train_fraction), source + f" x train_fraction (estimate)"
    if args.max_train_samples is not None:
        train = train.select(range(min(len(train), args.max_train_samples))) if isinstance(train, datasets.Dataset) \
            else train.take(args.max_train_samples)
        n_train = min(n_train, args.max_train_samples) if n_train is not None else args.max_train_samples
        source += ", capped by max_train_samples"
    if eval_ds is not None and args.max_eval_samples is not None:
        eval_ds = eval_ds.select(range(min(len(eval_ds), args.max_eval_samples))) \
            if isinstance(eval_ds, datasets.Dataset) else eval_ds.take(args.max_eval_samples)
        n_eval = min(n_eval or args.max_eval_samples, args.max_eval_samples)
    if args.train_samples is not None and not isinstance(train, datasets.Dataset):
        n_train, source = args.train_samples, "train_samples"
    if n_train is None:
        raise UserError(
            f"the number of training examples per epoch of {args.dataset_name!r} is unknown when streaming; "
            "set --train_samples (used for the LR schedule)"
        )
    return DataSplits(train, eval_ds, label_names, image_col, label_col, n_train, source, n_eval)


def select_subset(ds, image_col: str, fraction: float, subset_seed: int):
    """Keep the examples whose key hashes below ``fraction`` — the same examples in any mode, process count or
    machine (the seed's ~2/3 ImageNet subset is ``train_fraction 0.69``)."""
    return ds.filter(lambda img: _unit_hash(example_key(img), subset_seed, "subset") < fraction,
                     input_columns=[image_col])


# -------------------------------------------------------------------------------------------------------- transforms
@dataclass
class ImageSpec:
    """Everything preprocessing needs, resolved from the model config and the image processor."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    eval_resize: int  # eval: resize to this square, then center-crop image_size
    crop_padding: int | None = None  # CIFAR-style pad-and-crop; None = random-resized crop

    @classmethod
    def from_processor(cls, processor, crop_padding: int | None = None) -> "ImageSpec":
        size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
        resize = processor.size["height"] if getattr(processor, "do_center_crop", False) else size["height"]
        return cls(size["height"], tuple(processor.image_mean), tuple(processor.image_std), resize, crop_padding)


def build_image_processor(image_size: int, crop_padding: int | None, mean=None, std=None):
    """The processor saved with the model; it reproduces the eval preprocessing exactly.

    CIFAR-style (pad-and-crop) training evaluates the whole image resized to ``image_size``; ImageNet-style training
    evaluates a center crop of ratio 0.875 (resize 256 -> crop 224), which needs the DeiT processor's center crop.
    """
    common = dict(image_mean=list(mean or IMAGENET_DEFAULT_MEAN), image_std=list(std or IMAGENET_DEFAULT_STD),
                  resample=PIL.Image.BILINEAR)
    if crop_padding is not None or image_size <= 64:
        return ViTImageProcessor(size={"height": image_size, "width": image_size}, **common)
    resize = int(math.floor(image_size / 0.875))
    return DeiTImageProcessor(size={"height": resize, "width": resize},
                              crop_size={"height": image_size, "width": image_size}, **common)


def to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """Any mode (L, LA, P, RGBA, CMYK, I;16, ...) -> RGB; alpha is composited on white rather than dropped to black."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = PIL.Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode.startswith("I;16") or img.mode == "I":
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


class RandomResizedCropDecode:
    """Random-resized crop that decodes only as much of a JPEG as the crop needs (see the module docstring).

    The crop box is drawn by torchvision's own ``RandomResizedCrop.get_params`` on the header size.
    """

    def __init__(self, size: int, scale: tuple[float, float], ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def __call__(self, img: PIL.Image.Image) -> PIL.Image.Image:
        top, left, h, w = tv_transforms.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        full_w, full_h = img.size
        if img.format == "JPEG":
            # draft picks the largest DCT reduction keeping the image >= the requested size; request the size at
            # which the crop box still covers `size` output pixels on its short side.
            reduce = max(1, min(h, w) // self.size)
            img.draft("RGB", (max(1, full_w // reduce), max(1, full_h // reduce)))
        img = to_rgb(img)
        sx, sy = img.size[0] / full_w, img.size[1] / full_h
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        return img.resize((self.size, self.size), PIL.Image.BILINEAR, box=box)


def train_transform(spec: ImageSpec, args: DataArguments):
    """Per-example train transform: PIL image -> uint8 (3, S, S) tensor."""
    if spec.crop_padding is not None:
        ops = [v2.Lambda(to_rgb), v2.Resize((spec.image_size, spec.image_size), antialias=True),
               v2.RandomCrop(spec.image_size, padding=spec.crop_padding, padding_mode="reflect")]
    else:
        ops = [RandomResizedCropDecode(spec.image_size, (args.random_resized_crop_scale, 1.0))]
    ops.append(v2.RandomHorizontalFlip())
    if args.augmentation == "enhanced":
        ops.append(v2.TrivialAugmentWide())
    ops.append(v2.PILToTensor())
    if args.augmentation == "enhanced" and args.random_erasing_prob > 0:
        # Erase with the dataset mean so the erased patch normalises to zero.
        ops.append(v2.RandomErasing(p=args.random_erasing_prob, value=[round(255 * m) for m in spec.mean]))
    return v2.Compose(ops)


def eval_transform(spec: ImageSpec):
    """Deterministic eval transform matching the saved image processor: resize (bilinear), center crop, uint8."""
    return v2.Compose([
        v2.Lambda(to_rgb),
        v2.Resize((spec.eval_resize, spec.eval_resize), interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        v2.CenterCrop(spec.image_size),
        v2.PILToTensor(),
    ])


def normalize(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) on the device -> normalised float (one fused pass, batched)."""
    return (pixels.float().div_(255.0) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def batch_mixer(args: DataArguments, num_classes: int):
    """Batch-level MixUp/CutMix from torchvision v2 (soft targets), or None when both alphas are 0."""
    mixers = []
    if args.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=args.mixup_alpha, num_classes=num_classes))
    if args.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=args.cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


# ------------------------------------------------------------------------------------------------ decode and collate
class DecodeCollate:
    """Loader ``collate_fn``: decode, check and transform raw examples into a uint8 batch.

    Runs in the loader workers. Bad examples (undecodable or truncated bytes, zero-size images, labels outside the
    class range) are dropped from the batch and reported by key in ``bad_keys``. Augmentation randomness is seeded
    from (seed, epoch, example key), so it does not depend on which worker or process sees the example.
    """

    def __init__(self, transform, image_column: str, label_column: str, num_classes: int, seed: int, train: bool):
        self.transform, self.image_column, self.label_column = transform, image_column, label_column
        self.num_classes, self.seed, self.train, self.epoch = num_classes, seed, train, 0

    def decode(self, example: dict) -> tuple[torch.Tensor, int, str]:
        image = example[self.image_column]
        key = example_key(image)
        label = int(example[self.label_column])
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} outside [0, {self.num_classes})")
        data = image.get("bytes")
        img = PIL.Image.open(io.BytesIO(data) if data is not None else image["path"])
        if img.width == 0 or img.height == 0:
            raise ValueError("zero-size image")
        if self.train:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(_unit_hash(key, self.seed * 100_003 + self.epoch, "aug") * 2**62))
                pixels = self.transform(img)
        else:
            pixels = self.transform(img)
        return pixels, label, key

    def __call__(self, examples: list[dict]) -> dict:
        pixels, labels, keys, bad = [], [], [], []
        for example in examples:
            try:
                p, y, k = self.decode(example)
            except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError, TypeError) as err:
                bad.append(f"{example_key(example[self.image_column]) if isinstance(example.get(self.image_column), dict) else '?'} ({type(err).__name__}: {err})")
                continue
            pixels.append(p)
            labels.append(y)
            keys.append(k)
        return {
            "pixel_values": torch.stack(pixels) if pixels else torch.zeros(0, 3, 1, 1, dtype=torch.uint8),
            "labels": torch.tensor(labels, dtype=torch.long),
            "keys": keys,
            "bad_keys": bad,
            "num_examples": len(examples),
        }


# ------------------------------------------------------------------------------------------------------- the sharder
class ExampleStream(torch.utils.data.IterableDataset):
    """Yields this consumer's examples of one epoch, block by block (see the module docstring for the rule).

    ``set_epoch(epoch, skip_micro_batches)`` is called before each ``iter(loader)``; the loader's workers are
    recreated per epoch (no persistent workers), so they see it.
    """

    def __init__(self, ds, block_size: int, rank: int, world: int, num_workers: int, seed: int,
                 shuffle: bool = True, drop_incomplete_round: bool = True, shuffle_buffer_size: int = 10_000):
        self.ds, self.block, self.rank, self.world = ds, block_size, rank, world
        self.num_workers, self.seed, self.shuffle = max(1, num_workers), seed, shuffle
        self.drop_incomplete = drop_incomplete_round
        self.buffer = shuffle_buffer_size
        self.epoch, self.skip = 0, 0

    @property
    def consumers(self) -> int:
        return self.world * self.num_workers

    def set_epoch(self, epoch: int, skip_micro_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_micro_batches

    def micro_batches_per_epoch(self, num_examples: int) -> int:
        """Micro-batches each rank runs per epoch: W blocks per complete round."""
        return (num_examples // (self.consumers * self.block)) * self.num_workers

    def _role(self) -> tuple[int, int]:
        """(consumer index, blocks to skip) of this worker; on resume roles rotate so the loader's round-robin over
        workers continues exactly where the interrupted epoch stopped."""
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        shift, done = self.skip % self.num_workers, self.skip // self.num_workers
        role = (worker + shift) % self.num_workers
        return self.rank * self.num_workers + role, done + (1 if role < shift else 0)

    def __iter__(self):
        consumer, skip_blocks = self._role()
        if isinstance(self.ds, datasets.Dataset):
            yield from self._iter_map_style(consumer, skip_blocks)
        else:
            yield from self._iter_stream(consumer, skip_blocks)

    def _iter_map_style(self, consumer: int, skip_blocks: int):
        n = len(self.ds)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        else:
            order = torch.arange(n)
        round_size = self.consumers * self.block
        rounds = n // round_size if self.drop_incomplete else math.ceil(n / round_size)
        for r in range(skip_blocks, rounds):
            start = r * round_size + consumer * self.block
            indices = order[start : min(start + self.block, n)].tolist()
            if not indices:
                continue
            rows = self.ds[indices]  # one columnar read per block
            for i in range(len(indices)):
                yield {k: v[i] for k, v in rows.items()}

    def _iter_stream(self, consumer: int, skip_blocks: int):
        ds = self.ds
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.buffer)
            ds.set_epoch(self.epoch)
        # `.iter` walks the whole stream in this worker (no shard split by datasets): each consumer picks its blocks
        # by position, which is what makes the rule exact for any number of shards, workers and processes.
        held, round_index = None, 0
        for b, rows in enumerate(ds.iter(batch_size=self.block)):
            r, owner = divmod(b, self.consumers)
            if owner == consumer:
                held = rows
            if owner == self.consumers - 1 or not self.drop_incomplete:
                # The round is complete (or completeness does not matter): release this consumer's block.
                if held is not None and r >= skip_blocks:
                    n_rows = len(next(iter(held.values())))
                    for i in range(n_rows):
                        yield {k: v[i] for k, v in held.items()}
                held = None
            round_index = r
        if not self.drop_incomplete and held is not None and round_index >= skip_blocks:
            for i in range(len(next(iter(held.values())))):
                yield {k: v[i] for k, v in held.items()}


def build_loader(stream: ExampleStream, collate: DecodeCollate, num_workers: int, pin_memory: bool):
    return torch.utils.data.DataLoader(
        stream, batch_size=stream.block, collate_fn=collate, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if num_workers else None,
    )


# -------------------------------------------------------------------------------------------------------- describe
def describe(args: DataArguments, seed: int = 42) -> dict:
    """Summary of the (possibly subset) training split, with a fingerprint of the selected example keys."""
    args.train_val_split = 0.0 if not args.eval_split else args.train_val_split
    splits = load_splits(args, seed)
    hasher = hashlib.sha256()
    counts = [0] * len(splits.label_names)
    keys = []
    ds = splits.train
    for row in ds.select_columns([splits.image_column, splits.label_column]) if isinstance(ds, datasets.Dataset) \
            else ds:
        keys.append(example_key(row[splits.image_column]))
        counts[int(row[splits.label_column])] += 1
    for k in sorted(keys):
        hasher.update(k.encode() + b"\n")
    total, _ = _count_rows(args, args.train_split, _load(args, args.train_split)[args.train_split])
    return {
        "dataset_name": args.dataset_name,
        "split": args.train_split,
        "streaming": args.streaming,
        "num_examples": total,
        "num_classes": len(splits.label_names),
        "train_fraction": args.train_fraction,
        "subset_seed": args.subset_seed,
        "selected_examples": len(keys),
        "class_counts": {name: c for name, c in zip(splits.label_names, counts)},
        "subset_fingerprint": hasher.hexdigest(),
    }


def main(argv: list[str] | None = None) -> None:
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "describe":
        raise UserError("usage: python -m hf_vit.data describe --dataset_name NAME [--train_fraction F] [--streaming]")
    parser = HfArgumentParser(DataArguments)
    parser.error = lambda message: (_ for _ in ()).throw(UserError(message))
    (args,) = parser.parse_args_into_dataclasses(argv[1:])
    print(json.dumps(describe(args), indent=2))


if __name__ == "__main__":
    from .errors import run_cli

    run_cli(main)
