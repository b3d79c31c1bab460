"""JPEG decoding on the accelerator for ImageNet-style training (``decode_on_device: true``).

On a GPU machine the loader cores can bound ViT-B/16 training on ImageNet: decoding and cropping for one GPU takes
several cores (docs/scaling.md counts them), more than many GPU nodes have to spare. With this option the workers no
longer decode plain JPEGs: they read the bytes, draw the example's random-resized-crop box and flip from its header
size (the same draws, from the same per-example seed, as the CPU path), and hand over the bytes with that plan. On the
device a whole micro-batch is decoded in one ``torchvision.io.decode_jpeg(list, device=...)`` call (nvJPEG on CUDA),
then each image is cropped, resized with antialiasing, flipped and — with ``augmentation: enhanced`` — augmented with
the rest of the train transform, its RNG re-seeded from the same per-example seed. Everything that is not a plain RGB
or grey JPEG (PNG, CMYK, a file without its end-of-image marker, a JPEG whose EXIF orientation turns it) still takes
the CPU path in the worker, as do all eval images: :func:`~hf_vit.data.decoding.open_image` turns an oriented JPEG
upright (decoding it whole, as ``datasets`` and ``pipeline()`` do), so only upright JPEGs reach the device's decoder.

On a CPU "device" (no accelerator) the decoder is libjpeg-turbo, the crop and resize are the same kernels, and the RNG
draws are the same: the batches are bit-identical to the CPU path (tested). On CUDA, nvJPEG's IDCT and chroma
upsampling differ from libjpeg-turbo's by a level or two per pixel; nothing else changes. A JPEG that the device's
decoder refuses is decoded on the CPU instead (libjpeg-turbo takes variants nvJPEG may not); one that neither decodes
is dropped from the batch and reported in ``bad_keys``, as the loader does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torchvision import transforms as tv_transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from .batch import Batch, JpegPlanBatch
from .decoding import encoded_jpeg, is_turned, open_as_stored
from .keys import augmentation_seed, example_key
from .loader import DecodeCollate
from .transforms import RandomResizedCropDecode


def split_train_transform(transform: v2.Compose) -> tuple[RandomResizedCropDecode, v2.RandomHorizontalFlip, list]:
    """The ImageNet-style train transform (``data.train_transform``) as (crop, flip, the ops after them)."""
    crop, flip, *rest = transform.transforms
    if not isinstance(crop, RandomResizedCropDecode) or not isinstance(flip, v2.RandomHorizontalFlip):
        raise ValueError("decode_on_device needs the random-resized-crop train transform")
    return crop, flip, rest


def _draws(source, crop: RandomResizedCropDecode, flip: v2.RandomHorizontalFlip) -> tuple[tuple, bool]:
    """The draws the CPU path makes for an example, in its order: the crop box (from ``source``'s size), then the
    flip (v2's ``rand(1) < p``). The worker makes them; the device replays them to reach the RNG state after them."""
    box = tv_transforms.RandomResizedCrop.get_params(source, crop.scale, crop.ratio)
    return box, bool(torch.rand(1) < flip.p)


class JpegPlan(NamedTuple):
    """What a worker hands over for one plain JPEG: its bytes and the draws the CPU path would have made."""

    data: torch.Tensor  # the file's bytes, uint8 1-D
    box: tuple[int, int, int, int]  # top, left, height, width in full-size pixels
    flip: bool
    seed: int  # the example's augmentation seed, replayed on the device for the ops after the flip
    label: int
    key: str


class JpegPlanCollate(DecodeCollate):
    """Loader ``collate_fn`` for ``decode_on_device``: plain JPEGs leave the worker undecoded, with their plan
    (a :class:`~hf_vit.data.batch.JpegPlanBatch`: boxes are top/left/height/width in full-size pixels, seeds the
    per-example augmentation seeds)."""

    def __init__(self, transform, image_column: str, label_column: str, num_classes: int, seed: int):
        super().__init__(transform, image_column, label_column, num_classes, seed, train=True)
        self.crop, self.flip, _ = split_train_transform(transform)

    def plan(self, example: dict) -> JpegPlan | None:
        """The :class:`JpegPlan` of a plain RGB/grey JPEG that ends with its end-of-image marker (a
        truncated file goes to the CPU path, where PIL refuses it); None for anything else."""
        image = example.get(self.image_column)
        if not isinstance(image, dict) or (image.get("bytes") is None and not image.get("path")):
            return None
        try:
            label = int(example[self.label_column])
            img = open_as_stored(image)
            if img.format != "JPEG" or is_turned(img):
                return None  # the CPU path decodes it (a turned JPEG: whole, then turned upright)
        except Exception:  # noqa: BLE001 - a missing label or an unreadable header: the CPU path reports it
            return None
        if not 0 <= label < self.num_classes:
            return None  # DecodeCollate reports it
        data = encoded_jpeg(img)
        if data is None or not data.endswith(b"\xff\xd9") or not img.width or not img.height:
            return None
        key = example_key(image)
        seed = augmentation_seed(key, self.seed, self.epoch)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            box, flip = _draws(img, self.crop, self.flip)
        return JpegPlan(torch.frombuffer(bytearray(data), dtype=torch.uint8), box, flip, seed, label, key)

    def __call__(self, examples: list[dict]) -> JpegPlanBatch:
        plans, rest = [], []
        for example in examples:
            planned = self.plan(example)
            if planned is None:
                rest.append(example)
            else:
                plans.append(planned)
        batch = super().__call__(rest)
        return JpegPlanBatch(
            batch.pixel_values, torch.cat([batch.labels, torch.tensor([p.label for p in plans], dtype=torch.long)]),
            batch.keys + [p.key for p in plans], batch.bad_keys, batch.num_examples + len(plans),
            jpeg_data=[p.data for p in plans],
            jpeg_boxes=torch.tensor([p.box for p in plans], dtype=torch.long).view(-1, 4),
            jpeg_flips=torch.tensor([p.flip for p in plans], dtype=torch.bool),
            jpeg_seeds=torch.tensor([p.seed for p in plans], dtype=torch.long))


class DeviceJpegDecoder:
    """Finishes a :class:`JpegPlanCollate` batch on ``device``: decodes its JPEGs there and applies their plans.

    ``__call__(batch)`` returns the batch with ``pixel_values`` (B, 3, S, S) uint8 on the device — the worker-decoded
    images first, then the JPEGs, matching ``labels`` — and the JPEGs that could not be decoded moved to
    ``bad_keys`` (their labels and keys dropped).
    """

    def __init__(self, transform, device: torch.device):
        self.crop, self.flip, rest = split_train_transform(transform)
        self.after_flip = v2.Compose(rest) if rest else None
        self.device = device

    def _decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        try:  # one call for the whole micro-batch: nvJPEG's batched decode on CUDA
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # some image is bad, or one the device's decoder does not take: one at a time
            return [self._decode_one(d) for d in data]

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        """One JPEG on the device, else on the CPU (libjpeg-turbo takes JPEG variants nvJPEG may refuse), else None:
        only an image that neither decoder can decode counts as bad."""
        for device in dict.fromkeys([self.device, torch.device("cpu")]):
            try:
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=device).to(self.device)
            except RuntimeError:
                continue
        return None

    def _finish(self, image: torch.Tensor, box: list[int], flip: bool, seed: int) -> torch.Tensor:
        top, left, h, w = box
        out = self.crop.resize(image[:, top:top + h, left:left + w].permute(1, 2, 0))
        if flip:
            out = out.flip(-1)
        if self.after_flip is not None:
            with torch.random.fork_rng(devices=[]):
                # Replay the worker's draws (box, flip) so that the ops after them continue the same RNG stream.
                torch.default_generator.manual_seed(seed)
                _draws(image, self.crop, self.flip)
                out = self.after_flip(out)
        return out

    def __call__(self, batch: JpegPlanBatch) -> Batch:
        pixels = batch.pixel_values.to(self.device, non_blocking=True)
        n_cpu, done = len(pixels), Batch(pixels, batch.labels, batch.keys, batch.bad_keys, batch.num_examples)
        if not batch.jpeg_data:
            return done
        decoded = self._decode(batch.jpeg_data)
        keep, images, bad = list(range(n_cpu)), [], list(batch.bad_keys)
        for i, image in enumerate(decoded):
            box = batch.jpeg_boxes[i].tolist()
            if image is None or box[0] + box[2] > image.shape[1] or box[1] + box[3] > image.shape[2]:
                bad.append(f"{batch.keys[n_cpu + i]} (the device's JPEG decoder could not decode it)")
                continue
            images.append(self._finish(image, box, bool(batch.jpeg_flips[i]), int(batch.jpeg_seeds[i])))
            keep.append(n_cpu + i)
        if images:
            pixels = torch.cat([pixels, torch.stack(images)])
        return Batch(pixels, batch.labels[keep], [batch.keys[k] for k in keep], bad, batch.num_examples)