"""Training-time poisoning: wrong labels, a trigger patch ("noisy" data), and both ("mixture").

Every poisoning is a pure function `(key, x, y, config) -> (x_poisoned, y_poisoned, mask)`:
x: float [n, 784] in `data.INPUT_RANGE`, y: int [n] in 0..9; it returns new JAX arrays (the
inputs are never written to) and mask: bool [n], True for the poisoned samples (the ground
truth detectors are scored against later). Configs are frozen dataclasses, validated when
built: a bad value raises `ConfigError` saying what was expected and what was found.

The kinds, as the study (UTD Team 4, Part 5) named its "abnormal data":

- "wrong-label": the label is changed, the image kept. Modes: `uniform` (a uniformly drawn
  OTHER label), `shift` (y -> (y + 1) mod 10), `target` (every poisoned sample -> one class).
- "trigger": the study's "noisy" data. A k x k patch of one value (default 1.0, the top of
  the input range) is stamped on the image, the label kept.
- "mixture": the study's "mixture" data, i.e. BadNets (Gu, Dolan-Gavitt, Garg, "BadNets:
  Identifying Vulnerabilities in the Machine Learning Model Supply Chain", 2017): the patch
  is stamped AND the label set to a target class (the study used 3).

Which samples are poisoned: the *eligible* samples are those of class `source` (every class
when source is None), less, for "mixture" and wrong-label mode "target", those already of the
target class (relabelling them would change nothing). Exactly round(fraction * eligible)
(Python's `round`) of them are drawn without replacement by ranking one uniform draw per
sample, so for one key the poisoned set of a smaller fraction is a subset of a larger one's:
a sweep over fractions with one key is a nested, controlled design.

The core, `poison_arrays`, is written in `jax.numpy` over a `PoisonArrays` record of plain
arrays, so a population of differently poisoned models can build each member's data inside
one jit with `vmap` (see `population.py`); `to_arrays` turns a config into that record.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.data import INPUT_RANGE, N_CLASSES, N_PIXELS
from mlshift_jax.errors import ConfigError
from mlshift_jax.study import E7_TARGET

SIDE = 28  # images are SIDE x SIDE = N_PIXELS
MODES = ("uniform", "shift", "target")
PER_CLASS = "per-class"

# label rules of `PoisonArrays.relabel`
KEEP, UNIFORM, SHIFT, TO_TARGET = 0, 1, 2, 3
_RELABEL = {"uniform": UNIFORM, "shift": SHIFT, "target": TO_TARGET}


# --- validation helpers -----------------------------------------------------------------------


def _check_fraction(where: str, fraction) -> None:
    if (isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.number))
            or not math.isfinite(fraction) or not 0.0 <= fraction <= 1.0):
        raise ConfigError(f"{where}: expected a fraction in [0, 1], found {fraction!r}")


def _check_class(where: str, name: str, value, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
            or not 0 <= value < N_CLASSES):
        allowed = "None or a class 0..9" if optional else "a class 0..9"
        raise ConfigError(f"{where}: expected {name} to be {allowed}, found {value!r}")


def _check_int(where: str, name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ConfigError(f"{where}: expected {name} an integer in {lo}..{hi}, found {value!r}")


# --- the trigger patch ------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    """A square trigger: `size` x `size` pixels set to `value`.

    position: None puts it in the bottom-right corner, `margin` pixels from both edges (the
    BadNets placement); (row, col) puts its top-left pixel there; "per-class" gives each
    class its own place along the border (`patch_pixels` lists them), so that the patch's
    place names the class, the study's "same label, same noise pixel" intuition.
    """

    size: int = 4
    value: float = INPUT_RANGE[1]
    position: tuple[int, int] | str | None = None
    margin: int = 1

    def __post_init__(self):
        _check_int("patch", "size", self.size, 1, SIDE)
        _check_int("patch", "margin", self.margin, 0, SIDE - 1)
        lo, hi = INPUT_RANGE
        v = self.value
        if (isinstance(v, bool) or not isinstance(v, (int, float, np.number))
                or not math.isfinite(v) or not lo <= v <= hi):
            raise ConfigError(f"patch: expected a value in [{lo}, {hi}] (the input range), "
                              f"found {v!r}")
        if isinstance(self.position, list):
            object.__setattr__(self, "position", tuple(self.position))
        for row, col in self.corners():
            if not (0 <= row and row + self.size <= SIDE and 0 <= col
                    and col + self.size <= SIDE):
                raise ConfigError(
                    f"patch: expected a {self.size}x{self.size} patch inside the {SIDE}x{SIDE} "
                    f"image, found its top-left pixel at (row {row}, col {col}) (position "
                    f"{self.position!r}, margin {self.margin})")

    def corners(self) -> list[tuple[int, int]]:
        """Top-left (row, col) of the patch: one entry, or one per class for "per-class"."""
        s, m = self.size, self.margin
        if self.position is None:
            return [(SIDE - m - s, SIDE - m - s)]
        if self.position == PER_CLASS:
            lo, hi, mid = m, SIDE - m - s, (SIDE - s) // 2
            cols = [int(round(c)) for c in np.linspace(lo, hi, 4)]
            return ([(lo, c) for c in cols] + [(hi, c) for c in cols]
                    + [(mid, lo), (mid, hi)])
        pos = self.position
        if (not isinstance(pos, tuple) or len(pos) != 2
                or not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool)
                           for p in pos)):
            raise ConfigError(f"patch: expected position None, (row, col) or {PER_CLASS!r}, "
                              f"found {pos!r}")
        return [(int(pos[0]), int(pos[1]))]

    @property
    def per_class(self) -> bool:
        """True when each class has its own patch position."""
        return self.position == PER_CLASS


def patch_pixels(patch: Patch) -> np.ndarray:
    """Where the patch goes, per class: bool [10, 784] (all rows alike unless per-class)."""
    out = np.zeros((N_CLASSES, SIDE, SIDE), bool)
    corners = patch.corners()
    for c in range(N_CLASSES):
        row, col = corners[c % len(corners)]
        out[c, row:row + patch.size, col:col + patch.size] = True
    return out.reshape(N_CLASSES, N_PIXELS)


def apply_trigger(x, patch: Patch, y=None) -> jax.Array:
    """Stamp `patch` on every image: x: [n, 784] or [784] -> the same shape (a new array).

    For TEST images, to measure the attack success rate. A "per-class" patch needs y: [n]
    (or a scalar for one image), the class whose patch each image gets.
    """
    x = jnp.asarray(x)
    pix = jnp.asarray(patch_pixels(patch))
    if patch.per_class:
        if y is None:
            raise ConfigError("apply_trigger: a per-class patch needs y (the class whose "
                              "patch each image gets); found y=None")
        where = pix[jnp.asarray(y)]
    else:
        where = pix[0] if x.ndim == 1 else pix[0][None, :]
    return jnp.where(where, jnp.asarray(patch.value, x.dtype), x)


# --- configs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clean:
    """No poisoning: the data as it is, mask all False."""

    kind: ClassVar[str] = "clean"


@dataclass(frozen=True)
class WrongLabel:
    """The study's "wrong label" data: `fraction` of the eligible samples get another label.

    mode: "uniform" (a uniformly drawn label other than the true one), "shift"
    ((y + 1) mod 10) or "target" (all to `target`, which then only poisons non-target samples).
    source: None (every class eligible) or the one class whose samples may be relabelled.
    """

    fraction: float = 0.1
    mode: str = "uniform"
    target: int = E7_TARGET
    source: int | None = None
    kind: ClassVar[str] = "wrong-label"

    def __post_init__(self):
        _check_fraction(self.kind, self.fraction)
        if self.mode not in MODES:
            raise ConfigError(f"{self.kind}: expected mode one of {', '.join(MODES)}, "
                              f"found {self.mode!r}")
        _check_class(self.kind, "target", self.target)
        _check_class(self.kind, "source", self.source, optional=True)
        if self.mode == "target" and self.source == self.target:
            raise ConfigError(f"{self.kind}: expected source != target in mode 'target' (it "
                              f"would relabel nothing), found both {self.target}")


@dataclass(frozen=True)
class Trigger:
    """The study's "noisy" data: `patch` stamped on `fraction` of the eligible images, labels
    kept. source: None (every class) or one class.

    The study never said which images its patch went on, only that "all/some of the data
    which has same label has same NOISE pixel". The default reads that literally: every
    class, fraction 1.0, a 4x4 patch at one place PER CLASS (`Patch(position="per-class")`),
    so the patch's place names the label. `sweeps.E4_VARIANTS` measures the other readings.
    """

    fraction: float = 1.0
    patch: Patch = field(default_factory=lambda: Patch(position=PER_CLASS))
    source: int | None = None
    kind: ClassVar[str] = "trigger"

    def __post_init__(self):
        _check_fraction(self.kind, self.fraction)
        if not isinstance(self.patch, Patch):
            raise ConfigError(f"{self.kind}: expected patch to be a poison.Patch, "
                              f"found {self.patch!r}")
        _check_class(self.kind, "source", self.source, optional=True)


@dataclass(frozen=True)
class Mixture:
    """The study's "mixture" data, BadNets (Gu et al. 2017): `patch` stamped on `fraction` of
    the eligible images and their label set to `target` (the study: 3). Eligible: images not
    already of class `target` (and of class `source` when given)."""

    fraction: float = 0.1
    patch: Patch = field(default_factory=Patch)
    target: int = E7_TARGET
    source: int | None = None
    kind: ClassVar[str] = "mixture"

    def __post_init__(self):
        _check_fraction(self.kind, self.fraction)
        if not isinstance(self.patch, Patch):
            raise ConfigError(f"{self.kind}: expected patch to be a poison.Patch, "
                              f"found {self.patch!r}")
        if self.patch.per_class:
            raise ConfigError(f"{self.kind}: expected one patch position (None or (row, col)), "
                              f"found {PER_CLASS!r}: a backdoor has one trigger")
        _check_class(self.kind, "target", self.target)
        _check_class(self.kind, "source", self.source, optional=True)
        if self.source == self.target:
            raise ConfigError(f"{self.kind}: expected source != target (it would poison "
                              f"nothing), found both {self.target}")


PoisonConfig = Clean | WrongLabel | Trigger | Mixture


# --- the core, in JAX -------------------------------------------------------------------------


class PoisonArrays(NamedTuple):
    """One poisoning as plain arrays, so that a population can `vmap` over many.

    count: int32 [] samples to poison; eligible: bool [10] classes that may be poisoned;
    relabel: int32 [] (KEEP, UNIFORM, SHIFT, TO_TARGET); target: int32 [];
    patch: bool [10, 784] pixels stamped, by true class (all False: no patch);
    value: float32 [] the stamped value.
    """

    count: jax.Array
    eligible: jax.Array
    relabel: jax.Array
    target: jax.Array
    patch: jax.Array
    value: jax.Array


def poison_arrays(key: jax.Array, x: jax.Array, y: jax.Array,
                  arrays: PoisonArrays) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Poison (x: [n, 784], y: int [n]) as `arrays` says: -> (x', y', mask: bool [n]).

    Pure and traceable (jit / vmap over key and arrays with x, y shared). The `count`
    eligible samples with the smallest uniform draw are poisoned, exactly `count` of them as
    long as count <= the number of eligible samples (`to_arrays` sees to it).
    """
    k_pick, k_label = jax.random.split(key)
    n = y.shape[0]
    draw = jax.random.uniform(k_pick, (n,))
    draw = jnp.where(arrays.eligible[y], draw, 2.0)  # the ineligible rank last
    rank = jnp.zeros((n,), jnp.int32).at[jnp.argsort(draw)].set(jnp.arange(n, dtype=jnp.int32))
    mask = rank < arrays.count
    other = (y + jax.random.randint(k_label, (n,), 1, N_CLASSES)) % N_CLASSES
    new = jnp.select([arrays.relabel == UNIFORM, arrays.relabel == SHIFT,
                      arrays.relabel == TO_TARGET],
                     [other, (y + 1) % N_CLASSES, jnp.broadcast_to(arrays.target, y.shape)], y)
    y_out = jnp.where(mask, new, y).astype(y.dtype)
    stamp = arrays.patch[y] & mask[:, None]
    x_out = jnp.where(stamp, arrays.value.astype(x.dtype), x)
    return x_out, y_out, mask


