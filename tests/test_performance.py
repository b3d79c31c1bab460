"""Performance features: the device-resident train data (same batches as the loader's sharding rule, batched
augmentation, exact resume, bad data), the training-step benchmark and the prepared GPU check's CPU dry run."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from conftest import REPO, TINY_ARGS, run_script
from hf_vit.config import DataArguments, parse_config
from hf_vit.data import ImageSpec, example_key, load_splits, to_rgb
from hf_vit.data.device_data import DeviceTrainData, decode_split
from hf_vit.data.loader import TrainStream
from hf_vit.data.sharding import Topology
from hf_vit.errors import UserError

SEED = 7
BLOCK = 16
# torchvision 0.29 announces on every decode that its decoders will move to TorchCodec (device_data.py filters it
# outside pytest, which resets warning filters per test).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def _spec(size=32, padding=4):
    return ImageSpec(size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), size, padding)


@pytest.fixture(scope="module")
def cifar_small(cifar10_path):
    """200 CIFAR-10 training images (undecoded), as the trainer loads them."""
    args = DataArguments(dataset_name=str(cifar10_path), crop_padding=4, max_train_samples=200)
    return load_splits(args)


def _device_data(splits, rank=0, world=1, size=32, padding=4, augmentation="basic", seed=SEED):
    args = DataArguments(crop_padding=padding, augmentation=augmentation)
    return DeviceTrainData(splits.train, splits.image_column, splits.label_column, len(splits.label_names),
                           _spec(size, padding), args, Topology(world, 0, BLOCK), rank, seed, "cpu", decode_threads=2)


def _stream_blocks(splits, rank, world, epoch, skip=0):
    """The loader's sharding rule (no workers: one consumer per process), as lists of example keys per block."""
    stream = TrainStream(splits.train, Topology(world, 0, BLOCK), rank, seed=SEED, num_examples=len(splits.train))
    stream.set_epoch(epoch, skip)
    return [[example_key(row[splits.image_column]) for row in block] for block in stream]


