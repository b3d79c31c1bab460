"""Shared test fixtures: the real data in ../shared/datasets, offline settings, and a helper to run the scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_VIT_SHARED_DATASETS", REPO.parent / "shared" / "datasets")).resolve()
CIFAR10 = SHARED / "cifar10"
IMAGENET_SAMPLE = SHARED / "imagenet-sample"

# No test may reach the Hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A tiny, fast training configuration on real CIFAR-10 (a few dozen steps on 2 CPU cores).
TINY_ARGS = [
    "--dataset_name", str(CIFAR10), "--model_preset", "vit_tiny_cifar", "--hidden_size", "64",
    "--intermediate_size", "128", "--num_hidden_layers", "2", "--num_attention_heads", "2",
    "--max_train_samples", "640", "--max_eval_samples", "128", "--total_train_batch_size", "32",
    "--num_train_epochs", "2", "--warmup_epochs", "0.5", "--learning_rate", "1e-3", "--crop_padding", "4",
    "--dataloader_num_workers", "1", "--report_to", "none", "--logging_steps", "5",
]


def run_script(args: list[str], nproc: int = 1, timeout: int = 600, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run ``args`` (a script and its flags) with python, or under ``accelerate launch`` with ``nproc`` processes."""
    full_env = {**os.environ, **(env or {})}
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "accelerate_configs" / "cpu_2proc.yaml"), "--num_processes", str(nproc),
               "--main_process_port", str(29500 + os.getpid() % 1000), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def cifar10_path() -> Path:
    if not CIFAR10.is_dir():
        pytest.skip(f"real CIFAR-10 data not found at {CIFAR10}")
    return CIFAR10


@pytest.fixture(scope="session")
def imagenet_sample_path() -> Path:
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"ImageNet sample not found at {IMAGENET_SAMPLE}")
    return IMAGENET_SAMPLE


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Tests that call an entry point in-process (the demo, the eval command) leave accelerate's process-wide
    singletons behind, configured for that run (bf16, say); a production process builds one Accelerator and exits,
    so every test starts and ends with none."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield
    reset()
