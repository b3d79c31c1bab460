"""Studies: a set of training runs, and the course report's findings regenerated from them, as one command.

    python -m hf_vit.study studies/cifar10_cpu_findings.yaml --output_dir outputs/cpu_study \\
        [--set dataset_name=../shared/datasets/cifar10] [--set RUN.learning_rate=3e-4] [--dry_run]
    accelerate launch -m hf_vit.study studies/report_scale.yaml --output_dir /data/report_scale
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml -m hf_vit.study studies/report_scale.yaml \\
        --output_dir /tmp/rehearsal --rehearse

A study file (YAML; the full format is in docs/studies.md) lists ``runs`` — each a ``recipe`` plus flags, optionally a
``grid`` that expands one entry into several runs — study-wide ``defaults`` (flags for every run, above the recipe and
below a run's own flags), and ``datasets`` to derive before the runs (chosen classes of a source dataset, split per
class into train and validation, written with ``save_to_disk`` under ``DIR/data/``). A value ``${runs.NAME}`` is the
folder of an earlier run (fine-tune from it), ``${datasets.NAME}`` a derived dataset, ``${defaults.KEY}`` a default.

The runs train one after another in this process, through the same ``parse_config`` + ``train`` as run_finetune.py,
each into ``DIR/<name>``. A run whose folder holds ``all_results.json`` is done and skipped; an interrupted one resumes
from its newest checkpoint (``--resume_from_checkpoint latest``) or, without one, starts again
(``--overwrite_output_dir true``). So a killed study restarted with the same command finishes the rest; a finished
run made with other settings than the study now gives is an error instead of a silent mix. Then the main process
writes ``DIR/findings.md`` and its plots (:mod:`hf_vit.findings`).

``--rehearse`` runs the same study through the same code with tiny models, a few steps per run and generated
stand-ins for the data this machine cannot reach (:mod:`hf_vit.rehearsal`; docs/rehearsal.md): a run that fails is
reported and the rehearsal goes on with the runs that do not start from it, so one rehearsal lists every failure.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import shlex
import time
from pathlib import Path

from hf_vit import durable
from hf_vit.checkpoint import complete_checkpoints
from hf_vit.config import CONFIG_FILE_NAME, load_recipe, parse_config, read_run_config, validate
from hf_vit.errors import UserError, raise_user_errors, run_cli
from hf_vit.predictions import lines_fingerprint
from hf_vit.runtime import fresh_accelerate_state, main_process_first
from hf_vit.study_file import STUDY_MANAGED, DerivedDataset, Study, StudyRun, load_study

DATASET_SPEC_FILE = "study_dataset.json"
STUDY_STATE_DIR = ".study"  # DIR/.study/<run>.json: the inputs each run started from (run_inputs)
# Flags that change how a run is executed or logged, not what it computes: a finished run is not stale over them.
HOW_FLAGS = frozenset({*STUDY_MANAGED, "dataloader_num_workers", "per_device_eval_batch_size", "eval_steps",
                       "report_to", "logging_steps", "checkpointing_steps", "checkpoints_total_limit",
                       "per_device_train_batch_size", "push_to_hub", "hub_model_id", "hub_private_repo", "hub_strategy",
                       "hub_token"})


# --------------------------------------------------------------------------------------------------- run folders
def run_status(run: StudyRun) -> str:
    """``done`` (all_results.json), ``resume`` (a complete checkpoint-<step> folder, the one ``latest`` resumes),
    ``restart`` (an interrupted run without one) or ``new``."""
    folder = run.output_dir
    if (folder / "all_results.json").is_file():
        return "done"
    if complete_checkpoints(folder):
        return "resume"
    return "restart" if (folder / CONFIG_FILE_NAME).is_file() else "new"


STATUS_FLAGS = {"resume": ["--resume_from_checkpoint", "latest"], "restart": ["--overwrite_output_dir", "true"]}


def check_run(study: Study, run: StudyRun) -> None:
    """Parse and validate the run's flags; for a done or resumable run, check its folder was made with the settings
    the study gives now (the keys the recipe and the study set, but how-to-run flags and folder references)."""
    try:
        cfg = parse_config(run.argv())
        validate(cfg)
    except UserError as err:
        raise UserError(f"{study.path}: run {run.name!r}: {err}") from None
    saved_path = run.output_dir / CONFIG_FILE_NAME
    if run_status(run) not in ("done", "resume") or not saved_path.is_file():
        return
    saved = read_run_config(run.output_dir) or {}
    now = cfg.to_dict()
    keys = set(run.flags) | set(load_recipe(run.recipe) if run.recipe else {})
    for key in sorted(keys - HOW_FLAGS - run.referenced):
        if key in saved and saved[key] != now[key]:
            raise UserError(f"{study.path}: run {run.name!r} in {run.output_dir} was made with {key}={saved[key]!r} "
                            f"but the study now gives {key}={now[key]!r}; delete that folder to redo the run, or "
                            "restore the old value")


def run_inputs(study: Study, run: StudyRun) -> dict:
    """What a run's result depends on: its whole resolved config (but how-to-run flags and folder paths), the content
    fingerprint of each derived dataset it reads and the SHA-256 of each upstream run's all_results.json."""
    cfg = parse_config(run.argv())
    config = {key: value for key, value in sorted(cfg.to_dict().items())
              if key not in HOW_FLAGS and key not in run.referenced}
    derived = {str(d.path): d for d in study.datasets}
    datasets, upstream = {}, {}
    for key in sorted(run.referenced):
        value = run.flags[key]
        if value in derived:
            datasets[key] = dataset_fingerprint(derived[value])
        else:
            results = Path(value) / "all_results.json"
            upstream[key] = hashlib.sha256(results.read_bytes()).hexdigest() if results.is_file() else None
    return json.loads(json.dumps({"config": config, "datasets": datasets, "upstream": upstream}, default=str))


