"""Device-resident training data: decode a map-style train split once into a uint8 tensor on the accelerator and serve
augmented micro-batches from it, with no loader workers and no per-example Python in the loop.

For datasets that fit in memory (CIFAR-10 is 150 MB as uint8) the per-example path — a worker decodes a JPEG and runs
the transform for every image of every epoch — is pure overhead: on a GPU it starves the model, on a 2-core CPU the
workers take cores from the model. Here (``data_on_device: true``):

* **Decode once.** Every training image is decoded (by ``DecodeCollate``, so the bad-data rules are the loader's) into
  ``images``, a (N, 3, h, w) uint8 tensor on ``accelerator.device``, at its own size when all images share one (CIFAR:
  32x32), else resized to the model's ``image_size``. Unusable examples keep their slot (so positions match the
  dataset) but never reach a batch; each batch reports the ones it skipped in ``bad_keys``, as the loader does.
* **The sharding rule of every path** (:mod:`hf_vit.data.sharding`) with one consumer per process: the same seeded
  epoch order, the same positions per micro-batch and rank, fewer than one global batch left out per epoch.
  Exactly-once coverage, equal step counts per rank and skip-by-count resume carry over unchanged.
* **Batched augmentation on the device**, the per-example transform's pipeline in the same order: resize to
  ``image_size`` when the stored size differs (CIFAR 32 -> 224 for ViT-B/16), reflect-pad by ``crop_padding`` and crop
  at a random offset per example, flip half of the examples; with ``augmentation: enhanced``, TrivialAugmentWide and
  RandomErasing from torchvision v2 per chunk of ``ENHANCED_CHUNK`` examples (v2 draws one set of parameters per call:
  each example's augmentation has the per-example distribution; examples in a chunk share it).
* **Randomness from (seed, epoch, position).** Crop offsets and flips are drawn for every position of the epoch order
  from a generator seeded by (seed, epoch); chunk augmentations from (seed, epoch, position of the chunk). So the
  augmentation of a position does not depend on the process count, and a resumed epoch reproduces the interrupted one
  bit for bit.

Only pad-and-crop (CIFAR-style) training is supported: the random-resized crop of ImageNet-style training needs the
full-resolution image, which is what does not fit in memory. Evaluation stays on the loader path.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import datasets
import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..config import DataArguments, check_train_data_path
from ..errors import UserError
from .batch import Batch
from .decoding import open_image, to_rgb
from .keys import epoch_generator, epoch_order, example_key, position_seed
from .loader import DecodeCollate
from .sharding import Topology, map_positions, worker_micro_batches
from .transforms import ImageSpec, random_erasing

logger = logging.getLogger(__name__)

# Examples that share one draw of TrivialAugmentWide / RandomErasing parameters (see the module docstring).
ENHANCED_CHUNK = 32
# Refuse to hold more than this fraction of the free memory of the device (or of RAM, on CPU).
MAX_MEMORY_FRACTION = 0.5
_DECODE_CHUNK = 1024


def _to_uint8_tensor(img) -> torch.Tensor:
    """PIL image of any mode -> uint8 (3, H, W) tensor, no resampling."""
    return torch.from_numpy(np.array(to_rgb(img), dtype=np.uint8, copy=True)).permute(2, 0, 1)


def _decode_jpeg_fast(image: dict) -> torch.Tensor | None:
    """A colour JPEG's pixels through torchvision's decoder (libjpeg-turbo without PIL's Python header parsing: faster
    on small images, bit-identical to PIL), turned upright by its EXIF orientation as ``datasets`` does (a lossless
    transpose: the same pixels as ``PIL.ImageOps.exif_transpose``); None for anything else, which then takes the
    loader's path — also a JPEG with XMP metadata, whose orientation PIL may read from the XMP, which torchvision does
    not."""
    data = image.get("bytes")
    if not data or data[:2] != b"\xff\xd8" or b"http://ns.adobe.com/xap/1.0/" in data:
        return None
    try:
        pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED,
                             apply_exif_orientation=True)
    except RuntimeError:
        return None  # corrupt or truncated: DecodeCollate classifies and reports it
    # Grayscale and CMYK JPEGs go through PIL so that their conversion to RGB matches the loader's exactly.
    return pixels if pixels.shape[0] == 3 and pixels.shape[1] and pixels.shape[2] else None


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def decode_split(ds: datasets.Dataset, image_column: str, label_column: str, num_classes: int,
                 image_size: int, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list, dict]:
    """Decode every example of ``ds`` once, on the CPU, in threads (the decoders release the GIL).

    Returns ``(images, labels, keys, bad)``: ``images`` a (N, 3, h, w) uint8 tensor — at the images' own size when
    they all share one, else resized to ``image_size`` — ``labels`` (N,) int64, ``keys`` the example keys, and ``bad``
    ``{position: reason}`` for the examples ``DecodeCollate`` rejects (their image slot stays zero, their label 0).
    """
    collate = DecodeCollate(_to_uint8_tensor, image_column, label_column, num_classes, seed=0, train=False)
    n = len(ds)

    def decode_chunk(start: int) -> list[tuple]:
        """(pixels, label, key, None) per good example, (None, 0, key, reason) per unusable one."""
        rows = ds[start : min(start + _DECODE_CHUNK, n)]
        out = []
        for image, label in zip(rows[image_column], rows[label_column]):
            usable = isinstance(image, dict) and isinstance(label, int) and 0 <= label < num_classes
            pixels = _decode_jpeg_fast(image) if usable else None
            if pixels is not None:
                out.append((pixels, int(label), example_key(image), None))
                continue
            # Everything else through the loader's own collate: identical decoding and bad-data rules.
            batch = collate([{image_column: image, label_column: label}])
            if batch.bad_keys:
                out.append((None, 0, example_key(image) if isinstance(image, dict) else "?", batch.bad_keys[0]))
            else:
                out.append((batch.pixel_values[0], int(batch.labels[0]), batch.keys[0], None))
        return out

    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        decoded = [item for chunk in pool.map(decode_chunk, range(0, n, _DECODE_CHUNK)) for item in chunk]
    sizes = {tuple(item[0].shape[1:]) for item in decoded if item[0] is not None}
    height, width = sizes.pop() if len(sizes) == 1 else (image_size, image_size)
    images = torch.zeros(n, 3, height, width, dtype=torch.uint8)
    labels = torch.zeros(n, dtype=torch.long)
    keys, bad = [], {}
    for i, (pixels, label, key, reason) in enumerate(decoded):
        keys.append(key)
        if pixels is None:
            bad[i] = reason
            continue
        if tuple(pixels.shape[1:]) != (height, width):
            pixels = TF.resize(pixels, [height, width], antialias=True)
        images[i] = pixels
        labels[i] = label
    return images, labels, keys, bad


class DeviceTrainData:
    """The train split on the device, iterated as this rank's micro-batches of one epoch: the
    :class:`hf_vit.data.factory.TrainData` contract (``num_micro_batches``, ``layout``, ``set_epoch(epoch,
    skip_micro_batches)`` before each ``iter()``, :class:`~hf_vit.data.batch.Batch` items)."""

    def __init__(self, ds, image_column: str, label_column: str, num_classes: int, spec: ImageSpec,
                 args: DataArguments, topology: Topology, rank: int, seed: int,
                 device: torch.device | str = "cpu", decode_threads: int | None = None):
        check_train_data_path(streaming=not isinstance(ds, datasets.Dataset), crop_padding=spec.crop_padding,
                              data_on_device=True, decode_on_device=False)
        self.device = torch.device(device)
        self.topology, self.rank, self.seed = topology, rank, seed
        self.size, self.padding = spec.image_size, spec.crop_padding
        self.epoch, self.skip = 0, 0
        self.num_micro_batches = topology.micro_batches(len(ds))
        # One consumer per process: it shards like a loader without workers.
        self.layout = {"num_processes": topology.processes, "dataloader_num_workers": 0,
                       "per_device_train_batch_size": topology.micro_batch}
        self._check_fits(ds, image_column, spec.image_size)
        images, labels, self.keys, self.bad = decode_split(ds, image_column, label_column, num_classes,
                                                           spec.image_size, decode_threads)
        if self.bad:
            logger.warning("data_on_device: %d of %d training images are unusable and will be skipped every epoch, "
                           "e.g. %s", len(self.bad), len(ds), list(self.bad.values())[:3])
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.valid = None
        if self.bad:
            self.valid = torch.ones(len(ds), dtype=torch.bool)
            self.valid[list(self.bad)] = False
        self.enhanced = None
        if args.augmentation == "enhanced":
            erasing = [random_erasing(spec, args.random_erasing_prob)] if args.random_erasing_prob > 0 else []
            self.enhanced = v2.Compose([v2.TrivialAugmentWide(), *erasing])
        logger.info("data_on_device: %d train images decoded into a %s uint8 tensor on %s (%.0f MB)", len(ds),
                    tuple(self.images.shape), self.device, self.images.numel() / 2**20)

    def _check_fits(self, ds, image_column: str, image_size: int) -> None:
        """Refuse early (before decoding everything) when the decoded split clearly cannot fit."""
        first = ds[0][image_column]
        try:
            with open_image(first) as img:
                w, h = img.size
        except (OSError, ValueError, TypeError):
            w = h = image_size
        need = len(ds) * 3 * max(h * w, 1)
        free = _free_bytes(self.device)
        if need > MAX_MEMORY_FRACTION * free:
            raise UserError(
                f"data_on_device: the decoded train split needs about {need / 2**30:.1f} GiB, more than "
                f"{MAX_MEMORY_FRACTION:.0%} of the {free / 2**30:.1f} GiB free on {self.device}; it is meant for "
                "datasets that fit in memory (CIFAR-10: 0.15 GiB) — drop --data_on_device"
            )

    # ---------------------------------------------------------------------------------------- the TrainData contract
    def set_epoch(self, epoch: int, skip_micro_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_micro_batches

    def epoch_order(self) -> torch.Tensor:
        """The epoch's permutation of dataset positions — ``ExampleStream``'s, from (seed, epoch)."""
        return epoch_order(len(self.images), self.seed, self.epoch)

    def epoch_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop offsets (N, 2) and flip flags (N,) for every position of the epoch order, from (seed, epoch)."""
        g = epoch_generator(self.seed, self.epoch, stream=1)
        offsets = torch.randint(0, 2 * self.padding + 1, (len(self.images), 2), generator=g)
        flips = torch.rand(len(self.images), generator=g) < 0.5
        return offsets, flips

    def __iter__(self):
        order = self.epoch_order()
        offsets, flips = (t.to(self.device) for t in self.epoch_params())
        order_device = order.to(self.device)
        for i in worker_micro_batches(self.num_micro_batches, self.skip, 0, 1):
            positions = map_positions(i, self.rank, self.topology)
            start = positions.start
            indices, index_device = order[positions], order_device[positions]
            pos_offsets, pos_flips, bad_keys = offsets[positions], flips[positions], []
            if self.valid is not None and not bool(self.valid[indices].all()):
                # Drop the unusable examples from the batch and report them, as DecodeCollate does.
                keep = self.valid[indices]
                bad_keys = [self.bad[i] for i in indices[~keep].tolist()]
                keep_device = keep.to(self.device)
                indices, index_device = indices[keep], index_device[keep_device]
                pos_offsets, pos_flips = pos_offsets[keep_device], pos_flips[keep_device]
            pixels = self.augment(self.images[index_device], pos_offsets, pos_flips, start)
            yield Batch(pixels, self.labels[index_device], self.keys_of(indices), bad_keys, self.topology.micro_batch)

    # ------------------------------------------------------------------------------------------- augmentation
    def augment(self, images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, start: int) -> torch.Tensor:
        """uint8 (B, 3, h, w) -> uint8 (B, 3, S, S): resize to S if needed, reflect-pad, crop at ``offsets``
        (B, 2: top, left in the padded image), mirror where ``flips``; then the enhanced ops when configured."""
        size, pad = self.size, self.padding
        if images.shape[-2:] != (size, size):
            images = TF.resize(images, [size, size], antialias=True)
        if pad:
            images = TF.pad(images, [pad], padding_mode="reflect")
        b = images.shape[0]
        span = torch.arange(size, device=images.device)
        rows = offsets[:, :1] + span  # (B, S)
        cols = offsets[:, 1:] + torch.where(flips[:, None], size - 1 - span, span)  # a flip is a reversed column read
        width = images.shape[-1]
        images = images.gather(2, rows[:, None, :, None].expand(b, 3, size, width))
        images = images.gather(3, cols[:, None, None, :].expand(b, 3, size, size))
        if self.enhanced is not None and b:
            with torch.random.fork_rng(devices=[]):
                # v2 draws its parameters from the global CPU generator; seed it by (seed, epoch, position).
                torch.manual_seed(position_seed(self.seed, self.epoch, start))
                images = torch.cat([self.enhanced(chunk) for chunk in images.split(ENHANCED_CHUNK)])
        return images

    def keys_of(self, indices: torch.Tensor) -> list[str]:
        """Example keys (``data.example_key``) of dataset positions."""
        return [self.keys[i] for i in indices.tolist()]

