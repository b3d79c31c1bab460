"""Loader start-up per epoch, before (workers started anew each epoch) and after (workers that live across epochs):
the time from ``iter(loader)`` to the first batch and the whole epoch, on a small-fraction run with several workers.

    python benchmarks/bench_worker_startup.py [--dataset_name ../shared/datasets/cifar10] [--train_fraction 0.1]
        [--workers 4] [--epochs 5] [--batch 128]

The run's own pieces: ``load_splits``, ``TrainStream`` (the sharding rule), ``DecodeCollate`` with the CIFAR train
transform, ``build_loader``; only ``persistent`` differs. The report's 10% runs have ~100 epochs per 1,000 steps,
so what a fresh start costs per epoch is paid that often.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import datasets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_vit.config import DataArguments  # noqa: E402
from hf_vit.data import ImageSpec, load_splits, train_transform  # noqa: E402
from hf_vit.data.loader import DecodeCollate, TrainStream, build_loader  # noqa: E402
from hf_vit.data.sharding import Topology  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"


def epochs(splits, args, persistent: bool) -> list[tuple[float, float]]:
    data_args = DataArguments(crop_padding=4, augmentation="basic")
    spec = ImageSpec(32, (0.5,) * 3, (0.5,) * 3, 32, crop_padding=4)
    stream = TrainStream(splits.train, Topology(1, args.workers, args.batch), 0, seed=0,
                         num_examples=splits.num_train_examples)
    collate = DecodeCollate(train_transform(spec, data_args), splits.image_column, splits.label_column,
                            len(splits.label_names), seed=0, train=True)
    loader = build_loader(stream, collate, args.workers, pin_memory=False, persistent=persistent)
    times = []
    for epoch in range(args.epochs):
        stream.set_epoch(epoch)
        collate.epoch = epoch
        start = time.perf_counter()
        batches = iter(loader)
        next(batches)
        first = time.perf_counter() - start
        for _ in batches:
            pass
        times.append((first, time.perf_counter() - start))
    del loader
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_name", default=str(SHARED))
    parser.add_argument("--train_fraction", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    datasets.disable_progress_bars()
    splits = load_splits(DataArguments(dataset_name=args.dataset_name, train_fraction=args.train_fraction,
                                       train_val_split=0))
    print(f"{splits.num_train_examples} training images, {args.workers} workers, batch {args.batch}, "
          f"{args.epochs} epochs")
    for persistent in (False, True):
        times = epochs(splits, args, persistent)
        later = times[1:]  # the first epoch starts the workers either way
        print(f"{'persistent' if persistent else 'per epoch '} workers: first batch after "
              f"{times[0][0]:.3f} s in epoch 0, median {statistics.median(t[0] for t in later):.3f} s in epochs 1+; "
              f"epoch median {statistics.median(t[1] for t in later):.3f} s")


if __name__ == "__main__":
    main()
