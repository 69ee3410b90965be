"""Checks made at the public API boundary on the arrays a caller passes in.

`finite_inputs(where, x)` refuses NaN / inf in input images (one NaN pixel would otherwise
turn a whole FGSM image into NaN, count as class 0 in `metrics.evaluate`, and look like the
least suspicious input to the entropy detector). `inputs_in_range(where, x, lo, hi)` refuses
values outside a model's input range (an attack clips into the range, so inputs scaled
otherwise would move at eps 0), or clips and counts them with `clip=True`: the one check the
attacks (`attacks._common.check_inputs`), the input detectors and `metrics.evaluate` share.
Both run only on concrete arrays (never inside jit) and remember the last few arrays they
passed, so a timed loop that feeds the same array again pays for the check once.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.core.errors import ConfigError


@jax.jit
def count_nonfinite(x: jax.Array) -> jax.Array:
    """How many NaN / inf values x holds (int scalar): one program per shape, not three
    eager ones."""
    return x.size - jnp.count_nonzero(jnp.isfinite(x))


_PASSED: OrderedDict[int, Any] = OrderedDict()  # id -> the array itself (keeps the id valid)
_KEEP = 8


def finite_inputs(where: str, x: Any) -> None:
    """ConfigError naming `where` when concrete float array `x` holds NaN or inf."""
    if isinstance(x, jax.core.Tracer) or id(x) in _PASSED and _PASSED[id(x)] is x:
        return
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        x = np.asarray(x)
        dtype = x.dtype
    if not np.issubdtype(dtype, np.floating):
        return
    bad = int(count_nonfinite(x))
    if bad:
        raise ConfigError(f"{where}: expected finite input values, found {bad} NaN/inf "
                          f"value(s) in an array of shape {list(np.shape(x))}")
    _PASSED[id(x)] = x
    while len(_PASSED) > _KEEP:
        _PASSED.popitem(last=False)


RANGE_TOL = 1e-5  # share of (hi - lo) a value may pass the range by: float32 rounding of the
# study's scaling x / 255 * 0.99 + 0.01 lands within ~1e-7 of 0.01 and 1.0


@jax.jit
def _range_stats(x: jax.Array, lo: jax.Array, hi: jax.Array):
    """(values below lo, values above hi, min, max) of x in one pass."""
    return (jnp.count_nonzero(x < lo), jnp.count_nonzero(x > hi), jnp.min(x), jnp.max(x))


_IN_RANGE: OrderedDict[tuple, Any] = OrderedDict()  # (id, lo, hi) -> the array (keeps id valid)


def inputs_in_range(where: str, x: Any, lo: float, hi: float, *, clip: bool = False):
    """x when every value of concrete float array x lies in the model's input range [lo, hi]
    (within RANGE_TOL of the span). Otherwise one ConfigError naming `where`, the range and
    the values found, e.g. inputs scaled to [0, 0.5] for a model of [0.01, 1]: an attack would
    clip them into the range and move pixels at eps 0. With `clip=True` the values are clipped
    into [lo, hi] instead, and a one-line warning counts them. Returns x (clipped with clip).
    Tracers (inside jit) and empty arrays pass unchecked."""
    if isinstance(x, jax.core.Tracer):
        return x
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        x = np.asarray(x)
        dtype = x.dtype
    if not np.issubdtype(dtype, np.floating) or np.size(x) == 0:
        return x
    lo, hi = float(lo), float(hi)
    key = (id(x), lo, hi)
    if key in _IN_RANGE and _IN_RANGE[key] is x:
        return x
    tol = RANGE_TOL * (hi - lo)
    below, above, x_min, x_max = (v.item() for v in jax.device_get(
        _range_stats(x, jnp.asarray(lo - tol, dtype), jnp.asarray(hi + tol, dtype))))
    bad = int(below) + int(above)
    if bad and not clip:
        raise ConfigError(f"{where}: expected values in the model's input range [{lo:g}, "
                          f"{hi:g}], found values in [{x_min:.6g}, {x_max:.6g}] ({bad} of "
                          f"{np.size(x)} outside); rescale the inputs to the range, or pass "
                          "clip=True to clip them")
    if bad:
        import warnings

        warnings.warn(f"{where}: clipped {bad} of {np.size(x)} values from [{x_min:.6g}, "
                      f"{x_max:.6g}] into the model's input range [{lo:g}, {hi:g}]",
                      stacklevel=2)
        return jnp.clip(jnp.asarray(x), lo, hi)
    _IN_RANGE[key] = x
    while len(_IN_RANGE) > _KEEP:
        _IN_RANGE.popitem(last=False)
    return x
