"""The sharding rule (hf_vit.data.sharding) through the real TrainStream and torch DataLoader: every epoch uses all but
less than one global batch of its examples, each exactly once, with the same examples per optimizer step on 1 or N
processes (map-style), for any processes x loader workers x accumulation; a resume yields exactly the rest of the
epoch; persistent workers follow the epoch; streams are read once per consumer and resume without re-reading."""

from __future__ import annotations

import itertools

import datasets
import pyarrow.parquet as pq
import pytest

from hf_vit.data.keys import example_key
from hf_vit.data.loader import TrainStream, build_loader
from hf_vit.data.sharding import StreamPlan, Topology, map_positions, worker_micro_batches


def _keys(batch):
    return [example_key(e["image"]) for e in batch]


def _dataset(n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"image": [{"path": f"c/{i}.png", "bytes": None} for i in range(n)],
                                       "label": [i % 3 for i in range(n)]})


def _rank_epoch(ds, topology, rank, epoch=0, skip=0, num_examples=None, loader=None, stream=None):
    """The micro-batches (lists of keys) one rank's loader yields in an epoch."""
    if stream is None:
        stream = TrainStream(ds, topology, rank, seed=7, num_examples=num_examples or len(ds))
    if loader is None:
        loader = build_loader(stream, _keys, topology.workers, pin_memory=False)
    stream.set_epoch(epoch, skip)
    return list(loader)


SIZES = {"small": 37, "prime": 101, "large": 1009}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("processes,workers,accumulation",
                         list(itertools.product((1, 2), (0, 1, 3), (1, 3))))
def test_every_epoch_uses_all_but_less_than_one_global_batch_exactly_once(size, processes, workers, accumulation):
    n = SIZES[size]
    micro = 4 if n > 40 else 2
    topology = Topology(processes, workers, micro, accumulation)
    ds = _dataset(n)
    per_rank = [_rank_epoch(ds, topology, rank, epoch=1) for rank in range(processes)]
    steps = n // topology.global_batch
    assert steps > 0
    assert [len(batches) for batches in per_rank] == [steps * accumulation] * processes  # no rank waits
    assert all(len(batch) == micro for batches in per_rank for batch in batches)
    seen = [k for batches in per_rank for batch in batches for k in batch]
    assert len(seen) == len(set(seen)) == steps * topology.global_batch  # each once; the rest < one global batch
    assert n - len(seen) < topology.global_batch
    # Optimizer step s trains on the same examples with 1 process as with N (the global batch fixed).
    single = Topology(1, workers, micro * processes, accumulation)
    whole = _rank_epoch(ds, single, 0, epoch=1)
    for s in range(steps):
        step_n = {k for batches in per_rank for batch in batches[s * accumulation:(s + 1) * accumulation]
                  for k in batch}
        step_1 = {k for batch in whole[s * accumulation:(s + 1) * accumulation] for k in batch}
        assert step_n == step_1


@pytest.mark.parametrize("workers", (0, 1, 3))
def test_a_resume_after_any_k_micro_batches_yields_exactly_the_rest_of_the_epoch(workers):
    ds, topology = _dataset(101), Topology(2, workers, 4, 3)
    whole = _rank_epoch(ds, topology, 1, epoch=2)
    for k in (1, 2, 4, 5, len(whole) - 1, len(whole)):  # not multiples of the workers, and the very end
        assert _rank_epoch(ds, topology, 1, epoch=2, skip=k) == whole[k:]


def test_persistent_workers_follow_the_epoch_and_the_resume_position():
    ds, topology = _dataset(101), Topology(1, 2, 4, 1)
    stream = TrainStream(ds, topology, 0, seed=7, num_examples=101)
    loader = build_loader(stream, _keys, 2, pin_memory=False, persistent=True)
    first = _rank_epoch(ds, topology, 0, epoch=0, stream=stream, loader=loader)
    second = _rank_epoch(ds, topology, 0, epoch=1, stream=stream, loader=loader)
    resumed = _rank_epoch(ds, topology, 0, epoch=1, skip=3, stream=stream, loader=loader)
    assert first != second and resumed == second[3:]
    assert second == _rank_epoch(ds, topology, 0, epoch=1)  # the same as a fresh loader's
    assert loader._iterator is not None and loader._iterator._workers[0].is_alive()  # the same workers, kept


