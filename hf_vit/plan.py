"""The run plan: everything a run will do, resolved before anything runs — and refused, in one line, when it would
waste the hardware.

:func:`resolve_plan` is a pure function of the configuration, the launch (processes) and the dataset's metadata
(:class:`DataFacts`): the batch split, steps per epoch and in all, the examples each epoch uses, the bytes a stream
reads, worker start-ups, evaluations and checkpoints, and an estimate of the time on 1 and 8 GPUs. The trainer builds
from it (``Run(plan)``), ``--dry_run`` prints it, ``python -m hf_vit.study STUDY --dry_run`` prints one row per run,
and ``train_config.yaml`` records it under ``run_plan``.

A plan is refused when an epoch has no optimizer step, when an epoch leaves out more than one global batch of its
examples, or when a stream is read more than :data:`MAX_READ_AMPLIFICATION` times per epoch.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import RunConfig, resolve_batch_sizes, validate
from .data.factory import train_topology
from .data.sharding import StreamPlan, Topology
from .errors import UserError

MAX_READ_AMPLIFICATION = 1.25
# Without a measured throughput (benchmarks/results/throughput.json, written by benchmarks/gpu_check.sh), the time
# estimate assumes this sustained training rate per GPU: about a sixth of an H100's dense bf16 peak, what ViT-B/16
# training reaches with SDPA attention and a loader that keeps up. A measured figure replaces it.
ASSUMED_TFLOPS_PER_GPU = 160.0
THROUGHPUT_FILE = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "throughput.json"
# Bytes a checkpoint keeps per parameter: fp32 weights and AdamW's two moments (+ 4 for an EMA copy).
CHECKPOINT_BYTES_PER_PARAMETER = 12


@dataclass
class DataFacts:
    """What the plan needs to know of the dataset, read from its metadata (nothing decoded)."""

    num_train_examples: int
    num_eval_examples: int | None
    num_classes: int
    streaming: bool
    raw_train_rows: int | None = None  # rows of the train split before the validation/subset filters
    unit_rows: list[int] | None = None  # a stream's raw rows per unit (row group), when the footers say
    num_units: int | None = None  # a stream's units after resharding
    train_bytes: int | None = None  # bytes of the train split's files, when known
    source: str = ""  # where num_train_examples came from
    has_eval: bool = False  # an eval split (or carve-out) exists

    @classmethod
    def from_splits(cls, splits, args) -> DataFacts:
        from .data.factory import stream_unit_rows
        from .data.sources import local_data_files

        streaming = not hasattr(splits.train, "__len__") or args.streaming
        units = unit_rows = None
        if streaming:
            unit_rows = stream_unit_rows(splits, args)
            reshard = getattr(splits.train, "reshard", None)
            units = len(unit_rows) if unit_rows else (reshard().num_shards if reshard else splits.train.num_shards)
        files = local_data_files(splits.source or args, args.train_split)
        size = sum(os.path.getsize(f) for f in files) if files and all(os.path.isfile(f) for f in files) else None
        return cls(splits.num_train_examples, splits.num_eval_examples, len(splits.label_names), streaming,
                   splits.info.get("num_examples_in_split"), unit_rows, units, size, splits.num_train_examples_source,
                   splits.eval is not None)


@dataclass
class RunPlan:
    """A resolved run (see the module docstring); ``cfg`` holds the resolved configuration (per-device batch
    derived)."""

    cfg: RunConfig = field(repr=False)
    data: DataFacts = field(repr=False)
    processes: int
    loader_workers: int
    micro_batch: int
    accumulation: int
    global_batch: int
    train_examples: int
    examples_used_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    warmup_steps: int
    stream_rule: str  # map-style, shards or exact
    read_amplification: float
    bytes_read_per_epoch: int | None
    worker_startups: int  # the train loader's workers start once per run, the eval loader's at each evaluation
    prefetch_bytes_per_process: int | None  # decoded micro-batches the train loader's workers hold ahead
    evaluations: int
    checkpoints: int
    checkpoint_bytes: int | None
    parameters: int | None
    training_flops_per_image: float | None
    gpu_hours: float | None
    hours_on_8_gpus: float | None
    throughput_source: str
    splits: object = field(default=None, repr=False)  # the opened dataset splits (make_plan), for the run to use

    @property
    def topology(self) -> Topology:
        return Topology(self.processes, self.loader_workers, self.micro_batch, self.accumulation)

    @property
    def examples_left_out_per_epoch(self) -> int:
        return self.train_examples - self.examples_used_per_epoch

    def to_dict(self) -> dict:
        record = {k: v for k, v in asdict(self).items() if k not in ("cfg", "data", "splits")}
        record["examples_left_out_per_epoch"] = self.examples_left_out_per_epoch
        return record

    def refusal(self) -> str | None:
        """The one line that refuses this plan, or None when it may run."""
        flags = "lower total_train_batch_size, dataloader_num_workers or gradient_accumulation_steps"
        if self.steps_per_epoch == 0:
            return (f"an epoch of {self.train_examples} examples holds no optimizer step of the global batch "
                    f"{self.global_batch} (= {self.micro_batch} per device x {self.processes} processes x "
                    f"{self.accumulation} accumulation); {flags.split(', dataloader')[0]}")
        if self.examples_left_out_per_epoch > self.global_batch:
            return (f"each epoch would leave out {self.examples_left_out_per_epoch} of its {self.train_examples} "
                    f"examples, more than one global batch ({self.global_batch}); {flags}")
        if self.read_amplification > MAX_READ_AMPLIFICATION:
            consumers = self.topology.consumers
            if self.stream_rule == "exact":
                fix = ("each of the consumers walks the whole stream: use stream_sharding shards, or train map-style "
                       "from a local copy")
            else:
                fix = (f"the stream has {self.data.num_units} shards/row groups for {consumers} consumers: lower "
                       "dataloader_num_workers, write the dataset in more (or smaller) parquet row groups, or train "
                       "map-style from a local copy")
            return (f"the stream would be read {self.read_amplification:.2f}x per epoch ({consumers} consumers = "
                    f"{self.processes} processes x {max(1, self.loader_workers)} loader workers), above "
                    f"{MAX_READ_AMPLIFICATION}x; {fix}")
        return None

    def describe(self) -> str:
        """The plan as a few readable lines (``--dry_run`` on a train command)."""
        lines = [f"run plan for {self.cfg.train.output_dir}:"]
        for key, value in table_cells(self).items():
            lines.append(f"  {key:<34} {value}")
        refusal = self.refusal()
        lines.append(f"  {'verdict':<34} {'REFUSED: ' + refusal if refusal else 'ok'}")
        return "\n".join(lines)


def _measured(preset: str | None, image_size: int | None) -> tuple[float | None, float | None, str]:
    """From benchmarks/results/throughput.json (written by benchmarks/gpu_check.sh): the measured training images/s
    per GPU of this preset at this size, else a measured sustained TFLOP/s per GPU (another model's), and the device."""
    try:
        records = json.loads(THROUGHPUT_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None, ""
    records = [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []
    for record in records:
        if record.get("model_preset") == preset and record.get("image_size") == image_size:
            return float(record["train_images_per_second_per_gpu"]), None, str(record.get("device", ""))
    rates = [r for r in records if r.get("train_tflops_per_gpu")]
    if rates:
        best = max(rates, key=lambda r: r["train_tflops_per_gpu"])
        return None, float(best["train_tflops_per_gpu"]), f"{best.get('model_preset')} on {best.get('device', '?')}"
    return None, None, ""


def _model_cost(cfg: RunConfig, num_classes: int) -> tuple[int | None, float | None, int | None]:
    """(parameters, training FLOPs per image, image size) from the model's config on the meta device; Nones when the
    model cannot be known yet (a checkpoint that a study has not trained)."""
    from .models import model_config, num_parameters, training_flops_per_image
    from .models.cost import meta_model

    try:
        config = model_config(cfg.model, [str(i) for i in range(num_classes)])
    except UserError:
        return None, None, None
    return num_parameters(meta_model(config)), training_flops_per_image(config), config.image_size


def resolve_plan(cfg: RunConfig, processes: int, data: DataFacts, model_cost=None) -> RunPlan:
    """The plan of ``cfg`` launched on ``processes`` processes over a dataset described by ``data`` (pure: reads
    nothing but the model's config; ``model_cost`` = (parameters, FLOPs per image, image size) skips that)."""
    cfg = copy.deepcopy(cfg)
    t, d = cfg.train, cfg.data
    resolve_batch_sizes(t, processes)
    topology = train_topology(d, t.per_device_train_batch_size, processes, t.gradient_accumulation_steps)
    workers = topology.workers
    n = data.num_train_examples
    steps_per_epoch = topology.steps(n)
    total_steps = t.max_train_steps or math.ceil(t.num_train_epochs * steps_per_epoch)
    warmup_steps = round(t.warmup_epochs * steps_per_epoch)
    epochs = total_steps / steps_per_epoch if steps_per_epoch else 0.0
    epochs_started = math.ceil(epochs) if steps_per_epoch else 0

    rule, amplification = "map-style", 1.0
    if data.streaming:
        rule = d.stream_sharding
        if rule == "exact":
            amplification = float(topology.consumers)
        elif steps_per_epoch:
            units = data.unit_rows or [n // data.num_units + (u < n % data.num_units) for u in range(data.num_units)]
            amplification = StreamPlan(units, n, topology).read_amplification(t.seed, 0)
    bytes_read = round(data.train_bytes * amplification) if data.train_bytes else None
    if bytes_read and not data.streaming and data.raw_train_rows:  # map-style reads only the rows it uses
        bytes_read = round(data.train_bytes * topology.examples_used(n) / data.raw_train_rows)

    evaluations = 0
    if data.has_eval:
        evaluations = (total_steps // t.eval_steps if t.eval_steps else epochs_started) or 1
    every = t.checkpointing_steps
    checkpoints = (total_steps // int(every) if str(every).isdigit() else epochs_started if every == "epoch" else 0)
    parameters, flops, image_size = model_cost or _model_cost(cfg, data.num_classes)
    from .data.loader import PREFETCH_FACTOR

    prefetch = (workers * PREFETCH_FACTOR * t.per_device_train_batch_size * 3 * image_size ** 2
                if workers and image_size else None)
    checkpoint_bytes = None
    if parameters:
        per_param = CHECKPOINT_BYTES_PER_PARAMETER + (4 if t.ema_decay else 0)
        checkpoint_bytes = parameters * per_param

    images = total_steps * t.total_train_batch_size
    measured, tflops, device = _measured(cfg.model.model_preset, image_size)
    gpu_hours, source = None, "unknown model"
    if measured:
        gpu_hours, source = images / measured / 3600, f"measured {measured:,.0f} img/s per GPU ({device})"
    elif flops:
        rate = tflops or ASSUMED_TFLOPS_PER_GPU
        gpu_hours = images * flops / (rate * 1e12) / 3600
        source = (f"FLOPs at the {rate:.0f} TFLOP/s per GPU measured for {device}" if tflops else
                  f"FLOPs at an assumed {rate:.0f} TFLOP/s per GPU")

    plan = RunPlan(cfg, data, processes, workers, t.per_device_train_batch_size, t.gradient_accumulation_steps,
                   t.total_train_batch_size, n, topology.examples_used(n), steps_per_epoch, total_steps, epochs,
                   warmup_steps, rule, amplification, bytes_read, processes * workers * (1 + evaluations),
                   prefetch, evaluations, checkpoints,
                   checkpoint_bytes, parameters, flops, gpu_hours, gpu_hours / 8 if gpu_hours is not None else None,
                   source)
    return plan


def check_plan(plan: RunPlan) -> None:
    """Refuse a plan that would waste the run (see :meth:`RunPlan.refusal`) and one whose warmup outlasts it."""
    refusal = plan.refusal()
    if refusal:
        raise UserError(refusal)
    d = plan.cfg.data
    if plan.data.has_eval and plan.data.num_eval_examples == 0:
        raise UserError(f"the evaluation split of {d.dataset_name!r} holds no examples (eval_split={d.eval_split!r}, "
                        f"train_val_split={d.train_val_split}, max_eval_samples={d.max_eval_samples}); raise "
                        "train_val_split, or pass --train_val_split 0 to train without evaluation")
    if plan.warmup_steps and plan.warmup_steps >= plan.total_steps:
        raise UserError(f"warmup_epochs={plan.cfg.train.warmup_epochs} is {plan.warmup_steps} steps, not fewer than "
                        f"the run's {plan.total_steps} steps (max_train_steps); shorten the warmup")


def make_plan(cfg: RunConfig, state=None, splits=None) -> RunPlan:
    """Validate ``cfg``, read the dataset's metadata (the main process first) and resolve the plan for this launch;
    the plan keeps the opened splits (``plan.splits``) for the run to train on. ``state``: accelerate's process state
    (default: this launch's)."""
    from .data import DataSource, load_splits
    from .runtime import cpu_only_distributed, main_process_first

    source = DataSource.from_args(cfg.data)  # the dataset classified as a local folder or a Hub id, once per run
    validate(cfg, source)
    if state is None:
        from accelerate import PartialState

        state = PartialState(cpu=cpu_only_distributed())
    if splits is None:
        with main_process_first(state):
            splits = load_splits(source)
    plan = resolve_plan(cfg, state.num_processes, DataFacts.from_splits(splits, cfg.data))
    plan.splits = splits
    return plan


# ------------------------------------------------------------------------------------------------------- printing
def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if num_bytes < 1000 or unit == "TB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return "?"


def _hours(hours: float | None) -> str:
    if hours is None:
        return "?"
    return f"{hours * 60:.1f} min" if hours < 1 else f"{hours:.1f} h"


def table_cells(plan: RunPlan) -> dict[str, str]:
    """The plan's figures as labelled strings (one row of the study's table, or the lines of ``--dry_run``)."""
    limit = plan.cfg.train.checkpoints_total_limit
    kept = min(plan.checkpoints, limit) if limit else plan.checkpoints
    return {
        "processes x loader workers": f"{plan.processes} x {plan.loader_workers}",
        "micro / global batch (accumulation)": f"{plan.micro_batch} / {plan.global_batch} ({plan.accumulation})",
        "steps per epoch / in all (epochs)": f"{plan.steps_per_epoch} / {plan.total_steps} ({plan.epochs:.4g})",
        "images used per epoch / available": f"{plan.examples_used_per_epoch} / {plan.train_examples}",
        "stream rule, read amplification": f"{plan.stream_rule}, {plan.read_amplification:.3f}x",
        "bytes read per epoch / dataset": f"{_size(plan.bytes_read_per_epoch)} / {_size(plan.data.train_bytes)}",
        "loader worker start-ups": f"{plan.worker_startups}",
        "prefetched images in RAM per process": _size(plan.prefetch_bytes_per_process),
        "evaluations": f"{plan.evaluations}",
        "checkpoints (kept, size each)": f"{plan.checkpoints} ({kept}, {_size(plan.checkpoint_bytes)})",
        "GPU-hours / hours on 8 GPUs": f"{_hours(plan.gpu_hours)} / {_hours(plan.hours_on_8_gpus)}",
        "time from": plan.throughput_source,
    }


def plan_table(rows: list[tuple[str, RunPlan]]) -> str:
    """A markdown table, one row per named plan, with its verdict."""
    if not rows:
        return ""
    header = ["run", *table_cells(rows[0][1]).keys(), "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, plan in rows:
        refusal = plan.refusal()
        verdict = f"REFUSED: {refusal}" if refusal else "ok"
        lines.append("| " + " | ".join([name, *table_cells(plan).values(), verdict]) + " |")
    return "\n".join(lines)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub can be reached from here (offline mode says no at once; else one TCP connection)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def data_facts(cfg: RunConfig) -> DataFacts:
    """The dataset metadata of ``cfg`` (opened without decoding); where the dataset cannot be reached (the Hub,
    offline), the metadata recorded for well-known datasets (``hf_vit.rehearsal``), else a one-line error."""
    from .data import load_splits

    if not hub_reachable() and not os.path.exists(os.path.expanduser(cfg.data.dataset_name)):
        # Offline: datasets would retry the Hub for minutes before failing; the recorded metadata answers at once.
        try:
            from .rehearsal import recorded_data_facts
        except ImportError:
            recorded_data_facts = None
        facts = recorded_data_facts(cfg.data) if recorded_data_facts else None
        if facts is not None:
            return facts
    try:
        return DataFacts.from_splits(load_splits(cfg.data), cfg.data)
    except UserError as err:
        try:
            from .rehearsal import recorded_data_facts
        except ImportError:
            raise err from None
        facts = recorded_data_facts(cfg.data)
        if facts is None:
            raise
        return facts


def plan_study_table(study, processes: int | None = None, rehearse: bool = False) -> str:
    """The plan of every run of a study (``hf_vit.study_file.Study``) on ``processes`` processes (default: this
    launch's), as one markdown table. A run that fine-tunes an earlier run of the study is costed with that run's
    model."""
    from .config import parse_config

    if processes is None:
        from accelerate import PartialState

        from .runtime import cpu_only_distributed

        processes = PartialState(cpu=cpu_only_distributed()).num_processes
    rows, models = [], {}
    for run in study.runs:
        cfg = parse_config(run.argv())
        models[str(run.output_dir)] = cfg
        facts = data_facts(cfg)
        upstream = models.get(str(cfg.model.model_name_or_path)) if cfg.model.model_name_or_path else None
        model_cost = None
        if upstream is not None and not os.path.isdir(str(cfg.model.model_name_or_path)):
            model_cost = _model_cost(upstream, facts.num_classes)
        rows.append((run.name, resolve_plan(cfg, processes, facts, model_cost)))
    title = f"Run plans of {study.path} on {processes} process(es){' (rehearsal)' if rehearse else ''}:\n\n"
    return title + plan_table(rows)
