"""Does pretraining help? The course report's experiment 2 at CPU scale, through the real training scripts.

    python benchmarks/pretrain_vs_scratch.py [--cifar ../shared/datasets/cifar10] [--labels_per_class 100]

1. Split CIFAR-10's classes in two halves of five: the *pretraining* classes (airplane, automobile, bird, cat, deer)
   and the *downstream* classes (dog, frog, horse, ship, truck).
2. Pretrain a small ViT with ``run_pretrain.py`` on every training image of the pretraining classes (~24.5k).
3. Fine-tune it with ``run_finetune.py --model_name_or_path <pretrained>`` on a few labelled images per downstream class
   (a new 5-class head; head LR x ``head_lr_multiplier``), and train the *same architecture from scratch* on the same
   images, for the same number of steps and with the same augmentation, schedule shape and batch. A linear probe
   (``--freeze_backbone true``, same data and steps) measures the pretrained features alone.
4. All are evaluated on the same held-out downstream images (never used for training by any run).

The datasets are built with ``datasets`` (filter, relabel, ``save_to_disk``) in a temporary folder; the scripts load
them like any local dataset. The last line printed is JSON with both accuracies. Nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import datasets

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
PRETRAIN_CLASSES = ["airplane", "automobile", "bird", "cat", "deer"]
DOWNSTREAM_CLASSES = ["dog", "frog", "horse", "ship", "truck"]


def subset(ds: datasets.Dataset, names: list[str], per_class: int | None, skip_per_class: int = 0) -> datasets.Dataset:
    """The examples of ``names`` (relabelled 0..k-1 with a k-class ClassLabel): per class, skip the first
    ``skip_per_class`` and keep the next ``per_class`` (all when None), in the dataset's (shuffled) order."""
    all_names = ds.features["label"].names
    wanted = {all_names.index(n): i for i, n in enumerate(names)}
    labels = ds["label"]
    seen = {c: 0 for c in wanted}
    keep = []
    for row, label in enumerate(labels):
        if label not in wanted:
            continue
        seen[label] += 1
        if seen[label] > skip_per_class and (per_class is None or seen[label] <= skip_per_class + per_class):
            keep.append(row)
    out = ds.select(keep)
    new_labels = [wanted[label] for label in out["label"]]
    out = out.remove_columns("label").add_column("label", new_labels)
    return out.cast_column("label", datasets.ClassLabel(names=names))


def build_datasets(cifar: str, work: Path, labels_per_class: int, eval_per_class: int,
                   pretrain_eval_per_class: int) -> dict[str, Path]:
    ds = datasets.load_dataset(cifar, split="train")
    # Pretraining: all images of the first five classes but a held-out few (to report the pretraining accuracy).
    pretrain = datasets.DatasetDict({
        "train": subset(ds, PRETRAIN_CLASSES, None, skip_per_class=pretrain_eval_per_class),
        "validation": subset(ds, PRETRAIN_CLASSES, pretrain_eval_per_class),
    })
    # Downstream: the first eval_per_class images of each other class are the test set, the next few the labels.
    downstream = datasets.DatasetDict({
        "train": subset(ds, DOWNSTREAM_CLASSES, labels_per_class, skip_per_class=eval_per_class),
        "validation": subset(ds, DOWNSTREAM_CLASSES, eval_per_class),
    })
    paths = {"pretrain": work / "data_pretrain", "downstream": work / "data_downstream"}
    pretrain.save_to_disk(str(paths["pretrain"]))
    downstream.save_to_disk(str(paths["downstream"]))
    for name, dd in (("pretrain", pretrain), ("downstream", downstream)):
        print(f"{name}: " + ", ".join(f"{split} {len(d)}" for split, d in dd.items()), flush=True)
    return paths


