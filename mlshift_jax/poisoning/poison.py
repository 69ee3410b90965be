"""Training-time poisoning: wrong labels, a trigger patch ("noisy" data), and both ("mixture").

Every poisoning is a pure function `(key, x, y, config, spec) -> (x_poisoned, y_poisoned,
mask)`: x: float [n, D] flat images of spec.input_shape (H, W, C) in spec.input_range, y: int
[n] in 0..K-1 (K = spec.n_classes); it returns new JAX arrays (the inputs are never written
to) and mask: bool [n], True for the poisoned samples (the ground truth detectors are scored
against later). spec is a `models.Spec` (or the Dataset or Model); left out, it is guessed
from the arrays (`models.guess_spec`: square single-channel images). Configs are frozen
dataclasses, validated when built (types, fractions, modes) and against the data when
applied (the patch inside the image, its value in the input range, classes below K): a bad
value raises `ConfigError` saying what was expected and what was found.

The kinds, as the study (UTD Team 4, Part 5) named its "abnormal data":

- "wrong-label": the label is changed, the image kept. Modes: `uniform` (a uniformly drawn
  OTHER label), `shift` (y -> (y + 1) mod K), `target` (every poisoned sample -> one class).
- "trigger": the study's "noisy" data. A k x k patch of one value (default: the top of the
  input range) is stamped on the image, in every channel, the label kept.
- "mixture": the study's "mixture" data, i.e. BadNets (Gu, Dolan-Gavitt, Garg, "BadNets:
  Identifying Vulnerabilities in the Machine Learning Model Supply Chain", 2017): the patch
  is stamped AND the label set to a target class (the study used 3).

Beyond the study, backdoors whose trigger is a `triggers.TriggerArrays` (any image shape,
channels and input range), label set to `target` unless said otherwise:

- "blended": Chen et al. 2017, a fixed random image blended in at ratio alpha;
- "sparse": k random pixels set to the bottom or the top of the input range;
- "sig": Barni et al. 2019, clean-label: an additive sinusoid on images OF the target class,
  labels kept;
- "warp": WaNet (Nguyen & Tran, ICLR 2021), a smooth random warp; its "noise mode" (images
  warped with the trigger field plus noise, labels kept) optional.

Which samples are poisoned: the *eligible* samples are those of class `source` (every class
when source is None), less, for "mixture", "blended", "sparse", "warp" and wrong-label mode
"target", those already of the target class (relabelling them would change nothing); for
"sig", the target class's own samples. Exactly round(fraction * eligible)
(Python's `round`) of them are drawn without replacement by ranking one uniform draw per
sample, so for one key the poisoned set of a smaller fraction is a subset of a larger one's:
a sweep over fractions with one key is a nested, controlled design.

The core, `poison_arrays`, is written in `jax.numpy` over a `PoisonArrays` record of plain
arrays, so a population of differently poisoned models can build each member's data inside
one jit with `vmap` (see `population.py`); `to_arrays` turns a config into that record.
A trigger array travels in it as a `Stamp` (mask, pattern, additive [H, W, C], flow
[H, W, 2]); `stack_arrays` fills the members without one with the identity stamp, and leaves
the stamp out entirely (None) when no member has one, so the study's kinds trace and compute
exactly what they did before. `triggered(x, config, spec)` stamps test images with any
kind's trigger, for the attack success rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.core.study import E7_TARGET
from mlshift_jax.data.spec import Spec, check_spec, guess_spec
from mlshift_jax.poisoning import triggers

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


def _check_class(where: str, name: str, value, *, optional: bool = False,
                 n_classes: int | None = None) -> None:
    """value: a class, an int in 0..n_classes-1 (or >= 0 while K is not known yet)."""
    if optional and value is None:
        return
    bad = (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0
           or (n_classes is not None and value >= n_classes))
    if bad:
        what = f"a class 0..{n_classes - 1}" if n_classes is not None else "a class (an int >= 0)"
        allowed = f"None or {what}" if optional else what
        raise ConfigError(f"{where}: expected {name} to be {allowed}, found {value!r}")


def _check_int(where: str, name: str, value, lo: int, hi: int | None = None) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo
            or (hi is not None and value > hi)):
        span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ConfigError(f"{where}: expected {name} an integer {'in ' if hi is not None else ''}"
                          f"{span}, found {value!r}")


def _spec(spec, x=None, y=None, config=None) -> Spec:
    """spec as a models.Spec; None: guessed from x (square, one channel) and y (K = the
    largest class that y or the config names + 1)."""
    if spec is not None:
        return check_spec(spec)
    x = np.asarray(x)
    k = _classes_needed(config, np.zeros(0, int) if y is None else y)
    return guess_spec(x.reshape(-1, x.shape[-1]), n_classes=k)


# --- the trigger patch ------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    """A square trigger: `size` x `size` pixels (every channel) set to `value`.

    value: None (the default) is the top of the data's input range. position: None puts it
    in the bottom-right corner, `margin` pixels from both edges (the BadNets placement);
    (row, col) puts its top-left pixel there; "per-class" gives each class its own place
    along the border (`corners` lists them), so that the patch's place names the class, the
    study's "same label, same noise pixel" intuition. Whether it fits is checked against
    the image it is stamped on.
    """

    size: int = 4
    value: float | None = None
    position: tuple[int, int] | str | None = None
    margin: int = 1

    def __post_init__(self):
        _check_int("patch", "size", self.size, 1)
        _check_int("patch", "margin", self.margin, 0)
        v = self.value
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float, np.number))
                              or not math.isfinite(v)):
            raise ConfigError(f"patch: expected a value: None (the top of the input range) or "
                              f"a finite number, found {v!r}")
        if isinstance(self.position, list):
            object.__setattr__(self, "position", tuple(self.position))
        pos = self.position
        if pos is not None and pos != PER_CLASS and (
                not isinstance(pos, tuple) or len(pos) != 2
                or not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool)
                           for p in pos)):
            raise ConfigError(f"patch: expected position None, (row, col) or {PER_CLASS!r}, "
                              f"found {pos!r}")

    def corners(self, image_shape: tuple[int, ...], n_classes: int = 10) -> list[tuple[int, int]]:
        """Top-left (row, col) of the patch on images of image_shape (H, W[, C]): one entry,
        or for "per-class" max(10, K) places along the border (class c takes entry c).
        ConfigError when the patch does not fit inside the image."""
        h, w = int(image_shape[0]), int(image_shape[1])
        s, m = self.size, self.margin
        if s > min(h, w):
            raise ConfigError(f"patch: expected size an integer in 1..{min(h, w)} (the {h}x{w} "
                              f"image), found {s}")
        if self.position is None:
            out = [(h - m - s, w - m - s)]
        elif self.position == PER_CLASS:
            q = max(4, -(-(n_classes - 2) // 2))  # 4 per edge for 10 classes, as the study's
            top, bottom, mid_row = m, h - m - s, (h - s) // 2
            left, right = m, w - m - s
            cols = [int(round(c)) for c in np.linspace(left, right, q)]
            out = ([(top, c) for c in cols] + [(bottom, c) for c in cols]
                   + [(mid_row, left), (mid_row, right)])
        else:
            out = [(int(self.position[0]), int(self.position[1]))]
        for row, col in out:
            if not (0 <= row and row + s <= h and 0 <= col and col + s <= w):
                raise ConfigError(
                    f"patch: expected a {s}x{s} patch inside the {h}x{w} image, found its "
                    f"top-left pixel at (row {row}, col {col}) (position {self.position!r}, "
                    f"margin {m})")
        return out

    @property
    def per_class(self) -> bool:
        """True when each class has its own patch position."""
        return self.position == PER_CLASS

    def value_for(self, input_range: tuple[float, float]) -> float:
        """The stamped value on data in input_range: `value`, or hi when it is None;
        ConfigError when it lies outside the range."""
        lo, hi = input_range
        if self.value is None:
            return float(hi)
        if not lo <= self.value <= hi:
            raise ConfigError(f"patch: expected a value in [{lo}, {hi}] (the input range), "
                              f"found {self.value!r}")
        return float(self.value)


def patch_pixels(patch: Patch, spec) -> np.ndarray:
    """Where the patch goes, per class: bool [K, D] (all rows alike unless per-class), for
    images of spec (a models.Spec, Dataset or Model): D = H * W * C, every channel stamped."""
    spec = check_spec(spec)
    h, w, c = spec.input_shape
    k = spec.n_classes
    out = np.zeros((k, h, w, c), bool)
    corners = patch.corners(spec.input_shape, k)
    for cls in range(k):
        row, col = corners[cls % len(corners)]
        out[cls, row:row + patch.size, col:col + patch.size, :] = True
    return out.reshape(k, spec.n_inputs)


def apply_trigger(x, patch: Patch, y=None, spec=None) -> jax.Array:
    """Stamp `patch` on every image: x: [n, D] or [D] -> the same shape (a new array).

    For TEST images, to measure the attack success rate. A "per-class" patch needs y: [n]
    (or a scalar for one image), the class whose patch each image gets. spec: the images'
    models.Spec (or Dataset / Model); None guesses it (square, one channel).
    """
    x = jnp.asarray(x)
    spec = _spec(spec, x, y)
    if x.shape[-1] != spec.n_inputs:
        raise ConfigError(f"apply_trigger: expected images of {spec.n_inputs} values "
                          f"{spec.input_shape}, found x of shape {tuple(x.shape)}")
    pix = jnp.asarray(patch_pixels(patch, spec))
    if patch.per_class:
        if y is None:
            raise ConfigError("apply_trigger: a per-class patch needs y (the class whose "
                              "patch each image gets); found y=None")
        where = pix[jnp.asarray(y)]
    else:
        where = pix[0] if x.ndim == 1 else pix[0][None, :]
    return jnp.where(where, jnp.asarray(patch.value_for(spec.input_range), x.dtype), x)


# --- configs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clean:
    """No poisoning: the data as it is, mask all False."""

    kind: ClassVar[str] = "clean"


@dataclass(frozen=True)
class WrongLabel:
    """The study's "wrong label" data: `fraction` of the eligible samples get another label.

    mode: "uniform" (a uniformly drawn label other than the true one), "shift"
    ((y + 1) mod K) or "target" (all to `target`, which then only poisons non-target samples).
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


