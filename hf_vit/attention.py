"""Where a ViT looks: attention rollout (Abnar & Zuidema 2020) over every layer, for a run's evaluation images.

    python -m hf_vit.attention RUN_DIR [--images N] [--output FILE.png] [--dataset_name PATH] [--eval_split SPLIT]

For example, on the run ``make demo DATASET=../shared/datasets/cifar10`` leaves in ``outputs/demo`` (trained on the
local CIFAR-10 copy; its validation images are the ``train_val_split`` slice carved out of train)::

    python -m hf_vit.attention outputs/demo --images 16
    # a run trained on the Hub's uoft-cs/cifar10 (eval_split: test), shown offline on the local copy, which has no
    # test split: the validation slice carved out of its train split instead
    python -m hf_vit.attention outputs/cifar10_vit_small --dataset_name ../shared/datasets/cifar10 --eval_split ""

The images are the first N evaluation images of the run (``train_config.yaml``: the same dataset, split, validation
carve-out and split_seed as training used), preprocessed by the folder's own image processor. The figure shows each one as
the model saw it (resized and cropped), with the rollout map of the CLS token over the patches overlaid and the title
``pred: X / true: Y`` (red and marked ``(wrong)`` when the prediction is wrong). It is written to
``<RUN_DIR>-eval/attention_rollout.png`` beside the run folder (for a checkpoint,
``<run>-eval/checkpoint-<N>/attention_rollout.png``) unless ``--output`` says otherwise — a run folder is written only
by its own run, so an ``--output`` in a run folder, in a checkpoint, inside a run in progress or inside the dataset is
refused before anything runs — and written atomically (a failed write leaves the previous figure).
:func:`rollout_figure` returns the same figure, maps and predictions to Python callers.

The attention weights come from transformers itself (``output_attentions=True``). SDPA, the implementation the
trainer uses, returns none, so the model runs with the eager implementation for this pass: the same maths and logits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys

import datasets
import numpy as np
import PIL.Image
import torch
import transformers
from matplotlib.figure import Figure
from transformers import AutoImageProcessor, ViTForImageClassification

from safetensors import SafetensorError

from hf_vit import durable
from hf_vit.config import CONFIG_FILE_NAME, DataArguments, check_fields, read_run_config, shared_setting
from hf_vit.data import DataSource, example_key, load_splits, to_rgb
from hf_vit.data.decoding import open_image
from hf_vit.errors import UserError, raise_user_errors, run_cli
from hf_vit.report import new_figure
from hf_vit.run_dir import analysis_output_dir, check_analysis_output, check_outside_dataset

logger = logging.getLogger(__name__)

HEAD_FUSIONS = ("mean", "max", "min")
MAX_IMAGES = 64
DEFAULT_OUTPUT_NAME = "attention_rollout.png"
TITLE_LINE = 40  # characters of 7-pt text that fit over one image cell


# ----------------------------------------------------------------------------------------------------------- rollout
def attention_rollout(attentions, head_fusion: str = "mean", discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout over all layers (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

    ``attentions``: one (B, heads, T, T) tensor per layer, first layer first, rows summing to 1 (transformers'
    ``outputs.attentions``). Per layer the heads are fused (``head_fusion``: "mean", the paper's choice, or "max" /
    "min"), the identity is added for the residual connection and the rows are re-normalised to sum to 1; the layers
    are then multiplied from the first to the last, ``R = A_L ... A_2 A_1``. ``discard_ratio`` > 0 first zeroes that
    fraction of the weakest attention to the non-CLS tokens in each fused map (the noise filter of Gildenblat's
    vit-explain; 0 is the paper's rollout). Returns the (B, T, T) rollout: row i is how much output token i draws from
    each input token.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS} (got {head_fusion!r})")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1) (got {discard_ratio})")
    if len(attentions) == 0:
        raise ValueError("attention_rollout needs the attention maps of at least one layer")
    rollout = None
    for layer in attentions:
        layer = layer.float()  # (B, heads, T, T)
        fused = {"mean": layer.mean(dim=1), "max": layer.amax(dim=1), "min": layer.amin(dim=1)}[head_fusion]
        batch, tokens, _ = fused.shape
        if discard_ratio > 0:
            # Rank only the attention to the patches (columns 1..T-1): the CLS column is never discarded.
            to_patches = fused[:, :, 1:].reshape(batch, -1)
            count = int(to_patches.shape[1] * discard_ratio)
            if count:
                weakest = to_patches.topk(count, dim=1, largest=False).indices
                fused = fused.clone()
                fused[:, :, 1:] = to_patches.scatter(1, weakest, 0.0).view(batch, tokens, tokens - 1)
        identity = torch.eye(tokens, dtype=fused.dtype, device=fused.device)
        residual = fused + identity  # the residual stream carries each token's own input forward
        residual = residual / residual.sum(dim=-1, keepdim=True)
        rollout = residual if rollout is None else residual @ rollout
    return rollout


def cls_rollout_map(rollout: torch.Tensor) -> torch.Tensor:
    """The CLS token's row of a (B, T, T) rollout over the patch tokens, as a (B, grid, grid) map (row-major patches,
    as ViT's patch embedding lays them out). T - 1 must be a square number of patches."""
    patches = rollout.shape[-1] - 1
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise ValueError(f"{patches} patch tokens do not form a square grid")
    return rollout[:, 0, 1:].reshape(-1, grid, grid)


