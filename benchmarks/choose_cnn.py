"""Choose ``cnn_tiny_cifar``: what candidate CNNs cost per training image and per CPU step, next to the CPU quick
recipe's ViT (``recipes/cifar10_vit_tiny_cpu.yaml``), and optionally how much each learns in the same number of steps.

    OMP_NUM_THREADS=1 python benchmarks/choose_cnn.py [--batch_size 128] [--steps 3] [--rounds 4] [--threads 1]
        [--precision no bf16] [--only NAME ...] [--memory]
        [--train_steps 380 --dataset ../shared/datasets/cifar10 --train_only NAME ...]

* Parameters (10 classes) and training GFLOP per image from ``hf_vit.models`` (``num_parameters``,
  ``training_flops_per_image``: 3 x the forward; FlopCounterMode on the meta device for the CNNs).
* CPU seconds per training step at ``--batch_size`` (process CPU time, steadier than wall-clock on a shared machine;
  wall-clock next to it): bench_train.py's bare loop (forward -> cross-entropy -> backward -> AdamW) on synthetic
  batches, ``--rounds`` rounds of ``--steps`` steps per candidate, the candidates' order rotated and reversed every
  round so background load hits all alike; the median over rounds. In bf16 on a CPU the ViT uses matmul attention,
  as the trainer does.
* ``--memory`` (instead of the above): ``hf_vit.models.estimate_training_memory`` next to the peak resident memory
  of two real training steps (a fresh process per model and precision: peak RSS minus the RSS before the model was
  built) for the models of ``MEMORY_CASES``, in fp32 and bf16 (Linux: reads /proc/self/status).
* ``--train_steps N``: a sanity check of what the architecture learns, not the pipeline's figure: each of
  ``--train_only`` trains N steps on real CIFAR-10 with a plain loop (``hf_vit.optim``'s AdamW groups and warmup +
  cosine schedule with the quick recipe's values, 2-px pad-and-crop + flip, bf16 autocast) and is evaluated on 1,000
  held-out training images; the same images, order and steps for every candidate.

The last line is JSON. The figures and the choice they led to: ``docs/models.md``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageClassification, ConvNextConfig, ResNetConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_vit.config import parse_config  # noqa: E402
from hf_vit.data import Batch  # noqa: E402
from hf_vit.models import build_config, num_parameters, training_flops_per_image  # noqa: E402

LABELS = [f"class_{i}" for i in range(10)]
QUICK_VIT = "quick_vit (recipe)"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _convnext(patch, widths, depths):
    return ConvNextConfig(image_size=32, patch_size=patch, num_stages=len(widths), hidden_sizes=widths, depths=depths)


def _resnet(layer_type, widths, depths, embedding):
    return ResNetConfig(image_size=32, layer_type=layer_type, hidden_sizes=widths, depths=depths,
                        embedding_size=embedding)


# ConvNeXt with a patch stem that fits 32 px (1, 2 or 4 px), and ResNets, whose 7x7-stride-2 + max-pool stem cannot
# be changed by config (8x8 left after it at 32 px). cnn_tiny_cifar itself (ConvNeXt, patch 4, 64-128-256, depths
# 2-2-2) is always timed; it was chosen from this list.
CANDIDATES = {
    "convnext_p1_16-32-64_d2": lambda: _convnext(1, [16, 32, 64], [2, 2, 2]),
    "convnext_p2_32-64-128_d2": lambda: _convnext(2, [32, 64, 128], [2, 2, 2]),
    "convnext_p2_64-128-256_d2": lambda: _convnext(2, [64, 128, 256], [2, 2, 2]),
    "convnext_p2_32-64-128-256_d1": lambda: _convnext(2, [32, 64, 128, 256], [1, 1, 1, 1]),
    "convnext_p2_48-96-192_d1": lambda: _convnext(2, [48, 96, 192], [1, 1, 1]),
    "convnext_p4_64-128-256_d3": lambda: _convnext(4, [64, 128, 256], [3, 3, 3]),
    "convnext_p4_96-192-384_d2": lambda: _convnext(4, [96, 192, 384], [2, 2, 2]),
    "resnet18_32px": lambda: _resnet("basic", [64, 128, 256, 512], [2, 2, 2, 2], 64),
    "resnet18_half_32px": lambda: _resnet("basic", [32, 64, 128, 256], [2, 2, 2, 2], 32),
}


def candidate_config(name: str):
    """The config of a candidate, of the ``cnn_tiny_cifar`` preset, or of the quick recipe's ViT, with 10 labels."""
    if name == QUICK_VIT:
        cfg = parse_config(["--config", str(REPO / "recipes" / "cifar10_vit_tiny_cpu.yaml")])
        return build_config(cfg.model, LABELS)
    if name == "cnn_tiny_cifar":
        return build_config(parse_config(["--model_preset", name]).model, LABELS)
    config = CANDIDATES[name]()
    config.update(dict(num_labels=10, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}))
    return config