@pytest.mark.parametrize("world", [1, 2])
def test_batches_follow_the_example_stream_sharding_rule(cifar_small, world):
    n = len(cifar_small.train)
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            data = _device_data(cifar_small, rank=rank, world=world)
            data.set_epoch(epoch)
            blocks = [batch.keys for batch in data]
            assert blocks == _stream_blocks(cifar_small, rank, world, epoch)
            assert len(blocks) == data.num_micro_batches == n // (world * BLOCK)  # equal steps per rank
            seen += [k for block in blocks for k in block]
        # Exactly once: complete rounds of the epoch's permutation, nothing twice.
        assert len(seen) == len(set(seen)) == (n // (world * BLOCK)) * world * BLOCK


def test_labels_and_pixels_are_the_decoded_examples(cifar_small):
    data = _device_data(cifar_small, padding=0)
    rows = cifar_small.train[:]
    batch = next(iter(data))
    position = {key: i for i, key in enumerate(data.keys)}
    for j, i in enumerate([position[key] for key in batch.keys[:6]]):
        image = rows[cifar_small.image_column][i]
        reference = torch.from_numpy(np.array(to_rgb(PIL.Image.open(io.BytesIO(image["bytes"]))))).permute(2, 0, 1)
        assert torch.equal(data.images[i], reference)  # the fast JPEG path is bit-identical to the loader's PIL decode
        assert batch.labels[j] == rows[cifar_small.label_column][i]


@pytest.mark.parametrize("size", [32, 48])
def test_pad_crop_flip_and_resize_match_the_per_example_definition(cifar_small, size):
    padding = 4 if size == 32 else 6
    data = _device_data(cifar_small, size=size, padding=padding)
    data.set_epoch(1)
    offsets, flips = data.epoch_params()
    assert offsets.min() >= 0 and offsets.max() <= 2 * padding and 0.3 < flips.float().mean() < 0.7
    for r, batch in enumerate(data):
        pixels = batch.pixel_values
        assert pixels.dtype == torch.uint8 and pixels.shape == (BLOCK, 3, size, size)
        if r > 1:
            continue
        for j, i in enumerate([data.keys.index(key) for key in batch.keys]):
            position = r * BLOCK + j
            image = data.images[i]
            if image.shape[-1] != size:
                image = TF.resize(image, [size, size], antialias=True)
            padded = TF.pad(image, [padding], padding_mode="reflect")
            top, left = offsets[position].tolist()
            expected = padded[:, top : top + size, left : left + size]
            if flips[position]:
                expected = expected.flip(-1)
            assert torch.equal(pixels[j], expected)


@pytest.mark.parametrize("augmentation", ["basic", "enhanced"])
def test_augmentation_is_deterministic_given_seed_and_epoch(cifar_small, augmentation):
    data = _device_data(cifar_small, augmentation=augmentation)
    data.set_epoch(2)
    first = [b.pixel_values for b in data]
    again = [b.pixel_values for b in data]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other_seed = _device_data(cifar_small, augmentation=augmentation, seed=SEED + 1)
    other_seed.set_epoch(2)
    assert not torch.equal(next(iter(other_seed)).pixel_values, first[0])
    data.set_epoch(3)
    assert not torch.equal(next(iter(data)).pixel_values, first[0])
    if augmentation == "enhanced":
        basic = _device_data(cifar_small)
        basic.set_epoch(2)
        assert not all(torch.equal(a.pixel_values, b) for a, b in zip(basic, first))
    # The global RNG (dropout, MixUp) is untouched by the data path.
    state = torch.random.get_rng_state()
    list(data)
    assert torch.equal(state, torch.random.get_rng_state())


def test_resume_skips_by_count_and_reproduces_the_epoch(cifar_small):
    data = _device_data(cifar_small, augmentation="enhanced")
    data.set_epoch(1)
    full = list(data)
    data.set_epoch(1, skip_micro_batches=4)
    resumed = list(data)
    assert len(resumed) == len(full) - 4
    for a, b in zip(full[4:], resumed):
        assert a.keys == b.keys
        assert torch.equal(a.pixel_values, b.pixel_values)
        assert torch.equal(a.labels, b.labels)


def _jpeg(array, mode="RGB"):
    buf = io.BytesIO()
    PIL.Image.fromarray(array).convert(mode).save(buf, format="JPEG")
    return buf.getvalue()


def test_bad_images_are_skipped_at_decode_time_and_reported_in_batches(tmp_path):
    rng = np.random.default_rng(0)
    good = [_jpeg(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(13)]
    gray = _jpeg(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), mode="L")
    rgba = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA").save(rgba, format="PNG")
    images = good + [b"not an image", good[0][:100], gray, rgba.getvalue()]
    labels = [i % 4 for i in range(len(good))] + [0, 1, 2, 3]
    labels[5] = 9  # outside the 4 classes the data is declared with below
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in images], "label": labels},
        features=datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")}))
    decoded, _, keys, bad = decode_split(ds, "image", "label", 4, 32, threads=2)
    assert sorted(bad) == [5, 13, 14]
    assert "label 9" in bad[5] and keys[13] == example_key({"bytes": b"not an image", "path": None})
    assert torch.equal(decoded[15], torch.from_numpy(np.array(to_rgb(PIL.Image.open(io.BytesIO(gray))))).permute(2, 0, 1))
    assert torch.equal(decoded[16], torch.from_numpy(np.array(to_rgb(PIL.Image.open(rgba))).copy()).permute(2, 0, 1))

    data = DeviceTrainData(ds, "image", "label", 4, _spec(), DataArguments(crop_padding=4), Topology(1, 0, 4), 0, SEED,
                           "cpu")
    total, bad_seen = 0, []
    for batch in data:
        assert len(batch.labels) + len(batch.bad_keys) == batch.num_examples == 4
        assert len(batch.pixel_values) == len(batch.labels)
        total += len(batch.labels)
        bad_seen += batch.bad_keys
    assert total + len(bad_seen) == 16
    assert {reason.split(" ")[0] for reason in bad_seen} <= {keys[i] for i in bad}  # reported by key


