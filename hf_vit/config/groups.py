"""The run's configuration as typed data: three dataclass groups with their ``help``, the run as a whole
(:class:`RunConfig`), which fields are secret, and the global batch resolved over the processes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from ..errors import UserError, is_secret_name

CONFIG_FILE_NAME = "train_config.yaml"


@dataclass
class ModelArguments:
    """What to train: a named preset built from ``ViTConfig``, or a checkpoint to fine-tune."""

    model_preset: Optional[str] = field(
        default="vit_tiny_cifar",
        metadata={"help": "Architecture preset (vit_tiny_cifar, vit_small_cifar, vit_base_patch16_224, ...)."},
    )
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Local directory or Hub id of a ViTForImageClassification checkpoint to start from."},
    )
    image_size: Optional[int] = field(default=None, metadata={"help": "Input resolution (overrides the preset)."})
    patch_size: Optional[int] = field(default=None, metadata={"help": "Patch size (overrides the preset)."})
    hidden_size: Optional[int] = field(default=None, metadata={"help": "Embedding dimension."})
    num_hidden_layers: Optional[int] = field(default=None, metadata={"help": "Number of transformer blocks."})
    num_attention_heads: Optional[int] = field(default=None, metadata={"help": "Attention heads per block."})
    intermediate_size: Optional[int] = field(default=None, metadata={"help": "MLP hidden dimension."})
    hidden_dropout_prob: float = field(default=0.0, metadata={"help": "Dropout after attention/MLP projections."})
    attention_probs_dropout_prob: float = field(default=0.0, metadata={"help": "Dropout on attention weights."})
    freeze_backbone: bool = field(default=False, metadata={"help": "Train only the classifier (a linear probe)."})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Accepted for the HF examples' command lines, but must stay off: nothing here runs a "
                          "repository's code (the model is transformers' own ViT, datasets are parquet or image "
                          "files)."},
    )


@dataclass
class DataArguments:
    """Where the images come from and how they are augmented."""

    dataset_name: str = field(
        default="uoft-cs/cifar10",
        metadata={"help": "Hub dataset id, or a local path (parquet folder, imagefolder tree, or saved dataset)."},
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Dataset configuration name."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: Optional[str] = field(
        default=None, metadata={"help": "Split to evaluate on; when absent, `train_val_split` is carved from train."}
    )
    train_val_split: float = field(
        default=0.02,
        metadata={"help": "Fraction (or count, if >= 1) of train held out for validation when there is no eval split."},
    )
    image_column_name: Optional[str] = field(default=None, metadata={"help": "Image column (auto-detected if unset)."})
    label_column_name: Optional[str] = field(default=None, metadata={"help": "Label column (auto-detected if unset)."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset as an IterableDataset."})
    train_samples: Optional[int] = field(
        default=None,
        metadata={"help": "Examples per epoch when streaming metadata does not say (used for the LR schedule)."},
    )
    shuffle_buffer_size: int = field(
        default=10_000,
        metadata={"help": "Shuffle buffer of a stream walked whole (stream_sharding exact); shards shuffle per unit."},
    )
    stream_sharding: Literal["exact", "shards"] = field(
        default="shards",
        metadata={"help": "How a stream is split over the C = processes x loader workers consumers. 'shards': each "
                          "consumer reads its own contiguous range of the epoch's seeded line of shards (parquet: row "
                          "groups), so each record is read about once and every record but less than one global batch "
                          "is used. 'exact': every consumer walks the whole stream and keeps its micro-batches (reads "
                          "grow with C; the run plan refuses it above 1.25x). See hf_vit/data/sharding.py."},
    )
    train_fraction: float = field(
        default=1.0, metadata={"help": "Keep this deterministic pseudo-random fraction of the training set."}
    )
    subset_seed: int = field(default=0, metadata={"help": "Seed of the train_fraction subset (independent of seed)."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate train (debugging)."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Truncate eval (debugging)."})
    augmentation: Literal["basic", "enhanced"] = field(
        default="basic", metadata={"help": "basic: crop + flip; enhanced: adds TrivialAugmentWide + RandomErasing."}
    )
    crop_padding: Optional[int] = field(
        default=None,
        metadata={"help": "Pad-and-crop padding (CIFAR-style). Unset: random-resized crop (ImageNet-style)."},
    )
    random_resized_crop_scale: float = field(
        default=0.08, metadata={"help": "Smallest area fraction of the random-resized crop."}
    )
    random_erasing_prob: float = field(default=0.25, metadata={"help": "RandomErasing probability (enhanced only)."})
    mixup_alpha: float = field(default=0.0, metadata={"help": "MixUp alpha (0 disables)."})
    cutmix_alpha: float = field(default=0.0, metadata={"help": "CutMix alpha (0 disables)."})
    dataloader_num_workers: int = field(default=2, metadata={"help": "Loader worker processes per process."})
    data_on_device: bool = field(
        default=False,
        metadata={"help": "Decode the train split once into a uint8 tensor on the device and augment whole batches "
                          "there, without loader workers (map-style data that fits in memory, pad-and-crop training; "
                          "see hf_vit/data/device_data.py). Eval keeps the loader."},
    )
    decode_on_device: bool = field(
        default=False,
        metadata={"help": "Decode training JPEGs on the accelerator (nvJPEG through torchvision.io.decode_jpeg) "
                          "instead of in the loader workers, which then only read bytes and draw the crops "
                          "(random-resized-crop training; see hf_vit/data/device_jpeg.py). Eval keeps the loader."},
    )
    max_bad_sample_fraction: float = field(
        default=0.01, metadata={"help": "Stop when more than this fraction of seen training images is unusable."}
    )


@dataclass
class TrainingArguments:
    """How to optimise, checkpoint, log and publish."""

    output_dir: str = field(default="outputs/run", metadata={"help": "Where checkpoints and results go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow reusing a folder of another run."})
    seed: int = field(default=42, metadata={"help": "Seed for model init, data order and augmentation."})
    total_train_batch_size: Optional[int] = field(
        default=None,
        metadata={"help": "Global batch = per-device x processes x accumulation; derives per_device_train_batch_size."},
    )
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Micro-batch per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Eval batch per process."})
    num_train_epochs: float = field(default=10, metadata={"help": "Epochs to train."})
    max_train_steps: Optional[int] = field(default=None, metadata={"help": "Stop after this many optimizer steps."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (backbone)."})
    warmup_epochs: float = field(default=0.0, metadata={"help": "Linear warmup length in epochs."})
    warmup_start_lr: float = field(default=1e-6, metadata={"help": "LR at step 0 of the warmup."})
    min_lr: float = field(default=1e-6, metadata={"help": "LR at the last step of the cosine decay."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW decoupled weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    head_lr_multiplier: float = field(default=1.0, metadata={"help": "Classifier LR = learning_rate x this."})
    layer_decay: Optional[float] = field(
        default=None, metadata={"help": "Layer-wise LR decay: block i runs at decay^(depth - i) (BEiT-style)."}
    )
    label_smoothing: float = field(default=0.0, metadata={"help": "Cross-entropy label smoothing."})
    max_grad_norm: Optional[float] = field(default=1.0, metadata={"help": "Gradient clipping norm (None: off)."})
    ema_decay: Optional[float] = field(default=None, metadata={"help": "Keep an EMA of the weights (e.g. 0.999)."})
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = field(
        default=None, metadata={"help": "Autocast precision; unset: the accelerate config's (or 'no')."}
    )
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile the model."})
    dry_run: bool = field(
        default=False, metadata={"help": "Print the run plan (steps, data use, reads, checkpoints, time) and exit."}
    )
    eval_steps: Optional[int] = field(default=None, metadata={"help": "Evaluate every N steps (default: each epoch)."})
    logging_steps: int = field(default=10, metadata={"help": "Log train loss and LR every N steps."})
    checkpointing_steps: Optional[str] = field(
        default="epoch", metadata={"help": "Save state every N steps, 'epoch', or 'no'."}
    )
    resume_from_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "Checkpoint folder, 'latest' (newest in output_dir), or a Hub repo id."}
    )
    resume_accept_changes: Optional[str] = field(
        default=None, metadata={"help": "Comma list of run-identity keys (e.g. seed,num_train_epochs) a resume may "
                                        "change deliberately; without it a resume whose seed, data, model or schedule "
                                        "differ from the checkpoint's is refused. The checkpoints record the change."}
    )
    checkpoints_total_limit: Optional[int] = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    max_nonfinite_steps: int = field(default=5, metadata={"help": "Stop after this many non-finite losses in a row."})
    report_to: str = field(
        default="auto", metadata={"help": "Trackers: tensorboard, wandb, mlflow, all, none, or auto (tensorboard)."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Push the model and results to the Hub."})
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "Repository id on the Hub."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    hub_strategy: Literal["end", "every_save", "checkpoint"] = field(
        default="end", metadata={"help": "When to push (same meanings as the HF Trainer)."}
    )
    hub_token: Optional[str] = field(
        default=None, repr=False, metadata={"help": "Hub token (else HF_TOKEN or cached login)."}
    )


ARG_GROUPS = (ModelArguments, DataArguments, TrainingArguments)
# Never written to disk or logs: every field whose name is token-like (errors.is_secret_name), i.e. the Hub token.
SECRET_KEYS = tuple(f.name for group in ARG_GROUPS for f in dataclasses.fields(group) if is_secret_name(f.name))


@dataclass
class RunConfig:
    """The three argument groups of one run."""

    model: ModelArguments
    data: DataArguments
    train: TrainingArguments

    def to_dict(self, include_secrets: bool = False) -> dict:
        """Flat ``{field: value}`` over all groups (the recipe format)."""
        flat = {}
        for group in (self.model, self.data, self.train):
            flat.update(dataclasses.asdict(group))
        if not include_secrets:
            for key in SECRET_KEYS:
                flat.pop(key, None)
        return flat


def resolve_batch_sizes(train: TrainingArguments, num_processes: int) -> None:
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
