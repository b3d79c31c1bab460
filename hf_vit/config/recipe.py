"""The recipe file, the command line and the saved copy: from ``--config recipe.yaml`` plus flags to a
:class:`RunConfig`, and back to ``output_dir/train_config.yaml``.

A run is configured by ``--config recipe.yaml`` (a flat mapping of field names to values) plus command-line flags, which
win over the recipe. Unknown keys — in the recipe or on the command line — are an error, never silently ignored. The
fully resolved configuration is written to ``output_dir/train_config.yaml``; passing that file back as ``--config``
reproduces the run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from .. import durable
from ..errors import (UserError, is_secret_name, mask_argv, raise_user_errors, register_argv_secrets,
                      register_mapping_secrets, register_secret)
from .checks import FIELD_TYPES, check_fields
from .domains import DOMAIN_KEY
from .groups import ARG_GROUPS, CONFIG_FILE_NAME, SECRET_KEYS, RunConfig


# ------------------------------------------------------------------------------------------------ recipe and CLI
class ArgumentParser(HfArgumentParser):
    """transformers' HfArgumentParser for dataclasses declared with :func:`~hf_vit.config.domains.setting`: the flag,
    type, default and help come from the field as usual; the field's domain stays out of argparse.

    HfArgumentParser passes every metadata key of a field to ``argparse.add_argument`` (its static
    ``_parse_dataclass_field(parser, field)``), which refuses a key it does not know, such as our domain.
    ``tests/test_config_domains.py`` builds every command's parser, so a change to that method fails there.
    """

    @staticmethod
    def _parse_dataclass_field(parser, field: dataclasses.Field):
        if DOMAIN_KEY in field.metadata:
            stripped = dataclasses.field(default=field.default, default_factory=field.default_factory,
                                         metadata={k: v for k, v in field.metadata.items() if k != DOMAIN_KEY})
            stripped.name, stripped.type = field.name, field.type
            field = stripped
        HfArgumentParser._parse_dataclass_field(parser, field)


class _DuplicateKey(Exception):
    pass


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (plain PyYAML keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        first_line = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # unhashable keys are refused by SafeLoader itself; "<<" merges are resolved by it
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise _DuplicateKey(f"sets {key!r} twice (lines {first_line[key]} and {line}); keep one of them")
            first_line[key] = line
        return super().construct_mapping(node, deep)


# "key: value" lines, to learn a recipe's secrets before parsing it (a recipe that fails to parse still has them).
_RECIPE_LINE = re.compile(r"""^\s*["']?([^:#"'\s]+)["']?\s*:\s*["']?([^"'#]*?)["']?\s*(#.*)?$""")


# The key under which train_config.yaml records the run plan (hf_vit.plan); ignored when the file is read back.
PLAN_KEY = "run_plan"


def load_recipe(path: str, known_only: bool = True) -> dict:
    """Read a flat YAML recipe; unknown keys (unless not ``known_only``), keys given twice and unreadable files are
    errors. A saved run's ``run_plan`` record is dropped."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist; pass an existing YAML recipe (see recipes/)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise UserError(f"config file {path!r} cannot be read ({reason}); pass a readable YAML recipe") from None
    for line in text.splitlines():
        match = _RECIPE_LINE.match(line)
        if match and is_secret_name(match.group(1)):
            register_secret(match.group(2))
    try:
        recipe = yaml.load(text, Loader=_RecipeLoader)
    except _DuplicateKey as err:
        raise UserError(f"config file {path!r} {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"config file {path!r} is not valid YAML: {problem}{where}") from None
    except RecursionError:
        raise UserError(f"config file {path!r} is nested too deeply; a recipe is a flat mapping") from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise UserError(f"config file {path!r} must be a mapping of option names to values")
    register_mapping_secrets(recipe)
    recipe.pop(PLAN_KEY, None)  # a saved run's plan: what the run resolved, not a setting
    unknown = sorted((k for k in recipe if k not in FIELD_TYPES), key=str)
    if unknown and known_only:
        raise UserError(f"unknown config key(s) {unknown} in {path}; run with --help for the valid options")
    return recipe


def parse_config(argv: list[str] | None = None, defaults: dict | None = None) -> RunConfig:
    """Parse ``--config recipe.yaml`` plus CLI flags (CLI wins) into a :class:`RunConfig` whose every field is in its
    domain (:func:`check_fields`; relations between fields are :func:`validate`'s).

    ``defaults`` lets an entry script set its own defaults (e.g. run_pretrain.py's preset) below the recipe. The
    secrets of the command line and the recipe are registered (errors.py) before anything can fail.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    register_argv_secrets(argv)
    recipe: dict = dict(defaults or {})
    register_mapping_secrets(recipe)
    at = [i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")]
    if len(at) > 1:
        raise UserError(f"--config is given {len(at)} times; pass one recipe and override its values with flags")
    if at:
        i = at[0]
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise UserError("--config needs a path to a YAML recipe")
            path = argv[i + 1]
            del argv[i : i + 2]
        else:
            path = argv[i].split("=", 1)[1]
            del argv[i]
        recipe.update(load_recipe(path))
    # allow_abbrev=False: a misspelt prefix such as --learning_rat must be an error, not a silent match.
    parser = raise_user_errors(ArgumentParser(ARG_GROUPS, allow_abbrev=False))
    parser.add_argument("--config", help="YAML recipe; command-line flags override its values.")
    # Recipe values become parser defaults, so explicit flags still override them; secrets are set afterwards
    # instead, because --help prints every default.
    secrets = {key: recipe.pop(key) for key in SECRET_KEYS if key in recipe}
    parser.set_defaults(**recipe)
    # Returns the three groups, a namespace holding --config, and the strings no option claimed. No `.args` file
    # next to the script may add arguments: a run is its recipe plus its flags, nothing else.
    model, data, train, *_, remaining = parser.parse_args_into_dataclasses(
        argv, return_remaining_strings=True, look_for_args_file=False)
    if remaining:
        raise UserError(f"unknown argument(s) {mask_argv(remaining)}; run with --help for the valid options")
    cfg = RunConfig(model=model, data=data, train=train)
    for key, value in secrets.items():
        group = next(g for g in (model, data, train) if hasattr(g, key))
        if getattr(group, key) is None:  # not given on the command line, which wins
            setattr(group, key, value)
    check_fields(cfg)
    return cfg


def save_config(cfg: RunConfig, output_dir: str, plan: dict | None = None) -> str:
    """Write the resolved config (without secrets) to ``output_dir/train_config.yaml``, with the run's plan under
    ``run_plan`` (a record: read back as ``--config``, it is ignored); return the path. Written through
    :mod:`hf_vit.durable`: a kill leaves the previous file or the new one."""
    path = os.path.join(output_dir, CONFIG_FILE_NAME)
    record = cfg.to_dict()
    if plan is not None:
        record[PLAN_KEY] = plan
    durable.write_text(path, yaml.safe_dump(record, sort_keys=False))
    return path


def run_config_path(run_dir: str | os.PathLike) -> Path | None:
    """``RUN_DIR/train_config.yaml``; for a ``checkpoint-<N>`` folder without one, its run's; None when neither
    exists."""
    folder = Path(os.path.abspath(run_dir))
    for candidate in (folder, folder.parent if re.fullmatch(r"checkpoint-\d+", folder.name) else None):
        if candidate is not None and (candidate / CONFIG_FILE_NAME).is_file():
            return candidate / CONFIG_FILE_NAME
    return None


def read_run_config(run_dir: str | os.PathLike, known_only: bool = True) -> dict | None:
    """The settings a run recorded (:func:`save_config`), as ``{field: value}`` without the ``run_plan`` record, from
    ``RUN_DIR/train_config.yaml`` (a ``checkpoint-<N>`` folder: its run's); None when the run has none. Read by the
    recipe rules (:func:`load_recipe`): an unreadable file or a duplicate key is a one-line UserError, and so is an
    unknown key unless not ``known_only`` (a report over runs another version of hf_vit wrote)."""
    path = run_config_path(run_dir)
    return None if path is None else load_recipe(str(path), known_only)
