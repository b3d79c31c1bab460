"""One preset table over every family: each preset names its transformers config class and its fields; the CLI
overrides that apply to the chosen family; the model family of a config."""

from __future__ import annotations

from transformers import PreTrainedConfig

from ..config import ModelArguments
from ..errors import UserError
from . import cnn, vit

PRESETS: dict[str, dict] = {**vit.PRESETS, **cnn.PRESETS}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = vit.MODEL_TYPES + cnn.MODEL_TYPES
# How a model family (config.json's model_type) is named in words: in messages and on the model card (hf_vit.report);
# a type not listed is named by its model_type.
FAMILY_NAMES = {"vit": "Vision Transformer", "resnet": "ResNet", "convnext": "ConvNeXt"}


def model_family(config: PreTrainedConfig) -> str:
    """``"vit"`` or ``"cnn"`` for a supported config; a one-line ``UserError`` for any other ``model_type``."""
    if config.model_type in vit.MODEL_TYPES:
        return "vit"
    if config.model_type in cnn.MODEL_TYPES:
        return "cnn"
    raise UserError(f"model_type {config.model_type!r} is not supported; use one of {list(SUPPORTED_MODEL_TYPES)}")


def is_vit(config: PreTrainedConfig) -> bool:
    return model_family(config) == "vit"


def label_maps(label_names: list[str]) -> dict:
    """``num_labels``/``id2label``/``label2id`` for a model config from the dataset's class names."""
    return dict(
        num_labels=len(label_names),
        id2label={i: name for i, name in enumerate(label_names)},
        label2id={name: i for i, name in enumerate(label_names)},
    )


def requested_overrides(args: ModelArguments) -> dict:
    """The architecture flags the user set (dropouts count when non-zero: zero is their default)."""
    requested = {k: getattr(args, k) for k in vit.ARCH_FIELDS if getattr(args, k) is not None}
    requested.update({k: getattr(args, k) for k in vit.DROPOUT_FIELDS if getattr(args, k)})
    return requested


def applicable_overrides(model_type: str) -> tuple[str, ...]:
    if model_type in vit.MODEL_TYPES:
        return vit.ARCH_FIELDS + vit.DROPOUT_FIELDS
    return cnn.OVERRIDES[model_type]


def check_overrides(args: ModelArguments, model_type: str, what: str) -> dict:
    """The requested overrides, after refusing any that ``model_type`` has no field for; ``what`` names the model
    in the message (``"model_preset 'resnet50'"``, ``"the checkpoint '...'"``)."""
    requested = requested_overrides(args)
    allowed = applicable_overrides(model_type)
    for key, value in requested.items():
        if key not in allowed:
            raise UserError(f"{key}={value} does not apply to {what} (a {FAMILY_NAMES[model_type]}); drop it "
                            f"(this model takes {list(allowed)})")
    return requested


def build_config(args: ModelArguments, label_names: list[str]) -> PreTrainedConfig:
    """Resolve ``args.model_preset`` plus the CLI overrides into its family's config with the dataset's labels.

    Every config carries ``image_size`` (the trainer resolves preprocessing from it; ResNetConfig has no such field,
    so it is an extra attribute, saved in config.json like the others).
    """
    if args.model_preset not in PRESETS:
        raise UserError(f"unknown model_preset {args.model_preset!r}; choose one of {sorted(PRESETS)}")
    fields = dict(PRESETS[args.model_preset])
    config_class = fields.pop("config_class")
    overrides = check_overrides(args, config_class.model_type, f"model_preset {args.model_preset!r}")
    if config_class.model_type in vit.MODEL_TYPES:
        fields.update({k: v for k, v in overrides.items() if k in vit.ARCH_FIELDS})
        vit.check_architecture(fields["image_size"], fields["patch_size"], fields["hidden_size"],
                               fields["num_attention_heads"])
        return config_class(
            **fields,
            hidden_dropout_prob=args.hidden_dropout_prob,
            attention_probs_dropout_prob=args.attention_probs_dropout_prob,
            attn_implementation="sdpa",
            **label_maps(label_names),
        )
    fields.update(overrides)
    config = config_class(**fields, **label_maps(label_names))
    cnn.check_config(config)
    return config
