"""The run's configuration as typed data: three dataclass groups whose every field is one :func:`setting` (default,
allowed values, help), the run as a whole (:class:`RunConfig`), which fields are secret, and the global batch resolved
over the processes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

from ..errors import UserError, is_secret_name
from .domains import (ANY, BELOW_ONE, COUNT, EPOCHS, FRACTION, MAX_COUNT, MAX_WORKERS, NON_NEGATIVE, POSITIVE, SEED,
                      TEXT, Domain, setting)

CONFIG_FILE_NAME = "train_config.yaml"


@dataclass
class ModelArguments:
    """What to train: a named preset (a ViT built from ``ViTConfig``, or a CNN from ``ResNetConfig`` /
    ``ConvNextConfig``), or a checkpoint to fine-tune. Relations to the preset (``image_size % patch_size``, a ViT
    field given to a CNN) are checked by :mod:`hf_vit.models`."""

    model_preset: Optional[str] = setting(
        "vit_tiny_cifar", TEXT,
        "Architecture preset (vit_tiny_cifar, vit_small_cifar, vit_base_patch16_224, ...).",
    )
    model_name_or_path: Optional[str] = setting(
        None, TEXT,
        "Local directory or Hub id of an image-classification checkpoint (ViT, ResNet, ConvNeXt) to start from.",
    )
    image_size: Optional[int] = setting(None, COUNT, "Input resolution (overrides the preset).")
    patch_size: Optional[int] = setting(None, COUNT, "Patch size (overrides the preset).")
    hidden_size: Optional[int] = setting(None, COUNT, "Embedding dimension.")
    num_hidden_layers: Optional[int] = setting(None, COUNT, "Number of transformer blocks.")
    num_attention_heads: Optional[int] = setting(None, COUNT, "Attention heads per block.")
    intermediate_size: Optional[int] = setting(None, COUNT, "MLP hidden dimension.")
    hidden_dropout_prob: float = setting(0.0, BELOW_ONE, "Dropout after attention/MLP projections.")
    attention_probs_dropout_prob: float = setting(0.0, BELOW_ONE, "Dropout on attention weights.")
    freeze_backbone: bool = setting(False, ANY, "Train only the classifier (a linear probe).")
    trust_remote_code: bool = setting(
        False, ANY,
        "Accepted for the HF examples' command lines, but must stay off: nothing here runs a repository's code (the "
        "models are transformers' own ViT, ResNet and ConvNeXt, datasets are parquet or image files).",
    )


@dataclass
class DataArguments:
    """Where the images come from and how they are augmented."""

    dataset_name: str = setting(
        "uoft-cs/cifar10", TEXT,
        "Hub dataset id, or a local path (parquet folder, imagefolder tree, or saved dataset).",
    )
    dataset_config_name: Optional[str] = setting(None, TEXT, "Dataset configuration name.")
    dataset_revision: Optional[str] = setting(
        None, TEXT,
        "Hub revision (branch, tag or commit) of dataset_name, to pin the data a run used; ignored for a local folder.",
    )
    train_split: str = setting("train", TEXT, "Split to train on.")
    eval_split: Optional[str] = setting(  # "" = no eval split: carve train_val_split from train
        None, Domain(allow_empty=True),
        "Split to evaluate on; when absent, `train_val_split` is carved from train.",
    )
    train_val_split: float = setting(  # a fraction below 1, else a count (whole: see validate)
        0.02, Domain(0, MAX_COUNT),
        "Fraction (or count, if >= 1) of train held out for validation when there is no eval split.",
    )
    split_seed: int = setting(
        0, SEED,
        "Seed of the train_val_split carve-out (independent of seed, so every training seed of a study is scored on the"
        " same images).",
    )
    test_split: Optional[str] = setting(
        None, TEXT,
        "Split scored once with the final weights after training (test_accuracy, per-example predictions); never used "
        "during training or by eval_steps.",
    )
    image_column_name: Optional[str] = setting(None, TEXT, "Image column (auto-detected if unset).")
    label_column_name: Optional[str] = setting(None, TEXT, "Label column (auto-detected if unset).")
    streaming: bool = setting(False, ANY, "Stream the dataset as an IterableDataset.")
    train_samples: Optional[int] = setting(
        None, COUNT,
        "Examples per epoch when streaming metadata does not say (used for the LR schedule).",
    )
    shuffle_buffer_size: int = setting(
        10_000, COUNT,
        "Shuffle buffer of a stream walked whole (stream_sharding exact); shards shuffle per unit.",
    )
    stream_sharding: Literal["exact", "shards"] = setting(
        "shards", ANY,
        "How a stream is split over the C = processes x loader workers consumers. 'shards': each consumer reads its "
        "own contiguous range of the epoch's seeded line of shards (parquet: row groups), so each record is read about"
        " once and every record but less than one global batch is used. 'exact': every consumer walks the whole stream"
        " and keeps its micro-batches (reads grow with C; the run plan refuses it above 1.25x). See "
        "hf_vit/data/sharding.py.",
    )
    train_fraction: float = setting(
        1.0, Domain(0, 1, low_open=True),
        "Keep this deterministic pseudo-random fraction of the training set.",
    )
    subset_seed: int = setting(0, SEED, "Seed of the train_fraction subset (independent of seed).")
    max_train_samples: Optional[int] = setting(None, COUNT, "Truncate train (debugging).")
    max_eval_samples: Optional[int] = setting(None, COUNT, "Truncate eval (debugging).")
    train_eval_samples: Optional[int] = setting(
        None, COUNT,
        "Score the final weights in eval mode, without augmentation, on this many fixed training images (the first "
        "ones of the run's training set, after train_fraction): train_eval_accuracy, the generalisation gap measured "
        "as the eval set is.",
    )
    augmentation: Literal["basic", "enhanced"] = setting(
        "basic", ANY,
        "basic: crop + flip; enhanced: adds TrivialAugmentWide + RandomErasing.",
    )
    crop_padding: Optional[int] = setting(  # below image_size too: see check_crop_padding
        None, Domain(0, MAX_COUNT),
        "Pad-and-crop padding (CIFAR-style). Unset: random-resized crop (ImageNet-style).",
    )
    random_resized_crop_scale: float = setting(  # a crop of no area, or more than the image, is none
        0.08, Domain(0, 1, low_open=True),
        "Smallest area fraction of the random-resized crop.",
    )
    random_erasing_prob: float = setting(0.25, FRACTION, "RandomErasing probability (enhanced only).")
    mixup_alpha: float = setting(0.0, NON_NEGATIVE, "MixUp alpha (0 disables).")
    cutmix_alpha: float = setting(0.0, NON_NEGATIVE, "CutMix alpha (0 disables).")
    dataloader_num_workers: int = setting(2, Domain(0, MAX_WORKERS), "Loader worker processes per process.")
    data_on_device: bool = setting(
        False, ANY,
        "Decode the train split once into a uint8 tensor on the device and augment whole batches there, without loader"
        " workers (map-style data that fits in memory, pad-and-crop training; see hf_vit/data/device_data.py). Eval "
        "keeps the loader.",
    )
    decode_on_device: bool = setting(
        False, ANY,
        "Decode training JPEGs on the accelerator (nvJPEG through torchvision.io.decode_jpeg) instead of in the loader"
        " workers, which then only read bytes and draw the crops (random-resized-crop training; see "
        "hf_vit/data/device_jpeg.py). Eval keeps the loader.",
    )
    max_bad_sample_fraction: float = setting(
        0.01, FRACTION,
        "Stop when more than this fraction of seen training images is unusable.",
    )


@dataclass
class TrainArguments:
    """How to optimise, checkpoint, log and publish."""

    output_dir: str = setting("outputs/run", TEXT, "Where checkpoints and results go.")
    overwrite_output_dir: bool = setting(False, ANY, "Allow reusing a folder of another run.")
    seed: int = setting(42, SEED, "Seed for model init, data order and augmentation.")
    total_train_batch_size: Optional[int] = setting(
        None, COUNT,
        "Global batch = per-device x processes x accumulation; derives per_device_train_batch_size.",
    )
    per_device_train_batch_size: int = setting(64, COUNT, "Micro-batch per process.")
    gradient_accumulation_steps: int = setting(1, COUNT, "Micro-batches per optimizer step.")
    per_device_eval_batch_size: int = setting(256, COUNT, "Eval batch per process.")
    num_train_epochs: float = setting(10, EPOCHS, "Epochs to train.")  # 0 only with max_train_steps (see validate)
    max_train_steps: Optional[int] = setting(None, COUNT, "Stop after this many optimizer steps.")
    learning_rate: float = setting(1e-3, POSITIVE, "Peak learning rate (backbone).")
    warmup_epochs: float = setting(0.0, EPOCHS, "Linear warmup length in epochs.")
    warmup_start_lr: float = setting(1e-6, NON_NEGATIVE, "LR at step 0 of the warmup.")
    min_lr: float = setting(1e-6, NON_NEGATIVE, "LR at the last step of the cosine decay.")
    weight_decay: float = setting(0.05, NON_NEGATIVE, "AdamW decoupled weight decay.")
    adam_beta1: float = setting(0.9, BELOW_ONE, "AdamW beta1.")
    adam_beta2: float = setting(0.999, BELOW_ONE, "AdamW beta2.")
    adam_epsilon: float = setting(1e-8, POSITIVE, "AdamW epsilon.")
    head_lr_multiplier: float = setting(1.0, POSITIVE, "Classifier LR = learning_rate x this.")
    layer_decay: Optional[float] = setting(
        None, Domain(0, 1, low_open=True),
        "Layer-wise LR decay: block i runs at decay^(depth - i) (BEiT-style).",
    )
    label_smoothing: float = setting(0.0, BELOW_ONE, "Cross-entropy label smoothing.")
    max_grad_norm: Optional[float] = setting(  # 0 (or null) turns clipping off
        1.0, NON_NEGATIVE,
        "Gradient clipping norm (None: off).",
    )
    ema_decay: Optional[float] = setting(
        None, Domain(0, 1, low_open=True, high_open=True),
        "Keep an EMA of the weights (e.g. 0.999).",
    )
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = setting(
        None, ANY,
        "Autocast precision; unset: the accelerate config's (or 'no').",
    )
    torch_compile: bool = setting(False, ANY, "torch.compile the model.")
    dry_run: bool = setting(False, ANY, "Print the run plan (steps, data use, reads, checkpoints, time) and exit.")
    eval_steps: Optional[int] = setting(None, COUNT, "Evaluate every N steps (default: each epoch).")
    logging_steps: int = setting(10, COUNT, "Log train loss and LR every N steps.")
    checkpointing_steps: Optional[str] = setting(
        "epoch", Domain(words=("epoch", "no")),
        "Save state every N steps, 'epoch', or 'no'.",
    )
    resume_from_checkpoint: Optional[str] = setting(
        None, TEXT,
        "Checkpoint folder, 'latest' (newest in output_dir), or a Hub repo id.",
    )
    resume_accept_changes: Optional[str] = setting(  # identity keys, checked against the checkpoint's at resume
        None, TEXT,
        "Comma list of run-identity keys (e.g. seed,num_train_epochs) a resume may change deliberately; without it a "
        "resume whose seed, data, model or schedule differ from the checkpoint's is refused. The checkpoints record "
        "the change.",
    )
    checkpoints_total_limit: Optional[int] = setting(2, COUNT, "Keep at most this many checkpoints.")
    max_nonfinite_steps: int = setting(5, COUNT, "Stop after this many non-finite losses in a row.")
    report_to: str = setting("auto", TEXT, "Trackers: tensorboard, wandb, mlflow, all, none, or auto (tensorboard).")
    push_to_hub: bool = setting(False, ANY, "Push the model and results to the Hub.")
    hub_model_id: Optional[str] = setting(None, TEXT, "Repository id on the Hub.")
    hub_private_repo: bool = setting(False, ANY, "Create the Hub repository as private.")
    hub_strategy: Literal["end", "every_save", "checkpoint"] = setting(
        "end", ANY,
        "When to push (same meanings as the HF Trainer).",
    )
    hub_token: Optional[str] = setting(None, TEXT, "Hub token (else HF_TOKEN or cached login).", repr=False)


ARG_GROUPS = (ModelArguments, DataArguments, TrainArguments)
# Never written to disk or logs: every field whose name is token-like (errors.is_secret_name), i.e. the Hub token.
SECRET_KEYS = tuple(f.name for group in ARG_GROUPS for f in dataclasses.fields(group) if is_secret_name(f.name))


@dataclass
class RunConfig:
    """The three argument groups of one run."""

    model: ModelArguments
    data: DataArguments
    train: TrainArguments

    def to_dict(self, include_secrets: bool = False) -> dict:
        """Flat ``{field: value}`` over all groups (the recipe format)."""
        flat = {}
        for group in (self.model, self.data, self.train):
            flat.update(dataclasses.asdict(group))
        if not include_secrets:
            for key in SECRET_KEYS:
                flat.pop(key, None)
        return flat


def resolve_batch_sizes(train: TrainArguments, num_processes: int) -> None:
    """Derive ``per_device_train_batch_size`` from the global batch (in place); an indivisible split is an error.

    The global batch — and so the LR schedule in optimizer steps — stays the same on 1, 2 or 8 processes:
    ``total_train_batch_size = per_device x processes x gradient_accumulation_steps``.
    """
    if train.total_train_batch_size is None:
        train.total_train_batch_size = (
            train.per_device_train_batch_size * num_processes * train.gradient_accumulation_steps
        )
        return
    divisor = num_processes * train.gradient_accumulation_steps
    if train.total_train_batch_size <= 0 or train.total_train_batch_size % divisor:
        raise UserError(
            f"total_train_batch_size={train.total_train_batch_size} is not divisible by processes x "
            f"gradient_accumulation_steps = {num_processes} x {train.gradient_accumulation_steps}; "
            "change one of them so the division is exact"
        )
    train.per_device_train_batch_size = train.total_train_batch_size // divisor
