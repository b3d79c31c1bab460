"""One exception type for every mistake a user can make, and the wrapper that turns it into a one-line exit.

Entry points run ``main`` through :func:`run_cli`: a :class:`UserError` prints ``error: <message>`` on stderr (once,
from the main process) and exits with status 2 — no traceback, because the message already says what to fix.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """A problem with the user's input (flag, config file, dataset, checkpoint) rather than a bug."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run ``main(argv)``; map :class:`UserError` to a one-line message and exit status 2."""
    try:
        main(argv)
    except UserError as err:
        # Under `accelerate launch` every rank hits the same error; one line is enough.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
