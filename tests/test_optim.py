"""Optimisation for fine-tuning: group learning rates, layer decay, weight-decay exclusions, EMA, the smoothed loss,
and a skipped step decided on the device.

Every expected number is computed by hand here, not by calling the function under test a second time.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import ViTConfig, ViTForImageClassification

from hf_vit.config import TrainArguments
from hf_vit.optim import EMA, build_optimizer, build_scheduler, classification_loss, param_groups, step_unless

DEPTH = 3


def tiny_vit(num_labels: int = 4) -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=DEPTH, num_attention_heads=2,
        intermediate_size=32, num_labels=num_labels))


def group_of(optimizer) -> dict[str, dict]:
    """parameter name -> the optimizer param_group holding it (each parameter must be in exactly one)."""
    found = {}
    for group in optimizer.param_groups:
        for name in group["param_names"]:
            assert name not in found, f"{name} is in two groups"
            found[name] = group
    return found


def expected_layer(name: str) -> int:
    """BEiT's numbering, written out by hand for the transformers ViT parameter names."""
    if name.startswith("vit.embeddings."):
        return 0
    if name.startswith("vit.layers."):
        return int(name.split(".")[2]) + 1
    assert name.startswith("vit.layernorm."), name
    return DEPTH + 1


def test_head_runs_at_multiplied_lr_with_the_same_warmup_cosine_shape():
    # Fine-tuning recipe values; 101 steps so warmup ends at step 10 and the cosine midpoint is step 55.
    args = TrainArguments(learning_rate=2e-4, warmup_start_lr=1e-6, min_lr=1e-6, head_lr_multiplier=10)
    model = tiny_vit()
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, total_steps=101, warmup_steps=10)
    by_name = group_of(optimizer)
    assert set(by_name) == {n for n, _ in model.named_parameters()}
    head_groups = [g for g in optimizer.param_groups if g["is_head"]]
    backbone_groups = [g for g in optimizer.param_groups if not g["is_head"]]
    assert {n for g in head_groups for n in g["param_names"]} == {"classifier.weight", "classifier.bias"}

    backbone_lr_by_hand = {
        0: 1e-6,                                  # warmup start
        5: 1e-6 + (2e-4 - 1e-6) * 5 / 10,         # halfway through the linear warmup
        10: 2e-4,                                 # peak
        55: 1e-6 + (2e-4 - 1e-6) / 2,             # cosine midpoint: cos(pi/2) = 0
        100: 1e-6,                                # last step: min_lr
    }
    lrs = {}
    for step in range(101):
        lrs[step] = ([g["lr"] for g in backbone_groups], [g["lr"] for g in head_groups])
        optimizer.step()  # no gradients: a no-op, but keeps the scheduler's step-order check satisfied
        scheduler.step()
    for step, expected in backbone_lr_by_hand.items():
        backbone, head = lrs[step]
        assert backbone == pytest.approx([expected] * len(backbone), rel=1e-9), step
        assert head == pytest.approx([10 * expected] * len(head), rel=1e-9), step
    # Same shape: the head/backbone ratio is exactly the multiplier at every step.
    for step, (backbone, head) in lrs.items():
        assert head[0] / backbone[0] == pytest.approx(10, rel=1e-9), step


def test_layer_decay_scales_each_block_by_decay_to_the_depth_minus_its_index():
    args = TrainArguments(learning_rate=1e-3, warmup_start_lr=1e-3, min_lr=1e-3, layer_decay=0.5,
                             head_lr_multiplier=3)
    model = tiny_vit()
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, total_steps=10, warmup_steps=0)
    optimizer.step()
    scheduler.step()  # a flat schedule: every group sits at learning_rate x its scale
    by_name = group_of(optimizer)
    seen_layers = set()
    for name, _ in model.named_parameters():
        if name.startswith("classifier."):
            expected = 3.0  # the head gets the head multiplier, not a layer-decay factor
        else:
            layer = expected_layer(name)
            seen_layers.add(layer)
            expected = 0.5 ** (DEPTH + 1 - layer)  # embeddings 0.5^4, block 0 0.5^3, ..., final norm 1
        assert by_name[name]["lr_scale"] == pytest.approx(expected), name
        assert by_name[name]["lr"] == pytest.approx(1e-3 * expected), name
    assert seen_layers == set(range(DEPTH + 2))
    assert by_name["vit.embeddings.patch_embeddings.projection.weight"]["lr"] == pytest.approx(1e-3 / 16)
    assert by_name["vit.layers.2.mlp.fc1.weight"]["lr"] == pytest.approx(1e-3 / 2)


