"""Every configuration value is checked up front against one declared domain, and secrets stay out of messages.

* Each fault class (a count of 0, a negative seed, NaN/inf, a value of the wrong type in a recipe, a key given twice,
  an output_dir that cannot be written, an invalid Hub id, settings that would make every image unusable) is
  refused by ``parse_config``/``validate`` with a one-line UserError naming the field, the value and the domain.
* The edges of each domain are accepted; ``validate`` writes nothing.
* Token-like values (``--hub_token``, a misspelt ``--hub_tokn``, ``HF_TOKEN``, anything shaped like an hf_ token)
  never appear in an error message, a log record passed through ``SecretFilter``, or the saved config.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import logging
import os
import sys

import pytest
import yaml

from hf_vit.config import (ARG_GROUPS, DOMAINS, FIELD_TYPES, SECRET_KEYS, ArgumentParser, DataArguments,
                           ModelArguments, RunConfig, TrainArguments, check_fields, domain_of, parse_config,
                           read_run_config, save_config, validate)
from hf_vit.config.domains import DOMAIN_KEY
from hf_vit.errors import (SecretFilter, UserError, forget_secrets, install_secret_filter, is_secret_name,
                           raise_user_errors, register_secret, run_cli, scrub)

TOKEN = "hf_DomainTestToken0123456789abcdef"


@pytest.fixture(autouse=True)
def no_secrets_between_tests():
    forget_secrets()
    yield
    forget_secrets()


def refused(argv: list[str]) -> str:
    """The one-line message ``parse_config`` + ``validate`` refuse ``argv`` with."""
    with pytest.raises(UserError) as err:
        validate(parse_config(argv))
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    return message


def recipe(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------------------------ the table
def test_every_field_declares_its_domain_and_every_default_lies_in_it():
    fields = {f.name for g in (ModelArguments, DataArguments, TrainArguments) for f in dataclasses.fields(g)}
    assert set(DOMAINS) == set(FIELD_TYPES) == fields
    check_fields(RunConfig(ModelArguments(), DataArguments(), TrainArguments()))
    validate(parse_config([]))


def test_hf_argument_parser_still_hands_every_metadata_key_to_argparse_and_ours_strips_the_domain():
    """config.ArgumentParser overrides HfArgumentParser's static ``_parse_dataclass_field(parser, field)`` to keep
    the domain out of argparse. If transformers renames that method or stops passing metadata through, this fails
    and the override must follow."""
    from transformers import HfArgumentParser

    assert list(inspect.signature(HfArgumentParser._parse_dataclass_field).parameters) == ["parser", "field"]
    assert isinstance(inspect.getattr_static(HfArgumentParser, "_parse_dataclass_field"), staticmethod)
    with pytest.raises(TypeError, match=DOMAIN_KEY):  # the plain parser passes our key on to add_argument
        HfArgumentParser(ARG_GROUPS)
    parser = ArgumentParser(ARG_GROUPS)
    assert {a.dest for a in parser._actions} >= set(FIELD_TYPES)


def test_the_eval_command_declares_the_flags_it_shares_with_training_from_their_declarations():
    """Same name, help, allowed values and default, except the departures hf_vit/eval.py gives a reason for."""
    from hf_vit.eval import EvalArguments

    declared = {f.name: f for g in ARG_GROUPS for f in dataclasses.fields(g)}
    narrower_help = {"model_name_or_path", "eval_split", "train_val_split"}
    other_default = {"model_name_or_path": dataclasses.MISSING, "dataset_name": dataclasses.MISSING,
                     "train_val_split": 0.0}
    for f in dataclasses.fields(EvalArguments):
        if f.name == "output_dir":  # where eval's results go: another setting than a run's output_dir
            continue
        train = declared[f.name]
        assert domain_of(f) is domain_of(train), f.name
        assert f.default == other_default.get(f.name, train.default), f.name
        if f.name not in narrower_help:
            assert f.metadata["help"] == train.metadata["help"], f.name
    assert [a.dest for a in ArgumentParser(EvalArguments)._actions][1:] == [f.name for f in
                                                                            dataclasses.fields(EvalArguments)]
    with pytest.raises(UserError, match=r"per_device_eval_batch_size must be an integer in \[1, "):
        check_fields(EvalArguments("m", "d", per_device_eval_batch_size=0))


def test_read_run_config_reads_what_save_config_wrote_without_the_plan(tmp_path):
    cfg = parse_config(["--learning_rate", "3e-4", "--output_dir", str(tmp_path)])
    save_config(cfg, str(tmp_path), plan={"steps_per_epoch": 3})
    assert read_run_config(tmp_path) == cfg.to_dict()
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    assert read_run_config(checkpoint) == cfg.to_dict()  # a checkpoint of a run reads its run's
    assert read_run_config(tmp_path / "nothing") is None
    (tmp_path / "train_config.yaml").write_text("learning_rate: 1\nlearning_rate: 2\n")
    with pytest.raises(UserError, match="twice"):
        read_run_config(tmp_path)


BAD_FLAGS = {
    # row id: (flags, words the message must contain: the field, the bad value, the domain)
    "patch_size 0": (["--patch_size", "0"], ["patch_size", "(got 0)", "[1, "]),
    "no attention heads": (["--num_attention_heads", "0"], ["num_attention_heads", "(got 0)", "[1, "]),
    "negative seed": (["--seed", "-1"], ["seed", "(got -1)", "[0, 16777215]"]),
    "seed past numpy's range": (["--seed", "4294967296"], ["seed", "4294967296"]),
    "seed past what data_on_device's seeds hold": (["--subset_seed", "16777216"], ["subset_seed", "16777216"]),
    "logging every 0 steps": (["--logging_steps", "0"], ["logging_steps", "(got 0)"]),
    "NaN epochs": (["--num_train_epochs", "nan"], ["num_train_epochs", "(got nan)"]),
    "epochs that overflow the step count": (["--num_train_epochs", "1e308"], ["num_train_epochs", "1e+308"]),
    "NaN warmup": (["--warmup_epochs", "nan"], ["warmup_epochs", "(got nan)"]),
    "NaN learning rate": (["--learning_rate", "nan"], ["learning_rate must be positive", "(got nan)"]),
    "infinite learning rate": (["--learning_rate", "inf"], ["learning_rate must be positive", "(got inf)"]),
    "overflowing learning rate": (["--learning_rate", "1e309"], ["learning_rate", "(got inf)"]),
    "negative clipping norm": (["--max_grad_norm", "-1"], ["max_grad_norm", ">= 0", "(got -1.0)"]),
    "max_train_steps 0": (["--max_train_steps", "0"], ["max_train_steps", "(got 0)"]),
    "keep 0 checkpoints": (["--checkpoints_total_limit", "0"], ["checkpoints_total_limit", "(got 0)"]),
    "checkpoint every 0 steps": (["--checkpointing_steps", "0"], ["checkpointing_steps", "'epoch' or 'no'", "'0'"]),
    "checkpoint every '²' steps": (["--checkpointing_steps", "²"], ["checkpointing_steps", "'²'"]),
    "dropout 1.5": (["--hidden_dropout_prob", "1.5"], ["hidden_dropout_prob", "[0, 1)", "1.5"]),
    "dropout 1": (["--attention_probs_dropout_prob", "1"], ["attention_probs_dropout_prob", "[0, 1)"]),
    "negative crop padding": (["--crop_padding", "-3"], ["crop_padding", "(got -3)"]),
    "crop padding as wide as the image": (["--image_size", "8", "--patch_size", "4", "--crop_padding", "8"],
                                          ["crop_padding=8", "image_size=8"]),
    "crop scale above 1": (["--random_resized_crop_scale", "5"], ["random_resized_crop_scale", "(0, 1]", "5.0"]),
    "crop scale 0": (["--random_resized_crop_scale", "0"], ["random_resized_crop_scale", "(0, 1]"]),
    "erasing probability 2": (["--random_erasing_prob", "2"], ["random_erasing_prob", "[0, 1]"]),
    "negative mixup": (["--mixup_alpha", "-0.2"], ["mixup_alpha", ">= 0"]),
    "a million loader workers": (["--dataloader_num_workers", "1000000"], ["dataloader_num_workers", "1000000"]),
    "zero batch": (["--per_device_train_batch_size", "0"], ["per_device_train_batch_size", "(got 0)"]),
    "zero global batch": (["--total_train_batch_size", "0"], ["total_train_batch_size", "(got 0)"]),
    "beta1 of 1": (["--adam_beta1", "1"], ["adam_beta1", "[0, 1)"]),
    "zero epsilon": (["--adam_epsilon", "0"], ["adam_epsilon", "positive"]),
    "EMA decay 1": (["--ema_decay", "1"], ["ema_decay", "(0, 1)"]),
    "layer decay 0": (["--layer_decay", "0"], ["layer_decay", "(0, 1]"]),
    "label smoothing 1": (["--label_smoothing", "1"], ["label_smoothing", "[0, 1)"]),
    "bad-sample fraction above 1": (["--max_bad_sample_fraction", "1.5"], ["max_bad_sample_fraction", "[0, 1]"]),
    "zero shuffle buffer": (["--shuffle_buffer_size", "0"], ["shuffle_buffer_size", "(got 0)"]),
    "train_fraction 0": (["--train_fraction", "0"], ["train_fraction must be in (0, 1]"]),
    "empty train split": (["--train_split", ""], ["train_split must be a non-empty string"]),
    "blank dataset name": (["--dataset_name", "  "], ["dataset_name must be a non-empty string"]),
    "empty output_dir": (["--output_dir", ""], ["output_dir must be a non-empty string"]),
    "empty report_to": (["--report_to", ""], ["report_to must be a non-empty string"]),
    "unknown precision": (["--mixed_precision", "fp8"], ["mixed_precision"]),  # argparse's choices
    "a bool that is not one": (["--streaming", "maybe"], ["--streaming", "maybe"]),  # argparse's conversion
    "an int that is a float": (["--max_train_steps", "2.5"], ["--max_train_steps", "2.5"]),
    # relations between fields
    "zero epochs without max_train_steps": (["--num_train_epochs", "0"], ["num_train_epochs must be positive"]),
    "warmup as long as training": (["--warmup_epochs", "10"], ["warmup_epochs=10.0",
                                                                "smaller than num_train_epochs=10"]),
    "min_lr above the peak": (["--min_lr", "0.1"], ["min_lr=0.1", "learning_rate=0.001"]),
    "warmup start above the peak": (["--warmup_start_lr", "0.1"], ["warmup_start_lr=0.1", "learning_rate=0.001"]),
    "fractional validation count": (["--train_val_split", "2.5"], ["train_val_split=2.5", "whole number"]),
    "data_on_device while streaming": (["--data_on_device", "true", "--crop_padding", "4", "--streaming", "true"],
                                       ["data_on_device", "--streaming"]),
    "data_on_device without pad-and-crop": (["--data_on_device", "true"], ["data_on_device", "--crop_padding"]),
    "a blank checkpoint path": (["--model_name_or_path", " "], ["model_name_or_path must be a non-empty string"]),
    # the Hub id, checked with huggingface_hub's own rule
    "invalid hub_model_id": (["--push_to_hub", "true", "--hub_model_id", "me/my model"],
                             ["hub_model_id 'me/my model' is not a valid Hub repository id"]),
    "three-part hub_model_id": (["--hub_model_id", "a/b/c"], ["hub_model_id 'a/b/c'"]),
    "a repo name derived from output_dir that is no id": (["--push_to_hub", "true", "--output_dir", "out/run 1!"],
                                                          ["output_dir 'run 1!'", "--hub_model_id"]),
    "--config given twice": (["--config", "a.yaml", "--config=b.yaml"], ["--config is given 2 times"]),
}


@pytest.mark.parametrize("row", list(BAD_FLAGS))
def test_a_value_outside_its_domain_is_one_line_naming_field_value_and_domain(row):
    flags, words = BAD_FLAGS[row]
    message = refused(flags)
    for word in words:
        assert word in message, message


BAD_RECIPES = {
    "a list for a number": ("learning_rate: [1, 2]\n", ["learning_rate must be a number", "[1, 2]"]),
    "null epochs": ("num_train_epochs: null\n", ["num_train_epochs must be a number", "null"]),
    "a mapping for a string": ("dataset_name: {a: 1}\n", ["dataset_name must be a string", "{'a': 1}"]),
    "a float step count": ("max_train_steps: 2.5\n", ["max_train_steps must be an integer", "2.5"]),
    "an integral float step count": ("max_train_steps: 2.0\n", ["max_train_steps must be an integer"]),
    "dropout 1.5": ("hidden_dropout_prob: 1.5\n", ["hidden_dropout_prob must be in [0, 1)", "1.5"]),
    "a bool given as 1": ("streaming: 1\n", ["streaming must be true or false", "(got 1)"]),
    "an int given as true": ("seed: true\n", ["seed must be an integer", "True"]),
    "a date for a seed": ("seed: 2020-01-01\n", ["seed must be an integer", "2020"]),
    "a number for a string": ("output_dir: 5\n", ["output_dir must be a string", "(got 5)"]),
    "a YAML NaN": ("learning_rate: .nan\n", ["learning_rate must be positive", "nan"]),
    "a huge integer": ("max_train_steps: 99999999999999999999999\n", ["max_train_steps", "99999999999999999999999"]),
    "an int beyond any float": (f"learning_rate: {'9' * 400}\n", ["learning_rate must be positive"]),
    "a choice not offered": ("augmentation: fancy\n", ["augmentation='fancy' is not one of ['basic', 'enhanced']"]),
    "a choice of the wrong type": ("hub_strategy: [end]\n", ["hub_strategy=['end'] is not one of"]),
    "a NUL in a path": ('output_dir: "a\\0b"\n', ["output_dir must not contain a NUL character"]),
    "checkpointing_steps 0 as an int": ("checkpointing_steps: 0\n", ["checkpointing_steps must be"]),
    "no model at all": ("model_preset: null\n", ["give a model_preset or a model_name_or_path"]),
    "a duplicate key": ("learning_rate: 0.1\nseed: 3\nlearning_rate: 0.2\n",
                        ["sets 'learning_rate' twice (lines 1 and 3)"]),
    "an unknown key": ("lerning_rate: 0.1\n", ["unknown config key(s) ['lerning_rate']"]),
    "keys that are not strings": ("1: 2\nfoo: 3\n", ["unknown config key(s) [1, 'foo']"]),
    "not a mapping": ("- 1\n", ["must be a mapping"]),
    "broken YAML": ("a: [\n", ["is not valid YAML", "(line 2)"]),
    "nested beyond reason": ("a: " + "[" * 5000 + "]" * 5000 + "\n", ["nested too deeply"]),
}


@pytest.mark.parametrize("row", list(BAD_RECIPES))
def test_a_recipe_value_of_the_wrong_type_or_shape_is_refused_in_one_line(row, tmp_path):
    text, words = BAD_RECIPES[row]
    message = refused(["--config", recipe(tmp_path, text)])
    for word in words:
        assert word in message, message


def test_a_recipe_that_cannot_be_read_is_a_user_error(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"learning_rate: \xff\xfe\n")
    assert "cannot be read (not UTF-8 text)" in refused(["--config", str(path)])
    assert "does not exist" in refused(["--config", str(tmp_path / "missing.yaml")])


def test_an_aliased_yaml_bomb_is_refused_at_once(tmp_path):
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]  # 9**9 references
    lines.append("learning_rate: *a8")
    message = refused(["--config", recipe(tmp_path, "\n".join(lines) + "\n")])
    assert "unknown config key" in message and len(message) < 400


VALID_EDGES = [
    ["--seed", "0"], ["--seed", "16777215"], ["--subset_seed", "0"], ["--hidden_dropout_prob", "0"],
    ["--random_resized_crop_scale", "1"], ["--crop_padding", "0"], ["--max_grad_norm", "0"],
    ["--checkpointing_steps", "1"], ["--checkpointing_steps", "no"], ["--checkpoints_total_limit", "1"],
    ["--train_val_split", "0"], ["--train_val_split", "0.999"], ["--train_val_split", "100"],
    ["--num_train_epochs", "0", "--max_train_steps", "5"], ["--label_smoothing", "0.999"], ["--layer_decay", "1"],
    ["--warmup_epochs", "9.99"], ["--max_bad_sample_fraction", "1"], ["--max_bad_sample_fraction", "0"],
    ["--train_fraction", "1"], ["--dataloader_num_workers", "0"], ["--dataloader_num_workers", "256"],
    ["--min_lr", "0.001"], ["--warmup_start_lr", "0"], ["--learning_rate", "1e6"], ["--eval_split", ""],
    ["--image_size", "8", "--crop_padding", "7"], ["--push_to_hub", "true", "--hub_model_id", "me/vit-tiny.v1"],
    ["--model_preset", "vit_base_patch16_224", "--model_name_or_path", "some/checkpoint"],
]


@pytest.mark.parametrize("flags", VALID_EDGES, ids=" ".join)
def test_the_edges_of_each_domain_are_accepted(flags):
    validate(parse_config(flags))


def test_recipe_values_in_their_natural_yaml_form_are_accepted(tmp_path):
    # YAML reads 1e-3 as a string and 500 as an int: argparse converts the first, the second is a step count.
    text = ("learning_rate: 1e-3\ncheckpointing_steps: 500\nnum_train_epochs: 3\nstreaming: \"yes\"\n"
            "max_grad_norm: null\n")
    cfg = parse_config(["--config", recipe(tmp_path, text)])
    validate(cfg)
    assert cfg.train.learning_rate == 1e-3 and cfg.train.checkpointing_steps == 500 and cfg.data.streaming is True
    assert cfg.train.max_grad_norm is None


def test_validate_checks_a_config_built_in_code_too():
    with pytest.raises(UserError, match=r"learning_rate must be a number \(got '0.1'\)"):
        validate(RunConfig(ModelArguments(), DataArguments(), TrainArguments(learning_rate="0.1")))
    with pytest.raises(UserError, match="freeze_backbone must be true or false"):
        validate(RunConfig(ModelArguments(freeze_backbone="no"), DataArguments(), TrainArguments()))


def test_no_args_file_next_to_the_script_adds_arguments(tmp_path, monkeypatch):
    """HfArgumentParser would read ``<script>.args`` silently; a run is its recipe plus its flags only."""
    (tmp_path / "run_finetune.args").write_text("--learning_rate 0.5\n")
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "run_finetune.py")])
    assert parse_config([]).train.learning_rate == 1e-3


# ------------------------------------------------------------------------------------------------ output_dir
def snapshot(folder) -> list:
    return sorted((str(p), p.lstat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))


def test_an_output_dir_that_cannot_become_a_writable_folder_is_refused_without_writing(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    before = snapshot(tmp_path)
    assert "is a file, not a folder" in refused(["--output_dir", str(tmp_path / "file")])
    assert "cannot be created" in refused(["--output_dir", str(tmp_path / "file" / "run")])
    assert "broken symbolic link" in refused(["--output_dir", str(tmp_path / "link")])
    assert "File name too long" in refused(["--output_dir", str(tmp_path / ("x" * 300) / "run")])
    validate(parse_config(["--output_dir", str(tmp_path / "new" / "nested" / "run")]))  # created later, by the run
    validate(parse_config(["--output_dir", str(tmp_path)]))
    assert snapshot(tmp_path) == before


def test_an_output_dir_without_write_permission_is_refused(tmp_path, monkeypatch):
    # As root every folder is writable, so the permission answer is simulated: os.access is what validate asks.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(tmp_path)) else
                        real_access(p, mode))
    assert "is not writable" in refused(["--output_dir", str(tmp_path)])
    assert "is not writable" in refused(["--output_dir", str(tmp_path / "run")])


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_a_read_only_folder_is_refused_as_output_dir(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        assert "is not writable" in refused(["--output_dir", str(tmp_path / "ro" / "run")])
    finally:
        (tmp_path / "ro").chmod(0o700)


# ------------------------------------------------------------------------------------------------ secrets
@pytest.mark.parametrize("name, secret", [
    ("hub_token", True), ("--hub_tokn", True), ("--hub-toekn", True), ("hf_token", True), ("apiKey", True),
    ("--api_keys", True), ("--password", True), ("client_secret", True), ("--hub_tkn", True),
    ("--learning_rte", False), ("--output", False), ("--checkpoints_total_limit", False), ("--seed", False),
])
def test_token_like_names_are_recognised_misspelt_or_not(name, secret):
    assert is_secret_name(name) is secret


def test_only_the_hub_token_is_a_secret_field():
    assert SECRET_KEYS == ("hub_token",)
    assert [name for name in FIELD_TYPES if is_secret_name(name)] == ["hub_token"]


def cli_stderr(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        run_cli(lambda a: validate(parse_config(a)), argv)
    return exit_.value.code, err.getvalue()


@pytest.mark.parametrize("argv, secret", [
    (["--hub_tokn", TOKEN], TOKEN),  # a misspelt flag: named in the error, its value masked
    (["--hub_tokn", "shortone"], "shortone"),
    (["--hub-tokn=abc"], "abc"),  # too short to scrub everywhere, still masked where the flag is echoed
    (["--api_key", "s3cr3t-value"], "s3cr3t-value"),
    (["--hub_token", "s3cr3t-value", "--learning_rate", "s3cr3t-value"], "s3cr3t-value"),  # argparse echoes it
    (["--hub_token", "s3cr3t-value", "--bogus", "s3cr3t-value"], "s3cr3t-value"),
    (["--seed", TOKEN], TOKEN),  # shaped like a Hub token, whatever flag carried it
], ids=lambda a: " ".join(a).replace(TOKEN, "TOKEN") if isinstance(a, list) else "")
def test_a_token_given_on_the_command_line_never_reaches_the_error_line(argv, secret):
    code, stderr = cli_stderr(argv)
    assert code == 2 and stderr.startswith("error: ") and len(stderr.splitlines()) == 1, stderr
    assert secret not in stderr, stderr


@pytest.mark.parametrize("text", [
    f"hub_tokn: {TOKEN}\n",  # a misspelt key: the error names it, never its value
    "hub_token: [topsecret1, 2]\n",  # the wrong type: the message shows *** for the value
    "hub_token: topsecret1\nlearning_rate: topsecret1\n",  # the same value in another field is masked too
    "learning_rate: [\nhub_token: topsecret1\n",  # YAML that does not parse still has its secrets learnt
])
def test_a_token_in_a_recipe_never_reaches_the_error_line(tmp_path, text):
    code, stderr = cli_stderr(["--config", recipe(tmp_path, text)])
    assert code == 2 and len(stderr.splitlines()) == 1, stderr
    assert TOKEN not in stderr and "topsecret1" not in stderr, stderr


def test_the_hub_token_is_kept_out_of_the_saved_config_and_the_repr(tmp_path):
    cfg = parse_config(["--hub_token", TOKEN, "--output_dir", str(tmp_path)])
    assert cfg.train.hub_token == TOKEN
    text = open(save_config(cfg, str(tmp_path))).read()
    assert TOKEN not in text and "hub_token" not in yaml.safe_load(text)
    assert TOKEN not in repr(cfg)


def test_a_recipe_token_is_used_but_not_printed_by_help(tmp_path, capsys):
    path = recipe(tmp_path, f"hub_token: {TOKEN}\nlearning_rate: 0.5\n")
    assert parse_config(["--config", path]).train.hub_token == TOKEN
    assert parse_config(["--config", path, "--hub_token", "from-the-flag"]).train.hub_token == "from-the-flag"
    with pytest.raises(SystemExit) as exit_:
        parse_config(["--config", path, "--help"])
    help_text = capsys.readouterr().out
    assert exit_.value.code == 0 and "(default: 0.5)" in help_text and TOKEN not in help_text


def test_the_log_filter_scrubs_registered_environment_and_token_shaped_secrets(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "env-token-value")
    parse_config(["--hub_token", "registered-secret"])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(SecretFilter())
    log = logging.getLogger("hf_vit.test_secrets")
    log.addHandler(handler)
    try:
        log.warning("token %s and %s and %s", "registered-secret", "env-token-value", "hf_" + "x" * 30)
        try:
            raise RuntimeError("failed with registered-secret")
        except RuntimeError:
            log.exception("upload failed")
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert "token *** and *** and ***" in text and "upload failed" in text and "RuntimeError" in text
    for secret in ("registered-secret", "env-token-value", "hf_xxx"):
        assert secret not in text


def test_install_secret_filter_reaches_every_handler_once():
    handler = logging.StreamHandler(io.StringIO())
    library = logging.getLogger("some_library_with_its_own_handler")
    library.addHandler(handler)
    try:
        install_secret_filter()
        install_secret_filter()
        assert sum(isinstance(f, SecretFilter) for f in handler.filters) == 1
    finally:
        library.removeHandler(handler)


def test_scrub_masks_overlapping_secrets_whole_and_leaves_plain_words_alone():
    register_secret("abcd1234")
    register_secret("abcd1234wxyz")
    register_secret(["none", None, True, "no"])  # "no token" values, not tokens
    register_secret("train")  # a token that is an ordinary word masks the word, not the names containing it
    assert scrub("x abcd1234wxyz y abcd1234") == "x *** y ***"
    assert scrub("per_device_train_batch_size='train'") == "per_device_train_batch_size='***'"
    assert scrub("checkpointing none, no, true") == "checkpointing none, no, true"


def test_a_credential_the_caller_sends_is_masked_even_inside_a_longer_word():
    """hf_vit.hub's rule, kept when it moved into errors.scrub: the token it sends is masked wherever it appears,
    however short, while the registered secrets stay whole-word."""
    assert scrub("Authorization: Bearerabc123x; url?t=abc123x", held=["abc123x", None]) == \
        "Authorization: Bearer***; url?t=***"
    assert scrub("Bearerabc123x") == "Bearerabc123x"  # not held, not registered: nothing to mask


def test_run_cli_prints_a_multi_line_message_as_one_line():
    err = io.StringIO()

    def main(argv):
        raise UserError("first line\nsecond line")

    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        run_cli(main, [])
    assert exit_.value.code == 2 and err.getvalue() == "error: first line second line\n"


def test_an_argparse_parser_raises_a_user_error_instead_of_printing_usage():
    parser = raise_user_errors(argparse.ArgumentParser())
    parser.add_argument("--n", type=int)
    with pytest.raises(UserError, match=r"argument --n: invalid int value: 'x'; run with --help"):
        parser.parse_args(["--n", "x"])
