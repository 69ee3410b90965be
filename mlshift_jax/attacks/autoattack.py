"""AutoAttack in L∞: the field's reference ensemble, each attack on the images still standing.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020. `version="standard"`: APGD-CE (100 iterations), APGD-T
(targeted DLR, 9 targets, 100 iterations each), FAB-T (`fab`: 9 targets, 100 steps each)
and Square Attack (5,000 queries, p_init 0.8), in that order, each run only on the images
that every earlier attack left correctly classified. FAB-T takes APGD's `iterations` and
`targets`, as the reference's FAB shares its n_iter and n_target_classes.
`version="rand"` (for stochastic defenses): APGD-CE and APGD-DLR with EOT over 20 draws of
the model's randomness per step.

    autoattack(model, params, x, y, *, eps, key, lo=None, hi=None, version="standard")
        -> x_adv: [batch, D]
    report(model, params, x, y, *, eps, key, ...) -> Report(x_adv, broken_by, attacks)

`report` says per image which attack broke it. Called with a traced eps (inside jit or
`evasion.sweep`) every attack runs on the whole batch (the same images end up fooled, only
slower); called directly, images are picked on the host and padded to a few sizes
(`apgd.bucket_size`), so each attack costs in proportion to the images left.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.attacks import adaptive, apgd, fab
from mlshift_jax.attacks._common import Attack, check_count, check_int, concrete, prepare
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models.zoo import Model, Params

SQUARE_QUERIES, SQUARE_P_INIT = 5000, 0.8  # the standard Square: 5,000 queries, p_init 0.8
VERSIONS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"), "rand": ("apgd-ce", "apgd-dlr")}
CLEAN, ROBUST = -1, -2  # broken_by codes: misclassified before any attack; never broken


class Report(NamedTuple):
    """x_adv: [b, D]; broken_by: [b] int, the index in `attacks` of the attack that first
    fooled each image, CLEAN (-1) where the clean image is already misclassified, ROBUST
    (-2) where no attack fooled it; attacks: the names run, in order."""

    x_adv: jax.Array
    broken_by: np.ndarray
    attacks: tuple[str, ...]

    @property
    def robust(self) -> np.ndarray:
        """[b] bool: the images no attack fooled (and correctly classified when clean)."""
        return np.asarray(self.broken_by) == ROBUST

    def counts(self) -> dict[str, int]:
        """Images fooled by each attack (and 'clean' misclassified, 'robust' left)."""
        b = np.asarray(self.broken_by)
        out = {"clean": int(np.sum(b == CLEAN))}
        out.update({name: int(np.sum(b == i)) for i, name in enumerate(self.attacks)})
        out["robust"] = int(np.sum(b == ROBUST))
        return out


def _check(model, key, version, iterations, targets, queries, eot):
    if not isinstance(version, str) or version not in VERSIONS:
        raise ConfigError(f"version: expected one of {sorted(VERSIONS)}, found {version!r}")
    apgd.check_common("autoattack", model, key, iterations, eot)
    check_count(queries, "queries")
    if version == "standard":
        if model.n_classes < 4:
            raise ConfigError("autoattack: expected a model with at least 4 classes "
                              f"(APGD-T's targeted DLR), found {model.n_classes}")
        check_int(targets, "targets", 1, model.n_classes - 1)
    elif model.n_classes < 3:
        raise ConfigError("autoattack: expected a model with at least 3 classes (DLR), "
                          f"found {model.n_classes}")


def _wrong(model, params, x, y, key):
    z = apgd.clean_logits(model, params, x, key)
    return jnp.argmax(z, -1) != y


def report(model: Model, params: Params, x, y, *, eps, key=None, lo=None, hi=None,
           version: str = "standard", iterations: int = apgd.ITERATIONS,
           targets: int = apgd.TARGETS, queries: int = SQUARE_QUERIES,
           eot: int | None = None, fab_runs: dict | None = None) -> Report:
    """AutoAttack with a per-image record of which attack broke each image.

    x: [b, D], y: [b]; eps: the L∞ budget; key: required (random starts, Square, a
    stochastic model); version "standard" (APGD-CE, APGD-T, FAB-T, Square) or "rand"
    (APGD-CE, APGD-DLR with EOT); iterations: APGD's and FAB-T's steps; targets: APGD-T's
    and FAB-T's target classes;
    queries: Square's budget; eot: gradient draws per step (default 20 for "rand", else 1).
    fab_runs: a dict shared by calls on the same model, params, x, y and key at several eps:
    FAB-T's runs read no eps (`fab.runs`), so each image's are computed once and kept there
    (image index -> its runs), the same result as computing them per eps.
    ConfigError for a bad argument (also a model with fewer classes than DLR needs).
    """
    eot = (apgd.EOT_ITER if version == "rand" else 1) if eot is None else eot
    _check(model, key, version, iterations, targets, queries, eot)
    x, y, eps, lo, hi = prepare(model, x, y, eps, lo, hi)
    names = VERSIONS[version]
    on_host = concrete(eps) is not None and concrete(x) is not None
    wrong = _wrong(model, params, x, y, jax.random.fold_in(key, 99))
    best = x
    code = jnp.where(wrong, CLEAN, ROBUST)
    for i, name in enumerate(names):
        k = jax.random.fold_in(key, i)
        active = code == ROBUST
        if name == "apgd-t":
            cand, f = apgd.targeted(model, params, x, y, eps=eps, key=k, lo=lo, hi=hi,
                                    iterations=iterations, targets=targets, eot=eot,
                                    active=active)
        else:
            def attack(xs, ys, kk, name=name):
                if name == "square":
                    xa = adaptive.square_kernel(model, int(queries), 1, params, xs, ys, eps,
                                                 kk, lo, hi, SQUARE_P_INIT)
                    return xa, _wrong(model, params, xa, ys, jax.random.fold_in(kk, 5))
                if name == "fab-t":
                    return fab.targeted(model, params, xs, ys, eps=eps, key=kk, lo=lo, hi=hi,
                                        steps=iterations, targets=targets)
                loss = "ce" if name == "apgd-ce" else "dlr"
                return apgd.run(model, params, xs, ys, ys, loss=loss, eps=eps, key=kk,
                                lo=lo, hi=hi, iterations=iterations, eot=eot)
            if on_host:
                todo = np.flatnonzero(np.asarray(active))
                if todo.size == 0:
                    break
                if name == "fab-t" and fab_runs is not None:
                    sub, fs = _fab_shared(fab_runs, model, params, x, y, todo, k, lo, hi, eps,
                                          iterations, targets)
                else:
                    sub, fs = apgd.on_subset(attack, todo, k, x, y)
                cand = best.at[todo].set(sub)
                f = jnp.zeros_like(active).at[todo].set(fs)
            else:
                cand, f = attack(x, y, k)
        f = f & active
        best = jnp.where(f[:, None], cand, best)
        code = jnp.where(f, i, code)
    return Report(best, np.asarray(code) if on_host else code, names)


def _fab_shared(memo: dict, model, params, x, y, todo, key, lo, hi, eps, iterations, targets):
    """FAB-T on the images `todo` at eps, each image's runs computed once into `memo`."""
    new = np.array([i for i in todo if i not in memo], dtype=todo.dtype)
    if new.size:
        got = apgd.on_subset(lambda xs, ys, k: fab.runs(model, params, xs, ys, key=k, lo=lo,
                                                          hi=hi, steps=iterations,
                                                          targets=targets), new, key, x, y)
        host = [np.asarray(a) for a in got]
        memo.update({int(i): tuple(a[j] for a in host) for j, i in enumerate(new)})
    advs, res, right = (jnp.asarray(np.stack([memo[int(i)][a] for i in todo]))
                        for a in range(3))
    return fab.pick(x[todo], advs, res, right, eps)