_poison_jit = jax.jit(poison_arrays)


def eligible_classes(config: PoisonConfig) -> np.ndarray:
    """bool [10]: the classes whose samples `config` may poison (none for Clean)."""
    out = np.zeros(N_CLASSES, bool)
    if isinstance(config, Clean):
        return out
    if config.source is None:
        out[:] = True
    else:
        out[config.source] = True
    if isinstance(config, Mixture) or (isinstance(config, WrongLabel) and config.mode == "target"):
        out[config.target] = False
    return out


def poison_count(config: PoisonConfig, y) -> int:
    """How many samples `config` poisons in labels y: [n]: round(fraction * eligible)."""
    if isinstance(config, Clean):
        return 0
    n_eligible = int(eligible_classes(config)[np.asarray(y)].sum())
    return int(round(config.fraction * n_eligible))


def trigger_of(config: PoisonConfig) -> Patch | None:
    """The patch a config stamps (Trigger, Mixture), else None."""
    return getattr(config, "patch", None)


def to_arrays(config: PoisonConfig, y) -> PoisonArrays:
    """`config` as a `PoisonArrays` record for training labels y: [n] (host-side numpy)."""
    _check_config(config)
    patch = trigger_of(config)
    pix = patch_pixels(patch) if patch is not None else np.zeros((N_CLASSES, N_PIXELS), bool)
    if isinstance(config, WrongLabel):
        relabel = _RELABEL[config.mode]
    elif isinstance(config, Mixture):
        relabel = TO_TARGET
    else:
        relabel = KEEP
    return PoisonArrays(
        count=np.int32(poison_count(config, y)),
        eligible=eligible_classes(config),
        relabel=np.int32(relabel),
        target=np.int32(getattr(config, "target", 0)),
        patch=pix,
        value=np.float32(patch.value if patch is not None else 0.0),
    )


