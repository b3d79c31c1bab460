"""Typed run configuration: three dataclass groups, a recipe file, CLI overrides, validation, and the saved copy.

One module per job; every name is imported from ``hf_vit.config`` itself, as before the split:

* :mod:`~hf_vit.config.domains` — :func:`setting`, which declares a field with its default, its allowed values
  (a :class:`Domain`) and its help, and :func:`shared_setting`, by which another command declares the same flag;
* :mod:`~hf_vit.config.groups` — the three argument groups (model, data, training), :class:`RunConfig`, the secret
  fields (:data:`SECRET_KEYS`) and :func:`resolve_batch_sizes`;
* :mod:`~hf_vit.config.checks` — the check of one field (:func:`check_value`) and of all (:func:`check_fields`)
  against the declared domains (viewed by name in :data:`DOMAINS`), and :func:`validate`: the fields again, the
  relations between them, the output folder and the Hub id;
* :mod:`~hf_vit.config.recipe` — ``--config recipe.yaml`` plus flags into a :class:`RunConfig`
  (:func:`parse_config`, :func:`load_recipe`), the parser every command builds its flags with
  (:class:`ArgumentParser`), and the saved ``train_config.yaml`` (:func:`save_config`, read back by
  :func:`read_run_config`).

Importing the package raises RuntimeError if a field of the argument groups was declared without a domain.
"""

from .checks import (DOMAINS, FIELD_TYPES, check_crop_padding, check_fields, check_output_dir_writable,
                     check_train_data_path, check_value, field_types, validate)
from .domains import (ANY, BELOW_ONE, COUNT, EPOCHS, FRACTION, MAX_COUNT, MAX_EPOCHS, MAX_SEED, MAX_WORKERS,
                      NON_NEGATIVE, POSITIVE, SEED, TEXT, Domain, domain_of, setting, shared_setting)
from .groups import (ARG_GROUPS, CONFIG_FILE_NAME, SECRET_KEYS, DataArguments, ModelArguments, RunConfig,
                     TrainArguments, resolve_batch_sizes)
from .recipe import ArgumentParser, load_recipe, parse_config, read_run_config, save_config

__all__ = [
    "ANY", "ARG_GROUPS", "ArgumentParser", "BELOW_ONE", "CONFIG_FILE_NAME", "COUNT", "DOMAINS", "DataArguments",
    "Domain", "EPOCHS", "FIELD_TYPES", "FRACTION", "MAX_COUNT", "MAX_EPOCHS", "MAX_SEED", "MAX_WORKERS",
    "ModelArguments", "NON_NEGATIVE", "POSITIVE", "RunConfig", "SECRET_KEYS", "SEED", "TEXT", "TrainArguments",
    "check_crop_padding", "check_fields", "check_output_dir_writable", "check_train_data_path", "check_value",
    "domain_of", "field_types", "load_recipe", "parse_config", "read_run_config", "resolve_batch_sizes",
    "save_config", "setting", "shared_setting", "validate",
]
