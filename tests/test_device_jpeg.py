"""decode_on_device (hf_vit/data/device_jpeg.py): JPEGs decoded on the accelerator. Here the "accelerator" is the CPU, where
the path must give the loader path's batches bit for bit — on CUDA only the decoder (nvJPEG) differs."""

from __future__ import annotations

import io
import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from conftest import IMAGENET_SAMPLE, run_script
from hf_vit.config import DataArguments
from hf_vit.data import ImageSpec, build_image_processor, train_transform
from hf_vit.data.device_jpeg import DeviceJpegDecoder, JpegPlanCollate
from hf_vit.data.loader import DecodeCollate
from hf_vit.data.transforms import RandomResizedCropDecode

PRETRAIN = ["--dataset_name", str(IMAGENET_SAMPLE), "--streaming", "true", "--image_size", "32", "--patch_size", "8",
            "--hidden_size", "64", "--intermediate_size", "128", "--num_hidden_layers", "2", "--num_attention_heads",
            "2", "--max_train_samples", "192", "--total_train_batch_size", "32", "--num_train_epochs", "1",
            "--warmup_epochs", "0.25", "--learning_rate", "1e-3", "--dataloader_num_workers", "2",
            "--train_val_split", "0", "--logging_steps", "1", "--report_to", "none", "--augmentation", "enhanced"]


