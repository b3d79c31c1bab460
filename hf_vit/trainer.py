"""Loop stage: the Accelerate training loop shared by pretraining and fine-tuning.

``train(cfg)`` builds data, model, optimizer and schedule, resumes if asked, trains with gradient accumulation,
evaluates, checkpoints atomically, reacts to preemption signals and non-finite losses, and leaves the final model,
image processor, results, plots and model card in ``output_dir``. The loop knows its data only through
:class:`hf_vit.data.TrainData` (whichever path serves it) and evaluates through :mod:`hf_vit.scoring`.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import datasets
import torch
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import CONFIG_FILE_NAME, RunConfig, check_crop_padding, save_config
from .data import ImageSpec, batch_mixer, build_eval_data, build_train_data, image_processor_for, normalize
from .errors import UserError
from .guards import check_bad_samples, check_nonfinite_streak, note_bad_examples
from .models import build_model, check_fits_in_memory, is_vit, model_config, num_parameters, training_flops_per_image
from .optim import EMA, build_optimizer, build_scheduler, classification_loss, is_head
from .outputs import hardware_description, write_final_outputs
from .plan import RunPlan, check_plan, make_plan
from .run_dir import TRACKER_DIR, FinalOutputs, check_output_dir_available, prepare_output_dir, record_created
from .runtime import Preemption, build_accelerator, configure_deepspeed, on_main_process, setup_logging
from .scoring import eval_results, evaluate_classifier
from .optim import step_unless

logger = logging.getLogger("hf_vit")


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
    epoch_plan: dict = field(default_factory=dict)  # examples and steps per epoch the position refers to


class StepResult(NamedTuple):
    """One optimizer step on this process. Its tensors stay on the device: reading one would wait for the step to
    finish, so the loop reads them a window of steps at a time (``Run._count``). The rest is known on the host."""

    loss_sum: torch.Tensor  # () float32: loss x examples, over the step's micro-batches
    correct: torch.Tensor  # () float32: examples whose argmax is the (dominant) label
    nonfinite: torch.Tensor  # () float32: 1.0 when the step was skipped (non-finite loss on any process, or gradient)
    examples: int  # examples trained on
    bad: int  # unusable examples skipped
    stop: bool  # a preemption signal had reached this process


@dataclass
class TrainWindow:
    """Train loss and accuracy accumulated since the last log line, and the steps not yet read from the device."""

    loss_sum: float = 0.0
    examples: float = 0.0
    correct: float = 0.0
    unread: list = field(default_factory=list)  # StepResults since the last read
    stop: bool = False  # some process asked to stop (known at a read)

    def add(self, step: StepResult) -> None:
        self.unread.append(step)

    def means(self) -> tuple[float, float]:
        if not self.examples:
            return float("nan"), float("nan")
        return self.loss_sum / self.examples, self.correct / self.examples


class Run:
    """One training run: builds everything from a RunConfig; ``fit()`` trains and writes the outputs."""

    def __init__(self, plan: RunPlan | RunConfig):
        if isinstance(plan, RunConfig):  # a config alone: resolve its plan for this launch first
            plan = make_plan(plan)
        check_plan(plan)
        self.plan, self.cfg, self.data = plan, plan.cfg, plan.splits
        cfg, train_args, data_args = plan.cfg, plan.cfg.train, plan.cfg.data
        self.accelerator = acc = build_accelerator(train_args.mixed_precision, train_args.report_to,
                                                   train_args.output_dir, train_args.gradient_accumulation_steps)
        if acc.num_processes != plan.processes:
            raise UserError(f"the run plan was made for {plan.processes} processes but this launch has "
                            f"{acc.num_processes}; plan it under the same launch")
        if acc.distributed_type == DistributedType.DEEPSPEED:
            configure_deepspeed(acc.state.deepspeed_plugin.deepspeed_config, train_args)
        self.resume_path = None
        if train_args.resume_from_checkpoint:
            self.resume_path = ckpt.resolve_resume_path(train_args.resume_from_checkpoint, train_args.output_dir,
                                                        train_args.hub_token)
            if self.resume_path is None:
                logger.warning("resume_from_checkpoint=latest: no checkpoint in %s yet, starting from scratch",
                               train_args.output_dir)
        # Read-only here; the folder is locked (and, with overwrite, emptied of the previous run) only once everything
        # else has been checked, just before the first write (_begin).
        on_main_process(acc, lambda: check_output_dir_available(train_args.output_dir, train_args.overwrite_output_dir,
                                                      resuming=train_args.resume_from_checkpoint is not None))
        self.lock = None
        set_seed(train_args.seed)

        self.label_names = self.data.label_names
        # Refuse what cannot fit before anything is allocated (an image_size typo can ask for hundreds of GB).
        check_fits_in_memory(model_config(cfg.model, self.label_names), train_args.per_device_train_batch_size,
                             acc.mixed_precision, acc.device)
        self.model = build_model(cfg.model, self.label_names)
        if acc.device.type == "cpu" and acc.mixed_precision == "bf16" and is_vit(self.model.config):
            # The same attention maths, but SDPA's bf16 CPU kernel makes the whole step much slower than plain matmul
            # attention (docs/performance.md); the choice is not saved with the model.
            self.model.set_attn_implementation("eager")
        if cfg.model.freeze_backbone:
            for name, p in self.model.named_parameters():
                p.requires_grad = is_head(name)
        self.processor = image_processor_for(self.model.config.image_size, data_args.crop_padding,
                                             cfg.model.model_name_or_path)
        self.spec = ImageSpec.from_processor(self.processor, data_args.crop_padding)
        check_crop_padding(data_args.crop_padding, self.spec.image_size)  # the preset's size is known only now

        self.train_data = build_train_data(self.data, self.spec, data_args, plan.topology, train_args.seed, acc,
                                           plan.data.unit_rows)
        self.eval_data = build_eval_data(self.data, self.spec, data_args.dataloader_num_workers,
                                         train_args.per_device_eval_batch_size, acc)
        self.steps_per_epoch, self.total_steps, self.warmup_steps = (plan.steps_per_epoch, plan.total_steps,
                                                                     plan.warmup_steps)

        self.optimizer = build_optimizer(self.model.to(acc.device), train_args)
        self.scheduler = build_scheduler(self.optimizer, train_args, self.total_steps, self.warmup_steps)
        if train_args.torch_compile:
            self.model = torch.compile(self.model)
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        self.ema = EMA(acc.unwrap_model(self.model), train_args.ema_decay) if train_args.ema_decay else None
        self.mixer = batch_mixer(data_args, len(self.label_names))
        self.mean = torch.tensor(self.spec.mean, device=acc.device)
        self.std = torch.tensor(self.spec.std, device=acc.device)
        self.state = LoopState(layout=self.train_data.layout,
                               epoch_plan={"num_train_examples": self.data.num_train_examples,
                                           "steps_per_epoch": self.steps_per_epoch})
        self.pusher = None

    # ------------------------------------------------------------------------------------------------ the loop
    def train_step(self, batches, preemption: Preemption | None = None) -> StepResult:
        """One optimizer step on ``gradient_accumulation_steps`` micro-batches drawn from the iterator ``batches``:
        forward, loss, backward, clipping, AdamW, EMA and the LR schedule; a non-finite loss or gradient skips the
        update. Nothing here waits for the device: the sums stay on it and the skip is decided there.
        Benchmarks time exactly this method (benchmarks/bench_train.py)."""
        args, acc, model = self.cfg.train, self.accelerator, self.model
        model.train()
        loss_sum = correct = torch.zeros((), device=acc.device)
        examples = bad = 0
        for _ in range(args.gradient_accumulation_steps):
            batch = next(batches)
            with acc.accumulate(model):  # gradients are all-reduced only on the step's last micro-batch
                pixels, targets = normalize(batch.pixel_values, self.mean, self.std), batch.labels
                if self.mixer is not None and len(targets):
                    pixels, targets = self.mixer(pixels, targets)
                if len(targets):
                    logits = model(pixel_values=pixels).logits
                    loss = classification_loss(logits, targets, args.label_smoothing)
                else:
                    loss = self._empty_batch_loss(pixels)
                acc.backward(loss)  # divided by the accumulation steps
            loss_sum = loss_sum + loss.detach().float() * len(targets)  # float32 sums, as the loop always kept them
            if len(targets):
                hard = targets if targets.ndim == 1 else targets.argmax(-1)  # MixUp/CutMix: the dominant label
                correct = correct + (logits.argmax(-1) == hard).sum()
            examples, bad = examples + len(targets), bad + len(batch.bad_keys)
            note_bad_examples(self.state, batch.bad_keys)
        # Skip on a non-finite loss on any process (a one-element all-reduce, queued on the device like the gradients')
        # or a non-finite global gradient norm: a finite loss can still give inf/NaN gradients, and one such update
        # poisons every weight. Under fp16 accelerate's GradScaler skips those itself (and must see them to lower its
        # scale); under DeepSpeed the engine has stepped inside backward: the flag then only counts and spares the EMA.
        nonfinite = (~torch.isfinite(loss_sum)).float()
        if acc.num_processes > 1:
            nonfinite = acc.reduce(nonfinite, "max")
        if args.max_grad_norm:
            grad_norm = acc.clip_grad_norm_(model.parameters(), args.max_grad_norm)  # None under DeepSpeed
            if acc.scaler is None and isinstance(grad_norm, torch.Tensor):
                nonfinite = torch.maximum(nonfinite, (~torch.isfinite(grad_norm)).float())
        if acc.scaler is None and acc.distributed_type != DistributedType.DEEPSPEED:
            step_unless(self.optimizer, nonfinite)  # fused AdamW leaves a skipped step out on the device
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(acc.unwrap_model(model), skip=nonfinite)
        self.scheduler.step()
        return StepResult(loss_sum, correct, nonfinite, examples, bad, preemption is not None and preemption.requested)

    def _empty_batch_loss(self, pixels: torch.Tensor) -> torch.Tensor:
        """A zero loss with a gradient graph through every parameter, for a micro-batch whose examples were all
        unusable: every rank must run backward. One blank image in eval mode, so that no BatchNorm statistic or
        dropout draw is spent on it."""
        self.model.eval()
        loss = self.model(pixel_values=pixels.new_zeros(1, *pixels.shape[1:])).logits.sum() * 0.0
        self.model.train()
        return loss

    def fit(self) -> dict:
        """Train to ``total_steps`` (or until preempted), evaluate, and write the final outputs; returns the
        results (``{"preempted": True, ...}`` when a signal stopped the run after saving a checkpoint)."""
        try:
            return self._fit()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _fit(self) -> dict:
        args, state = self.cfg.train, self.state
        self._begin()
        start_time, start_step = time.time(), state.global_step
        window, last_eval, preempted, batches = TrainWindow(), None, False, None
        self.evaluated_at = None
        # The signal handler stays on through the final evaluation and save: a signal there lets them finish.
        # closing: on any error the epoch's loader workers are shut down at once, not left to interpreter exit.
        with Preemption() as preemption, contextlib.ExitStack() as loaders:
            with self._progress_bar() as bar:
                while state.global_step < self.total_steps and not preempted:
                    if batches is None:  # a new epoch, or the rest of the one a resumed run stopped in
                        batches = loaders.enter_context(contextlib.closing(self._epoch_batches()))
                    window.add(self.train_step(batches, preemption))  # queued on the device, not waited for
                    state.global_step, state.step_in_epoch = state.global_step + 1, state.step_in_epoch + 1
                    bar.update(1)
                    end_of_epoch = state.step_in_epoch == self.steps_per_epoch
                    log_due = state.global_step % args.logging_steps == 0 or state.global_step == self.total_steps
                    # The loop's one read of the device (_count, the window's steps at once): at a log line, the end
                    # of an epoch or of training, and a checkpoint (_checkpoint_due). Counts, guards and preemption
                    # are settled there, so a signal stops the run up to logging_steps steps after it arrives.
                    if log_due or end_of_epoch:
                        self._count(window)
                    save_due = self._checkpoint_due(end_of_epoch, window)
                    preempted = window.stop
                    if log_due:
                        self._log_train(window, bar)
                        window = TrainWindow()
                    if self._evaluation_due(end_of_epoch):
                        last_eval = self._evaluate()
                    if end_of_epoch:
                        state.epoch, state.step_in_epoch = state.epoch + 1, 0
                        batches.close()  # shut the epoch's workers down before the next epoch starts new ones
                        batches = None
                        check_bad_samples(state, self.cfg.data.max_bad_sample_fraction, end_of_epoch=True)
                    if preempted or save_due:
                        self.save_checkpoint()
            loaders.close()
            if not preempted:
                if self.eval_data is not None and self.evaluated_at != state.global_step:
                    last_eval = self._evaluate()
                results = self._finish(last_eval, time.time() - start_time, state.global_step - start_step)
        self.accelerator.end_training()
        if preempted:
            if self.accelerator.is_main_process:
                print(f"Preempted: checkpoint saved at step {state.global_step} in {args.output_dir}; resume with "
                      "--resume_from_checkpoint latest", flush=True)
            return {"preempted": True, "global_step": state.global_step}
        return results

    # ------------------------------------------------------------------------------------- the loop's helpers
    def _progress_bar(self):
        # Closing the bar on the way out (also on an error) ends its line, so an `error:` message starts its own.
        return tqdm(total=self.total_steps, initial=self.state.global_step, desc="train",
                    disable=not self.accelerator.is_local_main_process)

    def _epoch_batches(self):
        """The rest of the current epoch's micro-batches: its order restarted, what it consumed skipped (by count,
        without decoding it)."""
        state, accumulation = self.state, self.cfg.train.gradient_accumulation_steps
        self.train_data.set_epoch(state.epoch, skip_micro_batches=state.step_in_epoch * accumulation)
        return iter(self.train_data)

    def _count(self, window: TrainWindow) -> None:
        """Read the window's unread steps from the device — one transfer for all of them (after one all-reduce when
        there are several processes: every rank reads at the same steps) — and count them step by step, as the loop
        did when it read every step: samples seen, unusable examples, skipped steps and their streak, the guards after
        each step (so a stop names the same steps), the window's loss and accuracy. Sets ``window.stop`` when any
        process asked to stop. Nothing to read: nothing happens."""
        steps, window.unread = window.unread, []
        if not steps:
            return
        acc, state, args = self.accelerator, self.state, self.cfg.train
        sums = torch.stack([t for s in steps for t in (s.loss_sum, s.correct, s.nonfinite)]).view(len(steps), 3)
        host = [[s.examples, s.bad, float(s.stop)] for s in steps]
        if acc.num_processes > 1:
            host = torch.tensor(host, dtype=sums.dtype).to(acc.device, non_blocking=True)
            rows = acc.reduce(torch.cat([sums, host], dim=1), "sum").tolist()
        else:
            rows = [device + known for device, known in zip(sums.tolist(), host)]
        first = state.global_step - len(steps) + 1
        for step, (loss_sum, correct, nonfinite, examples, bad, stop) in enumerate(rows, start=first):
            state.samples_seen += int(examples)
            state.bad_samples += int(bad)
            if nonfinite:
                state.nonfinite_steps += 1
                state.nonfinite_in_a_row += 1
                logger.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)", step,
                               state.nonfinite_in_a_row)
            else:
                state.nonfinite_in_a_row = 0
                window.loss_sum, window.examples = window.loss_sum + loss_sum, window.examples + examples
                window.correct += correct
            window.stop = window.stop or bool(stop)
            check_nonfinite_streak(state, args.max_nonfinite_steps, args.output_dir, step)
            check_bad_samples(state, self.cfg.data.max_bad_sample_fraction, end_of_epoch=False)

    def _log_train(self, window: TrainWindow, bar) -> None:
        loss, accuracy = window.means()
        lr = self.scheduler.get_last_lr()[0]
        self._log({"step": self.state.global_step, "epoch": self.state.global_step / self.steps_per_epoch,
                   "train_loss": loss, "train_accuracy": accuracy, "learning_rate": lr})
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.3f}", lr=f"{lr:.2e}")

    def _log(self, record: dict) -> None:
        self.state.log_history.append(record)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        self.accelerator.log(scalars, step=record["step"])

    def _evaluation_due(self, end_of_epoch: bool) -> bool:
        eval_steps = self.cfg.train.eval_steps
        if self.eval_data is None:
            return False
        return self.state.global_step % eval_steps == 0 if eval_steps else end_of_epoch

    def _checkpoint_due(self, end_of_epoch: bool, window: TrainWindow) -> bool:
        every = self.cfg.train.checkpointing_steps
        due = (str(every).isdigit() and self.state.global_step % int(every) == 0) or (every == "epoch" and end_of_epoch)
        if not due:
            return False
        # The checkpoint records the counts, and none is taken inside a run of non-finite steps (it may hold diverged
        # state, and its rotation would delete the last good checkpoint): both need the window's steps read first.
        # Saving waits for the device anyway.
        self._count(window)
        return not self.state.nonfinite_in_a_row

    # --------------------------------------------------------------------------------------- setup, evaluation
    def _begin(self) -> None:
        """Resume if asked, write the resolved config, start the trackers and say what will run."""
        from .hub import HubPusher

        cfg, args, acc = self.cfg, self.cfg.train, self.accelerator
        self.pusher = HubPusher.from_config(args) if acc.is_main_process else None
        if self.resume_path:
            self.load_checkpoint(self.resume_path)
        self.lock = on_main_process(acc, lambda: prepare_output_dir(args.output_dir, args.overwrite_output_dir,
                                                                    resuming=args.resume_from_checkpoint is not None))
        if acc.is_main_process:
            record_created(args.output_dir, CONFIG_FILE_NAME, TRACKER_DIR)
            # The effective precision (the launcher's when the flag was unset), so the file repeats this run as --config.
            cfg.train.mixed_precision = acc.mixed_precision
            save_config(cfg, args.output_dir, plan=self.plan.to_dict())
        acc.init_trackers("hf_vit", config={k: v for k, v in cfg.to_dict().items()
                                            if isinstance(v, (int, float, str, bool))})
        model = acc.unwrap_model(self.model)
        logger.info("Model: %s, %.2fM parameters, %.2f GFLOP per training image",
                    cfg.model.model_name_or_path or cfg.model.model_preset, num_parameters(model) / 1e6,
                    training_flops_per_image(model.config) / 1e9)
        logger.info("Data: %s, %d train examples per epoch (%s), %s eval examples, %d classes", cfg.data.dataset_name,
                    self.data.num_train_examples, self.data.num_train_examples_source, self.data.num_eval_examples,
                    len(self.label_names))
        logger.info("Batch: %d global = %d per device x %d processes x %d accumulation; %d steps/epoch, %d steps, "
                    "%d warmup", args.total_train_batch_size, args.per_device_train_batch_size, acc.num_processes,
                    args.gradient_accumulation_steps, self.steps_per_epoch, self.total_steps, self.warmup_steps)

    def save_checkpoint(self) -> None:
        # Every checkpoint records the run's identity (and the changes a resume accepted), so that a resume can tell
        # whether it continues the same run (checkpoint.check_identity).
        state = {**self.state.__dict__, "identity": self._run_identity(),
                 "accepted_changes": getattr(self, "_accepted_changes", [])}
        saved = ckpt.save(self.accelerator, self.cfg.train.output_dir, state, self.model, self.processor, self.ema)
        if saved is not None:
            ckpt.rotate(self.cfg.train.output_dir, self.cfg.train.checkpoints_total_limit)
            if self.pusher is not None:
                self.pusher.on_save(str(saved))
        self.accelerator.wait_for_everyone()

    def _run_identity(self) -> dict:
        if getattr(self, "_identity", None) is None:
            self._identity = ckpt.run_identity(self.cfg.to_dict(), self.accelerator.unwrap_model(self.model).config,
                                               self.data)
        return self._identity

    def load_checkpoint(self, path: str) -> None:
        args = self.cfg.train
        accepted = ckpt.parse_accepted_changes(getattr(args, "resume_accept_changes", None))
        ckpt.check_not_replacing_a_finished_run(path, args.output_dir, args.overwrite_output_dir)
        saved = ckpt.load(self.accelerator, path, self.state.layout, self.ema)
        saved_identity, history = saved.pop("identity", None), saved.pop("accepted_changes", [])
        plan, saved_plan = self.state.epoch_plan, saved.pop("epoch_plan", None)
        if saved["step_in_epoch"] and saved_plan not in (None, plan):
            raise UserError(f"checkpoint {path!r} is mid-epoch in an epoch of {saved_plan}, this run's epoch has "
                            f"{plan}; resume with the data settings it was written with (max_train_samples, "
                            "train_fraction, train_val_split, batch sizes)")
        if saved["step_in_epoch"] >= self.steps_per_epoch:
            raise UserError(f"checkpoint {path!r} is at step {saved['step_in_epoch']} of an epoch, past the end of "
                            f"this run's epochs of {self.steps_per_epoch} steps; resume with the data settings it was "
                            "written with")
        changes = ckpt.check_identity(path, saved_identity, self._run_identity(), accepted)
        self._accepted_changes = list(history) + [
            {"key": key, "checkpoint": old, "now": new, "at_step": saved["global_step"]}
            for key, (old, new) in changes.items()]
        for key, (old, new) in changes.items():
            logger.warning("resuming %s with %s changed (%r -> %r), as --resume_accept_changes allows; the run's "
                           "checkpoints record it", path, key, old, new)
        for key, value in saved.items():
            setattr(self.state, key, value)
        # The schedule is a pure function of the step: rebuild its position instead of unpickling it. Stepping it before
        # any optimizer step is the point here, so torch's warning about that order does not apply.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            for _ in range(self.state.global_step):
                self.scheduler.step()
        logger.info("Resumed from %s at step %d (epoch %d, step %d of it)", path, self.state.global_step,
                    self.state.epoch, self.state.step_in_epoch)

    def _evaluate(self) -> dict | None:
        """Evaluate (and the EMA weights too); None, with a warning, when no eval image was usable."""
        acc = self.accelerator
        self.evaluated_at = self.state.global_step
        # Per-example predictions only for the final evaluation (the one at the last step, in the loop or after it),
        # which the run saves: gathering every key across processes at each evaluation would be wasted.
        final = self.state.global_step >= self.total_steps
        raw = evaluate_classifier(acc.unwrap_model(self.model), self.eval_data, acc, self.mean, self.std,
                                  self.label_names, predictions=final)
        if raw is None:
            logger.warning("step %d: evaluation skipped, none of the eval images could be used (see the warning "
                           "above)", self.state.global_step)
            return None
        record = {"step": self.state.global_step, "epoch": self.state.global_step / self.steps_per_epoch,
                  **eval_results(raw)}
        if self.ema is not None:
            raw["ema"] = evaluate_classifier(self.ema.module, self.eval_data, acc, self.mean, self.std,
                                             self.label_names, predictions=final)
            record.update(eval_results(raw["ema"], prefix="eval_ema_"))
        self._log(record)
        logger.info("step %d: eval_accuracy %.4f%s", self.state.global_step, raw["accuracy"],
                    f", eval_ema_accuracy {record['eval_ema_accuracy']:.4f}" if self.ema else "")
        return raw

    def _finish(self, eval_metrics: dict | None, runtime: float, steps_this_run: int) -> dict:
        """Assemble all_results.json and write every final output (the EMA weights when they evaluate better)."""
        cfg, args, acc, state = self.cfg, self.cfg.train, self.accelerator, self.state
        model, final_weights = acc.unwrap_model(self.model), "raw"
        last_train = next((r for r in reversed(state.log_history) if "train_loss" in r), {})
        results = {"train_loss": last_train.get("train_loss"), "train_accuracy": last_train.get("train_accuracy"),
                   "train_samples_seen": state.samples_seen, "train_skipped_samples": state.bad_samples,
                   "train_nonfinite_steps": state.nonfinite_steps, "train_runtime": runtime,
                   "train_samples_per_second": (steps_this_run * args.total_train_batch_size) / max(runtime, 1e-9),
                   "epoch": state.global_step / self.steps_per_epoch, "global_step": state.global_step,
                   "num_parameters": num_parameters(model),
                   "training_flops_per_image": training_flops_per_image(model.config)}
        if eval_metrics is not None:
            results.update(eval_results(eval_metrics))
            if "ema" in eval_metrics:
                results["eval_ema_accuracy"] = eval_metrics["ema"]["accuracy"]
                if eval_metrics["ema"]["accuracy"] > eval_metrics["accuracy"]:
                    final_weights, model = "ema", self.ema.module
                    eval_metrics = {**eval_metrics["ema"], "ema": eval_metrics["ema"]}
        results["final_weights"] = final_weights
        predictions = {}
        if eval_metrics is not None:
            results["eval_fingerprint"], predictions["eval"] = eval_metrics["fingerprint"], eval_metrics["predictions"]
        for name, scored in self._score_final_sets(model).items():
            results.update({f"{name}_accuracy": scored["accuracy"], f"{name}_samples": scored["samples"],
                            f"{name}_fingerprint": scored["fingerprint"]})
            predictions[name] = scored["predictions"]
        # Under FSDP the raw weights are sharded: every rank takes part in gathering the full state dict. (The EMA
        # copy is a plain module on each rank.)
        state_dict = acc.get_state_dict(self.model) if final_weights == "raw" else None
        if acc.is_main_process:
            with FinalOutputs(args.output_dir) as staging:  # committed as a whole: a kill leaves the old set or the new
                write_final_outputs(staging, model, state_dict, self.processor, results, eval_metrics, final_weights,
                                    state.log_history, self.label_names, cfg.to_dict(), hardware_description(acc),
                                    predictions)
            if eval_metrics is not None:
                print(f"Final eval accuracy: {eval_metrics['accuracy']:.4f} ({eval_metrics['samples']} images of "
                      f"{cfg.data.dataset_name}, {final_weights} weights)", flush=True)
            if self.pusher is not None:
                self.pusher.on_end()
        acc.wait_for_everyone()
        return results

    def _score_final_sets(self, model) -> dict[str, dict]:
        """Score ``model`` (the final weights) once on ``test_split`` and on the first ``train_eval_samples`` images
        of the training set as the run trained on it (carve-out, subset and caps applied), both in eval mode with the
        eval transform: ``{"test" | "train_eval": evaluate_classifier's dict with predictions}``; a set with no
        usable image is left out, with evaluate_classifier's warning."""
        data_args, acc = self.cfg.data, self.accelerator
        sets = {}
        if self.data.test is not None:
            sets["test"] = self.data.test
        if data_args.train_eval_samples:
            train, n = self.data.train, data_args.train_eval_samples
            sets["train_eval"] = train.select(range(min(n, len(train)))) if isinstance(train, datasets.Dataset) \
                else train.take(n)
        scored = {}
        for name, split in sets.items():
            data = build_eval_data(self.data, self.spec, data_args.dataloader_num_workers,
                                   self.cfg.train.per_device_eval_batch_size, acc, split=split)
            metrics = evaluate_classifier(model, data, acc, self.mean, self.std, self.label_names, predictions=True)
            if metrics is not None:
                scored[name] = metrics
                logger.info("%s_accuracy %.4f on %d images", name, metrics["accuracy"], metrics["samples"])
        return scored


def train(cfg: RunConfig) -> dict:
    """Train according to ``cfg``; returns the final results (also written to all_results.json). With ``dry_run``,
    print the run plan and return it, training and writing nothing (a refused plan is still a one-line error)."""
    setup_logging()
    plan = make_plan(cfg)
    if cfg.train.dry_run:
        from accelerate import PartialState

        if PartialState().is_main_process:
            print(plan.describe(), flush=True)
        check_plan(plan)
        return {"dry_run": True, **plan.to_dict()}
    return Run(plan).fit()
