"""Data stage: load a Hub or local image-classification dataset, shard it exactly over processes x workers, decode and
augment it into uint8 batches.

Design (why it is built this way):

* **One sharding rule for map-style and streaming data.** An epoch is a fixed order of examples (a seeded permutation,
  or the seeded shuffled stream) cut into *blocks* of ``per_device_batch`` examples. With N processes x W workers there
  are C = N*W consumers; block b goes to consumer ``b % C``, and only complete *rounds* of C full blocks are used. So
  every example of an epoch reaches exactly one consumer, every rank runs the same number of micro-batches (W per
  round: no DDP hang), and the last incomplete round (< C x per_device_batch examples) is dropped — that is the
  last-batch policy (evaluation, ``drop_incomplete_round=False``, keeps it). Streaming, every consumer walks the whole
  (undecoded) stream and keeps its blocks: C reads of the bytes, no decoding of what it does not keep.
* **Or, streaming at scale, whole shards per consumer** (``stream_sharding: shards``). Each epoch the stream's shards
  (parquet files) are dealt out by a seeded permutation, every consumer reads only its own, shuffled, and all run the
  rounds that the smallest share holds (``floor(S / C)`` of S equal shards): each record is read once, every rank still
  runs the same number of micro-batches, no example comes twice, and the examples past the smallest share sit that
  epoch out (a different set each epoch). Batches then depend on the process count.
* **Accelerate does not shard the loader.** The train loader never goes through ``accelerator.prepare``, and the
  Accelerator is built with ``dispatch_batches=False``. For an iterable dataset accelerate would otherwise dispatch
  (one process reads every batch and sends slices to the others — a bottleneck, by default), split a
  ``datasets.IterableDataset`` by files (``dataset.shard``: unequal example counts per rank, so a hang at the end of an
  epoch), or wrap an already-sharded stream in ``IterableDatasetShard`` and shard it a second time (accelerate#3547,
  the same trap as ``split_dataset_by_node`` + ``prepare``). Here the rule above is the only sharding.
* **A known epoch length.** The LR schedule needs the examples per epoch: the split's length (map-style), else
  ``train_samples``, else an exact count over the example keys of a local dataset (no decoding), else the Hub metadata
  (an estimate when ``train_val_split``/``train_fraction`` filter the stream). ``ExampleStream(num_examples=...)`` then
  runs exactly the planned micro-batches per rank: a longer stream stops there, a shorter one ends with empty batches.
* **Exact resume by count.** The order depends only on (seed, epoch), augmentation randomness only on (seed, epoch,
  example key), so restarting an epoch and skipping the first k micro-batches — without decoding them — reproduces
  the uninterrupted run bit for bit.
* **Keys, not positions, decide membership.** The ``train_val_split`` carve-out and the ``train_fraction`` subset hash
  each example's key (:func:`example_key`: its path, or a hash of its bytes) with a seed, so the same examples are
  chosen in map-style and streaming mode, with any number of processes or workers, on any machine.
* **uint8 until the device.** Workers decode and crop to the final size and hand over uint8 tensors (4x less to copy
  than float32), in channels-last memory so that batching is a plain copy; conversion and normalisation happen batched
  on the device (:func:`normalize`).
* **Decode only what the crop needs.** The random-resized crop box is chosen from the header size, then the JPEG is
  decoded at the largest DCT scale (1/2, 1/4, 1/8) that still leaves the crop at least as large as the output — full
  quality for the pixels used — and only over the crop's rows and columns, stopping at its last row (the optional C
  extension ``_jpeg_crop`` over libjpeg-turbo; without it the whole image through libjpeg-turbo straight, simplejpeg;
  PIL for anything neither takes). The same pixels on every path; the crop is resized with torch's vectorised
  antialiased kernel. On a GPU, ``decode_on_device`` moves decoding there altogether (``device_jpeg.py``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import signal
import sys
from dataclasses import dataclass, field

import datasets
import numpy as np
import PIL.Image
import simplejpeg
import torch
from torchvision import transforms as tv_transforms
from torchvision.transforms import v2
from transformers import DeiTImageProcessor, ViTImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .config import DataArguments
from .errors import UserError

try:  # optional C extension: partial JPEG decoding (see _decode_box); absent where libjpeg's headers were missing
    from . import _jpeg_crop
except ImportError:
    _jpeg_crop = None

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
    """Stable identity of an example, the same on every machine and in every mode.

    The image's path when it has one, reduced to its last two components (``n01440764/n01440764_10026.JPEG``,
    ``cat/1.jpg``): unique within a dataset, yet independent of where the files lie. Without a path, a hash of the
    image bytes.
    """
    path = image.get("path")
    if path:
        parts = path.replace("\\", "/").rstrip("/").split("/")
        return "/".join(parts[-2:])
    return hashlib.blake2b(image.get("bytes") or b"", digest_size=12).hexdigest()


def _unit_hash(key: str, seed: int, salt: str) -> float:
    """Deterministic number in [0, 1) from (key, seed): the same on every machine, process and worker."""
    digest = hashlib.blake2b(f"{salt}:{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def in_validation(key: str, fraction: float, seed: int) -> bool:
    """Whether an example belongs to the ``train_val_split`` carve-out (decided by its key alone)."""
    return _unit_hash(key, seed, "val") < fraction


def in_subset(key: str, fraction: float, subset_seed: int) -> bool:
    """Whether an example belongs to the ``train_fraction`` subset (decided by its key alone)."""
    return fraction >= 1 or _unit_hash(key, subset_seed, "subset") < fraction


def is_local_path(name: str) -> bool:
    return os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1


def _load(args: DataArguments):
    name = os.path.expanduser(args.dataset_name)
    if is_local_path(name) and not os.path.exists(name):
        raise UserError(f"dataset path {args.dataset_name!r} does not exist; pass an existing folder or a Hub id")
    try:
        if os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_dict.json")):
            loaded = datasets.load_from_disk(name)  # written by save_to_disk
            if args.streaming:
                loaded = datasets.IterableDatasetDict(
                    {k: v.to_iterable_dataset(num_shards=max(1, min(64, len(v) // 1000))) for k, v in loaded.items()})
            return loaded
        return datasets.load_dataset(name, args.dataset_config_name, streaming=args.streaming)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as err:
        where = "local folder" if os.path.exists(name) else "Hub (unreachable offline: pass a local path instead)"
        raise UserError(
            f"cannot load dataset {args.dataset_name!r} from the {where}: {str(err).splitlines()[0]}") from None


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


def _local_data_files(args: DataArguments, split: str) -> list[str]:
    name = os.path.expanduser(args.dataset_name)
    if not os.path.isdir(name) or os.path.isfile(os.path.join(name, "dataset_dict.json")):
        return []
    try:
        builder = datasets.load_dataset_builder(name, args.dataset_config_name)
        return [str(f) for f in (builder.config.data_files or {}).get(split, [])]
    except Exception:  # noqa: BLE001 - only an optimisation; callers fall back to a pass over the data
        return []


def _count_rows(args: DataArguments, split: str, ds) -> tuple[int | None, str]:
    """Examples in a split: its length, else the dataset metadata, else the parquet footers of local files."""
    if isinstance(ds, datasets.Dataset):
        return len(ds), "dataset length"
    info = ds.info.splits.get(split) if ds.info and ds.info.splits else None
    if info is not None and info.num_examples:
        return info.num_examples, "dataset metadata"
    files = _local_data_files(args, split)
    if files and all(f.endswith(".parquet") for f in files):
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in files), "parquet metadata"
    return None, "unknown"


def split_examples(args: DataArguments, split: str, ds, image_col: str, label_col: str):
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
    files = _local_data_files(args, split)
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


def _open_train(args: DataArguments):
    """Load the dataset and find the train split's image and label columns (errors list what exists)."""
    loaded = _load(args)
    splits = list(loaded.keys())
    if args.train_split not in loaded:
        raise UserError(f"split {args.train_split!r} not found; the dataset has splits {splits} (set --train_split)")
    if args.eval_split and args.eval_split not in loaded:
        raise UserError(f"split {args.eval_split!r} not found; the dataset has splits {splits} (set --eval_split)")
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


