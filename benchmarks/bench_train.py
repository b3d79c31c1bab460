"""Images/s and TFLOP/s of the pipeline's own training step, next to a bare loop, measured in the same run.

    python benchmarks/bench_train.py --preset vit_tiny_cifar --batch_size 128 [--steps 5] [--rounds 6]
        [--device cpu|cuda] [--mixed_precision no|bf16|fp16] [--torch_compile] [--peak_tflops 790]
        [any run flag, e.g. --hidden_size 128 --max_grad_norm 1.0 --label_smoothing 0.1]

* ``pipeline``: ``hf_vit.trainer.Run.train_step`` — the trainer's own step (uint8 -> normalise on the device, forward
  under accelerate's autocast, its loss, backward, the loss and accuracy sums kept on the device, gradient clipping,
  the non-finite check and fused AdamW with its parameter groups (the skip decided on the device), the LR scheduler),
  on a ``Run`` built from a ``RunConfig`` like any training run. The loop reads the step's sums once per logging
  window, outside this method (``Run._count``): not timed here.
* ``bare``: the same model (a copy of the same initial weights) in the shortest loop that trains it:
  ``model(pixel_values).logits`` -> cross-entropy -> backward -> ``torch.optim.AdamW`` step (fused, the kernel the
  pipeline uses), on float pixels already normalised.

Data is already in memory on the device (synthetic uint8 batches), so the figure is the step alone; the data path is
``benchmarks/bench_data.py``'s. After ``--warmup`` steps of each, ``--rounds`` rounds time ``--steps`` steps of each,
alternating which goes first (ABBA), so that load from other work on the machine hits both alike; the ratio reported
is the median over rounds of the per-round ratio. The process CPU seconds per step are reported too: on a shared CPU
they move much less with other people's load than wall-clock figures do. FLOPs come from ``hf_vit.models.training_flops_per_image`` (3 x the
forward). The last line is JSON.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The default peak for MFU on CUDA: the measured bf16 dense matmul ceiling of an H200 (issue 9).
H200_BF16_PEAK_TFLOPS = 790.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit_tiny_cifar", help="hf_vit model preset")
    parser.add_argument("--batch_size", type=int, default=128, help="images per step (one process, no accumulation)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round, for each loop")
    parser.add_argument("--rounds", type=int, default=6, help="alternating timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each loop first")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default=None,
                        help="default: bf16 on CUDA, no on CPU")
    parser.add_argument("--torch_compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--num_labels", type=int, default=None, help="classes (default: 1000 at 224 px, else 10)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help=f"peak for MFU (default: {H200_BF16_PEAK_TFLOPS:g}, an H200's bf16, on CUDA; none on CPU)")
    parser.add_argument("--skip_bare", action="store_true", help="time the pipeline only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after timing, profile this many pipeline steps and print where the time goes")
    return parser.parse_known_args(argv)


def synthetic_dataset(folder: str, num_labels: int, rows: int) -> str:
    """A small saved image dataset, so that a ``Run`` builds as for real data (its images are never trained on)."""
    import datasets
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(rows)]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"class_{i}" for i in range(num_labels)])})
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % num_labels for i in range(rows)]},
                                    features=features)
    path = os.path.join(folder, "synthetic")
    datasets.DatasetDict({"train": ds}).save_to_disk(path)
    return path


def build_run(preset: str, batch_size: int, mixed_precision: str, torch_compile: bool, num_labels: int,
              workdir: str, extra: list[str] | None = None):
    """A ``hf_vit.trainer.Run`` configured as a training run of ``preset`` (plus any run flags in ``extra``)."""
    from hf_vit.config import parse_config
    from hf_vit.trainer import Run

    data = synthetic_dataset(workdir, num_labels, rows=batch_size)
    argv = ["--model_preset", preset, "--dataset_name", data, "--train_val_split", "0",
            "--total_train_batch_size", str(batch_size), "--max_train_steps", "1000000",
            "--mixed_precision", mixed_precision, "--dataloader_num_workers", "0", "--report_to", "none",
            "--checkpointing_steps", "no", "--output_dir", os.path.join(workdir, "run"), *(extra or [])]
    if torch_compile:
        argv.append("--torch_compile")
    return Run(parse_config(argv))


def synthetic_batches(run, batch_size: int, count: int = 4):
    """``count`` distinct uint8 batches on the device, shaped like the trainer's loader output."""
    import torch

    from hf_vit.data import Batch

    size = run.spec.image_size
    g = torch.Generator().manual_seed(0)
    device = run.accelerator.device
    return [Batch(torch.randint(0, 256, (batch_size, 3, size, size), generator=g, dtype=torch.uint8).to(device),
                  torch.randint(0, len(run.label_names), (batch_size,), generator=g).to(device),
                  num_examples=batch_size) for _ in range(count)]


