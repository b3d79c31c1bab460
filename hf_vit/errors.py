"""One exception type for every mistake a user can make, the wrapper that turns it into a one-line exit, and the one
home of the rules that keep secrets out of everything this process prints, logs or writes.

Entry points run ``main`` through :func:`run_cli`: a :class:`UserError` prints ``error: <message>`` on stderr (once,
from the main process) and exits with status 2 — no traceback, because the message already says what to fix.

Secrets. This process knows three kinds: the value of any command-line option or recipe key whose *name* is
token-like (:func:`is_secret_name`, which also catches misspellings such as ``--hub_tokn``), the Hub token in the
``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN`` environment variables, and anything shaped like a Hub token
(``hf_`` + 20 or more letters and digits) whoever typed it. :func:`scrub` masks all three in a string; a
:class:`UserError` scrubs its own message, :class:`SecretFilter` scrubs log records, and :func:`mask_argv` masks the
values of token-like options when a message echoes the command line. The other modules use these rules: the config
drops token-like fields from what it saves (:data:`hf_vit.config.SECRET_KEYS`), the model card drops token-like keys
(:func:`is_secret_name`), and the Hub client scrubs the token it sends from the errors it reports (``scrub(...,
held=...)``).
"""

from __future__ import annotations

import argparse
import difflib
import errno
import functools
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable

MASK = "***"
# Hub access tokens: "hf_" and a long run of letters and digits (the HF format; 34+ characters today).
HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# Name rule. A name is cut into words at "_", "-", "." and case changes; it is token-like when a word contains one of
# these stems ("tok" covers token, tokn, hub_tok; "auth" covers authorization), is or ends in "key" (api_key, apikey),
# or is a near miss of "token", "secret" or "password" (toekn, secert). Over-matching only masks a harmless value in
# a message; under-matching leaks a credential, so the rule leans wide.
SECRET_STEMS = ("tok", "tkn", "secret", "passw", "pwd", "cred", "auth")
SECRET_WORDS = ("token", "secret", "password")
NEAR_MISS = 0.75  # difflib ratio: "toekn"/"tken" vs "token" score 0.8-0.9, ordinary words such as "total" 0.4
# Shorter values are not scrubbed wherever they appear (a 3-letter "secret" would mask every "max" and "abc" in the
# logs); they are still masked where a message echoes them as an option's value (mask_argv, the config checks).
MIN_SCRUBBED_LENGTH = 4
# Values that say "no token" rather than being one (`--hub_token none`, `hub_token: null`); masking them everywhere
# would turn every "none" and "true" in the logs into ***.
NOT_SECRETS = {"", "none", "null", "~", "true", "false", "yes", "no", "on", "off"}

_secrets: set[str] = set()


class UserError(Exception):
    """A problem with the user's input (flag, config file, dataset, checkpoint) rather than a bug.

    ``str(err)`` is the message on one line (line breaks a quoted value brought in become spaces) with every known
    secret masked, so no caller can print or log a broken line or a token by accident.
    """

    def __str__(self) -> str:
        return scrub(" ".join(super().__str__().splitlines()))


