"""Model stage: named presets over transformers config classes (ViT, ResNet, ConvNeXt), checkpoint loading with a
head swap, and what a model costs (FLOPs, training memory).

Every model is transformers' own ``*ForImageClassification``, built from its config — no weights are downloaded
unless the user names a checkpoint with ``model_name_or_path`` — so a trained folder loads with
``AutoModelForImageClassification`` in a plain transformers install. One module per family (``vit``, ``cnn``), the
preset table over both (``presets``), the costs (``cost``); building and loading are here.
"""

from __future__ import annotations

import logging
import os

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedConfig, PreTrainedModel

from ..config import ModelArguments
from ..errors import UserError
from ..locations import is_local_path
from . import cnn, vit
from .cost import (check_fits_in_memory, device_memory, estimate_training_memory, num_parameters,
                   training_flops_per_image)
from .presets import (PRESETS, SUPPORTED_MODEL_TYPES, build_config, check_overrides, is_vit, label_maps,
                      model_family)
from .vit import ARCH_FIELDS, check_architecture

__all__ = ["ARCH_FIELDS", "PRESETS", "SUPPORTED_MODEL_TYPES", "build_config", "build_model", "check_architecture",
           "checkpoint_config",
           "check_fits_in_memory", "device_memory", "estimate_training_memory", "is_vit", "label_maps",
           "load_pretrained", "model_config", "model_family", "num_parameters", "training_flops_per_image"]

logger = logging.getLogger(__name__)


def model_config(args: ModelArguments, label_names: list[str]) -> PreTrainedConfig:
    """The config :func:`build_model` builds for these arguments — the preset's, or the checkpoint's with this run's
    labels and image size — without creating or reading any weights (for the memory check before the build)."""
    if args.model_name_or_path:
        return _fine_tuning_config(args, label_names)[0]
    return build_config(args, label_names)


def build_model(args: ModelArguments, label_names: list[str]) -> PreTrainedModel:
    """A freshly initialised model of ``args.model_preset``, or ``args.model_name_or_path`` with its head swapped
    for ``label_names``."""
    if args.model_name_or_path:
        return load_pretrained(args, label_names)
    return AutoModelForImageClassification.from_config(build_config(args, label_names))


def checkpoint_config(path: str) -> PreTrainedConfig:
    """The config of the model folder or Hub id ``path`` (fine-tuning, evaluation); a path that holds no model, an
    unreadable config or a model type this pipeline does not train is a one-line error."""
    if os.path.isfile(path):
        raise UserError(f"model_name_or_path {path!r} is a file; pass the folder holding config.json and the weights")
    if is_local_path(path) and not os.path.exists(path):
        raise UserError(f"model_name_or_path {path!r} does not exist; pass a folder written by save_pretrained "
                        "or a Hub id")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path!r} holds no model (no config.json); pass a folder written by save_pretrained")
    try:
        # The raw dict first: AutoConfig would want remote code for an unknown model type.
        config_dict, _ = PreTrainedConfig.get_config_dict(path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a model config from {path!r}: {str(err).splitlines()[0]}") from None
    model_type = config_dict.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"{path!r} is a {model_type!r} checkpoint, not a ViT, ResNet or ConvNeXt; hf_vit needs "
                        f"a checkpoint of model_type {list(SUPPORTED_MODEL_TYPES)}")
    return AutoConfig.from_pretrained(path)


def _fine_tuning_config(args: ModelArguments, label_names: list[str]) -> tuple[PreTrainedConfig, int, bool]:
    """The checkpoint's config updated for this run, the checkpoint's own image size, and whether its head was
    trained on exactly ``label_names``."""
    path = args.model_name_or_path
    config = checkpoint_config(path)
    overrides = check_overrides(args, config.model_type, f"the checkpoint {path!r}")
    for key, value in overrides.items():
        if key in ARCH_FIELDS and key != "image_size" and getattr(config, key) != value:
            raise UserError(
                f"{key}={value} does not fit the checkpoint {path!r} ({key}={getattr(config, key)}); "
                "drop the override or pick a matching checkpoint"
            )
    source_size = getattr(config, "image_size", None)  # a ResNet from elsewhere may not say
    target_size = args.image_size or source_size
    if target_size is None:
        raise UserError(f"the checkpoint {path!r} does not say its image size; pass --image_size (e.g. 224)")
    # A head is only worth keeping if its rows mean the same classes; a same-sized head for other classes is not.
    same_labels = {int(k): v for k, v in (config.id2label or {}).items()} == dict(enumerate(label_names))
    update = dict(image_size=target_size, **label_maps(label_names))
    if is_vit(config):
        check_architecture(target_size, config.patch_size, config.hidden_size, config.num_attention_heads)
        update.update(hidden_dropout_prob=args.hidden_dropout_prob,
                      attention_probs_dropout_prob=args.attention_probs_dropout_prob)
    config.update(update)
    if not is_vit(config):
        cnn.check_config(config)
    return config, source_size, same_labels