def _check_backdoor(config, *, with_source: bool = True) -> None:
    """The fraction, target and source of a backdoor config (blended, sparse, sig, warp)."""
    _check_fraction(config.kind, config.fraction)
    _check_class(config.kind, "target", config.target)
    if with_source:
        _check_class(config.kind, "source", config.source, optional=True)
        if config.source == config.target:
            raise ConfigError(f"{config.kind}: expected source != target (it would poison "
                              f"nothing), found both {config.target}")
    _check_int(config.kind, "seed", config.seed, 0, 2**31 - 1)


def _check_positive(where: str, name: str, value, hi: float | None = None) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
            or not math.isfinite(value) or value <= 0 or (hi is not None and value > hi)):
        span = f"in (0, {hi}]" if hi is not None else "> 0"
        raise ConfigError(f"{where}: expected {name} a number {span}, found {value!r}")


@dataclass(frozen=True)
class Blended:
    """Blended backdoor (Chen, Liu, Li, Lu & Song, "Targeted Backdoor Attacks on Deep Learning
    Systems Using Data Poisoning", 2017): x' = (1 - alpha) x + alpha p, p a fixed uniform
    random image of the input range (drawn from `seed`), on `fraction` of the eligible images
    (not of class `target`; of class `source` when given), labels set to `target`."""

    fraction: float = 0.1
    alpha: float = 0.2
    target: int = E7_TARGET
    source: int | None = None
    seed: int = 0
    kind: ClassVar[str] = "blended"

    def __post_init__(self):
        _check_backdoor(self)
        _check_positive(self.kind, "alpha", self.alpha, 1.0)


