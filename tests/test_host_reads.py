"""The training step does not wait for the device (issue 17, item 5).

On a GPU every read of a device value — ``.item()``, ``.tolist()``, ``float(t)``, ``if t:``, a copy to the CPU, an op
whose output shape depends on the data — makes the host wait until the device has run everything queued before it, and
the device then idles while the host queues the next work. On the CPU the same calls cost nothing, so these tests
count them: a ``TorchFunctionMode`` records every such call the loop makes on any tensor (on the CPU every tensor is a
host tensor, so it counts the calls that would wait on a GPU). The data path, evaluation, checkpoint writing and the
run's setup and final outputs are not counted: they read host tensors or wait for the device by nature.

The loop reads the device once per logging window, and at the end of an epoch and at a checkpoint (whose counts must
be exact, and which waits for the device anyway); the step itself never does. The counts it reads late are counted
step by step as before, so the logged loss and accuracy, the non-finite skip and both guards behave as they did when
every step was read.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

import hf_vit.trainer as trainer
from hf_vit.config import parse_config
from hf_vit.trainer import Run
from test_hostile import args, one_error_line, saved_dataset
from test_hostile import run as train_in_process
from test_reliability import _InfGradient

# Calls that return a device value to the host, or whose output shape depends on device data (the host must wait).
READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__bool__,
         torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__complex__,
         torch.Tensor.__format__, torch.Tensor.__repr__, torch.equal, torch.allclose, torch.is_nonzero,
         torch.nonzero, torch.Tensor.nonzero, torch.argwhere, torch.masked_select, torch.Tensor.masked_select,
         torch.unique, torch.Tensor.unique, torch.unique_consecutive}


def _masks(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class ReadCounter(TorchFunctionMode):
    """Records ``(where, global_step, call)`` for every device read made while not paused."""

    def __init__(self, run: Run):
        super().__init__()
        self.run, self.where, self.paused, self.reads = run, "loop", 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        is_read = func in READS or (func is torch.Tensor.__getitem__ and _masks(args[1]))
        if is_read and not self.paused:
            self.reads.append((self.where, self.run.state.global_step, getattr(func, "__name__", str(func))))
        return func(*args, **(kwargs or {}))


class CountedRun(Run):
    """A Run whose loop is watched by ``self.counter`` (set before ``fit``)."""

    counter: ReadCounter

    def paused(self, method, *a, **kw):
        self.counter.paused += 1
        try:
            return method(*a, **kw)
        finally:
            self.counter.paused -= 1

    def train_step(self, batches, preemption=None):
        self.counter.where = "step"
        try:
            return super().train_step(_Unwatched(batches, self), preemption)
        finally:
            self.counter.where = "loop"

    def _begin(self):
        return self.paused(super()._begin)

    def _evaluate(self):
        return self.paused(super()._evaluate)

    def save_checkpoint(self):
        return self.paused(super().save_checkpoint)

    def _finish(self, *a):
        return self.paused(super()._finish, *a)


class _Unwatched:
    """The data iterator, not counted: its reads are the loader's, on host tensors."""

    def __init__(self, batches, run: CountedRun):
        self.batches, self.run = batches, run

    def __next__(self):
        return self.run.paused(next, self.batches)


def counted_fit(config_args: list[str]) -> tuple[CountedRun, list]:
    run = CountedRun(parse_config(config_args))
    run.counter = ReadCounter(run)
    with run.counter:
        run.fit()
    return run, run.counter.reads


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return saved_dataset(tmp_path_factory.mktemp("data") / "ds", n=80)


def test_the_step_never_reads_the_device_and_the_loop_reads_once_per_window(data, tmp_path):
    """10 steps, 5 per epoch, a log line every 3 steps, a checkpoint every 4; with gradient accumulation, clipping and
    an EMA. The step reads nothing; the loop reads once at each log line (3, 6, 9, and the last step), epoch end (5,
    10) and checkpoint (4, 8): 7 reads for 10 steps, never two at one step."""
    run, reads = counted_fit(args(data, tmp_path / "run", "--train_val_split", "0", "--logging_steps", "3",
                                  "--checkpointing_steps", "4", "--gradient_accumulation_steps", "2",
                                  "--max_grad_norm", "1.0", "--ema_decay", "0.9", "--learning_rate", "1e-3"))
    assert run.steps_per_epoch == 5 and run.state.global_step == 10
    assert [r for r in reads if r[0] == "step"] == []
    per_step = Counter(step for where, step, _ in reads if where == "loop")
    assert per_step == {3: 1, 4: 1, 5: 1, 6: 1, 8: 1, 9: 1, 10: 1}, reads
    assert {call for _, _, call in reads} == {"tolist"}
    # What was read late was counted all the same.
    assert run.state.samples_seen == 10 * 16 and run.state.nonfinite_steps == 0
    assert [r["step"] for r in run.state.log_history if "train_loss" in r] == [3, 6, 9, 10]