@functools.lru_cache(maxsize=4096)
def is_secret_name(name: str) -> bool:
    """Whether an option or key name (``--hub_token``, ``hub-tokn``, ``apiKey``) is token-like; see SECRET_STEMS."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name).lstrip("-"))
    words = [w for w in re.split(r"[_\-.\s]+", spaced.lower()) if w]
    return any(
        any(stem in w for stem in SECRET_STEMS)
        or w.endswith(("key", "keys"))
        or any(difflib.SequenceMatcher(None, w, s).ratio() >= NEAR_MISS for s in SECRET_WORDS)
        for w in words
    )


def register_secret(value: object) -> None:
    """Remember ``value`` (and the escaped form ``repr`` would show) as a secret of this process; for a list or
    mapping, every item in it. None, booleans and words such as "none" are no secrets and are ignored."""
    for item in _leaves(value):
        if item is None or isinstance(item, bool):
            continue
        text = str(item)
        if text.strip().lower() in NOT_SECRETS:
            continue
        for form in (text, repr(text)[1:-1]):
            if len(form) >= MIN_SCRUBBED_LENGTH:
                _secrets.add(form)


def _leaves(value: object, seen: set[int] | None = None):
    """The scalars inside nested lists and mappings, each shared (YAML-aliased) container walked once."""
    seen = set() if seen is None else seen
    if isinstance(value, (dict, list, tuple, set)):
        if id(value) in seen:
            return
        seen.add(id(value))
        for item in value.values() if isinstance(value, dict) else value:
            yield from _leaves(item, seen)
    else:
        yield value


def register_argv_secrets(argv: Iterable[str]) -> None:
    """Register the value of every token-like option in a command line (``--name value`` or ``--name=value``),
    known option or misspelt one."""
    args = list(argv)
    for i, arg in enumerate(args):
        secret = _secret_value(args, i)
        if secret is not None:
            register_secret(secret)


def register_mapping_secrets(mapping: object, seen: set[int] | None = None) -> None:
    """Register the value of every token-like key in a (nested) mapping such as a parsed recipe."""
    seen = set() if seen is None else seen
    if not isinstance(mapping, (dict, list, tuple)) or id(mapping) in seen:
        return
    seen.add(id(mapping))  # YAML aliases share containers: walk each once, however often it is referenced
    for key, value in mapping.items() if isinstance(mapping, dict) else enumerate(mapping):
        if isinstance(mapping, dict) and is_secret_name(str(key)):
            register_secret(value)
        else:
            register_mapping_secrets(value, seen)


def mask_argv(argv: Iterable[str]) -> list[str]:
    """``argv`` with the value of every token-like option replaced by ``***`` (for messages that echo arguments)."""
    args = list(argv)
    masked = list(args)
    for i, arg in enumerate(args):
        if _secret_value(args, i) is None:
            continue
        if "=" in arg:
            masked[i] = arg.split("=", 1)[0] + "=" + MASK
        else:
            masked[i + 1] = MASK
    return masked


def _secret_value(args: list[str], i: int) -> str | None:
    """The value given to ``args[i]`` if it is a token-like option, else None."""
    arg = args[i]
    if not arg.startswith("-"):
        return None
    name, eq, value = arg.partition("=")
    if not is_secret_name(name):
        return None
    if eq:
        return value
    # The next word is the value unless it is the next option; "-abc" still counts (argparse would refuse it, but
    # the message echoing it must not show it).
    if i + 1 < len(args) and not args[i + 1].startswith("--"):
        return args[i + 1]
    return None


def forget_secrets() -> None:
    """Forget every registered secret (for tests, and for a process that parses several unrelated runs)."""
    _secrets.clear()


def known_secrets() -> list[str]:
    """Every registered secret plus the Hub token from the environment, longest first (so overlaps mask fully)."""
    found = set(_secrets)
    for var in SECRET_ENV_VARS:
        value = os.environ.get(var)
        if value and len(value) >= MIN_SCRUBBED_LENGTH:
            found.add(value)
    return sorted(found, key=len, reverse=True)


def scrub(text: str, held: Iterable[str | None] = ()) -> str:
    """``text`` with every known secret and every Hub-token-shaped string replaced by ``***``.

    A secret is masked where it stands as a word of its own, not inside a longer word: a token that happens to be
    an ordinary word ("train") must not turn ``per_device_train_batch_size`` into ``per_device_***_batch_size``.
    ``held``: credentials the caller is sending right now (hf_vit.hub's token and ``HF_TOKEN``); those are masked
    wherever they appear, inside a longer word too and whatever their length — a library's error may glue a token
    to a URL or a header name, and a value the caller sends as a credential is no ordinary word.
    """
    for secret in sorted({h for h in held if h}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    secrets = known_secrets()
    if secrets:
        text = _secrets_pattern(tuple(secrets)).sub(MASK, text)
    return HF_TOKEN_PATTERN.sub(MASK, text)


@functools.lru_cache(maxsize=8)
def _secrets_pattern(secrets: tuple[str, ...]) -> re.Pattern:
    # Longest first, so that a secret containing another is masked whole.
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(s) for s in secrets) + r")(?!\w)")


class SecretFilter(logging.Filter):
    """Scrubs every record that passes through it (message, arguments, traceback and stack text).

    Attach it to handlers, not loggers: a handler's filters see every record that reaches it, while a logger's see
    only the records logged on that very logger (see :func:`install_secret_filter`).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: let the handler report it as logging always does
            return True
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


def install_secret_filter() -> None:
    """Add one :class:`SecretFilter` to every handler that exists now (the root logger's and those of libraries
    such as transformers that keep their own); call it after the logging setup. Calling it again adds none twice."""
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, SecretFilter) for f in handler.filters):
                handler.addFilter(SecretFilter())