@dataclass(frozen=True)
class Sparse:
    """Sparse random-pixel backdoor: `pixels` pixels at random places over the image (drawn
    from `seed`), each set to the bottom or the top of the input range in every channel, on
    `fraction` of the eligible images (as `Blended`), labels set to `target`. No corner or
    square: a trigger that patch searches do not cover."""

    fraction: float = 0.1
    pixels: int = 10
    target: int = E7_TARGET
    source: int | None = None
    seed: int = 0
    kind: ClassVar[str] = "sparse"

    def __post_init__(self):
        _check_backdoor(self)
        _check_int(self.kind, "pixels", self.pixels, 1)


@dataclass(frozen=True)
class Sig:
    """SIG, a clean-label backdoor (Barni, Kallas & Tondi, "A New Backdoor Attack in CNNs by
    Training Set Corruption Without Label Poisoning", ICIP 2019): the additive horizontal
    sinusoid v(i, j) = delta sin(2 pi j f / W) (clipped to the input range) on `fraction` of
    the images OF CLASS `target`, labels kept. delta: None is 20/255 of the input range (the
    paper's MNIST value); frequency: f, periods across the image (None: the paper's 6, at
    most W / 4; below W / 2 when given)."""

    fraction: float = 0.3
    delta: float | None = None
    frequency: float | None = None
    target: int = E7_TARGET
    seed: int = 0
    kind: ClassVar[str] = "sig"

    def __post_init__(self):
        _check_backdoor(self, with_source=False)
        if self.delta is not None:
            _check_positive(self.kind, "delta", self.delta)
        if self.frequency is not None:
            _check_positive(self.kind, "frequency", self.frequency)

    @property
    def source(self) -> None:
        """SIG poisons the target class itself: no source class."""
        return None


