"""Streaming at scale, counted: how many rows and bytes each consumer of a simulated 8 GPUs x 16 loader workers
topology reads per epoch with ``stream_sharding: shards``, how many records the epoch uses, and what a resume late in
the epoch re-reads.

    python benchmarks/bench_stream_sharding.py [--files 300] [--row_groups 10] [--rows_per_group 20]

It writes a generated Hub-style parquet stream (``image``/``label``, tiny rows, the given files x row groups), opens
it as the trainer does (``load_splits`` + ``TrainStream``, the same code a run takes) and plays every consumer of
the topology in turn in this process: consumer (rank r, worker role w) gets exactly the micro-batches the DataLoader
of rank r would take from worker w. Rows read are counted where a unit (row group) is read; bytes from the row
groups' compressed sizes in the parquet footers. Cases: 128 consumers on 300 files, 16 on 10, and 128 on 300 files of
one row group each (the refused case: the plan says so). Real Hub image parquet files hold row groups of 100 rows, so
ImageNet-1k (1,281,167 rows) has ~12,800 units; this benchmark keeps the file and consumer counts and states its
rows per unit.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_vit.config import DataArguments  # noqa: E402
from hf_vit.data import load_splits  # noqa: E402
from hf_vit.data.factory import stream_unit_rows  # noqa: E402
from hf_vit.data.keys import example_key  # noqa: E402
from hf_vit.data.loader import TrainStream  # noqa: E402
from hf_vit.data.sharding import StreamPlan, Topology, worker_micro_batches  # noqa: E402
from hf_vit.plan import MAX_READ_AMPLIFICATION  # noqa: E402


def write_stream(folder: Path, files: int, row_groups: int, rows_per_group: int) -> Path:
    (folder / "data").mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=1000)})
    schema = features.arrow_schema
    start = 0
    for f in range(files):
        rows = row_groups * rows_per_group
        table = pa.table({"image": [{"bytes": b"\xff\xd8" + bytes(40), "path": f"n{f:05d}/{i}.JPEG"}
                                    for i in range(start, start + rows)],
                          "label": [i % 1000 for i in range(start, start + rows)]}, schema=schema)
        pq.write_table(table, folder / "data" / f"train-{f:05d}-of-{files:05d}.parquet", row_group_size=rows_per_group)
        start += rows
    return folder


def unit_bytes(folder: Path) -> list[int]:
    return [meta.row_group(g).total_byte_size for f in sorted((folder / "data").glob("*.parquet"))
            for meta in [pq.ParquetFile(f).metadata] for g in range(meta.num_row_groups)]


def play(folder: Path, topology: Topology, epoch: int = 0, skip: int = 0) -> dict:
    """Every consumer of ``topology`` through one epoch (from micro-batch ``skip`` on); the counts."""
    args = DataArguments(dataset_name=str(folder), streaming=True, train_val_split=0)
    splits = load_splits(args)
    rows, sizes = stream_unit_rows(splits, args), unit_bytes(folder)
    n = splits.num_train_examples
    read_rows, read_bytes, used = collections.Counter(), collections.Counter(), collections.Counter()
    original = TrainStream._segment_rows

    for rank in range(topology.processes):
        stream = TrainStream(splits.train, topology, rank, seed=0, num_examples=n, unit_rows=rows)
        stream.set_epoch(epoch, skip)
        for role in range(topology.workers_per_rank):
            consumer = rank * topology.workers_per_rank + role

            def counted(self, segment, consumer=consumer):
                read_rows[consumer] += self.plan.unit_rows[segment.unit]
                read_bytes[consumer] += sizes[segment.unit]
                return original(self, segment)

            TrainStream._segment_rows = counted
            try:
                wanted = worker_micro_batches(stream.num_micro_batches, skip, role, topology.workers_per_rank)
                for batch in stream._units(wanted) if wanted else []:
                    used.update(example_key(e["image"]) for e in batch)
            finally:
                TrainStream._segment_rows = original
    total_rows, total_bytes = sum(rows), sum(sizes)
    per_consumer = [read_rows[c] for c in range(topology.consumers)]
    return {"rows": total_rows, "units": len(rows), "bytes": total_bytes, "read_rows": sum(read_rows.values()),
            "read_bytes": sum(read_bytes.values()), "used": len(used), "twice": sum(v > 1 for v in used.values()),
            "per_consumer_min": min(per_consumer), "per_consumer_max": max(per_consumer),
            "planned_amplification": StreamPlan(rows, n, topology).read_amplification(0, epoch),
            "micro_batches": topology.micro_batches(n)}


def report(name: str, folder: Path, topology: Topology) -> None:
    start = time.perf_counter()
    full = play(folder, topology)
    elapsed = time.perf_counter() - start
    late = topology.micro_batches(full["rows"]) * 9 // 10
    resumed = play(folder, topology, skip=late)
    amplification = full["read_bytes"] / full["bytes"]
    print(f"{name}: {topology.consumers} consumers ({topology.processes} x {topology.workers_per_rank}) on "
          f"{full['units']} units ({full['rows']} rows, {full['bytes'] / 1e6:.2f} MB)")
    print(f"  read per epoch: {full['read_rows']} rows = {full['read_rows'] / full['rows']:.3f}x, "
          f"{full['read_bytes'] / 1e6:.2f} MB = {amplification:.3f}x the bytes (plan: "
          f"{full['planned_amplification']:.3f}x; refused above {MAX_READ_AMPLIFICATION}x)")
    print(f"  records used: {full['used']} of {full['rows']} = {full['used'] / full['rows']:.2%} "
          f"(global batch {topology.global_batch}); read twice: {full['twice']}; rows read per consumer "
          f"{full['per_consumer_min']}-{full['per_consumer_max']}")
    print(f"  resume at micro-batch {late} of {full['micro_batches']}: {resumed['read_rows']} rows read "
          f"({resumed['read_rows'] / full['read_rows']:.1%} of a whole epoch's reads), {resumed['used']} records used")
    print(f"  ({elapsed:.1f} s to play the epoch)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--row_groups", type=int, default=10)
    parser.add_argument("--rows_per_group", type=int, default=20)
    parser.add_argument("--small_row_groups", type=int, default=20, help="row groups per file of the 10-file case")
    parser.add_argument("--small_rows_per_group", type=int, default=100,
                        help="rows per row group of the 10-file case (100: what datasets writes for image data)")
    parser.add_argument("--cases", default="big,small,single", help="which cases: big, small, single")
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        # ViT-B/16's ImageNet recipe: global batch 1600 = 200 per GPU on 8 GPUs; scaled to these rows: 4 per consumer.
        if "big" in cases:
            big = write_stream(Path(tmp) / "big", args.files, args.row_groups, args.rows_per_group)
            report(f"8 GPUs x 16 workers, {args.files} files x {args.row_groups} row groups of {args.rows_per_group}",
                   big, Topology(8, 16, 4, 1))
        if "small" in cases:
            small = write_stream(Path(tmp) / "small", 10, args.small_row_groups, args.small_rows_per_group)
            report(f"1 GPU x 16 workers, 10 files x {args.small_row_groups} row groups of {args.small_rows_per_group}",
                   small, Topology(1, 16, 4, 1))
        if "single" in cases:
            single = write_stream(Path(tmp) / "single", args.files, 1, args.row_groups * args.rows_per_group)
            report(f"8 GPUs x 16 workers, {args.files} files of one row group", single, Topology(8, 16, 4, 1))


if __name__ == "__main__":
    main()
