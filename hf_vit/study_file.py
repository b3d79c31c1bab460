"""The study file: its keys, grid expansion, flag precedence, references, and the one-line errors for mistakes.

:func:`load_study` turns a YAML study (format: docs/studies.md) into a :class:`Study` whose runs carry their
command-line flags, references resolved, ready for :mod:`hf_vit.study` to train.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hf_vit.config import ARG_GROUPS
from hf_vit.errors import UserError

STUDY_KEYS = ("description", "defaults", "datasets", "runs", "findings")
RUN_KEYS = ("name", "recipe", "grid", "group", "seeds")
DATASET_KEYS = ("source", "split", "classes", "splits", "source_fingerprint", "tuned_on")
FLAGS = frozenset(f.name for group in ARG_GROUPS for f in dataclasses.fields(group))
# The study decides where each run writes and whether it resumes.
STUDY_MANAGED = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint")
REFERENCE = re.compile(r"^\$\{(runs|datasets|defaults)\.([^{}]+)\}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class DerivedDataset:
    """A dataset built before the runs: ``classes`` of ``source``'s ``split`` (relabelled 0..k-1), cut per class into
    the output ``splits`` (``{name: (skip, take)}``: per class, skip that many examples in the source's order and keep
    the next ``take``, or all the rest when ``take`` is None), saved with ``save_to_disk`` at ``path``."""

    name: str
    source: str
    split: str
    classes: list[str] | None
    splits: dict[str, tuple[int, int | None]]
    path: Path
    # The pin: the SHA-256 of the source split's (key, label) rows in the source's order
    # (hf_vit.predictions.lines_fingerprint); another copy of the data (the Hub's PNGs for a local JPEG copy) is refused.
    source_fingerprint: str | None = None
    # Images an earlier choice looked at (the recipes' tuning carve-out: train_val_split `fraction` at split seed
    # `seed`): ordered last within their class, so they land in the last split (train), never in a held-out one.
    tuned_on: tuple[float, int] | None = None

    def spec(self) -> dict[str, Any]:
        """What the built folder records about how it was made (compared on the next start)."""
        spec = {"source": self.source, "split": self.split, "classes": self.classes,
                "splits": {name: list(cut) for name, cut in self.splits.items()}}
        if self.tuned_on is not None:
            spec["tuned_on"] = list(self.tuned_on)
        return spec


@dataclass
class StudyRun:
    """One resolved run: its flags as command-line strings (references replaced by folders), in precedence order."""

    name: str
    recipe: str | None
    flags: dict[str, str]
    output_dir: Path
    referenced: set[str] = field(default_factory=set)  # flags whose value names another run's or a dataset's folder
    group: str | None = None  # the entry's ``group``: ``--set GROUP.KEY=VALUE`` reaches every run of it
    cell: str = ""  # the runs that differ only by their seed share a cell (``seeds``); else the run's own name

    def argv(self) -> list[str]:
        """The run's arguments, as run_finetune.py takes them."""
        args = ["--config", self.recipe] if self.recipe else []
        for key, value in self.flags.items():
            args += [f"--{key}", value]
        return args + ["--output_dir", str(self.output_dir)]


@dataclass
class Study:
    path: str
    description: str
    output_dir: Path
    datasets: list[DerivedDataset]
    runs: list[StudyRun]
    findings: list = field(default_factory=list)  # hf_vit.findings.designs.Design, stated before any run