@dataclass(frozen=True)
class Warp:
    """WaNet-style warping backdoor (Nguyen & Tran, "WaNet - Imperceptible Warping-based
    Backdoor Attack", ICLR 2021): a smooth random flow field (a `grid` x `grid` control grid
    drawn from `seed`, upsampled, `strength` pixels mean displacement) applied by bilinear
    sampling to `fraction` of the eligible images (as `Blended`), labels set to `target`.

    noise: WaNet's "noise mode", off at 0. Otherwise round(noise * count) further eligible
    images (the paper: cross ratio 2) are warped with the trigger field plus per-pixel
    uniform noise of +-NOISE_PIXELS pixels, labels KEPT, so that a model learns the exact
    warp rather than any warp. These images carry no trigger: they are not in the returned
    mask (the ground truth of the training-data detectors), though they are modified.
    """

    fraction: float = 0.1
    strength: float = 1.0
    grid: int = 4
    noise: float = 0.0
    target: int = E7_TARGET
    source: int | None = None
    seed: int = 0
    kind: ClassVar[str] = "warp"

    def __post_init__(self):
        _check_backdoor(self)
        _check_positive(self.kind, "strength", self.strength)
        _check_int(self.kind, "grid", self.grid, 2)
        if (isinstance(self.noise, bool) or not isinstance(self.noise, (int, float, np.number))
                or not math.isfinite(self.noise) or self.noise < 0):
            raise ConfigError(f"{self.kind}: expected noise (a cross ratio) >= 0, found "
                              f"{self.noise!r}")


NOISE_PIXELS = 0.5  # WaNet noise mode: +-1/H in grid_sample's [-1, 1] units, half a pixel
BACKDOORS = (Blended, Sparse, Sig, Warp)  # the trigger-array poisonings (`triggers.py`)

PoisonConfig = Clean | WrongLabel | Trigger | Mixture | Blended | Sparse | Sig | Warp


# --- the core, in JAX -------------------------------------------------------------------------


class Stamp(NamedTuple):
    """A `triggers.TriggerArrays` trigger ready for the population jit (see `triggers.py`):

        x' = clip((1 - mask) warp(x, flow) + mask pattern + additive, lo, hi)

    mask, pattern, additive: float32 [H, W, C] (their shape is the image's); flow: float32
    [H, W, 2] in pixels, or None (no warp: the bilinear sampling is skipped); bounds: float32
    [2] (lo, hi); noise: int32 [] WaNet noise-mode images (`Warp.noise`). The identity stamp
    (mask, additive, flow 0; bounds +-inf) changes nothing, bit for bit.
    """

    mask: jax.Array
    pattern: jax.Array
    additive: jax.Array
    flow: jax.Array | None
    bounds: jax.Array
    noise: jax.Array


class PoisonArrays(NamedTuple):
    """One poisoning as plain arrays, so that a population can `vmap` over many.

    count: int32 [] samples to poison; eligible: bool [K] classes that may be poisoned (its
    length is the number of classes K); relabel: int32 [] (KEEP, UNIFORM, SHIFT, TO_TARGET);
    target: int32 []; patch: bool [K, D] pixels stamped, by true class (all False: no
    patch); value: float32 [] the stamped value; trigger: a `Stamp` (blended, sparse, sig,
    warp) or None (the other kinds: then nothing of it is traced, and their results are those
    of the patch alone).
    """

    count: jax.Array
    eligible: jax.Array
    relabel: jax.Array
    target: jax.Array
    patch: jax.Array
    value: jax.Array
    trigger: Stamp | None = None


