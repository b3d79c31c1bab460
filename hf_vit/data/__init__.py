"""Data stage: from a Hub or local image-classification dataset to uint8 micro-batches on the device.

One module per job:

* :mod:`~hf_vit.data.sources` — open the dataset, find its columns, carve the validation split and the
  ``train_fraction`` subset by example key, settle the epoch length (:func:`load_splits`), and the ``describe``
  command (``python -m hf_vit.data describe``);
* :mod:`~hf_vit.data.keys` — the rules every path must agree on: example keys, split membership, the seeds of an
  epoch's order and of an example's augmentation;
* :mod:`~hf_vit.data.decoding` — bytes to pixels, decoding only the part of a JPEG the train crop needs;
* :mod:`~hf_vit.data.transforms` — preprocessing resolved from the model's image processor, train/eval transforms,
  normalisation, MixUp/CutMix;
* :mod:`~hf_vit.data.loader` — the exact sharding over processes x loader workers, and the decoding collate;
* :mod:`~hf_vit.data.device_data` and :mod:`~hf_vit.data.device_jpeg` — the on-device paths (``data_on_device``,
  ``decode_on_device``);
* :mod:`~hf_vit.data.factory` — :func:`build_train_data` / :func:`build_eval_data`: the one place that turns a run's
  data arguments into train and eval data behind one contract (:class:`TrainData`), whichever path serves them.

docs/architecture.md draws the path a batch takes in each mode; docs/data.md explains the design.
"""

from .batch import Batch, JpegPlanBatch
from .decoding import open_image, to_rgb
from .factory import EvalData, TrainData, build_eval_data, build_train_data, train_topology
from .keys import augmentation_seed, epoch_order, example_key, in_subset, in_validation
from .sources import DataSource, DataSplits, describe, load_splits, open_dataset
from .transforms import (ImageSpec, batch_mixer, build_image_processor, eval_transform, image_processor_for, normalize,
                         train_transform)

__all__ = [
    "Batch", "DataSource", "DataSplits", "EvalData", "ImageSpec", "JpegPlanBatch", "TrainData", "augmentation_seed",
    "batch_mixer", "build_eval_data", "build_image_processor", "build_train_data", "describe", "image_processor_for",
    "epoch_order", "eval_transform", "example_key", "in_subset", "in_validation", "load_splits", "normalize",
    "open_dataset", "open_image", "train_topology", "to_rgb", "train_transform",
]
