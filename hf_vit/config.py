"""Typed run configuration: three dataclass groups, a recipe file, CLI overrides, validation, and the saved copy.

A run is configured by ``--config recipe.yaml`` (a flat mapping of field names to values) plus command-line flags, which
win over the recipe. Unknown keys — in the recipe or on the command line — are an error, never silently ignored. The
fully resolved configuration is written to ``output_dir/train_config.yaml``; passing that file back as ``--config``
reproduces the run.

Every field's valid values are declared once, in :data:`DOMAINS` (its type comes from the annotation: int, float,
str, bool, Literal, Optional), and checked in one place, :func:`check_fields`: ``parse_config`` checks them as it
parses, and :func:`validate` — which the trainer calls before anything is loaded or written — checks them again
together with the relations between fields and the output folder. A bad value is a one-line :class:`UserError` that
names the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import HfArgumentParser

from .errors import (MASK, UserError, is_secret_name, mask_argv, raise_user_errors, register_argv_secrets,
                     register_mapping_secrets, register_secret)

CONFIG_FILE_NAME = "train_config.yaml"


@dataclass
class ModelArguments:
    """What to train: a named preset built from ``ViTConfig``, or a checkpoint to fine-tune."""

    model_preset: Optional[str] = field(
        default="vit_tiny_cifar",
        metadata={"help": "Architecture preset (vit_tiny_cifar, vit_small_cifar, vit_base_patch16_224, ...)."},
    )
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Local directory or Hub id of a ViTForImageClassification checkpoint to start from."},
    )
    image_size: Optional[int] = field(default=None, metadata={"help": "Input resolution (overrides the preset)."})
    patch_size: Optional[int] = field(default=None, metadata={"help": "Patch size (overrides the preset)."})
    hidden_size: Optional[int] = field(default=None, metadata={"help": "Embedding dimension."})
    num_hidden_layers: Optional[int] = field(default=None, metadata={"help": "Number of transformer blocks."})
    num_attention_heads: Optional[int] = field(default=None, metadata={"help": "Attention heads per block."})
    intermediate_size: Optional[int] = field(default=None, metadata={"help": "MLP hidden dimension."})
    hidden_dropout_prob: float = field(default=0.0, metadata={"help": "Dropout after attention/MLP projections."})
    attention_probs_dropout_prob: float = field(default=0.0, metadata={"help": "Dropout on attention weights."})
    freeze_backbone: bool = field(default=False, metadata={"help": "Train only the classifier (a linear probe)."})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Accepted for the HF examples' command lines, but must stay off: nothing here runs a "
                          "repository's code (the model is transformers' own ViT, datasets are parquet or image "
                          "files)."},
    )


@dataclass
class DataArguments:
    """Where the images come from and how they are augmented."""

    dataset_name: str = field(
        default="uoft-cs/cifar10",
        metadata={"help": "Hub dataset id, or a local path (parquet folder, imagefolder tree, or saved dataset)."},
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Dataset configuration name."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: Optional[str] = field(
        default=None, metadata={"help": "Split to evaluate on; when absent, `train_val_split` is carved from train."}
    )
    train_val_split: float = field(
        default=0.02,
        metadata={"help": "Fraction (or count, if >= 1) of train held out for validation when there is no eval split."},
    )
    image_column_name: Optional[str] = field(default=None, metadata={"help": "Image column (auto-detected if unset)."})
    label_column_name: Optional[str] = field(default=None, metadata={"help": "Label column (auto-detected if unset)."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset as an IterableDataset."})
    train_samples: Optional[int] = field(
        default=None,
        metadata={"help": "Examples per epoch when streaming metadata does not say (used for the LR schedule)."},
    )
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Shuffle buffer for streaming datasets."})
    stream_sharding: Literal["exact", "shards"] = field(
        default="exact",
        metadata={"help": "How a stream is split over the C = processes x loader workers consumers. 'exact': every "
                          "consumer reads the whole stream and keeps its blocks (every example exactly once per "
                          "epoch, the same batches for any process count; reads grow with C). 'shards': each consumer "
                          "reads only its own share of the stream's shards, redrawn every epoch (each record read "
                          "once; needs >= C shards; examples past what the smallest share holds sit the epoch out). "
                          "See docs/scaling.md."},
    )
    train_fraction: float = field(
        default=1.0, metadata={"help": "Keep this deterministic pseudo-random fraction of the training set."}
    )
    subset_seed: int = field(default=0, metadata={"help": "Seed of the train_fraction subset (independent of seed)."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate train (debugging)."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Truncate eval (debugging)."})
    augmentation: Literal["basic", "enhanced"] = field(
        default="basic", metadata={"help": "basic: crop + flip; enhanced: adds TrivialAugmentWide + RandomErasing."}
    )
    crop_padding: Optional[int] = field(
        default=None,
        metadata={"help": "Pad-and-crop padding (CIFAR-style). Unset: random-resized crop (ImageNet-style)."},
    )
    random_resized_crop_scale: float = field(
        default=0.08, metadata={"help": "Smallest area fraction of the random-resized crop."}
    )
    random_erasing_prob: float = field(default=0.25, metadata={"help": "RandomErasing probability (enhanced only)."})
    mixup_alpha: float = field(default=0.0, metadata={"help": "MixUp alpha (0 disables)."})
    cutmix_alpha: float = field(default=0.0, metadata={"help": "CutMix alpha (0 disables)."})
    dataloader_num_workers: int = field(default=2, metadata={"help": "Loader worker processes per process."})
    data_on_device: bool = field(
        default=False,
        metadata={"help": "Decode the train split once into a uint8 tensor on the device and augment whole batches "
                          "there, without loader workers (map-style data that fits in memory, pad-and-crop training; "
                          "see hf_vit/device_data.py). Eval keeps the loader."},
    )
    decode_on_device: bool = field(
        default=False,
        metadata={"help": "Decode training JPEGs on the accelerator (nvJPEG through torchvision.io.decode_jpeg) "
                          "instead of in the loader workers, which then only read bytes and draw the crops "
                          "(random-resized-crop training; see hf_vit/device_jpeg.py). Eval keeps the loader."},
    )
    max_bad_sample_fraction: float = field(
        default=0.01, metadata={"help": "Stop when more than this fraction of seen training images is unusable."}
    )


@dataclass
class TrainingArguments:
    """How to optimise, checkpoint, log and publish."""

    output_dir: str = field(default="outputs/run", metadata={"help": "Where checkpoints and results go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow reusing a folder of another run."})
    seed: int = field(default=42, metadata={"help": "Seed for model init, data order and augmentation."})
    total_train_batch_size: Optional[int] = field(
        default=None,
        metadata={"help": "Global batch = per-device x processes x accumulation; derives per_device_train_batch_size."},
    )
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Micro-batch per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Eval batch per process."})
    num_train_epochs: float = field(default=10, metadata={"help": "Epochs to train."})
    max_train_steps: Optional[int] = field(default=None, metadata={"help": "Stop after this many optimizer steps."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (backbone)."})
    warmup_epochs: float = field(default=0.0, metadata={"help": "Linear warmup length in epochs."})
    warmup_start_lr: float = field(default=1e-6, metadata={"help": "LR at step 0 of the warmup."})
    min_lr: float = field(default=1e-6, metadata={"help": "LR at the last step of the cosine decay."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW decoupled weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    head_lr_multiplier: float = field(default=1.0, metadata={"help": "Classifier LR = learning_rate x this."})
    layer_decay: Optional[float] = field(
        default=None, metadata={"help": "Layer-wise LR decay: block i runs at decay^(depth - i) (BEiT-style)."}
    )
    label_smoothing: float = field(default=0.0, metadata={"help": "Cross-entropy label smoothing."})
    max_grad_norm: Optional[float] = field(default=1.0, metadata={"help": "Gradient clipping norm (None: off)."})
    ema_decay: Optional[float] = field(default=None, metadata={"help": "Keep an EMA of the weights (e.g. 0.999)."})
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = field(
        default=None, metadata={"help": "Autocast precision; unset: the accelerate config's (or 'no')."}
    )
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile the model."})
    eval_steps: Optional[int] = field(default=None, metadata={"help": "Evaluate every N steps (default: each epoch)."})
    logging_steps: int = field(default=10, metadata={"help": "Log train loss and LR every N steps."})
    checkpointing_steps: Optional[str] = field(
        default="epoch", metadata={"help": "Save state every N steps, 'epoch', or 'no'."}
    )
    resume_from_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "Checkpoint folder, 'latest' (newest in output_dir), or a Hub repo id."}
    )
    checkpoints_total_limit: Optional[int] = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    max_nonfinite_steps: int = field(default=5, metadata={"help": "Stop after this many non-finite losses in a row."})
    report_to: str = field(
        default="auto", metadata={"help": "Trackers: tensorboard, wandb, mlflow, all, none, or auto (tensorboard)."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Push the model and results to the Hub."})
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "Repository id on the Hub."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    hub_strategy: Literal["end", "every_save", "checkpoint"] = field(
        default="end", metadata={"help": "When to push (same meanings as the HF Trainer)."}
    )
    hub_token: Optional[str] = field(
        default=None, repr=False, metadata={"help": "Hub token (else HF_TOKEN or cached login)."}
    )


ARG_GROUPS = (ModelArguments, DataArguments, TrainingArguments)
# Never written to disk or logs: every field whose name is token-like (errors.is_secret_name), i.e. the Hub token.
SECRET_KEYS = tuple(f.name for group in ARG_GROUPS for f in dataclasses.fields(group) if is_secret_name(f.name))


@dataclass
class RunConfig:
    """The three argument groups of one run."""

    model: ModelArguments
    data: DataArguments
    train: TrainingArguments

    def to_dict(self, include_secrets: bool = False) -> dict:
        """Flat ``{field: value}`` over all groups (the recipe format)."""
        flat = {}
        for group in (self.model, self.data, self.train):
            flat.update(dataclasses.asdict(group))
        if not include_secrets:
            for key in SECRET_KEYS:
                flat.pop(key, None)
        return flat


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
    "eval_steps": COUNT, "logging_steps": COUNT, "checkpointing_steps": Domain(words=("epoch", "no")),
    "resume_from_checkpoint": TEXT, "checkpoints_total_limit": COUNT, "max_nonfinite_steps": COUNT,
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


# ------------------------------------------------------------------------------------------------ recipe and CLI
class _DuplicateKey(Exception):
    pass


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (plain PyYAML keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        first_line = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # unhashable keys are refused by SafeLoader itself; "<<" merges are resolved by it
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise _DuplicateKey(f"sets {key!r} twice (lines {first_line[key]} and {line}); keep one of them")
            first_line[key] = line
        return super().construct_mapping(node, deep)


# "key: value" lines, to learn a recipe's secrets before parsing it (a recipe that fails to parse still has them).
_RECIPE_LINE = re.compile(r"""^\s*["']?([^:#"'\s]+)["']?\s*:\s*["']?([^"'#]*?)["']?\s*(#.*)?$""")


def load_recipe(path: str) -> dict:
    """Read a flat YAML recipe; unknown keys, keys given twice and unreadable files are errors."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist; pass an existing YAML recipe (see recipes/)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise UserError(f"config file {path!r} cannot be read ({reason}); pass a readable YAML recipe") from None
    for line in text.splitlines():
        match = _RECIPE_LINE.match(line)
        if match and is_secret_name(match.group(1)):
            register_secret(match.group(2))
    try:
        recipe = yaml.load(text, Loader=_RecipeLoader)
    except _DuplicateKey as err:
        raise UserError(f"config file {path!r} {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"config file {path!r} is not valid YAML: {problem}{where}") from None
    except RecursionError:
        raise UserError(f"config file {path!r} is nested too deeply; a recipe is a flat mapping") from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise UserError(f"config file {path!r} must be a mapping of option names to values")
    register_mapping_secrets(recipe)
    unknown = sorted((k for k in recipe if k not in FIELD_TYPES), key=str)
    if unknown:
        raise UserError(f"unknown config key(s) {unknown} in {path}; run with --help for the valid options")
    return recipe


def parse_config(argv: list[str] | None = None, defaults: dict | None = None) -> RunConfig:
    """Parse ``--config recipe.yaml`` plus CLI flags (CLI wins) into a :class:`RunConfig` whose every field is in its
    domain (:func:`check_fields`; relations between fields are :func:`validate`'s).

    ``defaults`` lets an entry script set its own defaults (e.g. run_pretrain.py's preset) below the recipe. The
    secrets of the command line and the recipe are registered (errors.py) before anything can fail.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    register_argv_secrets(argv)
    recipe: dict = dict(defaults or {})
    register_mapping_secrets(recipe)
    at = [i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")]
    if len(at) > 1:
        raise UserError(f"--config is given {len(at)} times; pass one recipe and override its values with flags")
    if at:
        i = at[0]
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise UserError("--config needs a path to a YAML recipe")
            path = argv[i + 1]
            del argv[i : i + 2]
        else:
            path = argv[i].split("=", 1)[1]
            del argv[i]
        recipe.update(load_recipe(path))
    # allow_abbrev=False: a misspelt prefix such as --learning_rat must be an error, not a silent match.
    parser = raise_user_errors(HfArgumentParser(ARG_GROUPS, allow_abbrev=False))
    parser.add_argument("--config", help="YAML recipe; command-line flags override its values.")
    # Recipe values become parser defaults, so explicit flags still override them; secrets are set afterwards
    # instead, because --help prints every default.
    secrets = {key: recipe.pop(key) for key in SECRET_KEYS if key in recipe}
    parser.set_defaults(**recipe)
    # Returns the three groups, a namespace holding --config, and the strings no option claimed. No `.args` file
    # next to the script may add arguments: a run is its recipe plus its flags, nothing else.
    model, data, train, *_, remaining = parser.parse_args_into_dataclasses(
        argv, return_remaining_strings=True, look_for_args_file=False)
    if remaining:
        raise UserError(f"unknown argument(s) {mask_argv(remaining)}; run with --help for the valid options")
    cfg = RunConfig(model=model, data=data, train=train)
    for key, value in secrets.items():
        group = next(g for g in (model, data, train) if hasattr(g, key))
        if getattr(group, key) is None:  # not given on the command line, which wins
            setattr(group, key, value)
    check_fields(cfg)
    return cfg


def save_config(cfg: RunConfig, output_dir: str) -> str:
    """Write the resolved config (without secrets) to ``output_dir/train_config.yaml``; return the path."""
    path = os.path.join(output_dir, CONFIG_FILE_NAME)
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    return path


def resolve_batch_sizes(train: TrainingArguments, num_processes: int) -> None:
    """Derive ``per_device_train_batch_size`` from the global batch (in place); an indivisible split is an error.

    The global batch — and so the LR schedule in optimizer steps — stays the same on 1, 2 or 8 processes:
    ``total_train_batch_size = per_device x processes x gradient_accumulation_steps``.
    """
    if train.total_train_batch_size is None:
        train.total_train_batch_size = (
            train.per_device_train_batch_size * num_processes * train.gradient_accumulation_steps
        )
        return
    divisor = num_processes * train.gradient_accumulation_steps
    if train.total_train_batch_size <= 0 or train.total_train_batch_size % divisor:
        raise UserError(
            f"total_train_batch_size={train.total_train_batch_size} is not divisible by processes x "
            f"gradient_accumulation_steps = {num_processes} x {train.gradient_accumulation_steps}; "
            "change one of them so the division is exact"
        )
    train.per_device_train_batch_size = train.total_train_batch_size // divisor


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