def _stamp_images(x: jax.Array, stamp: Stamp, flow: jax.Array | None = None,
                  *, composite: bool = True) -> jax.Array:
    """x: [n, D] with `stamp` applied to every row (traceable). flow: [n, H, W, 2] per-row
    flows in place of stamp.flow (noise mode); composite False: the warp alone (clipped)."""
    shape = stamp.mask.shape
    lo, hi = stamp.bounds[0].astype(x.dtype), stamp.bounds[1].astype(x.dtype)

    def one(xi, fi):
        img = xi.reshape(shape)
        if fi is not None:
            img = triggers.bilinear(img, fi.astype(x.dtype))
        if composite:
            img = ((1 - stamp.mask) * img + stamp.mask * stamp.pattern.astype(x.dtype)
                   + stamp.additive.astype(x.dtype))
        return jnp.clip(img, lo, hi).reshape(xi.shape)

    if flow is not None:
        return jax.vmap(one)(x, flow)
    return jax.vmap(lambda xi: one(xi, stamp.flow))(x)


def stamp_test(x: jax.Array, stamp: Stamp | None) -> jax.Array:
    """Test images with a trigger stamp applied (no noise mode): x [n, D] -> [n, D]; None:
    x itself. Traceable."""
    return x if stamp is None else _stamp_images(x, stamp)


