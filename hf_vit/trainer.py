"""Loop stage: the Accelerate training loop shared by pretraining and fine-tuning.

``train(cfg)`` builds data, model, optimizer and schedule, resumes if asked, trains with gradient accumulation,
evaluates, checkpoints atomically, reacts to preemption signals and non-finite losses, and leaves the final model,
image processor, results, plots and model card in ``output_dir``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import platform
import shutil
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import RunConfig, resolve_batch_sizes, save_config, validate
from .data import (DecodeCollate, ExampleStream, ImageSpec, batch_mixer, build_image_processor, build_loader,
                   eval_transform, load_splits, normalize, train_transform)
from .device_data import build_device_train_data
from .device_jpeg import DeviceJpegDecoder, JpegPlanCollate
from .errors import UserError
from .models import build_model, num_parameters, training_flops_per_image
from .optim import EMA, build_optimizer, build_scheduler, classification_loss

logger = logging.getLogger("hf_vit")
RUN_MARKERS = ("train_config.yaml", "all_results.json")


@dataclass
class LoopState:
    """Everything about the loop's position that a checkpoint must restore (saved as trainer_state.json)."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    samples_seen: int = 0
    bad_samples: int = 0
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    log_history: list = field(default_factory=list)
    bad_examples: list = field(default_factory=list)  # a few keys, for the error message
    layout: dict = field(default_factory=dict)  # processes / workers / micro-batch the data position refers to


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop finishes the current step, saves a checkpoint and exits 0."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        logger.warning("Received %s: finishing this step, then saving a checkpoint.", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _trackers(report_to: str) -> list[str] | None:
    if report_to == "none":
        return None
    if report_to == "auto":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return None
        return ["tensorboard"]
    if report_to == "all":
        return "all"
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    # accelerate silently drops a tracker whose package is missing; a run asked to log somewhere must not.
    names = [r.strip() for r in report_to.split(",") if r.strip()]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise UserError(f"report_to {name!r} is not a tracker; choose from {sorted(LOGGER_TYPE_TO_CLASS)}, "
                            "all, none or auto")
        if name not in available:
            raise UserError(f"report_to {name!r} needs the {name} package, which is not installed; install it or "
                            "pass --report_to none")
    return names


