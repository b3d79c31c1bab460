"""``make demo``: train the CPU quick recipe on CIFAR-10 and print the final eval accuracy.

Data, in order: ``--dataset_name`` (default: the Hub's ``uoft-cs/cifar10``); if that cannot be reached, a local copy
at ``../shared/datasets/cifar10``; if there is none, a small generated 10-class dataset of oriented stripes, so the
whole pipeline still runs offline. The demo says plainly which of these it trained on.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

from .errors import run_cli

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "cifar10_vit_tiny_cpu.yaml"
LOCAL_COPIES = [REPO.parent / "shared" / "datasets" / "cifar10"]


def _reachable(name: str) -> bool:
    import datasets

    try:
        datasets.load_dataset_builder(name)
        return True
    except Exception:  # offline, unknown id, or a broken path: the caller falls back and says so
        return False


def synthetic_stripes(path: Path, per_class: int = 600, size: int = 32, seed: int = 0) -> Path:
    """10 classes of 32-px images: stripes at 10 orientations, random phase, frequency, colours and noise."""
    import datasets
    import PIL.Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images, labels = [], []
    for label in range(10):
        angle = math.pi * label / 10
        for _ in range(per_class):
            freq = rng.uniform(0.25, 0.6)
            wave = np.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)) + rng.uniform(0, 2 * math.pi))
            fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            img = np.where(wave[..., None] > 0, fg, bg) + rng.normal(0, 20, (size, size, 3))
            images.append(PIL.Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)))
            labels.append(label)
    names = [f"stripes_{round(180 * k / 10)}deg" for k in range(10)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"img": images, "label": labels}, features=features).shuffle(seed=seed)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", default="uoft-cs/cifar10")
    parser.add_argument("--output_dir", default="outputs/demo")
    args, extra = parser.parse_known_args(argv)

    dataset, what = args.dataset_name, f"{args.dataset_name}"
    if not os.path.exists(dataset) and not _reachable(dataset):
        local = next((p for p in LOCAL_COPIES if p.is_dir()), None)
        if local is not None:
            dataset, what = str(local), f"the local CIFAR-10 copy at {local} ({args.dataset_name} is unreachable)"
        else:
            dataset = str(synthetic_stripes(Path(args.output_dir + "_synthetic_data")))
            what = (f"a GENERATED 10-class stripes dataset at {dataset} — {args.dataset_name} is unreachable and "
                    "no local copy exists, so this accuracy says nothing about CIFAR-10")
    print(f"demo: training recipes/{RECIPE.name} on {what}", flush=True)

    from .config import parse_config
    from .trainer import train

    cfg = parse_config(["--config", str(RECIPE), "--dataset_name", dataset, "--output_dir", args.output_dir,
                        "--overwrite_output_dir", "true", *extra])
    results = train(cfg)
    if results.get("preempted"):
        print(f"demo: stopped by a signal at step {results['global_step']}; the checkpoint is in {args.output_dir}",
              flush=True)
        return
    print(f"demo: final eval accuracy {results.get('eval_accuracy', float('nan')):.4f} on "
          f"{results.get('eval_samples')} held-out images of {what}; outputs in {args.output_dir}", flush=True)


if __name__ == "__main__":
    run_cli(main)
    sys.exit(0)
