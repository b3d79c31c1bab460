"""Model stage: named ViT presets over one ``ViTConfig`` builder, checkpoint loading with head swap, FLOP counting.

Every model is a ``transformers.ViTForImageClassification`` with SDPA attention, built from a ``ViTConfig`` — no
weights are downloaded unless the user names a checkpoint with ``model_name_or_path``.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from safetensors import SafetensorError
from transformers import ViTConfig, ViTForImageClassification

from .config import ModelArguments
from .errors import UserError

logger = logging.getLogger(__name__)

# Architecture presets (the timm names where one exists). Any field can still be overridden from the CLI.
PRESETS: dict[str, dict] = {
    "vit_tiny_cifar": dict(image_size=32, patch_size=4, hidden_size=192, num_hidden_layers=6,
                           num_attention_heads=3, intermediate_size=768),
    "vit_small_cifar": dict(image_size=32, patch_size=4, hidden_size=384, num_hidden_layers=6,
                            num_attention_heads=6, intermediate_size=1536),
    "vit_small_patch16_224": dict(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12,
                                  num_attention_heads=6, intermediate_size=1536),
    "vit_base_patch16_224": dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
                                 num_attention_heads=12, intermediate_size=3072),
    "vit_large_patch16_224": dict(image_size=224, patch_size=16, hidden_size=1024, num_hidden_layers=24,
                                  num_attention_heads=16, intermediate_size=4096),
}
ARCH_FIELDS = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size")


def label_maps(label_names: list[str]) -> dict:
    """``num_labels``/``id2label``/``label2id`` for a ``ViTConfig`` from the dataset's class names."""
    return dict(
        num_labels=len(label_names),
        id2label={i: name for i, name in enumerate(label_names)},
        label2id={name: i for i, name in enumerate(label_names)},
    )


def check_architecture(image_size: int, patch_size: int, hidden_size: int, num_attention_heads: int) -> None:
    if hidden_size % num_attention_heads:
        raise UserError(
            f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}; "
            "choose a head count that divides the width"
        )
    if image_size % patch_size:
        raise UserError(f"image_size={image_size} is not divisible by patch_size={patch_size}; pick matching sizes")


def build_config(args: ModelArguments, label_names: list[str]) -> ViTConfig:
    """Resolve the preset plus CLI overrides into a ``ViTConfig`` with the dataset's labels."""
    if args.model_preset not in PRESETS:
        raise UserError(f"unknown model_preset {args.model_preset!r}; choose one of {sorted(PRESETS)}")
    arch = dict(PRESETS[args.model_preset])
    arch.update({k: getattr(args, k) for k in ARCH_FIELDS if getattr(args, k) is not None})
    check_architecture(arch["image_size"], arch["patch_size"], arch["hidden_size"], arch["num_attention_heads"])
    return ViTConfig(
        **arch,
        hidden_dropout_prob=args.hidden_dropout_prob,
        attention_probs_dropout_prob=args.attention_probs_dropout_prob,
        attn_implementation="sdpa",
        **label_maps(label_names),
    )


def build_model(args: ModelArguments, label_names: list[str]) -> ViTForImageClassification:
    """A freshly initialised model, or a checkpoint with its head swapped for ``label_names``."""
    if args.model_name_or_path:
        return load_pretrained(args, label_names)
    return ViTForImageClassification(build_config(args, label_names))


