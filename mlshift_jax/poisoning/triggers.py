"""Backdoor triggers as arrays: one representation for every trigger family, any image shape.

A trigger is a `TriggerArrays` record applied to an image x (in the input range [lo, hi]):

    warped = warp(x, flow)                       (WaNet; flow 0: identity)
    x'     = clip((1 - mask) * warped + mask * pattern + additive, lo, hi)

so that one jittable `stamp` covers every family, and a population of members with different
triggers is a `vmap` over stacked records. The families (constructors below, all for any
(H, W, C) and input range):

- `patch`: BadNets (Gu, Dolan-Gavitt & Garg, "BadNets", 2017): a square of side s at a
  position, set to a value (default: the top of the range);
- `checkerboard`: a square of alternating top/bottom values (a common BadNets variant);
- `blended`: Chen, Liu, Li, Lu & Song, "Targeted Backdoor Attacks on Deep Learning Systems
  Using Data Poisoning", 2017: the whole image blended with a fixed random pattern at ratio
  alpha (mask = alpha everywhere);
- `sparse`: k pixels chosen at random over the image, set to random values (a trigger no
  corner-patch search covers);
- `sig`: Barni, Kallas & Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption
  Without Label Poisoning", ICIP 2019: an additive horizontal sinusoid
  v(i, j) = delta * sin(2 pi j f / W) (clean-label: poison images of the target class only);
- `warp`: WaNet (Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR
  2021): a smooth random flow field (k x k control grid, upsampled, scaled by strength s
  pixels) applied by bilinear sampling.

Shapes: images are flat [D] (or [n, D]) as everywhere in the harness, D = H*W*C row-major;
mask, pattern, additive: [H, W, C]; flow: [H, W, 2] in pixels (row, column).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.core.errors import ConfigError

FAMILIES = ("patch", "checkerboard", "blended", "sparse", "sig", "warp")


class TriggerArrays(NamedTuple):
    """A trigger as arrays (see the module docstring). mask in [0, 1]; flow in pixels."""

    mask: np.ndarray
    pattern: np.ndarray
    additive: np.ndarray
    flow: np.ndarray


def _shape(image_shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"trigger: expected image_shape (H, W, C) of positive ints, found "
                          f"{image_shape!r}")
    return shape


def _range(input_range) -> tuple[float, float]:
    lo, hi = (float(v) for v in input_range)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ConfigError(f"trigger: expected input_range (lo, hi) with lo < hi, found "
                          f"{input_range!r}")
    return lo, hi


def identity(image_shape) -> TriggerArrays:
    """The trigger that changes nothing (mask, additive and flow all 0)."""
    h, w, c = _shape(image_shape)
    z = np.zeros((h, w, c), np.float32)
    return TriggerArrays(z, z.copy(), z.copy(), np.zeros((h, w, 2), np.float32))


def _square(image_shape, size: int, position: str | tuple[int, int], margin: int):
    h, w, _ = _shape(image_shape)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= min(
            h, w):
        raise ConfigError(f"trigger: expected a patch size in [1, {min(h, w)}], found {size!r}")
    corners = {"bottom-right": (h - margin - size, w - margin - size),
               "bottom-left": (h - margin - size, margin),
               "top-right": (margin, w - margin - size), "top-left": (margin, margin)}
    if isinstance(position, str):
        if position not in corners:
            raise ConfigError(f"trigger: expected a position in {sorted(corners)} or (row, "
                              f"col), found {position!r}")
        r, c = corners[position]
    else:
        r, c = (int(v) for v in position)
    r, c = max(0, min(r, h - size)), max(0, min(c, w - size))
    return r, c


def patch(image_shape, input_range, *, size: int = 4, position="bottom-right",
          value: float | None = None, margin: int = 1) -> TriggerArrays:
    """BadNets: a size x size square at a corner (or (row, col)), set to `value` (default
    the top of the input range) in every channel."""
    lo, hi = _range(input_range)
    r, c = _square(image_shape, size, position, margin)
    t = identity(image_shape)
    t.mask[r:r + size, c:c + size] = 1.0
    t.pattern[r:r + size, c:c + size] = hi if value is None else float(value)
    return t


def checkerboard(image_shape, input_range, *, size: int = 4, position="bottom-right",
                 margin: int = 1) -> TriggerArrays:
    """A size x size square of alternating top and bottom values of the range."""
    lo, hi = _range(input_range)
    r, c = _square(image_shape, size, position, margin)
    t = identity(image_shape)
    ii, jj = np.indices((size, size))
    t.mask[r:r + size, c:c + size] = 1.0
    t.pattern[r:r + size, c:c + size] = np.where((ii + jj) % 2 == 0, hi, lo)[..., None]
    return t


def blended(image_shape, input_range, *, alpha: float = 0.2, seed: int = 0) -> TriggerArrays:
    """Chen et al. 2017: x' = (1 - alpha) x + alpha p, p a fixed uniform random image."""
    lo, hi = _range(input_range)
    if not 0.0 < float(alpha) <= 1.0:
        raise ConfigError(f"trigger: expected blend alpha in (0, 1], found {alpha!r}")
    t = identity(image_shape)
    rng = np.random.default_rng(seed)
    t.mask[...] = float(alpha)
    t.pattern[...] = rng.uniform(lo, hi, t.pattern.shape)
    return t