def load_pretrained(args: ModelArguments, label_names: list[str]) -> PreTrainedModel:
    """Load ``args.model_name_or_path`` (a ViT, ResNet or ConvNeXt checkpoint) for ``label_names``: every backbone
    tensor kept, the head new unless the checkpoint was trained on exactly these labels.

    When a ViT's image size changes (e.g. 224 -> 384) the position embeddings are interpolated here, because
    ``ignore_mismatched_sizes`` alone would re-initialise them and throw their pretraining away (a CNN's weights do
    not depend on the image size). The model gets a ``loading_report`` dict (``loaded``, ``interpolated``,
    ``reinitialized``, ``unexpected`` tensor names), which is also logged.
    """
    path = args.model_name_or_path
    config, source_size, same_labels = _fine_tuning_config(args, label_names)
    target_size = config.image_size
    try:
        # dtype=float32: transformers keeps a bf16/fp16 checkpoint in its own dtype, but the optimizer needs fp32
        # master weights (mixed precision is autocast's job).
        model, info = AutoModelForImageClassification.from_pretrained(
            path, config=config, ignore_mismatched_sizes=True, use_safetensors=True, output_loading_info=True,
            dtype=torch.float32, **({"attn_implementation": "sdpa"} if is_vit(config) else {}),
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # SafetensorError: a corrupt file
        raise UserError(f"cannot load weights from {path!r}: {str(err).splitlines()[0]}") from None

    reinit = {k for k, *_ in info.get("mismatched_keys", [])} | set(info.get("missing_keys", []))
    interpolated = []
    if is_vit(config) and source_size != target_size:
        interpolated.append(vit.interpolate_position_embeddings(model, path, source_size, config.patch_size))
        reinit.discard(interpolated[0])
    head = {name for name in model.state_dict() if name.startswith("classifier.")}
    if not same_labels and not head <= reinit:
        _reinit_head(model)
        reinit |= head
    backbone = sorted(k for k in reinit if not k.startswith("classifier."))
    if backbone:
        raise UserError(
            f"checkpoint {path!r} does not fit the model: backbone tensors {backbone[:4]} would be re-initialised; "
            "check the architecture overrides"
        )
    reinit = sorted(reinit)
    loaded = sorted(set(model.state_dict()) - set(reinit) - set(interpolated))
    unexpected = sorted(info.get("unexpected_keys", []))
    logger.info(
        "Loaded %s: %d tensors copied unchanged, %s, re-initialised %s%s%s",
        path, len(loaded),
        # transformers' own load report lists a resized position table as re-initialised; it is overwritten here.
        f"interpolated {interpolated} from the checkpoint's {source_size}px grid to {target_size}px"
        if interpolated else "none interpolated",
        reinit or "nothing (the checkpoint's head already has these labels)",
        f" (new {len(label_names)}-class head)" if reinit else "",
        f", ignored checkpoint tensors {unexpected}" if unexpected else "",
    )
    model.loading_report = {"loaded": loaded, "interpolated": interpolated, "reinitialized": reinit,
                            "unexpected": unexpected}
    return model


def _reinit_head(model: PreTrainedModel) -> None:
    """Fresh classifier init, exactly as transformers initialises a new model's head (ResNet's head is a
    Sequential(Flatten, Linear), hence ``apply``)."""
    for param in model.classifier.parameters():
        # Loaded tensors carry transformers' "initialised" mark, which makes its init functions skip them.
        param._is_hf_initialized = False
    model.classifier.apply(model._init_weights)
