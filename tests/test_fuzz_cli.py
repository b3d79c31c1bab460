"""Fuzzing the command line and recipe files: every input either runs or ends in one ``error:`` line.

Two levels:

* Fast and broad (in-process ``parse_config`` + ``validate``, thousands of cases): every field of the three
  argument groups, alone and in pairs, given values from its type's edges (0, negatives, NaN, inf, huge, wrong
  types, empty and blank strings; in recipes also lists, mappings and null) mixed with random text and numbers,
  on the command line (``--f v``, ``--f=v``, ``--f-with-hyphens v``, a bare ``--f``) and in recipe files (written by
  ``yaml.safe_dump``, or assembled line by line, so keys repeat and the YAML breaks). Each case must return or raise
  a one-line :class:`UserError` that names one of the fields it fuzzed — never another exception — and a token
  slipped into the case (``--hub_tokn s3cr3t...``) must never be in the message.
* End to end (a seeded sample of the same edges, one tiny run per case): the real entry point, in-process,
  through ``run_cli(lambda argv: train(parse_config(argv)), argv)``, on a generated 32-image, 8x8-pixel, 4-class
  dataset with a one-block model and one step. Each case must exit 0, or exit 2 with exactly one ``error:`` line;
  never a traceback; within a time bound; and on exit 2 the output folder (pre-populated with a file) is
  byte-for-byte what it was.

Why hypothesis for the fast level: it draws the combinations (field x form x value, pairs, a secret slipped in)
from one declarative description, mixes the hand-picked edges with values nobody thought of (unicode digits,
``1e-320``, a NUL byte in a recipe), and shrinks a failure to the smallest command line or recipe that shows it.
In CI it runs derandomized (the same cases every run) with ``HF_VIT_FUZZ_EXAMPLES`` examples per property
(default 1000). A longer, randomized run::

    HF_VIT_FUZZ_EXAMPLES=50000 HF_VIT_FUZZ_RANDOM=1 OMP_NUM_THREADS=1 \\
        .venv/bin/python -m pytest tests/test_fuzz_cli.py -k fast

The end-to-end sample is ``HF_VIT_FUZZ_E2E_CASES`` cases (default 120) drawn with seed ``HF_VIT_FUZZ_E2E_SEED``
(default 0); raise the first or change the second for a longer run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import random
import signal
import string
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hf_vit.config import FIELD_TYPES, parse_config, validate
from hf_vit.errors import SecretFilter, UserError, forget_secrets, run_cli

FIELDS = sorted(FIELD_TYPES)
EXAMPLES = int(os.environ.get("HF_VIT_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=os.environ.get("HF_VIT_FUZZ_RANDOM") != "1",
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# Command-line words at the edges of every type (and of the string fields' special words).
EDGE_WORDS = [
    "0", "1", "-1", "2", "2.5", "0.5", "1e-3", "-0", "nan", "-nan", "inf", "-inf", "1e308", "1e309", "-1e309",
    "1e-320", "16777215", "16777216", "2147483647", "2147483648", "4294967295", "4294967296",
    "99999999999999999999999", "", " ", "\t",
    "true", "false", "yes", "1.0", "None", "null", "epoch", "no", "latest", "basic", "enhanced", "bf16", "exact",
    "abc", "0x10", "1_000", "٣", "²", "a\nb", "/", ".", "..", "a/b/c", "me/model", "hf_" + "Q" * 24, "é" * 300,
    "x" * 5000,
]
# Recipe values at the edges of every type, YAML's own included.
EDGE_OBJECTS = [
    0, 1, -1, 2.5, 2.0, math.nan, math.inf, -math.inf, 10**30, 2**31, 2**32, -(2**63), 1e-320, "", " ", "nan",
    "1e-3", "true", True, False, None, [], {}, [1, 2], {"a": 1}, "epoch", "no", "basic", "a\0b", "é" * 300,
]
SECRET_FLAGS = ["--hub_token", "--hub_tokn", "--hub-token", "--api_key", "--HF_TOKEN"]
SECRET_KEYS = ["hub_token", "hub_tokn", "api_key", "HF_TOKEN"]


@pytest.fixture(autouse=True)
def no_secrets_between_tests():
    forget_secrets()
    yield
    forget_secrets()


def words() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(EDGE_WORDS), st.text(max_size=20), st.integers().map(str), st.floats().map(repr),
    ).filter(lambda w: w not in ("-h", "--help"))  # --help prints the usage and exits 0, as it should


def secrets() -> st.SearchStrategy[str]:
    return st.text(alphabet=string.ascii_letters + string.digits, min_size=4, max_size=12).map(lambda s: "s3cr3t" + s)


@st.composite
def command_lines(draw) -> tuple[list[str], list[str], str | None]:
    """(argv, names an error may name, secret that must not be echoed)."""
    argv, names = [], []
    for name in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=2, unique=True)):
        flag = "--" + (name.replace("_", "-") if draw(st.booleans()) else name)
        if draw(st.integers(0, 9)) == 0:  # a misspelt flag: the error is "unknown argument"
            flag = flag[:-1]
        names.append(name)
        form = draw(st.sampled_from(["separate", "separate", "equals", "bare"]))
        value = draw(words())
        argv += {"separate": [flag, value], "equals": [f"{flag}={value}"], "bare": [flag]}[form]
    secret = None
    if draw(st.booleans()):
        secret, flag = draw(secrets()), draw(st.sampled_from(SECRET_FLAGS))
        names.append(flag.lstrip("-"))
        pair = [flag, secret]
        argv = pair + argv if draw(st.booleans()) else argv + pair
    return argv, names, secret


def recipe_values(name: str) -> st.SearchStrategy[object]:
    """Any YAML value, or one of the field's own type that may well be valid (so accepted recipes are drawn too)."""
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                        st.sampled_from(EDGE_OBJECTS))
    anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=5), inner, max_size=2), max_leaves=5)
    kind, _ = FIELD_TYPES[name]
    own = {int: st.integers(1, 64), float: st.floats(0, 1), bool: st.booleans(), str: st.sampled_from(["x", "train"])}
    plausible = (st.sampled_from(typing.get_args(kind)) if typing.get_origin(kind) is typing.Literal
                 else own[kind])
    return anything | plausible


