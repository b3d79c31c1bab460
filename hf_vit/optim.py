"""Optimisation stage: AdamW parameter groups, the warmup + cosine LR schedule, the loss, and the weight EMA."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .config import TrainingArguments
from .errors import UserError
from .models import is_vit

# Parameters that get no weight decay: biases, norm weights (ViT/ConvNeXt LayerNorm, ResNet's BatchNorm, named
# "normalization"), ConvNeXt's per-channel layer scale, the position embeddings and the CLS token (decaying them pulls
# them towards zero for no regularisation benefit). Every one of them but the two embeddings is also a vector
# (ndim <= 1), which param_groups checks first; the names are for the reader and for odd shapes.
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


def param_groups(model: torch.nn.Module, args: TrainingArguments) -> list[dict]:
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


def build_optimizer(model: torch.nn.Module, args: TrainingArguments) -> torch.optim.AdamW:
    groups = param_groups(model, args)
    for g in groups:
        g["lr"] = args.learning_rate * g["lr_scale"]
    # fused=True runs one kernel per group on CUDA; it is not available for CPU tensors.
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        fused=fused or None,
    )


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, start: float, end: float) -> float:
    """Linear warmup ``start -> peak`` over ``warmup_steps``, then cosine ``peak -> end`` reaching ``end`` at the
    last step (``total_steps - 1``)."""
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, total_steps: int,
                    warmup_steps: int) -> LambdaLR:
    """Per-step schedule shared by all groups (each scaled by its ``lr_scale``); step it once per optimizer step."""
    peak = args.learning_rate

    def factor(step: int) -> float:
        return lr_at(step, total_steps, warmup_steps, peak, args.warmup_start_lr, args.min_lr) / peak

    return LambdaLR(optimizer, factor)


def _ema_multi_avg_fn(decay: float):
    """torch's EMA update for floating tensors; integer buffers (counters such as ``num_batches_tracked``) are
    copied instead, because torch's fallback would truncate ``decay * ema + (1 - decay) * value`` and freeze them."""
    float_update = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(ema_tensors, model_tensors, num_averaged):
        if torch.is_floating_point(ema_tensors[0]) or torch.is_complex(ema_tensors[0]):
            float_update(ema_tensors, model_tensors, num_averaged)
        else:
            torch._foreach_copy_(ema_tensors, model_tensors)

    return update


class EMA(AveragedModel):
    """Exponential moving average of the weights and floating buffers, updated after every optimizer step.

    The first update copies the model (``n_averaged`` 0 -> 1); every later one sets
    ``ema = decay * ema + (1 - decay) * current``.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__(model, multi_avg_fn=_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = decay


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy with label smoothing; ``targets`` are class ids, or soft (B, C) targets from MixUp/CutMix."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