def _jpeg(array: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(array).convert(mode).save(buf, format="JPEG")
    return buf.getvalue()


def _bogus_huffman_table(data: bytes) -> bytes:
    """A JPEG whose header PIL reads but whose first Huffman table is invalid: libjpeg and nvJPEG refuse to decode."""
    at = data.index(b"\xff\xc4") + 5  # marker, length (2), class/id (1): then the 16 code-length counts
    return data[:at] + b"\xff" * 16 + data[at + 16:]


def _examples(imagenet_sample_path, n: int = 24) -> list[dict]:
    ds = datasets.load_dataset(str(imagenet_sample_path), split="train").cast_column("image",
                                                                                     datasets.Image(decode=False))
    rows = [dict(ds[i]) for i in range(n)]
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    png = io.BytesIO()
    PIL.Image.fromarray(photo).save(png, format="PNG")
    good = _jpeg(photo)
    odd = [("cmyk.jpg", _jpeg(photo, "CMYK"), 1), ("grey.jpg", _jpeg(photo, "L"), 2), ("photo.png", png.getvalue(), 3),
           ("truncated.jpg", good[: len(good) * 2 // 3], 4), ("label.jpg", good, 5000),
           ("huffman.jpg", _bogus_huffman_table(good), 6), ("nolabel.jpg", good, None)]
    return rows + [{"image": {"bytes": b, "path": p}, "label": y} for p, b, y in odd]


@pytest.mark.parametrize("augmentation", ["basic", "enhanced"])
def test_decoding_on_a_cpu_device_gives_the_loader_paths_batches_bit_for_bit(augmentation, imagenet_sample_path,
                                                                            monkeypatch):
    """Bit for bit against the loader path decoding at full size. (The loader path decodes a crop of at least twice
    the output at a reduced DCT size, 1/2 to 1/8; no device decoder offers that, so those crops differ slightly.)"""
    monkeypatch.setattr(RandomResizedCropDecode, "reduction", lambda self, img, box: 1)
    spec = ImageSpec.from_processor(build_image_processor(64, None))
    transform = train_transform(spec, DataArguments(augmentation=augmentation))
    examples = _examples(imagenet_sample_path)
    for epoch in (0, 3):
        reference = DecodeCollate(transform, "image", "label", 1000, seed=7, train=True)
        planned = JpegPlanCollate(transform, "image", "label", 1000, seed=7)
        reference.epoch = planned.epoch = epoch
        want = reference(examples)
        plan = planned(examples)
        # The 24 photos, the grey JPEG and the one with the bad Huffman table (its header is fine) go to the device;
        # CMYK, PNG, the truncated file (no end-of-image marker) and the bad or missing labels take the worker path.
        assert len(plan.jpeg_data) == 26
        got = DeviceJpegDecoder(transform, torch.device("cpu"))(plan)
        by_key = dict(zip(want.keys, want.pixel_values))
        assert sorted(got.keys) == sorted(want.keys) and len(got.pixel_values) == len(got.keys)
        for key, pixels, label in zip(got.keys, got.pixel_values, got.labels.tolist()):
            assert torch.equal(pixels, by_key[key]), (augmentation, epoch, key)
            assert label == want.labels[want.keys.index(key)]
        assert got.pixel_values.dtype == torch.uint8 and got.pixel_values.shape[1:] == (3, 64, 64)
        # Bad examples are reported by key on both paths: the label and the truncated file by the worker, the
        # undecodable Huffman table by the worker (PIL) on one path and by the device decoder on the other.
        assert sorted(b.split(" ")[0] for b in got.bad_keys) == sorted(b.split(" ")[0] for b in want.bad_keys) \
            == ["huffman.jpg", "label.jpg", "nolabel.jpg", "truncated.jpg"]
        assert plan.num_examples == want.num_examples == len(examples)


def test_images_the_device_decoder_refuses_are_decoded_on_the_cpu_and_only_undecodable_ones_are_bad(
        imagenet_sample_path, monkeypatch):
    """nvJPEG does not take every JPEG libjpeg-turbo takes: such images must not be counted as bad. A stand-in device
    ("cpu:0") whose decoder refuses everything: the batch comes out the same, via the CPU decoder."""
    import hf_vit.data.device_jpeg as device_jpeg

    real = device_jpeg.decode_jpeg

    def refusing_device(data, mode, device):
        if torch.device(device) == torch.device("cpu", 0):
            raise RuntimeError("this decoder does not take that JPEG")
        return real(data, mode=mode, device=device)

    spec = ImageSpec.from_processor(build_image_processor(64, None))
    transform = train_transform(spec, DataArguments())
    plan = JpegPlanCollate(transform, "image", "label", 1000, seed=7)(_examples(imagenet_sample_path, n=8))
    expected = DeviceJpegDecoder(transform, torch.device("cpu"))(plan)
    monkeypatch.setattr(device_jpeg, "decode_jpeg", refusing_device)
    got = DeviceJpegDecoder(transform, torch.device("cpu", 0))(plan)
    assert torch.equal(got.pixel_values, expected.pixel_values) and got.keys == expected.keys
    assert [b.split(" ")[0] for b in got.bad_keys] == [b.split(" ")[0] for b in expected.bad_keys]
    assert "huffman.jpg" in " ".join(got.bad_keys)


def test_decode_on_device_is_refused_for_pad_and_crop_training():
    from hf_vit.config import parse_config, validate
    from hf_vit.errors import UserError

    cfg = parse_config(["--model_preset", "vit_tiny_cifar", "--crop_padding", "4", "--decode_on_device", "true"])
    with pytest.raises(UserError, match="decode_on_device applies to random-resized-crop"):
        validate(cfg)


def test_pretraining_with_decode_on_device_takes_the_same_steps_and_losses(tmp_path, imagenet_sample_path):
    """run_pretrain.py on streamed ImageNet photos (2 loader workers, enhanced augmentation), with and without
    decode_on_device: the same examples and steps; the losses differ only by the crops the loader path decodes at a
    reduced DCT size (most of them at 32 px output)."""
    runs = {}
    for name, extra in (("loader", []), ("device", ["--decode_on_device", "true"])):
        out = tmp_path / name
        run_script(["run_pretrain.py", *PRETRAIN, *extra, "--output_dir", str(out)])
        runs[name] = [r["train_loss"] for r in json.loads((out / "log_history.json").read_text())
                      if "train_loss" in r]
        results = json.loads((out / "all_results.json").read_text())
        assert results["train_samples_seen"] == 192 and results["global_step"] == 6
    assert len(runs["device"]) == len(runs["loader"]) == 6
    assert runs["device"] == pytest.approx(runs["loader"], rel=2e-3)  # measured: within 7.5e-4