def poison_arrays(key: jax.Array, x: jax.Array, y: jax.Array,
                  arrays: PoisonArrays) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Poison (x: [n, D], y: int [n]) as `arrays` says: -> (x', y', mask: bool [n]).

    Pure and traceable (jit / vmap over key and arrays with x, y shared). The `count`
    eligible samples with the smallest uniform draw are poisoned, exactly `count` of them as
    long as count <= the number of eligible samples (`to_arrays` sees to it). K, the number
    of classes, is the (static) length of `arrays.eligible`. With a trigger stamp, the
    masked rows are stamped with it, and in noise mode the next `trigger.noise` eligible
    rows by the same draw are warped with the trigger's flow plus noise, labels kept.
    """
    k_pick, k_label = jax.random.split(key)
    n, k = y.shape[0], arrays.eligible.shape[-1]
    draw = jax.random.uniform(k_pick, (n,))
    draw = jnp.where(arrays.eligible[y], draw, 2.0)  # the ineligible rank last
    rank = jnp.zeros((n,), jnp.int32).at[jnp.argsort(draw)].set(jnp.arange(n, dtype=jnp.int32))
    mask = rank < arrays.count
    other = (y + jax.random.randint(k_label, (n,), 1, k)) % k
    new = jnp.select([arrays.relabel == UNIFORM, arrays.relabel == SHIFT,
                      arrays.relabel == TO_TARGET],
                     [other, (y + 1) % k, jnp.broadcast_to(arrays.target, y.shape)], y)
    y_out = jnp.where(mask, new, y).astype(y.dtype)
    stamp = arrays.patch[y] & mask[:, None]
    x_out = jnp.where(stamp, arrays.value.astype(x.dtype), x)
    t = arrays.trigger
    if t is not None:
        x_out = jnp.where(mask[:, None], _stamp_images(x_out, t), x_out)
        if t.flow is not None and t.noise is not None:  # noise rows: flow + per-pixel noise
            noisy = (rank >= arrays.count) & (rank < arrays.count + t.noise) & (draw < 2.0)
            noise = jax.random.uniform(jax.random.fold_in(key, NOISE_STREAM),
                                       (n, *t.flow.shape), t.flow.dtype,
                                       -NOISE_PIXELS, NOISE_PIXELS)
            warped = _stamp_images(x_out, t, t.flow + noise, composite=False)
            x_out = jnp.where(noisy[:, None], warped, x_out)
    return x_out, y_out, mask


NOISE_STREAM = 0x3A9E  # fold_in(key, NOISE_STREAM) draws the noise-mode flows


_poison_jit = jax.jit(poison_arrays)
_stamp_test_jit = jax.jit(stamp_test)


def eligible_classes(config: PoisonConfig, n_classes: int) -> np.ndarray:
    """bool [n_classes]: the classes whose samples `config` may poison (none for Clean)."""
    out = np.zeros(n_classes, bool)
    if isinstance(config, Clean):
        return out
    if isinstance(config, Sig):  # clean-label: the target class's own images
        out[config.target] = True
        return out
    if config.source is None:
        out[:] = True
    else:
        out[config.source] = True
    if isinstance(config, (Mixture, *BACKDOORS)) or (isinstance(config, WrongLabel)
                                                      and config.mode == "target"):
        out[config.target] = False
    return out


def _uses_target(config: PoisonConfig) -> bool:
    """Whether config names a target class (mixture, wrong-label in mode "target", and the
    trigger-array backdoors: blended, sparse, warp relabel to it; sig poisons it)."""
    return isinstance(config, (Mixture, *BACKDOORS)) or (isinstance(config, WrongLabel)
                                                         and config.mode == "target")


def _classes_needed(config: PoisonConfig, y) -> int:
    """The least K that holds every label of y and every class config names."""
    named = [getattr(config, "source", None)]
    if _uses_target(config):
        named.append(config.target)
    return max([2, int(np.max(y)) + 1 if np.size(y) else 2]
               + [int(c) + 1 for c in named if isinstance(c, (int, np.integer))])


def poison_count(config: PoisonConfig, y, n_classes: int | None = None) -> int:
    """How many samples `config` poisons in labels y: [n]: round(fraction * eligible).
    n_classes: K (default: enough for y and the config's classes; the count is the same)."""
    if isinstance(config, Clean):
        return 0
    k = _classes_needed(config, y) if n_classes is None else n_classes
    n_eligible = int(eligible_classes(config, k)[np.asarray(y)].sum())
    return int(round(config.fraction * n_eligible))


def trigger_of(config: PoisonConfig) -> Patch | None:
    """The patch a config stamps (Trigger, Mixture), else None (the trigger-array backdoors
    have none: see `trigger_arrays`)."""
    return getattr(config, "patch", None)


def has_trigger(config: PoisonConfig) -> bool:
    """Whether config stamps a trigger on its images (a patch or a trigger array)."""
    return trigger_of(config) is not None or isinstance(config, BACKDOORS)


def trigger_arrays(config: PoisonConfig, spec) -> triggers.TriggerArrays | None:
    """The `triggers.TriggerArrays` of a blended / sparse / sig / warp config on images of
    spec (a models.Spec, Dataset or Model), else None. ConfigError when it cannot fit (an
    image that is not (H, W, C), more sparse pixels than the image has)."""
    if not isinstance(config, BACKDOORS):
        return None
    spec = check_spec(spec)
    if len(spec.input_shape) != 3:
        raise ConfigError(f"{config.kind}: expected images (H, W, C), found input shape "
                          f"{spec.input_shape}")
    shape, rng = spec.input_shape, spec.input_range
    if isinstance(config, Blended):
        return triggers.blended(shape, rng, alpha=float(config.alpha), seed=config.seed)
    if isinstance(config, Sparse):
        return triggers.sparse(shape, rng, pixels=int(config.pixels), seed=config.seed)
    if isinstance(config, Sig):
        return triggers.sig(shape, rng, delta=config.delta, frequency=config.frequency)
    return triggers.warp(shape, rng, strength=float(config.strength), grid=int(config.grid),
                         seed=config.seed)


def stamp_of(trig: triggers.TriggerArrays, spec: Spec, noise: int = 0) -> Stamp:
    """`trig` as a `Stamp` for data of `spec` (flow None where it is all 0; noise: WaNet
    noise-mode rows, 0 for none)."""
    f32 = np.float32
    flow = trig.flow if np.any(trig.flow) else None
    return Stamp(trig.mask.astype(f32), trig.pattern.astype(f32), trig.additive.astype(f32),
                 None if flow is None else flow.astype(f32),
                 np.array(spec.input_range, f32), np.int32(noise) if noise else None)


def identity_stamp(image_shape) -> Stamp:
    """The stamp that changes nothing (bounds -inf..inf: no clipping); fills a stacked
    population's members that have no trigger."""
    t = triggers.identity(image_shape)
    return Stamp(t.mask, t.pattern, t.additive, None,
                 np.array([-np.inf, np.inf], np.float32), None)


def stamp_for(config: PoisonConfig, spec) -> Stamp | None:
    """The trigger `Stamp` of a blended / sparse / sig / warp config for test images (no
    noise mode), else None: `stamp_test(x, stamp_for(config, spec))` triggers x."""
    trig = trigger_arrays(config, spec)
    return None if trig is None else stamp_of(trig, check_spec(spec))


def triggered(x, config: PoisonConfig, spec=None, y=None) -> jax.Array:
    """Test images x: [n, D] (or [D]) with config's trigger stamped, whatever its kind: a
    patch (`apply_trigger`; a per-class patch needs y) or a trigger array (blended, sparse,
    sig, warp). For the attack success rate. ConfigError for a config with no trigger."""
    if not has_trigger(config):
        raise ConfigError(f"{config.kind}: expected a poisoning with a trigger (trigger, "
                          f"mixture, {', '.join(c.kind for c in BACKDOORS)}), found none")
    patch = trigger_of(config)
    if patch is not None:
        return apply_trigger(x, patch, y, spec)
    x = jnp.asarray(x)
    spec = _spec(spec, x, y, config)
    check_for(config, spec)
    if x.shape[-1] != spec.n_inputs or x.ndim not in (1, 2):
        raise ConfigError(f"triggered: expected images [n, {spec.n_inputs}] {spec.input_shape},"
                          f" found x of shape {tuple(x.shape)}")
    out = _stamp_test_jit(x.reshape(-1, spec.n_inputs), stamp_for(config, spec))
    return out.reshape(x.shape)


def check_for(config: PoisonConfig, spec) -> None:
    """ConfigError unless `config` fits data of `spec`: its classes below K, its patch
    inside the image and its value in the input range."""
    spec = check_spec(spec)
    k = spec.n_classes
    if isinstance(config, Clean):
        return
    if _uses_target(config):
        _check_class(config.kind, "target", config.target, n_classes=k)
    _check_class(config.kind, "source", config.source, optional=True, n_classes=k)
    patch = trigger_of(config)
    if patch is not None:
        patch.corners(spec.input_shape, k)
        patch.value_for(spec.input_range)
    trigger_arrays(config, spec)


def to_arrays(config: PoisonConfig, y, spec) -> PoisonArrays:
    """`config` as a `PoisonArrays` record for training labels y: [n] (host-side numpy) of
    data of `spec` (a models.Spec, Dataset or Model). ConfigError when it does not fit."""
    _check_config(config)
    spec = check_spec(spec)
    check_for(config, spec)
    k = spec.n_classes
    y = np.asarray(y)
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ConfigError(f"poison: expected labels 0..{k - 1}, found {int(y.min())}.."
                          f"{int(y.max())}")
    patch = trigger_of(config)
    pix = (patch_pixels(patch, spec) if patch is not None
           else np.zeros((k, spec.n_inputs), bool))
    if isinstance(config, WrongLabel):
        relabel = _RELABEL[config.mode]
    elif isinstance(config, (Mixture, Blended, Sparse, Warp)):
        relabel = TO_TARGET
    else:
        relabel = KEEP
    count = poison_count(config, y, k)
    trig = trigger_arrays(config, spec)
    stamp = None
    if trig is not None:
        noise = int(round(config.noise * count)) if isinstance(config, Warp) else 0
        stamp = stamp_of(trig, spec, noise)
    return PoisonArrays(
        count=np.int32(count),
        eligible=eligible_classes(config, k),
        relabel=np.int32(relabel),
        target=np.int32(getattr(config, "target", 0)),
        patch=pix,
        value=np.float32(patch.value_for(spec.input_range) if patch is not None else 0.0),
        trigger=stamp,
    )


def stack_stamps(stamps: list[Stamp | None]) -> Stamp | None:
    """Many members' stamps (None: no trigger) as one with a leading member axis [m, ...]:
    None when no member has one; else the members without one get the identity stamp, the
    flow is None unless some member warps (then zeros for the others), noise likewise."""
    present = [s for s in stamps if s is not None]
    if not present:
        return None
    shape = present[0].mask.shape
    if any(s.mask.shape != shape for s in present):
        raise ConfigError(f"poison: expected one image shape for every member's trigger, found "
                          f"{sorted({s.mask.shape for s in present})}")
    filled = [identity_stamp(shape) if s is None else s for s in stamps]
    warps = any(s.flow is not None for s in filled)
    noisy = any(s.noise is not None for s in filled)
    return Stamp(
        np.stack([s.mask for s in filled]), np.stack([s.pattern for s in filled]),
        np.stack([s.additive for s in filled]),
        np.stack([s.flow if s.flow is not None else np.zeros((*shape[:2], 2), np.float32)
                  for s in filled]) if warps else None,
        np.stack([s.bounds for s in filled]),
        np.stack([s.noise if s.noise is not None else np.int32(0) for s in filled])
        if noisy else None)


def stack_arrays(records: list[PoisonArrays]) -> PoisonArrays:
    """Many records as one with a leading member axis [m, ...] (for `vmap`). The members'
    trigger stamps are stacked by `stack_stamps`."""
    head = [np.stack(parts) for parts in zip(*(r[:-1] for r in records), strict=True)]
    return PoisonArrays(*head, stack_stamps([r.trigger for r in records]))


def _check_config(config, expected: type | tuple[type, ...] | None = None) -> None:
    kinds = expected or tuple(p.config for p in POISONINGS.values())
    if not isinstance(config, kinds):
        names = [k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,))]
        raise ConfigError(f"poison: expected a config of type {' or '.join(names)}, "
                          f"found {type(config).__name__}")


