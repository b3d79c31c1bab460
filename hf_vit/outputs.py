"""What a finished run leaves in ``output_dir``: the model and its image processor, ``all_results.json``,
``eval_results.json``, ``log_history.json``, the plots and the model card (the README's "What a run leaves").
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from . import durable
from .predictions import write_predictions
from .run_dir import PREDICTION_FILES
from .scoring import eval_results


def hardware_description(accelerator) -> str:
    """The processes, device and precision a run used, for the model card."""
    device = torch.cuda.get_device_name() if accelerator.device.type == "cuda" else "CPU"
    return (f"{accelerator.num_processes} x {device} ({platform.processor() or platform.machine()}), "
            f"mixed_precision={accelerator.mixed_precision}")


def write_final_outputs(output_dir: str, model, state_dict, processor, results: dict, eval_metrics: dict | None,
                        final_weights: str, log_history: list, label_names: list[str], config: dict,
                        hardware: str, predictions: dict[str, list] | None = None) -> None:
    """Write every final file of a run (main process only): ``model`` with ``state_dict`` (None: the model's own),
    ``results`` as all_results.json, ``eval_metrics`` (:func:`hf_vit.scoring.evaluate_classifier`'s dict, or None
    when there was no evaluation) as eval_results.json and the confusion-matrix plot, the log history and its
    learning curve, the model card, and ``predictions`` (``{set: rows}``, sets named as in
    :data:`hf_vit.run_dir.PREDICTION_FILES`) as CSV files (:func:`hf_vit.predictions.write_predictions`). Called on
    the staging folder of :class:`hf_vit.run_dir.FinalOutputs`, which commits them as a set; each file is also written through :mod:`hf_vit.durable`."""
    from .report import plot_confusion_matrix, plot_learning_curve, write_model_card

    out = Path(output_dir)
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    processor.save_pretrained(out)
    durable.write_json(out / "all_results.json", results, indent=2)
    durable.write_json(out / "log_history.json", log_history, indent=1)
    if eval_metrics is not None:
        details = {**eval_results(eval_metrics), "eval_weights": final_weights, "per_class": eval_metrics["per_class"],
                   "confusion_matrix": eval_metrics["confusion_matrix"]}
        durable.write_json(out / "eval_results.json", details, indent=2)
        plot_confusion_matrix(eval_metrics["confusion_matrix"], label_names, out / "confusion_matrix.png")
    for name, rows in (predictions or {}).items():
        write_predictions(out / PREDICTION_FILES[name], rows)
    plot_learning_curve(log_history, out / "learning_curve.png")
    write_model_card(out, config, results, label_names, hardware, results["train_runtime"], config["dataset_name"],
                     config.get("model_name_or_path") or config.get("model_preset"), model_type=model.config.model_type)
