"""``python -m hf_vit.attention``: attention rollout checked against hand computations, the SDPA switch, the figure
on a run folder built here (a tiny ViT, its processor and a generated dataset; no training), and the one-line
refusals."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import yaml
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage
from transformers import (ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification,
                          ViTImageProcessor)

from conftest import run_script
from hf_vit import attention
from hf_vit.config import DataArguments
from hf_vit.data import example_key, load_splits
from hf_vit.errors import run_cli

CLASSES = ["ant", "bee", "cat", "dog"]
SEED = 3


def tiny_vit(num_labels: int = 3, id2label: dict | None = None) -> ViTForImageClassification:
    """The brief's tiny ViT (8-px images, 4-px patches: 4 patches + CLS = 5 tokens, 2 layers, 2 heads)."""
    config = ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=16, num_labels=num_labels, id2label=id2label,
                       label2id=None if id2label is None else {v: k for k, v in id2label.items()})
    return ViTForImageClassification(config).eval()


def eager_attentions(model, pixel_values) -> list[np.ndarray]:
    model.set_attn_implementation("eager")
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values, output_attentions=True)
    return [a.numpy().astype(np.float64) for a in outputs.attentions]


def reference_rollout(attentions: list[np.ndarray], head_fusion: str) -> np.ndarray:
    """Rollout written out entry by entry: fuse heads, add the identity, re-normalise rows, left-multiply per layer."""
    batch, heads, tokens, _ = attentions[0].shape
    fuse = {"mean": lambda v: sum(v) / len(v), "max": max, "min": min}[head_fusion]
    result = np.zeros((batch, tokens, tokens))
    for b in range(batch):
        rollout = np.eye(tokens)
        for layer in attentions:
            a = np.zeros((tokens, tokens))
            for i in range(tokens):
                for j in range(tokens):
                    a[i, j] = fuse([layer[b, h, i, j] for h in range(heads)]) + (1.0 if i == j else 0.0)
                a[i] /= a[i].sum()
            product = np.zeros((tokens, tokens))
            for i in range(tokens):
                for j in range(tokens):
                    product[i, j] = sum(a[i, k] * rollout[k, j] for k in range(tokens))
            rollout = product
        result[b] = rollout
    return result


# ------------------------------------------------------------------------------------------------------- the maths
@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
def test_rollout_of_a_tiny_vit_equals_the_rollout_computed_by_hand(head_fusion):
    torch.manual_seed(0)
    model = tiny_vit()
    with torch.no_grad():  # large random weights make the attention peaked, so fusion and layer order matter
        for p in model.parameters():
            p.normal_(0.0, 1.0)
    attentions = eager_attentions(model, torch.randn(3, 3, 8, 8))
    assert len(attentions) == 2 and attentions[0].shape == (3, 2, 5, 5)
    expected = reference_rollout(attentions, head_fusion)

    rollout = attention.attention_rollout([torch.from_numpy(a) for a in attentions], head_fusion)
    np.testing.assert_allclose(rollout.numpy(), expected, rtol=1e-6, atol=1e-9)
    # Multiplying in the wrong order gives another answer, so the comparison above pins the order.
    swapped = reference_rollout(attentions[::-1], head_fusion)
    assert not np.allclose(swapped, expected, atol=1e-4)

    maps = attention.cls_rollout_map(rollout)
    assert maps.shape == (3, 2, 2)
    for b in range(3):
        for row in range(2):
            for col in range(2):  # patches are numbered row by row after the CLS token
                assert maps[b, row, col].item() == pytest.approx(expected[b, 0, 1 + 2 * row + col], rel=1e-6)


def test_rollout_of_a_hand_written_two_layer_example():
    # Layer 1, two heads over 2 tokens: mean [[1, 0], [.5, .5]]; + I -> [[2, 0], [.5, 1.5]]; rows / 2 ->
    # A1 = [[1, 0], [.25, .75]].  Layer 2, both heads [[0, 1], [0, 1]]; + I -> [[1, 1], [0, 2]] -> A2 = [[.5, .5],
    # [0, 1]].  Rollout A2 @ A1 = [[.5 + .125, .375], [.25, .75]] (A1 @ A2 would be [[.5, .5], [.125, .875]]).
    layer1 = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]]])
    layer2 = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]]])
    rollout = attention.attention_rollout([layer1, layer2])
    torch.testing.assert_close(rollout, torch.tensor([[[0.625, 0.375], [0.25, 0.75]]]))
    # max over heads in layer 1: [[1, 0], [1, 1]] + I -> [[1, 0], [1/3, 2/3]]; A2 @ that = [[2/3, 1/3], [1/3, 2/3]].
    torch.testing.assert_close(attention.attention_rollout([layer1, layer2], head_fusion="max"),
                               torch.tensor([[[2 / 3, 1 / 3], [1 / 3, 2 / 3]]]))


