"""Plots, the model card and a comparison of finished runs.

As a command, compares training runs from their output directories::

    python -m hf_vit.report runs/vit-tiny runs/vit-small --output_dir runs/comparison

It prints a Markdown table (run, model, params, data, epochs actually run, eval accuracy, top-5, train time) and,
with ``--output_dir``, writes ``comparison.md`` and ``comparison.png`` (eval accuracy against epoch for every run).

The plot helpers return their ``Figure`` (after writing it) so that callers and tests can read the plotted series;
:func:`new_figure`, :func:`plot_runs_against_epoch`, :func:`load_run` and the ``format_*`` helpers are shared with
:mod:`hf_vit.findings`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hf_vit import durable
from hf_vit.config import read_run_config
from hf_vit.errors import UserError, is_secret_name, raise_user_errors, run_cli
from hf_vit.scoring import format_results_table

# The model card's tags; the family's tag (config.json's model_type: "vit", "resnet", ...) goes between these and
# LIBRARY_TAG.
CARD_TAGS = ["image-classification", "vision"]
LIBRARY_TAG = "hf_vit"


def new_figure(**kwargs) -> Figure:
    """A matplotlib ``Figure`` (``kwargs`` as for ``Figure``) on an Agg canvas, ready for ``savefig``."""
    # No pyplot global state and no display needed, so it is safe in any process and thread.
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | os.PathLike) -> None:
    """Write ``figure`` to ``path`` (format from its suffix, 100 dpi) atomically: a failed write (a full disk) leaves
    the previous file and is a one-line error (:mod:`hf_vit.durable`)."""
    with durable.writing(path) as partial:
        figure.savefig(partial, dpi=100, format=Path(path).suffix.lstrip(".") or "png")


def history_series(log_history: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """``(xs, values)`` of the records of ``log_history`` that carry ``key`` (and ``x``), in their order."""
    points = [(record[x], record[key]) for record in log_history
              if record.get(key) is not None and record.get(x) is not None]
    return [position for position, _ in points], [value for _, value in points]


def plot_learning_curve(log_history: list[dict[str, Any]], path: str | os.PathLike) -> Figure:
    """Write a PNG with train loss, accuracies and learning rate against the optimisation step; returns the figure.

    ``log_history`` is the list saved as ``output_dir/log_history.json``: train records carry ``train_loss``,
    ``learning_rate`` and (from trainers that measure it) ``train_accuracy``, eval records ``eval_accuracy`` (and
    ``eval_ema_accuracy`` when an EMA model is evaluated). The figure's three axes are loss, accuracy and learning
    rate; every line is labelled with what it shows.
    """
    def series(key: str) -> tuple[list[float], list[float]]:
        return history_series(log_history, key)

    figure = new_figure(figsize=(8, 9), layout="constrained")
    loss_axes, accuracy_axes, lr_axes = figure.subplots(3, 1, sharex=True)
    loss_axes.plot(*series("train_loss"), label="train loss")
    if any("eval_loss" in record for record in log_history):
        loss_axes.plot(*series("eval_loss"), marker="o", label="eval loss")
    loss_axes.set_ylabel("loss")
    for key, label, marker in (("train_accuracy", "train accuracy", None), ("eval_accuracy", "eval accuracy", "o"),
                               ("eval_ema_accuracy", "eval accuracy (EMA)", "o")):
        if any(key in record for record in log_history):
            accuracy_axes.plot(*series(key), marker=marker, label=label)
    accuracy_axes.set_ylabel("accuracy")
    lr_axes.plot(*series("learning_rate"), label="learning rate")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    for axes in (loss_axes, accuracy_axes):
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    for axes in (loss_axes, accuracy_axes, lr_axes):
        axes.grid(alpha=0.3)
    save_figure(figure, path)
    return figure


def plot_confusion_matrix(cm: list[list[int]], label_names: list[str], path: str | os.PathLike) -> Figure:
    """Write a PNG of the confusion matrix (rows = true class, columns = predicted class); returns the figure.

    Colours show each row normalised to the fraction of its true class, so rare classes stay readable; counts are
    printed in the cells and class names on the axes only while there are few enough classes to read them.
    """
    counts = [[int(value) for value in row] for row in cm]
    num_labels = len(counts)
    fractions = [[value / max(sum(row), 1) for value in row] for row in counts]
    side = min(max(4.0, 0.5 * num_labels + 2), 16.0)
    figure = new_figure(figsize=(side + 1.5, side), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, label="fraction of true class")
    if num_labels <= 30:
        axes.set_xticks(range(num_labels), label_names, rotation=45, ha="right")
        axes.set_yticks(range(num_labels), label_names)
    if num_labels <= 20:
        for i, row in enumerate(counts):
            for j, value in enumerate(row):
                colour = "white" if fractions[i][j] > 0.5 else "black"
                axes.text(j, i, str(value), ha="center", va="center", color=colour, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    save_figure(figure, path)
    return figure


def _headline(results: dict[str, Any]) -> tuple[float | None, int | None, float | None]:
    """(accuracy, k, top-k accuracy) from ``compute_metrics`` output or a flat ``eval_``-prefixed results dict."""
    # float(): a NumPy scalar would be written to the card's YAML as a Python object tag.
    accuracy = results.get("accuracy", results.get("eval_accuracy"))
    accuracy = None if accuracy is None else float(accuracy)
    for key, value in results.items():
        match = re.fullmatch(r"(?:eval_)?top(\d+)_accuracy", key)
        if match and value is not None:
            return accuracy, int(match.group(1)), float(value)
    return accuracy, None, None


def _without_secrets(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without any token-like key (:func:`hf_vit.errors.is_secret_name`), at any depth."""
    return {
        key: _without_secrets(value) if isinstance(value, dict) else value
        for key, value in config.items()
        if not is_secret_name(str(key))
    }


