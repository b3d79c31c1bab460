"""The sharding rule: which examples of an epoch each consumer (a process, or one of its loader workers) reads, and
in which order — the one home of the rule for every train data path (loader workers, ``decode_on_device``,
``data_on_device``; map-style and streaming).

**Steps first.** An epoch of ``n`` examples is ``n // G`` optimizer steps of the global batch ``G`` = micro-batch x
processes x accumulation; every rank runs ``M = steps x accumulation`` micro-batches, and fewer than ``G`` examples
are left out of the epoch — on any number of processes, workers and accumulation steps.

**A rank's micro-batches and its workers.** torch's DataLoader deals a rank's batches round-robin over its W loader
workers (skipping a worker once it has no more), so worker ``j`` of a loader started after ``k`` consumed micro-batches
yields the rank's micro-batches ``k + j, k + j + W, ...`` (:func:`worker_micro_batches`). A resumed epoch therefore
continues exactly where the interrupted one stopped, whatever k is.

**Map-style data** (random access; also ``data_on_device``): the epoch order is the seeded permutation of the split
(``keys.epoch_order``), and micro-batch ``i`` of rank ``r`` is positions ``[(i*N + r)*B, (i*N + r + 1)*B)`` of it
(:func:`map_positions`). So optimizer step ``s`` trains on positions ``[s*G, (s+1)*G)`` whatever the process and
worker counts: the same examples per step on 1 or N processes.

**Streams** (``stream_sharding: shards``): a consumer must read only its own bytes. The stream's *units* — its shards,
split per parquet row group where the format allows (``IterableDataset.reshard``) — are put in a seeded order per
epoch and laid end to end; each consumer gets a contiguous range of that line sized to the micro-batches it yields
(:class:`StreamPlan`). A unit cut between two consumers is read by both, each keeping its part of the unit's rows in
one seeded permutation of them, so every record reaches exactly one consumer and only the cut units are read twice
(read amplification ``1 + cuts / units``). Rows are shuffled within a unit (not across a buffer), which is what lets a
resume skip whole units unread. The order then depends on the consumer count, as for any streaming loader; exactly-once
and bit-exact resume do not. ``stream_sharding: exact`` instead has every consumer walk the whole stream and keep its
micro-batches (read amplification = consumers; for one consumer or a stream that cannot be split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .keys import epoch_order, unit_generator


@dataclass(frozen=True)
class Topology:
    """Who consumes an epoch: ``processes`` x ``workers`` loader workers (0: the process itself) taking micro-batches
    of ``micro_batch`` examples, ``accumulation`` of them per optimizer step."""

    processes: int
    workers: int
    micro_batch: int
    accumulation: int = 1

    @property
    def workers_per_rank(self) -> int:
        return max(1, self.workers)

    @property
    def consumers(self) -> int:
        return self.processes * self.workers_per_rank

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.processes * self.accumulation

    def steps(self, num_examples: int) -> int:
        """Optimizer steps per epoch of ``num_examples``."""
        return num_examples // self.global_batch

    def micro_batches(self, num_examples: int) -> int:
        """Micro-batches every rank runs per epoch (the same on every rank)."""
        return self.steps(num_examples) * self.accumulation

    def examples_used(self, num_examples: int) -> int:
        return self.steps(num_examples) * self.global_batch

    def role_micro_batches(self, num_examples: int, role: int) -> int:
        """Micro-batches that worker role ``role`` of a rank yields per epoch (roles take turns: i % W)."""
        total, workers = self.micro_batches(num_examples), self.workers_per_rank
        return len(range(role, total, workers))


def worker_micro_batches(total: int, skip: int, worker: int, workers: int) -> range:
    """The rank's micro-batch indices that loader worker ``worker`` (of ``workers``) yields, in order, in a loader
    started after ``skip`` of the epoch's ``total`` micro-batches were consumed."""
    return range(skip + worker, total, max(1, workers))


