"""The foundation (issue 2): presets, the LR schedule, parameter groups, the config round trip, and a real
`accelerate launch` run on CIFAR-10 that produces every output and resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import ViTForImageClassification

from conftest import REPO, TINY_ARGS, run_script
from hf_vit.config import ModelArguments, TrainArguments, parse_config, resolve_batch_sizes, save_config
from hf_vit.errors import UserError
from hf_vit.models import PRESETS, build_config, num_parameters, training_flops_per_image
from hf_vit.optim import build_optimizer, build_scheduler, lr_at, param_groups
from hf_vit.run_dir import FINAL_OUTPUTS, PREDICTION_FILES

LABELS = [f"c{i}" for i in range(10)]


@pytest.mark.parametrize("preset, expected", [
    ("vit_tiny_cifar", 2.7e6), ("vit_small_cifar", 10.7e6), ("vit_base_patch16_224", 85.8e6)])
def test_preset_parameter_counts_match_the_table(preset, expected):
    model = ViTForImageClassification(build_config(ModelArguments(model_preset=preset), LABELS))
    assert abs(num_parameters(model) - expected) / expected < 0.01
    assert model.config._attn_implementation == "sdpa"
    assert model.config.id2label[3] == "c3" and model.config.label2id["c9"] == 9


def test_training_flops_follow_the_published_counts():
    base = build_config(ModelArguments(model_preset="vit_base_patch16_224"), LABELS)
    small = build_config(ModelArguments(model_preset="vit_small_cifar"), LABELS)
    assert training_flops_per_image(base) / 1e9 == pytest.approx(105, rel=0.01)  # 3 x 17.6 GMACs x 2
    assert training_flops_per_image(small) / 1e9 == pytest.approx(4.3, rel=0.02)


def test_every_preset_field_is_overridable_and_invalid_shapes_are_refused():
    cfg = build_config(ModelArguments(model_preset="vit_tiny_cifar", hidden_size=96, num_attention_heads=4), LABELS)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.image_size) == (96, 4, 32)
    with pytest.raises(UserError, match="not divisible by num_attention_heads"):
        build_config(ModelArguments(model_preset="vit_tiny_cifar", hidden_size=100), LABELS)
    with pytest.raises(UserError, match="unknown model_preset"):
        build_config(ModelArguments(model_preset="vit_gigantic"), LABELS)
    assert set(PRESETS) >= {"vit_tiny_cifar", "vit_small_cifar", "vit_base_patch16_224"}


def test_lr_at_warmup_start_warmup_end_mid_cosine_and_last_step():
    total, warmup, peak, start, end = 100, 10, 1e-3, 1e-6, 1e-5
    assert lr_at(0, total, warmup, peak, start, end) == pytest.approx(start)
    assert lr_at(5, total, warmup, peak, start, end) == pytest.approx((start + peak) / 2)
    assert lr_at(warmup, total, warmup, peak, start, end) == pytest.approx(peak)
    mid = warmup + (total - 1 - warmup) / 2
    assert lr_at(mid, total, warmup, peak, start, end) == pytest.approx((peak + end) / 2)
    assert lr_at(total - 1, total, warmup, peak, start, end) == pytest.approx(end)


def test_scheduler_drives_the_optimizer_lr_per_step():
    model = ViTForImageClassification(build_config(ModelArguments(model_preset="vit_tiny_cifar"), LABELS))
    args = TrainArguments(learning_rate=1e-3, warmup_start_lr=1e-6, min_lr=1e-5)
    opt = build_optimizer(model, args)
    sched = build_scheduler(opt, args, total_steps=50, warmup_steps=5)
    seen = []
    for _ in range(50):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(1e-6)
    assert seen[5] == pytest.approx(1e-3)
    assert seen[49] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(seen[5:], seen[6:]))  # monotone cosine decay after warmup


def test_parameter_groups_exclude_biases_norms_position_embeddings_and_cls_from_weight_decay():
    model = ViTForImageClassification(build_config(ModelArguments(model_preset="vit_tiny_cifar"), LABELS))
    groups = param_groups(model, TrainArguments(weight_decay=0.05))
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]}
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["param_names"]}
    assert decay | no_decay == {n for n, _ in model.named_parameters()} and not decay & no_decay
    assert any("position_embeddings" in n for n in no_decay) and any("cls_token" in n for n in no_decay)
    assert all(n.endswith("bias") or "norm" in n or "embeddings" in n for n in no_decay
               if "cls_token" not in n and "position" not in n)
    assert all(n.endswith("weight") for n in decay)
    assert "classifier.weight" in decay


def test_global_batch_is_split_over_processes_and_accumulation():
    args = TrainArguments(total_train_batch_size=512, gradient_accumulation_steps=2)
    resolve_batch_sizes(args, num_processes=8)
    assert args.per_device_train_batch_size == 32
    with pytest.raises(UserError, match="not divisible"):
        resolve_batch_sizes(TrainArguments(total_train_batch_size=100, gradient_accumulation_steps=3), 2)


def test_config_round_trip_recipe_plus_overrides(tmp_path):
    recipe = REPO / "recipes" / "cifar10_vit_small_scratch.yaml"
    cfg = parse_config(["--config", str(recipe), "--learning_rate", "3e-4", "--output_dir", str(tmp_path)])
    assert cfg.train.learning_rate == 3e-4  # the CLI wins over the recipe
    assert cfg.train.total_train_batch_size == 512 and cfg.model.model_preset == "vit_small_cifar"  # recipe values
    saved = save_config(cfg, str(tmp_path))
    again = parse_config(["--config", saved])
    assert again.to_dict() == cfg.to_dict()
    with pytest.raises(UserError, match="unknown config key"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({"learnin_rate": 1e-3}))
        parse_config(["--config", str(bad)])
    with pytest.raises(UserError, match="unknown argument"):
        parse_config(["--learnin_rate", "1e-3"])


def test_saved_config_never_contains_the_hub_token(tmp_path):
    cfg = parse_config(["--hub_token", "hf_SECRET_abc", "--output_dir", str(tmp_path)])
    text = open(save_config(cfg, str(tmp_path))).read()
    assert "hf_SECRET_abc" not in text and "hub_token" not in text


def _timeless(history: list[dict]) -> list[dict]:
    """A log history without its wall-clock figures (the only values two identical runs may differ in)."""
    return [{k: v for k, v in entry.items() if "runtime" not in k and "per_second" not in k and "time" not in k}
            for entry in history]


def test_train_config_passed_back_as_config_repeats_the_run_bit_for_bit(tmp_path, cifar10_path):
    """The README's promise: ``train_config.yaml`` passed back as ``--config`` repeats the run. The first run leaves
    the precision to the launcher (ACCELERATE_MIXED_PRECISION=bf16, as ``accelerate launch --mixed_precision bf16``
    sets it), so the file must record the effective bf16, not the unset flag; the repeat runs without the launcher's
    setting and must end with the same weights and the same log history."""
    first, again = tmp_path / "first", tmp_path / "again"
    tiny = ["--max_train_samples", "96", "--max_eval_samples", "32", "--num_train_epochs", "1", "--logging_steps",
            "1", "--dataloader_num_workers", "0", "--checkpointing_steps", "no"]
    run_script(["run_finetune.py", *TINY_ARGS, *tiny, "--output_dir", str(first)],
               env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    saved = yaml.safe_load((first / "train_config.yaml").read_text())
    assert saved["mixed_precision"] == "bf16" and "run_plan" in saved
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_MIXED_PRECISION"}
    run_script(["run_finetune.py", "--config", str(first / "train_config.yaml"), "--output_dir", str(again)], env=env)
    a, b = load_file(str(first / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = [_timeless(json.loads((run / "log_history.json").read_text())) for run in (first, again)]
    assert history[0] == history[1] and len(history[0]) >= 3
    repeated = yaml.safe_load((again / "train_config.yaml").read_text())
    assert {k: v for k, v in repeated.items() if k not in ("output_dir", "run_plan")} == \
        {k: v for k, v in saved.items() if k not in ("output_dir", "run_plan")}


@pytest.fixture(scope="module")
def launched_run(tmp_path_factory, cifar10_path):
    """One real `accelerate launch --config_file accelerate_configs/cpu.yaml run_finetune.py` run."""
    out = tmp_path_factory.mktemp("foundation") / "run"
    # The real vit_tiny_cifar preset: drop conftest's architecture shrinking.
    arch = {"--hidden_size", "--intermediate_size", "--num_hidden_layers", "--num_attention_heads"}
    args = [a for i, a in enumerate(TINY_ARGS) if a not in arch and (i == 0 or TINY_ARGS[i - 1] not in arch)]
    proc = run_script(["-m", "accelerate.commands.launch", "--config_file",
                       str(REPO / "accelerate_configs" / "cpu.yaml"), "run_finetune.py", *args,
                       "--output_dir", str(out), "--checkpointing_steps", "15", "--checkpoints_total_limit", "3"])
    return out, proc


def test_launched_run_produces_every_output(launched_run):
    out, proc = launched_run
    written = {p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    # every final output but a sharded model's index and the predictions of sets it did not score (no test_split,
    # no train_eval_samples), and nothing else beside the config
    unscored = {PREDICTION_FILES["test"], PREDICTION_FILES["train_eval"]}
    assert written == set(FINAL_OUTPUTS) - {"model.safetensors.index.json", *unscored} | {"train_config.yaml"}
    results = json.loads((out / "all_results.json").read_text())
    for key in ("eval_accuracy", "eval_top5_accuracy", "eval_loss", "eval_samples", "train_loss",
                "train_samples_seen", "train_runtime", "train_samples_per_second", "epoch", "global_step"):
        assert key in results, key
    # 640 train examples at a global batch of 32 for 2 epochs: 20 steps per epoch, every example once per epoch.
    assert results["global_step"] == 40 and results["train_samples_seen"] == 2 * 640
    assert results["epoch"] == 2.0 and results["eval_samples"] == 128
    assert "Final eval accuracy" in proc.stdout
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-30"]
    assert not list(out.glob("*.tmp"))


def test_output_folder_loads_with_the_auto_classes(launched_run):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    out, _ = launched_run
    model = AutoModelForImageClassification.from_pretrained(out)
    processor = AutoImageProcessor.from_pretrained(out)
    assert model.config.num_labels == 10 and model.config.id2label[0] == "airplane"
    assert processor.size == {"height": 32, "width": 32}
    assert processor.image_mean == pytest.approx([0.485, 0.456, 0.406])


def test_resumed_run_continues_from_its_checkpoint_step_bit_for_bit(launched_run, tmp_path):
    out, _ = launched_run
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    mid = checkpoints[0]
    state = json.loads((mid / "trainer_state.json").read_text())
    assert 0 < state["global_step"] < json.loads((out / "all_results.json").read_text())["global_step"]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(mid, resumed / mid.name)
    proc = run_script(["run_finetune.py", "--config", str(out / "train_config.yaml"), "--output_dir", str(resumed),
                       "--resume_from_checkpoint", "latest"])
    assert f"Resumed from {resumed / mid.name} at step {state['global_step']}" in proc.stderr
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "all_results.json").read_text())["eval_accuracy"] == \
        json.loads((out / "all_results.json").read_text())["eval_accuracy"]


def test_flag_prefixes_are_not_silently_expanded():
    with pytest.raises(UserError, match="unknown argument"):
        parse_config(["--learning_rat", "1e-3"])
