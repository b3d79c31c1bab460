"""Images per second per core of the train data pipeline, next to the usual per-sample path, measured in one run.

    python benchmarks/bench_data.py [--imagenet ../shared/datasets/imagenet-sample] [--cifar ../shared/datasets/cifar10]

One process, one thread (``torch.set_num_threads(1)``, no loader workers): the figure is what one loader worker core
delivers. The encoded images are held in memory; after a warm-up, ``--repeats`` rounds each run one timed pass per case
(interleaved, so a busy spell slows every case alike), and the best pass (the least disturbed) and the median are
reported.

* ``pipeline``: :class:`hf_vit.data.loader.DecodeCollate` with :func:`hf_vit.data.train_transform`, exactly as the trainer
  builds it (``ImageSpec`` from ``build_image_processor``), batch of 64, uint8 out; ``partial_jpeg_decoding`` in the
  JSON says whether the optional C extension (decode only what the crop needs) was built and used. Normalisation happens batched on the
  accelerator in training, so it is not part of this figure; ``pipeline_cpu_normalize`` adds it on the CPU for a
  machine without one.
* ``worker_with_decode_on_device``: what a loader worker still does per image with ``decode_on_device: true``
  (:class:`hf_vit.data.device_jpeg.JpegPlanCollate`: read the bytes, parse the header, draw the crop and flip) — the
  images per second one core can feed when the accelerator decodes (ImageNet-style cases only).
* ``reference``: the usual per-sample path: PIL decode -> torchvision ``RandomResizedCrop`` (or pad-and-crop for CIFAR)
  -> horizontal flip -> ``ToTensor`` -> ``Normalize`` in float, then ``default_collate`` into a batch.
* ``decode``: bare full-size JPEG decode to RGB (PIL), the floor the reference path cannot beat; ``decode_simplejpeg``
  the same straight through libjpeg-turbo, the floor of the pipeline whenever the crop needs the full-size image;
  ``decode_1_8`` at 1/8 scale (the most a reduced-size decode can save); ``reduced_size_decodes``: the fraction of ViT-B/16
  random-resized crops large enough (short side >= 448 px) for the pipeline to decode at a reduced size.

Rates are images per CPU second of this process (``time.process_time``), so that other work on a shared machine does
not lower them; ``wall_best`` is the same per wall-clock second.

The last line is JSON; ``pipeline_images_per_sec_per_core`` and ``reference_images_per_sec_per_core`` are the ImageNet
sample figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import datasets
import PIL.Image
import torch
from torch.utils.data import default_collate
from torchvision import transforms as T

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_vit.config import DataArguments  # noqa: E402
from hf_vit.data import ImageSpec, build_image_processor, normalize, train_transform  # noqa: E402
from hf_vit.data.loader import DecodeCollate  # noqa: E402
from hf_vit.data.transforms import RandomResizedCropDecode  # noqa: E402

SHARED = REPO.parent / "shared" / "datasets"
BATCH = 64


def load_examples(path: str, limit: int | None) -> tuple[list[dict], str, str]:
    """Encoded examples (image bytes undecoded) held in memory, so that only decoding and augmenting are timed."""
    ds = datasets.load_dataset(path, split="train")
    image_col = "image" if "image" in ds.column_names else "img"
    ds = ds.cast_column(image_col, datasets.Image(decode=False))
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(row) for row in ds], image_col, "label"


def one_pass(fn, examples: list[dict], epoch: int) -> tuple[float, float]:
    """Images per CPU second and per wall second of one pass of ``fn`` over all examples, in batches."""
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(0, len(examples), BATCH):
        fn(examples[i : i + BATCH], epoch)
    return len(examples) / (time.process_time() - cpu), len(examples) / (time.perf_counter() - wall)


def timed(fns: dict, examples: list[dict], repeats: int) -> dict:
    """One warm-up pass per case, then ``repeats`` rounds of one timed pass per case, interleaved so that a busy
    spell on a shared machine slows every case alike."""
    for fn in fns.values():
        one_pass(fn, examples[:BATCH], 0)
    rates = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            rates[name].append(one_pass(fn, examples, r + 1))
    return {name: {"best": round(max(c for c, _ in rs), 1), "median": round(statistics.median(c for c, _ in rs), 1),
                   "wall_best": round(max(w for _, w in rs), 1)} for name, rs in rates.items()}


def pipeline_fn(spec: ImageSpec, args: DataArguments, image_col: str, normalize_on_cpu: bool = False):
    collate = DecodeCollate(train_transform(spec, args), image_col, "label", 1000, seed=0, train=True)
    mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)

    def run(batch: list[dict], epoch: int):
        collate.epoch = epoch
        out = collate(batch)
        assert not out.bad_keys, out.bad_keys
        return normalize(out.pixel_values, mean, std) if normalize_on_cpu else out.pixel_values

    return run


def plan_fn(spec: ImageSpec, args: DataArguments, image_col: str):
    """The loader worker's share under ``decode_on_device``: read the bytes, draw the crop and flip; no decoding."""
    from hf_vit.data.device_jpeg import JpegPlanCollate

    collate = JpegPlanCollate(train_transform(spec, args), image_col, "label", 1000, seed=0)

    def run(batch: list[dict], epoch: int):
        collate.epoch = epoch
        out = collate(batch)
        # Every example arrives; the JPEGs an EXIF orientation turns (2 of 200 in the sample) are decoded by the worker.
        assert not out.bad_keys and len(out.labels) == len(batch), out.bad_keys
        return out

    return run


