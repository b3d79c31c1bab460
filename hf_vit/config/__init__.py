"""Typed run configuration: three dataclass groups, a recipe file, CLI overrides, validation, and the saved copy.

One module per job; every name is imported from ``hf_vit.config`` itself, as before the split:

* :mod:`~hf_vit.config.groups` — the three argument groups (model, data, training) with their ``help``,
  :class:`RunConfig`, the secret fields (:data:`SECRET_KEYS`) and :func:`resolve_batch_sizes`;
* :mod:`~hf_vit.config.checks` — every field's domain (:data:`DOMAINS`), the check of one field
  (:func:`check_value`) and of all (:func:`check_fields`), and :func:`validate`: the fields again, the relations
  between them, the output folder and the Hub id;
* :mod:`~hf_vit.config.recipe` — ``--config recipe.yaml`` plus flags into a :class:`RunConfig`
  (:func:`parse_config`, :func:`load_recipe`) and the saved ``train_config.yaml`` (:func:`save_config`).

Importing the package raises RuntimeError if a field of the argument groups has no :data:`DOMAINS` entry.
"""

from .checks import (ANY, BELOW_ONE, COUNT, DOMAINS, EPOCHS, FIELD_TYPES, FRACTION, MAX_COUNT, MAX_EPOCHS, MAX_SEED,
                     MAX_WORKERS, NON_NEGATIVE, POSITIVE, SEED, TEXT, Domain, check_crop_padding, check_fields,
                     check_output_dir_path, check_value, validate)
from .groups import (ARG_GROUPS, CONFIG_FILE_NAME, SECRET_KEYS, DataArguments, ModelArguments, RunConfig,
                     TrainingArguments, resolve_batch_sizes)
from .recipe import load_recipe, parse_config, save_config

__all__ = [
    "ANY", "ARG_GROUPS", "BELOW_ONE", "CONFIG_FILE_NAME", "COUNT", "DOMAINS", "DataArguments", "Domain", "EPOCHS",
    "FIELD_TYPES", "FRACTION", "MAX_COUNT", "MAX_EPOCHS", "MAX_SEED", "MAX_WORKERS", "ModelArguments", "NON_NEGATIVE",
    "POSITIVE", "RunConfig", "SECRET_KEYS", "SEED", "TEXT", "TrainingArguments", "check_crop_padding", "check_fields",
    "check_output_dir_path", "check_value", "load_recipe", "parse_config", "resolve_batch_sizes", "save_config",
    "validate",
]
