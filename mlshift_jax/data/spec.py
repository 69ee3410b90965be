"""What a dataset tells a model: `Spec` (input shape, classes, input range), its checks, and
the guess made for bare arrays that come without one.

The data layer owns it (a Dataset has a `spec`); models are built for a Spec
(`models.zoo.build(name, spec)`), poisonings place triggers by it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from mlshift_jax.core.errors import ConfigError


class Spec(NamedTuple):
    """What a dataset tells a model: input_shape (H, W, C) of one example, n_classes K and
    input_range (lo, hi), the valid input values. Inputs are flat, D = H * W * C."""

    input_shape: tuple[int, ...]
    n_classes: int
    input_range: tuple[float, float]

    @property
    def n_inputs(self) -> int:
        """D = H * W * C, the length of one flat example."""
        return math.prod(self.input_shape)


# the study's MNIST: 28x28 grey images, 10 classes, x/255*0.99+0.01 in [0.01, 1.0]
STUDY_SPEC = Spec((28, 28, 1), 10, (0.01, 1.0))


def check_spec(spec: Any) -> Spec:
    """A Spec with plain Python ints and floats (hashable, cache-friendly); ConfigError for
    a shape that is not 1-3 positive ints, fewer than 2 classes or lo >= hi.

    Accepts a Spec, a Model, a data.Dataset (anything with `spec`) or a 3-tuple."""
    if hasattr(spec, "spec") and not isinstance(spec, Spec):
        spec = spec.spec
    try:
        shape, k, (lo, hi) = spec
        shape = tuple(int(s) for s in shape)
        if len(shape) == 2:
            shape = (*shape, 1)
        k, lo, hi = int(k), float(lo), float(hi)
    except (TypeError, ValueError):
        raise ConfigError(f"spec: expected (input_shape (H, W, C), n_classes, (lo, hi)), "
                          f"found {spec!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"spec: expected an input shape (H, W, C) of positive ints, "
                          f"found {shape}")
    if k < 2:
        raise ConfigError(f"spec: expected at least 2 classes, found {k}")
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ConfigError(f"spec: expected an input range lo < hi, found ({lo}, {hi})")
    return Spec(shape, k, (lo, hi))


def square_shape(n_inputs: int, where: str = "input") -> tuple[int, int, int]:
    """(s, s, 1) for n_inputs = s * s: the shape of a flat single-channel square image;
    ConfigError when n_inputs is no square (then the shape must be given)."""
    s = math.isqrt(int(n_inputs))
    if s * s != n_inputs or s < 1:
        raise ConfigError(f"{where}: {n_inputs} values per example are no square image; "
                          "expected the image shape (H, W, C) to be given")
    return (s, s, 1)


def guess_spec(x, y=None, *, n_classes: int | None = None) -> Spec:
    """A Spec for flat data that comes without one: x: [n, D] as a square single-channel
    image; K = n_classes, else max(y) + 1 (at least 2); input range (0.01, 1.0), the study's,
    when every value lies in it, else [0, 1] when they lie there, else [min, max].

    For library calls given bare arrays; the harness passes the Dataset's spec instead."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ConfigError(f"x: expected flat examples [n, D], found shape {x.shape}")
    if n_classes is None:
        n_classes = max(2, int(np.max(y)) + 1) if y is not None and np.size(y) else 2
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 1.0)
    if lo >= np.float32(0.01) and hi <= 1.0:
        rng = STUDY_SPEC.input_range
    elif lo >= 0.0 and hi <= 1.0:
        rng = (0.0, 1.0)
    else:
        rng = (lo, hi if hi > lo else lo + 1.0)
    return check_spec((square_shape(x.shape[1]), n_classes, rng))
