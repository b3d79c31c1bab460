"""What a model costs: parameters, training FLOPs per image, and the memory a training step needs — counted on the
meta device, so that nothing is allocated, whatever the architecture or the image size."""

from __future__ import annotations

import copy
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForImageClassification, PreTrainedConfig

from ..errors import UserError
from . import vit
from .presets import is_vit

# fp32 weight + its gradient + AdamW's two moments.
TRAINING_BYTES_PER_PARAMETER = 16


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(config: PreTrainedConfig) -> torch.nn.Module:
    """The model ``config`` describes, with every tensor on the meta device (shapes only: no memory, no init cost)."""
    with torch.device("meta"):
        return AutoModelForImageClassification.from_config(copy.deepcopy(config))


def _meta_pixels(config: PreTrainedConfig, batch_size: int) -> torch.Tensor:
    return torch.empty(batch_size, config.num_channels, config.image_size, config.image_size, device="meta")


def training_flops_per_image(config: PreTrainedConfig) -> float:
    """Training FLOPs per image of a supported model at ``config.image_size``: 3 x the forward (backward ~ 2x).

    ViTs: the analytic count (``vit.training_flops_per_image``). CNNs: ``torch.utils.flop_counter.FlopCounterMode``
    over one forward on the meta device — convolutions and matmuls, 2 FLOPs per multiply-add, the convention of the
    published "GMACs" figures (norms, activations and pooling are not counted). ResNet-50 at 224 px: 4.1 GMACs
    forward, 24.6 GFLOP per training image.
    """
    if is_vit(config):
        return vit.training_flops_per_image(config)
    model = meta_model(config).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixel_values=_meta_pixels(config, 1))
    return float(3 * counter.get_total_flops())


def _saved_activation_bytes(model: torch.nn.Module, pixels: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps from one forward for the backward (fp32; parameters excluded; a view
    counts as its base, once)."""
    params = {id(p) for p in model.parameters()}
    saved: dict[int, torch.Tensor] = {}  # holding the tensors keeps their ids unique until the sum

    def pack(tensor):
        base = tensor if tensor._base is None else tensor._base
        if id(tensor) not in params and id(base) not in params:
            saved.setdefault(id(base), base)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(pixel_values=pixels)
    return sum(t.numel() * t.element_size() for t in saved.values())


def estimate_training_memory(config: PreTrainedConfig, per_device_batch_size: int,
                             mixed_precision: str | None) -> int:
    """Bytes one process needs to train ``config`` at ``per_device_batch_size`` (``mixed_precision``: "no"/None,
    "bf16" or "fp16"), for any supported family; runs in well under a second and allocates nothing.

    = 16 bytes per parameter (fp32 weights, gradients, AdamW moments; + 2 under mixed precision for the 16-bit weight
    copies autocast caches) + the activations autograd saves in one forward, found by running the real architecture
    on the meta device with ``saved_tensors_hooks``. Saved tensors are counted at 4 bytes per element, or 3 under
    mixed precision (autocast keeps the inputs of matmuls and convolutions in 16 bits, norms, softmax and residual
    sums in fp32). A rough figure that errs low: it leaves out the backward's transient buffers, allocator slack, the
    runtime itself (CUDA context, kernel workspaces), an EMA copy and the data batches. Against the peak RSS of real
    CPU steps (ViTs, ResNet-50, ConvNeXt; ``benchmarks/choose_cnn.py --memory``, figures in ``docs/models.md``) the
    real peak was never below it and at most ~1.6x it. On CUDA a ViT's flash attention keeps no attention matrix,
    which is counted here: that part errs high. It is meant to refuse runs that cannot fit, not to tune a batch size
    to the last gigabyte. A shape so large that a single tensor exceeds 2**63 bytes returns ``sys.maxsize``.
    """
    mixed = mixed_precision in ("bf16", "fp16")
    try:
        model = meta_model(config)
        parameter_bytes = num_parameters(model) * (TRAINING_BYTES_PER_PARAMETER + (2 if mixed else 0))
        activation_bytes = _saved_activation_bytes(model, _meta_pixels(config, per_device_batch_size))
    except (RuntimeError, TypeError, OverflowError) as err:
        # torch refuses a size past int64 with one of these, depending on where it is computed; nothing else is hidden.
        if "overflow" not in str(err).lower():
            raise
        return sys.maxsize  # e.g. a ViT's attention matrix at image_size=100000: (625M tokens)^2
    if mixed:
        activation_bytes = activation_bytes * 3 // 4
    return parameter_bytes + activation_bytes


def device_memory(device: torch.device | str) -> int | None:
    """Total bytes of ``device``: a CUDA device's memory, physical RAM for the CPU (and Apple's unified memory);
    ``None`` for other device types (no reliable figure)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type in ("cpu", "mps") and hasattr(os, "sysconf"):  # Linux, macOS
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def check_fits_in_memory(config: PreTrainedConfig, per_device_batch_size: int, mixed_precision: str | None,
                         device: torch.device | str) -> None:
    """Raise a one-line ``UserError`` when :func:`estimate_training_memory` exceeds ``device``'s memory — before
    anything is allocated (call it before building the model)."""
    total = device_memory(device)
    if total is None:
        return
    need = estimate_training_memory(config, per_device_batch_size, mixed_precision)
    if need > total:
        where = "physical RAM" if torch.device(device).type != "cuda" else f"memory of {torch.device(device)}"
        amount = "more than 2**63 bytes" if need >= sys.maxsize else f"about {need / 2**30:,.1f} GiB"
        raise UserError(
            f"training this {config.model_type} at image_size={config.image_size} with per_device_train_batch_size="
            f"{per_device_batch_size} needs {amount} (weights, gradients, AdamW states, "
            f"activations), more than the {total / 2**30:,.1f} GiB {where}; lower image_size or the per-device batch "
            "(a smaller total_train_batch_size, or more gradient_accumulation_steps or processes)"
        )