def test_the_rule_in_one_place_agrees_with_itself():
    topology = Topology(2, 3, 5, 2)
    total = topology.micro_batches(1009)
    # Worker roles cover the rank's micro-batches once, in the loader's round-robin order, from any resume point.
    for skip in (0, 1, 4, 7):
        served = sorted(i for w in range(3) for i in worker_micro_batches(total, skip, w, 3))
        assert served == list(range(skip, total))
    positions = [p for i in range(total) for r in range(2) for p in range(1009)[map_positions(i, r, topology)]]
    assert sorted(positions) == list(range(topology.examples_used(1009)))


# ------------------------------------------------------------------------------------------------------- streams
@pytest.fixture(scope="module")
def many_row_groups(tmp_path_factory):
    """A Hub-style parquet split of 5 files with row groups of unequal sizes (17 units, 203 rows)."""
    folder = tmp_path_factory.mktemp("stream") / "data"
    folder.mkdir()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    start = 0
    for f, groups in enumerate(([10, 12, 9], [20, 20], [7, 7, 7, 7], [30, 11, 14, 3], [16, 20, 10])):
        rows = sum(groups)
        table = datasets.Dataset.from_dict(
            {"image": [{"path": f"s/{i}.png", "bytes": b"x"} for i in range(start, start + rows)],
             "label": [i % 3 for i in range(start, start + rows)]}, features=features).data.table
        writer = pq.ParquetWriter(str(folder / f"train-{f:05d}-of-00005.parquet"), table.schema)
        offset = 0
        for g in groups:
            writer.write_table(table.slice(offset, g))
            offset += g
        writer.close()
        start += rows
    return folder.parent


def _stream(path):
    from hf_vit.config import DataArguments
    from hf_vit.data import load_splits
    from hf_vit.data.factory import stream_unit_rows

    args = DataArguments(dataset_name=str(path), streaming=True, train_val_split=0)
    splits = load_splits(args)
    return splits, stream_unit_rows(splits, args)


@pytest.mark.parametrize("processes,workers,accumulation", [(1, 0, 1), (2, 1, 3), (2, 3, 1), (1, 3, 3)])
def test_a_stream_is_split_by_row_groups_each_record_read_by_one_consumer(many_row_groups, processes, workers,
                                                                          accumulation):
    splits, unit_rows = _stream(many_row_groups)
    assert unit_rows == [10, 12, 9, 20, 20, 7, 7, 7, 7, 30, 11, 14, 3, 16, 20, 10]
    n = sum(unit_rows)
    topology = Topology(processes, workers, 3, accumulation)
    epochs = []
    for epoch in (0, 1):
        per_rank = []
        for rank in range(processes):
            stream = TrainStream(splits.train, topology, rank, seed=7, num_examples=n, unit_rows=unit_rows)
            per_rank.append(_rank_epoch(None, topology, rank, epoch, stream=stream))
        assert [len(b) for b in per_rank] == [topology.micro_batches(n)] * processes
        assert all(len(batch) == 3 for batches in per_rank for batch in batches)
        seen = [k for batches in per_rank for batch in batches for k in batch]
        assert len(seen) == len(set(seen)) == topology.examples_used(n)
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    plan = StreamPlan(unit_rows, n, topology)
    assert plan.read_amplification(7, 0) <= 1 + (topology.consumers - 1) * max(unit_rows) / n  # only cut units


