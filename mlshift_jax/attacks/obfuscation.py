"""Obfuscated-gradient flags: an evaluation that says when its own robustness number is
not to be trusted.

After Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of Security"
(ICML 2018, section 3.1's checklist) and AutoAttack's flags (Croce & Hein, ICML 2020,
`flags_doc.md`). `probe` measures what one defended model shows; `flags` turns a probe and
a table of robust accuracies into one line per warning:

- `black-box`: a black-box (gradient-free) or transfer attack (`Attack.box == "black"`)
  beats the untargeted white-box ones (`box == "white"`: FGSM, PGD, ...), or
  AutoAttack's Square (5,000 queries) fools images its white-box APGD-CE and APGD-T left
  standing (AutoAttack's own flag);
- `not-monotone`: accuracy grows with eps (per attack) or with PGD's steps;
- `randomized`: predictions change across calls on the same input;
- `zero-gradient`: the input gradient is exactly 0, or vanishing (< 1e-10 in L∞), on most
  examples;
- `unbounded`: at eps = half the input range (every image can become the same gray image)
  PGD leaves accuracy above chance.

Tolerance: a difference counts when it exceeds max(0.02, 1/sqrt(n)) (about two standard
errors of an accuracy measured on n images).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.attacks import ATTACKS, evasion
from mlshift_jax.attacks._common import batch_input_grad
from mlshift_jax.models.metrics import predict_keyed
from mlshift_jax.models.zoo import Model, Params

FLAG_NAMES = ("black-box", "not-monotone", "randomized", "zero-gradient", "unbounded")
VANISHING = 1e-10


def tolerance(n: int) -> float:
    """The smallest accuracy difference that counts on n images: max(0.02, 1/sqrt(n))."""
    return max(0.02, 1.0 / np.sqrt(max(n, 1)))


@functools.partial(jax.jit, static_argnames="model")
def _gradient_stats(model: Model, params: Params, x, y, key):
    g = batch_input_grad(model, params, x, y, key if model.stochastic else None)
    per_example = jnp.max(jnp.abs(g), axis=1)
    return {"zero_grad_frac": jnp.mean(g == 0),
            "vanishing_frac": jnp.mean(per_example < VANISHING)}


@functools.partial(jax.jit, static_argnames="model")
def _varies(model: Model, params: Params, x, key):
    k1, k2 = jax.random.split(key)
    a = jnp.argmax(predict_keyed(model, params, x, k1), -1)
    b = jnp.argmax(predict_keyed(model, params, x, k2), -1)
    return jnp.mean(a != b)


def _accuracy(model, params, x, y, key) -> float:
    return float(jnp.mean(jnp.argmax(predict_keyed(model, params, x, key), -1) == y))


def probe(model: Model, params: Params, x, y, *, key: jax.Array, eps: float = 0.3,
          steps: int = 10) -> dict[str, Any]:
    """What the flags need of one model on x: [n, D], y: [n] (a few hundred images do).

    Returns zero_grad_frac (share of input-gradient entries exactly 0), vanishing_frac
    (share of examples whose gradient is < 1e-10 in L∞), varies_frac (share of predictions
    that differ between two calls), pgd_steps ({steps: acc, 4 * steps: acc} at eps),
    unbounded_eps (half the input range) and unbounded_accuracy (PGD there), chance (the
    largest class share of y), n.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    lo, hi = (float(v) for v in model.input_range)
    keys = jax.random.split(key, 6)
    stats = {k: float(v) for k, v in _gradient_stats(model, params, x, y, keys[0]).items()}
    stats["varies_frac"] = float(_varies(model, params, x, keys[1])) if model.stochastic \
        else 0.0
    kw = {"key": keys[2], "lo": lo, "hi": hi}
    stats["pgd_steps"] = {}
    for s in (steps, 4 * steps):
        x_adv = evasion.pgd(model, params, x, y, eps=eps, steps=s, **kw)
        stats["pgd_steps"][s] = _accuracy(model, params, x_adv, y, keys[3])
    big = (hi - lo) / 2
    x_adv = evasion.pgd(model, params, x, y, eps=big, steps=steps, **kw)
    stats["unbounded_eps"] = big
    stats["unbounded_accuracy"] = _accuracy(model, params, x_adv, y, keys[4])
    counts = np.bincount(np.asarray(y))
    stats["chance"] = float(counts.max() / counts.sum())
    stats["n"] = int(x.shape[0])
    stats["steps_eps"] = float(eps)
    return stats