def _prepare(ds, image_col: str, label_col: str):
    """Images left undecoded (the loader workers decode them), only the two columns kept."""
    ds = ds.cast_column(image_col, datasets.Image(decode=False))
    keep = [image_col, label_col]
    return ds.remove_columns([c for c in ds.column_names if c not in keep]) if ds.column_names else ds


def load_splits(args: DataArguments, seed: int) -> DataSplits:
    """Load train/eval splits with images left undecoded (decoding happens in the loader workers).

    Also settles the number of training examples per epoch (for the LR schedule) and says where it came from: the
    length of a map-style split; when streaming, ``train_samples`` if given, else an exact count over the keys of a
    local dataset, else the Hub metadata (an estimate once ``train_val_split``/``train_fraction`` filter the stream).
    """
    loaded, raw_train, image_col, label_col, label_names = _open_train(args)

    def prepare(ds):
        return _prepare(ds, image_col, label_col)

    train = prepare(raw_train)
    streaming = not isinstance(train, datasets.Dataset)
    n_total, source = _count_rows(args, args.train_split, raw_train)
    eval_ds, n_eval, val_frac = None, None, 0.0
    if args.eval_split:
        eval_ds = prepare(loaded[args.eval_split])
        n_eval, _ = _count_rows(args, args.eval_split, loaded[args.eval_split])
    elif args.train_val_split > 0:
        # Carve validation by a hash of each example's key: the same slice in map-style and streaming mode, on any
        # number of processes, every run with the same seed.
        if args.train_val_split >= 1 and n_total is None:
            raise UserError("train_val_split given as a count needs the size of the train split, which is unknown "
                            "here; give it as a fraction (e.g. 0.02) or pass an eval_split")
        val_frac = args.train_val_split if args.train_val_split < 1 else args.train_val_split / n_total
        eval_ds = train.filter(lambda img: in_validation(example_key(img), val_frac, seed), input_columns=[image_col])
        train = train.filter(lambda img: not in_validation(example_key(img), val_frac, seed),
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
    elif os.path.isdir(os.path.expanduser(args.dataset_name)) and (val_frac or args.train_fraction < 1
                                                                   or n_total is None):
        # A local stream: count exactly (keys only, nothing decoded), so the epoch length is not an estimate.
        n_train = n_val = 0
        for key, _ in split_examples(args, args.train_split, prepare(raw_train), image_col, label_col):
            if val_frac and in_validation(key, val_frac, seed):
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
        train = train.select(range(min(len(train), args.max_train_samples))) if not streaming \
            else train.take(args.max_train_samples)
        n_train = min(n_train, args.max_train_samples) if n_train is not None else args.max_train_samples
        source += ", capped by max_train_samples"
    if eval_ds is not None and args.max_eval_samples is not None:
        eval_ds = eval_ds.select(range(min(len(eval_ds), args.max_eval_samples))) \
            if isinstance(eval_ds, datasets.Dataset) else eval_ds.take(args.max_eval_samples)
        n_eval = min(n_eval, args.max_eval_samples) if n_eval is not None else args.max_eval_samples
    if n_train is None:
        raise UserError(
            f"the number of training examples per epoch of {args.dataset_name!r} is unknown when streaming; "
            "set --train_samples (used for the LR schedule)"
        )
    info = {"num_examples_in_split": n_total, "validation_fraction": val_frac}
    return DataSplits(train, eval_ds, label_names, image_col, label_col, n_train, source, n_eval, info)


def select_subset(ds, image_col: str, fraction: float, subset_seed: int):
    """Keep the examples whose key hashes below ``fraction`` — the same examples in any mode, process count or
    machine (the seed's ~2/3 ImageNet subset is ``train_fraction 0.69``)."""
    return ds.filter(lambda img: in_subset(example_key(img), fraction, subset_seed), input_columns=[image_col])


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
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = PIL.Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit grey (PIL opens 16-bit PNGs as I;16 or I): map 0..65535 onto 0..255 rather than clipping at 255.
        grey = np.asarray(img, dtype=np.float32) / 257.0
        img = PIL.Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def to_uint8_tensor(img: PIL.Image.Image) -> torch.Tensor:
    """PIL image -> uint8 (C, H, W) tensor, a channels-last view of one copy of the pixels (C = 1 for grey, else 3).

    Grey stays one channel here so that geometric ops touch a third of the bytes; :func:`as_rgb_tensor` expands it.
    """
    if img.mode not in ("RGB", "L"):
        img = to_rgb(img)
    # bytearray(tobytes()) is faster than numpy's copy through __array_interface__ (pil_to_tensor), same pixels.
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return pixels.view(img.height, img.width, len(img.getbands())).permute(2, 0, 1)


def as_rgb_tensor(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.expand(3, -1, -1) if pixels.shape[0] == 1 else pixels


class ToRGBTensor(torch.nn.Module):
    """PIL image of any mode -> uint8 (3, H, W) tensor (channels-last memory, one copy)."""

    def forward(self, img: PIL.Image.Image) -> torch.Tensor:
        return as_rgb_tensor(to_uint8_tensor(img))


def _encoded_jpeg(img: PIL.Image.Image) -> bytes | None:
    """The undecoded bytes of a JPEG that PIL has opened but not loaded, when libjpeg-turbo can hand its pixels to
    us directly (RGB or grey: a CMYK/YCCK JPEG needs PIL's conversion); else None."""
    if img.format != "JPEG" or img.mode not in ("RGB", "L") or not getattr(img, "tile", None):  # tile: not loaded yet
        return None
    if isinstance(img.fp, io.BytesIO):
        return img.fp.getvalue()  # the bytes object it was made from: no copy
    img.fp.seek(0)  # an image file PIL holds open until it loads the pixels
    return img.fp.read()


def _decode_reduced(img: PIL.Image.Image, reduce: int) -> torch.Tensor:
    """Decode ``img`` (opened, not loaded) at 1/``reduce`` of its size -> uint8 (H, W, C) tensor, C = 1 for grey.

    A JPEG goes straight through libjpeg-turbo (simplejpeg): the same pixels as PIL (the same library and settings),
    without PIL's chunked Python decode loop and its copy out of PIL's image memory — 0.98 against 1.08 ms per
    ImageNet photo here. Anything else, and any JPEG libjpeg-turbo reports a problem with (simplejpeg is strict about
    its warnings), goes through PIL, which decides what is corrupt exactly as for every other image.
    """
    data = _encoded_jpeg(img)
    if data is not None:
        width, height = img.size
        try:
            array = simplejpeg.decode_jpeg(data, "GRAY" if img.mode == "L" else "RGB", min_factor=reduce,
                                           min_height=-(-height // reduce), min_width=-(-width // reduce))
            return torch.from_numpy(array)
        except ValueError:
            pass
    if reduce > 1:
        img.draft(img.mode if img.mode in ("RGB", "L") else "RGB", (img.width // reduce, img.height // reduce))
    return to_uint8_tensor(img).permute(1, 2, 0)


def _scale_box(box: tuple[int, int, int, int], full: tuple[int, int], decoded: tuple[int, int]):
    """A (top, left, height, width) box of the full-size image mapped into the grid of the image decoded at
    ``decoded`` (height, width)."""
    if decoded == full:
        return box
    top, left, h, w = box
    sy, sx = decoded[0] / full[0], decoded[1] / full[1]
    top, left = min(decoded[0] - 1, round(top * sy)), min(decoded[1] - 1, round(left * sx))
    return top, left, min(decoded[0] - top, max(1, round(h * sy))), min(decoded[1] - left, max(1, round(w * sx)))


def _decode_box(img: PIL.Image.Image, reduce: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The ``box`` (top, left, height, width, in full-size pixels) of ``img`` (opened, not loaded), decoded at
    1/``reduce`` of its size -> uint8 (h, w, C) tensor, C = 1 for grey.

    With the optional C extension (``hf_vit/_jpeg_crop.c``, built where libjpeg-turbo's headers are present), a JPEG
    is decoded only as far as the box needs: rows above it and columns beside it skip the IDCT and colour conversion,
    rows below it are not decoded at all — 0.75 against 0.96 ms per ImageNet photo for ViT-B/16's crops here, and the
    same pixels as decoding everything and cropping. Because it stops at the box, it would miss a truncated file's
    missing end: a JPEG that does not end with the end-of-image marker is decoded in full instead (and refused,
    as before, when it is truncated). Everything the extension does not take, or reports a problem with (it treats
    libjpeg's warnings as errors), is decoded in full by :func:`_decode_reduced` and cropped.
    """
    full = (img.height, img.width)
    data = _encoded_jpeg(img) if _jpeg_crop is not None else None
    if data is not None and data.endswith(b"\xff\xd9"):
        reduced = (-(-full[0] // reduce), -(-full[1] // reduce))  # libjpeg's size at 1/reduce
        top, left, h, w = _scale_box(box, full, reduced)
        try:
            pixels = _jpeg_crop.decode_crop(data, reduce, top, left, h, w, img.mode == "L")
            return torch.frombuffer(pixels, dtype=torch.uint8).view(h, w, -1)
        except ValueError:
            pass
    hwc = _decode_reduced(img, reduce)
    top, left, h, w = _scale_box(box, full, tuple(hwc.shape[:2]))
    return hwc[top:top + h, left:left + w]


class RandomResizedCropDecode(torch.nn.Module):
    """torchvision's random-resized crop, fused with decoding: PIL image (not yet decoded) -> uint8 (3, S, S) tensor.

    The crop box is drawn by ``RandomResizedCrop.get_params`` from the header size, before any pixel is decoded, so a
    JPEG is decoded at the largest DCT reduction (1/2, 1/4, 1/8) that still leaves the crop at least ``size`` pixels
    on its short side — the output never comes from fewer pixels than without the reduction; libjpeg-turbo's other
    factors (7/8, 3/4, ...) have no SIMD IDCTs and decode slower than full size (measured) — and only as much of it
    as the crop needs (:func:`_decode_box`). The crop is then resized with antialiasing on the uint8 tensor (torch's
    vectorised kernel, the same as ``v2.RandomResizedCrop`` on tensors), and a grey image is expanded to RGB only at
    the output size.
    """

    def __init__(self, size: int, scale: tuple[float, float], ratio=(3 / 4, 4 / 3)):
        super().__init__()
        self.size, self.scale, self.ratio = size, scale, ratio

    def reduction(self, img: PIL.Image.Image, box: tuple[int, int, int, int]) -> int:
        """The DCT reduction (1, 2, 4 or 8) at which ``box`` of ``img`` is decoded."""
        reduce = 1
        while img.format == "JPEG" and reduce < 8 and min(box[2:]) >= 2 * reduce * self.size:
            reduce *= 2
        return reduce

    def resize(self, crop: torch.Tensor) -> torch.Tensor:
        """A decoded crop, uint8 (h, w, C) -> (C, S, S), antialiased. Copied channels-last contiguous first: torch's
        fast uint8 kernel needs that layout (on a strided view it takes a slow path, 2x the time, and returns a layout
        that makes batching transpose); a crop that already is one is not copied."""
        return v2.functional.resize(crop.contiguous().permute(2, 0, 1), [self.size, self.size],
                                    interpolation=v2.InterpolationMode.BILINEAR, antialias=True)

    def forward(self, img: PIL.Image.Image) -> torch.Tensor:
        box = tv_transforms.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        return as_rgb_tensor(self.resize(_decode_box(img, self.reduction(img, box), box)))


class ReflectPadRandomCrop(v2.RandomCrop):
    """``v2.RandomCrop(size, padding, padding_mode="reflect")``: the same parameters and the same output, computed
    from slices of the unpadded uint8 image (mirrored at the borders) instead of padding the whole image and cropping
    it — torch's reflect padding has no uint8 kernel, so v2 would pad a float copy."""

    def __init__(self, size: int, padding: int):
        super().__init__(size, padding=padding, padding_mode="reflect")

    def transform(self, inpt, params: dict):
        if not isinstance(inpt, torch.Tensor) or inpt.ndim != 3:
            return super().transform(inpt, params)
        pad_left, pad_top = params["padding"][0], params["padding"][1]
        hwc = inpt.permute(1, 2, 0)  # channels-last memory: slices along H and W copy whole pixels
        hwc = _reflect_window(hwc, 0, params["top"] - pad_top, params["height"])
        hwc = _reflect_window(hwc, 1, params["left"] - pad_left, params["width"])
        return hwc.permute(2, 0, 1)


def _reflect_window(x: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
    """``x`` reflect-padded along ``dim`` (the edge is not repeated), then sliced to [start, start + length): the part
    before 0 and the part past the end are mirrored slices."""
    n, stop = x.shape[dim], start + length
    parts = []
    if start < 0:
        parts.append(x.narrow(dim, 1, -start).flip(dim))
    parts.append(x.narrow(dim, max(start, 0), min(stop, n) - max(start, 0)))
    if stop > n:
        parts.append(x.narrow(dim, 2 * n - 1 - stop, stop - n).flip(dim))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def train_transform(spec: ImageSpec, args: DataArguments):
    """Per-example train transform: PIL image -> uint8 (3, S, S) tensor.

    ImageNet-style (``crop_padding`` unset): random-resized crop (area ``random_resized_crop_scale``..1) + flip.
    CIFAR-style: resize to S (e.g. 32 -> 224), reflect-pad by ``crop_padding`` and crop S at random + flip.
    ``augmentation: enhanced`` adds TrivialAugmentWide and RandomErasing (filled with the mean, i.e. zero after
    normalisation).
    """
    if spec.crop_padding is not None:
        ops = [ToRGBTensor(), v2.Resize((spec.image_size, spec.image_size), antialias=True),
               ReflectPadRandomCrop(spec.image_size, spec.crop_padding)]
    else:
        ops = [RandomResizedCropDecode(spec.image_size, (args.random_resized_crop_scale, 1.0))]
    ops.append(v2.RandomHorizontalFlip())
    if args.augmentation == "enhanced":
        ops.append(v2.TrivialAugmentWide())
        if args.random_erasing_prob > 0:
            ops.append(v2.RandomErasing(p=args.random_erasing_prob, value=[round(255 * m) for m in spec.mean]))
    transform = v2.Compose(ops)
    transform.image_size = spec.image_size
    return transform


def eval_transform(spec: ImageSpec):
    """Deterministic eval transform matching the saved image processor: resize (bilinear, on the PIL image as the
    processor does), center crop, uint8 (3, S, S) tensor."""
    transform = v2.Compose([
        v2.Lambda(to_rgb, PIL.Image.Image),
        v2.Resize((spec.eval_resize, spec.eval_resize), interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        v2.CenterCrop(spec.image_size),
        ToRGBTensor(),
    ])
    transform.image_size = spec.image_size
    return transform


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

    Runs in the loader workers. Returns ``pixel_values`` uint8 (B, 3, S, S) (channels-last memory: each image is
    copied once, with no transposition), ``labels`` (B,), ``keys`` of the B examples, ``bad_keys`` and
    ``num_examples`` (real examples in, good or bad). Bad examples (undecodable or truncated bytes, zero-size images,
    labels outside the class range, a missing image) are dropped from the batch and reported as ``"key (error)"`` in
    ``bad_keys``; B may be 0. ``None`` entries are padding from :class:`ExampleStream` and are dropped silently.
    Augmentation randomness is seeded from (seed, epoch, example key), so it does not depend on which worker or
    process sees the example.
    """

    def __init__(self, transform, image_column: str, label_column: str, num_classes: int, seed: int, train: bool):
        self.transform, self.image_column, self.label_column = transform, image_column, label_column
        self.num_classes, self.seed, self.train, self.epoch = num_classes, seed, train, 0
        # Shape of an empty batch (every example bad): the model still runs on it, so keep the image size.
        self.image_size = getattr(transform, "image_size", 1)

    def decode(self, example: dict) -> tuple[torch.Tensor, int, str]:
        image = example[self.image_column]
        if not isinstance(image, dict) or (image.get("bytes") is None and not image.get("path")):
            raise ValueError("no image")
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
                # Seed only the CPU generator: torch.manual_seed would also queue CUDA/XPU seeding with a captured
                # stack trace, which costs more than decoding a small JPEG.
                torch.default_generator.manual_seed(_augmentation_seed(key, self.seed, self.epoch))
                pixels = self.transform(img)
        else:
            pixels = self.transform(img)
        if pixels.shape[-2:] != (self.image_size, self.image_size) and self.image_size != 1:
            raise ValueError(f"transform produced {tuple(pixels.shape)}")
        return pixels, label, key

    def __call__(self, examples: list[dict | None]) -> dict:
        pixels, labels, keys, bad = [], [], [], []
        real = [e for e in examples if e is not None]
        for example in real:
            try:
                p, y, k = self.decode(example)
            except Exception as err:  # noqa: BLE001 - any failure on one example skips it; the loop counts them
                image = example.get(self.image_column)
                key = example_key(image) if isinstance(image, dict) and (image.get("path") or image.get("bytes")) \
                    else "?"
                bad.append(f"{key} ({type(err).__name__}: {str(err)[:200]})")
                continue
            pixels.append(p)
            labels.append(y)
            keys.append(k)
        if pixels:
            # Stack as (B, H, W, 3): a plain copy of each channels-last image; then view it as (B, 3, H, W).
            batch = torch.stack([p.permute(1, 2, 0) for p in pixels]).permute(0, 3, 1, 2)
        else:
            batch = torch.zeros(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        return {
            "pixel_values": batch,
            "labels": torch.tensor(labels, dtype=torch.long),
            "keys": keys,
            "bad_keys": bad,
            "num_examples": len(real),
        }


def _augmentation_seed(key: str, seed: int, epoch: int) -> int:
    return int(_unit_hash(key, seed * 100_003 + epoch, "aug") * 2**62)


# ------------------------------------------------------------------------------------------------------- the sharder
class ExampleStream(torch.utils.data.IterableDataset):
    """Yields this consumer's examples of one epoch, block by block (see the module docstring for the rule).

    ``set_epoch(epoch, skip_micro_batches)`` is called before each ``iter(loader)``; the loader's workers are
    recreated per epoch (no persistent workers), so they see it. ``num_examples`` is the epoch length the loop plans
    with (``micro_batches_per_epoch(num_examples)`` per rank): a stream longer than that stops there, and one that
    turns out shorter (an estimated length) is padded with ``None`` entries, which :class:`DecodeCollate` turns into
    empty batches — so every rank still runs exactly the planned number of micro-batches.
    """

    def __init__(self, ds, block_size: int, rank: int, world: int, num_workers: int, seed: int,
                 shuffle: bool = True, drop_incomplete_round: bool = True, shuffle_buffer_size: int = 10_000,
                 num_examples: int | None = None, sharding: str = "exact"):
        self.ds, self.block, self.rank, self.world = ds, block_size, rank, world
        self.num_workers, self.seed, self.shuffle = max(1, num_workers), seed, shuffle
        self.drop_incomplete = drop_incomplete_round
        self.buffer = shuffle_buffer_size
        self.num_examples = num_examples
        self.epoch, self.skip = 0, 0
        # Whole shards per consumer applies to streams only: map-style consumers read only their own blocks anyway.
        self.by_shards = sharding == "shards" and not isinstance(ds, datasets.Dataset)
        if self.by_shards and ds.num_shards < self.consumers:
            raise UserError(
                f"stream_sharding shards: the stream has {ds.num_shards} shard(s), fewer than the {self.consumers} "
                f"consumers ({world} processes x {self.num_workers} loader workers); lower dataloader_num_workers "
                "or use stream_sharding exact"
            )

    @property
    def consumers(self) -> int:
        return self.world * self.num_workers

    def set_epoch(self, epoch: int, skip_micro_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_micro_batches

    def micro_batches_per_epoch(self, num_examples: int) -> int:
        """Micro-batches each rank runs per epoch of ``num_examples``: W blocks per complete round of C blocks."""
        return self._rounds(num_examples) * self.num_workers

    def _rounds(self, num_examples: int) -> int:
        if self.by_shards:
            # What every consumer's share holds when the S shards are about equal: floor(S / C) of them.
            shards = self.ds.num_shards
            return num_examples * (shards // self.consumers) // shards // self.block
        return num_examples // (self.consumers * self.block)

    def _role(self) -> tuple[int, int]:
        """(consumer index, rounds to skip) of this worker; on resume roles rotate so the loader's round-robin over
        workers continues exactly where the interrupted epoch stopped."""
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        shift, done = self.skip % self.num_workers, self.skip // self.num_workers
        role = (worker + shift) % self.num_workers
        return self.rank * self.num_workers + role, done + (1 if role < shift else 0)

    def _planned_rounds(self) -> int | None:
        if self.num_examples is None or not self.drop_incomplete:
            return None
        return self._rounds(self.num_examples)

    def __iter__(self):
        consumer, skip_rounds = self._role()
        planned = self._planned_rounds()
        rows = self._iter_map_style if isinstance(self.ds, datasets.Dataset) else \
            self._iter_own_shards if self.by_shards else self._iter_stream
        done = skip_rounds
        for r, block in rows(consumer, skip_rounds, planned):
            done = r + 1
            yield from block
        if planned is not None and done < planned:
            if self.by_shards:  # this consumer's shards hold less than the average share the plan assumes
                logger.warning("epoch %d: consumer %d's shards ran out after %d of %d planned blocks of %d examples "
                               "(they hold fewer than the average share); its remaining micro-batches are empty",
                               self.epoch, consumer, done, planned, self.block)
            elif consumer == 0:
                logger.warning("epoch %d: the data ran out after %d of %d planned rounds of %d examples; the rest of "
                               "the epoch is empty batches (pass the exact --train_samples)", self.epoch, done,
                               planned, self.consumers * self.block)
            for _ in range(done, planned):
                yield from [None] * self.block

    def _iter_map_style(self, consumer: int, skip_rounds: int, planned: int | None):
        """(round, this consumer's examples in it) from a seeded permutation of the whole split."""
        n = len(self.ds)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        else:
            order = torch.arange(n)
        round_size = self.consumers * self.block
        rounds = n // round_size if self.drop_incomplete else math.ceil(n / round_size)
        for r in range(skip_rounds, rounds if planned is None else min(rounds, planned)):
            start = r * round_size + consumer * self.block
            indices = order[start : min(start + self.block, n)].tolist()
            if indices:
                rows = self.ds[indices]  # one columnar read per block
                yield r, [{k: v[i] for k, v in rows.items()} for i in range(len(indices))]

    def _iter_stream(self, consumer: int, skip_rounds: int, planned: int | None):
        """(round, this consumer's examples in it) from the seeded shuffled stream, walked whole by every consumer."""
        ds = self.ds
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.buffer)
            ds.set_epoch(self.epoch)
        # `.iter` walks the whole stream in this worker (datasets does not split it by worker): each consumer picks
        # its blocks by position, which is what makes the rule exact for any number of shards, workers and processes.
        # Nothing is decoded here; a block is only held until its round turns out complete.
        held = None
        for b, rows in enumerate(self._exact_blocks(ds)):
            r, owner = divmod(b, self.consumers)
            if planned is not None and r >= planned:
                break
            if owner == consumer:
                held = rows
            full = len(next(iter(rows.values()))) == self.block
            if (owner == self.consumers - 1 and full) or not self.drop_incomplete:
                # The round is complete (or completeness does not matter): release this consumer's block.
                if held is not None and r >= skip_rounds:
                    yield r, [{k: v[i] for k, v in held.items()} for i in range(len(next(iter(held.values()))))]
                held = None
        # A block still held here belongs to an incomplete last round: dropped (the last-batch policy).

    def _iter_own_shards(self, consumer: int, skip_rounds: int, planned: int | None):
        """(round, block) from this consumer's own shards only (``stream_sharding: shards``): a seeded permutation of
        the shards per epoch, dealt round-robin over the consumers, each share shuffled with the buffer."""
        shards = self.ds.num_shards
        order = torch.randperm(shards, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)) \
            if self.shuffle else torch.arange(shards)
        mine = [self.ds.shard(num_shards=shards, index=int(i)) for i in order[consumer::self.consumers]]
        ds = mine[0] if len(mine) == 1 else datasets.concatenate_datasets(mine)
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.buffer)
            ds.set_epoch(self.epoch)
        for r, rows in enumerate(self._exact_blocks(ds)):
            size = len(next(iter(rows.values())))
            if (planned is not None and r >= planned) or (size < self.block and self.drop_incomplete):
                break
            if r >= skip_rounds:
                yield r, [{k: v[i] for k, v in rows.items()} for i in range(size)]

    def _exact_blocks(self, ds):
        """Consecutive blocks of exactly ``block`` rows (the last one may be short), whatever batches datasets
        yields."""
        pending: dict[str, list] | None = None
        for rows in ds.iter(batch_size=self.block):
            if pending is None:
                pending = {k: list(v) for k, v in rows.items()}
            else:
                for k, v in rows.items():
                    pending[k].extend(v)
            while len(next(iter(pending.values()))) >= self.block:
                yield {k: v[: self.block] for k, v in pending.items()}
                pending = {k: v[self.block :] for k, v in pending.items()}
        if pending and len(next(iter(pending.values()))):
            yield pending


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """Loader workers ignore SIGTERM/SIGINT. torchrun passes a SIGTERM on to each rank's whole process group, and Slurm
    signals every process of a job step: a worker killed by it would crash its rank mid-step, before the trainer
    (which handles the signal: finish the step, checkpoint, exit) could save. Workers still end with their loader."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loader(stream: ExampleStream, collate: DecodeCollate, num_workers: int, pin_memory: bool):
    return torch.utils.data.DataLoader(
        stream, batch_size=stream.block, collate_fn=collate, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if num_workers else None,
        worker_init_fn=_leave_stop_signals_to_the_trainer if num_workers else None,
    )


# -------------------------------------------------------------------------------------------------------- describe
def describe(args: DataArguments) -> dict:
    """JSON-able summary of the training split and of its ``train_fraction`` subset, without decoding an image.

    ``subset_fingerprint`` is a SHA-256 over the sorted keys of the selected examples: two users whose fingerprints
    match train on the same examples (before the ``train_val_split`` carve-out, which then depends on ``seed``).
    """
    _, raw_train, image_col, label_col, label_names = _open_train(args)
    counts = [0] * len(label_names)
    selected, total, bad_labels = [], 0, 0
    for key, label in split_examples(args, args.train_split, _prepare(raw_train, image_col, label_col), image_col,
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
        "dataset_name": args.dataset_name,
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
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "describe":
        raise UserError("usage: python -m hf_vit.data describe --dataset_name NAME [--train_fraction F] [--streaming]")
    parser = HfArgumentParser(DataArguments)
    parser.error = lambda message: (_ for _ in ()).throw(UserError(message))
    (args,) = parser.parse_args_into_dataclasses(argv[1:])
    if not 0 < args.train_fraction <= 1:
        raise UserError(f"train_fraction must be in (0, 1] (got {args.train_fraction})")
    print(json.dumps(describe(args), indent=2))


if __name__ == "__main__":
    from .errors import run_cli

    run_cli(main)