def test_a_stream_resume_skips_whole_units_unread_and_yields_the_rest(many_row_groups, monkeypatch):
    splits, unit_rows = _stream(many_row_groups)
    n, topology = sum(unit_rows), Topology(2, 0, 5, 1)
    stream = TrainStream(splits.train, topology, 1, seed=7, num_examples=n, unit_rows=unit_rows)
    whole = _rank_epoch(None, topology, 1, 1, stream=stream)
    reads = []
    original = TrainStream._segment_rows
    monkeypatch.setattr(TrainStream, "_segment_rows", lambda self, seg: reads.append(seg.unit) or original(self, seg))
    _rank_epoch(None, topology, 1, 1, stream=stream)
    all_units = list(reads)
    reads.clear()
    k = len(whole) - 2
    assert _rank_epoch(None, topology, 1, 1, skip=k, stream=stream) == whole[k:]
    assert len(reads) < len(all_units) / 2  # the consumed units were skipped by their footer counts, not read


def test_a_filtered_stream_is_still_exactly_once(many_row_groups):
    from hf_vit.config import DataArguments
    from hf_vit.data import load_splits
    from hf_vit.data.factory import stream_unit_rows

    args = DataArguments(dataset_name=str(many_row_groups), streaming=True, train_val_split=0.2)
    splits = load_splits(args)
    validation = {example_key(r["image"]) for r in splits.eval}
    topology = Topology(2, 2, 3, 1)
    seen = []
    for rank in range(2):
        stream = TrainStream(splits.train, topology, rank, seed=7, num_examples=splits.num_train_examples,
                             unit_rows=stream_unit_rows(splits, args))
        seen += [k for batch in _rank_epoch(None, topology, rank, 0, stream=stream) for k in batch]
    assert len(seen) == len(set(seen)) and not set(seen) & validation
    # Each consumer's range is sized to its quota in raw rows: what a filter takes out varies per range, so a few
    # examples can sit out beyond the global batch; most are used.
    assert len(seen) >= 0.9 * splits.num_train_examples - topology.global_batch


def test_device_data_follows_the_same_positions_as_the_loader():
    from hf_vit.data.keys import epoch_order
    from hf_vit.data.sharding import map_positions as rule

    topology = Topology(2, 0, 4, 3)
    ds = _dataset(101)
    stream_batches = _rank_epoch(ds, topology, 1, epoch=3)
    order = epoch_order(101, 7, 3)  # DeviceTrainData.epoch_order, and positions by the same map_positions
    expected = [[f"c/{int(p)}.png" for p in order[rule(i, 1, topology)]] for i in range(len(stream_batches))]
    assert stream_batches == expected


def test_a_filtered_stream_moves_a_boundary_near_a_unit_edge_onto_it():
    """Two files of 200 rows, 380 examples after the validation filter, 2 workers x 16: the workers' quotas (12 and 11
    micro-batches) put the boundary 2 raw rows into the second file. Filtered ranges are approximate anyway, so the
    boundary moves to the edge and each file is read once; an unfiltered stream keeps its exact boundary."""
    topology = Topology(1, 2, 16, 1)
    filtered = StreamPlan([200, 200], 380, topology)
    assert filtered.bounds[1] == 202 and filtered.read_amplification(0, 0) == 1.0
    assert [s.unit for s in filtered.consumer_segments(0, 0, 0)] == [filtered.consumer_segments(0, 0, 0)[0].unit]
    exact = StreamPlan([200, 200], 400, Topology(1, 3, 16, 1))
    assert exact.snap == 0 and exact.read_amplification(0, 0) > 1.0


def test_a_unit_the_filters_empty_keeps_the_rows_before_it(many_row_groups):
    """Every row of the second row group filtered out (as a train_fraction or a carve-out can do to a small unit): the
    consumer reading across it still yields the rows before and after it, each once."""
    splits, unit_rows = _stream(many_row_groups)
    gone = {f"s/{i}.png" for i in range(10, 22)}  # unit 1: rows 10-21
    kept = splits.train.filter(lambda image: image["path"] not in gone, input_columns=["image"])
    n = sum(unit_rows) - len(gone)
    topology = Topology(1, 0, 3, 1)
    stream = TrainStream(kept, topology, 0, seed=7, num_examples=n, unit_rows=unit_rows)
    seen = [k for batch in _rank_epoch(None, topology, 0, 0, stream=stream) for k in batch]
    assert len(seen) == len(set(seen)) and not set(seen) & gone
    assert len(seen) == topology.examples_used(n)  # one consumer: its range is the whole line
