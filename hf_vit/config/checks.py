"""Which values a run's configuration may hold, and the checks that refuse the rest.

Every field's valid values are declared once, in :data:`DOMAINS` (its type comes from the annotation: int, float,
str, bool, Literal, Optional), and checked in one place, :func:`check_fields`: ``parse_config`` checks them as it
parses, and :func:`validate` — which the trainer calls before anything is loaded or written — checks them again
together with the relations between fields and the output folder. A bad value is a one-line :class:`UserError` that
names the field, the value and what is allowed. Importing this module raises RuntimeError if a field of the argument
groups has no :data:`DOMAINS` entry.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..errors import MASK, UserError, is_secret_name
from .groups import ARG_GROUPS, RunConfig, TrainingArguments


# ------------------------------------------------------------------------------------------------ field domains
# Counts (sizes, steps, samples, limits) stop at the int32 range: torch and numpy index with 32- or 64-bit integers,
# nothing here counts past 2**31, and a bigger number can only be a typo (an exponent, a pasted hash).
MAX_COUNT = 2**31 - 1
# Seeds: numpy (seeded by accelerate's set_seed) refuses anything outside [0, 2**32), and data_on_device seeds torch
# with seed x ~1e12 + position (data/keys.py position_seed), which must stay below torch's 2**64: 2**24 keeps it there.
MAX_SEED = 2**24 - 1
# A million passes over the data is no schedule anyone means; far beyond it, epochs x steps per epoch overflows the
# float that the step count is computed from.
MAX_EPOCHS = 1_000_000
# Loader worker processes per training process: more than the cores of the largest machines can only be a typo, and
# each worker is a forked process.
MAX_WORKERS = 256


@dataclass(frozen=True)
class Domain:
    """The values one field accepts beyond its annotated type.

    Numbers: the interval ``low..high`` (each end included unless ``*_open``); no ``high`` means any finite value.
    Strings: non-empty unless ``allow_empty``. ``words``: a string field that also takes a count
    (``checkpointing_steps``: a whole number of steps >= 1, or one of these words). bool and Literal fields need
    nothing beyond their type.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    allow_empty: bool = False
    words: tuple[str, ...] = ()

    def contains(self, x: float) -> bool:
        if self.low is not None and (x < self.low or (self.low_open and x == self.low)):
            return False
        if self.high is None:
            return math.isfinite(x)
        return x < self.high or (not self.high_open and x == self.high)

    def describe(self, integer: bool) -> str:
        if self.high is None:
            if self.low == 0 and self.low_open:
                return "positive and finite"
            return f"{'>' if self.low_open else '>='} {_number(self.low)} and finite"
        interval = (f"{'(' if self.low_open else '['}{_number(self.low)}, "
                    f"{_number(self.high)}{')' if self.high_open else ']'}")
        return f"an integer in {interval}" if integer else f"in {interval}"


COUNT = Domain(1, MAX_COUNT)
SEED = Domain(0, MAX_SEED)
EPOCHS = Domain(0, MAX_EPOCHS)
POSITIVE = Domain(0, low_open=True)
NON_NEGATIVE = Domain(0)
FRACTION = Domain(0, 1)  # a probability or fraction, both ends allowed
# 1 would zero every activation (dropout), erase the label (smoothing), freeze Adam's moment estimates (betas).
BELOW_ONE = Domain(0, 1, high_open=True)
TEXT = Domain()  # a non-empty string (or null where the field is Optional)
ANY = Domain()  # bool and Literal fields: the type says it all