def run(script: str, args: list[str], log: Path, threads: int) -> dict:
    """Run a training script; returns its all_results.json. The full output goes to ``log``."""
    start = time.time()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env=env)
    if proc.returncode:
        raise SystemExit(f"{script} failed ({proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
    out = Path(args[args.index("--output_dir") + 1])
    results = json.loads((out / "all_results.json").read_text())
    results["wall_s"] = round(time.time() - start, 1)
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cifar", default=str(SHARED / "cifar10"))
    p.add_argument("--work_dir", default=None, help="Keep datasets and runs here (default: a temporary folder).")
    p.add_argument("--labels_per_class", type=int, default=100)
    p.add_argument("--eval_per_class", type=int, default=400)
    p.add_argument("--pretrain_epochs", type=float, default=4)
    p.add_argument("--pretrained_dir", default=None,
                   help="Reuse the pretrained model of an earlier run (its work_dir/pretrained) instead of pretraining.")
    p.add_argument("--finetune_epochs", type=float, default=20)
    p.add_argument("--pretrain_lr", type=float, default=1e-3)
    p.add_argument("--finetune_lr", type=float, default=3e-4)
    p.add_argument("--scratch_lr", type=float, default=1e-3)
    p.add_argument("--probe_lr", type=float, default=1e-3, help="Linear probe LR (x head_lr_multiplier on the head).")
    p.add_argument("--head_lr_multiplier", type=float, default=10)
    p.add_argument("--workers", type=int, default=2, help="Loader workers per run.")
    # One compute thread: on a small shared CPU, torch's default (one per core) oversubscribes the cores next to the
    # loader workers, and spinning threads made a step 2-3x slower in wall time on the 2-core machine.
    p.add_argument("--threads", type=int, default=1, help="torch compute threads per run (OMP_NUM_THREADS).")
    p.add_argument("--arch", nargs="*", default=["--image_size", "32", "--patch_size", "4", "--hidden_size", "128",
                                                 "--num_hidden_layers", "4", "--num_attention_heads", "4",
                                                 "--intermediate_size", "256"])
    a = p.parse_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="pretrain_vs_scratch_") if a.work_dir is None else None
    work = Path(a.work_dir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    data = build_datasets(a.cifar, work, a.labels_per_class, a.eval_per_class, pretrain_eval_per_class=100)

    common = ["--crop_padding", "4", "--augmentation", "basic", "--label_smoothing", "0.1", "--weight_decay", "0.05",
              "--eval_split", "validation", "--dataloader_num_workers", str(a.workers), "--report_to", "none",
              "--checkpointing_steps", "no", "--logging_steps", "20", "--overwrite_output_dir", "true",
              "--eval_steps", "1000000"]  # evaluate once, at the end
    if a.pretrained_dir:
        pretrained_dir = Path(a.pretrained_dir)
        pretrained = json.loads((pretrained_dir / "all_results.json").read_text())
        print(f"reusing {pretrained_dir}", flush=True)
    else:
        pretrained_dir = work / "pretrained"
        pretrained = run("run_pretrain.py", [
            "--dataset_name", str(data["pretrain"]), "--model_preset", "vit_tiny_cifar", *a.arch, *common,
            "--total_train_batch_size", "128", "--num_train_epochs", str(a.pretrain_epochs),
            "--learning_rate", str(a.pretrain_lr), "--warmup_epochs", "0.3", "--output_dir", str(pretrained_dir),
        ], work / "pretrain.log", a.threads)
    print(f"pretrained on {len(PRETRAIN_CLASSES)} classes ({pretrained['global_step']} steps): eval_accuracy "
          f"{pretrained['eval_accuracy']:.4f}", flush=True)

    # The same data, batch, epochs, warmup and augmentation for both; only the starting point (and its LR) differ.
    downstream = ["--dataset_name", str(data["downstream"]), *common, "--total_train_batch_size", "50",
                  "--num_train_epochs", str(a.finetune_epochs), "--warmup_epochs", str(a.finetune_epochs / 10)]
    finetuned = run("run_finetune.py", [
        *downstream, "--model_name_or_path", str(pretrained_dir), "--learning_rate", str(a.finetune_lr),
        "--head_lr_multiplier", str(a.head_lr_multiplier), "--output_dir", str(work / "finetuned"),
    ], work / "finetune.log", a.threads)
    print(f"fine-tuned from the checkpoint: eval_accuracy {finetuned['eval_accuracy']:.4f} ({finetuned['wall_s']} s)",
          flush=True)
    scratch = run("run_finetune.py", [
        *downstream, "--model_preset", "vit_tiny_cifar", *a.arch, "--learning_rate", str(a.scratch_lr),
        "--output_dir", str(work / "scratch"),
    ], work / "scratch.log", a.threads)
    print(f"from scratch: eval_accuracy {scratch['eval_accuracy']:.4f} ({scratch['wall_s']} s)", flush=True)
    probe = run("run_finetune.py", [
        *downstream, "--model_name_or_path", str(pretrained_dir), "--freeze_backbone", "true",
        "--learning_rate", str(a.probe_lr), "--head_lr_multiplier", str(a.head_lr_multiplier),
        "--output_dir", str(work / "probe"),
    ], work / "probe.log", a.threads)
    print(f"linear probe on the frozen pretrained backbone: eval_accuracy {probe['eval_accuracy']:.4f} "
          f"({probe['wall_s']} s)", flush=True)

    summary = {
        "date": date.today().isoformat(),
        "pretrain_classes": PRETRAIN_CLASSES, "downstream_classes": DOWNSTREAM_CLASSES,
        "labels_per_class": a.labels_per_class, "eval_images": finetuned["eval_samples"],
        "pretrain_eval_accuracy": pretrained["eval_accuracy"], "pretrain_steps": pretrained["global_step"],
        "finetune_steps": finetuned["global_step"], "scratch_steps": scratch["global_step"],
        "finetuned_eval_accuracy": finetuned["eval_accuracy"], "scratch_eval_accuracy": scratch["eval_accuracy"],
        "probe_eval_accuracy": probe["eval_accuracy"],
        "gain": round(finetuned["eval_accuracy"] - scratch["eval_accuracy"], 4),
        "pretraining_reused": bool(a.pretrained_dir), "wall_s": round(time.time() - start, 1),
    }
    print(f"\npretrained -> fine-tuned: {summary['finetuned_eval_accuracy']:.4f}   from scratch: "
          f"{summary['scratch_eval_accuracy']:.4f}   linear probe: {summary['probe_eval_accuracy']:.4f}   (chance 0.2000; {summary['eval_images']} held-out images of "
          f"{', '.join(DOWNSTREAM_CLASSES)}; {a.labels_per_class} labels per class)")
    print(json.dumps(summary))
    if tmp is not None:
        tmp.cleanup()
    return summary


if __name__ == "__main__":
    main()