def raise_user_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` (argparse or ``HfArgumentParser``) raise a one-line :class:`UserError` where argparse would
    print its usage block and exit; returns the same parser."""

    def one_line_error(message: str):
        raise UserError(f"{message}; run with --help for the valid options")

    parser.error = one_line_error
    return parser


class _GoneStdout:
    """``sys.stdout`` for a command whose reader may go away (``| head -1``, a closed terminal): once a write fails
    with a broken pipe (or EIO), further output is dropped and the descriptor points at /dev/null, so the command
    still finishes its work — and the interpreter's own flush at exit cannot fail — and exits with the status of
    that work (0 after a success), not with a BrokenPipeError traceback."""

    def __init__(self, stream):
        self._stream, self.gone = stream, False

    def _lost(self) -> None:
        self.gone = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass  # a stream without a descriptor (a test's capture): dropping the output is enough

    def _guarded(self, call, *args):
        """``call(*args)`` on the stream until its reader is gone; None once it is (or when this call finds out)."""
        if self.gone:
            return None
        try:
            return call(*args)
        except (BrokenPipeError, ConnectionResetError):
            self._lost()
        except OSError as err:
            if err.errno not in (errno.EPIPE, errno.EIO):
                raise
            self._lost()
        return None

    def write(self, text):
        written = self._guarded(self._stream.write, text)
        return len(text) if written is None else written

    def flush(self):
        self._guarded(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run ``main(argv)``; map :class:`UserError` to a one-line, scrubbed message and exit status 2, and any other
    exception to its (scrubbed) traceback and exit status 1, with every loader worker gone. Standard output may be
    closed by its reader at any time (``| head -1``): the command then finishes silently and exits 0 after a
    success."""
    register_argv_secrets(sys.argv[1:] if argv is None else argv)
    stdout = sys.stdout
    if stdout is not None and not isinstance(stdout, _GoneStdout):
        sys.stdout = _GoneStdout(stdout)
    try:
        _run(main, argv)
    finally:
        if isinstance(sys.stdout, _GoneStdout) and sys.stdout._stream is stdout:
            sys.stdout.flush()  # now, through the guard: the interpreter's flush at exit would fail on a gone pipe
            sys.stdout = stdout


def _run(main: Callable[[list[str] | None], object], argv: list[str] | None) -> None:
    try:
        main(argv)
    except UserError as err:
        # Under `accelerate launch` every rank hits the same error; one line is enough.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as err:  # noqa: BLE001 - a bug or an unforeseen failure (a loader worker's included)
        print(scrub(traceback.format_exc()), file=sys.stderr, flush=True)
        # The traceback keeps every frame's locals alive, loader iterators among them: release them so that their
        # workers are shut down the orderly way, then kill whatever is left.
        traceback.clear_frames(err.__traceback__)
        del err
        end_child_processes()
        sys.exit(1)


def end_child_processes(timeout: float = 5.0) -> None:
    """Kill this process's multiprocessing children (loader workers) and reap them.

    Loader workers ignore SIGTERM (they must outlive a scheduler's signal to the whole process group until the trainer
    has saved), so the interpreter's exit, which terminates and then joins them, would wait forever on any still
    alive after an unexpected error. SIGKILL cannot be ignored.
    """
    import multiprocessing

    children = multiprocessing.active_children()
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout)