def _markdown_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def format_duration(seconds: float | None) -> str:
    """``12m 34s`` / ``1h 02m`` for a number of seconds; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def write_model_card(
    output_dir: str | os.PathLike,
    config: dict[str, Any],
    results: dict[str, Any],
    label_names: list[str],
    hardware: str,
    train_runtime: float,
    dataset_name: str,
    model_name: str,
    model_type: str | None = None,
) -> ModelCard:
    """Write ``output_dir/README.md``, a Hub model card, and return it.

    The YAML header carries the library, tags, dataset, and a ``model-index`` with the accuracy and top-k accuracy
    from ``results`` (the output of :func:`hf_vit.scoring.compute_metrics`, or the flat ``eval_*`` dict of
    ``all_results.json``), so ``ModelCard.load(...).data.eval_results`` reads them back. The body lists the
    resolved hyper-parameters of ``config`` except any token-like key, the hardware and training time,
    and the results table.

    ``model_type`` is the model's ``config.model_type`` ("vit", "resnet", "convnext", ...): it becomes a tag and names
    the family in the text. When it is not given, a ``model_preset`` starting with "vit" counts as a ViT; anything
    else is described without a family rather than called a Vision Transformer.
    """
    config = _without_secrets(config)
    preset = config.get("model_preset")
    if model_type is None and str(preset or "").startswith("vit"):
        model_type = "vit"
    accuracy, k, top_k = _headline(results)
    metric_fields = dict(task_type="image-classification", task_name="Image Classification",
                         dataset_type=dataset_name, dataset_name=dataset_name)
    eval_results = []
    if accuracy is not None:
        eval_results.append(EvalResult(metric_type="accuracy", metric_name="Accuracy", metric_value=accuracy,
                                       **metric_fields))
    if top_k is not None:
        eval_results.append(EvalResult(metric_type=f"top_{k}_accuracy", metric_name=f"Top-{k} accuracy",
                                       metric_value=top_k, metric_args={"k": k}, **metric_fields))
    base_model = config.get("model_name_or_path")
    # base_model must name a Hub repo; a local checkpoint path is not valid metadata, so it stays in the body only.
    if not base_model or os.path.exists(str(base_model)) or str(base_model).startswith((".", "/", "~")):
        base_model = None
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=[*CARD_TAGS, *([model_type] if model_type else []), LIBRARY_TAG],
        datasets=[dataset_name],
        metrics=["accuracy"],
        base_model=base_model,
        model_name=model_name,
        eval_results=eval_results or None,
    )

    source = config.get("model_name_or_path")
    origin = f"fine-tuned from `{source}`" if source else "trained from scratch"
    from hf_vit.models.presets import FAMILY_NAMES

    family = FAMILY_NAMES.get(model_type, model_type) if model_type else None
    architecture = f"{preset} ({family})" if preset and family else preset or family
    article = f"A {architecture}" if architecture else "An"
    hyperparameters = "\n".join(
        ["| hyper-parameter | value |", "|---|---|"]
        + [f"| {key} | {_markdown_value(value)} |" for key, value in sorted(config.items())]
    )
    headline = []
    if accuracy is not None:
        headline.append(f"accuracy **{accuracy:.4f}**")
    if top_k is not None:
        headline.append(f"top-{k} accuracy **{top_k:.4f}**")
    body = f"""
