"""The loader path: :class:`TrainStream` serves one rank's micro-batches of an epoch by the sharding rule
(:mod:`hf_vit.data.sharding`), :class:`DecodeCollate` decodes and augments each micro-batch in the loader workers,
:class:`ExampleStream` walks an eval split once over processes x workers, and :func:`build_loader` puts them in a
torch DataLoader.

Accelerate does not shard these loaders (they never go through ``accelerator.prepare``, and the Accelerator is built
with ``dispatch_batches=False``): for an iterable dataset accelerate would dispatch batches from one process, split a
``datasets.IterableDataset`` by files (unequal counts per rank: a hang at the end of an epoch) or shard an
already-sharded stream a second time (accelerate#3547). Resume is by count: the order depends only on (seed, epoch)
and augmentation only on (seed, epoch, example key), so skipping the first k micro-batches without decoding them
reproduces the uninterrupted epoch bit for bit (accelerate's ``skip_first_batches`` would fetch and decode them).

Train loader workers live for the whole run (``persistent_workers``): the epoch and the resume position reach them
through a small shared-memory tensor that :meth:`TrainStream.set_epoch` writes before each ``iter(loader)``.
"""

from __future__ import annotations

import logging
import signal

import datasets
import torch

from .batch import Batch
from .decoding import open_image
from .keys import augmentation_seed, epoch_order, example_key
from .sharding import Segment, StreamPlan, Topology, map_positions, unit_permutation, worker_micro_batches

logger = logging.getLogger(__name__)

# The field :class:`ExampleStream` adds to each raw example: its position in the split as loaded, which the collate
# hands on (``Batch.positions``) so that per-example predictions are in the split's order on any number of consumers.
POSITION = "__position__"


