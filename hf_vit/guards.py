"""The loop's guards: what stops a run that can no longer train well — a streak of non-finite steps, or too many
unusable training images — with a one-line error that says what to do. (Preemption signals: ``runtime.Preemption``.)
"""

from __future__ import annotations

import logging
import math

from . import checkpoint as ckpt
from .errors import UserError

logger = logging.getLogger("hf_vit")

# One-sided confidence of the bad-data stop, checked for every step (when the loop reads the steps' counts from the
# device): a run with exactly max_bad_sample_fraction unusable images is stopped by chance with probability 3e-7 per
# check (z = 5), below 0.3% over 10,000 checks (union bound), while half the images bad stops a run after its first
# batch of 32, and 10% bad (limit 1%) after 64 images.
BAD_DATA_Z = 5.0
BAD_EXAMPLES_KEPT = 10  # keys kept for the error message


def bad_fraction_lower_bound(bad: int, seen: int, z: float = BAD_DATA_Z) -> float:
    """The Wilson score lower bound of the unusable fraction after ``bad`` of ``seen`` images: the true fraction is
    above it with one-sided confidence ``z``."""
    if not seen:
        return 0.0
    p, n = bad / seen, seen
    centre, spread = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def check_bad_samples(state, limit: float, end_of_epoch: bool) -> None:
    """Stop on bad data as soon as the evidence is clear: when even the optimistic bound on the unusable fraction
    (:func:`bad_fraction_lower_bound`) exceeds ``limit`` (``max_bad_sample_fraction``), or, at the end of an epoch,
    when the fraction seen does. ``state``: the loop state (``bad_samples``, ``samples_seen``, ``bad_examples``)."""
    seen = state.samples_seen + state.bad_samples
    if state.bad_samples and (bad_fraction_lower_bound(state.bad_samples, seen) > limit
                              or (end_of_epoch and state.bad_samples / seen > limit)):
        raise UserError(
            f"{state.bad_samples} of {seen} training images were unusable ({state.bad_samples / seen:.1%}, more "
            f"than max_bad_sample_fraction={limit}), e.g. {state.bad_examples[:3]}; fix the data or raise the limit"
        )


def note_bad_examples(state, bad_keys: list[str]) -> None:
    """Log a micro-batch's unusable examples and keep the first few keys for the error message."""
    if bad_keys:
        state.bad_examples.extend(bad_keys[: max(0, BAD_EXAMPLES_KEPT - len(state.bad_examples))])
        logger.warning("skipped unusable examples: %s", bad_keys)


def check_nonfinite_streak(state, limit: int, output_dir: str, step: int) -> None:
    """Stop after ``limit`` (``max_nonfinite_steps``) skipped non-finite steps in a row, naming the last good
    checkpoint. ``step``: the global step the streak in ``state.nonfinite_in_a_row`` ends at (the loop counts its
    steps when it reads them from the device, after the fact)."""
    if state.nonfinite_in_a_row >= limit:
        good = ckpt.complete_checkpoints(output_dir)
        raise UserError(
            f"{state.nonfinite_in_a_row} non-finite losses or gradients in a row (steps "
            f"{step - state.nonfinite_in_a_row + 1}-{step}); stopping. Lower learning_rate, "
            "keep max_grad_norm on, or use bf16 instead of fp16; the last good checkpoint is "
            f"{str(good[-1]) if good else 'none (none was saved before the first one)'}"
        )