def map_positions(micro_batch: int, rank: int, topology: Topology) -> slice:
    """Positions in the epoch order of micro-batch ``micro_batch`` of ``rank`` (map-style data)."""
    start = (micro_batch * topology.processes + rank) * topology.micro_batch
    return slice(start, start + topology.micro_batch)


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of unit ``unit`` (raw rows, before any filter), ``size`` raw rows in all."""

    unit: int
    start: int
    stop: int
    size: int

    def part(self, filtered: int) -> slice:
        """The same share of a unit whose filter kept ``filtered`` of its ``size`` rows: consumers that cut one unit
        compute the same boundaries, so its rows are split exactly."""
        return slice(filtered * self.start // self.size, filtered * self.stop // self.size)

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.size


class StreamPlan:
    """The line of a stream's units for one epoch and each consumer's range of it (see the module docstring).

    ``unit_rows``: raw rows per unit (from the parquet footers, or equal estimates); ``num_examples``: the epoch's
    examples after the validation/subset filters (equal to the raw total when nothing is filtered). A filtered stream
    fills each range only approximately anyway, so there a boundary within one micro-batch of a unit's edge moves to
    the edge (``snap``) rather than cutting the unit: a few rows more or less for one consumer, one read fewer.
    """

    def __init__(self, unit_rows: list[int], num_examples: int, topology: Topology):
        self.unit_rows, self.num_examples, self.topology = list(unit_rows), num_examples, topology
        self.snap = topology.micro_batch if sum(self.unit_rows) != num_examples else 0
        self.raw_total = sum(self.unit_rows)
        quotas = [topology.role_micro_batches(num_examples, consumer % topology.workers_per_rank)
                  * topology.micro_batch for consumer in range(topology.consumers)]
        # Consumer c's raw range starts where the quotas before it end, scaled from filtered to raw rows.
        cumulative = [0]
        for quota in quotas:
            cumulative.append(cumulative[-1] + quota)
        scale = self.raw_total / num_examples if num_examples else 0.0
        self.bounds = [min(self.raw_total, math.floor(q * scale)) for q in cumulative]

    def consumer_segments(self, consumer: int, seed: int, epoch: int) -> list[Segment]:
        """The segments of units that ``consumer`` reads this epoch, in order."""
        order = epoch_order(len(self.unit_rows), seed, epoch).tolist()
        lo, hi = self.bounds[consumer], self.bounds[consumer + 1]
        if self.snap:
            edges = [0]
            for unit in order:
                edges.append(edges[-1] + self.unit_rows[unit])
            lo, hi = (self._snapped(lo, edges), self._snapped(hi, edges))
        segments, position = [], 0
        for unit in order:
            size = self.unit_rows[unit]
            start, stop = max(lo, position), min(hi, position + size)
            if start < stop:
                segments.append(Segment(unit, start - position, stop - position, size))
            position += size
            if position >= hi:
                break
        return segments

    def _snapped(self, bound: int, edges: list[int]) -> int:
        """``bound`` moved to the nearest unit edge when that is within ``snap`` rows (the same for both consumers
        that share the boundary)."""
        nearest = min(edges, key=lambda edge: (abs(edge - bound), edge))
        return nearest if abs(nearest - bound) <= self.snap else bound

    def reads_per_epoch(self, seed: int = 0, epoch: int = 0) -> tuple[int, int]:
        """(raw rows read by all consumers, raw rows in the stream): a cut unit is read whole by each of its
        consumers."""
        read = sum(self.unit_rows[s.unit] for c in range(self.topology.consumers)
                   for s in self.consumer_segments(c, seed, epoch))
        return read, self.raw_total

    def read_amplification(self, seed: int = 0, epoch: int = 0) -> float:
        read, total = self.reads_per_epoch(seed, epoch)
        return read / total if total else 1.0


def unit_permutation(rows: int, seed: int, epoch: int, unit: int) -> torch.Tensor:
    """The seeded order of a unit's (filtered) rows in one epoch: the same in every consumer that reads the unit."""
    return torch.randperm(rows, generator=unit_generator(seed, epoch, unit))