class DecodeCollate:
    """Loader ``collate_fn``: decode, check and transform raw examples into a uint8 batch.

    Runs in the loader workers. Returns a :class:`~hf_vit.data.batch.Batch` whose ``pixel_values`` are uint8
    (B, 3, S, S) in channels-last memory (each image is copied once, with no transposition). Bad examples
    (undecodable or truncated bytes, zero-size images, labels outside the class range, a missing image) are dropped
    from the batch and reported as ``"key (error)"`` in ``bad_keys``; B may be 0.
    Augmentation randomness is seeded from (seed, epoch, example key), so it does not depend on which worker or
    process sees the example.
    """

    def __init__(self, transform, image_column: str, label_column: str, num_classes: int, seed: int, train: bool):
        self.transform, self.image_column, self.label_column = transform, image_column, label_column
        self.num_classes, self.seed, self.train = num_classes, seed, train
        self._epoch = _SharedCounters(1)  # set by the main process, read by the (persistent) workers
        # Shape of an empty batch (every example bad): the model still runs on it, so keep the image size.
        self.image_size = getattr(transform, "image_size", 1)

    @property
    def epoch(self) -> int:
        return self._epoch[0]

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch[0] = value

    def decode(self, example: dict) -> tuple[torch.Tensor, int, str]:
        image = example[self.image_column]
        if not isinstance(image, dict) or (image.get("bytes") is None and not image.get("path")):
            raise ValueError("no image")
        key = example_key(image)
        label = int(example[self.label_column])
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} outside [0, {self.num_classes})")
        img = open_image(image)
        if img.width == 0 or img.height == 0:
            raise ValueError("zero-size image")
        if self.train:
            with torch.random.fork_rng(devices=[]):
                # Seed only the CPU generator: torch.manual_seed would also queue CUDA/XPU seeding with a captured
                # stack trace, which costs more than decoding a small JPEG.
                torch.default_generator.manual_seed(augmentation_seed(key, self.seed, self.epoch))
                pixels = self.transform(img)
        else:
            pixels = self.transform(img)
        if pixels.shape[-2:] != (self.image_size, self.image_size) and self.image_size != 1:
            raise ValueError(f"transform produced {tuple(pixels.shape)}")
        return pixels, label, key

    def __call__(self, examples: list[dict]) -> Batch:
        pixels, labels, keys, bad, positions = [], [], [], [], []
        real = list(examples)
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
            if POSITION in example:
                positions.append(example[POSITION])
        if pixels:
            # Stack as (B, H, W, 3): a plain copy of each channels-last image; then view it as (B, 3, H, W).
            batch = torch.stack([p.permute(1, 2, 0) for p in pixels]).permute(0, 3, 1, 2)
        else:
            batch = torch.zeros(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        return Batch(batch, torch.tensor(labels, dtype=torch.long), keys, bad, len(real), positions)


class _SharedCounters:
    """Integers that the main process sets and loader workers (persistent, forked or spawned) read: a shared-memory
    tensor survives both start methods, a plain attribute would be a stale copy in the workers."""

    def __init__(self, size: int):
        self.values = torch.zeros(size, dtype=torch.int64).share_memory_()

    def __getitem__(self, index: int) -> int:
        return int(self.values[index])

    def __setitem__(self, index: int, value: int) -> None:
        self.values[index] = value


class TrainStream(torch.utils.data.IterableDataset):
    """One rank's micro-batches of an epoch by the sharding rule (:mod:`hf_vit.data.sharding`): each item is one
    micro-batch, a list of raw examples (possibly short or empty when a stream runs out: the collate turns it into a
    smaller or empty batch, so every rank still runs :attr:`num_micro_batches`).

    ``sharding``: map-style data is always read by position; a stream is read by units (``"shards"``, each record by one
    consumer) or walked whole by every consumer (``"exact"``). ``unit_rows`` gives the raw rows per unit of a
    ``"shards"`` stream when known exactly (parquet footers), which lets a resume skip whole units unread.
    """

    def __init__(self, ds, topology: Topology, rank: int, seed: int, num_examples: int, sharding: str = "shards",
                 shuffle_buffer_size: int = 10_000, unit_rows: list[int] | None = None):
        self.ds, self.topology, self.rank, self.seed = ds, topology, rank, seed
        self.num_examples, self.buffer = num_examples, shuffle_buffer_size
        self.num_micro_batches = topology.micro_batches(num_examples)
        self._position = _SharedCounters(2)  # epoch, micro-batches to skip
        self.mode, self.plan, self.exact_units = "map", None, False
        if not isinstance(ds, datasets.Dataset):
            self.mode = "walk" if sharding == "exact" else "units"
        if self.mode == "units":
            self.ds = ds.reshard() if hasattr(ds, "reshard") else ds
            units = self.ds.num_shards
            self.exact_units = unit_rows is not None and len(unit_rows) == units
            if not self.exact_units:  # equal estimates: exactly-once still holds, the balance is approximate
                unit_rows = [num_examples // units + (u < num_examples % units) for u in range(units)]
            self.plan = StreamPlan(unit_rows, num_examples, topology)
        self.filtered = self.plan is not None and self.plan.raw_total != num_examples

    @property
    def epoch(self) -> int:
        return self._position[0]

    def set_epoch(self, epoch: int, skip_micro_batches: int = 0) -> None:
        """Call before each ``iter(loader)``: the epoch and how many of its micro-batches were already consumed."""
        if not 0 <= skip_micro_batches <= self.num_micro_batches:
            raise ValueError(f"skip {skip_micro_batches} outside the epoch's {self.num_micro_batches} micro-batches")
        self._position[0], self._position[1] = epoch, skip_micro_batches

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        wanted = worker_micro_batches(self.num_micro_batches, self._position[1], worker, workers)
        if not wanted:
            return
        if self.mode == "map":
            yield from self._map_style(wanted)
        elif self.mode == "walk":
            yield from self._walk(wanted)
        else:
            yield from self._units(wanted)

    def _map_style(self, wanted: range):
        order = epoch_order(len(self.ds), self.seed, self.epoch)
        for i in wanted:
            indices = order[map_positions(i, self.rank, self.topology)].tolist()
            rows = self.ds[indices]  # one columnar read per micro-batch
            yield _as_examples(rows, len(indices))

    def _walk(self, wanted: range):
        """Every consumer walks the seeded shuffled stream; block b (of ``micro_batch`` examples) is micro-batch
        ``b // N`` of rank ``b % N``, as positions are for map-style data."""
        ds = self.ds.shuffle(seed=self.seed, buffer_size=self.buffer)
        ds.set_epoch(self.epoch)
        processes, mine, served = self.topology.processes, set(wanted), 0
        for b, rows in enumerate(exact_blocks(ds, self.topology.micro_batch)):
            i, rank = divmod(b, processes)
            if i > wanted[-1]:
                break
            if rank == self.rank and i in mine:
                served += 1
                yield _as_examples(rows, _length(rows))
        for _ in range(len(wanted) - served):  # the stream ended early (an estimated epoch length)
            yield []

    def _units(self, wanted: range):
        """This worker's role reads its range of the epoch's line of units (``StreamPlan``) and yields its blocks
        ``wanted[0] // W ...`` of it."""
        workers, block = self.topology.workers_per_rank, self.topology.micro_batch
        role = wanted[0] % workers
        consumer = self.rank * workers + role
        first, count = wanted[0] // workers, len(wanted)
        segments = self.plan.consumer_segments(consumer, self.seed, self.epoch)
        skip_rows, pending, served = first * block, None, 0
        for segment in segments:
            if skip_rows and self.exact_units and not self.filtered and skip_rows >= segment.stop - segment.start:
                skip_rows -= segment.stop - segment.start  # a whole segment already consumed: not even read
                continue
            rows = self._segment_rows(segment)
            n = _length(rows)
            if not n:  # a unit whose rows the filters all took out
                continue
            if skip_rows:
                dropped = min(skip_rows, n)
                rows, n, skip_rows = {k: v[dropped:] for k, v in rows.items()}, n - dropped, skip_rows - dropped
            pending = rows if pending is None else {k: pending[k] + rows[k] for k in rows}
            while _length(pending) >= block and served < count:
                yield _as_examples({k: v[:block] for k, v in pending.items()}, block)
                pending, served = {k: v[block:] for k, v in pending.items()}, served + 1
            if served == count:
                return
        if pending is not None and _length(pending) and served < count:
            yield _as_examples(pending, _length(pending))  # the role's rows ran short (a filtered stream)
            served += 1
        if served < count:
            logger.warning("epoch %d: consumer %d ran out of rows after %d of its %d micro-batches (its units hold "
                           "fewer filtered rows than planned); the rest are empty", self.epoch, consumer,
                           first + served, first + count)
        for _ in range(count - served):
            yield []

    def _segment_rows(self, segment: Segment) -> dict[str, list]:
        """The segment's rows: the unit read whole, its rows in the epoch's seeded order, this consumer's part."""
        unit = self.ds.shard(num_shards=len(self.plan.unit_rows), index=segment.unit, contiguous=True)
        rows: dict[str, list] | None = None
        for batch in unit.iter(batch_size=1000):
            rows = {k: list(v) for k, v in batch.items()} if rows is None else \
                {k: rows[k] + list(v) for k, v in batch.items()}
        if rows is None:
            return {}
        order = unit_permutation(_length(rows), self.seed, self.epoch, segment.unit)[segment.part(_length(rows))]
        order = order.tolist()
        return {k: [v[i] for i in order] for k, v in rows.items()}


class ExampleStream(torch.utils.data.IterableDataset):
    """An evaluation split walked once, in order, over processes x loader workers: block b (of ``block_size``
    examples) goes to consumer ``b % C``; nothing is dropped, ranks may get different counts (the gather in
    :mod:`hf_vit.scoring` unpads by the per-rank counts). Items are blocks (lists of raw examples, each with its
    position in the split under :data:`POSITION`)."""

    def __init__(self, ds, block_size: int, rank: int, world: int, num_workers: int):
        self.ds, self.block, self.rank, self.world = ds, block_size, rank, world
        self.num_workers = max(1, num_workers)

    def set_epoch(self, epoch: int, skip_micro_batches: int = 0) -> None:  # an eval pass has no epochs
        pass

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        consumer = self.rank * self.num_workers + (info.id if info else 0)
        consumers = self.world * self.num_workers
        if isinstance(self.ds, datasets.Dataset):
            n = len(self.ds)
            for start in range(consumer * self.block, n, consumers * self.block):
                stop = min(start + self.block, n)
                yield _as_examples(self.ds[start:stop], stop - start, start)
            return
        for b, rows in enumerate(exact_blocks(self.ds, self.block)):
            if b % consumers == consumer:
                yield _as_examples(rows, _length(rows), b * self.block)


def _length(rows: dict[str, list]) -> int:
    return len(next(iter(rows.values()))) if rows else 0


def _as_examples(rows: dict[str, list], n: int, first: int | None = None) -> list[dict]:
    """The ``n`` examples of ``rows``; numbered from position ``first`` (:data:`POSITION`) when it is given."""
    examples = [{k: v[i] for k, v in rows.items()} for i in range(n)]
    if first is not None:
        for i, example in enumerate(examples):
            example[POSITION] = first + i
    return examples


def exact_blocks(ds, block: int):
    """Consecutive blocks of exactly ``block`` rows of an iterable dataset (the last one may be short), whatever
    batches datasets yields."""
    pending: dict[str, list] | None = None
    for rows in ds.iter(batch_size=block):
        if pending is None:
            pending = {k: list(v) for k, v in rows.items()}
        else:
            for k, v in rows.items():
                pending[k].extend(v)
        while _length(pending) >= block:
            yield {k: v[:block] for k, v in pending.items()}
            pending = {k: v[block:] for k, v in pending.items()}
    if pending and _length(pending):
        yield pending


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """Loader workers ignore SIGTERM/SIGINT. torchrun passes a SIGTERM on to each rank's whole process group, and Slurm
    signals every process of a job step: a worker killed by it would crash its rank mid-step, before the trainer
    (which handles the signal: finish the step, checkpoint, exit) could save. Workers still end with their loader."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# Micro-batches each loader worker decodes ahead: enough to ride out a slow image, and what the run plan counts in
# host memory (workers x this x micro-batch x 3 x size^2 bytes per process).
PREFETCH_FACTOR = 4


def build_loader(stream, collate: DecodeCollate, num_workers: int, pin_memory: bool, persistent: bool = False):
    """A DataLoader over a stream whose items are whole micro-batches (``batch_size=None``: the collate gets each
    list of examples as it is). ``persistent``: the workers live across epochs instead of starting anew each one."""
    return torch.utils.data.DataLoader(
        stream, batch_size=None, collate_fn=collate, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=persistent and num_workers > 0, prefetch_factor=PREFETCH_FACTOR if num_workers else None,
        worker_init_fn=_leave_stop_signals_to_the_trainer if num_workers else None,
    )