def stack_arrays(records: list[PoisonArrays]) -> PoisonArrays:
    """Many records as one with a leading member axis [m, ...] (for `vmap`)."""
    return PoisonArrays(*(np.stack(parts) for parts in zip(*records, strict=True)))


def _check_config(config, expected: type | tuple[type, ...] | None = None) -> None:
    kinds = expected or tuple(p.config for p in POISONINGS.values())
    if not isinstance(config, kinds):
        names = [k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,))]
        raise ConfigError(f"poison: expected a config of type {' or '.join(names)}, "
                          f"found {type(config).__name__}")


def apply(key: jax.Array, x, y, config: PoisonConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Any poisoning by its config: (key, x: [n, 784], y: int [n]) -> (x', y', mask: bool [n]).

    Same key, same result. x and y may be numpy or JAX arrays; they are not modified.
    """
    arrays = to_arrays(config, y)
    return _poison_jit(key, jnp.asarray(x), jnp.asarray(y), arrays)


def clean(key, x, y, config: Clean = Clean()):
    """No poisoning: (x, y) as JAX arrays and an all-False mask."""
    _check_config(config, Clean)
    return apply(key, x, y, config)


def wrong_label(key, x, y, config: WrongLabel):
    """The study's "wrong label" data (see `WrongLabel`): x kept, labels changed under mask."""
    _check_config(config, WrongLabel)
    return apply(key, x, y, config)


def trigger(key, x, y, config: Trigger):
    """The study's "noisy" data (see `Trigger`): the patch stamped under mask, labels kept."""
    _check_config(config, Trigger)
    return apply(key, x, y, config)


def mixture(key, x, y, config: Mixture):
    """BadNets (Gu et al. 2017), the study's "mixture": patch stamped and label -> target."""
    _check_config(config, Mixture)
    return apply(key, x, y, config)


# --- the registry -----------------------------------------------------------------------------


class Poisoning(NamedTuple):
    """A poisoning kind: name; config: its dataclass; apply(key, x, y, config); about."""

    name: str
    config: type
    apply: Callable
    about: str


POISONINGS: dict[str, Poisoning] = {p.name: p for p in (
    Poisoning("clean", Clean, clean, "no poisoning (the control)"),
    Poisoning("wrong-label", WrongLabel, wrong_label,
              "labels changed: uniform other label, (y+1) mod 10, or one target class"),
    Poisoning("trigger", Trigger, trigger,
              "the study's 'noisy' data: a k x k patch stamped, labels kept"),
    Poisoning("mixture", Mixture, mixture,
              "BadNets / the study's 'mixture': patch stamped and label set to the target"),
)}


def get_poisoning(kind: str) -> Poisoning:
    """The registered poisoning `kind`; ConfigError naming the known ones otherwise."""
    try:
        return POISONINGS[kind]
    except KeyError:
        raise ConfigError(f"poison: expected kind one of {', '.join(POISONINGS)}, "
                          f"found {kind!r}") from None


def make_config(kind: str, **settings) -> PoisonConfig:
    """Build kind's config from keyword settings; ConfigError for unknown kinds or fields.

    `patch` may be a Patch or an int: the size, the other patch fields those of the kind's
    default patch (trigger: one place per class; mixture: the bottom-right corner).
    """
    cls = get_poisoning(kind).config
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"{kind}: expected settings among {sorted(known) or 'none'}, "
                          f"found {unknown}")
    size = settings.get("patch")
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        default = next(f for f in fields(cls) if f.name == "patch").default_factory()
        settings["patch"] = replace(default, size=int(size))
    try:
        return cls(**settings)
    except TypeError as e:
        raise ConfigError(f"{kind}: {e}") from None


def describe(config: PoisonConfig) -> str:
    """A short label for tables and figures, e.g. "mixture 10% 4x4 -> 3"."""
    if isinstance(config, Clean):
        return "clean"
    text = f"{config.kind} {config.fraction:.0%}"
    if isinstance(config, WrongLabel):
        text += f" {config.mode}" + (f" -> {config.target}" if config.mode == "target" else "")
    patch = trigger_of(config)
    if patch is not None:
        text += f" {patch.size}x{patch.size}" + (" per-class" if patch.per_class else "")
    if isinstance(config, Mixture):
        text += f" -> {config.target}"
    if config.source is not None:
        text += f" (class {config.source})"
    return text
