"""Train accuracy is counted from the training forward pass itself: on a fixed batch it equals a hand count of the
same logits' argmax against the labels — against the dominant label when MixUp makes the targets soft."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from hf_vit.config import parse_config
from hf_vit.data import Batch, normalize
from hf_vit.trainer import Run
from test_hostile import args, saved_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return saved_dataset(tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture
def run(data, tmp_path) -> Run:  # per test: accelerate's state is reset around every test (conftest)
    return Run(parse_config(args(data, tmp_path / "run", "--learning_rate", "1e-3")))


def fixed_batch(run: Run, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (16, 3, 8, 8), generator=g, dtype=torch.uint8)
    return Batch(pixels, torch.randint(0, 4, (16,), generator=g), num_examples=16)


@pytest.mark.parametrize("mixup", [False, True])
def test_train_accuracy_is_the_hand_count_of_the_training_forward(run, mixup):
    run.mixer = v2.MixUp(alpha=1.0, num_classes=4) if mixup else None
    batch = fixed_batch(run, seed=7)
    torch.manual_seed(123)  # MixUp's draws, replayed for the hand count
    pixels, targets = normalize(batch.pixel_values, run.mean, run.std), batch.labels
    if mixup:
        pixels, targets = run.mixer(pixels, targets)
        assert targets.ndim == 2  # soft targets: the hit counts against the dominant label
    dominant = targets.argmax(-1) if mixup else targets
    with torch.no_grad():
        hits = int((run.model(pixel_values=pixels).logits.argmax(-1) == dominant).sum())
    torch.manual_seed(123)
    step = run.train_step(iter([batch]))
    assert step.examples == 16 and step.correct == hits
