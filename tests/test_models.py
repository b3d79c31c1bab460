"""Model presets across families (ViT, ResNet, ConvNeXt): building without downloads, parameter and FLOP counts
against published figures, gradients, the memory check, CNN optimizer groups, fine-tuning a CNN checkpoint, and a
trained CNN folder that plain transformers loads.

Expected counts are written out by hand or taken from the architectures' papers/model cards, never recomputed by the
function under test.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import pytest
import torch
from transformers import (AutoModelForImageClassification, ConvNextConfig, ConvNextForImageClassification,
                          ResNetConfig, ResNetForImageClassification, ViTImageProcessor)

from conftest import REPO
from hf_vit.config import ModelArguments, TrainArguments, parse_config
from hf_vit.errors import UserError
from hf_vit.models import (PRESETS, SUPPORTED_MODEL_TYPES, build_config, build_model, check_fits_in_memory, cost,
                           estimate_training_memory, is_vit, load_pretrained, model_config, model_family,
                           num_parameters, training_flops_per_image)
from hf_vit.optim import build_optimizer, param_groups

LABELS = [f"c{i}" for i in range(10)]
NEW_LABELS = ["cat", "dog", "eel"]
GB = 1e9


def convnext_parameters_by_hand(patch: int, widths: list[int], depths: list[int], num_labels: int) -> int:
    """ConvNeXt's parameters, layer by layer (transformers' ConvNextForImageClassification)."""
    total = patch * patch * 3 * widths[0] + widths[0] + 2 * widths[0]  # stem conv + bias, its LayerNorm
    for i, (c, depth) in enumerate(zip(widths, depths)):
        if i:  # downsampling: LayerNorm + 2x2 stride-2 conv from the previous width
            total += 2 * widths[i - 1] + 4 * widths[i - 1] * c + c
        # per block: 7x7 depthwise conv + bias, LayerNorm, C -> 4C -> C linears, layer scale
        total += depth * ((49 * c + c) + 2 * c + (4 * c * c + 4 * c) + (4 * c * c + c) + c)
    return total + 2 * widths[-1] + widths[-1] * num_labels + num_labels  # final LayerNorm, head


def tiny_args(preset: str, **overrides) -> ModelArguments:
    """The preset, shrunk where its family allows (ViT widths; a CNN's image size) for fast forward/backward passes."""
    if preset.startswith("vit"):
        overrides = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         image_size=32, patch_size=8, **overrides)
    else:
        overrides = dict(image_size=32, **overrides)
    return ModelArguments(model_preset=preset, **overrides)


# ------------------------------------------------------------------------------------------------ presets, families
def test_resnet50_preset_is_resnet50_exactly_with_its_published_parameter_count():
    config = build_config(ModelArguments(model_preset="resnet50"), LABELS)
    assert isinstance(config, ResNetConfig) and config.image_size == 224
    assert (config.depths, config.hidden_sizes, config.embedding_size, config.layer_type) == \
        ([3, 4, 6, 3], [256, 512, 1024, 2048], 64, "bottleneck")
    defaults = ResNetConfig()  # transformers' defaults are ResNet-50 (v1.5: the stride in the 3x3 convolution)
    for key in ("depths", "hidden_sizes", "embedding_size", "layer_type", "hidden_act", "downsample_in_first_stage",
                "downsample_in_bottleneck", "num_channels"):
        default = getattr(defaults, key)
        assert getattr(config, key) == (list(default) if isinstance(default, tuple) else default), key
    model = build_model(ModelArguments(model_preset="resnet50"), LABELS)
    assert isinstance(model, ResNetForImageClassification)
    # torchvision's resnet50: 25,557,032 parameters with 1000 classes; the head is 2048 x classes + classes.
    assert num_parameters(model) == 25_557_032 - 2048 * 990 - 990
    thousand = build_model(ModelArguments(model_preset="resnet50"), [f"k{i}" for i in range(1000)])
    assert num_parameters(thousand) == 25_557_032


