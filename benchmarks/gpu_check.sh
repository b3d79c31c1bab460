#!/usr/bin/env bash
# The prepared GPU check: one call, at most 9 minutes, on a single-GPU machine with torch, transformers and accelerate
# installed and no network. Installs nothing: the package is used from this checkout (PYTHONPATH).
#
#   bash benchmarks/gpu_check.sh CIFAR_DIR              # (a) ViT-B/16 throughput and MFU, (b) vit_small_cifar epochs,
#                                                       # (d) studies/report_scale.yaml planned from (a): GPU-hours
#   bash benchmarks/gpu_check.sh CIFAR_DIR --imagenet_dir IMAGENET_DIR   # + (c) decode_on_device (nvJPEG) throughput
#   bash benchmarks/gpu_check.sh CIFAR_DIR --dry-run    # the same script on CPU with a tiny model, < 2 minutes
#
# CIFAR_DIR: the CIFAR-10 parquet folder (Hub layout, e.g. a copy of ../shared/datasets/cifar10). Further flags go to
# benchmarks/gpu_check.py (--parts, --imagenet_dir, --train_seconds, --vit_b_batch_size, --peak_tflops, --results_dir).
# Results: benchmarks/results/gpu_check_<date>.json, throughput.json (what hf_vit.plan estimates time from) and tables
# on stdout.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# No network on the GPU machine: never wait on the Hub.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# A hard cap of 9 minutes; the script budgets itself below that and saves its JSON after each part.
exec timeout --signal=TERM --kill-after=20 540 "$PYTHON" "$REPO/benchmarks/gpu_check.py" "$@"