def test_without_layer_decay_the_whole_backbone_shares_one_lr():
    args = TrainArguments(learning_rate=1e-3, head_lr_multiplier=10)
    groups = param_groups(tiny_vit(), args)
    assert len(groups) == 4  # (backbone, head) x (decay, no decay)
    assert {g["lr_scale"] for g in groups if not g["is_head"]} == {1.0}
    assert {g["lr_scale"] for g in groups if g["is_head"]} == {10}


def test_no_weight_decay_on_biases_norms_position_embeddings_and_cls_token():
    args = TrainArguments(weight_decay=0.05, layer_decay=0.8)
    model = tiny_vit()
    by_name = group_of(build_optimizer(model, args))
    exempt = set()
    for name, _ in model.named_parameters():
        if (name.endswith(".bias") or ".layernorm" in name or name == "vit.embeddings.position_embeddings"
                or name == "vit.embeddings.cls_token"):
            exempt.add(name)
        assert by_name[name]["weight_decay"] == (0.0 if name in exempt else 0.05), name
    # The list above really covers each kind, and the matrices really decay.
    assert {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings", "vit.layernorm.weight",
            "vit.layers.0.layernorm_before.weight", "classifier.bias"} <= exempt
    assert by_name["vit.layers.0.attention.q_proj.weight"]["weight_decay"] == 0.05
    assert by_name["classifier.weight"]["weight_decay"] == 0.05


def test_frozen_backbone_leaves_only_the_classifier_to_the_optimizer():
    model = tiny_vit()
    for name, p in model.named_parameters():  # what freeze_backbone does in the trainer
        p.requires_grad = name.startswith("classifier.")
    optimizer = build_optimizer(model, TrainArguments(head_lr_multiplier=10, layer_decay=0.75))
    assert set(group_of(optimizer)) == {"classifier.weight", "classifier.bias"}