def test_discard_ratio_zeroes_the_weakest_attention_to_patches_and_keeps_the_cls_column():
    # One layer, one head, 3 tokens. discard_ratio 0.5 drops 3 of the 6 entries in columns 1..2: 0.1, 0.2 and 0.3.
    layer = torch.tensor([[[[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.1, 0.5, 0.4]]]])
    # Left: [[.6, 0, 0], [.2, 0, .6], [.1, .5, .4]]; + I: [[1.6, 0, 0], [.2, 1, .6], [.1, .5, 1.4]];
    # rows / (1.6, 1.8, 2).
    expected = torch.tensor([[[1.0, 0.0, 0.0], [1 / 9, 5 / 9, 1 / 3], [0.05, 0.25, 0.7]]])
    torch.testing.assert_close(attention.attention_rollout([layer], discard_ratio=0.5), expected)
    with pytest.raises(ValueError, match="head_fusion"):
        attention.attention_rollout([layer], head_fusion="median")


# ------------------------------------------------------------------------------------------- a run folder, no training
@pytest.fixture
def run_dir(tmp_path):
    """What the trainer leaves, in miniature: a tiny ViT built with SDPA attention whose head always predicts 'ant',
    its ViTImageProcessor, and a train_config.yaml pointing at 20 generated 8x8 images of 4 classes (half of them
    carved out for validation, seed 3, recorded before split_seed existed)."""
    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(20)]
    features = Features({"image": Image(), "label": ClassLabel(names=CLASSES)})
    data = tmp_path / "data"
    DatasetDict({"train": Dataset.from_dict({"image": images, "label": [i % 4 for i in range(20)]},
                                            features=features)}).save_to_disk(str(data))

    torch.manual_seed(0)
    model = tiny_vit(4, dict(enumerate(CLASSES)))
    assert model.config._attn_implementation == "sdpa"  # as the trainer builds it
    with torch.no_grad():  # a head that ignores the image, so the expected predictions are known
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    run = tmp_path / "run"
    model.save_pretrained(run)
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(run)
    config = {"model_preset": "vit_tiny_cifar", "dataset_name": str(data), "dataset_config_name": None,
              "eval_split": None, "train_val_split": 0.5, "image_column_name": None, "label_column_name": None,
              "max_eval_samples": None, "learning_rate": 1e-3, "seed": SEED}
    (run / "train_config.yaml").write_text(yaml.safe_dump(config))
    return run


def first_eval_rows(run, count):
    """The run's validation slice as training carves it: (labels, keys, 8x8 RGB pixels) of its first ``count``."""
    recipe = yaml.safe_load((run / "train_config.yaml").read_text())
    # The recorded config predates split_seed: that run carved its validation with its seed.
    splits = load_splits(DataArguments(dataset_name=recipe["dataset_name"], train_val_split=0.5,
                                       split_seed=recipe["seed"]))
    rows = list(splits.eval)[:count]
    pixels = [np.asarray(PILImage.open(io.BytesIO(r["image"]["bytes"])).convert("RGB")) for r in rows]
    return [CLASSES[r["label"]] for r in rows], [example_key(r["image"]) for r in rows], pixels


def test_command_on_a_run_folder_plots_n_eval_images_with_predicted_and_true_labels(run_dir, capsys):
    result = attention.main([str(run_dir), "--images", "4"])

    truths, keys, pixels = first_eval_rows(run_dir, 4)
    assert "ant" in truths and set(truths) - {"ant"}, "the first 4 validation images should include right and wrong"
    expected = [f"pred: ant / true: {t}" + ("" if t == "ant" else " (wrong)") for t in truths]
    figure = result["figure"]
    assert [axes.get_title() for axes in figure.axes] == expected
    assert [axes.title.get_color() for axes in figure.axes] == ["black" if t == "ant" else "red" for t in truths]
    assert all(len(axes.images) == 2 for axes in figure.axes)  # the image and the rollout overlaid on it
    for axes, image in zip(figure.axes, pixels):  # the image as the model saw it (8x8 already: no resize)
        np.testing.assert_allclose(axes.images[0].get_array(), image / 255.0, atol=1e-6)
    assert result["keys"] == keys and result["labels"] == truths
    assert result["correct"] == [t == "ant" for t in truths]
    assert result["maps"].shape == (4, 2, 2) and (result["maps"] > 0).all() and (result["maps"].sum((1, 2)) < 1).all()

    # Beside the run folder, never in it: a run folder is written only by its own run.
    png = run_dir.with_name(run_dir.name + "-eval") / "attention_rollout.png"
    assert result["output"] == str(png) and not (run_dir / "attention_rollout.png").exists()
    with PILImage.open(png) as image:
        assert image.format == "PNG"
        assert image.size == tuple(int(v) for v in figure.get_size_inches() * 100)
    assert str(png) in capsys.readouterr().out


