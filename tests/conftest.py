"""Shared test fixtures: the data in ../shared/datasets (or generated stand-ins for it), offline settings, and a helper
to run the scripts.

Data: ``CIFAR10`` / ``IMAGENET_SAMPLE`` (and the fixtures ``cifar10_path`` / ``imagenet_sample_path``) are the real
datasets in ``$HF_VIT_SHARED_DATASETS`` (default ``../shared/datasets``) where they exist. Where one is missing (a
fresh clone on another machine), a stand-in with the same schema and layout is generated once and kept in
``tests/.generated/<generator hash>/`` (git-ignored by its own ``.gitignore``), so that every test runs instead of
skipping. The session's report says which data it used.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_VIT_SHARED_DATASETS", REPO.parent / "shared" / "datasets")).resolve()
GENERATED_ROOT = REPO / "tests" / ".generated"

# No test may reach the Hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ------------------------------------------------------------------------------------------ generated stand-ins
def _write_shards(folder: Path, rows: list[dict], features, shards: int) -> None:
    """A Hub-style parquet split: ``folder/train-0000k-of-0000n.parquet``, the features in the schema metadata."""
    import datasets

    folder.mkdir(parents=True)
    per_shard = math.ceil(len(rows) / shards)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # this runs before the session's output capture
    try:
        for k in range(shards):
            part = rows[k * per_shard:(k + 1) * per_shard]
            ds = datasets.Dataset.from_dict({name: [r[name] for r in part] for name in features}, features=features)
            ds.to_parquet(str(folder / f"train-{k:05d}-of-{shards:05d}.parquet"))
    finally:
        if bars:
            datasets.enable_progress_bars()


def _jpeg(pixels, mode: str = "RGB", quality: int = 90) -> bytes:
    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.fromarray(pixels).convert(mode).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# The foreground colour of each class (jittered per image): like CIFAR-10's, the stand-in's classes differ in colour
# as well as in shape, which a small model picks up within its first steps.
_CIFAR_COLOURS = [(220, 50, 50), (50, 190, 50), (50, 70, 220), (230, 200, 40), (190, 50, 190), (40, 190, 190),
                  (240, 130, 30), (130, 80, 30), (150, 150, 150), (30, 30, 30)]


def _cifar_pattern(label: int, rng, size: int = 32):
    """A 32-px image of class ``label``: one of ten shapes (stripes, checks, rings, a disc, a gradient, at two
    scales) in the class's colour on a random background, at a random position and phase, plus noise. Every shape is
    its own mirror image, so the train transform's horizontal flips keep the class."""
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2
    cy, cx = rng.uniform(-4, 4, 2)
    period = rng.uniform(8, 11) if label % 2 == 0 else rng.uniform(4, 5.5)
    phase = rng.uniform(0, 2 * math.pi)
    kind = label // 2
    if kind == 0:  # horizontal stripes
        wave = np.sin(2 * math.pi * yy / period + phase)
    elif kind == 1:  # vertical stripes
        wave = np.sin(2 * math.pi * xx / period + phase)
    elif kind == 2:  # checks
        wave = np.sin(2 * math.pi * xx / period + phase) * np.sin(2 * math.pi * yy / period + phase)
    elif kind == 3:  # rings around a point near the middle
        wave = np.sin(2 * math.pi * np.hypot(yy - cy, xx - cx) / period + phase)
    elif label == 8:  # a disc
        wave = rng.uniform(5, 10) - np.hypot(yy - cy, xx - cx)
    else:  # a gradient from top to bottom
        wave = (yy - cy) / size + rng.uniform(-0.2, 0.2)
    fg, bg = np.array(_CIFAR_COLOURS[label]) + rng.normal(0, 30, 3), rng.uniform(0, 255, 3)
    image = np.where(wave[..., None] > 0, fg, bg) + rng.normal(0, 24, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def generate_cifar10(root: Path, rows: int = 50_000, shards: int = 10, seed: int = 0) -> Path:
    """A CIFAR-10 stand-in at ``root``: the real copy's layout (``plain_text/train-*-of-00010.parquet``) and schema
    (``img`` Image, ``label`` ClassLabel with CIFAR-10's names, paths like ``cat_17.jpg``), 32-px JPEGs of ten
    learnable classes (:func:`_cifar_pattern`), balanced and shuffled."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(rows) % 10)
    records = [{"img": {"bytes": _jpeg(_cifar_pattern(int(y), rng)), "path": f"{CIFAR10_NAMES[y]}_{i}.jpg"},
                "label": int(y)} for i, y in enumerate(labels)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR10_NAMES)})
    _write_shards(root / "plain_text", records, features, shards)
    return root


def _photo(rng, width: int, height: int):
    """Photo-like content: smooth colour regions (a coarse random grid, bicubic-upsampled) plus fine noise."""
    import numpy as np
    import PIL.Image

    coarse = rng.integers(0, 256, (max(2, height // 60), max(2, width // 60), 3), dtype=np.uint8)
    smooth = np.asarray(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BICUBIC), dtype=np.int16)
    return np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)


def generate_imagenet_sample(root: Path, seed: int = 0) -> Path:
    """An ImageNet-sample stand-in at ``root``: the real copy's layout (``data/train-*-of-00004.parquet``, 250 rows
    each) and schema (``image`` Image, ``label`` ClassLabel with torchvision's 1,000 ImageNet class names, one photo per
    class in shuffled order); photo-sized JPEGs of varied sizes (most around 500 x 375, a few tiny, one 2400 x 1600),
    23 of them grayscale like the real sample's, and one CMYK (past the first 40 rows, which some tests take as plain
    photos)."""
    import datasets
    import numpy as np
    from torchvision.models import get_weight

    names = get_weight("ResNet50_Weights.IMAGENET1K_V1").meta["categories"]  # ships with torchvision: no download
    rng = np.random.default_rng(seed)
    common = [(500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (640, 480), (500, 400), (400, 300)]
    grey = set(rng.choice(np.arange(40, 1000), 23, replace=False).tolist())
    cmyk = 700
    records = []
    for i, label in enumerate(rng.permutation(1000).tolist()):
        if i == 100:
            size = (2400, 1600)
        elif i % 97 == 13:
            size = (int(rng.integers(68, 130)), int(rng.integers(68, 130)))
        else:
            size = common[int(rng.integers(len(common)))]
        mode = "CMYK" if i == cmyk else "L" if i in grey else "RGB"
        name = names[label].replace(" ", "_")
        records.append({"image": {"bytes": _jpeg(_photo(rng, *size), mode), "path": f"g{label:05d}_{name}.JPEG"},
                        "label": label})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    _write_shards(root / "data", records, features, shards=4)
    return root


GENERATORS = {"cifar10": generate_cifar10, "imagenet-sample": generate_imagenet_sample}
# A change to a generator gives a new folder, so a stale stand-in is never reused.
_GENERATOR_SOURCE = repr(_CIFAR_COLOURS) + "".join(inspect.getsource(f) for f in (
    _write_shards, _jpeg, _cifar_pattern, generate_cifar10, _photo, generate_imagenet_sample))
_GENERATOR_HASH = hashlib.sha256(_GENERATOR_SOURCE.encode()).hexdigest()[:12]
GENERATED = GENERATED_ROOT / _GENERATOR_HASH


def dataset_path(name: str) -> tuple[Path, bool]:
    """(path, real): the shared copy of dataset ``name`` when it exists, else where its stand-in is generated."""
    real = SHARED / name
    return (real, True) if real.is_dir() else (GENERATED / name, False)


def ensure_generated(name: str) -> Path:
    """Generate the stand-in for ``name`` unless it is there; safe when several sessions race (each writes its own
    temporary folder, and the first rename wins)."""
    target = GENERATED / name
    if target.is_dir():
        return target
    GENERATED.mkdir(parents=True, exist_ok=True)
    (GENERATED_ROOT / ".gitignore").write_text("*\n")
    for stale in GENERATED_ROOT.iterdir():  # stand-ins from an older generator
        if stale.is_dir() and stale != GENERATED:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = GENERATED / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"conftest: no {SHARED / name}; generating a stand-in in {target} (once, ~10 s)", file=sys.stderr, flush=True)
    GENERATORS[name](tmp)
    try:
        tmp.rename(target)
    except OSError:  # another session finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return target


CIFAR10, CIFAR10_IS_REAL = dataset_path("cifar10")
IMAGENET_SAMPLE, IMAGENET_SAMPLE_IS_REAL = dataset_path("imagenet-sample")


def describe_data() -> list[str]:
    """One line per dataset: which data this session's tests use."""
    return [f"{title}: real data at {path}" if real else
            f"{title}: GENERATED stand-in at {path} (no {SHARED / path.name}; HF_VIT_SHARED_DATASETS names the folder "
            "that holds the real copies)"
            for title, path, real in (("CIFAR-10", CIFAR10, CIFAR10_IS_REAL),
                                      ("ImageNet sample", IMAGENET_SAMPLE, IMAGENET_SAMPLE_IS_REAL))]


def pytest_sessionstart(session):
    # Before collection: test modules and helpers take the paths at import time and expect data behind them.
    for name, real in (("cifar10", CIFAR10_IS_REAL), ("imagenet-sample", IMAGENET_SAMPLE_IS_REAL)):
        if not real:
            ensure_generated(name)


def pytest_report_header(config):
    return describe_data()


def pytest_terminal_summary(terminalreporter):
    # The header is hidden under -q (make test); the summary is not.
    terminalreporter.write_sep("-", "data")
    for line in describe_data():
        terminalreporter.write_line(line)


# A tiny, fast training configuration on CIFAR-10 (a few dozen steps on 2 CPU cores).
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
    """CIFAR-10's train split (50,000 rows, ``img``/``label``): the real copy or its generated stand-in."""
    return ensure_generated("cifar10") if not CIFAR10_IS_REAL else CIFAR10


@pytest.fixture(scope="session")
def imagenet_sample_path() -> Path:
    """The ImageNet sample (1,000 photos, ``image``/``label``): the real copy or its generated stand-in."""
    return ensure_generated("imagenet-sample") if not IMAGENET_SAMPLE_IS_REAL else IMAGENET_SAMPLE


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