def _looks_local(path: str) -> bool:
    """A filesystem path rather than a Hub id (``user/name``)."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1


def _checkpoint_config(path: str) -> ViTConfig:
    """The checkpoint's ``ViTConfig``; anything that is not a ViT checkpoint is a one-line error."""
    if os.path.isfile(path):
        raise UserError(f"model_name_or_path {path!r} is a file; pass the folder holding config.json and the weights")
    if not os.path.exists(path) and _looks_local(path):
        raise UserError(f"model_name_or_path {path!r} does not exist; pass a folder written by save_pretrained "
                        "or a Hub id")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path!r} holds no model (no config.json); pass a folder written by save_pretrained")
    try:
        # The raw dict first: ViTConfig.from_pretrained would accept another model type with only a warning.
        config_dict, _ = ViTConfig.get_config_dict(path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a model config from {path!r}: {str(err).splitlines()[0]}") from None
    model_type = config_dict.get("model_type")
    if model_type != "vit":
        raise UserError(f"{path!r} is a {model_type!r} checkpoint, not a ViT; fine-tuning needs a ViT checkpoint")
    return ViTConfig.from_pretrained(path)


def load_pretrained(args: ModelArguments, label_names: list[str]) -> ViTForImageClassification:
    """Load ``args.model_name_or_path`` for ``label_names``: every backbone tensor kept, the head new unless the
    checkpoint was trained on exactly these labels.

    When the image size changes (e.g. 224 -> 384) the position embeddings are interpolated here, because
    ``ignore_mismatched_sizes`` alone would re-initialise them and throw their pretraining away. The model gets a
    ``loading_report`` dict (``loaded``, ``interpolated``, ``reinitialized``, ``unexpected`` tensor names), which is
    also logged.
    """
    path = args.model_name_or_path
    config = _checkpoint_config(path)
    overrides = {k: getattr(args, k) for k in ARCH_FIELDS if getattr(args, k) is not None and k != "image_size"}
    for key, value in overrides.items():
        if getattr(config, key) != value:
            raise UserError(
                f"{key}={value} does not fit the checkpoint {path!r} ({key}={getattr(config, key)}); "
                "drop the override or pick a matching checkpoint"
            )
    source_size = config.image_size
    target_size = args.image_size or source_size
    check_architecture(target_size, config.patch_size, config.hidden_size, config.num_attention_heads)
    # A head is only worth keeping if its rows mean the same classes; a same-sized head for other classes is not.
    same_labels = {int(k): v for k, v in (config.id2label or {}).items()} == dict(enumerate(label_names))
    config.update(dict(
        image_size=target_size,
        hidden_dropout_prob=args.hidden_dropout_prob,
        attention_probs_dropout_prob=args.attention_probs_dropout_prob,
        **label_maps(label_names),
    ))
    try:
        # dtype=float32: transformers keeps a bf16/fp16 checkpoint in its own dtype, but the optimizer needs fp32
        # master weights (mixed precision is autocast's job).
        model, info = ViTForImageClassification.from_pretrained(
            path, config=config, ignore_mismatched_sizes=True, use_safetensors=True, output_loading_info=True,
            dtype=torch.float32, attn_implementation="sdpa",
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # SafetensorError: a corrupt file
        raise UserError(f"cannot load weights from {path!r}: {str(err).splitlines()[0]}") from None

    reinit = {k for k, *_ in info.get("mismatched_keys", [])} | set(info.get("missing_keys", []))
    interpolated = []
    if source_size != target_size:
        interpolated.append(_interpolate_position_embeddings(model, path, source_size, config.patch_size))
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


def _reinit_head(model: ViTForImageClassification) -> None:
    """Fresh classifier init, exactly as transformers initialises a new model's head."""
    for param in model.classifier.parameters():
        # Loaded tensors carry transformers' "initialised" mark, which makes its init functions skip them.
        param._is_hf_initialized = False
    model._init_weights(model.classifier)


def _interpolate_position_embeddings(model, path: str, source_size: int, patch_size: int) -> str:
    """Bicubic-resize the checkpoint's patch position grid to the model's grid; the CLS position is kept as is.

    Returns the name of the tensor it wrote.
    """
    from safetensors import safe_open
    from transformers.utils import cached_file

    weights = cached_file(path, "model.safetensors", _raise_exceptions_for_missing_entries=False)
    if weights is None:  # a sharded checkpoint: find the shard that holds the position embeddings
        with open(cached_file(path, "model.safetensors.index.json")) as f:
            weight_map = json.load(f)["weight_map"]
        key = next(k for k in weight_map if k.endswith("embeddings.position_embeddings"))
        weights = cached_file(path, weight_map[key])
    with safe_open(weights, framework="pt") as f:
        key = next(k for k in f.keys() if k.endswith("embeddings.position_embeddings"))
        source = f.get_tensor(key).float()  # (1, 1 + g*g, D)
    cls_pos, grid = source[:, :1], source[:, 1:]
    g_src, g_dst = source_size // patch_size, model.config.image_size // patch_size
    dim = grid.shape[-1]
    grid = grid.reshape(1, g_src, g_src, dim).permute(0, 3, 1, 2)  # (1, D, g, g): row-major patch order
    grid = torch.nn.functional.interpolate(grid, size=(g_dst, g_dst), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, g_dst * g_dst, dim)
    target = model.vit.embeddings.position_embeddings
    with torch.no_grad():
        target.copy_(torch.cat([cls_pos, grid], dim=1))
    return next(name for name, p in model.named_parameters() if p is target)


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def training_flops_per_image(config: ViTConfig) -> float:
    """Training FLOPs per image ~= 3 x forward (backward costs about twice the forward).

    Forward MACs per image: per block, QKV + output projection 4*T*D^2, attention scores and mixing 2*T^2*D,
    MLP 2*T*D*M; plus the patch embedding (P^2*3*D per patch) and the head. FLOPs = 2 x MACs.
    ViT-B/16 at 224 gives 17.6 GMACs forward, ~105 GFLOP per training image.
    """
    g = config.image_size // config.patch_size
    t = g * g + 1
    d, m, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    block_macs = 4 * t * d * d + 2 * t * t * d + 2 * t * d * m
    embed_macs = g * g * config.patch_size**2 * config.num_channels * d
    head_macs = d * config.num_labels
    return 3 * 2 * (layers * block_macs + embed_macs + head_macs)
