"""The prepared GPU check (run it through ``benchmarks/gpu_check.sh CIFAR_DIR``): one call, at most 9 minutes.

(a) ViT-B/16 at 224, bf16, synthetic uint8 batches already on the GPU: images/s, TFLOP/s and MFU of the trainer's own
    step (``Run.train_step``) eager — next to the bare loop, with a profile of two steps — and with ``torch_compile``
    (run last: its compilation time is the least predictable).
(b) ``vit_small_cifar`` on CIFAR-10 from scratch with the seed's settings (``recipes/cifar10_vit_small_scratch.yaml``:
    200-epoch schedule, batch 512, enhanced augmentation, bf16) and ``data_on_device``, for ``--train_seconds``: seconds
    per epoch (train and eval apart) and validation accuracy per epoch, and the 200 epochs projected from them (the
    training time is cut when needed to keep the whole check within 9 minutes). The
    run is stopped through the trainer's own preemption path (flag set -> finish the step, save, return).
(d) ``studies/report_scale.yaml`` planned from (a)'s measured throughput: each run's plan and its GPU-hours on 1 and 8
    GPUs (``hf_vit.plan``), with ``throughput.json`` beside the results for later plans to use.
(c) With ``--imagenet_dir`` (e.g. a copy of ../shared/datasets/imagenet-sample): ``decode_on_device`` on the ImageNet
    photos — images/s of the GPU's share (nvJPEG batched decode, crop, antialiased resize and flip to 224 px, basic and
    enhanced augmentation), next to the loader worker's share per CPU core, so that how many cores one GPU needs can
    be read off. Skipped, and said, without the folder.

Results go to ``benchmarks/results/gpu_check_<date>.json`` (after each part, so a time-out keeps what was measured)
and a short table is printed. ``--dry-run`` runs the same code on the CPU with a tiny model, a CIFAR slice and a few
steps (< 2 minutes; one thread; ``torch.compile`` with the ``aot_eager`` backend), writing ``gpu_check_dry_run_<date>.json`` to a temporary folder unless ``--results_dir`` is given.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

PROCESS_START = time.perf_counter()  # before the heavy imports: the shell's time limit counts them too

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SMALL_RECIPE = REPO / "recipes" / "cifar10_vit_small_scratch.yaml"
HARD_LIMIT_SECONDS = 540  # gpu_check.sh's timeout: 9 minutes
B_OVERHEAD_SECONDS = 45  # (b) outside its training time: load, decode, build, the last eval, saving
COMPILE_RESERVE_SECONDS = 150  # (a) compiled: compiling ViT-B/16 forward and backward, then timing it
C_RESERVE_SECONDS = 40  # (c): loading 1,000 photos, planning and decoding them twice
TINY_MODEL = ["--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "2",
              "--intermediate_size", "128"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cifar_dir", help="CIFAR-10 parquet folder (Hub layout, e.g. a copy of uoft-cs/cifar10)")
    parser.add_argument("--dry-run", dest="dry_run", action="store_true",
                        help="CPU, tiny model, a CIFAR slice, a few steps: checks the script itself")
    parser.add_argument("--parts", default="a,b,c,d", help="which parts to run, comma-separated: a, b, c, d")
    parser.add_argument("--imagenet_dir", default=None,
                        help="ImageNet-style parquet folder for part (c), e.g. a copy of "
                             "../shared/datasets/imagenet-sample")
    parser.add_argument("--train_seconds", type=float, default=None,
                        help="training time of part (b) (default 300; 10 with --dry-run)")
    parser.add_argument("--vit_b_batch_size", type=int, default=256, help="batch of part (a)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="peak for MFU (default: 790, H200 bf16)")
    parser.add_argument("--small_compile", action="store_true", help="torch_compile the small ViT in part (b)")
    parser.add_argument("--results_dir", default=None, help="where the JSON goes (default benchmarks/results)")
    return parser.parse_args(argv)


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "hostname": platform.node()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    gpu_count=torch.cuda.device_count())
    return info


# ---------------------------------------------------------------------------------------------------- part (a)
def part_a(args, compiled: bool, log) -> dict:
    """ViT-B/16 throughput of the trainer's step: eager (with the bare loop and a profile) or compiled."""
    import gc

    import torch
    from bench_train import H200_BF16_PEAK_TFLOPS, measure

    if args.dry_run:
        preset, batch, extra, steps, rounds, peak, mp = "vit_tiny_cifar", 16, TINY_MODEL, 2, 2, 1.0, "no"
    else:
        preset, batch, extra, steps, rounds = "vit_base_patch16_224", args.vit_b_batch_size, [], 10, 4
        peak, mp = args.peak_tflops or H200_BF16_PEAK_TFLOPS, "bf16"
    log(f"(a) {preset} {'compiled' if compiled else 'eager'}")
    try:
        out = measure(preset, batch, steps=steps, rounds=rounds, warmup=3, mixed_precision=mp,
                      torch_compile=compiled, peak_tflops=peak, skip_bare=compiled, extra=extra,
                      profile_steps=0 if compiled else 2, log=lambda line: log("    " + line))
    except Exception as err:  # keep the other measurements; the error is part of the record
        out = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        log(f"    failed: {out['error']}")
    gc.collect()
    if torch.cuda.is_available():
        out["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


# ---------------------------------------------------------------------------------------------------- part (c)
def part_c(args, log) -> dict:
    """decode_on_device's two shares on the ImageNet photos: the worker's (bytes + crop plan, per CPU core) and the
    device's (batched decode, crop, resize, flip; plus TrivialAugmentWide and RandomErasing when enhanced)."""
    import datasets
    import torch

    from hf_vit.config import DataArguments
    from hf_vit.data import ImageSpec, build_image_processor, train_transform
    from hf_vit.data.device_jpeg import DeviceJpegDecoder, JpegPlanCollate

    device = torch.device("cpu" if args.dry_run else "cuda")
    ds = datasets.load_dataset(args.imagenet_dir, split="train")
    image_col = "image" if "image" in ds.column_names else "img"
    ds = ds.cast_column(image_col, datasets.Image(decode=False))
    if args.dry_run:
        ds = ds.select(range(min(64, len(ds))))
    examples = [dict(row) for row in ds]
    batch, out = 32 if args.dry_run else 256, {"images": len(examples), "device": str(device)}
    spec = ImageSpec.from_processor(build_image_processor(224, None))
    for augmentation in ("basic", "enhanced"):
        transform = train_transform(spec, DataArguments(augmentation=augmentation))
        collate = JpegPlanCollate(transform, image_col, "label", 1000, seed=0)
        decoder = DeviceJpegDecoder(transform, device)
        start = time.process_time()
        plans = [collate(examples[i:i + batch]) for i in range(0, len(examples), batch)]
        worker = len(examples) / (time.process_time() - start)
        decoder(plans[0])  # warm-up: CUDA context, nvJPEG handles, kernels
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for plan in plans:
            decoded = decoder(plan)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = len(examples) / (time.perf_counter() - start)
        assert decoded.pixel_values.shape[1:] == (3, 224, 224)
        out[augmentation] = {"worker_images_per_sec_per_core": round(worker, 1),
                             "device_images_per_sec": round(rate, 1)}
        log(f"(c) {augmentation}: worker {worker:.0f} img/s per core, device {rate:.0f} img/s")
    return out


# ---------------------------------------------------------------------------------------------------- part (b)
def _has_split(cifar_dir: str, split: str) -> bool:
    import datasets

    try:
        return split in datasets.load_dataset_builder(cifar_dir).config.data_files
    except Exception:
        return False


def part_b(args, workdir: str, log) -> dict:
    """vit_small_cifar from scratch with data_on_device, stopped after ``train_seconds`` of training."""
    from hf_vit.config import parse_config
    from hf_vit.trainer import Run

    eval_split = "test" if _has_split(args.cifar_dir, "test") else ""
    argv = ["--config", str(SMALL_RECIPE), "--dataset_name", args.cifar_dir, "--eval_split", eval_split,
            "--data_on_device", "--dataloader_num_workers", "4", "--per_device_eval_batch_size", "1000",
            "--output_dir", os.path.join(workdir, "small"), "--checkpointing_steps", "no", "--report_to", "none",
            "--logging_steps", "50"]
    if args.small_compile:
        argv.append("--torch_compile")
    if args.dry_run:
        argv += [*TINY_MODEL, "--max_train_samples", "512", "--max_eval_samples", "128",
                 "--total_train_batch_size", "32", "--mixed_precision", "no", "--dataloader_num_workers", "0"]
    cfg = parse_config(argv)
    marks, deadline = [], [float("inf")]

    class TimedRun(Run):
        """Records when each evaluation (the end of each epoch) starts and ends, and past the deadline raises the
        flag a SIGTERM would raise (the loop then finishes the step, saves and returns); nothing else changes."""

        def train_step(self, batches, preemption=None):
            if preemption is not None and time.perf_counter() > deadline[0]:
                preemption.requested = True
            return super().train_step(batches, preemption)

        def _evaluate(self):
            start = time.perf_counter()
            metrics = super()._evaluate()
            marks.append({"step": self.state.global_step, "eval_start": start, "eval_end": time.perf_counter(),
                          "eval_accuracy": metrics["accuracy"]})
            return metrics

    setup_start = time.perf_counter()
    run = TimedRun(cfg)
    setup_seconds = time.perf_counter() - setup_start
    log(f"(b) vit_small_cifar: setup (load, decode {run.data.num_train_examples} images onto "
        f"{run.accelerator.device}, build) {setup_seconds:.1f} s; {run.steps_per_epoch} steps/epoch; "
        f"training for {args.train_seconds:.0f} s")
    fit_start = time.perf_counter()
    deadline[0] = fit_start + args.train_seconds
    results = run.fit()
    fit_seconds = time.perf_counter() - fit_start
    epochs, previous_end = [], fit_start
    for i, mark in enumerate(marks):
        if mark["step"] % run.steps_per_epoch:
            continue  # a final evaluation after an interruption, not an epoch boundary
        epochs.append({"epoch": mark["step"] // run.steps_per_epoch, "step": mark["step"],
                       "train_seconds": mark["eval_start"] - previous_end,
                       "eval_seconds": mark["eval_end"] - mark["eval_start"],
                       "seconds": mark["eval_end"] - previous_end, "eval_accuracy": mark["eval_accuracy"]})
        previous_end = mark["eval_end"]
    for e in epochs:
        log(f"    epoch {e['epoch']:3d}: {e['seconds']:6.2f} s (train {e['train_seconds']:.2f}, eval "
            f"{e['eval_seconds']:.2f}), eval_accuracy {e['eval_accuracy']:.4f}")
    steady = epochs[1:] or epochs  # the first epoch carries warm-up (kernel selection, compilation)
    out = {"config": cfg.to_dict(), "setup_seconds": setup_seconds, "fit_seconds": fit_seconds,
           "steps_per_epoch": run.steps_per_epoch, "train_examples": run.data.num_train_examples,
           "eval_split": eval_split or f"train_val_split={cfg.data.train_val_split}",
           "eval_examples": run.data.num_eval_examples, "epochs": epochs,
           "stopped_by_time": bool(results.get("preempted")), "global_step": run.state.global_step}
    if steady:
        per_epoch = sorted(e["seconds"] for e in steady)[len(steady) // 2]
        per_epoch_train = sorted(e["train_seconds"] for e in steady)[len(steady) // 2]
        out.update(median_epoch_seconds=per_epoch, median_epoch_train_seconds=per_epoch_train,
                   projected_seconds_for_num_train_epochs=per_epoch * cfg.train.num_train_epochs,
                   num_train_epochs=cfg.train.num_train_epochs,
                   train_images_per_sec=run.steps_per_epoch * cfg.train.total_train_batch_size / per_epoch_train)
    return out


# ------------------------------------------------------------------------------------------------------- driver
def table(result: dict) -> str:
    lines = ["", f"GPU check {result['date']} on {result['machine'].get('gpu', 'CPU (dry run)')}"]
    for name, r in result.get("a", {}).items():
        if "error" in r:
            lines.append(f"  (a) {name:8s} error: {r['error'][:100]}")
            continue
        mfu = f"  MFU {r['pipeline_mfu']:.1%}" if "pipeline_mfu" in r else ""
        bare = f"  (bare loop {r['bare_images_per_sec']:.0f} img/s, ratio {r['ratio_pipeline_to_bare']:.3f})" \
            if "bare_images_per_sec" in r else ""
        lines.append(f"  (a) {r['preset']} {name:8s} {r['pipeline_images_per_sec']:8.0f} img/s  "
                     f"{r['pipeline_tflops']:7.1f} TFLOP/s{mfu}{bare}")
    b = result.get("b")
    if b and "error" in b:
        lines.append(f"  (b) error: {b['error'][:200]}")
    elif b:
        for e in b["epochs"]:
            lines.append(f"  (b) epoch {e['epoch']:3d}  {e['seconds']:6.2f} s  eval_accuracy {e['eval_accuracy']:.4f}")
        if "median_epoch_seconds" in b:
            lines.append(f"  (b) median {b['median_epoch_seconds']:.2f} s/epoch -> {b['num_train_epochs']:g} epochs in "
                         f"{b['projected_seconds_for_num_train_epochs'] / 60:.1f} min "
                         f"({b['train_images_per_sec']:.0f} train img/s)")
    c = result.get("c")
    if c and "error" in c:
        lines.append(f"  (c) error: {c['error'][:200]}")
    elif c:
        for augmentation in ("basic", "enhanced"):
            r = c[augmentation]
            lines.append(f"  (c) decode_on_device {augmentation:8s} device {r['device_images_per_sec']:8.0f} img/s, "
                         f"worker {r['worker_images_per_sec_per_core']:8.0f} img/s per core")
    return "\n".join(lines)


REQUIRED_MODULES = ("torch", "torchvision", "transformers", "accelerate", "datasets", "evaluate", "PIL", "yaml",
                    "safetensors")


# ---------------------------------------------------------------------------------------------------- part (d)
def part_d(args, result: dict, results_dir: Path, log) -> dict:
    """studies/report_scale.yaml planned from the throughput part (a) just measured: every run's plan (steps, data
    used, reads, checkpoints) and its GPU-hours on 1 and 8 GPUs. The ViT-B/16 runs use the measured images/s, the
    others their FLOPs at the measured sustained TFLOP/s. CIFAR-10 is this check's folder; ImageNet-1k, unreachable
    here, is planned from its recorded metadata (hf_vit.rehearsal)."""
    import hf_vit.plan as plan

    timed = [m for m in (result.get("a", {}).get("compiled"), result.get("a", {}).get("eager"))
             if m and "pipeline_images_per_sec" in m]
    if not timed:
        return {"error": "part (a) measured no throughput: nothing to plan from"}
    best = max(timed, key=lambda m: m["pipeline_images_per_sec"])
    preset, size = ("vit_tiny_cifar", 32) if args.dry_run else ("vit_base_patch16_224", 224)
    record = {"model_preset": preset, "image_size": size, "device": result["machine"].get("gpu", "cpu"),
              "train_images_per_second_per_gpu": best["pipeline_images_per_sec"],
              "train_tflops_per_gpu": best["pipeline_tflops"], "date": result["date"],
              "source": "benchmarks/gpu_check.py part (a), the trainer's step, synthetic batches on the device"}
    path = results_dir / "throughput.json"
    path.write_text(json.dumps([record], indent=1))
    previous, plan.THROUGHPUT_FILE = plan.THROUGHPUT_FILE, path
    try:
        return _plan_report_scale(args, record, plan, log)
    finally:
        plan.THROUGHPUT_FILE = previous


def _plan_report_scale(args, record: dict, plan, log) -> dict:
    from hf_vit.study_file import load_study

    log(f"(d) planning studies/report_scale.yaml from {record['train_images_per_second_per_gpu']:.0f} img/s per GPU")
    sets = [f"cifar10.dataset_name={args.cifar_dir}", "cifar10.eval_split="]
    out = {"throughput": record}
    with tempfile.TemporaryDirectory() as tmp:
        study = load_study(str(REPO / "studies" / "report_scale.yaml"), tmp, sets)
        for gpus in (1, 8):
            table_text = plan.plan_study_table(study, processes=gpus)
            out[f"table_{gpus}_gpu"] = table_text
            log(f"(d) on {gpus} GPU(s):\n{table_text}")
    return out


def main(argv=None) -> dict:
    import importlib.util

    args = parse_args(argv)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    from hf_vit.errors import UserError

    # Say at once what the machine lacks, rather than failing minutes in (there is no network to install from).
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"this Python ({sys.executable}) lacks {missing}; install them from local wheels "
                        "(pip install --no-index --find-links DIR ...) or set PYTHON to an environment that has them")

    if not os.path.isdir(args.cifar_dir):
        raise UserError(f"CIFAR-10 folder {args.cifar_dir!r} does not exist; pass the parquet folder "
                        "(e.g. a copy of ../shared/datasets/cifar10)")
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"a", "b", "c", "d"}:
        raise UserError(f"--parts {args.parts!r}: choose from a, b, c, d (comma-separated)")
    if args.imagenet_dir is not None and not os.path.isdir(args.imagenet_dir):
        raise UserError(f"ImageNet folder {args.imagenet_dir!r} does not exist; pass the parquet folder "
                        "(e.g. a copy of ../shared/datasets/imagenet-sample) or leave --imagenet_dir out")
    if args.train_seconds is None:
        args.train_seconds = 10.0 if args.dry_run else 300.0
    import torch

    if args.dry_run:
        # One thread: on a shared CPU two threads per process can run 10x slower than one (they wait on each other).
        torch.set_num_threads(1)
        # Compile through dynamo and AOTAutograd (what fails when compilation fails) but without inductor's C++
        # code generation, which alone takes minutes on 2 CPU cores; the GPU run uses the default inductor.
        torch.compile = functools.partial(torch.compile, backend="aot_eager")
    if not args.dry_run and not torch.cuda.is_available():
        raise UserError("no CUDA device is visible; run with --dry-run to check the script on a CPU")
    stamp = datetime.datetime.now()
    results_dir = Path(args.results_dir or (tempfile.mkdtemp(prefix="gpu_check_") if args.dry_run
                                            else REPO / "benchmarks" / "results"))
    results_dir.mkdir(parents=True, exist_ok=True)
    name = f"gpu_check{'_dry_run' if args.dry_run else ''}_{stamp:%Y-%m-%d_%H%M}.json"
    path = results_dir / name
    result = {"date": stamp.isoformat(timespec="seconds"), "dry_run": args.dry_run, "machine": machine(),
              "command": " ".join(sys.argv), "cifar_dir": args.cifar_dir}
    started = PROCESS_START

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {line}", flush=True)

    def save() -> None:
        result["wall_seconds"] = time.perf_counter() - started
        path.write_text(json.dumps(result, indent=1))

    log(f"machine: {result['machine']}")
    # Order: (a) eager, (b), then (a) compiled — compilation is the least predictable in time, so it goes last and
    # whatever it leaves unfinished at the hard limit, the other two are already saved.
    if "a" in parts:
        result["a"] = {"eager": part_a(args, compiled=False, log=log)}
        save()
    if "b" in parts:
        if not args.dry_run:
            left = HARD_LIMIT_SECONDS - (time.perf_counter() - started) - B_OVERHEAD_SECONDS \
                - (COMPILE_RESERVE_SECONDS if "a" in parts else 0) \
                - (C_RESERVE_SECONDS if "c" in parts and args.imagenet_dir else 0)
            if left < args.train_seconds:
                log(f"(b) training time cut from {args.train_seconds:.0f} s to {left:.0f} s to stay within "
                    f"{HARD_LIMIT_SECONDS} s")
                args.train_seconds = max(30.0, left)
        with tempfile.TemporaryDirectory() as workdir:
            try:
                result["b"] = part_b(args, workdir, log)
            except UserError:
                raise
            except Exception as err:
                result["b"] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
                log(f"(b) failed: {result['b']['error']}")
        save()
    if "c" in parts:
        if args.imagenet_dir is None:
            log("(c) skipped: no --imagenet_dir")
        else:
            try:
                result["c"] = part_c(args, log)
            except Exception as err:  # keep the other measurements; the error is part of the record
                result["c"] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
                log(f"(c) failed: {result['c']['error']}")
            save()
    if "a" in parts:
        result["a"]["compiled"] = part_a(args, compiled=True, log=log)
        save()
    if "d" in parts:
        try:
            result["d"] = part_d(args, result, results_dir, log)
        except Exception as err:  # the measurements above are saved whatever happens here
            result["d"] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
            log(f"(d) failed: {result['d']['error']}")
        save()
    print(table(result))
    print(f"results: {path}")
    return result


if __name__ == "__main__":
    from hf_vit.errors import run_cli

    run_cli(main)