def test_cnn_tiny_cifar_preset_is_a_convnext_with_a_small_patch_stem_and_its_hand_counted_parameters():
    config = build_config(ModelArguments(model_preset="cnn_tiny_cifar"), LABELS)
    assert isinstance(config, ConvNextConfig) and config.image_size == 32 and config.patch_size <= 4
    model = build_model(ModelArguments(model_preset="cnn_tiny_cifar"), LABELS)
    assert isinstance(model, ConvNextForImageClassification)
    assert num_parameters(model) == convnext_parameters_by_hand(config.patch_size, config.hidden_sizes,
                                                                config.depths, 10)
    assert model.config.id2label[3] == "c3" and model.config.label2id["c9"] == 9


def test_presets_cover_both_families_and_every_preset_names_its_config_class():
    assert {"vit_tiny_cifar", "vit_base_patch16_224", "resnet50", "cnn_tiny_cifar"} <= set(PRESETS)
    assert set(SUPPORTED_MODEL_TYPES) == {"vit", "resnet", "convnext"}
    families = {}
    for name, fields in PRESETS.items():
        assert fields["config_class"].model_type in SUPPORTED_MODEL_TYPES, name
        config = build_config(ModelArguments(model_preset=name), LABELS)
        families[name] = model_family(config)
        assert is_vit(config) == (families[name] == "vit")
        assert config.image_size == fields["image_size"], name
    assert families["resnet50"] == families["cnn_tiny_cifar"] == "cnn" and families["vit_tiny_cifar"] == "vit"
    with pytest.raises(UserError, match="model_type 'bert' is not supported"):
        from transformers import BertConfig
        model_family(BertConfig())


@pytest.mark.parametrize("preset, flag, value", [
    ("resnet50", "hidden_size", 64), ("resnet50", "patch_size", 4), ("cnn_tiny_cifar", "num_hidden_layers", 2),
    ("cnn_tiny_cifar", "hidden_dropout_prob", 0.1), ("resnet50", "attention_probs_dropout_prob", 0.1)])
def test_an_override_that_does_not_apply_to_the_family_is_a_one_line_error(preset, flag, value):
    with pytest.raises(UserError) as err:
        build_config(ModelArguments(model_preset=preset, **{flag: value}), LABELS)
    assert f"{flag}={value} does not apply to model_preset {preset!r}" in str(err.value)
    assert "\n" not in str(err.value)


def test_cnn_overrides_that_apply_change_the_config_and_a_too_small_image_is_refused():
    config = build_config(ModelArguments(model_preset="cnn_tiny_cifar", patch_size=1, image_size=64), LABELS)
    assert (config.patch_size, config.image_size) == (1, 64)
    assert build_config(ModelArguments(model_preset="resnet50", image_size=32), LABELS).image_size == 32
    with pytest.raises(UserError, match=r"image_size=16 is smaller than this resnet's total stride of 32"):
        build_config(ModelArguments(model_preset="resnet50", image_size=16), LABELS)


@pytest.mark.parametrize("preset", ["vit_tiny_cifar", "resnet50", "cnn_tiny_cifar"])
def test_every_parameter_gets_a_gradient_in_each_family(preset):
    torch.manual_seed(0)
    model = build_model(tiny_args(preset), LABELS)
    model.train()
    logits = model(pixel_values=torch.randn(4, 3, 32, 32)).logits
    assert logits.shape == (4, 10)
    torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