class BareLoop:
    """model(pixel_values).logits -> cross-entropy -> backward -> AdamW step, nothing else."""

    def __init__(self, model, batches, mixed_precision: str, torch_compile: bool, lr: float, weight_decay: float,
                 mean, std):
        import torch

        self.device = next(model.parameters()).device
        self.model = model
        # Fused on the CPU too, as the pipeline's (hf_vit.optim.build_optimizer): the ratio then measures what the
        # pipeline's step adds, not which AdamW kernel each loop happens to use.
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
        if torch_compile:
            self.model = torch.compile(model)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
        self.autocast = dict(device_type=self.device.type, dtype=dtype, enabled=dtype is not None)
        # Float pixels already normalised: the bare loop does no data work at all.
        self.batches = [((b.pixel_values.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1),
                         b.labels) for b in batches]
        self.i = 0

    def step(self):
        import torch

        pixels, labels = self.batches[self.i % len(self.batches)]
        self.i += 1
        with torch.autocast(**self.autocast):
            logits = self.model(pixel_values=pixels).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, n: int, device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds for ``n`` calls of ``step`` (device work included)."""
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def measure(preset: str, batch_size: int, steps: int = 5, rounds: int = 6, warmup: int = 2,
            mixed_precision: str = "no", torch_compile: bool = False, num_labels: int | None = None,
            peak_tflops: float | None = None, skip_bare: bool = False, extra: list[str] | None = None,
            profile_steps: int = 0, log=print) -> dict:
    """Time the pipeline's step and the bare loop (interleaved); returns the figures as a dict."""
    import itertools

    import torch

    from hf_vit.models import PRESETS, training_flops_per_image

    if num_labels is None:
        num_labels = 1000 if PRESETS.get(preset, {}).get("image_size", 32) >= 224 else 10
    with tempfile.TemporaryDirectory() as workdir:
        run = build_run(preset, batch_size, mixed_precision, torch_compile, num_labels, workdir, extra)
        device = run.accelerator.device
        config = run.accelerator.unwrap_model(run.model).config
        flops = training_flops_per_image(config)
        batches = synthetic_batches(run, batch_size)
        stream = itertools.cycle(batches)
        loops = {"pipeline": lambda: run.train_step(stream)}
        if not skip_bare:
            # A copy of the same initial weights; the original model object may be wrapped by accelerate/compile.
            bare_model = copy.deepcopy(run.accelerator.unwrap_model(run.model))
            bare_model = getattr(bare_model, "_orig_mod", bare_model)
            bare = BareLoop(bare_model, batches, mixed_precision, torch_compile, run.cfg.train.learning_rate,
                            run.cfg.train.weight_decay, run.mean, run.std)
            loops["bare"] = bare.step
        log(f"{preset}: {flops / 1e9:.3f} GFLOP per training image, batch {batch_size}, {device}, "
            f"mixed_precision={mixed_precision}, torch_compile={torch_compile}, torch threads "
            f"{torch.get_num_threads()}")
        compile_seconds = {}
        for name, step in loops.items():
            compile_seconds[name] = time_steps(step, warmup, device)[0]  # includes compilation when compiling
        seconds = {name: [] for name in loops}
        cpu_seconds = {name: [] for name in loops}
        names = list(loops)
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                wall, cpu = time_steps(loops[name], steps, device)
                seconds[name].append(wall)
                cpu_seconds[name].append(cpu)
            log("  round %d: %s" % (r, ", ".join(f"{n} {batch_size * steps / seconds[n][-1]:.1f} img/s"
                                                  for n in names)))
        profile = where_the_time_goes(loops["pipeline"], profile_steps, device, log) if profile_steps else None
    result = {"benchmark": "bench_train", "preset": preset, "batch_size": batch_size, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or platform.machine(),
              "mixed_precision": mixed_precision, "torch_compile": torch_compile, "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "num_labels": num_labels,
              "extra_args": extra or [], "gflop_per_image": flops / 1e9, "steps_per_round": steps, "rounds": rounds,
              "warmup_seconds": compile_seconds, "date": datetime.datetime.now().isoformat(timespec="seconds")}
    for name in names:
        per_round = [batch_size * steps / s for s in seconds[name]]
        ips = statistics.median(per_round)
        result[f"{name}_images_per_sec"] = ips
        result[f"{name}_images_per_sec_rounds"] = per_round
        result[f"{name}_tflops"] = ips * flops / 1e12
        # CPU seconds the process spent per step (all threads): on a shared CPU the steadier figure of the two.
        result[f"{name}_cpu_seconds_per_step"] = statistics.median(cpu_seconds[name]) / steps
        if peak_tflops:
            result[f"{name}_mfu"] = ips * flops / 1e12 / peak_tflops
    if not skip_bare:
        # Paired per round: the two loops of a round ran under the same background load.
        result["ratio_pipeline_to_bare"] = statistics.median(b / p for p, b in zip(seconds["pipeline"],
                                                                                   seconds["bare"]))
        result["cpu_time_ratio_pipeline_to_bare"] = statistics.median(
            b / p for p, b in zip(cpu_seconds["pipeline"], cpu_seconds["bare"]))
    if peak_tflops:
        result["peak_tflops"] = peak_tflops
    if profile:
        result["profile_top_ops"] = profile
    return result


