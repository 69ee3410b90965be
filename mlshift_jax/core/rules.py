"""One rule per number a user can give, shared by every command and the matrix.

`RULES[name]` says what values option `name` takes; `check(name, value, where)` applies it
(ConfigError "where: expected ..., found ..."), `argtype(name)` is the same rule as an
argparse `type=`, and the matrix parser calls `check` for its keys of the same names. So
`--seed -1`, `seeds = [-1]` and `stability --lr inf` are refused alike, before any data loads.

Seeds: 0 <= seed < 2**31, the range every RNG the harness uses accepts as is
(`jax.random.key`, `numpy.random.default_rng`, the numpy baseline's `RandomState`) and that a
seed plus a sample index (`seed + i` in stability and the poison populations) keeps inside
int32 for any sane count. Sizes larger than the data (`--train-size`, `--size`, `--n`, ...)
are an error everywhere (`check_at_most`), never silently clamped.

`check_memory(need, what, hint)` refuses work whose estimated peak memory exceeds what this
machine has free: "needs ~X GiB, this machine has Y; lower --samples/--size/--hidden".
"""

from __future__ import annotations

import argparse
import math
from typing import Any, NamedTuple

import numpy as np

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.core.files import MEMORY_SHARE, available_memory, gib

SEED_LIMIT = 2**31  # seeds are 0 .. SEED_LIMIT - 1


class Rule(NamedTuple):
    """kind: int or float; lo / hi: bounds (None: none); lo_open: lo itself refused."""

    kind: type
    lo: float | None
    hi: float | None
    unit: str
    lo_open: bool = False

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        if self.lo is not None and self.hi is not None and not self.lo_open:
            return f"{what} in {_fmt(self.lo)}..{_fmt(self.hi)}"
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {_fmt(self.lo)}")
        if self.hi is not None:
            parts.append(f"<= {_fmt(self.hi)}")
        return f"{what} {' and '.join(parts)}".strip()


def _fmt(x: float) -> str:
    if x == SEED_LIMIT - 1:
        return "2**31-1"
    return f"{x:g}" if isinstance(x, float) else f"{x:,}".replace(",", "_")


RULES: dict[str, Rule] = {
    "seed": Rule(int, 0, SEED_LIMIT - 1, "random seed"),
    "hidden": Rule(int, 1, 65_536, "hidden units"),
    "epochs": Rule(int, 1, 10_000, "passes over the training data"),
    "batch_size": Rule(int, 1, 1 << 20, "images per step"),
    "train_size": Rule(int, 1, 10**9, "images: the first N training images"),
    "samples": Rule(int, 1, 100_000, "models, one per random sample"),
    "size": Rule(int, 1, 10**9, "training images per sample"),
    "n": Rule(int, 1, 10**9, "images: the first N test images"),
    "n_train": Rule(int, 1, 10**9, "images"),
    "n_test": Rule(int, 1, 10**9, "images"),
    "sample_size": Rule(int, 1, 10**9, "training images per clean retrain"),
    "null_models": Rule(int, 2, 100_000, "benign models in the null"),
    "rounds": Rule(int, 1, 10_000, "timed calls"),
    "patch": Rule(int, 1, 4096, "pixels per side"),
    "target": Rule(int, 0, 1 << 20, "class index"),
    "source": Rule(int, 0, 1 << 20, "class index"),
    "lr": Rule(float, 0.0, 1e6, "step size", lo_open=True),
    "eps": Rule(float, 0.0, 1e6, "input units"),
    "steps": Rule(int, 1, 100_000, "iterations"),
    "restarts": Rule(int, 1, 10_000, "random restarts"),
    "queries": Rule(int, 1, 10_000_000, "model queries"),
    "warmup": Rule(float, 0.0, 1.0, "share of training"),
    "fraction": Rule(float, 0.0, 1.0, "share of eligible images"),
    "alpha": Rule(float, 0.0, 1.0, "false-positive rate", lo_open=True),
    "max_seconds": Rule(float, 0.0, 1e6, "seconds", lo_open=True),
}


def check(name: str, value: Any, where: str | None = None) -> Any:
    """`value` if it obeys RULES[name]; ConfigError naming `where` (default --name) else."""
    rule = RULES[name]
    where = where or f"--{name.replace('_', '-')}"
    ok = not isinstance(value, bool)
    if ok and rule.kind is int:
        ok = isinstance(value, (int, np.integer))
    elif ok:
        ok = isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)
    if ok:
        ok = ((rule.lo is None or (value > rule.lo if rule.lo_open else value >= rule.lo))
              and (rule.hi is None or value <= rule.hi))
    if not ok:
        raise ConfigError(f"{where}: expected {rule.describe()} ({rule.unit}), found {value!r}")
    return float(value) if rule.kind is float else int(value)


def argtype(name: str):
    """RULES[name] as an argparse type: parses the text, then `check`s it."""
    rule = RULES[name]
    flag = f"--{name.replace('_', '-')}"

    def parse(text: str):
        try:
            value = rule.kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(
                f"expected {rule.describe()} ({rule.unit}), found {text!r}") from None
        try:
            return check(name, value, flag)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None

    parse.__name__ = name  # argparse names the type in its messages
    return parse


def describe(name: str) -> str:
    """'an integer in 0..2**31-1 (random seed)': for --help."""
    rule = RULES[name]
    return f"{rule.describe()} ({rule.unit})"


def check_at_most(value: int | None, available: int, where: str, what: str) -> int:
    """`value` (None: all `available`) if it is <= available; ConfigError naming both else."""
    if value is None:
        return available
    if value > available:
        raise ConfigError(f"{where}: expected at most the {available} {what}, found {value}")
    return value


def check_memory(need_bytes: float, what: str, hint: str) -> None:
    """Refuse work whose estimated peak memory (bytes) exceeds what this machine has free.

    Message: "<what> needs ~X GiB, this machine has Y; <hint>"."""
    free = available_memory()
    if need_bytes > MEMORY_SHARE * free:
        raise ConfigError(f"{what} needs ~{gib(need_bytes)}, this machine has {gib(free)} "
                          f"free; {hint}")