def autoattack(model: Model, params: Params, x, y, *, eps, key=None, lo=None, hi=None,
               version: str = "standard", iterations: int = apgd.ITERATIONS,
               targets: int = apgd.TARGETS,
               queries: int = SQUARE_QUERIES,
               eot: int | None = None) -> jax.Array:
    """AutoAttack (Croce & Hein, ICML 2020), standard or rand version: x_adv [b, D], the
    first adversarial point each attack found, x (or the last attack's best point) where
    none did. See `report` for the arguments and the per-image record."""
    return report(model, params, x, y, eps=eps, key=key, lo=lo, hi=hi, version=version,
                  iterations=iterations, targets=targets, queries=queries, eot=eot).x_adv


def robust_per_image(accurate: dict[str, Any]) -> np.ndarray:
    """Images robust to every attack: the AND of per-attack [b] bool arrays (correctly
    classified after that attack). The worst case taken per image, never the minimum of
    the attacks' accuracies (which overstates robustness)."""
    arrays = [np.asarray(v, bool) for v in accurate.values()]
    if not arrays:
        raise ConfigError("robust_per_image: expected at least one attack's results")
    return np.logical_and.reduce(arrays)


RECORDS: tuple[Attack, ...] = (
    Attack("autoattack", autoattack, "AutoAttack", apgd.CROCE_HEIN, needs_key=True,
           uses_gradient=True, box="ensemble",
           static=("version", "iterations", "targets", "queries", "eot"), min_classes=4),
)
