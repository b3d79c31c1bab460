"""Evaluate an image classifier (ViT or CNN) on one split of a dataset.

    python -m hf_vit.eval --model_name_or_path outputs/cifar10_vit_tiny --dataset_name uoft-cs/cifar10 \
        --eval_split test [--per_device_eval_batch_size 256] [--output_dir DIR]
    accelerate launch -m hf_vit.eval ...            # the same numbers on any number of processes

The model is any checkpoint this pipeline wrote, or any ViT, ResNet or ConvNeXt image classifier whose labels are the
dataset's class names in the same order. Preprocessing comes from the checkpoint's own image processor, and the loop,
the sharding and the metrics are the training loop's (``hf_vit.scoring.evaluate_classifier`` on
``hf_vit.data.build_eval_data``), so a checkpoint scores here exactly what it scored at the end of training on the same
images.

``--train_val_split F --split_seed S`` evaluates the validation slice a training run with the same
``train_val_split`` and ``split_seed`` carved out of ``--eval_split`` (how a train-only dataset such as CIFAR-10 is
validated). Writes ``eval_results.json``, ``confusion_matrix.json`` and ``confusion_matrix.png`` to ``--output_dir``
and prints the results table. The default output folder is a sibling of the model folder, ``<run>-eval/`` (for a checkpoint,
``<run>-eval/checkpoint-<N>/``; for a Hub id, ``./eval_<name>``): a run folder is written only by its own run, so
this command never writes into one or into a checkpoint, and refuses an ``--output_dir`` that is a run folder, lies
inside a checkpoint or inside a run in progress, or lies inside the dataset. The three files are written as a set
(all written and flushed before any replaces an older one), so a full disk leaves the previous results whole.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from accelerate import PartialState
from safetensors import SafetensorError
from transformers import AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel

from . import durable
from .config import (TEXT, ArgumentParser, DataArguments, ModelArguments, TrainArguments, check_fields, setting,
                     shared_setting)
from .data import DataSource, ImageSpec, build_eval_data, load_splits, open_dataset
from .errors import UserError, raise_user_errors, run_cli
from .models import checkpoint_config, is_vit
from .run_dir import analysis_output_dir, check_analysis_output, check_outside_dataset
from .runtime import build_accelerator, cpu_only_distributed, main_process_first, setup_logging
from .scoring import eval_results, evaluate_classifier, format_results_table

logger = logging.getLogger("hf_vit")


@dataclass
class EvalArguments:
    """What to evaluate on which data. Every flag the training commands also take is their declaration
    (:func:`hf_vit.config.shared_setting`: the same name, help, allowed values and default), except where noted."""

    # Required here: an evaluation has no preset to build and no default dataset to guess.
    model_name_or_path: str = shared_setting(
        ModelArguments, "model_name_or_path", default=dataclasses.MISSING,
        help="Local folder or Hub id of an image classifier (ViT, ResNet, ConvNeXt) with its image processor.")
    dataset_name: str = shared_setting(DataArguments, "dataset_name", default=dataclasses.MISSING)
    eval_split: Optional[str] = shared_setting(DataArguments, "eval_split",
                                               help="Split to evaluate (e.g. test, validation).")
    dataset_config_name: Optional[str] = shared_setting(DataArguments, "dataset_config_name")
    # 0 here: an evaluation reads its whole split unless told to score a training run's carved validation slice.
    train_val_split: float = shared_setting(
        DataArguments, "train_val_split", default=0.0,
        help="Evaluate only the validation slice (fraction, or count if >= 1) that training carves out of eval_split "
             "with the same train_val_split and split_seed; 0 evaluates the whole split.")
    split_seed: int = shared_setting(DataArguments, "split_seed")
    per_device_eval_batch_size: int = shared_setting(TrainArguments, "per_device_eval_batch_size")
    max_eval_samples: Optional[int] = shared_setting(DataArguments, "max_eval_samples")
    # Not the run's output_dir: where this command's results go, never a run folder.
    output_dir: Optional[str] = setting(
        None, TEXT, "Where results go (default: <run>-eval beside the model folder, <run>-eval/checkpoint-N for a "
                    "checkpoint, ./eval_<name> for a Hub id; never a run or checkpoint folder).")
    image_column_name: Optional[str] = shared_setting(DataArguments, "image_column_name")
    label_column_name: Optional[str] = shared_setting(DataArguments, "label_column_name")
    dataloader_num_workers: int = shared_setting(DataArguments, "dataloader_num_workers")
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = shared_setting(TrainArguments, "mixed_precision")


def default_output_dir(model_name_or_path: str) -> str:
    """A sibling of the model folder, ``<run>-eval`` (``<run>-eval/checkpoint-<N>`` for a checkpoint of a run), never
    the run folder itself; ``./eval_<name>`` for a Hub id (:func:`hf_vit.run_dir.analysis_output_dir`)."""
    return str(analysis_output_dir(model_name_or_path))


def _shorten(names: list[str], keep: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:keep])
    return f"[{shown}{', ...' if len(names) > keep else ''}]"


def check_labels(model_labels: list[str], data_labels: list[str], model_name: str, dataset_name: str) -> None:
    """Raise a one-line UserError unless the model's classes are the dataset's class names in the same order."""
    if model_labels == data_labels:
        return
    if len(model_labels) != len(data_labels):
        raise UserError(
            f"model {model_name!r} predicts {len(model_labels)} classes {_shorten(model_labels)} but dataset "
            f"{dataset_name!r} has {len(data_labels)} classes {_shorten(data_labels)}; evaluate on a dataset with "
            "the model's labels"
        )
    i = next(i for i, (a, b) in enumerate(zip(model_labels, data_labels)) if a != b)
    raise UserError(
        f"class {i} is {model_labels[i]!r} in model {model_name!r} but {data_labels[i]!r} in dataset "
        f"{dataset_name!r}; the labels must be the same names in the same order"
    )


def data_source(args: EvalArguments) -> DataSource:
    """The examples to score: the split, or the validation slice training carves out of it (carving treats the split
    as the train split of the training run, so the slice is the same examples)."""
    carve = args.train_val_split > 0
    return DataSource.named(
        args.dataset_name, config_name=args.dataset_config_name, train_split=args.eval_split,
        eval_split=None if carve else args.eval_split, train_val_split=args.train_val_split, split_seed=args.split_seed,
        image_column_name=args.image_column_name, label_column_name=args.label_column_name,
        max_eval_samples=args.max_eval_samples)


def _load_model(path: str, config) -> tuple[PreTrainedModel, object]:
    try:
        # use_safetensors: a pickle (pytorch_model.bin) is never loaded (docs/reliability.md, Security).
        extra = {"attn_implementation": "sdpa"} if is_vit(config) else {}
        model, info = AutoModelForImageClassification.from_pretrained(path, config=config, output_loading_info=True,
                                                                      use_safetensors=True, **extra)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise UserError(f"cannot load weights from {path!r} ({(str(err).splitlines() or [type(err).__name__])[0]}); "
                        "the weight file is damaged or incomplete: copy it again or evaluate another checkpoint") \
            from None
    if info.get("missing_keys") or info.get("mismatched_keys"):
        missing = sorted(info.get("missing_keys", [])) + [k for k, *_ in info.get("mismatched_keys", [])]
        raise UserError(
            f"{path!r} is not a complete image classifier: {missing[:4]} would be randomly initialised; "
            "evaluate a checkpoint with a trained classification head"
        )
    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(
            f"no image processor in {path!r} ({str(err).splitlines()[0]}); the eval needs the checkpoint's "
            "preprocessor_config.json"
        ) from None
    return model, processor


def evaluate(args: EvalArguments) -> dict:
    """Evaluate ``args.model_name_or_path`` on the chosen split; returns (and writes) the eval results."""
    check_fields(args)  # the same declared domains as the training commands'
    output_dir = Path(args.output_dir or default_output_dir(args.model_name_or_path))
    # Where the results go is checked before anything runs: a bad place must not cost a whole evaluation.
    check_analysis_output(output_dir, "--output_dir")
    source = data_source(args)
    check_outside_dataset(output_dir, source, "--output_dir")
    config = checkpoint_config(args.model_name_or_path)
    state = PartialState(cpu=cpu_only_distributed())
    with main_process_first(state):  # the main process builds the datasets cache, the others reuse it
        loaded = open_dataset(source)
        splits = list(loaded.keys())
        if args.eval_split is None:
            raise UserError(f"pass --eval_split; dataset {args.dataset_name!r} has splits {splits}")
        if args.eval_split not in splits:
            raise UserError(f"split {args.eval_split!r} not found; dataset {args.dataset_name!r} has splits {splits}")
        data = load_splits(source, loaded)
    check_labels([config.id2label[i] for i in range(config.num_labels)], data.label_names, args.model_name_or_path,
                 args.dataset_name)
    if not data.num_eval_examples:
        raise UserError(f"split {args.eval_split!r} of {args.dataset_name!r} leaves no examples to evaluate "
                        f"(train_val_split={args.train_val_split}, max_eval_samples={args.max_eval_samples})")
    model, processor = _load_model(args.model_name_or_path, config)
    try:
        spec = ImageSpec.from_processor(processor)
    except (AttributeError, KeyError, TypeError) as err:
        raise UserError(f"the image processor of {args.model_name_or_path!r} gives no square size, mean and std "
                        f"({err}); evaluate a ViT checkpoint with a ViT/DeiT image processor") from None

    acc = build_accelerator(args.mixed_precision)
    eval_data = build_eval_data(data, spec, args.dataloader_num_workers, args.per_device_eval_batch_size, acc)
    what = (f"the {args.train_val_split:g} validation slice (split_seed {args.split_seed}) of split {args.eval_split!r}"
            if args.train_val_split > 0 else f"split {args.eval_split!r}")
    logger.info("Evaluating %s on %s of %s: %d examples, %d process(es), image size %d, mean %s, std %s",
                args.model_name_or_path, what, args.dataset_name, data.num_eval_examples, acc.num_processes,
                spec.image_size, spec.mean, spec.std)
    mean = torch.tensor(spec.mean, device=acc.device)
    std = torch.tensor(spec.std, device=acc.device)
    metrics = evaluate_classifier(model.to(acc.device), eval_data, acc, mean, std, data.label_names)
    if metrics is None:
        raise UserError(f"none of the {data.num_eval_examples} examples of {what} of {args.dataset_name!r} could be "
                        "used (see the warning above); check the images and labels")

    results = {**eval_results(metrics), "per_class": metrics["per_class"],
               "confusion_matrix": metrics["confusion_matrix"], "model_name_or_path": args.model_name_or_path,
               "dataset_name": args.dataset_name, "eval_split": args.eval_split,
               "train_val_split": args.train_val_split, "split_seed": args.split_seed}
    if acc.is_main_process:
        _write(results, data.label_names, output_dir)
    acc.wait_for_everyone()
    return results


def _write(results: dict, label_names: list[str], out: Path) -> None:
    from .report import plot_confusion_matrix

    durable.write_files(out, {
        "eval_results.json": json.dumps(results, indent=2),
        "confusion_matrix.json": json.dumps({"label_names": label_names,
                                             "confusion_matrix": results["confusion_matrix"]}),
        "confusion_matrix.png": lambda path: plot_confusion_matrix(results["confusion_matrix"], label_names, path),
    }, kept="the previous results there (if any) were left whole")
    table = {k: v for k, v in results.items() if k.startswith("eval_") or k == "per_class"}
    print(format_results_table(table, label_names), flush=True)
    print(f"Wrote eval_results.json, confusion_matrix.json and confusion_matrix.png to {out}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(EvalArguments)
    parser.prog = "python -m hf_vit.eval"

    raise_user_errors(parser)  # one `error:` line instead of argparse's usage block
    (args,) = parser.parse_args_into_dataclasses(list(sys.argv[1:] if argv is None else argv))
    setup_logging()
    return evaluate(args)


if __name__ == "__main__":
    run_cli(main)
