"""Optimisation stage: AdamW parameter groups, a step skipped on the device, the warmup + cosine LR schedule, the
loss, and the weight EMA."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from .config import TrainArguments
from .errors import UserError
from .models import is_vit

# Parameters that get no weight decay: biases, norm weights (ViT/ConvNeXt LayerNorm, ResNet's BatchNorm, named
# "normalization"), ConvNeXt's per-channel layer scale, the position embeddings and the CLS token (decaying them pulls
# them towards zero for no regularisation benefit). Every one of them but the two embeddings is also a vector
# (ndim <= 1), which param_groups checks first; the names are for the reader and for odd shapes.
# Why names, and not the model: a transformers model does not say which of its parameters are exempt (there is no
# such attribute or method on PreTrainedModel), and the HF Trainer itself decides by name too
# (Trainer.get_decay_parameter_names: "bias" and norm-like names, plus nn.LayerNorm by type). The two embeddings are
# plain nn.Parameters of ViTEmbeddings, whose role only their names state. The groups are tested per family
# (tests/test_foundation.py for ViT, tests/test_models.py for the CNNs): a parameter transformers renames fails there.
NO_DECAY_PATTERNS = ("bias", "layernorm", "layer_norm", "norm.", "normalization", "layer_scale",
                     "position_embeddings", "cls_token")
_BLOCK_INDEX = re.compile(r"\.(?:layers?|blocks)\.(\d+)\.")


def is_head(name: str) -> bool:
    """The classifier of every supported family: ViT's and ConvNeXt's ``classifier`` (a Linear), ResNet's
    ``classifier.1`` (the Linear after a Flatten)."""
    return name.startswith("classifier.")


def layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings, i+1 for block i, num_layers+1 for the final norm and head (BEiT's numbering)."""
    if "embeddings" in name:
        return 0
    match = _BLOCK_INDEX.search(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def param_groups(model: torch.nn.Module, args: TrainArguments) -> list[dict]:
    """AdamW groups: (decay, no-decay) x (backbone layer, head), each with an ``lr_scale``.

    ``lr_scale`` = ``head_lr_multiplier`` for the classifier, ``layer_decay ** (depth + 1 - layer_id)`` for the
    backbone when layer decay is on (ViTs only: a one-line ``UserError`` for other models), else 1. The scheduler
    multiplies each group's schedule by its scale, so all groups share the warmup/cosine shape.
    """
    if args.layer_decay and not is_vit(model.config):
        # Layer decay is numbered per transformer block (BEiT) and its values are tuned for 12-24 such blocks; a CNN's
        # stages of unequal depth have no agreed numbering, and no CNN here is pretrained to be fine-tuned gently.
        raise UserError(f"layer_decay applies to ViT models only, not to this {model.config.model_type}; drop it "
                        "(head_lr_multiplier still works)")
    num_layers = model.config.num_hidden_layers if args.layer_decay else 0
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or any(p in name.lower() for p in NO_DECAY_PATTERNS)
        if is_head(name):
            scale, lid = args.head_lr_multiplier, num_layers + 1
        else:
            lid = layer_id(name, num_layers)
            scale = args.layer_decay ** (num_layers + 1 - lid) if args.layer_decay else 1.0
        key = (is_head(name), lid if args.layer_decay else -1, no_decay)
        group = groups.setdefault(key, {
            "params": [], "param_names": [], "weight_decay": 0.0 if no_decay else args.weight_decay,
            "lr_scale": scale, "is_head": is_head(name),
        })
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


def build_optimizer(model: torch.nn.Module, args: TrainArguments) -> torch.optim.AdamW:
    groups = param_groups(model, args)
    for g in groups:
        g["lr"] = args.learning_rate * g["lr_scale"]
    # Fused: the whole update in one kernel per device and dtype (CUDA and CPU alike; 3x torch's per-tensor loop for a
    # small ViT on one CPU core), and the only AdamW that can skip a step on a flag that stays on the device
    # (``found_inf``, see step_unless). A device without a fused kernel gets torch's default; step_unless then reads
    # the flag.
    fused = all(p.device.type in _get_fused_kernels_supported_devices() and torch.is_floating_point(p)
                for g in groups for p in g["params"])
    return torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        fused=fused or None,
    )


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()``, except where ``skip`` (a float32 0-dim tensor on the device, 1.0 = skip) is set: then the
    parameters and the optimizer state (moments, step count) are left exactly as they were.

    Fused AdamW decides this inside its kernel from a ``found_inf`` attribute — the mechanism GradScaler uses to skip
    an overflowing fp16 step — so the host never waits for the flag. An optimizer without it (no fused kernel for the
    device) reads the flag: one host read. ``optimizer``: a torch optimizer or accelerate's wrapper of one (whose
    ``step`` also knows about gradient accumulation)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if getattr(inner, "_step_supports_amp_scaling", False):
        inner.found_inf = skip
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    elif not skip.item():
        optimizer.step()


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, start: float, end: float) -> float:
    """Linear warmup ``start -> peak`` over ``warmup_steps``, then cosine ``peak -> end`` reaching ``end`` at the
    last step (``total_steps - 1``)."""
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArguments, total_steps: int,
                    warmup_steps: int) -> LambdaLR:
    """Per-step schedule shared by all groups (each scaled by its ``lr_scale``); step it once per optimizer step."""
    peak = args.learning_rate

    def factor(step: int) -> float:
        return lr_at(step, total_steps, warmup_steps, peak, args.warmup_start_lr, args.min_lr) / peak

    return LambdaLR(optimizer, factor)


class EMA(AveragedModel):
    """Exponential moving average of the weights and floating buffers, updated after every optimizer step.

    The first update copies the model (``n_averaged`` 0 -> 1); every later one sets
    ``ema = decay * ema + (1 - decay) * current``; integer buffers (counters such as ``num_batches_tracked``) are
    copied instead, because averaging would truncate ``decay * ema + (1 - decay) * value`` and freeze them.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        # n_averaged lives on the model's device: the update branches on it there, never on the host.
        super().__init__(model, device=next(model.parameters()).device, use_buffers=True)
        self.decay = decay

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module, skip: torch.Tensor | None = None) -> None:
        """One EMA update from ``model``; none at all where ``skip`` (a 0-dim tensor on the device, nonzero for a
        skipped optimizer step) is set. Decided on the device — torch's ``AveragedModel.update_parameters`` asks
        ``n_averaged == 0`` on the host — so that the training step never waits for the device."""
        keep = torch.zeros((), dtype=torch.bool, device=self.n_averaged.device) if skip is None else skip.bool()
        # The model's share: 1 on the first update (an exact copy: lerp returns its end point at weight 1), 0 on a
        # skipped step (lerp then returns the EMA itself, the weights being finite and untouched by a skipped step);
        # float32 like torch's scalar lerp rounds 1 - decay, so the averages are bit for bit those of
        # ``torch._foreach_lerp_(ema, current, 1 - decay)`` (tests/test_optim.py).
        share = torch.where(keep, 0.0, torch.where(self.n_averaged == 0, 1.0, 1.0 - self.decay))
        ema_params = list(self.module.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()],
                             [share.to(p.dtype) for p in ema_params])
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            # Buffers (few, small) by selection: a skipped step's forward may have left NaN in BatchNorm statistics,
            # which no interpolation weight keeps out.
            new = torch.lerp(mine, theirs, share.to(mine.dtype)) if torch.is_floating_point(mine) else theirs
            mine.copy_(torch.where(keep, mine, new))
        self.n_averaged += (~keep).long()


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy with label smoothing; ``targets`` are class ids, or soft (B, C) targets from MixUp/CutMix."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