def check_inputs(study: Study, run: StudyRun) -> None:
    """Refuse to reuse (or resume) a run whose inputs changed since it started (:func:`run_inputs`), naming the first
    change; a run started before the study kept inputs has only :func:`check_run`'s comparison."""
    path = study.output_dir / STUDY_STATE_DIR / f"{run.name}.json"
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    now = run_inputs(study, run)
    for part, what in (("config", "was made with"), ("datasets", "read a dataset whose content was"),
                       ("upstream", "started from a run whose results were")):
        old, new = recorded.get(part, {}), now[part]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                shown = ((f"{key}={old.get(key)!r} but the study now gives {key}={new.get(key)!r}")
                         if part == "config" else f"different ({key}: {str(old.get(key))[:16]} then, "
                                                  f"{str(new.get(key))[:16]} now)")
                raise UserError(f"{study.path}: run {run.name!r} in {run.output_dir} {what} {shown}; delete that "
                                "folder to redo the run")


def record_inputs(study: Study, run: StudyRun) -> None:
    (study.output_dir / STUDY_STATE_DIR).mkdir(parents=True, exist_ok=True)
    durable.write_text(study.output_dir / STUDY_STATE_DIR / f"{run.name}.json",
                       json.dumps(run_inputs(study, run), indent=1, sort_keys=True))


def write_study_record(study: Study, title: str, description: str) -> None:
    """``DIR/study.json``: the designs, the cells and each run's command, which findings.md is computed with."""
    from hf_vit.findings import STUDY_RECORD

    record = {"title": title, "description": description, "study_path": study.path,
              "findings": [design.to_dict() for design in study.findings],
              "runs": [{"name": run.name, "cell": run.cell or run.name,
                        "seed": int(run.flags["seed"]) if "seed" in run.flags else None,
                        "command": command_line(run)} for run in study.runs]}
    durable.write_text(study.output_dir / STUDY_RECORD, json.dumps(record, indent=1) + "\n")