# {model_name}

{article} image classifier over {len(label_names)} classes, {origin} on `{dataset_name}` with hf_vit
(Transformers, Accelerate, Datasets). On the evaluation split it reaches
{" and ".join(headline) if headline else "no recorded accuracy"}.

## Training

- Hardware: {hardware}
- Training time: {format_duration(train_runtime)}

### Hyper-parameters

{hyperparameters}

## Results

{format_results_table(results, label_names)}
"""
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
    output_dir = Path(output_dir)
    with durable.os_errors(output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
    durable.write_text(output_dir / "README.md", str(card))
    return card


# ---- comparison of runs ----

def _read(path: Path, what: str) -> Any:
    """A JSON file of a run folder (its train_config.yaml is config.read_run_config's)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {what} {path}: {err}") from err


def _count_parameters(run_dir: Path, results: dict[str, Any]) -> int | None:
    if results.get("num_parameters") is not None:
        return int(results["num_parameters"])
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="numpy") as handle:
            return sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    except (OSError, SafetensorError) as err:
        raise UserError(f"cannot read the weights {str(weights)!r} ({(str(err).splitlines() or ['damaged'])[0]}); the "
                        "file is damaged or incomplete: copy the run again or leave it out of the report") from None


def load_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a finished run folder (one that holds ``all_results.json``); a folder that is not one is a UserError.

    Returns ``{"dir": Path, "results": all_results.json, "config": train_config.yaml (or {}), "history":
    log_history.json (or []), "model_type": config.json's model_type (or None), "model": the preset, checkpoint or
    model type it trained, "num_parameters": from the results or counted in model.safetensors (or None)}``.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass the output_dir of a training run.")
    if not (path / "all_results.json").is_file():
        raise UserError(f"{run_dir} has no all_results.json; pass the output_dir of a finished training run.")
    results = _read(path / "all_results.json", "results file")
    config = read_run_config(path, known_only=False) or {}
    history = _read(path / "log_history.json", "log history") if (path / "log_history.json").is_file() else []
    model_config = _read(path / "config.json", "model config") if (path / "config.json").is_file() else {}
    if not all(isinstance(item, dict) for item in (results, config or {}, model_config or {})) \
            or not isinstance(history, list):
        raise UserError(f"{run_dir} holds a results, config or log-history file of an unexpected shape.")
    config, model_type = config or {}, (model_config or {}).get("model_type")
    return {
        "dir": path,
        "results": results,
        "config": config,
        "history": history,
        "model_type": model_type,
        "model": config.get("model_preset") or config.get("model_name_or_path") or model_type or "-",
        "num_parameters": _count_parameters(path, results),
    }


def format_count(count: int | None) -> str:
    """``5.7M`` / ``147.6K`` for a parameter count; ``-`` when unknown."""
    if count is None:
        return "-"
    return f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count / 1e3:.1f}K"


def format_epochs(epochs: Any) -> str:
    """Epochs actually run (a float: global_step / steps per epoch) to two decimals, without trailing zeros."""
    return f"{round(epochs, 2):g}" if isinstance(epochs, (int, float)) else "-"