@st.composite
def recipes(draw) -> dict:
    names = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=2, unique=True))
    return {name: draw(recipe_values(name)) for name in names}


def assert_runs_or_one_line_error(argv: list[str], names: list[str], secret: str | None) -> None:
    try:
        validate(parse_config(argv))
        event("accepted")  # --hypothesis-show-statistics shows the mix of accepted and refused cases
    except UserError as err:
        event("refused")
        message = str(err)
        assert len(message.splitlines()) == 1, message
        # "unknown argument" also names a value: after a bool flag (whose value is optional) a word that looks like
        # an option, such as "-:", is not taken as its value but reported itself.
        spelled = names + [n.replace("_", "-") for n in names] + ["unknown argument"]
        assert any(n in message for n in spelled), f"{message!r} names none of {names}"
        if secret is not None:
            assert secret not in message, message


# ------------------------------------------------------------------------------------------------ fast and broad
@FUZZ
@given(case=command_lines())
def test_fast_fuzzed_command_lines_parse_or_fail_with_one_line_naming_the_field(case):
    forget_secrets()
    assert_runs_or_one_line_error(*case)


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz_recipes") / "recipe.yaml"


@FUZZ
@given(fields=recipes(), secret=st.none() | st.tuples(st.sampled_from(SECRET_KEYS), secrets()))
def test_fast_fuzzed_recipes_parse_or_fail_with_one_line_naming_the_field(recipe_path, fields, secret):
    forget_secrets()
    content, names = dict(fields), list(fields)
    if secret is not None:
        content[secret[0]] = secret[1]
        names += [secret[0], "unknown config key"]
    recipe_path.write_text(yaml.safe_dump(content, allow_unicode=True))
    assert_runs_or_one_line_error(["--config", str(recipe_path)], names, secret and secret[1])


@FUZZ
@given(lines=st.lists(st.one_of(
    st.tuples(st.sampled_from(FIELDS), st.sampled_from([str(v) for v in EDGE_OBJECTS] + EDGE_WORDS[:40]))
    .map(lambda kv: f"{kv[0]}: {kv[1]}"),
    st.text(max_size=30),
), min_size=1, max_size=4))
def test_fast_hand_assembled_recipes_repeated_keys_and_broken_yaml_fail_with_one_line(recipe_path, lines):
    forget_secrets()
    recipe_path.write_text("\n".join(lines) + "\n")
    try:
        validate(parse_config(["--config", str(recipe_path)]))
    except UserError as err:
        assert len(str(err).splitlines()) == 1, str(err)