def make_model(name: str, precision: str):
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(candidate_config(name))
    if precision != "no" and model.config.model_type == "vit":
        model.set_attn_implementation("eager")  # what the trainer does for bf16 on a CPU (docs/performance.md)
    return model


def _bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_candidates(names, precision, batch_size, steps, rounds, warmup, log=print) -> dict:
    """Median CPU and wall seconds per training step of each candidate (bench_train's bare loop and timer)."""
    bench = _bench_train()
    g = torch.Generator().manual_seed(0)
    batches = [Batch(torch.randint(0, 256, (batch_size, 3, 32, 32), generator=g, dtype=torch.uint8),
                     torch.randint(0, 10, (batch_size,), generator=g)) for _ in range(2)]
    device = torch.device("cpu")
    loops = {name: bench.BareLoop(make_model(name, precision), batches, precision, False, 1e-3, 0.05,
                                  torch.tensor(MEAN), torch.tensor(STD)) for name in names}
    for loop in loops.values():
        bench.time_steps(loop.step, warmup, device)
    cpu = {name: [] for name in names}
    wall = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order if r % 2 == 0 else order[::-1]:
            w, c = bench.time_steps(loops[name].step, steps, device)
            wall[name].append(w / steps)
            cpu[name].append(c / steps)
        log(f"  {precision} round {r}: " + ", ".join(f"{n} {statistics.median(cpu[n]):.3f}" for n in names))
    return {name: {"cpu_seconds_per_step": statistics.median(cpu[name]),
                   "wall_seconds_per_step": statistics.median(wall[name])} for name in names}


# (model, batch, image size) for --memory: the two CPU presets at the recipes' batch, and ResNet-50 / a 224-px ViT
# shrunk to sizes a CPU step can afford.
MEMORY_CASES = [(QUICK_VIT, 128, 32), ("cnn_tiny_cifar", 128, 32), ("resnet50", 16, 96),
                ("vit_small_patch16_224", 16, 112)]


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def peak_training_memory(name: str, batch_size: int, image_size: int, precision: str) -> dict:
    """Run in a fresh process: the estimate and the measured peak RSS of two training steps of ``name``."""
    from hf_vit.models import estimate_training_memory

    if name in CANDIDATES or name in (QUICK_VIT, "cnn_tiny_cifar"):
        config = candidate_config(name)
    else:
        config = build_config(parse_config(["--model_preset", name]).model, LABELS)
    config.image_size = image_size
    estimate = estimate_training_memory(config, batch_size, precision)
    pixels = torch.randn(batch_size, 3, image_size, image_size)
    labels = torch.randint(0, 10, (batch_size,))
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current RSS
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(config)
    if precision != "no" and model.config.model_type == "vit":
        model.set_attn_implementation("eager")
    optimizer = torch.optim.AdamW(model.parameters())
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "no"):
            logits = model(pixel_values=pixels).logits
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = _status_bytes("VmHWM") - before
    return {"model": name, "batch_size": batch_size, "image_size": image_size, "precision": precision,
            "estimate_bytes": estimate, "peak_rss_bytes": peak, "peak_over_estimate": peak / estimate}


