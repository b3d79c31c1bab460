"""One factory from a run's data arguments to its train and eval data, whichever path serves them.

The contract (:class:`TrainData`) is all the training loop knows of its data:

* ``num_micro_batches``: the micro-batches this rank runs per epoch (the same on every rank);
* ``layout``: what a saved position refers to (processes, loader workers, micro-batch size) — a checkpoint written
  mid-epoch resumes exactly only under the same layout;
* ``set_epoch(epoch, skip_micro_batches)``: restart the epoch's order and skip what it already consumed;
* ``iter()``: the epoch's remaining micro-batches, ready for the device — ``pixel_values`` uint8 (B, 3, S, S) and
  ``labels`` (B,) on the device, ``bad_keys`` (the examples dropped as unusable, ``"key (reason)"``) and
  ``num_examples`` (examples in, good or bad). B may be 0.

Three paths serve it: loader workers decoding per example (:class:`LoaderTrainData` over
:class:`~hf_vit.data.loader.ExampleStream` and :class:`~hf_vit.data.loader.DecodeCollate`), the same with JPEGs
decoded on the device (``decode_on_device``: :mod:`hf_vit.data.device_jpeg` finishes each batch), and the decoded
split kept on the device (``data_on_device``: :class:`~hf_vit.data.device_data.DeviceTrainData`). A new data mode is
a new class with this contract and a branch in :func:`build_train_data`.
"""

from __future__ import annotations

import logging
from typing import Iterator, Protocol

import torch

from ..config import DataArguments
from .device_data import DeviceTrainData
from .device_jpeg import DeviceJpegDecoder, JpegPlanCollate
from .loader import DecodeCollate, ExampleStream, build_loader
from .sources import DataSplits
from .transforms import ImageSpec, eval_transform, train_transform

logger = logging.getLogger(__name__)

# Processes up to which streaming's read-everything sharding keeps up with ViT-B/16 on H200-class GPUs (computed in
# docs/scaling.md, "Streaming: read amplification").
STREAMING_PROCESSES_THAT_KEEP_UP = 4