class WithBuffers(torch.nn.Module):
    """A parameter, a float buffer and an integer counter buffer (like BatchNorm's)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3))
        self.register_buffer("running", torch.zeros(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def test_ema_first_update_copies_then_each_update_is_decay_times_ema_plus_rest_times_model():
    model = WithBuffers()
    ema = EMA(model, decay=0.9)
    history = [(torch.tensor([1.0, -2.0, 4.0]), torch.tensor([10.0, 0.0]), 5),
               (torch.tensor([2.0, 0.0, 4.0]), torch.tensor([0.0, 20.0]), 6),
               (torch.tensor([-8.0, 1.0, 0.0]), torch.tensor([5.0, 5.0]), 7)]
    for i, (w, r, c) in enumerate(history):
        with torch.no_grad():
            model.weight.copy_(w)
            model.running.copy_(r)
            model.count.fill_(c)
        ema.update_parameters(model)
        if i == 0:
            # First update: a copy of the model (the EMA starts at the weights after the first step).
            expected_w, expected_r = w.clone(), r.clone()
        else:
            expected_w = 0.9 * expected_w + 0.1 * w
            expected_r = 0.9 * expected_r + 0.1 * r
        assert torch.allclose(ema.module.weight, expected_w, atol=1e-6), i
        assert torch.allclose(ema.module.running, expected_r, atol=1e-6), i
        # An integer counter is copied, not averaged (averaging would truncate and freeze it).
        assert ema.module.count.item() == c
        assert ema.n_averaged.item() == i + 1
    # By hand, for the first element: 1 -> 0.9*1 + 0.1*2 = 1.1 -> 0.9*1.1 + 0.1*(-8) = 0.19
    assert ema.module.weight[0].item() == pytest.approx(0.19, abs=1e-6)
    assert ema.module.running.tolist() == pytest.approx([0.9 * 9.0 + 0.5, 0.9 * 2.0 + 0.5], abs=1e-5)
    # The model itself is untouched, and the EMA holds its own copy.
    assert model.weight.tolist() == [-8.0, 1.0, 0.0]
    assert ema.module.weight.data_ptr() != model.weight.data_ptr()


def test_ema_of_a_vit_tracks_every_parameter():
    model = tiny_vit()
    ema = EMA(model, decay=0.5)
    ema.update_parameters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)
    for name, value in ema.module.state_dict().items():
        assert torch.allclose(value, before[name] + 0.5, atol=1e-6), name


def test_ema_averages_are_bit_for_bit_torchs_ema_while_deciding_on_the_device():
    """Our EMA decides the first copy and the skip on the device; its averages are still exactly those of torch's own
    EMA (``AveragedModel`` with ``get_ema_multi_avg_fn``, which branches on the host)."""
    model = tiny_vit()
    ours = EMA(model, decay=0.999)
    torchs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        ours.update_parameters(model)
        torchs.update_parameters(model)
        assert all(torch.equal(a, b) for a, b in zip(ours.module.parameters(), torchs.module.parameters()))
    assert int(ours.n_averaged) == 4


def test_a_skipped_step_leaves_the_ema_exactly_as_it_was_even_with_nan_buffers():
    """skip=1 (a skipped optimizer step, flagged on the device): weights, float buffers (here NaN, as a diverged
    forward may leave BatchNorm statistics), integer counters and n_averaged are all unchanged; skip=0 updates."""
    model = WithBuffers()
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        model.running.copy_(torch.tensor([4.0, 5.0]))
        model.count.fill_(7)
    ema.update_parameters(model, skip=torch.tensor(0.0))
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
        model.running.fill_(math.nan)
        model.count.fill_(8)
    ema.update_parameters(model, skip=torch.tensor(1.0))
    assert all(torch.equal(before[k], v) for k, v in ema.state_dict().items())
    assert ema.module.weight.tolist() == [1.0, 2.0, 3.0] and int(ema.n_averaged) == 1
    with torch.no_grad():
        model.running.copy_(torch.tensor([14.0, 15.0]))
    ema.update_parameters(model, skip=torch.tensor(0.0))
    assert ema.module.weight.tolist() == pytest.approx([1.1, 2.1, 3.1])  # 0.9 * w + 0.1 * (w + 1)
    assert ema.module.running.tolist() == pytest.approx([5.0, 6.0]) and int(ema.module.count) == 8
    assert int(ema.n_averaged) == 2


@pytest.mark.parametrize("fused", [True, False])
def test_step_unless_skips_on_the_flag_leaving_weights_and_adamw_state_untouched(fused):
    """Fused AdamW skips inside its kernel (found_inf: no host read); torch's default AdamW reads the flag. Either way
    a flagged step leaves the weights, both moments and the step count exactly as they were."""
    model = tiny_vit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused or None)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    step_unless(optimizer, torch.tensor(0.0))
    weights = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()]
    step_unless(optimizer, torch.tensor(1.0))
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    assert all(torch.equal(s[k], optimizer.state[p][k]) for s, p in zip(state, model.parameters()) for k in s)
    assert not hasattr(optimizer, "found_inf")  # nothing left behind for a later step
    step_unless(optimizer, torch.tensor(0.0))
    assert not any(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    assert {float(optimizer.state[p]["step"]) for p in model.parameters()} == {2.0}


def test_the_optimizer_is_fused_on_the_cpu_too():
    assert build_optimizer(tiny_vit(), TrainArguments()).defaults["fused"] is True


def test_smoothed_cross_entropy_matches_a_hand_computation_for_hard_targets():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    targets = torch.tensor([0, 1])
    eps, classes = 0.1, 3
    total = 0.0
    for row, y in zip(logits.tolist(), targets.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_z for v in row]
        # smoothed target: 1 - eps + eps/C on the true class, eps/C elsewhere
        q = [(1 - eps) * (c == y) + eps / classes for c in range(classes)]
        total += -sum(qc * lp for qc, lp in zip(q, log_p))
    assert classification_loss(logits, targets, eps).item() == pytest.approx(total / 2, rel=1e-6)
    # Without smoothing it is the plain negative log-likelihood.
    plain = -sum(row[y] - math.log(sum(math.exp(v) for v in row))
                 for row, y in zip(logits.tolist(), targets.tolist())) / 2
    assert classification_loss(logits, targets, 0.0).item() == pytest.approx(plain, rel=1e-6)


def test_smoothed_cross_entropy_matches_a_hand_computation_for_soft_targets():
    # Soft targets as MixUp/CutMix make them: 0.7 of one class, 0.3 of another.
    logits = torch.tensor([[1.0, -1.0, 0.5, 0.0]])
    soft = torch.tensor([[0.7, 0.0, 0.3, 0.0]])
    eps, classes = 0.2, 4
    log_z = math.log(sum(math.exp(v) for v in logits[0].tolist()))
    log_p = [v - log_z for v in logits[0].tolist()]
    q = [(1 - eps) * t + eps / classes for t in soft[0].tolist()]  # smoothing applies to soft targets too
    expected = -sum(qc * lp for qc, lp in zip(q, log_p))
    assert classification_loss(logits, soft, eps).item() == pytest.approx(expected, rel=1e-6)


def test_loss_is_computed_in_float32_under_bf16_logits():
    logits = torch.tensor([[4.0, 1.0, -2.0]], dtype=torch.bfloat16)
    loss = classification_loss(logits, torch.tensor([0]), 0.1)
    assert loss.dtype == torch.float32