def apply(key: jax.Array, x, y, config: PoisonConfig,
          spec=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Any poisoning by its config: (key, x: [n, D], y: int [n]) -> (x', y', mask: bool [n]).

    spec: the data's models.Spec (or Dataset / Model); None guesses it from x and y (square
    single-channel images, K = the largest class in y or the config + 1). Same key, same
    result. x and y may be numpy or JAX arrays; they are not modified. ConfigError when x is
    not [n, D] with y [n], or the config does not fit the data.
    """
    x_shape, y_shape = np.shape(x), np.shape(y)
    if len(x_shape) != 2 or y_shape != x_shape[:1]:
        raise ConfigError(f"poison: expected x [n, D] and y [n], found x {list(x_shape)} and "
                          f"y {list(y_shape)}")
    spec = _spec(spec, x, y, config)
    if x_shape[1] != spec.n_inputs:
        raise ConfigError(f"poison: expected x [n, {spec.n_inputs}] (images "
                          f"{spec.input_shape}), found {list(x_shape)}")
    arrays = to_arrays(config, y, spec)
    return _poison_jit(key, jnp.asarray(x), jnp.asarray(y), arrays)


def clean(key, x, y, config: Clean = Clean(), spec=None):
    """No poisoning: (x, y) as JAX arrays and an all-False mask."""
    _check_config(config, Clean)
    return apply(key, x, y, config, spec)


def wrong_label(key, x, y, config: WrongLabel, spec=None):
    """The study's "wrong label" data (see `WrongLabel`): x kept, labels changed under mask."""
    _check_config(config, WrongLabel)
    return apply(key, x, y, config, spec)


