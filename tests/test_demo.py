"""`make demo` offline with no local copy still trains, on generated data, and says so plainly."""

from __future__ import annotations

import json

import hf_vit.demo as demo
from hf_vit.config import parse_config
from hf_vit.data import load_splits


def test_demo_falls_back_to_generated_data_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "LOCAL_COPIES", [])
    out = tmp_path / "demo"
    demo.main(["--dataset_name", "no-such-user/no-such-dataset", "--output_dir", str(out),
               "--max_train_steps", "4", "--warmup_epochs", "0", "--hidden_size", "48", "--num_hidden_layers", "1",
               "--intermediate_size", "96"])
    printed = capsys.readouterr().out
    assert "GENERATED 10-class stripes dataset" in printed and "says nothing about CIFAR-10" in printed
    assert "final eval accuracy" in printed
    results = json.loads((out / "all_results.json").read_text())
    assert results["global_step"] == 4
    # Evaluated on the recipe's validation carve-out of the generated data, every image of it.
    cfg = parse_config(["--config", str(demo.RECIPE), "--dataset_name", f"{out}_synthetic_data"])
    held_out = load_splits(cfg.data).num_eval_examples
    assert held_out > 100 and results["eval_samples"] == held_out
    assert f"final eval accuracy {results['eval_accuracy']:.4f} on {held_out} held-out images" in printed


def test_demo_prefers_a_local_copy_when_the_hub_is_unreachable(tmp_path, monkeypatch, capsys, cifar10_path):
    monkeypatch.setattr(demo, "LOCAL_COPIES", [cifar10_path])
    out = tmp_path / "demo"
    demo.main(["--dataset_name", "no-such-user/no-such-dataset", "--output_dir", str(out), "--max_train_steps", "2",
               "--warmup_epochs", "0", "--hidden_size", "48", "--num_hidden_layers", "1", "--intermediate_size", "96",
               "--train_val_split", "0.002"])
    printed = capsys.readouterr().out
    assert f"the local CIFAR-10 copy at {cifar10_path}" in printed