def measure_memory(precisions, log=print) -> list[dict]:
    import subprocess

    rows = []
    for name, batch_size, image_size in MEMORY_CASES:
        for precision in precisions:
            proc = subprocess.run([sys.executable, __file__, "--memory_child", name, str(batch_size),
                                   str(image_size), precision], capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            log(f"  {name} batch {batch_size} at {image_size} px, {precision}: estimate "
                f"{rows[-1]['estimate_bytes'] / 2**20:.0f} MiB, peak RSS {rows[-1]['peak_rss_bytes'] / 2**20:.0f} MiB "
                f"({rows[-1]['peak_over_estimate']:.2f}x)")
    return rows


def load_cifar(folder: str, held_out: int = 1000):
    """(train images, train labels, held-out images, held-out labels) as uint8 (N, 3, 32, 32) / int64 tensors: every
    parquet file under ``folder`` decoded, and a fixed seeded permutation's last ``held_out`` images held out."""
    import pyarrow.parquet as pq
    from torchvision.io import decode_image

    images, labels = [], []
    for path in sorted(Path(folder).rglob("*.parquet")):
        table = pq.read_table(path)
        image_column = next(n for n in table.column_names if n != "label")
        for cell in table.column(image_column).to_pylist():
            images.append(decode_image(torch.frombuffer(bytearray(cell["bytes"]), dtype=torch.uint8), mode="RGB"))
        labels.extend(table.column("label").to_pylist())
    images, labels = torch.stack(images), torch.tensor(labels)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, val = order[:-held_out], order[-held_out:]
    return images[train], labels[train], images[val], labels[val]


def train_and_evaluate(name, data, train_steps, batch_size, log=print) -> dict:
    """Train ``name`` for ``train_steps`` steps with a plain loop; return held-out accuracy and seconds."""
    from torchvision.transforms import v2

    from hf_vit.config import TrainingArguments
    from hf_vit.optim import build_optimizer, build_scheduler, classification_loss

    train_x, train_y, val_x, val_y = data
    model = make_model(name, "bf16")
    args = TrainingArguments(learning_rate=1e-3, weight_decay=0.05, warmup_start_lr=1e-6, min_lr=1e-5)
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, train_steps, warmup_steps=max(1, train_steps // 34))
    augment = v2.Compose([v2.RandomCrop(32, padding=2, padding_mode="reflect"), v2.RandomHorizontalFlip()])
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)  # the augmentation draws: the same for every candidate
    order = torch.cat([torch.randperm(len(train_y), generator=g)
                       for _ in range(train_steps * batch_size // len(train_y) + 1)])
    start = time.perf_counter()
    model.train()
    for step in range(train_steps):
        idx = order[step * batch_size:(step + 1) * batch_size]
        pixels = torch.stack([augment(img) for img in train_x[idx]]).float().div(255).sub(mean).div(std)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(pixel_values=pixels).logits
        loss = classification_loss(logits, train_y[idx], 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == train_steps - 1:
            log(f"  {name} step {step}: loss {loss.item():.3f}")
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.cat([model(pixel_values=val_x[i:i + 500].float().div(255).sub(mean).div(std)).logits
                            for i in range(0, len(val_y), 500)])
    accuracy = (logits.argmax(-1) == val_y).float().mean().item()
    log(f"  {name}: held-out accuracy {accuracy:.3f} after {train_steps} steps ({seconds:.0f} s)")
    return {"held_out_accuracy": accuracy, "train_steps": train_steps, "train_seconds": seconds}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and candidate")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--precision", nargs="+", default=["no", "bf16"], choices=["no", "bf16"])
    parser.add_argument("--only", nargs="+", default=None, help="time only these candidates (the ViT always)")
    parser.add_argument("--memory", action="store_true", help="compare the memory estimate with real peak RSS")
    parser.add_argument("--memory_child", nargs=4, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--train_steps", type=int, default=0, help="accuracy check: steps per model (0: skip)")
    parser.add_argument("--train_only", nargs="+", default=[QUICK_VIT, "cnn_tiny_cifar"])
    parser.add_argument("--dataset", default=str(REPO.parent / "shared" / "datasets" / "cifar10"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        name, batch_size, image_size, precision = args.memory_child
        print(json.dumps(peak_training_memory(name, int(batch_size), int(image_size), precision)))
        return {}
    if args.memory:  # a mode of its own: the memory comparison only
        memory = measure_memory(args.precision)
        print(json.dumps({"benchmark": "choose_cnn --memory", "date": datetime.datetime.now().isoformat(
            timespec="seconds"), "torch": torch.__version__, "memory": memory}))
        return {"memory": memory}

    names = [QUICK_VIT, "cnn_tiny_cifar", *(args.only or CANDIDATES)]
    rows = {}
    for name in names:
        config = candidate_config(name)
        rows[name] = {"parameters": num_parameters(AutoModelForImageClassification.from_config(config)),
                      "training_gflop_per_image": training_flops_per_image(config) / 1e9}
    for precision in args.precision:
        for name, figures in time_candidates(names, precision, args.batch_size, args.steps, args.rounds,
                                             args.warmup).items():
            rows[name].update({f"{k}_{precision}": v for k, v in figures.items()})
    accuracy = {}
    if args.train_steps:
        data = load_cifar(args.dataset)
        accuracy = {name: train_and_evaluate(name, data, args.train_steps, args.batch_size)
                    for name in args.train_only}

    vit_cost = {p: rows[QUICK_VIT][f"cpu_seconds_per_step_{p}"] for p in args.precision}
    print("\n| model | params | training GFLOP / image | "
          + " | ".join(f"CPU s/step {p} (x ViT)" for p in args.precision) + " |")
    print("|---|---|---|" + "---|" * len(args.precision))
    for name, row in rows.items():
        cells = [f"{row[f'cpu_seconds_per_step_{p}']:.3f} ({row[f'cpu_seconds_per_step_{p}'] / vit_cost[p]:.2f})"
                 for p in args.precision]
        print(f"| {name} | {row['parameters'] / 1e6:.2f}M | {row['training_gflop_per_image']:.3f} | "
              + " | ".join(cells) + " |")
    for name, result in accuracy.items():
        print(f"{name}: {result['held_out_accuracy']:.1%} held-out after {result['train_steps']} steps "
              f"({result['train_seconds']:.0f} s)")
    result = {"benchmark": "choose_cnn", "batch_size": args.batch_size, "threads": args.threads,
              "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "models": rows, "accuracy": accuracy}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