def test_unsupported_uses_are_one_line_errors(cifar_small, cifar10_path):
    args = DataArguments(crop_padding=None)
    with pytest.raises(UserError, match="crop_padding"):
        DeviceTrainData(cifar_small.train, cifar_small.image_column, cifar_small.label_column, 10,
                        _spec(padding=None), args, BLOCK, 0, 1, SEED)
    streamed = load_splits(DataArguments(dataset_name=str(cifar10_path), streaming=True, crop_padding=4,
                                         train_val_split=0))
    with pytest.raises(UserError, match="map-style"):
        DeviceTrainData(streamed.train, streamed.image_column, streamed.label_column, 10, _spec(),
                        DataArguments(crop_padding=4), BLOCK, 0, 1, SEED)


def test_too_large_for_memory_is_refused_before_decoding(cifar_small, monkeypatch):
    monkeypatch.setattr("hf_vit.data.device_data.MAX_MEMORY_FRACTION", 1e-12)
    with pytest.raises(UserError, match="fit in memory"):
        _device_data(cifar_small)


def _tiny_config(out, *extra):
    return parse_config([*TINY_ARGS, "--data_on_device", "--dataloader_num_workers", "0", "--output_dir", str(out),
                         *extra])


def test_training_with_data_on_device_resumes_bit_exactly(tmp_path):
    """A run interrupted mid-epoch and resumed from its checkpoint ends with the same weights as an uninterrupted
    one (the data position is skipped by count; augmentation depends only on seed, epoch and position)."""
    from safetensors.torch import load_file

    from hf_vit.trainer import Run

    common = ["--max_train_samples", "320", "--num_train_epochs", "1", "--checkpointing_steps", "4",
              "--augmentation", "enhanced"]
    full = Run(_tiny_config(tmp_path / "full", *common)).fit()
    assert full["global_step"] == 10 and full["train_samples_seen"] == 320
    resumed = Run(_tiny_config(tmp_path / "resumed", *common, "--resume_from_checkpoint",
                               str(tmp_path / "full" / "checkpoint-4"))).fit()
    assert resumed["global_step"] == 10
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_finetune_with_data_on_device(tmp_path):
    out = tmp_path / "run"
    run_script(["run_finetune.py", *TINY_ARGS, "--data_on_device", "--dataloader_num_workers", "0",
                "--max_train_steps", "12", "--output_dir", str(out)])
    results = json.loads((out / "all_results.json").read_text())
    assert results["global_step"] == 12 and results["train_samples_seen"] == 12 * 32
    assert results["train_skipped_samples"] == 0
    # The final eval scored the 128 held-out images (TINY_ARGS' cap), and the accuracy is their confusion matrix's.
    matrix = json.loads((out / "eval_results.json").read_text())["confusion_matrix"]
    assert results["eval_samples"] == sum(map(sum, matrix)) == 128
    assert results["eval_accuracy"] == sum(matrix[i][i] for i in range(10)) / 128
    assert "data_on_device: true" in (out / "train_config.yaml").read_text()


