"""Which values a run's configuration may hold, and the checks that refuse the rest.

Every field's valid values are declared with the field (:func:`hf_vit.config.domains.setting`; its type comes from
the annotation: int, float, str, bool, Literal, Optional) and checked in one place, :func:`check_fields`:
``parse_config`` checks them as it parses, and :func:`validate` — which the trainer calls before anything is loaded or
written — checks them again together with the relations between fields and the output folder. A bad value is a
one-line :class:`UserError` that names the field, the value and what is allowed. Importing this module raises
RuntimeError if a field of the argument groups was declared without a domain.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
import typing
from pathlib import Path
from typing import Literal

from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..errors import MASK, UserError, is_secret_name
from .domains import MAX_COUNT, Domain, domain_of
from .groups import ARG_GROUPS, RunConfig, TrainArguments


def field_types(group: type) -> dict[str, tuple[object, bool]]:
    """``{field: (type, optional)}`` of one dataclass, from its declared annotations (HfArgumentParser rewrites
    ``field.type``)."""
    types = {}
    for name, hint in typing.get_type_hints(group).items():
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) is typing.Union and type(None) in args
        types[name] = (next(a for a in args if a is not type(None)) if optional else hint, optional)
    return types


# Views of the run's settings by name, derived from their declarations (groups.py): the type and the domain.
FIELD_TYPES = {name: kind for group in ARG_GROUPS for name, kind in field_types(group).items()}
DOMAINS = {f.name: domain_of(f) for group in ARG_GROUPS for f in dataclasses.fields(group)}

_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlevel, _repr.maxlist, _repr.maxdict = 80, 80, 3, 6, 6


def _show(name: str, value: object) -> str:
    """``value`` as a message shows it: short, YAML's ``null`` for None, and never a secret field's value."""
    if is_secret_name(name):
        return MASK
    return "null" if value is None else _repr.repr(value)


def _type_words(kind: object, optional: bool) -> str:
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind]
    return f"{words} or null" if optional else words


def check_value(name: str, value: object, declared: tuple[object, bool, Domain] | None = None) -> None:
    """Check one setting's value against its declared type and domain; a one-line UserError if not. ``declared``:
    ``(type, optional, domain)`` of a field outside the run's argument groups (another command's); else the run's
    setting ``name``."""
    kind, optional, domain = declared or (*FIELD_TYPES[name], DOMAINS[name])
    shown = _show(name, value)
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
    """Check every field of a :class:`RunConfig`, or of any dataclass of settings (one argument group, eval's
    arguments), against its declared type and domain, in field order."""
    groups = (config.model, config.data, config.train) if isinstance(config, RunConfig) else (config,)
    for group in groups:
        types = field_types(type(group))
        for f in dataclasses.fields(group):
            check_value(f.name, getattr(group, f.name), (*types[f.name], domain_of(f)))


# ------------------------------------------------------------------------------------------------ validation
def validate(cfg: RunConfig, source=None) -> None:
    """Check every value a user can get wrong before anything is loaded or written: each field's domain, the
    relations between fields, the output folder (without writing to it) and the Hub repository id. ``source``: the
    run's :class:`hf_vit.data.DataSource` when the caller has described the data already (so the dataset is
    classified as a local folder or a Hub id once); else ``dataset_name`` is. Raises a one-line :class:`UserError`;
    returns None when the configuration can run."""
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
    if d.test_split and d.test_split in (d.train_split, d.eval_split):
        # A test split scored during training (or trained on) would no longer be held out.
        raise UserError(f"test_split={d.test_split!r} is also the {'train' if d.test_split == d.train_split else 'eval'}"
                        "_split; pass a split the run neither trains nor evaluates on")
    if m.image_size is not None:
        check_crop_padding(d.crop_padding, m.image_size)
    if not m.model_preset and not m.model_name_or_path:
        raise UserError("give a model_preset or a model_name_or_path")
    check_train_data_path(d.streaming, d.crop_padding, d.data_on_device, d.decode_on_device)
    if m.trust_remote_code:
        # Refused rather than ignored: a flag that silently does nothing would let a user believe some code ran.
        raise UserError("trust_remote_code=true is not supported: the model is transformers' own "
                        "ViTForImageClassification and datasets load as parquet or image files, so no repository "
                        "code is ever needed; leave it off")
    check_output_dir_writable(t.output_dir)
    from ..run_dir import check_outside_dataset  # an output folder inside the data would become data

    check_outside_dataset(t.output_dir, source if source is not None else d.dataset_name)
    _check_hub_repo_id(t)


def check_crop_padding(crop_padding: int | None, image_size: int) -> None:
    """Pad-and-crop mirrors at most ``image_size - 1`` pixels at each border; more makes every image unusable.
    Called by :func:`validate` when ``image_size`` is set explicitly; the caller that resolves the preset's size
    calls it with that size."""
    if crop_padding is not None and crop_padding >= image_size:
        raise UserError(f"crop_padding={crop_padding} must be smaller than image_size={image_size} (reflect padding "
                        "mirrors at most image_size - 1 pixels); lower crop_padding")


def check_train_data_path(streaming: bool, crop_padding: int | None, data_on_device: bool,
                          decode_on_device: bool) -> None:
    """The preconditions of the train data paths (hf_vit.data.factory), in one place: ``validate`` checks them on
    the settings, :class:`hf_vit.data.device_data.DeviceTrainData` on the dataset it is handed (``streaming``: not
    a map-style split; ``crop_padding``: the resolved image spec's). A one-line UserError when they do not hold."""
    if decode_on_device and (crop_padding is not None or data_on_device):
        raise UserError("decode_on_device applies to random-resized-crop (ImageNet-style) training; drop it, or drop "
                        "--crop_padding/--data_on_device (CIFAR-style data is best served by data_on_device)")
    if data_on_device and streaming:
        raise UserError("data_on_device needs a map-style dataset that fits in memory; drop --streaming or "
                        "--data_on_device")
    if data_on_device and crop_padding is None:
        raise UserError("data_on_device supports pad-and-crop training only (CIFAR-style); set --crop_padding "
                        "(e.g. 4 at 32 px) or drop --data_on_device for random-resized crops")


def check_output_dir_writable(path: str) -> None:
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


def _check_hub_repo_id(t: TrainArguments) -> None:
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