def test_logged_loss_and_accuracy_are_the_per_step_sums_counted_as_before(data, tmp_path, monkeypatch):
    """The log line's loss and accuracy, read once per window, equal the old per-step arithmetic exactly: each step's
    float32 sum of loss x examples, added up in Python over the window's finite steps (step 4's NaN loss is left out),
    divided by their examples."""
    real_loss, seen = trainer.classification_loss, []

    def recording_loss(logits, targets, smoothing):
        loss = real_loss(logits, targets, smoothing)
        if len(seen) == 3:
            loss = loss * math.nan
        hits = float((logits.argmax(-1) == targets).sum())
        seen.append((torch.tensor(loss.item(), dtype=torch.float32), len(targets), hits))
        return loss

    monkeypatch.setattr(trainer, "classification_loss", recording_loss)
    out = tmp_path / "run"
    code, err = train_in_process(args(data, out, "--train_val_split", "0", "--logging_steps", "3", "--max_train_steps", "8",
                         "--checkpointing_steps", "no"))
    assert code == 0, err
    logged = [r for r in json.loads((out / "log_history.json").read_text()) if "train_loss" in r]
    assert [r["step"] for r in logged] == [3, 6, 8]
    expected = []
    for first, last in ((0, 3), (3, 6), (6, 8)):
        loss_sum = examples = correct = 0.0
        for loss, n, hits in seen[first:last]:
            if math.isfinite(loss):
                loss_sum, examples, correct = loss_sum + (loss * n).item(), examples + n, correct + hits
        expected.append((loss_sum / examples, correct / examples))
    assert [(r["train_loss"], r["train_accuracy"]) for r in logged] == expected


def test_a_skipped_step_leaves_weights_ema_and_optimizer_state_exactly_as_they_were(data, tmp_path, monkeypatch):
    """A NaN loss (step 2) and an infinite gradient behind a finite loss (step 3) are skipped on the device: the
    weights, the EMA and AdamW's moments and step count are bit for bit those after step 1; step 4 trains again. The
    counts, read afterwards, say so."""
    run = Run(parse_config(args(data, tmp_path / "run", "--train_val_split", "0", "--ema_decay", "0.9",
                                 "--max_grad_norm", "1.0")))
    real_loss, calls = trainer.classification_loss, []

    def faulty_loss(logits, targets, smoothing):
        calls.append(1)
        loss = real_loss(logits, targets, smoothing)
        if len(calls) == 2:
            return loss * math.nan
        if len(calls) == 3:
            return _InfGradient.apply(loss)
        return loss

    monkeypatch.setattr(trainer, "classification_loss", faulty_loss)
    model, optimizer = run.accelerator.unwrap_model(run.model), run.optimizer.optimizer
    assert optimizer.defaults["fused"]
    run.train_data.set_epoch(0)
    batches, window = iter(run.train_data), trainer.TrainWindow()

    def snapshot() -> tuple[dict, dict, dict]:
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        ema = {k: v.clone() for k, v in run.ema.state_dict().items()}
        adamw = {f"{i}.{k}": v.clone() for i, p in enumerate(model.parameters()) for k, v in optimizer.state[p].items()}
        return weights, ema, adamw

    def equal(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    results = [run.train_step(batches)]
    after_first = snapshot()
    results += [run.train_step(batches), run.train_step(batches)]
    assert all(equal(a, b) for a, b in zip(after_first, snapshot()))
    assert [float(r.nonfinite) for r in results] == [0.0, 1.0, 1.0]
    results.append(run.train_step(batches))
    weights, ema, adamw = snapshot()
    assert not equal(after_first[0], weights) and not equal(after_first[1], ema)
    # AdamW did not count the two skipped steps either: its bias correction is that of a second step.
    assert {float(v) for k, v in adamw.items() if k.endswith(".step")} == {2.0}
    for r in results:
        window.add(r)
    run.state.global_step = 4
    run._count(window)
    state = run.state
    assert (state.nonfinite_steps, state.nonfinite_in_a_row, state.samples_seen) == (2, 0, 4 * 16)
    assert window.examples == 2 * 16  # the skipped steps' loss and accuracy are not in the log line


def test_a_streak_inside_a_window_still_stops_the_run_naming_its_steps(data, tmp_path, monkeypatch):
    """Steps 2-4 have NaN losses, step 5 is fine, and the first read is at step 5 (the log line and the end of the
    epoch): by then the streak is over, yet its three skipped steps in a row reach max_nonfinite_steps=3 as they did
    when every step was read, and the error names them."""
    real_loss, calls = trainer.classification_loss, []

    def faulty_loss(logits, targets, smoothing):
        calls.append(1)
        loss = real_loss(logits, targets, smoothing)
        return loss * math.nan if 2 <= len(calls) <= 4 else loss

    monkeypatch.setattr(trainer, "classification_loss", faulty_loss)
    code, err = train_in_process(args(data, tmp_path / "run", "--train_val_split", "0", "--logging_steps", "5",
                         "--max_nonfinite_steps", "3", "--checkpointing_steps", "no"))
    assert code == 2
    line = one_error_line(err)
    assert "3 non-finite losses or gradients in a row (steps 2-4)" in line, line
    assert len(calls) == 5  # stopped at the first read after the streak


def test_a_preemption_signal_is_acted_on_at_the_next_read(data, tmp_path):
    """The signal's flag, set during step 2, is agreed at the next read (the log line at step 3): the run saves
    checkpoint-3 and returns, as when a signal arrives (SIGTERM's handler sets the same flag)."""

    class SignalledRun(Run):
        def train_step(self, batches, preemption=None):
            if self.state.global_step == 1 and preemption is not None:
                preemption.requested = True
            return super().train_step(batches, preemption)

    out = tmp_path / "run"
    results = SignalledRun(parse_config(args(data, out, "--train_val_split", "0", "--logging_steps", "3",
                                             "--checkpointing_steps", "no"))).fit()
    assert results == {"preempted": True, "global_step": 3}
    assert (out / "checkpoint-3").is_dir()