# --------------------------------------------------------------------------------------------------- the study file
def _mapping(value: Any, where: str, path: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{path}: {where} must be a mapping (got {type(value).__name__})")
    return value


def _check_flag(key: Any, where: str, path: str) -> None:
    if key in STUDY_MANAGED:
        raise UserError(f"{path}: {where} sets {key!r}, which the study manages (each run writes to DIR/<name> and "
                        "resumes itself); remove it")
    if key not in FLAGS:
        raise UserError(f"{path}: {where} has unknown key {key!r}; use training flags (python run_finetune.py --help)"
                        f"{' or ' + ', '.join(RUN_KEYS) if where.startswith('run') else ''}")


def _flag_string(value: Any, key: str, where: str, path: str) -> str:
    """A study value as the command-line string parse_config reads back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    if value is None:
        raise UserError(f"{path}: {where}: {key}: null cannot be passed as a flag; leave the key out (or pick a "
                        "recipe that leaves it unset)")
    raise UserError(f"{path}: {where}: {key} must be a single value, not a {type(value).__name__}")


def _parse_sets(sets: list[str]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """``--set KEY=VALUE`` (a study default) and ``--set RUN.KEY=VALUE`` (one run, every run of a grid entry, or every
    run of a group)."""
    defaults, per_run = {}, {}
    for item in sets:
        target, sep, value = item.partition("=")
        if not sep or not target:
            raise UserError(f"--set {item!r} must look like KEY=VALUE or RUN.KEY=VALUE")
        run, _, key = target.rpartition(".")
        if key in STUDY_MANAGED:
            raise UserError(f"--set {item!r}: {key} is managed by the study; remove it")
        if key not in FLAGS:
            raise UserError(f"--set {item!r}: unknown flag {key!r}; see python run_finetune.py --help")
        (per_run.setdefault(run, {}) if run else defaults)[key] = value
    return defaults, per_run


def _parse_splits(value: Any, where: str, path: str) -> dict[str, tuple[int, int | None]]:
    splits = _mapping(value, f"{where}.splits", path)
    if not splits:
        raise UserError(f"{path}: {where} needs splits, e.g. {{train: {{skip: 100}}, validation: {{take: 100}}}}")
    cuts = {}
    for name, cut in splits.items():
        cut = _mapping(cut, f"{where}.splits.{name}", path)
        unknown = sorted(set(cut) - {"skip", "take"})
        if unknown:
            raise UserError(f"{path}: {where}.splits.{name} has unknown key {unknown[0]!r}; use skip and take")
        skip, take = cut.get("skip", 0), cut.get("take")
        if not isinstance(skip, int) or skip < 0 or (take is not None and (not isinstance(take, int) or take < 1)):
            raise UserError(f"{path}: {where}.splits.{name}: skip must be an integer >= 0 and take an integer >= 1")
        cuts[str(name)] = (skip, take)
    # The per-class slices must not overlap, or a validation image would also be trained on.
    ordered = sorted(cuts.items(), key=lambda item: item[1][0])
    for (first, (skip, take)), (second, (next_skip, _)) in itertools.pairwise(ordered):
        if take is None or skip + take > next_skip:
            raise UserError(f"{path}: {where}: splits {first!r} and {second!r} overlap (per class, {first} keeps "
                            f"from {skip} to {'the end' if take is None else skip + take}, {second} from {next_skip})")
    return cuts


def _expand(entry: dict, index: int, path: str) -> list[tuple[str, str, str | None, dict[str, Any]]]:
    """One run entry as ``[(name, cell, recipe, flags)]``: a single run, or one per combination of its grid's
    values, times one per seed of ``seeds`` (named ``<name>_s<seed>``, sharing the cell ``<name>``)."""
    name = entry.get("name")
    where = f"runs[{index}]"
    if not isinstance(name, str) or not name:
        raise UserError(f"{path}: {where} needs a name")
    where = f"run {name!r}"
    group = entry.get("group")
    if group is not None and (not isinstance(group, str) or not NAME.match(group)):
        raise UserError(f"{path}: {where}: group must be a name of letters, digits, '.', '_' or '-'")
    base_flags = {key: value for key, value in entry.items() if key not in RUN_KEYS}
    for key in base_flags:
        _check_flag(key, where, path)
    recipe = entry.get("recipe")
    axes = []  # [(axis, [(label, recipe or None, flags)])]
    for axis, values in _mapping(entry.get("grid"), f"{where}: grid", path).items():
        if isinstance(values, dict):  # labelled variants: {label: {recipe: ..., flag: value}}
            options = []
            for label, variant in values.items():
                variant = dict(_mapping(variant, f"{where}: grid.{axis}.{label}", path))
                variant_recipe = variant.pop("recipe", None)
                for key in variant:
                    _check_flag(key, f"{where}: grid.{axis}.{label}", path)
                options.append((str(label), variant_recipe, variant))
        elif isinstance(values, list) and values:  # one flag's values
            _check_flag(axis, f"{where}: grid", path)
            if axis in base_flags:
                raise UserError(f"{path}: {where} sets {axis!r} both as a flag and as a grid axis; keep one")
            options = [(str(value), None, {axis: value}) for value in values]
        else:
            raise UserError(f"{path}: {where}: grid.{axis} must be a non-empty list of values or a mapping of "
                            "labelled variants")
        axes.append((axis, options))
    placeholders = set(re.findall(r"\{([^{}]*)\}", name))
    unknown = sorted(placeholders - {axis for axis, _ in axes})
    if unknown:
        raise UserError(f"{path}: {where}: the name refers to {{{unknown[0]}}}, which is not a grid axis")
    missing = [axis for axis, options in axes if len(options) > 1 and axis not in placeholders]
    if missing:
        raise UserError(f"{path}: {where}: the name must contain {{{missing[0]}}} so that each grid run gets its own "
                        "folder")
    seeds = entry.get("seeds")
    if seeds is not None:
        if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
            raise UserError(f"{path}: {where}: seeds must be a non-empty list of distinct integers >= 0")
        if "seed" in base_flags or any(axis == "seed" for axis, _ in axes):
            raise UserError(f"{path}: {where} sets seed and seeds; keep seeds (one run per seed, one cell)")
    runs = []
    for combination in itertools.product(*(options for _, options in axes)):
        flags, run_recipe = dict(base_flags), recipe
        for _, variant_recipe, variant_flags in combination:
            flags.update(variant_flags)
            run_recipe = variant_recipe or run_recipe
        labels = {axis: label for (axis, _), (label, _, _) in zip(axes, combination)}
        cell = name.format(**labels)
        # Seeds last: the runs of a cell differ by nothing else, which is what makes their spread the seed spread.
        for seed in seeds or [None]:
            runs.append((cell if seed is None else f"{cell}_s{seed}", cell, run_recipe,
                         flags if seed is None else {**flags, "seed": seed}))
    return runs


def load_study(path: str, output_dir: str, sets: list[str] | None = None) -> Study:
    """Read, expand and check a study file; returns the :class:`Study` with every run's flags resolved.

    ``output_dir`` is the study folder (runs go to ``output_dir/<name>``, derived datasets to ``output_dir/data/``);
    ``sets`` are ``--set`` items. Recipes are relative to the study file's folder. Every mistake (unknown key, bad
    reference, duplicate name, null flag) is a UserError naming the file and the key.
    """
    if not os.path.isfile(path):
        raise UserError(f"study file {path!r} does not exist; pass a YAML study (see studies/)")
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle) or {}
    except yaml.YAMLError as err:
        raise UserError(f"study file {path!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    raw = _mapping(raw, "the study", path)
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r}; a study has {', '.join(STUDY_KEYS)}")
    if not isinstance(raw.get("runs"), list) or not raw["runs"]:
        raise UserError(f"{path}: runs must be a non-empty list of runs")
    out = Path(output_dir)
    set_defaults, set_runs = _parse_sets(list(sets or []))
    defaults = dict(_mapping(raw.get("defaults"), "defaults", path))
    for key in defaults:
        _check_flag(key, "defaults", path)
    defaults.update(set_defaults)

    def resolve(value: Any, key: str, where: str, runs_so_far: dict[str, Path] | None) -> tuple[Any, bool]:
        """(value with a reference replaced, whether it was a folder reference)."""
        if not isinstance(value, str) or "${" not in value:
            return value, False
        match = REFERENCE.match(value)
        if not match:
            raise UserError(f"{path}: {where}: {key}: {value!r} is not a reference; write ${{runs.NAME}}, "
                            "${datasets.NAME} or ${defaults.KEY} as the whole value")
        kind, target = match.groups()
        if kind == "defaults":
            if target not in defaults:
                raise UserError(f"{path}: {where}: {key}: {value!r} refers to no default; defaults has "
                                f"{sorted(defaults)}")
            if isinstance(defaults[target], str) and defaults[target].startswith("${defaults."):
                raise UserError(f"{path}: defaults.{target} refers to another default; give it a value")
            return resolve(defaults[target], key, where, runs_so_far)
        if kind == "datasets":
            if runs_so_far is None or target not in derived:
                raise UserError(f"{path}: {where}: {key}: {value!r} refers to no dataset of the study (datasets: "
                                f"{sorted(derived) if runs_so_far is not None else 'none may be used here'})")
            return str(derived[target].path), True
        if runs_so_far is None or target not in runs_so_far:
            raise UserError(f"{path}: {where}: {key}: {value!r} must name an earlier run of the study (earlier runs: "
                            f"{sorted(runs_so_far or [])})")
        return str(runs_so_far[target]), True

    derived: dict[str, DerivedDataset] = {}
    for name, spec in _mapping(raw.get("datasets"), "datasets", path).items():
        where = f"datasets.{name}"
        if not isinstance(name, str) or not NAME.match(name):
            raise UserError(f"{path}: {where}: a dataset name must be letters, digits, '.', '_' or '-'")
        spec = _mapping(spec, where, path)
        unknown = sorted(set(spec) - set(DATASET_KEYS))
        if unknown:
            raise UserError(f"{path}: {where} has unknown key {unknown[0]!r}; a dataset has {', '.join(DATASET_KEYS)}")
        source, _ = resolve(spec.get("source"), "source", where, None)
        if not isinstance(source, str) or not source:
            raise UserError(f"{path}: {where} needs a source (a Hub id, a local dataset folder, or ${{defaults.KEY}})")
        classes = spec.get("classes")
        if classes is not None and (not isinstance(classes, list) or not classes or len(set(map(str, classes)))
                                    != len(classes)):
            raise UserError(f"{path}: {where}: classes must be a non-empty list of distinct class names")
        pin = spec.get("source_fingerprint")
        if pin is not None and not (isinstance(pin, str) and re.fullmatch(r"[0-9a-f]{64}", pin)):
            raise UserError(f"{path}: {where}: source_fingerprint must be a SHA-256 in hex (64 characters; the study "
                            "prints the source's when it differs)")
        tuned = _mapping(spec.get("tuned_on"), f"{where}.tuned_on", path)
        if tuned and (sorted(tuned) != ["fraction", "seed"] or not isinstance(tuned["seed"], int)
                      or not isinstance(tuned["fraction"], (int, float)) or not 0 < tuned["fraction"] < 1):
            raise UserError(f"{path}: {where}: tuned_on must be {{fraction: F, seed: S}} with 0 < F < 1 (the "
                            "train_val_split and split seed the recipes were tuned on)")
        derived[name] = DerivedDataset(name, source, str(spec.get("split", "train")),
                                       [str(c) for c in classes] if classes else None,
                                       _parse_splits(spec.get("splits"), where, path), out / "data" / name,
                                       pin, (float(tuned["fraction"]), tuned["seed"]) if tuned else None)

    expanded = []  # (entry name, group, run name, cell, recipe, flags)
    for index, entry in enumerate(raw["runs"]):
        entry = _mapping(entry, f"runs[{index}]", path)
        expanded += [(entry["name"], entry.get("group"), *run) for run in _expand(entry, index, path)]
    names = [name for _, _, name, _, _, _ in expanded]
    groups = {group for _, group, *_ in expanded if group}
    clash = sorted(groups & (set(names) | {entry for entry, *_ in expanded}))
    if clash:
        raise UserError(f"{path}: group {clash[0]!r} is also a run's name; give the group another name")
    cells = {cell for *_, cell, _, _ in expanded}
    for target in set_runs:
        if target not in names and target not in groups and target not in cells and \
                target not in {entry for entry, *_ in expanded}:
            raise UserError(f"--set {target}.KEY=...: the study has no run or group {target!r}; runs: {names}"
                            f"{f', groups: {sorted(groups)}' if groups else ''}")

    runs, folders = [], {}
    for entry_name, group, name, cell, recipe, flags in expanded:
        where = f"run {name!r}"
        if not NAME.match(name):
            raise UserError(f"{path}: {where}: a run name must be letters, digits, '.', '_' or '-' (it is a folder)")
        if name in folders or name == "data":
            raise UserError(f"{path}: {where}: the name is used twice (or is 'data', the derived datasets' folder)")
        # --set for the run's group, then its grid entry, then the run itself: the narrowest target wins.
        merged = {**defaults, **flags, **set_runs.get(group, {}), **set_runs.get(entry_name, {}),
                  **set_runs.get(cell, {}), **set_runs.get(name, {})}
        if recipe is not None:
            if not isinstance(recipe, str):
                raise UserError(f"{path}: {where}: recipe must be a path")
            recipe = os.path.normpath(os.path.join(os.path.dirname(path), recipe))
        run = StudyRun(name, recipe, {}, out / name, group=group, cell=cell)
        for key, value in merged.items():
            value, is_folder = resolve(value, key, where, folders)
            run.flags[key] = _flag_string(value, key, where, path)
            if is_folder:
                run.referenced.add(key)
        runs.append(run)
        folders[name] = run.output_dir
    if (set(folders) | set(cells)) & {"study.json"}:
        raise UserError(f"{path}: a run may not be named study.json")
    from hf_vit.findings.designs import parse_designs

    designs = parse_designs(raw.get("findings"), sorted(set(names) | cells), path)
    description = raw.get("description") or ""
    return Study(path, str(description).strip(), out, list(derived.values()), runs, designs)