def sparse(image_shape, input_range, *, pixels: int = 10, seed: int = 0) -> TriggerArrays:
    """`pixels` pixels at random positions over the image, each set to a random value of the
    range (all channels of a pixel alike)."""
    h, w, _ = _shape(image_shape)
    lo, hi = _range(input_range)
    if isinstance(pixels, bool) or not isinstance(pixels, (int, np.integer)) or not (
            1 <= pixels <= h * w):
        raise ConfigError(f"trigger: expected a pixel count in [1, {h * w}], found {pixels!r}")
    rng = np.random.default_rng(seed)
    flat = rng.choice(h * w, size=int(pixels), replace=False)
    rows, cols = np.unravel_index(flat, (h, w))
    t = identity(image_shape)
    t.mask[rows, cols] = 1.0
    t.pattern[rows, cols] = rng.choice([lo, hi], size=(len(flat), 1))
    return t


def sig(image_shape, input_range, *, delta: float | None = None,
        frequency: float | None = None) -> TriggerArrays:
    """Barni et al. 2019: additive v(i, j) = delta * sin(2 pi j f / W), delta by default 20/255
    of the range (the paper's value for MNIST-like 8-bit images); f by default 6 periods (the
    paper's), at most W / 4 on narrow images. ConfigError for f >= W / 2, where the sampled
    sinusoid aliases (at W / 2 it is zero at every pixel)."""
    h, w, _ = _shape(image_shape)
    lo, hi = _range(input_range)
    delta = (hi - lo) * 20 / 255 if delta is None else float(delta)
    if not np.isfinite(delta) or delta <= 0:
        raise ConfigError(f"trigger: expected a SIG amplitude delta > 0, found {delta!r}")
    frequency = min(6.0, w / 4) if frequency is None else float(frequency)
    if not np.isfinite(frequency) or not 0 < frequency < w / 2:
        raise ConfigError(f"trigger: expected a SIG frequency in (0, {w / 2:g}) periods (below "
                          f"half the image width {w}), found {frequency!r}")
    t = identity(image_shape)
    t.additive[...] = (delta * np.sin(2 * np.pi * np.arange(w) * frequency / w))[None, :, None]
    return t