def _format_metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def comparison_table(runs: list[dict[str, Any]], names: list[str]) -> str:
    """Markdown table with one row per run loaded by :func:`load_run`; ``epochs`` are those actually run."""
    lines = [
        "| run | model | params | data | epochs | eval accuracy | top-5 | train time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in zip(names, runs):
        config, results = run["config"], run["results"]
        data = str(config.get("dataset_name", "-"))
        fraction = config.get("train_fraction")
        if isinstance(fraction, (int, float)) and fraction < 1:
            data += f" ({fraction:.0%})"
        accuracy, k, top_k = _headline(results)
        top_k_cell = _format_metric(top_k) + (f" (top-{k})" if k not in (None, 5) else "")
        cells = [name, run["model"], format_count(run["num_parameters"]), data, format_epochs(results.get("epoch")),
                 _format_metric(accuracy), top_k_cell, format_duration(results.get("train_runtime"))]
        lines.append("| " + " | ".join(_markdown_value(cell) for cell in cells) + " |")
    return "\n".join(lines)


def plot_runs_against_epoch(histories: dict[str, list[dict[str, Any]]], keys: dict[str, str],
                            path: str | os.PathLike) -> Figure:
    """Write a PNG with one panel per ``keys`` entry (``{log_history key: axis label}``), side by side, and one line
    per run of ``histories`` (``{run name: log_history}``) in each, against the epoch; returns the figure.

    A run without a key in its history has no line in that panel; a panel with no line says so.
    """
    figure = new_figure(figsize=(4.5 * len(keys) + 1, 4.5), layout="constrained")
    panels = figure.subplots(1, len(keys), squeeze=False)[0]
    legend = {}
    for axes, (key, label) in zip(panels, keys.items()):
        for index, (name, history) in enumerate(histories.items()):
            epochs, values = history_series(history, key, x="epoch")
            if values:
                # One colour per run in every panel, also when a run lacks a key in some panel.
                (line,) = axes.plot(epochs, values, color=f"C{index % 10}", label=name, markersize=3,
                                    marker="o" if key.startswith("eval_") else None)
                legend.setdefault(name, line)
        if not axes.get_lines():
            axes.text(0.5, 0.5, f"no {key} recorded", ha="center", va="center", transform=axes.transAxes)
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
    if legend:
        figure.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=min(len(legend), 4),
                      fontsize=8)
    save_figure(figure, path)
    return figure


def plot_comparison(runs: list[dict[str, Any]], names: list[str], path: str | os.PathLike) -> Figure:
    """Write a PNG of eval accuracy against epoch, one line per run; returns the figure."""
    return plot_runs_against_epoch({name: run["history"] for name, run in zip(names, runs)},
                                   {"eval_accuracy": "eval accuracy"}, path)


def _run_names(run_dirs: list[str]) -> list[str]:
    # Directory names read best; fall back to the paths as given when two runs share a name.
    names = [Path(run_dir).resolve().name for run_dir in run_dirs]
    return names if len(set(names)) == len(names) else list(run_dirs)


def main(argv: list[str] | None = None) -> str:
    parser = raise_user_errors(argparse.ArgumentParser(prog="python -m hf_vit.report",
                                                       description=__doc__.split("\n\n")[0]))
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of a finished training run")
    parser.add_argument("--output_dir", default=None, help="write comparison.md and comparison.png here (not into "
                                                           "a run folder; the two are replaced together)")
    args = parser.parse_args(argv)
    if args.output_dir:  # checked before any run is read: a bad place must not cost the work
        from hf_vit.run_dir import check_analysis_output

        check_analysis_output(args.output_dir, "--output_dir")

    runs = [load_run(run_dir) for run_dir in args.run_dirs]
    if args.output_dir:  # never into the data a run read: its files would become part of that dataset
        from hf_vit.run_dir import check_outside_dataset

        for run in runs:
            check_outside_dataset(args.output_dir, str(run["config"].get("dataset_name") or ""), "--output_dir")
    names = _run_names(args.run_dirs)
    table = comparison_table(runs, names)
    print(table)
    if args.output_dir:
        durable.write_files(args.output_dir, {
            "comparison.png": lambda path: plot_comparison(runs, names, path),
            "comparison.md": f"# Run comparison\n\n{table}\n\n![eval accuracy against epoch](comparison.png)\n",
        }, kept="the previous comparison there (if any) was left whole")
    return table


if __name__ == "__main__":
    run_cli(main)