@torch.no_grad()
def model_rollout(model: ViTForImageClassification, pixel_values: torch.Tensor, head_fusion: str = "mean",
                  discard_ratio: float = 0.0, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` on preprocessed ``pixel_values`` (N, 3, H, W) and return ``(logits (N, classes), rollout (N, T,
    T))``, both on the CPU.

    A model using SDPA (or any other implementation) runs this pass with the eager attention, the only one that
    returns the weights, and gets its own implementation and train/eval mode back afterwards.
    """
    # transformers keeps the active implementation in config._attn_implementation (there is no public getter).
    previous, was_training = model.config._attn_implementation, model.training
    if previous != "eager":
        model.set_attn_implementation("eager")
    model.eval()
    device = next(model.parameters()).device
    logits, rollouts = [], []
    try:
        # In batches: the attention maps of every layer for a large batch of 224-px images take gigabytes.
        for start in range(0, len(pixel_values), batch_size):
            outputs = model(pixel_values=pixel_values[start:start + batch_size].to(device), output_attentions=True)
            attentions = outputs.attentions or ()
            if len(attentions) != model.config.num_hidden_layers or any(a is None for a in attentions):
                raise RuntimeError(f"the model returned {len(attentions)} attention maps for "
                                   f"{model.config.num_hidden_layers} layers")
            logits.append(outputs.logits.float().cpu())
            rollouts.append(attention_rollout(attentions, head_fusion, discard_ratio).cpu())
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)
        model.train(was_training)
    return torch.cat(logits), torch.cat(rollouts)


# --------------------------------------------------------------------------------------------------- the run folder
def check_run_folder(run_dir: str) -> str:
    """The path of the run folder's ``config.json``; a missing folder or one without a model is a UserError."""
    if not os.path.isdir(run_dir):
        raise UserError(f"run folder {run_dir!r} does not exist; pass the output_dir of a training run")
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{run_dir!r} holds no model (no config.json); pass the output_dir of a finished training run")
    return config_path


def load_run_model(run_dir: str) -> tuple[ViTForImageClassification, object]:
    """The ViT classifier of a run folder (loaded with the eager attention) and its image processor.

    A missing folder, a folder without a model, any model type other than ViT (a CNN run, say), incomplete weights or
    a missing processor are one-line UserErrors.
    """
    config_path = check_run_folder(run_dir)
    try:
        with open(config_path) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"cannot read {config_path!r} ({str(err).splitlines()[0]}); pass the output_dir of a "
                        "finished training run") from None
    if model_type != "vit":
        raise UserError(f"hf_vit.attention needs a ViT run folder; {run_dir} holds a {model_type!r} model")
    try:
        # use_safetensors: a pickle (pytorch_model.bin) is never loaded (docs/reliability.md, Security).
        model, info = ViTForImageClassification.from_pretrained(
            run_dir, attn_implementation="eager", use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise UserError(f"cannot load weights from {run_dir!r} ({(str(err).splitlines() or [type(err).__name__])[0]}); "
                        "the weight file is damaged or incomplete: copy it again or pass another run") from None
    missing = sorted(info.get("missing_keys", [])) + [k for k, *_ in info.get("mismatched_keys", [])]
    if missing:
        raise UserError(f"{run_dir!r} is not a complete image classifier: {missing[:4]} would be randomly "
                        "initialised; pass the output_dir of a finished training run")
    try:
        processor = AutoImageProcessor.from_pretrained(run_dir)
    except (OSError, ValueError) as err:
        raise UserError(f"no image processor in {run_dir!r} ({str(err).splitlines()[0]}); the run folder must hold "
                        "its preprocessor_config.json") from None
    return model.eval(), processor


def run_data_source(run_dir: str, dataset_name: str | None = None,
                    eval_split: str | None = None) -> DataSource:
    """The run's evaluation data, from the settings it recorded (:func:`hf_vit.config.read_run_config`: a
    ``checkpoint-<N>`` folder of a run uses its run's), with ``dataset_name`` / ``eval_split`` overriding the run's
    when given (``eval_split=""``: no eval split, carve ``train_val_split`` out of train as training did). The values
    are checked against the settings' declared domains, whether recorded or given here."""
    try:
        recorded = read_run_config(run_dir)
    except UserError as err:
        raise UserError(f"{err}; or pass --dataset_name") from None
    if recorded is None and dataset_name is None:
        raise UserError(f"{run_dir!r} has no {CONFIG_FILE_NAME}, so its evaluation data is unknown; pass "
                        "--dataset_name (and --eval_split)")
    fields = {f.name for f in dataclasses.fields(DataArguments)}
    data_args = DataArguments(**{k: v for k, v in (recorded or {}).items() if k in fields})
    if dataset_name is not None:
        data_args.dataset_name = dataset_name
    if eval_split is not None:
        data_args.eval_split = eval_split
    if recorded and "split_seed" not in recorded and "seed" in recorded:
        data_args.split_seed = recorded["seed"]  # a run from before split_seed carved its validation with its seed
    check_fields(data_args)
    return DataSource.from_args(data_args)


def _decode(image: dict) -> PIL.Image.Image:
    # open_image applies the EXIF orientation, as datasets and pipeline() do: the image the model is shown upright.
    img = open_image(image)
    img.load()
    return to_rgb(img)


def first_eval_images(source: DataSource, count: int) -> dict:
    """The first ``count`` decodable evaluation images of the run's data, in the dataset's order (deterministic).

    Returns ``{"images": [PIL RGB], "labels": [int], "keys": [example key], "label_names": [str]}``; fewer images
    when the evaluation split holds fewer. Data that cannot be loaded or decoded is a UserError.
    """
    try:
        splits = load_splits(source)
    except (OSError, ValueError, ConnectionError) as err:
        raise UserError(f"cannot load dataset {source.name!r}: {str(err).splitlines()[0]}") from None
    if splits.eval is None:
        raise UserError("the run has no evaluation data (no eval_split and train_val_split=0); pass --eval_split")
    images, labels, keys = [], [], []
    # Rows arrive with the image undecoded ({"bytes", "path"}); an undecodable one is skipped, as evaluation does.
    for row in splits.eval:
        image = row[splits.image_column]
        if not isinstance(image, dict):  # a missing image: skipped, as evaluation skips it
            logger.warning("skipping a row without an image")
            continue
        try:
            images.append(_decode(image))
        except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as err:
            logger.warning("skipping undecodable image %s: %s", example_key(image), err)
            continue
        labels.append(int(row[splits.label_column]))
        keys.append(example_key(image))
        if len(images) == count:
            break
    if not images:
        raise UserError(f"the evaluation split of {source.name!r} holds no decodable images")
    return {"images": images, "labels": labels, "keys": keys, "label_names": list(splits.label_names)}


def _display_pixels(pixel_values: torch.Tensor, processor) -> np.ndarray:
    """Undo the processor's rescale and normalisation: (N, 3, H, W) model input -> (N, H, W, 3) floats in [0, 1]."""
    pixels = pixel_values.float()
    if getattr(processor, "do_normalize", False):
        mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        pixels = pixels * std + mean
    if not getattr(processor, "do_rescale", True):
        pixels = pixels / 255.0
    return pixels.clamp(0, 1).permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------------------------------ figure
def plot_rollout(images: np.ndarray, maps: np.ndarray, titles: list[str], wrong: list[bool]) -> Figure:
    """A grid with one axes per image: ``images`` (N, H, W, 3) in [0, 1] with ``maps`` (N, H, W) in [0, 1] overlaid,
    titled ``titles`` (in red where ``wrong``; a title too long for its cell is broken after its first " / ").
    Returns the Figure (nothing is written)."""
    count = len(images)
    cols = min(count, max(4, math.ceil(math.sqrt(count))))
    rows = math.ceil(count / cols)
    figure = new_figure(figsize=(2.4 * cols, 2.6 * rows), layout="constrained")
    grid = figure.subplots(rows, cols, squeeze=False)
    for i, axes in enumerate(grid.flat):
        if i >= count:
            axes.remove()  # so that figure.axes holds exactly one axes per image
            continue
        axes.imshow(images[i])
        axes.imshow(maps[i], cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        title = titles[i] if len(titles[i]) <= TITLE_LINE else titles[i].replace(" / ", " /\n", 1)
        axes.set_title(title, fontsize=7, color="red" if wrong[i] else "black")
        axes.set_axis_off()
    return figure


def rollout_figure(run_dir: str, images: int = 8, output: str | None = None, dataset_name: str | None = None,
                   eval_split: str | None = None, head_fusion: str = "mean", discard_ratio: float = 0.0) -> dict:
    """Attention rollout for the first ``images`` evaluation images of a ViT run folder, plotted and written.

    ``output``: where the figure goes (default ``<RUN_DIR>-eval/attention_rollout.png``; the format follows the suffix);
    ``dataset_name`` / ``eval_split`` override the run's data (``eval_split=""`` carves the run's
    ``train_val_split`` out of train); ``head_fusion`` / ``discard_ratio`` as in :func:`attention_rollout`.
    Returns ``{"output": path written, "figure": Figure, "titles", "predictions", "labels" (class names),
    "correct" (bools), "keys" (example keys), "maps": (N, grid, grid) tensor of the CLS row over the patches,
    "logits": (N, classes) tensor}``. Every input error is a UserError raised before anything is written.
    """
    if not 1 <= images <= MAX_IMAGES:
        raise UserError(f"--images must be between 1 and {MAX_IMAGES} (got {images})")
    if head_fusion not in HEAD_FUSIONS:
        raise UserError(f"--head_fusion must be one of {list(HEAD_FUSIONS)} (got {head_fusion!r})")
    if not 0.0 <= discard_ratio < 1.0:
        raise UserError(f"--discard_ratio must be in [0, 1) (got {discard_ratio})")
    check_run_folder(run_dir)  # what to read first, then where to write: both before anything runs
    output = output or str(analysis_output_dir(run_dir) / DEFAULT_OUTPUT_NAME)
    check_analysis_output(output, "--output")
    suffix = os.path.splitext(output)[1].lstrip(".").lower()
    formats = new_figure().canvas.get_supported_filetypes()
    if suffix not in formats:
        raise UserError(f"--output {output!r} needs a file suffix matplotlib writes ({', '.join(sorted(formats))})")

    model, processor = load_run_model(run_dir)
    source = run_data_source(run_dir, dataset_name, eval_split)
    check_outside_dataset(output, source, "--output")
    try:
        data = first_eval_images(source, images)
    except UserError as err:
        if dataset_name is not None:
            raise
        raise UserError(f"{err}; if the run's data lies elsewhere, pass --dataset_name (and --eval_split)") from None
    model_labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if model_labels != data["label_names"]:
        def shorten(names):
            return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

        raise UserError(f"the model in {run_dir!r} predicts {len(model_labels)} classes ({shorten(model_labels)}) but "
                        f"dataset {source.name!r} has {len(data['label_names'])} "
                        f"({shorten(data['label_names'])}); pass the --dataset_name the run was trained on")
    if len(data["images"]) < images:
        logger.warning("the evaluation data holds only %d images; showing those", len(data["images"]))

    pixel_values = processor(images=data["images"], return_tensors="pt")["pixel_values"]
    if torch.cuda.is_available():
        model.to("cuda")
    logits, rollout = model_rollout(model, pixel_values, head_fusion, discard_ratio)
    maps = cls_rollout_map(rollout)
    predictions = [model_labels[i] for i in logits.argmax(dim=-1).tolist()]
    truths = [model_labels[i] if 0 <= i < len(model_labels) else "?" for i in data["labels"]]
    correct = [p == t for p, t in zip(predictions, truths)]
    # An unknown true label (-1 in unlabelled test splits) cannot make a prediction wrong.
    wrong = [not ok and t != "?" for ok, t in zip(correct, truths)]
    titles = [f"pred: {p} / true: {t}" + (" (wrong)" if w else "") for p, t, w in zip(predictions, truths, wrong)]

    shown = _display_pixels(pixel_values, processor)
    # Each map upsampled to the model's input size and scaled to its own maximum, so every overlay uses the full range.
    upsampled = torch.nn.functional.interpolate(maps[:, None], size=shown.shape[1:3], mode="bilinear",
                                                align_corners=False)[:, 0]
    upsampled = upsampled / upsampled.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    figure = plot_rollout(shown, upsampled.numpy(), titles, wrong)
    figure.suptitle(f"attention rollout ({head_fusion} over heads, {model.config.num_hidden_layers} layers)",
                    fontsize=9)

    # Written beside the target, flushed and renamed: a failed write never leaves a truncated figure behind.
    with durable.os_errors(output, "nothing was written; pass --output with a writable path"):
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with durable.writing(output, kept="the previous figure (if any) was left as it was") as partial:
        figure.savefig(partial, format=suffix, dpi=100)
    return {"output": output, "figure": figure, "titles": titles, "predictions": predictions, "labels": truths,
            "correct": correct, "keys": data["keys"], "maps": maps, "logits": logits}


# -------------------------------------------------------------------------------------------------------------- CLI
def add_setting(parser: argparse.ArgumentParser, group: type, name: str, unset: str) -> None:
    """Add ``--name``, a text setting of the argument group ``group``, with its declared help and ``unset`` (what
    leaving it out means here); the default is None, so the run's recorded value applies. Its declared domain is
    checked with the run's values (:func:`run_data_source`)."""
    help_text = shared_setting(group, name).metadata["help"]
    parser.add_argument(f"--{name}", default=None, help=f"{help_text} {unset}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m hf_vit.attention",
        description="Attention rollout maps of a ViT run folder's first evaluation images, with predictions.")
    parser.add_argument("run_dir", help="output_dir of a training run (model.safetensors, config.json, ...)")
    parser.add_argument("--images", type=int, default=8, help=f"how many evaluation images (1..{MAX_IMAGES})")
    parser.add_argument("--output", default=None,
                        help=f"figure path (default <RUN_DIR>-eval/{DEFAULT_OUTPUT_NAME}, beside the run folder)")
    # The training flags' declarations (hf_vit.config), unset by default: unset, the run's recorded value is used.
    add_setting(parser, DataArguments, "dataset_name", "Unset: the run's (pass a local copy of it, say).")
    add_setting(parser, DataArguments, "eval_split", "Unset: the run's; \"\" carves train_val_split out of train as "
                "training did.")
    parser.add_argument("--head_fusion", default="mean", choices=HEAD_FUSIONS,
                        help="how each layer's heads are fused (mean: the paper's rollout)")
    parser.add_argument("--discard_ratio", type=float, default=0.0,
                        help="fraction of the weakest attention dropped per layer (0: the paper's rollout)")

    raise_user_errors(parser)  # one `error:` line instead of argparse's usage block
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    # Loading and filtering take seconds here; their progress bars would bury the one line that matters.
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    result = rollout_figure(args.run_dir, args.images, args.output, args.dataset_name, args.eval_split,
                            args.head_fusion, args.discard_ratio)
    print(f"Wrote the attention rollout of {len(result['titles'])} evaluation images to {result['output']} "
          f"({sum(result['correct'])} predicted correctly)", flush=True)
    return result


if __name__ == "__main__":
    run_cli(main)
