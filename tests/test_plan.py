"""The run plan (hf_vit.plan): resolved from the config, the launch and the dataset's metadata before anything runs,
printed by --dry_run, recorded in train_config.yaml, and refusing plans that would waste the hardware."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import TINY_ARGS, run_script
from hf_vit.config import parse_config
from hf_vit.errors import UserError
from hf_vit.plan import DataFacts, check_plan, plan_table, resolve_plan

VIT_B = (85_806_346, 105.4e9, 224)  # parameters, training FLOPs per image, image size: ViT-B/16, 10 labels


def _cfg(*flags):
    return parse_config(["--model_preset", "vit_base_patch16_224", "--dataset_name", "x", "--output_dir", "/tmp/p",
                         *flags])


def _cifar(n=45_000, streaming=False, **kw):
    return DataFacts(n, 5_000, 10, streaming, has_eval=True, **kw)


def test_the_report_scale_ten_percent_run_gets_all_its_steps():
    """The report-scale 10% run: 4,842 images, global batch 512, 16 loader workers. The old rule planned whole rounds
    of 16 workers x 512 and got 0 steps; the plan now has 9 steps an epoch and leaves out fewer than 512 images."""
    cfg = _cfg("--total_train_batch_size", "512", "--dataloader_num_workers", "16", "--num_train_epochs", "2000",
               "--warmup_epochs", "100")
    plan = resolve_plan(cfg, 1, _cifar(4842), VIT_B)
    assert (plan.steps_per_epoch, plan.total_steps, plan.examples_used_per_epoch) == (9, 18_000, 4608)
    assert plan.examples_left_out_per_epoch == 234 < plan.global_batch and plan.refusal() is None
    assert plan.worker_startups == 16 * (1 + 2000)  # the train workers once, the eval workers at each evaluation
    # 8 GPUs: 64 per device, the same global batch, the same steps.
    eight = resolve_plan(cfg, 8, _cifar(4842), VIT_B)
    assert (eight.micro_batch, eight.steps_per_epoch, eight.total_steps) == (64, 9, 18_000)
    # The time: 18,000 steps x 512 images x 105.4 GFLOP at the assumed 160 TFLOP/s per GPU.
    assert plan.gpu_hours == pytest.approx(18_000 * 512 * 105.4e9 / 160e12 / 3600)
    assert plan.hours_on_8_gpus == pytest.approx(plan.gpu_hours / 8)


def test_a_plan_without_a_step_or_reading_a_stream_many_times_is_refused_in_one_line():
    plan = resolve_plan(_cfg("--total_train_batch_size", "512"), 1, _cifar(500), VIT_B)
    assert plan.steps_per_epoch == 0
    with pytest.raises(UserError, match=r"^an epoch of 500 examples holds no optimizer step of the global batch 512"):
        check_plan(plan)
    exact = resolve_plan(_cfg("--streaming", "true", "--stream_sharding", "exact", "--dataloader_num_workers", "4"),
                         2, _cifar(45_000, streaming=True, num_units=10), VIT_B)
    assert exact.read_amplification == 8.0
    with pytest.raises(UserError, match=r"read 8\.00x per epoch \(8 consumers = 2 processes x 4 loader workers\)"):
        check_plan(exact)
    # The same stream by shards: 1,000 row groups over 8 consumers, each record read about once.
    shards = resolve_plan(_cfg("--streaming", "true", "--dataloader_num_workers", "4"), 2,
                          _cifar(45_000, streaming=True, num_units=1000), VIT_B)
    assert shards.read_amplification < 1.01 and shards.refusal() is None
    # Too few units for the consumers: refused, saying what to change.
    few = resolve_plan(_cfg("--streaming", "true", "--dataloader_num_workers", "8"), 2,
                       _cifar(45_000, streaming=True, num_units=10), VIT_B)
    assert "the stream has 10 shards/row groups for 16 consumers" in few.refusal()


def test_a_measured_throughput_replaces_the_flops_estimate(tmp_path, monkeypatch):
    import hf_vit.plan as plan_module

    path = tmp_path / "throughput.json"
    path.write_text(json.dumps([{"model_preset": "vit_base_patch16_224", "image_size": 224, "device": "H100",
                                 "train_images_per_second_per_gpu": 2000.0, "train_tflops_per_gpu": 210.8}]))
    monkeypatch.setattr(plan_module, "THROUGHPUT_FILE", path)
    plan = resolve_plan(_cfg("--total_train_batch_size", "512", "--max_train_steps", "1000"), 1, _cifar(), VIT_B)
    other = resolve_plan(_cfg("--model_preset", "resnet50", "--total_train_batch_size", "512", "--max_train_steps",
                              "10"), 1, _cifar(), (23e6, 24.5e9, 224))
    assert plan.gpu_hours == pytest.approx(1000 * 512 / 2000 / 3600)
    assert plan.throughput_source.startswith("measured 2,000 img/s per GPU")
    # Another model: its FLOPs at the sustained rate measured for ViT-B/16.
    assert other.throughput_source == "FLOPs at the 211 TFLOP/s per GPU measured for vit_base_patch16_224 on H100"
    assert other.gpu_hours == pytest.approx(10 * 512 * 24.5e9 / 210.8e12 / 3600)
    assert "| run | processes x loader workers |" in plan_table([("r", plan)])


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, cifar10_path):
    out = tmp_path / "run"
    proc = run_script(["run_finetune.py", *TINY_ARGS, "--max_train_samples", "300", "--total_train_batch_size", "32",
                       "--output_dir", str(out), "--dry_run", "true"], timeout=300)
    assert "run plan for" in proc.stdout and "steps per epoch / in all (epochs)  9 / " in proc.stdout
    assert "verdict                            ok" in proc.stdout
    assert not out.exists()
    refused = run_script(["run_finetune.py", *TINY_ARGS, "--max_train_samples", "300", "--total_train_batch_size",
                          "512", "--output_dir", str(out), "--dry_run", "true"], timeout=300, check=False)
    assert refused.returncode == 2 and "REFUSED" in refused.stdout
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "holds no optimizer step" in errors[0] and not out.exists()


def test_train_config_records_the_plan_and_the_effective_precision_and_repeats_the_run(tmp_path, cifar10_path):
    out = tmp_path / "run"
    run_script(["run_finetune.py", *TINY_ARGS, "--max_train_samples", "64", "--total_train_batch_size", "32",
                "--num_train_epochs", "1", "--output_dir", str(out)], timeout=300)
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["mixed_precision"] == "no"  # the launcher's choice, written out
    assert saved["run_plan"]["steps_per_epoch"] == 2 and saved["run_plan"]["examples_used_per_epoch"] == 64
    again = parse_config(["--config", str(out / "train_config.yaml")])  # run_plan is a record, not a setting
    assert again.train.mixed_precision == "no" and again.train.total_train_batch_size == 32


def test_the_study_dry_run_plans_report_scale_for_eight_gpus_offline(cifar10_path, tmp_path, capsys):
    """Offline (as here: the Hub is unreachable), ImageNet-1k is planned from its recorded metadata at once."""
    import time

    from hf_vit import study

    start = time.monotonic()
    study.main(["studies/report_scale.yaml", "--output_dir", str(tmp_path / "s"), "--dry_run", "--processes", "8",
                "--set", f"cifar10.dataset_name={cifar10_path}", "--set", "cifar10.eval_split="])
    out = capsys.readouterr().out
    assert time.monotonic() - start < 120 and not (tmp_path / "s").exists()
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 40 and all(row.endswith("| ok |") for row in rows)
    imagenet = next(row for row in rows if row.startswith("| imagenet_pretrain "))
    assert "| 8 x 16 | 200 / 1600 (1) |" in imagenet and "| shards, 0.999x |" in imagenet
    with pytest.raises(UserError, match="--processes 0"):
        study.main(["studies/report_scale.yaml", "--output_dir", str(tmp_path / "s"), "--dry_run", "--processes", "0"])