def _cpu_only_distributed() -> bool:
    """True for a multi-process launch on a machine without GPUs: accelerate then needs ``cpu=True`` to pick
    MULTI_CPU (gloo); without it each process would silently train alone."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def main_process_first(state):
    """The main process runs the block first (e.g. builds the datasets cache), the others then reuse its work.

    Unlike accelerate's ``main_process_first``, the main process reaches the barrier even when the block fails, so
    the other processes meet the same one-line error instead of a broken connection.
    """
    if not state.is_main_process:
        state.wait_for_everyone()
    try:
        yield
    finally:
        if state.is_main_process:
            state.wait_for_everyone()


def check_output_dir(cfg: RunConfig, resuming: bool) -> None:
    """Refuse to write into a folder that holds another run, unless overwriting or resuming it."""
    out = Path(cfg.train.output_dir)
    if not out.is_dir() or resuming or cfg.train.overwrite_output_dir:
        return
    if any((out / m).exists() for m in RUN_MARKERS) or ckpt.complete_checkpoints(str(out)):
        raise UserError(
            f"output_dir {str(out)!r} already holds a run; pass --overwrite_output_dir, "
            "--resume_from_checkpoint latest, or choose another folder"
        )


def evaluate_model(model, loader, stream: ExampleStream, accelerator: Accelerator, mean, std,
                   label_names: list[str], label_smoothing: float = 0.0) -> dict:
    """Evaluate over the whole eval set exactly once across processes; returns metrics incl. ``loss`` and ``samples``.

    Ranks may hold different numbers of eval examples, so predictions are gathered once at the end (padded, then
    unpadded by the per-rank counts) rather than per batch.
    """
    from .evaluation import compute_metrics

    model.eval()
    stream.set_epoch(0)
    logits_all, labels_all, loss_sum = [], [], 0.0
    with torch.no_grad():
        for batch in loader:
            if not len(batch["labels"]):
                continue
            pixels = normalize(batch["pixel_values"].to(accelerator.device, non_blocking=True), mean, std)
            labels = batch["labels"].to(accelerator.device)
            with accelerator.autocast():
                logits = model(pixel_values=pixels).logits.float()
            loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            logits_all.append(logits)
            labels_all.append(labels)
    num_classes = len(label_names)
    logits = torch.cat(logits_all) if logits_all else torch.zeros(0, num_classes, device=accelerator.device)
    labels = torch.cat(labels_all) if labels_all else torch.zeros(0, dtype=torch.long, device=accelerator.device)
    counts = accelerator.gather(torch.tensor([len(labels)], device=accelerator.device)).tolist()
    logits = accelerator.gather(accelerator.pad_across_processes(logits, dim=0))
    labels = accelerator.gather(accelerator.pad_across_processes(labels, dim=0))
    loss_total = accelerator.reduce(torch.tensor([loss_sum], device=accelerator.device), "sum").item()
    # Unpad: each rank contributed max(counts) rows, of which its own count are real.
    width = max(counts) if counts else 0
    keep = torch.cat([torch.arange(r * width, r * width + c) for r, c in enumerate(counts)]) if width else None
    logits, labels = (logits[keep], labels[keep]) if keep is not None else (logits, labels)
    n = int(sum(counts))
    metrics = compute_metrics(logits.cpu().numpy(), labels.cpu().numpy(), label_names)
    metrics["loss"] = loss_total / max(1, n)
    metrics["samples"] = n
    return metrics


def _top5(metrics: dict) -> float:
    """The top-k accuracy (k = 5, or the class count when there are fewer classes)."""
    return next(v for k, v in metrics.items() if k.startswith("top") and k.endswith("_accuracy"))


def _log(accelerator: Accelerator, state: LoopState, record: dict) -> None:
    state.log_history.append(record)
    scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
    accelerator.log(scalars, step=record["step"])


def configure_deepspeed(ds_config: dict, t) -> None:
    """Fill in what DeepSpeed cannot learn from this loop (in place; docs/scaling.md, "DeepSpeed ZeRO-2").

    The loop hands accelerate no dataloader (it shards batches itself), so the micro-batch cannot stay "auto"; the
    engine steps inside ``accelerator.backward`` on every micro-batch, so the loop's own accumulation (``no_sync`` on
    all but the last micro-batch) would step it K times per step: the global batch must come from processes x
    per-device batch alone; and clipping is the engine's, so it gets ``max_grad_norm`` (0 turns it off in DeepSpeed).
    """
    if t.gradient_accumulation_steps != 1:
        raise UserError(
            f"gradient_accumulation_steps={t.gradient_accumulation_steps} cannot be used under DeepSpeed (its engine "
            "steps on every micro-batch); keep it at 1 so that total_train_batch_size is split over the processes "
            "alone, or launch with DDP or FSDP"
        )
    ds_config["train_micro_batch_size_per_gpu"] = t.per_device_train_batch_size
    ds_config["gradient_accumulation_steps"] = 1
    if ds_config.get("gradient_clipping", "auto") == "auto":
        ds_config["gradient_clipping"] = float(t.max_grad_norm or 0.0)


# Processes up to which streaming's read-everything sharding keeps up with ViT-B/16 on H200-class GPUs (computed in
# docs/scaling.md, "Streaming: read amplification").
STREAMING_PROCESSES_THAT_KEEP_UP = 4


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


class Run:
    """One training run: builds everything from a RunConfig; ``fit()`` trains and writes the outputs."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        t, d = cfg.train, cfg.data
        validate(cfg)
        self.accelerator = Accelerator(
            mixed_precision=t.mixed_precision,  # None: the launcher's setting (accelerate config / env)
            log_with=_trackers(t.report_to),
            project_dir=t.output_dir,
            # Batches are sharded by our own rule (data.py); accelerate never re-shards or dispatches them.
            dataloader_config=DataLoaderConfiguration(dispatch_batches=False, split_batches=False),
            step_scheduler_with_optimizer=False,
            cpu=_cpu_only_distributed(),
        )
        acc = self.accelerator
        resolve_batch_sizes(t, acc.num_processes)
        if acc.distributed_type == DistributedType.DEEPSPEED:
            configure_deepspeed(acc.state.deepspeed_plugin.deepspeed_config, t)
        self.resume_path = None
        if t.resume_from_checkpoint:
            self.resume_path = ckpt.resolve_resume_path(t.resume_from_checkpoint, t.output_dir, t.hub_token)
            if self.resume_path is None:
                logger.warning("resume_from_checkpoint=latest: no checkpoint in %s yet, starting from scratch",
                               t.output_dir)
        check_output_dir(cfg, resuming=t.resume_from_checkpoint is not None)
        set_seed(t.seed)

        with main_process_first(acc):
            self.data = load_splits(d, t.seed)
        self.label_names = self.data.label_names
        self.model = build_model(cfg.model, self.label_names)
        if acc.device.type == "cpu" and acc.mixed_precision == "bf16":
            # The same attention maths, but SDPA's bf16 CPU kernel makes the whole step ~2x slower than plain matmul
            # attention (docs/performance.md); the choice is not saved with the model.
            self.model.set_attn_implementation("eager")
        if cfg.model.freeze_backbone:
            for name, p in self.model.named_parameters():
                p.requires_grad = name.startswith("classifier.")
        self.processor = self._image_processor()
        self.spec = ImageSpec.from_processor(self.processor, d.crop_padding)

        workers = d.dataloader_num_workers
        pin = acc.device.type == "cuda"
        self.device_decoder = None
        if d.data_on_device:
            # The decoded train split lives on the device and serves augmented batches itself: it stands in for the
            # stream, the collate (whose epoch the loop sets) and the loader, with one consumer per process.
            self.train_stream = self.train_collate = self.train_loader = build_device_train_data(
                self.data, self.spec, d, t.per_device_train_batch_size, acc.process_index, acc.num_processes,
                t.seed, acc.device)
        else:
            self.train_stream = ExampleStream(self.data.train, t.per_device_train_batch_size, acc.process_index,
                                              acc.num_processes, workers, t.seed, shuffle=True,
                                              shuffle_buffer_size=d.shuffle_buffer_size,
                                              num_examples=self.data.num_train_examples, sharding=d.stream_sharding)
            transform = train_transform(self.spec, d)
            if d.decode_on_device:  # workers hand over JPEG bytes and crop plans; train_step decodes on the device
                self.train_collate = JpegPlanCollate(transform, self.data.image_column, self.data.label_column,
                                                     len(self.label_names), t.seed)
                self.device_decoder = DeviceJpegDecoder(transform, acc.device)
            else:
                self.train_collate = DecodeCollate(transform, self.data.image_column, self.data.label_column,
                                                   len(self.label_names), t.seed, train=True)
            self.train_loader = build_loader(self.train_stream, self.train_collate, workers, pin)
        micro = self.train_stream.micro_batches_per_epoch(self.data.num_train_examples)
        self.steps_per_epoch = micro // t.gradient_accumulation_steps
        if self.steps_per_epoch == 0:
            raise UserError(
                f"an epoch of {self.data.num_train_examples} examples is smaller than one optimizer step of "
                f"{t.total_train_batch_size} (x {max(1, workers)} loader workers per process); lower "
                "total_train_batch_size or dataloader_num_workers"
            )
        self.total_steps = t.max_train_steps or math.ceil(t.num_train_epochs * self.steps_per_epoch)
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.warmup_steps = round(t.warmup_epochs * self.steps_per_epoch)
        self.eval_loader = self.eval_stream = None
        if self.data.eval is not None:
            self.eval_stream = ExampleStream(self.data.eval, t.per_device_eval_batch_size, acc.process_index,
                                             acc.num_processes, workers, t.seed, shuffle=False,
                                             drop_incomplete_round=False)
            eval_collate = DecodeCollate(eval_transform(self.spec), self.data.image_column, self.data.label_column,
                                         len(self.label_names), t.seed, train=False)
            self.eval_loader = build_loader(self.eval_stream, eval_collate, workers, pin)

        self.optimizer = build_optimizer(self.model.to(acc.device), t)
        self.scheduler = build_scheduler(self.optimizer, t, self.total_steps, self.warmup_steps)
        if t.torch_compile:
            self.model = torch.compile(self.model)
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        self.ema = EMA(acc.unwrap_model(self.model), t.ema_decay) if t.ema_decay else None
        self.mixer = batch_mixer(d, len(self.label_names))
        self.mean = torch.tensor(self.spec.mean, device=acc.device)
        self.std = torch.tensor(self.spec.std, device=acc.device)
        # data_on_device shards like a loader without workers (one consumer per process), whatever eval's workers.
        self.state = LoopState(layout={"num_processes": acc.num_processes,
                                       "dataloader_num_workers": 0 if d.data_on_device else workers,
                                       "per_device_train_batch_size": t.per_device_train_batch_size})

    # ------------------------------------------------------------------------------------------------- helpers
    def _image_processor(self):
        """Mean/std from the checkpoint's processor when fine-tuning (the backbone expects them), else ImageNet's;
        sizes from the model config."""
        mean = std = None
        if self.cfg.model.model_name_or_path:
            try:
                from transformers import AutoImageProcessor

                source = AutoImageProcessor.from_pretrained(self.cfg.model.model_name_or_path)
                mean, std = source.image_mean, source.image_std
            except (OSError, ValueError):
                logger.info("No image processor in %s; using ImageNet mean/std", self.cfg.model.model_name_or_path)
        return build_image_processor(self.model.config.image_size, self.cfg.data.crop_padding, mean, std)

    def _log_setup(self) -> None:
        t, acc = self.cfg.train, self.accelerator
        logger.info("Model: %s, %.2fM parameters, %.2f GFLOP per training image",
                    self.cfg.model.model_name_or_path or self.cfg.model.model_preset,
                    num_parameters(acc.unwrap_model(self.model)) / 1e6,
                    training_flops_per_image(acc.unwrap_model(self.model).config) / 1e9)
        logger.info("Data: %s, %d train examples per epoch (%s), %s eval examples, %d classes",
                    self.cfg.data.dataset_name, self.data.num_train_examples, self.data.num_train_examples_source,
                    self.data.num_eval_examples, len(self.label_names))
        logger.info("Batch: %d global = %d per device x %d processes x %d accumulation; %d steps/epoch, %d steps, "
                    "%d warmup", t.total_train_batch_size, t.per_device_train_batch_size, acc.num_processes,
                    t.gradient_accumulation_steps, self.steps_per_epoch, self.total_steps, self.warmup_steps)
        if self.cfg.data.streaming and not self.cfg.data.data_on_device:
            logger.log(*streaming_note(acc.num_processes, self.cfg.data.dataloader_num_workers,
                                       self.cfg.data.stream_sharding, getattr(self.data.train, "num_shards", None)))

    def save_checkpoint(self) -> None:
        acc, s = self.accelerator, self.state
        tmp = Path(self.cfg.train.output_dir) / f"checkpoint-{s.global_step}.tmp"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        # Every rank writes its own RNG state (and, under FSDP, its shard) into tmp: finalise only once all are done.
        acc.wait_for_everyone()
        if acc.is_main_process:
            unwrapped = acc.unwrap_model(self.model)
            unwrapped.config.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)
            if self.ema is not None:
                save_file({k: v.contiguous() for k, v in self.ema.module.state_dict().items()},
                          str(tmp / "ema.safetensors"))
            final = ckpt.finalize(tmp, {**s.__dict__, "n_averaged": int(self.ema.n_averaged) if self.ema else 0})
            ckpt.rotate(self.cfg.train.output_dir, self.cfg.train.checkpoints_total_limit)
            if self.pusher is not None:
                self.pusher.on_save(str(final))
        acc.wait_for_everyone()

    def load_checkpoint(self, path: str) -> None:
        acc = self.accelerator
        saved = ckpt.read_state(path)
        layout = saved.get("layout", {})
        if layout.get("num_processes") != acc.num_processes:
            raise UserError(
                f"checkpoint {path!r} was written by {layout.get('num_processes')} processes, this run has "
                f"{acc.num_processes}; resume with the same --num_processes (the data position and per-process RNG "
                "states are per process)"
            )
        if saved["step_in_epoch"] and layout != self.state.layout:
            raise UserError(
                f"checkpoint {path!r} is mid-epoch with data layout {layout}, this run has {self.state.layout}; "
                "resume with the same dataloader_num_workers and batch sizes"
            )
        missing = ckpt.missing_files(path, acc.num_processes, with_ema=self.ema is not None and
                                     saved.get("n_averaged", 0) > 0, with_scaler=acc.scaler is not None)
        if missing:
            raise UserError(f"checkpoint {path!r} is incomplete (missing {missing}); resume from another checkpoint")
        try:
            # Loads model.safetensors, and optimizer.bin / random_states_<rank>.pkl / scaler.pt with weights_only=True.
            acc.load_state(path)
        except (RuntimeError, ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
            raise UserError(f"checkpoint {path!r} does not fit this run ({str(err).splitlines()[0][:300]}); resume "
                            "with the model and optimizer settings it was written with") from None
        n_averaged = saved.pop("n_averaged", 0)
        for key, value in saved.items():
            setattr(self.state, key, value)
        if self.ema is not None and os.path.isfile(os.path.join(path, "ema.safetensors")):
            self.ema.module.load_state_dict(load_file(os.path.join(path, "ema.safetensors"), device=str(acc.device)))
            self.ema.n_averaged.fill_(n_averaged)
        # The schedule is a pure function of the step: rebuild its position instead of unpickling it. Stepping it before
        # any optimizer step is the point here, so torch's warning about that order does not apply.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            for _ in range(self.state.global_step):
                self.scheduler.step()
        logger.info("Resumed from %s at step %d (epoch %d, step %d of it)", path, self.state.global_step,
                    self.state.epoch, self.state.step_in_epoch)

    def _evaluate(self) -> dict:
        acc, s = self.accelerator, self.state
        raw = evaluate_model(acc.unwrap_model(self.model), self.eval_loader, self.eval_stream, acc, self.mean,
                             self.std, self.label_names)
        record = {"step": s.global_step, "epoch": s.global_step / self.steps_per_epoch,
                  "eval_accuracy": raw["accuracy"], "eval_top5_accuracy": _top5(raw),
                  "eval_loss": raw["loss"]}
        if self.ema is not None:
            ema = evaluate_model(self.ema.module, self.eval_loader, self.eval_stream, acc, self.mean, self.std,
                                 self.label_names)
            record.update(eval_ema_accuracy=ema["accuracy"], eval_ema_top5_accuracy=_top5(ema),
                          eval_ema_loss=ema["loss"])
            raw["ema"] = ema
        _log(acc, s, record)
        if acc.is_main_process:
            logger.info("step %d: eval_accuracy %.4f%s", s.global_step, raw["accuracy"],
                        f", eval_ema_accuracy {record['eval_ema_accuracy']:.4f}" if self.ema else "")
        return raw

    # ------------------------------------------------------------------------------------------------ the loop
    def train_step(self, batches, preemption: Preemption | None = None) -> list[float]:
        """One optimizer step on ``gradient_accumulation_steps`` micro-batches drawn from the iterator ``batches``:
        forward, loss, backward, clipping, AdamW, EMA and the LR schedule; a non-finite loss skips the update.

        Returns ``[loss sum, examples, bad examples, non-finite, stop]`` summed over processes (stop: some process
        received a preemption signal). Benchmarks time exactly this method (benchmarks/bench_train.py).
        """
        t, acc, s = self.cfg.train, self.accelerator, self.state
        model, optimizer, accum = self.model, self.optimizer, t.gradient_accumulation_steps
        model.train()
        totals = torch.zeros(5, device=acc.device)  # loss sum, examples, bad, non-finite, stop
        for micro in range(accum):
            batch = next(batches)
            if self.device_decoder is not None:
                batch = self.device_decoder(batch)  # decode_on_device: the JPEGs are decoded and cropped here
            # Gradients are all-reduced only on the last micro-batch of the step.
            sync = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(model)
            with sync:
                pixels = normalize(batch["pixel_values"].to(acc.device, non_blocking=True), self.mean, self.std)
                targets = batch["labels"].to(acc.device, non_blocking=True)
                if self.mixer is not None and len(targets):
                    pixels, targets = self.mixer(pixels, targets)
                if not len(targets):  # ViT cannot run on 0 images: one blank image, and a zero loss below
                    pixels = pixels.new_zeros(1, *pixels.shape[1:])
                logits = model(pixel_values=pixels).logits
                loss = classification_loss(logits, targets, t.label_smoothing) if len(targets) \
                    else logits.sum() * 0.0  # every rank must run backward, even on an empty batch
                acc.backward(loss / accum)
            totals += torch.tensor([loss.item() * len(targets), len(targets), len(batch["bad_keys"]),
                                    float(not math.isfinite(loss.item())), 0.0], device=acc.device)
            if batch["bad_keys"] and len(s.bad_examples) < 10:
                s.bad_examples.extend(batch["bad_keys"][: 10 - len(s.bad_examples)])
                logger.warning("skipped unusable examples: %s", batch["bad_keys"])
        totals[4] = float(preemption is not None and preemption.requested)
        # One small all-reduce per step: every rank takes the same skip/stop decisions.
        totals = acc.reduce(totals, "sum").tolist()
        if not totals[3] and t.max_grad_norm:
            grad_norm = acc.clip_grad_norm_(model.parameters(), t.max_grad_norm)  # None under DeepSpeed
            # A finite loss can still give inf/NaN gradients, and one such update poisons every weight. (Under fp16
            # the grad scaler skips those steps itself, and must see them to lower its scale.) The norm is global,
            # so every rank decides alike.
            totals[3] = float(acc.scaler is None and grad_norm is not None and not math.isfinite(float(grad_norm)))
        if totals[3]:
            optimizer.zero_grad(set_to_none=True)
            s.nonfinite_steps += 1
            s.nonfinite_in_a_row += 1
            logger.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)", s.global_step + 1,
                           s.nonfinite_in_a_row)
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            s.nonfinite_in_a_row = 0
            if self.ema is not None:
                self.ema.update_parameters(acc.unwrap_model(model))
        self.scheduler.step()
        return totals

    def fit(self) -> dict:
        from .hub import HubPusher

        cfg, t, acc, s = self.cfg, self.cfg.train, self.accelerator, self.state
        self.pusher = HubPusher.from_config(t) if acc.is_main_process else None
        if self.resume_path:
            self.load_checkpoint(self.resume_path)
        if acc.is_main_process:
            os.makedirs(t.output_dir, exist_ok=True)
            save_config(cfg, t.output_dir)
        acc.init_trackers("hf_vit", config={k: v for k, v in cfg.to_dict().items()
                                            if isinstance(v, (int, float, str, bool))})
        self._log_setup()
        accum = t.gradient_accumulation_steps
        start_time, start_step, last_eval = time.time(), s.global_step, None
        bar = tqdm(total=self.total_steps, initial=s.global_step, disable=not acc.is_local_main_process,
                   desc="train")
        save_every = int(t.checkpointing_steps) if str(t.checkpointing_steps).isdigit() else None
        loss_window, preempted = [], False
        # Closing the bar on the way out (also on an error) ends its line, so an `error:` message starts its own.
        with Preemption() as preemption, bar:
            while s.global_step < self.total_steps and not preempted:
                # Restart the epoch's order and skip what this epoch already consumed (no decoding of skipped data).
                self.train_stream.set_epoch(s.epoch, skip_micro_batches=s.step_in_epoch * accum)
                self.train_collate.epoch = s.epoch
                # Creating the iterator draws the workers' base seed from the global torch RNG; fork it so that a run
                # resumed mid-epoch (one extra draw) keeps the RNG stream dropout and MixUp see bit for bit.
                with torch.random.fork_rng(devices=[]):
                    batches = iter(self.train_loader)
                while s.step_in_epoch < self.steps_per_epoch and s.global_step < self.total_steps:
                    loss_sum, seen, bad, nonfinite, stop = self.train_step(batches, preemption)
                    s.global_step += 1
                    s.step_in_epoch += 1
                    s.samples_seen += int(seen)
                    s.bad_samples += int(bad)
                    bar.update(1)
                    if not nonfinite:
                        loss_window.append(loss_sum / max(1.0, seen))
                    if s.nonfinite_in_a_row >= t.max_nonfinite_steps:
                        good = ckpt.complete_checkpoints(t.output_dir)
                        raise UserError(
                            f"{s.nonfinite_in_a_row} non-finite losses or gradients in a row (steps "
                            f"{s.global_step - s.nonfinite_in_a_row + 1}-{s.global_step}); stopping. Lower "
                            "learning_rate, keep max_grad_norm on, or use bf16 instead of fp16; the last good "
                            f"checkpoint is {str(good[-1]) if good else 'none (none was saved before the first one)'}"
                        )
                    self._check_bad_samples(end_of_epoch=False)
                    if s.global_step % t.logging_steps == 0 or s.global_step == self.total_steps:
                        lr = self.scheduler.get_last_lr()[0]
                        _log(acc, s, {"step": s.global_step, "epoch": s.global_step / self.steps_per_epoch,
                                      "train_loss": float(np.mean(loss_window)) if loss_window else float("nan"),
                                      "learning_rate": lr})
                        bar.set_postfix(loss=f"{np.mean(loss_window):.4f}" if loss_window else "nan", lr=f"{lr:.2e}")
                        loss_window = []
                    end_of_epoch = s.step_in_epoch == self.steps_per_epoch
                    if self.eval_loader is not None and (
                            (t.eval_steps and s.global_step % t.eval_steps == 0)
                            or (not t.eval_steps and end_of_epoch)):
                        last_eval = self._evaluate()
                    if end_of_epoch:
                        s.epoch, s.step_in_epoch = s.epoch + 1, 0
                        self._check_bad_samples(end_of_epoch=True)
                    if stop:
                        preempted = True
                        self.save_checkpoint()
                        break
                    # No checkpoint inside a run of non-finite steps: it may hold diverged state, and its rotation
                    # would delete the last good checkpoint.
                    if ((save_every and s.global_step % save_every == 0) or (
                            t.checkpointing_steps == "epoch" and end_of_epoch)) and not s.nonfinite_in_a_row:
                        self.save_checkpoint()
                    if end_of_epoch:
                        break
                del batches  # shut the epoch's workers down before the next epoch starts new ones
        bar.close()
        runtime = time.time() - start_time
        if preempted:
            if acc.is_main_process:
                print(f"Preempted: checkpoint saved at step {s.global_step} in {t.output_dir}; resume with "
                      "--resume_from_checkpoint latest", flush=True)
            acc.end_training()
            return {"preempted": True, "global_step": s.global_step}
        if self.eval_loader is not None and (last_eval is None or s.log_history[-1].get("step") != s.global_step
                                             or "eval_accuracy" not in s.log_history[-1]):
            last_eval = self._evaluate()
        results = self._finish(last_eval, runtime, s.global_step - start_step)
        acc.end_training()
        return results

    def _check_bad_samples(self, end_of_epoch: bool) -> None:
        s, limit = self.state, self.cfg.data.max_bad_sample_fraction
        seen = s.samples_seen + s.bad_samples
        # Judge the fraction once it is meaningful: after 1000 images, or at the end of an epoch.
        if s.bad_samples and (seen >= 1000 or end_of_epoch) and s.bad_samples / seen > limit:
            raise UserError(
                f"{s.bad_samples} of {seen} training images were unusable ({s.bad_samples / seen:.1%} > "
                f"max_bad_sample_fraction={limit}), e.g. {s.bad_examples[:3]}; fix the data or raise the limit"
            )

    # --------------------------------------------------------------------------------------------- the outputs
    def _finish(self, eval_metrics: dict | None, runtime: float, steps_this_run: int) -> dict:
        from .report import plot_confusion_matrix, plot_learning_curve, write_model_card

        cfg, t, acc, s = self.cfg, self.cfg.train, self.accelerator, self.state
        model = acc.unwrap_model(self.model)
        final_weights = "raw"
        results = {"train_loss": next((r["train_loss"] for r in reversed(s.log_history) if "train_loss" in r),
                                      None),
                   "train_samples_seen": s.samples_seen, "train_skipped_samples": s.bad_samples,
                   "train_nonfinite_steps": s.nonfinite_steps, "train_runtime": runtime,
                   "train_samples_per_second": (steps_this_run * t.total_train_batch_size) / max(runtime, 1e-9),
                   "epoch": s.global_step / self.steps_per_epoch, "global_step": s.global_step,
                   "num_parameters": num_parameters(model)}
        if eval_metrics is not None:
            results.update(eval_accuracy=eval_metrics["accuracy"], eval_top5_accuracy=_top5(eval_metrics),
                           eval_loss=eval_metrics["loss"], eval_samples=eval_metrics["samples"])
            if "ema" in eval_metrics:
                results["eval_ema_accuracy"] = eval_metrics["ema"]["accuracy"]
                if eval_metrics["ema"]["accuracy"] > eval_metrics["accuracy"]:
                    final_weights = "ema"
                    model = self.ema.module
                    eval_metrics = {**eval_metrics["ema"], "ema": eval_metrics["ema"]}
        results["final_weights"] = final_weights
        # Under FSDP the raw weights are sharded: every rank takes part in gathering the full state dict. (The EMA
        # copy is a plain module on each rank.)
        state_dict = acc.get_state_dict(self.model) if final_weights == "raw" else None
        if acc.is_main_process:
            out = Path(t.output_dir)
            model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
            self.processor.save_pretrained(out)
            with open(out / "all_results.json", "w") as f:
                json.dump(results, f, indent=2)
            with open(out / "log_history.json", "w") as f:
                json.dump(s.log_history, f, indent=1)
            if eval_metrics is not None:
                eval_results = {"eval_accuracy": eval_metrics["accuracy"],
                                "eval_top5_accuracy": _top5(eval_metrics),
                                "eval_loss": eval_metrics["loss"], "eval_samples": eval_metrics["samples"],
                                "eval_weights": final_weights, "per_class": eval_metrics["per_class"],
                                "confusion_matrix": eval_metrics["confusion_matrix"]}
                with open(out / "eval_results.json", "w") as f:
                    json.dump(eval_results, f, indent=2)
                plot_confusion_matrix(eval_metrics["confusion_matrix"], self.label_names, out / "confusion_matrix.png")
            plot_learning_curve(s.log_history, out / "learning_curve.png")
            hardware = (f"{acc.num_processes} x {torch.cuda.get_device_name() if acc.device.type == 'cuda' else 'CPU'}"
                        f" ({platform.processor() or platform.machine()}), mixed_precision={acc.mixed_precision}")
            write_model_card(out, cfg.to_dict(), results, self.label_names, hardware, runtime,
                             cfg.data.dataset_name, cfg.model.model_name_or_path or cfg.model.model_preset)
            if eval_metrics is not None:
                print(f"Final eval accuracy: {eval_metrics['accuracy']:.4f} ({eval_metrics['samples']} images of "
                      f"{cfg.data.dataset_name}, {final_weights} weights)", flush=True)
            if self.pusher is not None:
                self.pusher.on_end()
        acc.wait_for_everyone()
        return results


def train(cfg: RunConfig) -> dict:
    """Train according to ``cfg``; returns the final results (also written to all_results.json)."""
    # Only the main process logs at INFO; the others report warnings and errors.
    main_process = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if main_process else logging.WARNING)
    for noisy in ("httpx", "urllib3", "filelock", "fsspec", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return Run(cfg).fit()