def where_the_time_goes(step, steps: int, device, log, top: int = 12) -> list[dict]:
    """Profile ``steps`` calls of ``step`` with torch.profiler; log and return the ops with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1.0
    rows = [{"op": e.key, "share": getattr(e, attr) / total, "ms_per_step": getattr(e, attr) / 1e3 / steps,
             "calls_per_step": e.count / steps} for e in events[:top]]
    log(f"  where a pipeline step's {'GPU' if device.type == 'cuda' else 'CPU'} time goes ({steps} steps profiled):")
    for row in rows:
        log(f"    {row['share']:6.1%} {row['ms_per_step']:9.2f} ms/step {row['calls_per_step']:6.0f} calls  {row['op']}")
    return rows


def summary(result: dict) -> str:
    lines = []
    for name in ("pipeline", "bare"):
        if f"{name}_images_per_sec" in result:
            mfu = f", MFU {result[f'{name}_mfu']:.1%}" if f"{name}_mfu" in result else ""
            lines.append(f"{name:>8}: {result[f'{name}_images_per_sec']:9.1f} img/s  "
                         f"{result[f'{name}_tflops']:8.3f} TFLOP/s{mfu}  "
                         f"({result[f'{name}_cpu_seconds_per_step']:.3f} CPU s/step)")
    if "ratio_pipeline_to_bare" in result:
        lines.append(f"   ratio: pipeline / bare = {result['ratio_pipeline_to_bare']:.3f} (median of per-round ratios; "
                     f"by CPU time {result['cpu_time_ratio_pipeline_to_bare']:.3f})")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args, extra = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA: accelerate then picks the CPU
    import torch

    from hf_vit.errors import UserError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cuda = torch.cuda.is_available()
    mixed_precision = args.mixed_precision or ("bf16" if on_cuda else "no")
    peak = args.peak_tflops or (H200_BF16_PEAK_TFLOPS if on_cuda else None)
    result = measure(args.preset, args.batch_size, args.steps, args.rounds, args.warmup, mixed_precision,
                     args.torch_compile, args.num_labels, peak, args.skip_bare, extra, args.profile)
    print(summary(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    from hf_vit.errors import run_cli

    run_cli(main)
