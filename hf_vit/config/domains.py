"""The values a setting may hold, declared with the setting itself.

Each field of the argument groups (:mod:`hf_vit.config.groups`) is declared by :func:`setting`: its default, its
:class:`Domain` (the values it accepts beyond its annotated type) and its ``help``, in one place. The checks
(:mod:`hf_vit.config.checks`) read the domain back from the field (:func:`domain_of`), and every command that takes
the setting as a flag (train, eval, attention) declares it from the same field (:func:`shared_setting`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# The metadata key that holds a field's Domain. HfArgumentParser hands every metadata key to argparse.add_argument,
# so the parsers here strip it first (hf_vit.config.recipe.ArgumentParser).
DOMAIN_KEY = "domain"
# ------------------------------------------------------------------------------------------------ field domains
# Counts (sizes, steps, samples, limits) stop at the int32 range: torch and numpy index with 32- or 64-bit integers,
# nothing here counts past 2**31, and a bigger number can only be a typo (an exponent, a pasted hash).
MAX_COUNT = 2**31 - 1
# Seeds: numpy (seeded by accelerate's set_seed) refuses anything outside [0, 2**32), and data_on_device seeds torch
# with seed x ~1e12 + position (data/keys.py position_seed), which must stay below torch's 2**64: 2**24 keeps it there.
MAX_SEED = 2**24 - 1
# A million passes over the data is no schedule anyone means; far beyond it, epochs x steps per epoch overflows the
# float that the step count is computed from.
MAX_EPOCHS = 1_000_000
# Loader worker processes per training process: more than the cores of the largest machines can only be a typo, and
# each worker is a forked process.
MAX_WORKERS = 256


@dataclass(frozen=True)
class Domain:
    """The values one field accepts beyond its annotated type.

    Numbers: the interval ``low..high`` (each end included unless ``*_open``); no ``high`` means any finite value.
    Strings: non-empty unless ``allow_empty``. ``words``: a string field that also takes a count
    (``checkpointing_steps``: a whole number of steps >= 1, or one of these words). bool and Literal fields need
    nothing beyond their type.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    allow_empty: bool = False
    words: tuple[str, ...] = ()

    def contains(self, x: float) -> bool:
        if self.low is not None and (x < self.low or (self.low_open and x == self.low)):
            return False
        if self.high is None:
            return math.isfinite(x)
        return x < self.high or (not self.high_open and x == self.high)

    def describe(self, integer: bool) -> str:
        if self.high is None:
            if self.low == 0 and self.low_open:
                return "positive and finite"
            return f"{'>' if self.low_open else '>='} {_number(self.low)} and finite"
        interval = (f"{'(' if self.low_open else '['}{_number(self.low)}, "
                    f"{_number(self.high)}{')' if self.high_open else ']'}")
        return f"an integer in {interval}" if integer else f"in {interval}"


COUNT = Domain(1, MAX_COUNT)
SEED = Domain(0, MAX_SEED)
EPOCHS = Domain(0, MAX_EPOCHS)
POSITIVE = Domain(0, low_open=True)
NON_NEGATIVE = Domain(0)
FRACTION = Domain(0, 1)  # a probability or fraction, both ends allowed
# 1 would zero every activation (dropout), erase the label (smoothing), freeze Adam's moment estimates (betas).
BELOW_ONE = Domain(0, 1, high_open=True)
TEXT = Domain()  # a non-empty string (or null where the field is Optional)
ANY = Domain()  # bool and Literal fields: the type says it all



def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def setting(default=dataclasses.MISSING, domain: Domain = ANY, help: str = "", **kwargs):  # noqa: A002 - HF's word
    """A dataclass field declaring one setting: ``default`` (MISSING: required), its ``domain`` and its ``help``.
    ``kwargs`` go to :func:`dataclasses.field` (``repr=False`` for a secret)."""
    return dataclasses.field(default=default, metadata={"help": help, DOMAIN_KEY: domain}, **kwargs)


def domain_of(f: dataclasses.Field) -> Domain:
    """The :class:`Domain` a field was declared with; a field declared without one is a RuntimeError (each setting
    must say which values it takes)."""
    if DOMAIN_KEY not in f.metadata:
        raise RuntimeError(f"setting {f.name!r} is declared without a domain; declare it with config.setting()")
    return f.metadata[DOMAIN_KEY]


_KEEP = object()  # shared_setting: keep the declaration's default


def shared_setting(group: type, name: str, default=_KEEP, help: str | None = None):  # noqa: A002
    """The field ``name`` of argument group ``group``, for another command that takes the same flag: the same domain
    and help, and the same default unless ``default`` is given (the caller says why; ``dataclasses.MISSING``: the flag
    is required there). ``help`` replaces the help where the flag means a narrower thing there (e.g. eval's
    ``train_val_split``)."""
    original = next(f for f in dataclasses.fields(group) if f.name == name)
    return setting(original.default if default is _KEEP else default, domain_of(original),
                   original.metadata["help"] if help is None else help, repr=original.repr)