# --------------------------------------------------------------------------------------------------------- FLOPs
def test_cnn_flops_match_the_published_multiply_add_counts():
    # ResNet-50 at 224: 4.1 GMACs forward (He et al. 2016, Table 1: 3.8e9 counting the 1000-class head without the
    # v1.5 stride move; torchvision's model card: 4.09 GFLOPS as MACs). Training = 3 x forward, 2 FLOPs per MAC.
    resnet = build_config(ModelArguments(model_preset="resnet50"), [f"k{i}" for i in range(1000)])
    assert training_flops_per_image(resnet) / 6 / 1e9 == pytest.approx(4.09, rel=0.01)
    # ConvNeXt-T at 224 (ConvNextConfig's defaults): 4.5 GFLOPs in Liu et al. 2022, Table 1 (MACs, fvcore's count).
    convnext_t = ConvNextConfig(image_size=224, num_labels=1000)
    assert training_flops_per_image(convnext_t) / 6 / 1e9 == pytest.approx(4.5, rel=0.02)


def test_cnn_tiny_cifar_flops_are_the_hand_count_of_its_convolutions_and_linears():
    config = build_config(ModelArguments(model_preset="cnn_tiny_cifar"), LABELS)
    side = config.image_size // config.patch_size
    macs = side * side * config.patch_size**2 * 3 * config.hidden_sizes[0]  # stem
    for i, (c, depth) in enumerate(zip(config.hidden_sizes, config.depths)):
        if i:
            side //= 2
            macs += side * side * 4 * config.hidden_sizes[i - 1] * c  # 2x2 stride-2 downsampling conv
        macs += depth * side * side * (49 * c + 8 * c * c)  # depthwise 7x7 + C -> 4C -> C
    macs += config.hidden_sizes[-1] * 10
    assert training_flops_per_image(config) == 3 * 2 * macs


# -------------------------------------------------------------------------------------------------------- memory
def test_vit_b16_at_batch_64_fits_in_80_gb_and_not_in_2_gb(monkeypatch):
    config = build_config(ModelArguments(model_preset="vit_base_patch16_224"), LABELS)
    monkeypatch.setattr(cost, "device_memory", lambda device: 80 * GB)
    check_fits_in_memory(config, 64, "bf16", "cuda")
    monkeypatch.setattr(cost, "device_memory", lambda device: 2 * GB)
    with pytest.raises(UserError) as err:
        check_fits_in_memory(config, 64, "bf16", "cuda")
    message = str(err.value)
    assert "needs about" in message and "per_device_train_batch_size=64" in message and "\n" not in message
    # The estimate itself: more than the 16 bytes per parameter of weights, gradients and AdamW states alone.
    assert 16 * 85.8e6 < estimate_training_memory(config, 64, "bf16") < 80 * GB