# ------------------------------------------------------------------------------------------------ end to end
E2E_CASES = int(os.environ.get("HF_VIT_FUZZ_E2E_CASES", "120"))
E2E_SEED = int(os.environ.get("HF_VIT_FUZZ_E2E_SEED", "0"))
E2E_SECONDS = 120  # a tiny run takes seconds; one past this bound is hanging
SECRET = "hf_FuzzE2eSecretToken0123456789abcd"

# Fields the end-to-end sample leaves alone: output_dir is the test's own folder (a fuzzed value would write
# elsewhere: "/", ".", the working tree); push_to_hub would start uploads; torch_compile true compiles for minutes on
# CPU. Their values are covered by the fast level. (max_train_steps gets refused values only: a valid one only makes
# the run longer.)
E2E_SKIPPED = {"output_dir", "push_to_hub", "torch_compile"}
# Architecture sizes stay small in this sample: huge ones are refused (or not) by models.py's memory estimate.
E2E_WORDS = {
    int: ["0", "-1", "1", "2", "2.5", "abc", "", "2147483648", "99999999999999999999999"],
    float: ["0", "-1", "0.5", "1", "nan", "inf", "-inf", "1e309", "abc", ""],
    str: ["", " ", "x", "latest", "a\nb", "hf_" + "Q" * 24],
    bool: ["maybe", "true", "false", "2"],
}
# The base values a fuzzed run inherits: max_train_steps, workers and report_to keep each run tiny, and
# overwrite_output_dir lets a run write beside the user's file in the output folder (as the README's bad-input table
# is tested: an error must still come before anything is written).
E2E_BASE = [
    "--overwrite_output_dir", "true",
    "--model_preset", "vit_tiny_cifar", "--hidden_size", "16", "--num_hidden_layers", "1", "--num_attention_heads",
    "1", "--intermediate_size", "16", "--image_size", "8", "--patch_size", "4", "--max_train_steps", "1",
    "--dataloader_num_workers", "0", "--report_to", "none", "--train_val_split", "0.25",
    "--total_train_batch_size", "8", "--per_device_eval_batch_size", "8",
]


def e2e_words(name: str) -> list[str]:
    kind, _ = FIELD_TYPES[name]
    if typing.get_origin(kind) is typing.Literal:
        return ["fancy", "", typing.get_args(kind)[0]]
    if name == "max_train_steps":
        return ["0", "-1", "2.5", "abc", "2147483648"]
    if name == "checkpointing_steps":
        return ["0", "-1", "1", "epoch", "no", "²", ""]
    return E2E_WORDS[kind]


def e2e_sample(n: int, seed: int) -> list[list[str]]:
    """``n`` fuzzed flag lists: singles and pairs of (field, edge word), drawn with ``seed``."""
    rng = random.Random(seed)
    fields = [f for f in FIELDS if f not in E2E_SKIPPED]
    cases = []
    while len(cases) < n:
        flags = []
        for name in rng.sample(fields, rng.choice([1, 2])):
            flags += [f"--{name}", rng.choice(e2e_words(name))]
        if flags not in cases:
            cases.append(flags)
    return cases


# The brief's examples, end to end, besides the sample.
E2E_FIXED = [
    ["--patch_size", "0"], ["--num_attention_heads", "0"], ["--seed", "-1"], ["--logging_steps", "0"],
    ["--num_train_epochs", "nan"], ["--warmup_epochs", "nan"], ["--learning_rate", "nan"], ["--learning_rate", "inf"],
    ["--max_grad_norm", "-1"], ["--max_train_steps", "0"], ["--checkpoints_total_limit", "0"],
    ["--checkpointing_steps", "0"], ["--hidden_dropout_prob", "1.5"], ["--crop_padding", "-3"],
    ["--random_resized_crop_scale", "5"], ["--push_to_hub", "true", "--hub_model_id", "a/b/c"],
    ["--hub_tokn", SECRET], ["--crop_padding", "8"],
]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """32 random 8x8 RGB images in 4 classes, written with ``save_to_disk``."""
    import datasets
    import PIL.Image

    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(32)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("abcd"))})
    path = tmp_path_factory.mktemp("tiny") / "data"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"image": images, "label": [i % 4 for i in range(32)]}, features=features)}).save_to_disk(str(path))
    return path