DOMAINS: dict[str, Domain] = {
    # ModelArguments (relations to the preset, such as image_size % patch_size, are models.py's)
    "model_preset": TEXT, "model_name_or_path": TEXT,
    "image_size": COUNT, "patch_size": COUNT, "hidden_size": COUNT, "num_hidden_layers": COUNT,
    "num_attention_heads": COUNT, "intermediate_size": COUNT,
    "hidden_dropout_prob": BELOW_ONE, "attention_probs_dropout_prob": BELOW_ONE,
    "freeze_backbone": ANY, "trust_remote_code": ANY,
    # DataArguments
    "dataset_name": TEXT, "dataset_config_name": TEXT, "train_split": TEXT,
    "eval_split": Domain(allow_empty=True),  # "" = no eval split: carve train_val_split from train
    "train_val_split": Domain(0, MAX_COUNT),  # a fraction below 1, else a count (whole: see validate)
    "image_column_name": TEXT, "label_column_name": TEXT, "streaming": ANY,
    "train_samples": COUNT, "shuffle_buffer_size": COUNT, "stream_sharding": ANY,
    "train_fraction": Domain(0, 1, low_open=True), "subset_seed": SEED,
    "max_train_samples": COUNT, "max_eval_samples": COUNT, "augmentation": ANY,
    "crop_padding": Domain(0, MAX_COUNT),  # below image_size too: see check_crop_padding
    "random_resized_crop_scale": Domain(0, 1, low_open=True),  # a crop of no area, or more than the image, is none
    "random_erasing_prob": FRACTION, "mixup_alpha": NON_NEGATIVE, "cutmix_alpha": NON_NEGATIVE,
    "dataloader_num_workers": Domain(0, MAX_WORKERS), "data_on_device": ANY, "decode_on_device": ANY,
    "max_bad_sample_fraction": FRACTION,
    # TrainingArguments
    "output_dir": TEXT, "overwrite_output_dir": ANY, "seed": SEED,
    "total_train_batch_size": COUNT, "per_device_train_batch_size": COUNT, "gradient_accumulation_steps": COUNT,
    "per_device_eval_batch_size": COUNT,
    "num_train_epochs": EPOCHS,  # 0 only with max_train_steps (see validate)
    "max_train_steps": COUNT, "learning_rate": POSITIVE, "warmup_epochs": EPOCHS,
    "warmup_start_lr": NON_NEGATIVE, "min_lr": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
    "adam_beta1": BELOW_ONE, "adam_beta2": BELOW_ONE, "adam_epsilon": POSITIVE,
    "head_lr_multiplier": POSITIVE, "layer_decay": Domain(0, 1, low_open=True), "label_smoothing": BELOW_ONE,
    "max_grad_norm": NON_NEGATIVE,  # 0 (or null) turns clipping off
    "ema_decay": Domain(0, 1, low_open=True, high_open=True), "mixed_precision": ANY, "torch_compile": ANY,
    "dry_run": ANY,
    "eval_steps": COUNT, "logging_steps": COUNT, "checkpointing_steps": Domain(words=("epoch", "no")),
    "resume_from_checkpoint": TEXT, "checkpoints_total_limit": COUNT, "max_nonfinite_steps": COUNT,
    "resume_accept_changes": TEXT,  # identity keys, checked against the checkpoint's at resume
    "report_to": TEXT, "push_to_hub": ANY, "hub_model_id": TEXT, "hub_private_repo": ANY, "hub_strategy": ANY,
    "hub_token": TEXT,
}


def _field_types() -> dict[str, tuple[object, bool]]:
    """``{field: (type, optional)}`` from the declared annotations (HfArgumentParser rewrites ``field.type``)."""
    types = {}
    for group in ARG_GROUPS:
        for name, hint in typing.get_type_hints(group).items():
            args = typing.get_args(hint)
            optional = typing.get_origin(hint) is typing.Union and type(None) in args
            types[name] = (next(a for a in args if a is not type(None)) if optional else hint, optional)
    return types


FIELD_TYPES = _field_types()
if set(DOMAINS) != set(FIELD_TYPES):  # a new field must say which values it takes
    raise RuntimeError(f"DOMAINS and the argument groups differ: {sorted(set(DOMAINS) ^ set(FIELD_TYPES))}")

_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlevel, _repr.maxlist, _repr.maxdict = 80, 80, 3, 6, 6