def real_saved_bytes(model, pixels) -> int:
    """Bytes of the tensors a real CPU forward saves for the backward (each storage once, parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(pixel_values=pixels)
    return sum(saved.values())


@pytest.mark.parametrize("preset", ["resnet50", "cnn_tiny_cifar"])
def test_memory_estimate_counts_the_activations_a_real_fp32_step_saves(preset):
    """On the meta device the estimate sees the same saved tensors as a real forward on the CPU."""
    config = build_config(tiny_args(preset), LABELS)
    model = AutoModelForImageClassification.from_config(config)
    saved = real_saved_bytes(model, torch.randn(8, 3, 32, 32))
    assert estimate_training_memory(config, 8, "no") == 16 * num_parameters(model) + saved
    # Mixed precision: 16-bit weight copies, activations at 3 of 4 bytes.
    assert estimate_training_memory(config, 8, "bf16") == 18 * num_parameters(model) + saved * 3 // 4


@pytest.mark.parametrize("preset, image_size", [("vit_tiny_cifar", 100_000), ("resnet50", 100_000),
                                                ("vit_tiny_cifar", 2**30), ("cnn_tiny_cifar", 2**30)])
def test_a_huge_image_size_is_refused_fast_before_anything_is_allocated(preset, image_size):
    # vit_tiny_cifar at 100000 px: 625M tokens, a 480 GB position table; at 2**30 sizes pass int64.
    config = build_config(ModelArguments(model_preset=preset, image_size=image_size), LABELS)
    check_fits_in_memory(build_config(ModelArguments(model_preset="vit_tiny_cifar"), LABELS), 128, "bf16", "cpu")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        check_fits_in_memory(config, 128, "bf16", "cpu")
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200 * 1024
    assert f"image_size={image_size}" in str(err.value) and "physical RAM" in str(err.value)
    assert "\n" not in str(err.value)


def test_memory_estimate_of_vit_b16_at_batch_256_takes_under_a_second():
    config = build_config(ModelArguments(model_preset="vit_base_patch16_224"), LABELS)
    estimate_training_memory(config, 1, "bf16")  # first use imports the model code
    start = time.perf_counter()
    estimate_training_memory(config, 256, "bf16")
    assert time.perf_counter() - start < 1.0


# ------------------------------------------------------------------------------------------------------- optimizer
@pytest.mark.parametrize("preset, head", [("resnet50", {"classifier.1.weight", "classifier.1.bias"}),
                                          ("cnn_tiny_cifar", {"classifier.weight", "classifier.bias"})])
def test_cnn_optimizer_groups_find_the_head_and_skip_weight_decay_on_norms_biases_and_layer_scales(preset, head):
    model = build_model(tiny_args(preset), LABELS)
    groups = build_optimizer(model, TrainArguments(learning_rate=1e-3, weight_decay=0.05,
                                                      head_lr_multiplier=10)).param_groups
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert set(by_name) == {n for n, _ in model.named_parameters()}
    assert {n for g in groups if g["is_head"] for n in g["param_names"]} == head
    # Found by module type, not by name: ConvNeXt's downsampling LayerNorms are named by index only.
    norms = {f"{module_name}.{p}" for module_name, module in model.named_modules()
             if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)) for p in ("weight", "bias")}
    assert norms
    for name, param in model.named_parameters():
        exempt = name.endswith((".bias", "layer_scale_parameter")) or name in norms
        assert by_name[name]["weight_decay"] == (0.0 if exempt else 0.05), name
        assert by_name[name]["lr"] == pytest.approx(1e-2 if name in head else 1e-3), name
        if not exempt:
            assert param.ndim in (2, 4), name  # what decays: convolution kernels and linear matrices


@pytest.mark.parametrize("preset", ["resnet50", "cnn_tiny_cifar"])
def test_layer_decay_on_a_cnn_is_a_one_line_error(preset):
    model = build_model(tiny_args(preset), LABELS)
    with pytest.raises(UserError) as err:
        param_groups(model, TrainArguments(layer_decay=0.75))
    assert "layer_decay applies to ViT models only" in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------- CNN checkpoints
def save_cnn_checkpoint(path, model_type: str, labels=("a", "b", "c", "d")) -> dict:
    """A small trained-looking CNN checkpoint (head filled with 0.5, BatchNorm statistics moved); its state dict."""
    torch.manual_seed(3)
    maps = dict(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    if model_type == "resnet":
        model = ResNetForImageClassification(ResNetConfig(
            image_size=32, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", **maps))
        model.train()
        with torch.no_grad():
            model(pixel_values=torch.randn(4, 3, 32, 32))  # running statistics are state too
    else:
        model = ConvNextForImageClassification(ConvNextConfig(
            image_size=32, patch_size=2, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], **maps))
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.fill_(0.5)
    model.save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_type", ["resnet", "convnext"])
def test_cnn_checkpoint_with_a_new_head_keeps_every_backbone_tensor_bit_identical(tmp_path, model_type):
    source = save_cnn_checkpoint(tmp_path, model_type)
    model = load_pretrained(ModelArguments(model_name_or_path=str(tmp_path)), NEW_LABELS)
    state = model.state_dict()
    backbone = [k for k in source if not k.startswith("classifier.")]
    assert any("running_mean" in k for k in backbone) == (model_type == "resnet")
    for key in backbone:
        assert state[key].dtype == source[key].dtype and torch.equal(state[key], source[key]), key
    head = sorted(k for k in state if k.startswith("classifier."))
    assert model.loading_report["reinitialized"] == head and model.loading_report["interpolated"] == []
    assert model.loading_report["loaded"] == sorted(backbone)
    assert model.classifier(torch.zeros(1, *((16, 1, 1) if model_type == "resnet" else (16,)))).shape == (1, 3)
    assert all(not torch.isclose(state[k], torch.tensor(0.5)).all() for k in head if k.endswith("weight"))
    assert model.config.id2label == dict(enumerate(NEW_LABELS)) and model.config.image_size == 32


def test_cnn_checkpoint_fine_tuned_at_another_size_and_with_its_own_labels(tmp_path):
    source = save_cnn_checkpoint(tmp_path, "convnext", labels=NEW_LABELS)
    model = load_pretrained(ModelArguments(model_name_or_path=str(tmp_path), image_size=64), NEW_LABELS)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.items())  # the head too: same labels
    assert model.config.image_size == 64 and model.loading_report["reinitialized"] == []
    assert model_config(ModelArguments(model_name_or_path=str(tmp_path), image_size=64), NEW_LABELS).image_size == 64


def test_cnn_checkpoint_errors_are_one_line(tmp_path):
    save_cnn_checkpoint(tmp_path / "resnet", "resnet")
    with pytest.raises(UserError, match=r"hidden_size=64 does not apply to the checkpoint .* \(a ResNet\)"):
        load_pretrained(ModelArguments(model_name_or_path=str(tmp_path / "resnet"), hidden_size=64), NEW_LABELS)
    config = json.loads((tmp_path / "resnet" / "config.json").read_text())
    del config["image_size"]  # a ResNet written elsewhere (e.g. microsoft/resnet-50) does not say its size
    (tmp_path / "resnet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not say its image size; pass --image_size"):
        load_pretrained(ModelArguments(model_name_or_path=str(tmp_path / "resnet")), NEW_LABELS)
    assert load_pretrained(ModelArguments(model_name_or_path=str(tmp_path / "resnet"), image_size=48),
                           NEW_LABELS).config.image_size == 48
    swin = tmp_path / "swin"
    swin.mkdir()
    (swin / "config.json").write_text(json.dumps({"model_type": "swin"}))
    with pytest.raises(UserError, match=r"is a 'swin' checkpoint, not a ViT, ResNet or ConvNeXt; .*\['vit', "
                                        r"'resnet', 'convnext'\]"):
        load_pretrained(ModelArguments(model_name_or_path=str(swin)), NEW_LABELS)


PLAIN_TRANSFORMERS = """
import sys
import numpy as np, PIL.Image, torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
folder = sys.argv[1]
model = AutoModelForImageClassification.from_pretrained(folder).eval()
image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
with torch.no_grad():
    logits = model(**AutoImageProcessor.from_pretrained(folder)(image, return_tensors="pt")).logits
