"""The plumbing every attack module shares: the `Attack` record, the argument checks (Python
side, before jit), the per-example input gradient and the PGD-L∞ kernel.

Attack modules import from here, never a private name of each other; `attacks/__init__.py`
assembles the registry from the tuples of records each module exports.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.attacks.losses import example_loss
from mlshift_jax.core.checks import finite_inputs, inputs_in_range
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models.zoo import Model, Params

# PGD defaults: Madry et al.'s step size rule 2.5 * eps / steps (= eps / 4 at 10 steps).
PGD_STEPS = 10
PGD_STEP_FACTOR = 2.5

BOXES = ("none", "white", "black", "ensemble")


@dataclass(frozen=True)
class Attack:
    """A registered attack: the function and every fact the other layers need of it.

    fn(model, params, x, y, *, eps, key=None, lo=None, hi=None, ...) -> x_adv: [batch, D]
    label: its name in tables ("FGSM"); source: the paper (authors, title, venue year).
    category: the change category the categorizer names it by (`detection.categorize`:
    "none", "input-noise" or "adversarial-input").
    needs_key: fn raises ConfigError without `key`.
    targeted: fn takes `target=` (an int class or [batch] ints) and aims at it.
    uses_gradient: fn steps along the attacked model's own input gradient, so a zero
    gradient stalls it (`evasion.gradient_report` applies).
    box: what it reads of the model: "none" (nothing: the identity and random noise),
    "white" (its gradient), "black" (only its scores, or another model: transfer),
    "ensemble" (white- and black-box attacks in turn: AutoAttack). The obfuscated-gradient
    check flags a "black" attack that beats the untargeted "white" ones.
    static: the keyword options that are static under jit (ints, bools, strings: a new
    value compiles anew); `evasion.sweep` passes them as static arguments.
    surrogate: crafted on the undefended model (`defenses.base_of`); fn takes
    `source_params`, the undefended weights, which a defense that changes the weights
    (`Defense.kind == "training"`) must pass.
    linf_bounded: fn keeps ‖x_adv - x‖∞ <= eps (all but Gaussian noise).
    min_classes: the fewest classes a model may have (fn raises ConfigError below it: the
    DLR loss reads the 3rd largest logit, its targeted form the 4th).
    """

    name: str
    fn: Callable[..., jax.Array]
    label: str
    source: str
    category: str = "adversarial-input"
    needs_key: bool = False
    targeted: bool = False
    uses_gradient: bool = False
    box: str = "white"
    static: tuple[str, ...] = ()
    surrogate: bool = False
    linf_bounded: bool = True
    min_classes: int = 2

    def accepts(self, option: str) -> bool:
        """Whether fn takes the keyword `option`."""
        return option in inspect.signature(self.fn).parameters


# --- argument checks (Python side, before jit) ------------------------------------------------


def concrete(value: Any) -> np.ndarray | None:
    """`value` as a numpy array, or None while it is traced (inside jit, vmap or a sweep)."""
    if isinstance(value, jax.core.Tracer):
        return None
    return np.asarray(value)


def check_inputs(model: Model, x: Any, y: Any, *,
                 clip: bool = False) -> tuple[jax.Array, jax.Array]:
    """x: [batch, n_in] float, y: [batch] int. Returns both as jax arrays.

    The checks every attack shares: x finite and inside the model's input_range
    (`core.checks.inputs_in_range`: one ConfigError naming the range and the values found,
    or, with clip, clipped and counted in a warning). An attack's own lo / hi only narrow
    where it clips its output."""
    if not isinstance(model, Model):
        raise ConfigError(f"model: expected a models.Model, found {type(model).__name__}")
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ConfigError(f"x: expected a float array [batch, n_in], found {x.dtype}{x.shape}")
    finite_inputs("x", x)
    x = inputs_in_range("x", x, *model.input_range, clip=clip)
    if y.shape != x.shape[:1] or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ConfigError(
            f"y: expected int labels of shape ({x.shape[0]},), found {y.dtype}{y.shape}")
    return x, y


def check_eps(eps: Any, *, ndim: int = 0, name: str = "eps") -> None:
    """eps: a finite value >= 0 (a scalar, or 1-D for a sweep); checked when concrete."""
    value = concrete(eps)
    if value is None:
        return
    if value.ndim != ndim or value.dtype.kind not in "fiu":  # real numbers only
        shape = "a scalar" if ndim == 0 else "a 1-D array"
        raise ConfigError(f"{name}: expected {shape} of numbers, found {value.dtype}{value.shape}")
    if value.size and not (np.all(np.isfinite(value)) and np.all(value >= 0)):
        raise ConfigError(f"{name}: expected finite values >= 0, found {value.tolist()}")


def check_range(lo: Any, hi: Any) -> None:
    """lo < hi, both finite scalars; checked when concrete."""
    lo_v, hi_v = concrete(lo), concrete(hi)
    for name, v in (("lo", lo_v), ("hi", hi_v)):
        if v is not None and (v.ndim != 0 or v.dtype.kind not in "fiu" or not np.isfinite(v)):
            raise ConfigError(f"{name}: expected a finite scalar, found {v.tolist()!r}")
    if lo_v is not None and hi_v is not None and not lo_v < hi_v:
        raise ConfigError(f"input range: expected lo < hi, found lo={lo_v} >= hi={hi_v}")


def check_key(key: Any, attack: str) -> None:
    """ConfigError when an attack that draws randomness gets no key."""
    if key is None:
        raise ConfigError(f"{attack}: expected a jax.random key (key=...), found None")


def check_model_key(model: Model, key: Any, who: str) -> None:
    """ConfigError when `model` is stochastic (a randomized defense) and `key` is None."""
    if getattr(model, "stochastic", False) and key is None:
        raise ConfigError(f"{who}: model {model.name!r} is stochastic (draws fresh randomness "
                          "at every call); expected a jax.random key (key=...), found None")


def check_steps(steps: Any, step_size: Any) -> None:
    """steps: an int >= 1; step_size: None or a finite value >= 0."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ConfigError(f"steps: expected an int >= 1, found {steps!r}")
    if step_size is not None:
        check_eps(step_size, name="step_size")