def dataset_fingerprint(dataset: DerivedDataset) -> str | None:
    """The built dataset's content fingerprint, as its build recorded it (None before it is built)."""
    try:
        return json.loads((dataset.path / DATASET_SPEC_FILE).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def build_dataset(dataset: DerivedDataset) -> bool:
    """Build ``dataset`` unless its folder exists (then check it was made from the same spec); True if built.

    The source is checked against the study's pin (``source_fingerprint``) before anything is written, and the built
    folder records its own content fingerprint, which a finished run's reuse depends on. Built into a hidden ``.tmp``
    folder beside the target and renamed into place when complete, so a killed build leaves no folder that looks
    finished.
    """
    import datasets

    from hf_vit.data import DataSource, example_key, in_validation, load_splits

    marker = dataset.path / DATASET_SPEC_FILE
    if dataset.path.is_dir():
        try:
            recorded = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            recorded = None  # not a folder this study built
        spec = dataset.spec()
        if not isinstance(recorded, dict) or {key: recorded.get(key) for key in spec} != spec:
            raise UserError(f"{dataset.path} was built from another spec than datasets.{dataset.name} now gives; "
                            "delete it to rebuild (and the runs trained on it)")
        if dataset.source_fingerprint and recorded.get("source_fingerprint") != dataset.source_fingerprint:
            raise UserError(f"{dataset.path} was built from a source other than the one datasets.{dataset.name} pins "
                            "(source_fingerprint); delete it to rebuild (and the runs trained on it)")
        return False
    splits = load_splits(DataSource.named(dataset.source, train_split=dataset.split))
    source, label_column, names = splits.train, splits.label_column, splits.label_names
    labels = source[label_column]
    keys = [example_key(image) for image in source[splits.image_column]]
    # In the source's order, unlike a scored set's: the per-class cuts follow that order.
    source_fingerprint = lines_fingerprint(f"{key}\t{label}\n" for key, label in zip(keys, labels))
    if dataset.source_fingerprint and source_fingerprint != dataset.source_fingerprint:
        raise UserError(f"datasets.{dataset.name}: {dataset.source!r} is not the pinned copy (source_fingerprint "
                        f"{dataset.source_fingerprint[:16]}..., this one {source_fingerprint}); point the study at "
                        "the pinned copy, or change the pin and accept other images and pixels")
    classes = dataset.classes or names
    unknown = [name for name in classes if name not in names]
    if unknown:
        raise UserError(f"datasets.{dataset.name}: {dataset.source!r} has no class {unknown[0]!r}; its classes begin "
                        f"{names[:10]}")
    new_label = {names.index(name): i for i, name in enumerate(classes)}
    rows_of = {label: [] for label in new_label}
    for row, label in enumerate(labels):
        if label in rows_of:
            rows_of[label].append(row)
    if dataset.tuned_on is not None:
        fraction, seed = dataset.tuned_on
        for label, class_rows in rows_of.items():
            looked_at = [in_validation(keys[row], fraction, seed) for row in class_rows]
            rows_of[label] = ([row for row, seen in zip(class_rows, looked_at) if not seen]
                              + [row for row, seen in zip(class_rows, looked_at) if seen])
    parts, content = {}, []
    for split, (skip, take) in dataset.splits.items():
        rows = []
        for label, class_rows in rows_of.items():
            chosen = class_rows[skip:None if take is None else skip + take]
            if not chosen or (take is not None and len(chosen) < take):
                raise UserError(f"datasets.{dataset.name}.splits.{split}: class {names[label]!r} has "
                                f"{len(class_rows)} examples, fewer than skip {skip} + take {take}")
            rows += chosen
        rows.sort()  # the source's order, classes interleaved as there
        content += [f"{split}\t{keys[row]}\t{new_label[labels[row]]}\n" for row in rows]
        part = source.select(rows)
        features = part.features.copy()
        features[splits.image_column] = datasets.Image()
        features[label_column] = datasets.ClassLabel(names=list(classes))
        parts[split] = part.cast_column(splits.image_column, datasets.Image()).map(
            lambda labels: {label_column: [new_label[label] for label in labels]}, input_columns=[label_column],
            batched=True, features=features, desc=f"relabelling {dataset.name}/{split}")
    partial = dataset.path.with_name(f".{dataset.path.name}.tmp")
    durable.remove_partial(partial)
    datasets.DatasetDict(parts).save_to_disk(str(partial))
    record = {**dataset.spec(), "source_fingerprint": source_fingerprint, "fingerprint": lines_fingerprint(content)}
    (partial / DATASET_SPEC_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    durable.publish_folder(partial, dataset.path)
    return True


@contextlib.contextmanager
def process_group_kept():
    """While the study trains, each run's ``Accelerator.end_training()`` leaves the process group alone.

    end_training destroys the group unless the process is "fork launched" (accelerate's notebook launcher, whose
    processes also train several times); the study's later runs and its barriers need the group, and joining a new
    one through the launcher's rendezvous after a destroy can read the old group's addresses, so the study sets
    that flag (read from the environment by every ``PartialState()``) for as long as it runs.
    """
    previous = os.environ.get("FORK_LAUNCHED")
    os.environ["FORK_LAUNCHED"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("FORK_LAUNCHED", None)
        else:
            os.environ["FORK_LAUNCHED"] = previous


def describe_dataset(dataset: DerivedDataset) -> str:
    cuts = ", ".join(f"{split}: skip {skip}, take {'the rest' if take is None else take}"
                     for split, (skip, take) in dataset.splits.items())
    classes = ", ".join(dataset.classes) if dataset.classes else "all classes"
    return f"{dataset.source} [{dataset.split}], {classes}; per class {cuts}"


def command_line(run: StudyRun, extra: list[str] | None = None) -> str:
    """The run as an equivalent run_finetune.py command."""
    return shlex.join(["python", "run_finetune.py", *run.argv(), *(extra or [])])


# --------------------------------------------------------------------------------------------------- the study loop
def run_study(study: Study, dry_run: bool = False, rehearse: bool = False, processes: int | None = None) -> Path | None:
    """Build the derived datasets, train every run that is not done, then write the findings (main process).

    Under ``accelerate launch`` every process runs this loop and takes the same decisions (each made after a
    barrier, from the same files). ``dry_run`` prints what would happen, with each run's command and its run plan,
    and trains nothing. ``rehearse`` turns the study into its rehearsal first (:func:`hf_vit.rehearsal.rehearse_study`).
    Returns the findings path, or None (a dry run, or a run preempted by SIGTERM/SIGINT: restart the same command).
    """
    rehearsal = None
    if rehearse:
        from hf_vit.rehearsal import rehearse_study

        rehearsal = rehearse_study(study)
    for run in study.runs:
        check_run(study, run)
    if dry_run:
        if rehearsal is not None:
            from hf_vit.rehearsal import describe

            print(describe(study, rehearsal, int(os.environ.get("WORLD_SIZE", "1"))))
        print(f"study {study.path}: {len(study.datasets)} derived datasets, {len(study.runs)} runs -> "
              f"{study.output_dir}")
        for dataset in study.datasets:
            state = "built" if dataset.path.is_dir() else "to build"
            print(f"dataset {dataset.name} ({state}) -> {dataset.path}: {describe_dataset(dataset)}")
        for index, run in enumerate(study.runs, 1):
            status = run_status(run)
            print(f"run {index}/{len(study.runs)} {run.name} ({status}): "
                  f"{command_line(run, STATUS_FLAGS.get(status))}")
        print_plan_table(study, rehearse, processes)
        return None

    title, description = Path(study.path).stem, study.description
    if rehearsal is not None:
        title = f"REHEARSAL of {title} (its accuracies mean nothing)"
        description = ("A REHEARSAL (python -m hf_vit.study --rehearse): tiny models, a few steps per run, generated "
                       "stand-ins for unreachable data. Its accuracies and verdicts mean nothing; it shows that every "
                       "run below trained, evaluated, checkpointed and wrote its results through the production "
                       f"code. The study: {description}")
    with process_group_kept():
        state = fresh_accelerate_state()
        if state.is_main_process:
            study.output_dir.mkdir(parents=True, exist_ok=True)
            write_study_record(study, title, description)
        finished, failed = _build_and_train(study, state, rehearsal)
    if not finished or not state.is_main_process:
        if failed:
            raise UserError(f"the rehearsal found {len(failed)} run(s) that fail: {', '.join(failed)} (above)")
        return None
    from hf_vit.findings import write_findings

    path = write_findings(study.output_dir)
    print(f"[study] findings: {path}", flush=True)
    if failed:
        raise UserError(f"the rehearsal found {len(failed)} run(s) that fail: {', '.join(failed)} (see above); "
                        f"findings of the others: {path}")
    return path


def print_plan_table(study: Study, rehearse: bool, processes: int | None = None) -> None:
    """Every run's plan as one table (hf_vit.plan); a study whose data cannot be opened here, nor is recorded
    (hf_vit.rehearsal.RECORDED), says so in one line instead (the dry run still lists every run)."""
    try:
        from hf_vit.plan import plan_study_table
    except ImportError:
        print("(no run plans: this checkout has no hf_vit.plan.plan_study_table)")
        return
    try:
        table = plan_study_table(study, processes=processes, rehearse=rehearse)
    except UserError as err:
        print(f"(no run plans: {err})")
        return
    print(table)


def _main_process_builds(state, build) -> None:
    """``build()`` on the main process while the others wait (runtime.main_process_first)."""
    with main_process_first(state):
        if state.is_main_process:
            build()


def _build_and_train(study: Study, state, rehearsal=None) -> tuple[bool, list[str]]:
    """The derived datasets, then every run that is not done; (False when a run was preempted, the runs that failed
    in a rehearsal)."""
    from hf_vit.trainer import train

    began = time.time()

    def say(message: str) -> None:
        if state.is_main_process:
            # A rehearsal stamps its lines with the time since it began: its output is the record of its timing.
            prefix = "[study]" if rehearsal is None else f"[rehearsal {time.time() - began:5.0f} s]"
            print(f"{prefix} {message}", flush=True)

    if rehearsal is not None:
        from hf_vit.rehearsal import describe

        if state.is_main_process:
            print(describe(study, rehearsal, state.num_processes), flush=True)
        _main_process_builds(state, lambda: rehearsal.build_stand_ins(say))
    for dataset in study.datasets:
        def build(dataset=dataset):
            built = build_dataset(dataset)
            say(f"dataset {dataset.name}: {'built' if built else 'already built'} at {dataset.path}")

        _main_process_builds(state, build)
        if not dataset.path.is_dir():
            raise UserError(f"dataset {dataset.name} was not built at {dataset.path}; see the main process's error")
    failed: dict[str, Path] = {}
    lines = []
    for index, run in enumerate(study.runs, 1):
        state.wait_for_everyone()  # a run's files are whole before any process looks at them
        heading = f"run {index}/{len(study.runs)} {run.name}"
        broken = [name for name, folder in failed.items() if str(folder) in run.flags.values()]
        if broken:
            say(f"{heading}: not rehearsed, it starts from {broken[0]}, which failed")
            lines.append(f"{run.name}: NOT RUN (starts from {broken[0]}, which failed)")
            continue
        status = run_status(run)
        say(f"{heading}: "
            + {"done": "done, skipped", "resume": "resuming from its newest checkpoint",
               "restart": "interrupted before its first checkpoint: starting it again", "new": "training"}[status]
            + (f": {command_line(run, STATUS_FLAGS.get(status))}" if rehearsal is not None and status != "done"
               else ""))
        check_inputs(study, run)
        if status == "done":
            continue
        if status != "resume" and state.is_main_process:
            record_inputs(study, run)
        start = time.time()
        try:
            if rehearsal is not None:
                results, note = _rehearse_run(run, status, rehearsal, state, say)
            else:
                results, note = train(parse_config(run.argv() + STATUS_FLAGS.get(status, []))), ""
        except UserError as err:
            if rehearsal is None:
                raise UserError(f"run {run.name!r}: {err}") from None
            # Every rank meets the same error (the trainer agrees on errors); the next runs go on.
            failed[run.name] = run.output_dir
            say(f"{heading}: FAILED after {time.time() - start:.1f} s: {err}")
            lines.append(f"{run.name}: FAILED ({time.time() - start:.1f} s): {err}")
            state = fresh_accelerate_state()
            gc.collect()
            continue
        state = fresh_accelerate_state()
        gc.collect()  # the finished run's model, optimizer and data may still sit in reference cycles
        if results.get("preempted"):
            say(f"stopped by a signal during {run.name} (checkpoint saved); run the same command again to go on")
            return False, list(failed)
        if rehearsal is not None:
            from hf_vit.rehearsal import run_summary, summary_line

            line = f"ok in {time.time() - start:.1f} s: {summary_line(run_summary(run.output_dir))}{note}"
            lines.append(f"{run.name}: {line}")
            say(f"{heading}: {line}")
    if rehearsal is not None and state.is_main_process:
        print(f"[rehearsal] runs, {time.time() - began:.0f} s in all (their accuracies mean nothing):\n"
              + "\n".join(f"  {line}" for line in lines), flush=True)
    return True, list(failed)


def _rehearse_run(run: StudyRun, status: str, rehearsal, state, say) -> tuple[dict, str]:
    """Train one rehearsed run; a run to preempt is stopped by SIGTERM after its first checkpoint and resumed at
    once. Returns its results and a note on the preemption."""
    from hf_vit.rehearsal import Preempter
    from hf_vit.trainer import train

    argv = run.argv() + STATUS_FLAGS.get(status, [])
    if run.name not in rehearsal.preempt or status != "new":
        return train(parse_config(argv)), ""
    with Preempter(run.output_dir) if state.is_main_process else contextlib.nullcontext():
        results = train(parse_config(argv))
    if not results.get("preempted"):
        return results, "; the SIGTERM came after its last step: resume not rehearsed"
    stopped = results["global_step"]
    say(f"{run.name}: preempted by SIGTERM at step {stopped}: resuming with --resume_from_checkpoint latest")
    fresh_accelerate_state()
    gc.collect()
    return train(parse_config(run.argv() + STATUS_FLAGS["resume"])), f"; preempted at step {stopped} and resumed"


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(prog="python -m hf_vit.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("study", metavar="STUDY.yaml", help="the study file (see studies/ and docs/studies.md)")
    parser.add_argument("--output_dir", required=True, help="the study folder: one folder per run, data/, findings.md")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="[RUN.]KEY=VALUE",
                        help="override a study default (KEY=VALUE) or one run's flag (RUN.KEY=VALUE); repeatable")
    # A switch, not the training flag's `--dry_run true`: the study's own command takes no recipe, and its flags are
    # the study's (what to run), not a run's settings (those come from the study file and --set).
    parser.add_argument("--dry_run", action="store_true",
                        help="print each run's status, command and run plan; train nothing")
    parser.add_argument("--processes", type=int, default=None, metavar="N",
                        help="with --dry_run: plan every run for a launch of N processes (GPUs) instead of this one")
    parser.add_argument("--rehearse", action="store_true",
                        help="rehearse the study: every run through the same code with a tiny model, a few steps and "
                             "generated stand-ins for unreachable data (docs/rehearsal.md); its accuracies mean "
                             "nothing")

    raise_user_errors(parser)  # one `error:` line instead of argparse's usage block
    args = parser.parse_args(argv)
    if args.processes is not None and (args.processes < 1 or not args.dry_run):
        raise UserError(f"--processes {args.processes}: give a count >= 1, with --dry_run (a real launch has its own)")
    return run_study(load_study(args.study, args.output_dir, args.sets), dry_run=args.dry_run,
                     rehearse=args.rehearse, processes=args.processes)


if __name__ == "__main__":
    run_cli(main)
