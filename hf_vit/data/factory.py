"""One factory from a run's data arguments to its train and eval data, whichever path serves them.

The contract (:class:`TrainData`) is all the training loop knows of its data:

* ``num_micro_batches``: the micro-batches this rank runs per epoch (the same on every rank);
* ``layout``: what a saved position refers to (processes, loader workers, micro-batch size) — a checkpoint written
  mid-epoch resumes exactly only under the same layout;
* ``set_epoch(epoch, skip_micro_batches)``: restart the epoch's order and skip what it already consumed;
* ``iter()``: the epoch's remaining micro-batches, each a :class:`~hf_vit.data.batch.Batch` with its tensors on the
  device (the same fields on every path).

Three paths serve it: loader workers decoding per example (:class:`LoaderTrainData` over
:class:`~hf_vit.data.loader.ExampleStream` and :class:`~hf_vit.data.loader.DecodeCollate`), the same with JPEGs
decoded on the device (``decode_on_device``: :mod:`hf_vit.data.device_jpeg` finishes each batch), and the decoded
split kept on the device (``data_on_device``: :class:`~hf_vit.data.device_data.DeviceTrainData`). A new data mode is
a new class with this contract and a branch in :func:`build_train_data`.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import torch

from ..config import DataArguments
from .batch import Batch
from .device_data import DeviceTrainData
from .device_jpeg import DeviceJpegDecoder, JpegPlanCollate
from .loader import DecodeCollate, ExampleStream, TrainStream, build_loader
from .sharding import Topology
from .sources import DataSplits, local_data_files
from .transforms import ImageSpec, eval_transform, train_transform


class TrainData(Protocol):
    """The train split as one rank sees it (see the module docstring)."""

    num_micro_batches: int
    layout: dict

    def set_epoch(self, epoch: int, skip_micro_batches: int = 0) -> None: ...

    def __iter__(self) -> Iterator[Batch]: ...


class LoaderTrainData:
    """Train batches from loader workers: a :class:`TrainStream` (this rank's micro-batches by the sharding rule),
    decoded by a collate in the workers, and — with ``decode_on_device`` — finished on the device by ``finish``. The
    workers start once and live across epochs."""

    def __init__(self, stream: TrainStream, collate: DecodeCollate, num_workers: int, device: torch.device,
                 finish=None):
        self.stream, self.collate, self.device, self.finish = stream, collate, device, finish
        self.loader = build_loader(stream, collate, num_workers, pin_memory=device.type == "cuda", persistent=True)
        self.num_micro_batches = stream.num_micro_batches
        self.layout = {"num_processes": stream.topology.processes, "dataloader_num_workers": num_workers,
                       "per_device_train_batch_size": stream.topology.micro_batch}

    def set_epoch(self, epoch: int, skip_micro_batches: int = 0) -> None:
        self.stream.set_epoch(epoch, skip_micro_batches)
        self.collate.epoch = epoch  # the workers seed each example's augmentation from (seed, epoch, key)

    def __iter__(self) -> Iterator[Batch]:
        # Creating the iterator draws the workers' base seed from the global torch RNG; fork it so that a run resumed
        # mid-epoch (one extra draw) keeps the RNG stream dropout and MixUp see bit for bit.
        with torch.random.fork_rng(devices=[]):
            batches = iter(self.loader)
        for batch in batches:
            yield (self.finish(batch) if self.finish is not None else batch).to(self.device)


class EvalData:
    """The eval split once over, sharded over processes x workers without dropping anything, as device batches."""

    def __init__(self, stream: ExampleStream, collate: DecodeCollate, num_workers: int, device: torch.device):
        self.stream, self.device = stream, device
        self.loader = build_loader(stream, collate, num_workers, pin_memory=device.type == "cuda")

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            yield batch.to(self.device)


def train_topology(args: DataArguments, per_device_batch: int, processes: int, accumulation: int) -> Topology:
    """Who consumes the train split: the one description the data paths and the run plan share."""
    workers = 0 if args.data_on_device else args.dataloader_num_workers
    return Topology(processes, workers, per_device_batch, accumulation)


def stream_unit_rows(splits: DataSplits, args: DataArguments) -> list[int] | None:
    """Raw rows per unit (parquet row group, in the order ``IterableDataset.reshard`` splits the files) of a local
    parquet stream, from the footers alone; None when they cannot be known without reading the data."""
    if not args.streaming:
        return None
    files = local_data_files(splits.source or args, args.train_split)
    if not files or not all(f.endswith(".parquet") for f in files):
        return None
    import pyarrow.parquet as pq

    try:
        return [meta.row_group(g).num_rows for f in files for meta in [pq.ParquetFile(f).metadata]
                for g in range(meta.num_row_groups)]
    except OSError:
        return None


def build_train_data(splits: DataSplits, spec: ImageSpec, args: DataArguments, topology: Topology, seed: int,
                     state, unit_rows: list[int] | None = None) -> TrainData:
    """The train data of a run for ``topology``: ``state`` is the Accelerator (or PartialState) giving
    ``process_index`` and ``device``; ``unit_rows``: a stream's rows per unit as the run plan read them from the
    parquet footers (:func:`stream_unit_rows`), None when unknown."""
    rank, device = state.process_index, state.device
    if args.data_on_device:
        return DeviceTrainData(splits.train, splits.image_column, splits.label_column, len(splits.label_names), spec,
                               args, topology, rank, seed, device)
    stream = TrainStream(splits.train, topology, rank, seed, splits.num_train_examples,
                         sharding=args.stream_sharding, shuffle_buffer_size=args.shuffle_buffer_size,
                         unit_rows=unit_rows)
    transform = train_transform(spec, args)
    finish = None
    if args.decode_on_device:  # workers hand over JPEG bytes and crop plans; the device decodes them
        collate = JpegPlanCollate(transform, splits.image_column, splits.label_column, len(splits.label_names), seed)
        finish = DeviceJpegDecoder(transform, device)
    else:
        collate = DecodeCollate(transform, splits.image_column, splits.label_column, len(splits.label_names), seed,
                                train=True)
    return LoaderTrainData(stream, collate, topology.workers, device, finish)


def build_eval_data(splits: DataSplits, spec: ImageSpec, workers: int, per_device_batch: int, state,
                    split=None) -> EvalData | None:
    """The eval data of a run or of the eval command (None when there is no eval split), read by ``workers`` loader
    workers per process (``dataloader_num_workers``); ``state`` as for :func:`build_train_data`. ``split``: another
    split of ``splits``' dataset to score the same way (the test split, the first training images), instead of
    ``splits.eval``."""
    split = splits.eval if split is None else split
    if split is None:
        return None
    stream = ExampleStream(split, per_device_batch, state.process_index, state.num_processes, workers)
    # No augmentation in eval mode, so no seed.
    collate = DecodeCollate(eval_transform(spec), splits.image_column, splits.label_column, len(splits.label_names),
                            0, train=False)
    return EvalData(stream, collate, workers, state.device)