class TrainData(Protocol):
    """The train split as one rank sees it (see the module docstring)."""

    num_micro_batches: int
    layout: dict

    def set_epoch(self, epoch: int, skip_micro_batches: int = 0) -> None: ...

    def __iter__(self) -> Iterator[dict]: ...


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch with its tensors (``pixel_values``, ``labels``) on ``device``; a pinned copy runs async."""
    return {**batch, "pixel_values": batch["pixel_values"].to(device, non_blocking=True),
            "labels": batch["labels"].to(device, non_blocking=True)}


class LoaderTrainData:
    """Train batches from loader workers: an :class:`ExampleStream` sharded over processes x workers, decoded by a
    collate in the workers, and — with ``decode_on_device`` — finished on the device by ``finish``."""

    def __init__(self, stream: ExampleStream, collate: DecodeCollate, num_workers: int, device: torch.device,
                 num_examples: int, finish=None):
        self.stream, self.collate, self.device, self.finish = stream, collate, device, finish
        self.loader = build_loader(stream, collate, num_workers, pin_memory=device.type == "cuda")
        self.num_micro_batches = stream.micro_batches_per_epoch(num_examples)
        self.layout = {"num_processes": stream.world, "dataloader_num_workers": num_workers,
                       "per_device_train_batch_size": stream.block}

    def set_epoch(self, epoch: int, skip_micro_batches: int = 0) -> None:
        self.stream.set_epoch(epoch, skip_micro_batches)
        self.collate.epoch = epoch  # the workers seed each example's augmentation from (seed, epoch, key)

    def __iter__(self) -> Iterator[dict]:
        # Creating the iterator draws the workers' base seed from the global torch RNG; fork it so that a run resumed
        # mid-epoch (one extra draw) keeps the RNG stream dropout and MixUp see bit for bit.
        with torch.random.fork_rng(devices=[]):
            batches = iter(self.loader)
        for batch in batches:
            yield to_device(self.finish(batch) if self.finish is not None else batch, self.device)


class EvalData:
    """The eval split once over, sharded over processes x workers without dropping anything, as device batches."""

    def __init__(self, stream: ExampleStream, collate: DecodeCollate, num_workers: int, device: torch.device):
        self.stream, self.device = stream, device
        self.loader = build_loader(stream, collate, num_workers, pin_memory=device.type == "cuda")

    def __iter__(self) -> Iterator[dict]:
        self.stream.set_epoch(0)
        for batch in self.loader:
            yield to_device(batch, self.device)


def build_train_data(splits: DataSplits, spec: ImageSpec, args: DataArguments, per_device_batch: int, seed: int,
                     state) -> TrainData:
    """The train data of a run: ``state`` is the Accelerator (or PartialState) giving ``process_index``,
    ``num_processes`` and ``device``."""
    rank, world, device = state.process_index, state.num_processes, state.device
    if args.data_on_device:
        return DeviceTrainData(splits.train, splits.image_column, splits.label_column, len(splits.label_names), spec,
                               args, per_device_batch, rank, world, seed, device)
    workers = args.dataloader_num_workers
    stream = ExampleStream(splits.train, per_device_batch, rank, world, workers, seed, shuffle=True,
                           shuffle_buffer_size=args.shuffle_buffer_size, num_examples=splits.num_train_examples,
                           sharding=args.stream_sharding)
    transform = train_transform(spec, args)
    finish = None
    if args.decode_on_device:  # workers hand over JPEG bytes and crop plans; the device decodes them
        collate = JpegPlanCollate(transform, splits.image_column, splits.label_column, len(splits.label_names), seed)
        finish = DeviceJpegDecoder(transform, device)
    else:
        collate = DecodeCollate(transform, splits.image_column, splits.label_column, len(splits.label_names), seed,
                                train=True)
    if args.streaming:
        logger.log(*streaming_note(world, workers, args.stream_sharding, getattr(splits.train, "num_shards", None)))
    return LoaderTrainData(stream, collate, workers, device, splits.num_train_examples, finish)


def build_eval_data(splits: DataSplits, spec: ImageSpec, args: DataArguments, per_device_batch: int, seed: int,
                    state) -> EvalData | None:
    """The eval data of a run (None when it has no eval split); ``state`` as for :func:`build_train_data`."""
    if splits.eval is None:
        return None
    workers = args.dataloader_num_workers
    stream = ExampleStream(splits.eval, per_device_batch, state.process_index, state.num_processes, workers, seed,
                           shuffle=False, drop_incomplete_round=False)
    collate = DecodeCollate(eval_transform(spec), splits.image_column, splits.label_column, len(splits.label_names),
                            seed, train=False)
    return EvalData(stream, collate, workers, state.device)


def streaming_note(processes: int, workers: int, sharding: str = "exact",
                   shards: int | None = None) -> tuple[int, str]:
    """(log level, message) on what the stream's sharding reads at this scale: with ``exact``, a warning past the
    process count at which walking the whole stream per consumer outlasts the epoch (docs/scaling.md)."""
    consumers = processes * max(1, workers)
    split = f"{consumers} consumers ({processes} processes x {max(1, workers)} loader workers)"
    if sharding == "shards":
        share = (shards or 0) // consumers
        return logging.INFO, (f"Streaming: {shards} shards dealt over {split}, {share} each per epoch; every record "
                              f"is read once, and {consumers * share} of the {shards} shards are used per epoch "
                              "(stream_sharding shards)")
    note = f"Streaming: each of the {split} reads every record of the stream and keeps 1/{consumers} of them " \
           "(the exact sharding rule)"
    if processes <= STREAMING_PROCESSES_THAT_KEEP_UP:
        return logging.INFO, note
    return logging.WARNING, (f"{note}; past ~{STREAMING_PROCESSES_THAT_KEEP_UP} GPUs the walk outlasts the epoch and "
                             "starves them: use stream_sharding shards, or copy the dataset to local or shared "
                             "storage and train map-style (streaming: false), see docs/scaling.md")
