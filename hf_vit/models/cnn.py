"""The CNN family: presets over transformers' own ``ResNetConfig`` and ``ConvNextConfig`` (never downloaded weights).

Why these two, and how ``cnn_tiny_cifar`` was chosen (measured against the CPU quick recipe's ViT):
``docs/models.md`` and ``benchmarks/choose_cnn.py``.
"""

from __future__ import annotations

from transformers import ConvNextConfig, PreTrainedConfig, ResNetConfig

from ..errors import UserError

MODEL_TYPES = ("resnet", "convnext")

PRESETS: dict[str, dict] = {
    # ResNet-50 exactly (ResNetConfig's defaults, written out): the bottleneck v1.5 layout of torchvision and
    # microsoft/resnet-50, whose stride-2 sits in the 3x3 conv. Its ImageNet stem (7x7 stride 2 + max-pool) keeps
    # an 8x8 map of a 32-px image, so it runs at the ViT-B/16 recipe's 224 px (CIFAR upsampled).
    "resnet50": dict(config_class=ResNetConfig, image_size=224, embedding_size=64, hidden_sizes=[256, 512, 1024, 2048],
                     depths=[3, 4, 6, 3], layer_type="bottleneck", hidden_act="relu",
                     downsample_in_first_stage=False, downsample_in_bottleneck=False),
    # A ConvNeXt for 32-px input at the CPU quick recipe's cost per step: a 4x4 patchify stem (an 8x8 map, the grid
    # of vit_tiny_cifar's patch 4; nothing pooled away, unlike ResNet's stem), stages of 64/128/256 channels at
    # 8x8/4x4/2x2, two blocks each, no stochastic depth (a short schedule wants little regularisation).
    "cnn_tiny_cifar": dict(config_class=ConvNextConfig, image_size=32, patch_size=4, num_stages=3,
                           hidden_sizes=[64, 128, 256], depths=[2, 2, 2], drop_path_rate=0.0),
}

# The command-line overrides that mean the same in these configs as in a ViT's (for ConvNeXt, patch_size is the
# stem's patch). Widths and depths are the preset's: a CNN variant is a new preset, not a flag combination.
OVERRIDES = {"resnet": ("image_size",), "convnext": ("image_size", "patch_size")}


def total_stride(config: PreTrainedConfig) -> int:
    """Input pixels per pixel of the last stage's feature map."""
    if config.model_type == "resnet":  # stem conv stride 2 + max-pool stride 2, then stride 2 from stage 2 on
        return 4 * 2 ** (len(config.depths) - 1) * (2 if config.downsample_in_first_stage else 1)
    return config.patch_size * 2 ** (config.num_stages - 1)


def check_config(config: PreTrainedConfig) -> None:
    """Raise a one-line ``UserError`` when the image is smaller than what the network downsamples to one pixel."""
    stride = total_stride(config)
    if config.image_size < stride:
        raise UserError(f"image_size={config.image_size} is smaller than this {config.model_type}'s total stride of "
                        f"{stride} pixels; use image_size >= {stride}")