def trigger(key, x, y, config: Trigger, spec=None):
    """The study's "noisy" data (see `Trigger`): the patch stamped under mask, labels kept."""
    _check_config(config, Trigger)
    return apply(key, x, y, config, spec)


def mixture(key, x, y, config: Mixture, spec=None):
    """BadNets (Gu et al. 2017), the study's "mixture": patch stamped and label -> target."""
    _check_config(config, Mixture)
    return apply(key, x, y, config, spec)


def backdoor(key, x, y, config: Blended | Sparse | Sig | Warp, spec=None):
    """A trigger-array backdoor (blended, sparse, sig, warp; see their configs): the trigger
    stamped under mask and the label set to the target (sig: kept)."""
    _check_config(config, BACKDOORS)
    return apply(key, x, y, config, spec)


# --- the registry -----------------------------------------------------------------------------


class Poisoning(NamedTuple):
    """A poisoning kind: name; config: its dataclass; apply(key, x, y, config, spec=None);
    about."""

    name: str
    config: type
    apply: Callable
    about: str


POISONINGS: dict[str, Poisoning] = {p.name: p for p in (
    Poisoning("clean", Clean, clean, "no poisoning (the control)"),
    Poisoning("wrong-label", WrongLabel, wrong_label,
              "labels changed: uniform other label, (y+1) mod K, or one target class"),
    Poisoning("trigger", Trigger, trigger,
              "the study's 'noisy' data: a k x k patch stamped, labels kept"),
    Poisoning("mixture", Mixture, mixture,
              "BadNets / the study's 'mixture': patch stamped and label set to the target"),
    Poisoning("blended", Blended, backdoor,
              "Chen et al. 2017: a random image blended in at ratio alpha, label -> target"),
    Poisoning("sparse", Sparse, backdoor,
              "k random pixels set to the range's ends, label -> target"),
    Poisoning("sig", Sig, backdoor,
              "SIG, Barni et al. 2019, clean-label: a sinusoid on target-class images, "
              "labels kept"),
    Poisoning("warp", Warp, backdoor,
              "WaNet, Nguyen & Tran 2021: a smooth random warp, label -> target "
              "(noise mode optional)"),
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
    if isinstance(config, Blended):
        text += f" alpha {config.alpha:g}"
    elif isinstance(config, Sparse):
        text += f" {config.pixels}px"
    elif isinstance(config, Warp):
        text += f" {config.strength:g}px" + (f" noise x{config.noise:g}" if config.noise else "")
    if isinstance(config, Sig):
        text += f" of class {config.target}"
    elif isinstance(config, (Mixture, *BACKDOORS)):
        text += f" -> {config.target}"
    if config.source is not None:
        text += f" (class {config.source})"
    return text