def check_count(value: Any, name: str) -> int:
    """value: a Python int >= 1 (restarts, samples, queries)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: expected an int >= 1, found {value!r}")
    return value


def check_int(value: Any, name: str, low: int = 1, high: int | None = None) -> int:
    """value: an int in [low, high] (high None: unbounded)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name}: expected an int {span}, found {value!r}")
    return int(value)


def check_target(model: Model, params: Params, x: jax.Array, target: Any, attack: str) -> None:
    """target: an int class or [batch] ints in [0, n_out); checked when concrete."""
    if target is None:
        raise ConfigError(f"{attack}: expected a target class (target=...), found None")
    value = concrete(target)
    if value is None:
        return
    if value.shape not in ((), x.shape[:1]) or not np.issubdtype(value.dtype, np.integer):
        raise ConfigError(f"target: expected an int or ints of shape ({x.shape[0]},), "
                          f"found {value.dtype}{value.shape}")
    apply = (functools.partial(model.apply, key=jax.random.key(0)) if model.stochastic
             else model.apply)
    n_out = jax.eval_shape(apply, params, jax.ShapeDtypeStruct(x.shape[1:], x.dtype))
    n_out = n_out.shape[-1]
    if value.size and (value.min() < 0 or value.max() >= n_out):
        raise ConfigError(f"target: expected classes in [0, {n_out}), found "
                          f"[{value.min()}, {value.max()}]")


def bounds(model: Model, lo: Any, hi: Any) -> tuple[Any, Any]:
    """lo and hi, each None replaced by the model's input_range."""
    range_lo, range_hi = model.input_range
    return (range_lo if lo is None else lo), (range_hi if hi is None else hi)


def prepare(model, x, y, eps, lo, hi):
    """The checks every attack shares; eps, lo, hi cast to x's dtype (one trace per dtype);
    lo / hi None take the model's input_range. -> (x, y, eps, lo, hi)."""
    x, y = check_inputs(model, x, y)
    lo, hi = bounds(model, lo, hi)
    check_eps(eps)
    check_range(lo, hi)
    cast = functools.partial(jnp.asarray, dtype=x.dtype)
    return x, y, cast(eps), cast(lo), cast(hi)


# --- the shared kernels (traced: call inside jit) ----------------------------------------------


def batch_input_grad(model: Model, params: Params, x: jax.Array, y: jax.Array,
                     key: jax.Array | None = None, loss: str = "ce") -> jax.Array:
    """Per-example gradient of the attack loss `loss` (`losses.LOSSES`; "train": the model's
    training loss) w.r.t. the input. x: [batch, n_in] -> same.

    A stochastic model (`Model.stochastic`) gets one fresh key per example, split from `key`.
    """
    fn = example_loss(model, loss)
    if not model.stochastic:
        return jax.vmap(jax.grad(fn, argnums=1), in_axes=(None, 0, 0))(params, x, y)
    keys = jax.random.split(key, x.shape[0])

    def one(p, xi, yi, ki):
        return jax.grad(lambda v: fn(p, v, yi, ki))(xi)

    return jax.vmap(one, in_axes=(None, 0, 0, 0))(params, x, y, keys)


@functools.partial(jax.jit, static_argnames=("model", "descend", "steps", "random_start",
                                             "loss"))
def pgd_kernel(model, descend: bool, steps: int, random_start: bool, params, x, labels, eps,
               step_size, key, lo, hi, loss="ce"):
    """PGD-L∞ on checked arrays: `steps` sign steps of `step_size` (None: 2.5 * eps / steps)
    up the loss (down toward `labels` when `descend`), each projected onto the eps-ball
    around x and into [lo, hi]; from a uniform random start when `random_start`.
    x, labels: [batch, D], [batch] -> the last iterate [batch, D]."""
    if step_size is None:
        step_size = eps * (PGD_STEP_FACTOR / steps)
    step = -step_size if descend else step_size

    def project(xa):  # onto the eps-ball around x, then into [lo, hi]
        return jnp.clip(jnp.clip(xa, x - eps, x + eps), lo, hi)

    x0 = x
    if random_start:
        x0 = x + eps * jax.random.uniform(key, x.shape, x.dtype, minval=-1.0, maxval=1.0)
    # a stochastic model draws its randomness from a stream of its own, fresh at every step
    model_key = jax.random.fold_in(key, 1) if model.stochastic else None

    def body(i, xa):
        k = None if model_key is None else jax.random.fold_in(model_key, i)
        return project(xa + step * jnp.sign(batch_input_grad(model, params, xa, labels, k,
                                                             loss)))

    return jax.lax.fori_loop(0, steps, body, project(x0))