def warp(image_shape, input_range, *, strength: float = 0.5, grid: int = 4,
         seed: int = 0) -> TriggerArrays:
    """WaNet (Nguyen & Tran 2021): a random grid x grid field of offsets in [-1, 1],
    normalized by its mean absolute value, upsampled bilinearly to H x W and scaled to
    `strength` pixels: a smooth, nearly invisible warp."""
    h, w, _ = _shape(image_shape)
    _range(input_range)
    if not np.isfinite(strength) or strength <= 0 or grid < 2:
        raise ConfigError(f"trigger: expected warp strength > 0 and grid >= 2, found "
                          f"{strength!r}, {grid!r}")
    rng = np.random.default_rng(seed)
    ctrl = rng.uniform(-1, 1, (grid, grid, 2))
    ctrl /= np.mean(np.abs(ctrl))
    flow = np.asarray(jax.image.resize(jnp.asarray(ctrl), (h, w, 2), "linear"))
    t = identity(image_shape)
    return t._replace(flow=(strength * flow).astype(np.float32))


def make(family: str, image_shape, input_range, **kw) -> TriggerArrays:
    """The trigger of `family` (one of FAMILIES) with its keyword settings."""
    makers = {"patch": patch, "checkerboard": checkerboard, "blended": blended,
              "sparse": sparse, "sig": sig, "warp": warp}
    if family not in makers:
        raise ConfigError(f"trigger: expected a family in {list(FAMILIES)}, found {family!r}")
    try:
        return makers[family](image_shape, input_range, **kw)
    except TypeError as e:
        raise ConfigError(f"trigger {family}: {e}") from None


def bilinear(img: jax.Array, flow: jax.Array) -> jax.Array:
    """img sampled at (i + flow_r, j + flow_c), bilinear, edges clamped (traceable).
    img: [H, W, C]; flow: [H, W, 2] in pixels (row, column) -> [H, W, C]. A zero flow
    returns img exactly."""
    h, w, _ = img.shape
    ii, jj = jnp.meshgrid(jnp.arange(h, dtype=img.dtype), jnp.arange(w, dtype=img.dtype),
                          indexing="ij")
    r = jnp.clip(ii + flow[..., 0], 0, h - 1)
    c = jnp.clip(jj + flow[..., 1], 0, w - 1)
    r0, c0 = jnp.floor(r).astype(jnp.int32), jnp.floor(c).astype(jnp.int32)
    r1, c1 = jnp.minimum(r0 + 1, h - 1), jnp.minimum(c0 + 1, w - 1)
    fr, fc = (r - r0)[..., None], (c - c0)[..., None]
    top = img[r0, c0] * (1 - fc) + img[r0, c1] * fc
    bottom = img[r1, c0] * (1 - fc) + img[r1, c1] * fc
    return top * (1 - fr) + bottom * fr


def stamp_one(x: jax.Array, trig: TriggerArrays, image_shape, lo, hi) -> jax.Array:
    """Apply `trig` to ONE flat image x: [D] -> [D] (traceable; vmap it)."""
    img = x.reshape(image_shape)
    img = bilinear(img, jnp.asarray(trig.flow, x.dtype))
    mask = jnp.asarray(trig.mask, x.dtype)
    out = (1 - mask) * img + mask * jnp.asarray(trig.pattern, x.dtype) + jnp.asarray(
        trig.additive, x.dtype)
    return jnp.clip(out, lo, hi).reshape(x.shape)


def stamp(x, trig: TriggerArrays, image_shape, input_range) -> jax.Array:
    """Apply `trig` to every image. x: [n, D] (or [D]) -> the same shape."""
    shape = _shape(image_shape)
    lo, hi = _range(input_range)
    x = jnp.asarray(x)
    d = int(np.prod(shape))
    if x.shape[-1] != d or x.ndim not in (1, 2):
        raise ConfigError(f"trigger: expected images [n, {d}] or [{d}] for image_shape {shape}, "
                          f"found {tuple(x.shape)}")
    one = functools.partial(stamp_one, trig=trig, image_shape=shape, lo=lo, hi=hi)
    return one(x) if x.ndim == 1 else jax.vmap(one)(x)