def reference_fn(spec: ImageSpec, image_col: str):
    """The usual torchvision (v1) per-sample path, in float."""
    if spec.crop_padding is None:
        crop = [T.RandomResizedCrop(spec.image_size)]
    else:
        crop = [T.Resize((spec.image_size, spec.image_size)), T.RandomCrop(spec.image_size, padding=spec.crop_padding)]
    transform = T.Compose([*crop, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(spec.mean, spec.std)])

    def run(batch: list[dict], epoch: int):
        samples = [(transform(PIL.Image.open(io.BytesIO(ex[image_col]["bytes"])).convert("RGB")), ex["label"])
                   for ex in batch]
        return default_collate(samples)

    return run


def simplejpeg_decode_fn(image_col: str):
    """Full-size decode straight through libjpeg-turbo, as the pipeline does for a crop that needs every pixel."""
    import simplejpeg

    def run(batch: list[dict], epoch: int):
        for ex in batch:
            simplejpeg.decode_jpeg(ex[image_col]["bytes"], "RGB")

    return run


def decode_fn(image_col: str, reduce: int = 1):
    """Decode to RGB at full size, or (``reduce`` 8) at 1/8 of it, the smallest a JPEG decoder can produce: what
    remains then is mostly entropy decoding, which no reduced-size decoding avoids."""
    def run(batch: list[dict], epoch: int):
        for ex in batch:
            img = PIL.Image.open(io.BytesIO(ex[image_col]["bytes"]))
            if reduce > 1:
                img.draft("RGB", (img.width // reduce, img.height // reduce))
            img.convert("RGB")

    return run


def reduced_decode_fraction(examples: list[dict], image_col: str, spec: ImageSpec, args: DataArguments) -> float:
    """Fraction of random-resized crops that the pipeline decodes at a reduced size (crop >= 2x the output)."""
    crop = RandomResizedCropDecode(spec.image_size, (args.random_resized_crop_scale, 1.0))
    torch.manual_seed(0)
    reduced = 0
    for ex in examples:
        img = PIL.Image.open(io.BytesIO(ex[image_col]["bytes"]))
        reduced += crop.reduction(img, T.RandomResizedCrop.get_params(img, crop.scale, crop.ratio)) > 1
    return reduced / len(examples)


def stage_breakdown(examples: list[dict], image_col: str, size: int) -> dict:
    """CPU milliseconds per image of the ImageNet-style pipeline's stages, each timed alone over all examples."""
    from torchvision.transforms import v2

    from hf_vit.data.decoding import decode_box, decode_reduced, has_partial_jpeg_decoder

    def per_image(fn, n: int) -> float:
        fn(0)
        start = time.process_time()
        for i in range(n):
            fn(i)
        return round((time.process_time() - start) / n * 1e3, 4)

    data = [ex[image_col]["bytes"] for ex in examples]
    decoded = [decode_reduced(PIL.Image.open(io.BytesIO(b)), 1) for b in data]
    torch.manual_seed(0)
    boxes = [T.RandomResizedCrop.get_params(hwc.permute(2, 0, 1), (0.08, 1.0), (3 / 4, 4 / 3)) for hwc in decoded]

    def crop(i):
        top, left, h, w = boxes[i]
        return decoded[i][top:top + h, left:left + w].contiguous().permute(2, 0, 1)

    crops = [crop(i) for i in range(len(data))]
    n = len(data)
    stages = {
        "open_header": per_image(lambda i: PIL.Image.open(io.BytesIO(data[i])), n),
        "decode": per_image(lambda i: decode_reduced(PIL.Image.open(io.BytesIO(data[i])), 1), n),
        "crop_box": per_image(lambda i: T.RandomResizedCrop.get_params(crops[i], (0.08, 1.0), (3 / 4, 4 / 3)), n),
        "crop_copy": per_image(crop, n),
        "resize": per_image(lambda i: v2.functional.resize(crops[i], [size, size], antialias=True), n),
        "torch_manual_seed": per_image(lambda i: torch.manual_seed(i), n),
        "cpu_generator_seed": per_image(lambda i: torch.default_generator.manual_seed(i), n),
    }
    if has_partial_jpeg_decoder():  # the same boxes, decoded only as far as each needs (crop copy included)
        stages["decode_box_only"] = per_image(
            lambda i: decode_box(PIL.Image.open(io.BytesIO(data[i])), 1, boxes[i]), n)
    return stages


def bench_dataset(name: str, path: str, cases: dict[str, ImageSpec], limit: int | None, repeats: int) -> dict:
    examples, image_col, _ = load_examples(path, limit)
    fns = {"decode": decode_fn(image_col), "decode_1_8": decode_fn(image_col, reduce=8)}
    if name.startswith("imagenet"):
        fns["decode_simplejpeg"] = simplejpeg_decode_fn(image_col)
    for case, spec in cases.items():
        args = DataArguments(crop_padding=spec.crop_padding)
        fns[f"{case}/pipeline"] = pipeline_fn(spec, args, image_col)
        fns[f"{case}/pipeline_cpu_normalize"] = pipeline_fn(spec, args, image_col, normalize_on_cpu=True)
        fns[f"{case}/reference"] = reference_fn(spec, image_col)
        if spec.crop_padding is None:
            fns[f"{case}/worker_with_decode_on_device"] = plan_fn(spec, args, image_col)
    rates = timed(fns, examples, repeats)
    results = {"examples": len(examples), **{k: rates[k] for k in ("decode", "decode_simplejpeg", "decode_1_8")
                                              if k in rates}}
    simple = f", libjpeg-turbo straight {results['decode_simplejpeg']['best']}" if "decode_simplejpeg" in results \
        else ""
    print(f"{name}: {len(examples)} images, bare decode {results['decode']['best']} img/s/core{simple} "
          f"(at 1/8 size {results['decode_1_8']['best']})", flush=True)
    for case in cases:
        row = {kind: rates[f"{case}/{kind}"] for kind in ("pipeline", "pipeline_cpu_normalize", "reference")}
        row["speedup"] = round(row["pipeline"]["best"] / row["reference"]["best"], 2)
        if f"{case}/worker_with_decode_on_device" in rates:
            row["worker_with_decode_on_device"] = rates[f"{case}/worker_with_decode_on_device"]
            print(f"{name} {case}: a loader worker with decode_on_device (bytes + crop plan, no decoding) "
                  f"{row['worker_with_decode_on_device']['best']} img/s/core", flush=True)
        if spec.crop_padding is None:
            row["reduced_size_decodes"] = round(
                reduced_decode_fraction(examples, image_col, spec, DataArguments()), 4)
            row["stages_ms_per_image"] = stage_breakdown(examples, image_col, spec.image_size)
            print(f"{name} {case} stages (CPU ms per image): {row['stages_ms_per_image']}", flush=True)
        results[case] = row
        print(f"{name} {case}: pipeline {row['pipeline']['best']} (with CPU normalize "
              f"{row['pipeline_cpu_normalize']['best']}), reference {row['reference']['best']} img/s/core, "
              f"{row['speedup']}x", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imagenet", default=str(SHARED / "imagenet-sample"))
    parser.add_argument("--cifar", default=str(SHARED / "cifar10"))
    parser.add_argument("--cifar_images", type=int, default=5000, help="CIFAR-10 images per pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per case")
    parser.add_argument("--skip_cifar", action="store_true")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    vit_b16 = ImageSpec.from_processor(build_image_processor(224, None))
    from hf_vit.data.decoding import has_partial_jpeg_decoder

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "partial_jpeg_decoding": has_partial_jpeg_decoder(),  # the optional C extension was built and is in use
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{platform.python_implementation()} {platform.python_version()}, torch {torch.__version__}, "
                   f"Pillow {PIL.__version__}",
        "imagenet_sample": bench_dataset("imagenet-sample", cli.imagenet, {"vit_b16_224": vit_b16}, None,
                                         cli.repeats),
    }
    if not cli.skip_cifar:
        report["cifar10"] = bench_dataset("cifar10", cli.cifar, {
            "32px_pad4": ImageSpec.from_processor(build_image_processor(32, 4), crop_padding=4),
            "224px_pad28": ImageSpec.from_processor(build_image_processor(224, 28), crop_padding=28),
        }, cli.cifar_images, cli.repeats)
    imagenet = report["imagenet_sample"]["vit_b16_224"]
    report["pipeline_images_per_sec_per_core"] = imagenet["pipeline"]["best"]
    report["reference_images_per_sec_per_core"] = imagenet["reference"]["best"]
    report["decode_images_per_sec_per_core"] = report["imagenet_sample"]["decode"]["best"]
    report["simplejpeg_decode_images_per_sec_per_core"] = report["imagenet_sample"]["decode_simplejpeg"]["best"]
    report["speedup"] = imagenet["speedup"]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