# ------------------------------------------------------------------------------------------------------ benchmarks
def _load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_times_the_trainer_step_next_to_a_bare_loop(capsys):
    bench = _load_benchmark("bench_train")
    bench.main(["--preset", "vit_tiny_cifar", "--batch_size", "16", "--steps", "1", "--rounds", "2", "--warmup",
                "1", "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2",
                "--intermediate_size", "64", "--threads", "1", "--peak_tflops", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    for key in ("pipeline_images_per_sec", "bare_images_per_sec", "pipeline_tflops", "pipeline_mfu",
                "ratio_pipeline_to_bare", "gflop_per_image"):
        assert result[key] > 0, key
    # TFLOP/s is images/s times the model's training FLOPs per image.
    assert result["pipeline_tflops"] == pytest.approx(result["pipeline_images_per_sec"]
                                                      * result["gflop_per_image"] / 1e3)


def _gpu_check(args, timeout):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_gpu_check_training_part_dry_run(cifar10_path, tmp_path):
    """The cheap check: the CIFAR training part of the GPU check, on CPU for a few seconds."""
    proc = _gpu_check([str(cifar10_path), "--dry-run", "--parts", "b", "--train_seconds", "4", "--results_dir",
                       str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("gpu_check_dry_run_*.json")
    result = json.loads(path.read_text())
    b = result["b"]
    assert result["dry_run"] and b["epochs"], result
    # An evaluation at the end of every epoch, none missed, each of the dry run's 128 held-out images.
    assert [e["epoch"] for e in b["epochs"]] == list(range(1, len(b["epochs"]) + 1))
    assert b["eval_examples"] == 128
    for e in b["epochs"]:
        assert e["train_seconds"] > 0 and e["eval_seconds"] > 0
        assert (e["eval_accuracy"] * 128) == pytest.approx(round(e["eval_accuracy"] * 128))  # a count of 128 images


def test_gpu_check_decode_on_device_part_dry_run(cifar10_path, imagenet_sample_path, tmp_path):
    """Part (c), decode_on_device on the ImageNet photos, on the CPU."""
    proc = _gpu_check([str(cifar10_path), "--dry-run", "--parts", "c", "--imagenet_dir", str(imagenet_sample_path),
                       "--results_dir", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("gpu_check_dry_run_*.json")
    result = json.loads(path.read_text())
    assert result["c"]["device"] == "cpu" and result["c"]["images"] == 64
    for augmentation in ("basic", "enhanced"):
        assert result["c"][augmentation]["device_images_per_sec"] > 0
        assert result["c"][augmentation]["worker_images_per_sec_per_core"] > 0
    assert "(c) decode_on_device basic" in proc.stdout


@pytest.mark.parametrize("args", [["{nowhere}", "--dry-run"],
                                  ["{cifar}", "--dry-run", "--parts", "c", "--imagenet_dir", "{nowhere}"],
                                  ["{cifar}", "--dry-run", "--parts", "a,e"]])
def test_gpu_check_rejects_a_missing_dataset_folder_or_part(args, cifar10_path, tmp_path):
    args = [a.format(nowhere=tmp_path / "nowhere", cifar=cifar10_path) for a in args]
    proc = _gpu_check(args, timeout=120)
    assert proc.returncode == 2 and "error:" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_gpu_check_full_dry_run(cifar10_path, tmp_path):
    proc = _gpu_check([str(cifar10_path), "--dry-run", "--results_dir", str(tmp_path)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("gpu_check_dry_run_*.json")
    result = json.loads(path.read_text())
    assert {"eager", "compiled"} <= set(result["a"]) and result["b"]["epochs"]
    assert result["a"]["eager"]["pipeline_images_per_sec"] > 0


def test_gpu_check_plans_the_report_scale_study_from_the_measured_throughput(cifar10_path, tmp_path):
    """Part (d) on a throughput as part (a) records it: throughput.json written, every run of report_scale.yaml
    planned on 1 and 8 GPUs, none refused, the ViT-B/16 runs timed by the measured images/s."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import argparse

    import gpu_check

    result = {"a": {"eager": {"pipeline_images_per_sec": 1500.0, "pipeline_tflops": 158.1}},
              "machine": {"gpu": "TEST-GPU"}, "date": "2026-12-07T00:00:00"}
    out = gpu_check.part_d(argparse.Namespace(dry_run=False, cifar_dir=str(cifar10_path)), result, tmp_path,
                           lambda line: None)
    assert "error" not in out, out.get("traceback")
    import hf_vit.plan

    assert hf_vit.plan.THROUGHPUT_FILE.parent.name == "results"  # the repository's again, for every later plan
    assert json.loads((tmp_path / "throughput.json").read_text())[0]["train_images_per_second_per_gpu"] == 1500.0
    for gpus in (1, 8):
        rows = [line for line in out[f"table_{gpus}_gpu"].splitlines() if line.startswith("| ") and "---" not in line]
        assert len(rows) == 1 + 40 and all(row.endswith("| ok |") for row in rows[1:])
        f10 = next(row for row in rows if row.startswith("| vit_base_scratch_f10_s1 "))
        assert "| 8 / 16000 (2000) |" in f10 and "measured 1,500 img/s per GPU (TEST-GPU)" in f10