def test_sdpa_and_eager_give_the_same_logits_and_the_rollout_pass_leaves_the_model_on_sdpa(run_dir):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(run_dir)
    pixel_values = processor(images=[PILImage.new("RGB", (8, 8), c) for c in ("red", "navy")],
                             return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        sdpa = ViTForImageClassification.from_pretrained(run_dir, attn_implementation="sdpa").eval()
        eager = ViTForImageClassification.from_pretrained(run_dir, attn_implementation="eager").eval()
        # randomise the head again so that the logits depend on the attention
        for model in (sdpa, eager):
            torch.manual_seed(1)
            model.classifier.weight.normal_()
        sdpa_out = sdpa(pixel_values=pixel_values, output_attentions=True)
        eager_out = eager(pixel_values=pixel_values, output_attentions=True)
    assert not sdpa_out.attentions  # why the rollout pass switches to eager
    torch.testing.assert_close(sdpa_out.logits, eager_out.logits, rtol=1e-5, atol=1e-6)

    logits, rollout = attention.model_rollout(sdpa, pixel_values)
    torch.testing.assert_close(logits, sdpa_out.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rollout, attention.attention_rollout(eager_out.attentions))
    assert sdpa.config._attn_implementation == "sdpa" and not sdpa.training


def test_output_elsewhere_and_a_dataset_moved_away_found_again_with_dataset_name(run_dir, tmp_path, capsys):
    moved = tmp_path / "moved"
    (tmp_path / "data").rename(moved)
    out = tmp_path / "figures" / "rollout.png"

    with pytest.raises(SystemExit) as exit_info:
        run_cli(attention.main, [str(run_dir), "--output", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--dataset_name" in err[0]
    assert not out.exists()

    result = attention.main([str(run_dir), "--output", str(out), "--dataset_name", str(moved), "--images", "2"])
    assert result["output"] == str(out) and out.is_file() and len(result["figure"].axes) == 2
    assert not (run_dir / "attention_rollout.png").exists()


def test_a_dataset_with_other_classes_than_the_model_is_refused(run_dir, tmp_path, capsys):
    other = tmp_path / "other"
    features = Features({"image": Image(), "label": ClassLabel(names=["x", "y"])})
    images = [PILImage.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(6)]
    DatasetDict({"train": Dataset.from_dict({"image": images, "label": [i % 2 for i in range(6)]},
                                            features=features)}).save_to_disk(str(other))
    with pytest.raises(SystemExit):
        run_cli(attention.main, [str(run_dir), "--dataset_name", str(other)])
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: the model in {str(run_dir)!r} predicts 4 classes (ant, bee, cat, ...) but dataset {str(other)!r} "
        "has 2 (x, y); pass the --dataset_name the run was trained on"]
    assert not (run_dir / "attention_rollout.png").exists()


def test_cnn_run_folder_is_refused_with_one_error_line(tmp_path):
    cnn = tmp_path / "cnn"
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1],
                                              num_labels=3)).save_pretrained(cnn)
    proc = run_script(["-m", "hf_vit.attention", str(cnn)], check=False, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: hf_vit.attention needs a ViT run folder; {cnn} holds a 'resnet' model"]
    assert not (cnn / "attention_rollout.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["{run}", "--images", "0"], "--images must be between 1 and 64 (got 0)"),
    (["{run}", "--images", "65"], "--images must be between 1 and 64 (got 65)"),
    (["{run}", "--images", "eight"], "invalid int value: 'eight'"),
    (["{run}", "--imagez", "3"], "unrecognized arguments: --imagez 3"),
    (["{run}", "--output", "{run}-figures/rollout.txt"], "needs a file suffix matplotlib writes"),
    (["{run}", "--output", "{run}/rollout.png"], "would write into the run folder"),
    (["{run}", "--output", "{run}/checkpoint-2/rollout.png"], "lies inside the checkpoint"),
    (["{run}", "--head_fusion", "median"], "argument --head_fusion: invalid choice: 'median'"),
    (["{run}", "--discard_ratio", "1"], "--discard_ratio must be in [0, 1) (got 1.0)"),
    (["{run}/missing"], "does not exist; pass the output_dir of a training run"),
    (["{run}/empty"], "holds no model (no config.json)"),
])
def test_user_errors_are_one_line_exit_2_and_write_nothing(run_dir, capsys, argv, message):
    (run_dir / "empty").mkdir()
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        run_cli(attention.main, [a.format(run=run_dir) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert sorted(p.name for p in run_dir.iterdir()) == before