top = pipeline("image-classification", model=folder)(image, top_k=3)
assert [p["label"] for p in top][0] == model.config.id2label[int(logits.argmax())], top
assert "hf_vit" not in sys.modules and not [m for m in sys.modules if m.startswith("hf_vit.")]
print(type(model).__name__, top[0]["label"])
"""


@pytest.mark.parametrize("preset, cls", [("resnet50", "ResNetForImageClassification"),
                                         ("cnn_tiny_cifar", "ConvNextForImageClassification")])
def test_a_saved_cnn_folder_loads_with_plain_transformers_auto_classes_and_pipeline(tmp_path, preset, cls):
    model = build_model(ModelArguments(model_preset=preset), LABELS)
    model.save_pretrained(tmp_path)
    size = model.config.image_size
    ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["image_size"] == size
    # A clean interpreter: no hf_vit on the path, nothing but transformers (cwd outside the repository).
    proc = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(tmp_path)], cwd=tmp_path, check=False,
                          capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[0] == cls and proc.stdout.split()[1] in LABELS


def test_a_cnn_preset_trains_through_the_pipeline_pushes_and_resumes_to_the_same_weights(tmp_path, cifar10_path,
                                                                                       monkeypatch):
    """The same loop, outputs, checkpoints and Hub push as a ViT: a CNN run pushes its final files (and each
    checkpoint with hub_strategy checkpoint), and a run killed at a checkpoint resumes bit for bit."""
    import shutil

    from safetensors.torch import load_file
    from test_hub import FakeApi

    import hf_vit.hub as hub
    from hf_vit.trainer import train

    api = FakeApi()
    monkeypatch.setattr(hub, "HfApi", lambda token=None: api)
    args = ["--model_preset", "cnn_tiny_cifar", "--dataset_name", str(cifar10_path), "--max_train_samples", "320",
            "--max_eval_samples", "64", "--total_train_batch_size", "32", "--num_train_epochs", "2",
            "--warmup_epochs", "0.5", "--crop_padding", "2", "--dataloader_num_workers", "0", "--report_to", "none",
            "--checkpointing_steps", "10"]
    out = tmp_path / "run"
    results = train(parse_config([*args, "--output_dir", str(out), "--push_to_hub", "true", "--hub_model_id",
                                  "alice/cnn-run", "--hub_strategy", "checkpoint"]))
    assert results["global_step"] == 20 and results["num_parameters"] == 1_599_178
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "eval_results.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["model_type"] == "convnext"
    final = api.uploads[-1]
    assert final.folder == "run" and final.path_in_repo == ""
    pushed = {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "all_results.json"}
    assert pushed <= final.files
    assert {(u.folder, u.path_in_repo) for u in api.uploads[:-1]} >= {("checkpoint-10", "last-checkpoint")}
    assert "convnext" in (out / "README.md").read_text().lower()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-10", resumed / "checkpoint-10")
    train(parse_config(["--config", str(out / "train_config.yaml"), "--output_dir", str(resumed),
                        "--resume_from_checkpoint", "latest"]))
    a, b = load_file(str(out / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -------------------------------------------------------------------------------------------------------- recipes
MIRRORED = ("dataset_name", "train_split", "eval_split", "train_val_split", "total_train_batch_size",
            "num_train_epochs", "warmup_epochs", "warmup_start_lr", "min_lr", "label_smoothing", "crop_padding",
            "augmentation", "mixed_precision", "max_grad_norm", "data_on_device", "per_device_eval_batch_size",
            "checkpointing_steps", "random_resized_crop_scale", "mixup_alpha", "cutmix_alpha", "dataloader_num_workers",
            "head_lr_multiplier", "ema_decay", "seed", "report_to", "logging_steps")


@pytest.mark.parametrize("cnn_recipe, vit_recipe, preset, image_size", [
    ("cifar10_resnet50_scratch.yaml", "cifar10_vit_base_scratch.yaml", "resnet50", 224),
    ("cifar10_cnn_tiny_cpu.yaml", "cifar10_vit_tiny_cpu.yaml", "cnn_tiny_cifar", 32)])
def test_each_cnn_recipe_mirrors_its_vit_recipe_in_data_augmentation_and_schedule(cnn_recipe, vit_recipe, preset,
                                                                                   image_size):
    cnn = parse_config(["--config", str(REPO / "recipes" / cnn_recipe)])
    vit = parse_config(["--config", str(REPO / "recipes" / vit_recipe)])
    assert cnn.model.model_preset == preset
    assert build_config(cnn.model, LABELS).image_size == image_size
    assert build_config(vit.model, LABELS).image_size == image_size  # the same input resolution
    cnn_values, vit_values = cnn.to_dict(), vit.to_dict()
    assert {k: cnn_values[k] for k in MIRRORED} == {k: vit_values[k] for k in MIRRORED}
