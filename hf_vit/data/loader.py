"""The loader path: :class:`ExampleStream` shards an epoch over processes x loader workers, :class:`DecodeCollate`
decodes and augments each micro-batch in the workers, :func:`build_loader` puts them together in a torch DataLoader.

The sharding rule (one rule for map-style and streaming data): an epoch is a fixed order of examples (a seeded
permutation, or the seeded shuffled stream) cut into *blocks* of ``per_device_batch`` examples. With N processes x W
workers there are C = N*W consumers; block b goes to consumer ``b % C``, and only complete *rounds* of C full blocks
are used. So every example of an epoch reaches exactly one consumer, every rank runs the same number of micro-batches
(W per round: no DDP hang), and the last incomplete round is dropped — the last-batch policy (evaluation,
``drop_incomplete_round=False``, keeps it). Streaming, every consumer walks the whole (undecoded) stream and keeps its
blocks: C reads of the bytes, no decoding of what it does not keep. Or, streaming at scale (``stream_sharding:
shards``), each epoch the stream's shards are dealt out by a seeded permutation and every consumer reads only its own.

Accelerate does not shard this loader (it never goes through ``accelerator.prepare``, and the Accelerator is built
with ``dispatch_batches=False``): for an iterable dataset accelerate would dispatch batches from one process, split a
``datasets.IterableDataset`` by files (unequal counts per rank: a hang at the end of an epoch) or shard an
already-sharded stream a second time (accelerate#3547). Resume is by count: the order depends only on (seed, epoch)
and augmentation only on (seed, epoch, example key), so skipping the first k micro-batches without decoding them
reproduces the uninterrupted epoch bit for bit (accelerate's ``skip_first_batches`` would fetch and decode them).
"""

from __future__ import annotations

import logging
import math
import signal

import datasets
import torch

from ..errors import UserError
from .decoding import open_image
from .keys import augmentation_seed, epoch_order, example_key

logger = logging.getLogger(__name__)