class _TimeLimit(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def expire(signum, frame):
        raise _TimeLimit(f"the run took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def listing(folder) -> dict:
    """Every path under ``folder`` with its type and content hash: equal listings = nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def run_entry_point(flags: list[str], dataset, out, caplog) -> tuple[int, str]:
    """``train(parse_config(argv))`` through ``run_cli``, in this process: (exit status, stderr)."""
    from hf_vit.trainer import train

    argv = ["--dataset_name", str(dataset), *E2E_BASE, "--output_dir", str(out), *flags]
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), time_limit(E2E_SECONDS), caplog.at_level("INFO"):
        try:
            run_cli(lambda a: train(parse_config(a)), argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


@pytest.mark.parametrize("flags", E2E_FIXED + e2e_sample(E2E_CASES, E2E_SEED),
                         ids=lambda f: " ".join(f).replace(SECRET, "SECRET").encode("unicode_escape").decode()[:80])
def test_end_to_end_each_fuzzed_run_exits_0_or_2_with_one_line_and_leaves_the_folder_untouched(
        flags, tiny_dataset, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("a file of the user's, already in the output folder\n")
    before = listing(out)
    code, stderr = run_entry_point(flags, tiny_dataset, out, caplog)
    assert "Traceback" not in stderr and "Traceback" not in caplog.text, stderr[-3000:]
    assert code in (0, 2), stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    if code == 2:
        assert len(errors) == 1, stderr[-3000:]
        assert listing(out) == before, errors
    else:
        assert errors == [], errors
    assert SECRET not in stderr


def test_end_to_end_a_hub_token_is_in_no_error_line_log_record_or_output_file(tiny_dataset, tmp_path, caplog):
    caplog.handler.addFilter(SecretFilter())  # what the logging setup installs on every handler
    misspelt = tmp_path / "misspelt"
    misspelt.mkdir()
    code, stderr = run_entry_point(["--hub_tokn", SECRET], tiny_dataset, misspelt, caplog)
    assert code == 2 and "unknown argument" in stderr and SECRET not in stderr, stderr
    out = tmp_path / "run"
    code, stderr = run_entry_point(["--hub_token", SECRET, "--report_to", "tensorboard"], tiny_dataset, out, caplog)
    assert code == 0, stderr[-3000:]
    assert SECRET not in stderr and SECRET not in caplog.text
    assert (out / "train_config.yaml").is_file()
    leaks = [str(p) for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == [], leaks


# ------------------------------------------------------------------------ the other commands: eval, report, push,
# attention. Each fuzzed command line (flags of the command's own, values from the edges above and paths that point
# into a run, a checkpoint, the dataset or a file) runs through the real entry wrapper in this process, against a
# finished tiny run, and must exit 0 or exit 2 with exactly one `error:` line, never a traceback, within the time
# bound, with the run folder and the dataset byte-for-byte untouched (no command writes into a run). Pushes go to a
# fake Hub. HF_VIT_FUZZ_COMMAND_EXAMPLES cases per command (default 25).
COMMAND_EXAMPLES = int(os.environ.get("HF_VIT_FUZZ_COMMAND_EXAMPLES", "25"))
COMMAND_FUZZ = settings(FUZZ, max_examples=COMMAND_EXAMPLES)
COMMAND_FLAGS = {
    "eval": ["--model_name_or_path", "--dataset_name", "--eval_split", "--dataset_config_name", "--train_val_split",
             "--split_seed", "--per_device_eval_batch_size", "--max_eval_samples", "--output_dir", "--image_column_name",
             "--label_column_name", "--dataloader_num_workers", "--mixed_precision"],
    "report": ["--output_dir"],
    "push": ["--hub_model_id", "--private", "--hub_token", "--include_checkpoints"],
    "attention": ["--images", "--output", "--dataset_name", "--eval_split", "--head_fusion", "--discard_ratio"],
}
# Paths, as placeholders filled per case: {run}, {ckpt}, {data}, {file}, {out} (a fresh folder of the test's).
PATH_WORDS = ["{run}", "{ckpt}", "{data}", "{file}", "{out}", "{run}/sub", "{ckpt}/sub", "{data}/sub", "{out}/x.png",
              "{out}/x.txt", "{file}/x", "{out}/missing/deeper"]
COMMAND_WORDS = ["0", "-1", "1", "2", "2.5", "nan", "inf", "abc", "", " ", "train", "test", "latest", "mean", "max",
                 "no", "bf16", "me/model", "a/b/c", "hf_" + "Q" * 24, "2147483648", "a\nb"]


@pytest.fixture(scope="module")
def finished_tiny_run(tiny_dataset, tmp_path_factory):
    """A finished one-step run on the tiny dataset, with its checkpoint."""
    from hf_vit.trainer import train

    out = tmp_path_factory.mktemp("fuzz_run") / "run"
    argv = ["--dataset_name", str(tiny_dataset), *E2E_BASE, "--output_dir", str(out), "--checkpointing_steps", "1"]
    run_cli(lambda a: train(parse_config(a)), argv)
    assert (out / "all_results.json").is_file() and (out / "checkpoint-1").is_dir()
    return out


def command_main(name: str):
    import importlib

    return importlib.import_module({"eval": "hf_vit.eval", "report": "hf_vit.report", "push": "hf_vit.push",
                                    "attention": "hf_vit.attention"}[name]).main


def base_argv(name: str) -> list[str]:
    return {"eval": ["--model_name_or_path", "{run}", "--dataset_name", "{data}", "--eval_split", "train",
                     "--train_val_split", "0.25", "--dataloader_num_workers", "0", "--output_dir", "{out}/evals"],
            "report": ["{run}"],
            "push": ["{run}", "--hub_model_id", "alice/run"],
            "attention": ["{run}", "--images", "2", "--output", "{out}/rollout.png"]}[name]


@st.composite
def command_cases(draw, name: str) -> list[str]:
    argv = list(base_argv(name))
    if draw(st.integers(0, 3)) == 0:  # the positional (the run) itself fuzzed
        positional = draw(st.sampled_from(PATH_WORDS + COMMAND_WORDS))
        argv = [positional if a == "{run}" and i == argv.index("{run}") else a for i, a in enumerate(argv)]
    for flag in draw(st.lists(st.sampled_from(COMMAND_FLAGS[name]), min_size=0, max_size=2, unique=True)):
        form = draw(st.sampled_from(["separate", "equals", "bare"]))
        value = draw(st.sampled_from(PATH_WORDS + COMMAND_WORDS) | st.text(max_size=8))
        argv += {"separate": [flag, value], "equals": [f"{flag}={value}"], "bare": [flag]}[form]
    return argv


def run_command(name: str, argv: list[str], caplog) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), time_limit(E2E_SECONDS), \
            caplog.at_level("INFO"):
        try:
            run_cli(command_main(name), argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


@pytest.fixture
def fake_hub(monkeypatch):
    from types import SimpleNamespace

    import hf_vit.hub as hub

    class Hub:
        def whoami(self):
            return {"name": "alice"}

        def create_repo(self, repo_id, **kwargs):
            return repo_id

        def upload_folder(self, **kwargs):
            return SimpleNamespace(commit_url="https://huggingface.co/x/commit/1")

    monkeypatch.setattr(hub, "HfApi", lambda token=None: Hub())


@pytest.mark.parametrize("name", sorted(COMMAND_FLAGS))
def test_other_commands_fuzzed_exit_0_or_2_with_one_line_and_never_touch_the_run(
        name, finished_tiny_run, tiny_dataset, tmp_path_factory, fake_hub, caplog, monkeypatch):
    run, data = finished_tiny_run, tiny_dataset
    # A fuzzed relative path (a report's output, an eval's run) is the user's working folder's: never the checkout.
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))

    def state():  # datasets' own filter caches (cache-*.arrow) may appear beside a saved dataset: not ours
        return listing(run), {k: v for k, v in listing(data).items() if not Path(k).name.startswith("cache-")}

    before, codes = state(), []

    @COMMAND_FUZZ
    @given(case=command_cases(name))
    def check(case):
        forget_secrets()
        caplog.clear()
        out = tmp_path_factory.mktemp("cmd")
        (out / "a_file").write_text("mine\n")
        places = {"{run}": run, "{ckpt}": run / "checkpoint-1", "{data}": data, "{file}": out / "a_file", "{out}": out}
        argv = []
        for word in case:  # placeholders replaced as text: a fuzzed "{" stays what it is
            for place, path in places.items():
                word = word.replace(place, str(path))
            argv.append(word)
        code, stderr = run_command(name, argv, caplog)
        codes.append(code)
        assert "Traceback" not in stderr and "Traceback" not in caplog.text, (argv, stderr[-3000:])
        assert code in (0, 2), (argv, stderr[-3000:])
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == (1 if code == 2 else 0), (argv, stderr[-3000:])
        assert (out / "a_file").read_text() == "mine\n"
        assert state() == before, argv

    check()
    assert {0, 2} <= set(codes), codes  # the sample holds commands that ran as well as ones refused
