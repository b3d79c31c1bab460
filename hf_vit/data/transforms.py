"""Transforms: the preprocessing resolved from the model's image processor (:class:`ImageSpec`), the per-example train
and eval transforms (PIL image -> uint8 tensor), normalisation on the device, and batch-level MixUp/CutMix.

Workers hand over uint8 tensors (4x less to copy than float32) in channels-last memory so that batching is a plain
copy; conversion and normalisation happen batched on the device (:func:`normalize`). The train crop of ImageNet-style
training is fused with decoding (:class:`RandomResizedCropDecode`): the crop box is drawn from the header size and only
the part of the JPEG it covers is decoded.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import PIL.Image
import torch
from torchvision import transforms as tv_transforms
from torchvision.transforms import v2
from transformers import DeiTImageProcessor, ViTImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..config import DataArguments
from .decoding import ToRGBTensor, as_rgb_tensor, decode_box, to_rgb

logger = logging.getLogger(__name__)

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


def image_processor_for(image_size: int, crop_padding: int | None, checkpoint: str | None = None):
    """The image processor a run saves with its model: sizes from the model's ``image_size``; mean and std from the
    checkpoint's own processor when fine-tuning (the backbone expects them), else ImageNet's."""
    mean = std = None
    if checkpoint:
        try:
            from transformers import AutoImageProcessor

            source = AutoImageProcessor.from_pretrained(checkpoint)
            mean, std = source.image_mean, source.image_std
        except (OSError, ValueError):
            logger.info("No image processor in %s; using ImageNet mean/std", checkpoint)
    return build_image_processor(image_size, crop_padding, mean, std)


class RandomResizedCropDecode(torch.nn.Module):
    """torchvision's random-resized crop, fused with decoding: PIL image (not yet decoded) -> uint8 (3, S, S) tensor.

    The crop box is drawn by ``RandomResizedCrop.get_params`` from the header size, before any pixel is decoded, so a
    JPEG is decoded at the largest DCT reduction (1/2, 1/4, 1/8) that still leaves the crop at least ``size`` pixels
    on its short side — the output never comes from fewer pixels than without the reduction; libjpeg-turbo's other
    factors (7/8, 3/4, ...) have no SIMD IDCTs and decode slower than full size (measured) — and only as much of it
    as the crop needs (:func:`~hf_vit.data.decoding.decode_box`). The crop is then resized with antialiasing on the
    uint8 tensor (torch's vectorised kernel, the same as ``v2.RandomResizedCrop`` on tensors), and a grey image is
    expanded to RGB only at the output size.
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
        return as_rgb_tensor(self.resize(decode_box(img, self.reduction(img, box), box)))


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
        hwc = reflect_window(hwc, 0, params["top"] - pad_top, params["height"])
        hwc = reflect_window(hwc, 1, params["left"] - pad_left, params["width"])
        return hwc.permute(2, 0, 1)


def reflect_window(x: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
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
            ops.append(random_erasing(spec, args.random_erasing_prob))
    transform = v2.Compose(ops)
    transform.image_size = spec.image_size
    return transform


def random_erasing(spec: ImageSpec, p: float) -> v2.RandomErasing:
    """RandomErasing on uint8 images, filled with the mean colour (zero after normalisation)."""
    return v2.RandomErasing(p=p, value=[round(255 * m) for m in spec.mean])


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