def _show(name: str, value: object) -> str:
    """``value`` as a message shows it: short, YAML's ``null`` for None, and never a secret field's value."""
    if is_secret_name(name):
        return MASK
    return "null" if value is None else _repr.repr(value)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _type_words(kind: object, optional: bool) -> str:
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind]
    return f"{words} or null" if optional else words


def check_value(name: str, value: object) -> None:
    """Check one field's value against its declared type and :data:`DOMAINS` entry; a one-line UserError if not."""
    kind, optional = FIELD_TYPES[name]
    domain, shown = DOMAINS[name], _show(name, value)
    if value is None and optional:
        return
    if typing.get_origin(kind) is Literal:
        choices = list(typing.get_args(kind)) + ([None] if optional else [])
        if not isinstance(value, str) or value not in choices:
            raise UserError(f"{name}={shown} is not one of {choices}")
        return
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{name} must be true or false (got {shown})")
        return
    if kind is str:
        if domain.words:
            _check_steps_or_words(name, value, domain)
            return
        if not isinstance(value, str):
            raise UserError(f"{name} must be {_type_words(str, optional)} (got {shown})")
        if not domain.allow_empty and not value.strip():
            raise UserError(f"{name} must be a non-empty string{' or left unset' if optional else ''} (got {shown})")
        if "\0" in value:  # no path, split or id holds one, and os calls refuse it
            raise UserError(f"{name} must not contain a NUL character (got {shown})")
        return
    integer = kind is int
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise UserError(f"{name} must be {_type_words(kind, optional)} (got {shown})")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        number = math.inf
    if not domain.contains(number):
        raise UserError(f"{name} must be {domain.describe(integer)} (got {shown})")


def _check_steps_or_words(name: str, value: object, domain: Domain) -> None:
    allowed = f"a number of steps >= 1, {' or '.join(repr(w) for w in domain.words)}"
    if isinstance(value, str) and value in domain.words:
        return
    # ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
    steps = int(value) if isinstance(value, str) and re.fullmatch(r"[0-9]+", value) else value
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_COUNT:
        raise UserError(f"{name} must be {allowed} (got {_show(name, value)})")


def check_fields(config: object) -> None:
    """Check every field of a :class:`RunConfig` (or of one argument group) against its domain, in field order."""
    groups = (config.model, config.data, config.train) if isinstance(config, RunConfig) else (config,)
    for group in groups:
        for f in dataclasses.fields(group):
            check_value(f.name, getattr(group, f.name))


# ------------------------------------------------------------------------------------------------ validation
def validate(cfg: RunConfig) -> None:
    """Check every value a user can get wrong before anything is loaded or written: each field's domain, the
    relations between fields, the output folder (without writing to it) and the Hub repository id. Raises a
    one-line :class:`UserError`; returns None when the configuration can run."""
    check_fields(cfg)
    m, d, t = cfg.model, cfg.data, cfg.train
    if t.num_train_epochs <= 0 and not t.max_train_steps:
        raise UserError(f"num_train_epochs must be positive (got {t.num_train_epochs}), or give max_train_steps")
    if t.warmup_epochs and t.warmup_epochs >= t.num_train_epochs:
        raise UserError(
            f"warmup_epochs={t.warmup_epochs} must be >= 0 and smaller than num_train_epochs={t.num_train_epochs}"
        )
    for name in ("min_lr", "warmup_start_lr"):
        if getattr(t, name) > t.learning_rate:
            raise UserError(f"{name}={getattr(t, name)} must not exceed learning_rate={t.learning_rate}: the schedule "
                            "warms up from warmup_start_lr to learning_rate, then decays to min_lr")
    if d.train_val_split >= 1 and not float(d.train_val_split).is_integer():
        raise UserError(f"train_val_split={d.train_val_split} must be a fraction below 1 or a whole number of "
                        "examples")
    if m.image_size is not None:
        check_crop_padding(d.crop_padding, m.image_size)
    if not m.model_preset and not m.model_name_or_path:
        raise UserError("give a model_preset or a model_name_or_path")
    if d.decode_on_device and (d.crop_padding is not None or d.data_on_device):
        raise UserError("decode_on_device applies to random-resized-crop (ImageNet-style) training; drop it, or drop "
                        "--crop_padding/--data_on_device (CIFAR-style data is best served by data_on_device)")
    if d.data_on_device and d.streaming:
        raise UserError("data_on_device needs a map-style dataset that fits in memory; drop --streaming or "
                        "--data_on_device")
    if d.data_on_device and d.crop_padding is None:
        raise UserError("data_on_device supports pad-and-crop training only (CIFAR-style); set --crop_padding "
                        "(e.g. 4 at 32 px) or drop --data_on_device for random-resized crops")
    if m.trust_remote_code:
        # Refused rather than ignored: a flag that silently does nothing would let a user believe some code ran.
        raise UserError("trust_remote_code=true is not supported: the model is transformers' own "
                        "ViTForImageClassification and datasets load as parquet or image files, so no repository "
                        "code is ever needed; leave it off")
    check_output_dir_path(t.output_dir)
    from ..run_dir import check_outside_dataset  # an output folder inside the data would become data

    check_outside_dataset(t.output_dir, d.dataset_name)
    _check_hub_repo_id(t)


