"""The ViT family: presets over ``ViTConfig``, the shape checks, the analytic FLOP count and position-embedding
interpolation for a checkpoint fine-tuned at another resolution."""

from __future__ import annotations

import json

import torch
from transformers import ViTConfig

from ..errors import UserError

MODEL_TYPES = ("vit",)

# Architecture presets (the timm names where one exists). Every architecture field can be overridden from the CLI.
PRESETS: dict[str, dict] = {
    "vit_tiny_cifar": dict(config_class=ViTConfig, image_size=32, patch_size=4, hidden_size=192,
                           num_hidden_layers=6, num_attention_heads=3, intermediate_size=768),
    "vit_small_cifar": dict(config_class=ViTConfig, image_size=32, patch_size=4, hidden_size=384,
                            num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536),
    "vit_small_patch16_224": dict(config_class=ViTConfig, image_size=224, patch_size=16, hidden_size=384,
                                  num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "vit_base_patch16_224": dict(config_class=ViTConfig, image_size=224, patch_size=16, hidden_size=768,
                                 num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "vit_large_patch16_224": dict(config_class=ViTConfig, image_size=224, patch_size=16, hidden_size=1024,
                                  num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
ARCH_FIELDS = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size")
DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob")


def check_architecture(image_size: int, patch_size: int, hidden_size: int, num_attention_heads: int) -> None:
    """Raise a one-line ``UserError`` for a width the heads do not divide or an image the patches do not tile."""
    if hidden_size % num_attention_heads:
        raise UserError(
            f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}; "
            "choose a head count that divides the width"
        )
    if image_size % patch_size:
        raise UserError(f"image_size={image_size} is not divisible by patch_size={patch_size}; pick matching sizes")


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


def interpolate_position_embeddings(model, path: str, source_size: int, patch_size: int) -> str:
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