def flags(accuracy: dict[tuple[str, float], float], probed: dict[str, Any] | None = None,
          *, n: int, autoattack: dict[float, dict[str, int]] | None = None) -> list[str]:
    """The warnings raised by a table of robust accuracies and a `probe`.

    accuracy: {(attack, eps): robust accuracy} for any of fgsm, pgd, the adaptive attacks,
    square, transfer (missing entries skip their checks); probed: `probe(...)` or None;
    n: test images behind each accuracy; autoattack: {eps: `autoattack.Report.counts()`}
    (images each of its attacks fooled), or None. Returns one line per warning, each
    starting with its flag name (`FLAG_NAMES`); [] when nothing is suspicious.
    """
    tol = tolerance(n)
    out = []
    for eps, counts in sorted((autoattack or {}).items()):
        k = int(counts.get("square", 0))
        if k > tol * n:
            out.append(f"black-box: AutoAttack's Square fooled {k} of {n} images that APGD-CE "
                       f"and APGD-T left standing at eps {eps:g}")
    eps_values = sorted({e for _, e in accuracy})
    for eps in eps_values:
        here = [a for a in ATTACKS.values() if (a.name, eps) in accuracy]
        white = [a for a in here if a.box == "white" and not a.targeted]
        best = min((accuracy[(a.name, eps)] for a in white), default=None)
        labels = "/".join(a.label for a in white)
        for b in (a.name for a in here if a.box == "black"):
            if white and accuracy[(b, eps)] < best - tol:
                out.append(f"black-box: {b} beats white-box {labels} at eps {eps:g} "
                           f"({accuracy[(b, eps)]:.3f} < {best:.3f})")
    for attack in dict.fromkeys(a for a, _ in accuracy):
        series = [(e, accuracy[(attack, e)]) for e in eps_values if (attack, e) in accuracy]
        for (e0, a0), (e1, a1) in zip(series, series[1:], strict=False):
            if a1 > a0 + tol:
                out.append(f"not-monotone: {attack} accuracy grows with eps "
                           f"({a0:.3f} at {e0:g} -> {a1:.3f} at {e1:g})")
    if probed:
        (s0, a0), (s1, a1) = sorted(probed["pgd_steps"].items(), key=lambda kv: int(kv[0]))
        if a1 > a0 + tol:
            out.append(f"not-monotone: PGD accuracy grows with steps at eps "
                       f"{probed['steps_eps']:g} ({a0:.3f} at {s0} -> {a1:.3f} at {s1})")
        if probed["varies_frac"] > 0:
            out.append(f"randomized: {probed['varies_frac']:.1%} of predictions change "
                       "between two calls (evaluate with EOT)")
        if probed["zero_grad_frac"] > 0.5 or probed["vanishing_frac"] > 0.5:
            out.append(f"zero-gradient: {probed['zero_grad_frac']:.0%} of input-gradient "
                       f"entries are 0, {probed['vanishing_frac']:.0%} of examples have "
                       f"|grad| < {VANISHING:g} (use BPDA or a gradient-free attack)")
        if probed["unbounded_accuracy"] > probed["chance"] + tol:
            out.append(f"unbounded: PGD at eps {probed['unbounded_eps']:g} (half the input "
                       f"range) leaves accuracy {probed['unbounded_accuracy']:.3f} > chance "
                       f"{probed['chance']:.3f}")
    return out