class DecodeCollate:
    """Loader ``collate_fn``: decode, check and transform raw examples into a uint8 batch.

    Runs in the loader workers. Returns ``pixel_values`` uint8 (B, 3, S, S) (channels-last memory: each image is
    copied once, with no transposition), ``labels`` (B,), ``keys`` of the B examples, ``bad_keys`` and
    ``num_examples`` (real examples in, good or bad). Bad examples (undecodable or truncated bytes, zero-size images,
    labels outside the class range, a missing image) are dropped from the batch and reported as ``"key (error)"`` in
    ``bad_keys``; B may be 0. ``None`` entries are padding from :class:`ExampleStream` and are dropped silently.
    Augmentation randomness is seeded from (seed, epoch, example key), so it does not depend on which worker or
    process sees the example.
    """

    def __init__(self, transform, image_column: str, label_column: str, num_classes: int, seed: int, train: bool):
        self.transform, self.image_column, self.label_column = transform, image_column, label_column
        self.num_classes, self.seed, self.train, self.epoch = num_classes, seed, train, 0
        # Shape of an empty batch (every example bad): the model still runs on it, so keep the image size.
        self.image_size = getattr(transform, "image_size", 1)

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

    def __call__(self, examples: list[dict | None]) -> dict:
        pixels, labels, keys, bad = [], [], [], []
        real = [e for e in examples if e is not None]
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
        if pixels:
            # Stack as (B, H, W, 3): a plain copy of each channels-last image; then view it as (B, 3, H, W).
            batch = torch.stack([p.permute(1, 2, 0) for p in pixels]).permute(0, 3, 1, 2)
        else:
            batch = torch.zeros(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        return {
            "pixel_values": batch,
            "labels": torch.tensor(labels, dtype=torch.long),
            "keys": keys,
            "bad_keys": bad,
            "num_examples": len(real),
        }


class ExampleStream(torch.utils.data.IterableDataset):
    """Yields this consumer's examples of one epoch, block by block (see the module docstring for the rule).

    ``set_epoch(epoch, skip_micro_batches)`` is called before each ``iter(loader)``; the loader's workers are
    recreated per epoch (no persistent workers), so they see it. ``num_examples`` is the epoch length the loop plans
    with (``micro_batches_per_epoch(num_examples)`` per rank): a stream longer than that stops there, and one that
    turns out shorter (an estimated length) is padded with ``None`` entries, which :class:`DecodeCollate` turns into
    empty batches — so every rank still runs exactly the planned number of micro-batches.
    """

    def __init__(self, ds, block_size: int, rank: int, world: int, num_workers: int, seed: int,
                 shuffle: bool = True, drop_incomplete_round: bool = True, shuffle_buffer_size: int = 10_000,
                 num_examples: int | None = None, sharding: str = "exact"):
        self.ds, self.block, self.rank, self.world = ds, block_size, rank, world
        self.num_workers, self.seed, self.shuffle = max(1, num_workers), seed, shuffle
        self.drop_incomplete = drop_incomplete_round
        self.buffer = shuffle_buffer_size
        self.num_examples = num_examples
        self.epoch, self.skip = 0, 0
        # Whole shards per consumer applies to streams only: map-style consumers read only their own blocks anyway.
        self.by_shards = sharding == "shards" and not isinstance(ds, datasets.Dataset)
        if self.by_shards and ds.num_shards < self.consumers:
            raise UserError(
                f"stream_sharding shards: the stream has {ds.num_shards} shard(s), fewer than the {self.consumers} "
                f"consumers ({world} processes x {self.num_workers} loader workers); lower dataloader_num_workers "
                "or use stream_sharding exact"
            )

    @property
    def consumers(self) -> int:
        return self.world * self.num_workers

    def set_epoch(self, epoch: int, skip_micro_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_micro_batches

    def micro_batches_per_epoch(self, num_examples: int) -> int:
        """Micro-batches each rank runs per epoch of ``num_examples``: W blocks per complete round of C blocks."""
        return self._rounds(num_examples) * self.num_workers

    def _rounds(self, num_examples: int) -> int:
        if self.by_shards:
            # What every consumer's share holds when the S shards are about equal: floor(S / C) of them.
            shards = self.ds.num_shards
            return num_examples * (shards // self.consumers) // shards // self.block
        return num_examples // (self.consumers * self.block)

    def _role(self) -> tuple[int, int]:
        """(consumer index, rounds to skip) of this worker; on resume roles rotate so the loader's round-robin over
        workers continues exactly where the interrupted epoch stopped."""
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        shift, done = self.skip % self.num_workers, self.skip // self.num_workers
        role = (worker + shift) % self.num_workers
        return self.rank * self.num_workers + role, done + (1 if role < shift else 0)

    def _planned_rounds(self) -> int | None:
        if self.num_examples is None or not self.drop_incomplete:
            return None
        return self._rounds(self.num_examples)

    def __iter__(self):
        consumer, skip_rounds = self._role()
        planned = self._planned_rounds()
        rows = self._iter_map_style if isinstance(self.ds, datasets.Dataset) else \
            self._iter_own_shards if self.by_shards else self._iter_stream
        done = skip_rounds
        for r, block in rows(consumer, skip_rounds, planned):
            done = r + 1
            yield from block
        if planned is not None and done < planned:
            if self.by_shards:  # this consumer's shards hold less than the average share the plan assumes
                logger.warning("epoch %d: consumer %d's shards ran out after %d of %d planned blocks of %d examples "
                               "(they hold fewer than the average share); its remaining micro-batches are empty",
                               self.epoch, consumer, done, planned, self.block)
            elif consumer == 0:
                logger.warning("epoch %d: the data ran out after %d of %d planned rounds of %d examples; the rest of "
                               "the epoch is empty batches (pass the exact --train_samples)", self.epoch, done,
                               planned, self.consumers * self.block)
            for _ in range(done, planned):
                yield from [None] * self.block

    def _iter_map_style(self, consumer: int, skip_rounds: int, planned: int | None):
        """(round, this consumer's examples in it) from a seeded permutation of the whole split."""
        n = len(self.ds)
        if self.shuffle:
            order = epoch_order(n, self.seed, self.epoch)
        else:
            order = torch.arange(n)
        round_size = self.consumers * self.block
        rounds = n // round_size if self.drop_incomplete else math.ceil(n / round_size)
        for r in range(skip_rounds, rounds if planned is None else min(rounds, planned)):
            start = r * round_size + consumer * self.block
            indices = order[start : min(start + self.block, n)].tolist()
            if indices:
                rows = self.ds[indices]  # one columnar read per block
                yield r, [{k: v[i] for k, v in rows.items()} for i in range(len(indices))]

    def _iter_stream(self, consumer: int, skip_rounds: int, planned: int | None):
        """(round, this consumer's examples in it) from the seeded shuffled stream, walked whole by every consumer."""
        ds = self.ds
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.buffer)
            ds.set_epoch(self.epoch)
        # `.iter` walks the whole stream in this worker (datasets does not split it by worker): each consumer picks
        # its blocks by position, which is what makes the rule exact for any number of shards, workers and processes.
        # Nothing is decoded here; a block is only held until its round turns out complete.
        held = None
        for b, rows in enumerate(self._exact_blocks(ds)):
            r, owner = divmod(b, self.consumers)
            if planned is not None and r >= planned:
                break
            if owner == consumer:
                held = rows
            full = len(next(iter(rows.values()))) == self.block
            if (owner == self.consumers - 1 and full) or not self.drop_incomplete:
                # The round is complete (or completeness does not matter): release this consumer's block.
                if held is not None and r >= skip_rounds:
                    yield r, [{k: v[i] for k, v in held.items()} for i in range(len(next(iter(held.values()))))]
                held = None
        # A block still held here belongs to an incomplete last round: dropped (the last-batch policy).

    def _iter_own_shards(self, consumer: int, skip_rounds: int, planned: int | None):
        """(round, block) from this consumer's own shards only (``stream_sharding: shards``): a seeded permutation of
        the shards per epoch, dealt round-robin over the consumers, each share shuffled with the buffer."""
        shards = self.ds.num_shards
        order = epoch_order(shards, self.seed, self.epoch) if self.shuffle else torch.arange(shards)
        mine = [self.ds.shard(num_shards=shards, index=int(i)) for i in order[consumer::self.consumers]]
        ds = mine[0] if len(mine) == 1 else datasets.concatenate_datasets(mine)
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.buffer)
            ds.set_epoch(self.epoch)
        for r, rows in enumerate(self._exact_blocks(ds)):
            size = len(next(iter(rows.values())))
            if (planned is not None and r >= planned) or (size < self.block and self.drop_incomplete):
                break
            if r >= skip_rounds:
                yield r, [{k: v[i] for k, v in rows.items()} for i in range(size)]

    def _exact_blocks(self, ds):
        """Consecutive blocks of exactly ``block`` rows (the last one may be short), whatever batches datasets
        yields."""
        pending: dict[str, list] | None = None
        for rows in ds.iter(batch_size=self.block):
            if pending is None:
                pending = {k: list(v) for k, v in rows.items()}
            else:
                for k, v in rows.items():
                    pending[k].extend(v)
            while len(next(iter(pending.values()))) >= self.block:
                yield {k: v[: self.block] for k, v in pending.items()}
                pending = {k: v[self.block :] for k, v in pending.items()}
        if pending and len(next(iter(pending.values()))):
            yield pending


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """Loader workers ignore SIGTERM/SIGINT. torchrun passes a SIGTERM on to each rank's whole process group, and Slurm
    signals every process of a job step: a worker killed by it would crash its rank mid-step, before the trainer
    (which handles the signal: finish the step, checkpoint, exit) could save. Workers still end with their loader."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loader(stream: ExampleStream, collate: DecodeCollate, num_workers: int, pin_memory: bool):
    return torch.utils.data.DataLoader(
        stream, batch_size=stream.block, collate_fn=collate, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if num_workers else None,
        worker_init_fn=_leave_stop_signals_to_the_trainer if num_workers else None,
    )

