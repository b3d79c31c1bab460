"""Fine-tuning (issue 4): the head swap, interpolated position embeddings, refused checkpoints, the fine-tuning recipe,
and an end-to-end run: pretrain on the streamed ImageNet sample -> fine-tune on CIFAR-10 -> evaluate, with the saved
image processor reproducing the eval loop under ``pipeline("image-classification")``.

Source checkpoints are tiny ``ViTForImageClassification`` models written with ``save_pretrained`` into tmp_path.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import BertConfig, ViTConfig, ViTForImageClassification

from conftest import REPO, run_script
from hf_vit.config import DataArguments, ModelArguments, parse_config, validate
from hf_vit.errors import UserError
from hf_vit.models import load_pretrained

NEW_LABELS = ["ant", "bee", "cat", "dog", "eel"]
HEAD_VALUE = 0.5  # the source head is filled with this, so any leak of it into the new head is obvious
LOGGER = "hf_vit.models"


def save_source(path, num_labels=3, image_size=32, patch_size=8, labels=None, dtype=None, position_embeddings=None):
    """A tiny ViT checkpoint in ``path``; returns the state dict that was saved.

    (transformers 5 writes the files under the legacy key names, ``vit.encoder.layer.0...``, and renames them on load,
    so the reference is the saved model's own state dict, which uses the names of the loaded model.)
    """
    torch.manual_seed(1)
    extra = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}} if labels else {}
    model = ViTForImageClassification(ViTConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=num_labels, **extra))
    with torch.no_grad():
        model.classifier.weight.fill_(HEAD_VALUE)
        model.classifier.bias.fill_(HEAD_VALUE)
        if position_embeddings is not None:
            model.vit.embeddings.position_embeddings.copy_(position_embeddings)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def saved_weights(folder) -> dict[str, torch.Tensor]:
    """The tensors of a ``save_pretrained`` folder under the model's parameter names (see :func:`save_source`)."""
    return ViTForImageClassification.from_pretrained(folder).state_dict()


def assert_fresh_head(model, num_labels, hidden=32):
    """A newly initialised classifier: right shape, transformers' init (zero bias, N(0, 0.02) weights)."""
    weight, bias = model.classifier.weight.detach(), model.classifier.bias.detach()
    assert weight.shape == (num_labels, hidden) and bias.shape == (num_labels,)
    assert not torch.isclose(weight, torch.tensor(HEAD_VALUE)).any()
    assert torch.equal(bias, torch.zeros(num_labels))
    assert 0.01 < weight.std().item() < 0.03 and abs(weight.mean().item()) < 0.01


def test_head_swap_keeps_every_backbone_tensor_bit_identical_and_reinitialises_the_classifier(tmp_path, caplog):
    source = save_source(tmp_path)
    caplog.set_level(logging.INFO, logger=LOGGER)
    model = load_pretrained(ModelArguments(model_name_or_path=str(tmp_path)), NEW_LABELS)
    state = model.state_dict()
    backbone = [k for k in source if not k.startswith("classifier.")]
    assert len(backbone) == len(state) - 2
    for key in backbone:
        assert state[key].dtype == source[key].dtype and torch.equal(state[key], source[key]), key
    assert_fresh_head(model, len(NEW_LABELS))
    assert model.config.num_labels == 5
    assert model.config.id2label == dict(enumerate(NEW_LABELS))
    assert model.config.label2id == {n: i for i, n in enumerate(NEW_LABELS)}
    assert model.loading_report == {"loaded": sorted(backbone), "interpolated": [],
                                    "reinitialized": ["classifier.bias", "classifier.weight"], "unexpected": []}
    (message,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert f"{len(backbone)} tensors copied unchanged" in message
    assert "re-initialised ['classifier.bias', 'classifier.weight'] (new 5-class head)" in message
    assert "none interpolated" in message


def test_same_number_of_classes_but_other_labels_still_gets_a_new_head(tmp_path):
    # transformers would keep a same-sized head; its rows would mean the old classes.
    save_source(tmp_path, num_labels=5, labels=["a", "b", "c", "d", "e"])
    model = load_pretrained(ModelArguments(model_name_or_path=str(tmp_path)), NEW_LABELS)
    assert_fresh_head(model, 5)
    assert model.loading_report["reinitialized"] == ["classifier.bias", "classifier.weight"]


def test_checkpoint_with_exactly_these_labels_keeps_its_head(tmp_path):
    source = save_source(tmp_path, num_labels=5, labels=NEW_LABELS)
    model = load_pretrained(ModelArguments(model_name_or_path=str(tmp_path)), NEW_LABELS)
    state = model.state_dict()
    assert all(torch.equal(state[k], source[k]) for k in source)
    assert model.loading_report["reinitialized"] == []


def test_position_embeddings_are_interpolated_not_reinitialised_when_the_image_size_changes(tmp_path, caplog):
    # 32 px / patch 8 = a 4x4 grid; fine-tuned at 64 px = 8x8. The first half of the channels varies only along rows,
    # the second half only along columns, so a transposed or scrambled grid shows.
    g, dim = 4, 32
    rows, cols = torch.randn(g, dim // 2), torch.randn(g, dim // 2)
    grid = torch.cat([rows[:, None].expand(g, g, -1), cols[None, :].expand(g, g, -1)], dim=-1)  # (row, col, D)
    cls_pos = torch.randn(1, 1, dim)
    source_pos = torch.cat([cls_pos, grid.reshape(1, g * g, dim)], dim=1)
    source = save_source(tmp_path, position_embeddings=source_pos)

    caplog.set_level(logging.INFO, logger=LOGGER)
    model = load_pretrained(ModelArguments(model_name_or_path=str(tmp_path), image_size=64), NEW_LABELS)
    pos = model.vit.embeddings.position_embeddings.detach()
    assert pos.shape == (1, 1 + 8 * 8, dim)
    assert torch.equal(pos[:, :1], cls_pos)  # the CLS position is kept exactly
    new_grid = pos[0, 1:].reshape(8, 8, dim)
    # Rows stay rows and columns stay columns.
    assert torch.allclose(new_grid[:, :, : dim // 2], new_grid[:, :1, : dim // 2].expand(8, 8, -1), atol=1e-6)
    assert torch.allclose(new_grid[:, :, dim // 2:], new_grid[:1, :, dim // 2:].expand(8, 8, -1), atol=1e-6)
    # ... and the grid is the bicubic resize of the source grid (channels-first image of shape (D, 4, 4)).
    reference = F.interpolate(grid.permute(2, 0, 1)[None], size=(8, 8), mode="bicubic", align_corners=False)
    assert torch.allclose(new_grid, reference[0].permute(1, 2, 0), atol=1e-6)
    # Every other backbone tensor is the checkpoint's, bit for bit; the head is new.
    state = model.state_dict()
    others = [k for k in source if not k.startswith("classifier.") and k != "vit.embeddings.position_embeddings"]
    assert all(torch.equal(state[k], source[k]) for k in others)
    assert_fresh_head(model, 5)
    assert model.config.image_size == 64
    assert model.loading_report == {"loaded": sorted(others), "interpolated": ["vit.embeddings.position_embeddings"],
                                    "reinitialized": ["classifier.bias", "classifier.weight"], "unexpected": []}
    (message,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "interpolated ['vit.embeddings.position_embeddings'] from the checkpoint's 32px grid to 64px" in message
    assert "re-initialised ['classifier.bias', 'classifier.weight']" in message
    with torch.no_grad():
        assert model(pixel_values=torch.randn(2, 3, 64, 64)).logits.shape == (2, 5)


def test_a_backbone_only_vit_model_checkpoint_gets_a_new_head_and_drops_its_pooler(tmp_path):
    from transformers import ViTModel

    torch.manual_seed(2)
    backbone = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64))
    backbone.save_pretrained(tmp_path)
    model = load_pretrained(ModelArguments(model_name_or_path=str(tmp_path)), NEW_LABELS)
    state = model.state_dict()
    source = {k: v for k, v in backbone.state_dict().items() if not k.startswith("pooler.")}
    assert all(torch.equal(state["vit." + k], v) for k, v in source.items())
    assert_fresh_head(model, 5)
    assert model.loading_report["reinitialized"] == ["classifier.bias", "classifier.weight"]
    assert model.loading_report["unexpected"] == ["pooler.dense.bias", "pooler.dense.weight"]


def test_a_half_precision_checkpoint_is_loaded_as_float32_master_weights(tmp_path):
    source = save_source(tmp_path, dtype=torch.bfloat16)
    model = load_pretrained(ModelArguments(model_name_or_path=str(tmp_path)), NEW_LABELS)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    key = "vit.layers.1.mlp.fc2.weight"
    assert torch.equal(model.state_dict()[key], source[key].float())  # bf16 -> fp32 is exact


def _write_bert_checkpoint(path):
    path.mkdir()
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(path)
    return path


def _write_vit_config_without_weights(path):
    path.mkdir()
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    config.save_pretrained(path)
    return path


@pytest.mark.parametrize("make, message", [
    (_write_bert_checkpoint, "is a 'bert' checkpoint, not a ViT"),
    (lambda p: p.mkdir() or p, "holds no model (no config.json)"),
    (lambda p: p, "does not exist"),
    (lambda p: (p.write_text("{}"), p)[1], "is a file"),
    (_write_vit_config_without_weights, "cannot load weights from"),
], ids=["bert", "empty-folder", "missing", "file", "no-weights"])
def test_a_path_that_is_not_a_vit_checkpoint_is_a_one_line_error(tmp_path, make, message):
    path = make(tmp_path / "ckpt")
    with pytest.raises(UserError) as err:
        load_pretrained(ModelArguments(model_name_or_path=str(path)), NEW_LABELS)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_architecture_override_that_does_not_fit_the_checkpoint_is_refused(tmp_path):
    save_source(tmp_path)
    with pytest.raises(UserError, match="hidden_size=64 does not fit the checkpoint"):
        load_pretrained(ModelArguments(model_name_or_path=str(tmp_path), hidden_size=64), NEW_LABELS)


def test_finetune_recipe_parses_with_the_seeds_values():
    recipe = str(REPO / "recipes" / "cifar10_vit_base_finetune.yaml")
    cfg = parse_config(["--config", recipe])
    m, d, t = cfg.model, cfg.data, cfg.train
    assert (t.total_train_batch_size, t.num_train_epochs, t.learning_rate) == (512, 60, 2e-4)
    assert (t.warmup_epochs, t.warmup_start_lr, t.min_lr) == (3, 1e-6, 1e-6)
    assert (m.hidden_dropout_prob, t.weight_decay, t.head_lr_multiplier, t.label_smoothing) == (0.1, 0.05, 10, 0.1)
    assert (d.crop_padding, d.augmentation, d.dataloader_num_workers) == (28, "enhanced", 16)
    assert (t.mixed_precision, t.max_grad_norm, m.image_size) == ("bf16", 1.0, 224)
    assert (m.freeze_backbone, t.layer_decay, t.ema_decay) == (False, None, None)
    # The checkpoint must be named: the recipe has no preset to fall back on silently.
    assert m.model_preset is None and m.model_name_or_path is None
    with pytest.raises(UserError, match="model_name_or_path"):
        validate(cfg)
    validate(parse_config(["--config", recipe, "--model_name_or_path", "outputs/imagenet_vit_base"]))


# ------------------------------------------------------------------------------------------------- end to end
TINY_ARCH = ["--image_size", "32", "--patch_size", "8", "--hidden_size", "32", "--num_hidden_layers", "2",
             "--num_attention_heads", "2", "--intermediate_size", "64"]
COMMON = ["--dataloader_num_workers", "1", "--report_to", "none", "--logging_steps", "2"]
FINETUNE_SAMPLES = ["--max_train_samples", "256", "--max_eval_samples", "64"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, imagenet_sample_path):
    """A few pretraining steps of a tiny ViT on the streamed ImageNet sample (1000 classes)."""
    out = tmp_path_factory.mktemp("pretrain")
    run_script(["run_pretrain.py", "--dataset_name", str(imagenet_sample_path), "--streaming", "true",
                "--train_samples", "64", "--train_val_split", "0", *TINY_ARCH, "--total_train_batch_size", "16",
                "--num_train_epochs", "1", "--learning_rate", "1e-3", "--checkpointing_steps", "no",
                "--output_dir", str(out), *COMMON])
    assert json.loads((out / "all_results.json").read_text())["global_step"] == 4
    return out


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, pretrained, cifar10_path):
    """The pretrained checkpoint fine-tuned on CIFAR-10 at 64 px (upsampled from 32, pad-and-crop 8), with
    discriminative LRs, layer decay, smoothing, dropout and an EMA."""
    out = tmp_path_factory.mktemp("finetune")
    proc = run_script(["run_finetune.py", "--model_name_or_path", str(pretrained), "--dataset_name", str(cifar10_path),
                       *FINETUNE_SAMPLES, "--image_size", "64", "--crop_padding", "8", "--total_train_batch_size", "32",
                       "--num_train_epochs", "1", "--learning_rate", "1e-3", "--head_lr_multiplier", "10",
                       "--layer_decay", "0.75", "--label_smoothing", "0.1", "--hidden_dropout_prob", "0.1",
                       "--ema_decay", "0.8", "--checkpointing_steps", "epoch", "--output_dir", str(out), *COMMON])
    return out, proc.stdout + proc.stderr


def test_pretrain_then_finetune_then_evaluate_end_to_end(pretrained, finetuned, cifar10_path):
    out, log = finetuned
    assert "interpolated ['vit.embeddings.position_embeddings'] from the checkpoint's 32px grid to 64px" in log
    assert "re-initialised ['classifier.bias', 'classifier.weight'] (new 10-class head)" in log
    config = json.loads((out / "config.json").read_text())
    assert (config["image_size"], len(config["id2label"]), config["id2label"]["0"]) == (64, 10, "airplane")
    assert config["hidden_dropout_prob"] == 0.1
    results = json.loads((out / "all_results.json").read_text())
    assert results["global_step"] == 8 and results["eval_samples"] == 64
    # The EMA is evaluated next to the raw weights and the better one is the final model (ties go to raw).
    better = "ema" if results["eval_ema_accuracy"] > results["eval_accuracy"] else "raw"
    assert results["final_weights"] == better
    checkpoint = out / "checkpoint-8"
    chosen = load_file(str(checkpoint / ("ema.safetensors" if better == "ema" else "model.safetensors")))
    final = saved_weights(out)
    assert set(final) == set(chosen) and all(torch.equal(final[k], chosen[k]) for k in final)
    # Full fine-tuning by default: the backbone moved away from the pretrained weights.
    source, raw = saved_weights(pretrained), load_file(str(checkpoint / "model.safetensors"))
    assert not torch.equal(raw["vit.layers.0.mlp.fc1.weight"], source["vit.layers.0.mlp.fc1.weight"])
    eval_results = json.loads((out / "eval_results.json").read_text())
    assert eval_results["eval_weights"] == better
    assert sum(map(sum, eval_results["confusion_matrix"])) == 64

    # The standalone evaluator scores the saved model exactly as the training run's final eval did; it writes beside
    # the run folder (<run>-eval/, its default), never into it.
    proc = subprocess.run([sys.executable, "-m", "hf_vit.eval", "--model_name_or_path", str(out), "--dataset_name",
                           str(cifar10_path), "--eval_split", "train", "--train_val_split", "0.02", "--split_seed", "0",
                           "--max_eval_samples", "64", "--dataloader_num_workers", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    standalone = json.loads((out.with_name(out.name + "-eval") / "eval_results.json").read_text())
    assert standalone["eval_samples"] == 64
    assert standalone["eval_accuracy"] == eval_results["eval_accuracy"]
    assert standalone["confusion_matrix"] == eval_results["confusion_matrix"]


def test_saved_image_processor_reproduces_the_eval_loop_under_pipeline(finetuned, cifar10_path):
    from transformers import pipeline

    from hf_vit.data import ImageSpec, eval_transform, load_splits, normalize

    out, _ = finetuned
    eval_results = json.loads((out / "eval_results.json").read_text())
    # The same 64 validation images the run evaluated (same carve-out rule, seed and cap).
    data = load_splits(DataArguments(dataset_name=str(cifar10_path), max_train_samples=256, max_eval_samples=64))
    rows = [data.eval[i] for i in range(len(data.eval))]
    images = [PIL.Image.open(io.BytesIO(r["img"]["bytes"])) for r in rows]
    labels = [r["label"] for r in rows]
    assert {im.size for im in images} == {(32, 32)}  # raw CIFAR images, upsampled by the processor

    classifier = pipeline("image-classification", model=str(out), device="cpu")
    predicted = [classifier.model.config.label2id[p[0]["label"]] for p in classifier(images, top_k=1)]
    confusion = [[0] * 10 for _ in range(10)]
    for y, p in zip(labels, predicted):
        confusion[y][p] += 1
    assert confusion == eval_results["confusion_matrix"]  # what the training run's eval loop counted
    accuracy = sum(y == p for y, p in zip(labels, predicted)) / len(labels)
    assert accuracy == pytest.approx(eval_results["eval_accuracy"])

    # Image by image against the eval loop's own transform and normalisation.
    spec = ImageSpec.from_processor(classifier.image_processor, crop_padding=8)
    assert spec.image_size == 64
    pixels = torch.stack([eval_transform(spec)(im) for im in images])
    with torch.no_grad():
        normalized = normalize(pixels, torch.tensor(spec.mean), torch.tensor(spec.std))
        logits = classifier.model(pixel_values=normalized).logits
    assert logits.argmax(-1).tolist() == predicted


def test_freeze_backbone_trains_only_the_classifier(tmp_path, pretrained, cifar10_path):
    out = tmp_path / "probe"
    run_script(["run_finetune.py", "--model_name_or_path", str(pretrained), "--dataset_name", str(cifar10_path),
                "--freeze_backbone", "true", "--max_train_samples", "96", "--train_val_split", "0",
                "--total_train_batch_size", "32", "--max_train_steps", "3", "--learning_rate", "1e-2",
                "--checkpointing_steps", "no", "--output_dir", str(out), *COMMON])
    source, final = saved_weights(pretrained), saved_weights(out)
    backbone = [k for k in final if not k.startswith("classifier.")]
    assert all(torch.equal(final[k], source[k]) for k in backbone)
    assert final["classifier.weight"].shape == (10, 32)
    assert final["classifier.bias"].abs().min() > 0  # initialised at zero, then trained