def check_crop_padding(crop_padding: int | None, image_size: int) -> None:
    """Pad-and-crop mirrors at most ``image_size - 1`` pixels at each border; more makes every image unusable.
    Called by :func:`validate` when ``image_size`` is set explicitly; the caller that resolves the preset's size
    calls it with that size."""
    if crop_padding is not None and crop_padding >= image_size:
        raise UserError(f"crop_padding={crop_padding} must be smaller than image_size={image_size} (reflect padding "
                        "mirrors at most image_size - 1 pixels); lower crop_padding")


def check_output_dir_path(path: str) -> None:
    """Refuse an ``output_dir`` that cannot become a writable folder: an existing file, a broken link, a folder
    without write permission, a path whose nearest existing ancestor is not a writable folder, or one the file
    system refuses to look up (a name too long, a loop of links). Only looks (stat and access); never creates or
    writes anything."""
    try:
        target = Path(os.path.abspath(path))
        if target.exists():
            if not target.is_dir():
                raise UserError(f"output_dir {path!r} is a file, not a folder; pass a folder path")
            if not os.access(target, os.W_OK | os.X_OK):
                raise UserError(f"output_dir {path!r} is not writable; choose a folder you can write to")
            return
        if os.path.lexists(target):
            raise UserError(f"output_dir {path!r} is a broken symbolic link; remove it or choose another folder")
        ancestor = next(p for p in target.parents if p.exists())
        if not ancestor.is_dir():
            raise UserError(f"output_dir {path!r} cannot be created: {str(ancestor)!r} is a file, not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise UserError(f"output_dir {path!r} cannot be created: {str(ancestor)!r} is not writable; choose a "
                            "folder you can write to")
    except OSError as err:
        raise UserError(f"output_dir {path!r} cannot be used ({err.strerror or err}); choose another folder") from None


def _check_hub_repo_id(t: TrainingArguments) -> None:
    """A pushed run needs a valid Hub repository id: ``hub_model_id``, or the output folder's name (hub.py's
    default). Checked with huggingface_hub's own rule, before any training time is spent."""
    if t.hub_model_id is not None:
        repo_id, source = t.hub_model_id, "hub_model_id"
    elif t.push_to_hub:
        repo_id = os.path.basename(os.path.realpath(t.output_dir))  # what hub.py names the repo
        source = "the repository name taken from output_dir"
    else:
        return
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        reason = str(err).splitlines()[0] if str(err) else "invalid"
        raise UserError(f"{source} {repo_id!r} is not a valid Hub repository id ({reason}); pass --hub_model_id as "
                        "'name' or 'user/name' with letters, digits, '-', '_' or '.'") from None
