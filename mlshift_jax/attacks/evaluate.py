"""A model under attack: every attack at every eps, scored, then the per-image worst case and
the obfuscated-gradient flags. The one loop behind `mlshift attack` (with and without
`--defense`) and the bench's defense x attack table.

    columns = [Column("pgd", get_attack("pgd"), {"steps": 10}), ...]
    result = evaluate_under_attack(model, params, x, y, columns, eps=(0.1, 0.3), key=key)
    result.rows          one dict per (column, eps): column, attack, eps, the score's keys
                         (default: accuracy), median_s, compile_s, rounds
    worst_case(result)   {eps: share of images that survived every column}
    obfuscation_flags(model, params, x, y, result, key=..., eps=..., steps=...)

The model may be a defended one (`defenses.build`): the attacks see it as any model, and
`transfer` crafts its examples on the undefended model (`source_params`: the undefended
weights, for a defense that changed them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.attacks import autoattack, evasion
from mlshift_jax.attacks._common import Attack
from mlshift_jax.core.timing import Timing, first_call, time_call
from mlshift_jax.models.zoo import Model, Params


class Column(NamedTuple):
    """One attack of the table. label: its name in the table (e.g. "adaptive" for the
    defense's own adaptive attack); attack: the `Attack` record; options: the keywords it
    runs with besides eps / key / lo / hi (steps, restarts, samples, queries, loss, target)."""

    label: str
    attack: Attack
    options: dict


class UnderAttack(NamedTuple):
    """What `evaluate_under_attack` measured.

    rows: one dict per (column, eps), in column order then eps order: column, attack, eps,
    the scorer's keys, median_s, compile_s (seconds of the first, compiling call), rounds.
    correct: {(column, eps): bool [n]}, which images the model still classifies correctly.
    autoattack: {eps: `autoattack.Report.counts()`} of a swept "autoattack" column, else None.
    """

    rows: list[dict]
    correct: dict[tuple[str, float], np.ndarray]
    autoattack: dict[float, dict[str, int]] | None

    @property
    def accuracy(self) -> dict[tuple[str, float], float]:
        """{(column, eps): accuracy}, as `obfuscation.flags` reads it."""
        return {(r["column"], r["eps"]): r["accuracy"] for r in self.rows}


def correct_scorer(model: Model, params: Params, y, key: jax.Array) -> Callable:
    """The default scorer: score(x_adv: [n, D], i) -> {"accuracy", "correct": bool [n]}, eps
    number i drawing a stochastic model's randomness from fold_in(key, 1 + i)."""

    from mlshift_jax.models.metrics import predict_keyed  # pandas: kept off `mlshift --help`

    def score(x_adv, i: int) -> dict:
        pred = predict_keyed(model, params, x_adv, jax.random.fold_in(key, 1 + i))
        ok = np.asarray(jnp.argmax(pred, -1) == y)
        return {"accuracy": float(np.mean(ok)), "correct": ok}

    return score


def timed(fn: Callable, *args, rounds: int = 3) -> tuple[Timing, Any]:
    """(Timing of fn(*args): compile_s the time JAX reports tracing and compiling during the
    first call (`timing.first_call`), then the median of `rounds` calls; the first call's
    output)."""
    first, out = first_call(fn, *args)
    timing = time_call(fn, *args, rounds=rounds, warmup=0)
    return timing._replace(compile_s=first.compile_s), out


def _autoattack_sweep(model: Model, params: Params, x, y, eps_values, *, key, lo, hi,
                      queries=None):
    """AutoAttack at every eps (standard; `rand` for a stochastic model), each call picking
    the images still standing on the host. -> (x_adv [n_eps, b, D], per-eps counts)."""
    version = "rand" if model.stochastic else "standard"
    out, counts, fab_runs = [], [], {}  # FAB-T's runs read no eps: once per image
    for eps in eps_values:
        kw = {} if queries is None else {"queries": queries}
        r = autoattack.report(model, params, x, y, eps=float(eps), key=key, lo=lo, hi=hi,
                              version=version, fab_runs=fab_runs, **kw)
        out.append(r.x_adv)
        counts.append({"version": version, **r.counts()})
    return jnp.stack(out), counts


def evaluate_under_attack(model: Model, params: Params, x, y, columns: Sequence[Column],
                          eps: Sequence[float], *, key: jax.Array,
                          timer: Callable | None = None, score: Callable | None = None,
                          sweep: bool = True, source_params: Params | None = None
                          ) -> UnderAttack:
    """Every column's attack at every eps on (x: [n, D], y: [n]), timed and scored.

    sweep=True: each column is one compiled call over all eps (`evasion.sweep`), timed once
    per column by `timer`; an "autoattack" column runs `autoattack.report` per eps (standard,
    `rand` for a stochastic model), timed once with its compiles, and its counts feed the
    flags. sweep=False: one call per (column, eps), each timed (for attacks whose batch
    picks images on the host, e.g. APGD-T, a vmap over eps is not the same attack).
    key: the attacks' randomness (each call gets the same key); timer(fn, *args) ->
    (Timing, output) (default `timed`, 3 rounds); score(x_adv, i) -> dict with "accuracy"
    (and optionally "correct": bool [n]) for eps number i (default `correct_scorer` on
    fold_in(key, 7)); source_params: the weights `transfer` crafts on (default: params).
    ConfigError from the attacks for a bad eps, option or input.
    """
    timer = timer or timed
    score = score or correct_scorer(model, params, y, jax.random.fold_in(key, 7))
    lo, hi = (float(v) for v in model.input_range)
    rows: list[dict] = []
    correct: dict[tuple[str, float], np.ndarray] = {}
    counts = None
    for column in columns:
        attack = column.attack
        kw: dict[str, Any] = {"key": key, "lo": lo, "hi": hi, **column.options}
        if attack.surrogate and source_params is not None:
            kw["source_params"] = source_params
        if sweep and attack.name == "autoattack":  # one call (minutes on a robust model)
            run = partial(_autoattack_sweep, model, params, key=key, lo=lo, hi=hi)
            timing, (x_adv, found) = first_call(run, x, y, list(eps))
            counts = dict(zip(eps, found, strict=True))
            runs = [(timing, x_adv[i]) for i in range(len(eps))]
        elif sweep:
            run = partial(evasion.sweep, attack, model, params, **kw)
            timing, x_adv = timer(run, x, y, jnp.asarray(eps, x.dtype))
            runs = [(timing, x_adv[i]) for i in range(len(eps))]
        else:  # eps is traced: one compile per attack, not per eps
            runs = [timer(partial(attack.fn, model, params, x, y, eps=e, **kw)) for e in eps]
        for i, (e, (timing, x_adv)) in enumerate(zip(eps, runs, strict=True)):
            scored = dict(score(x_adv, i))
            ok = scored.pop("correct", None)
            if ok is not None:
                correct[(column.label, e)] = ok
            rows.append({"column": column.label, "attack": attack.name, "eps": e, **scored,
                         "median_s": timing.median_s, "compile_s": timing.compile_s,
                         "rounds": timing.rounds})
    return UnderAttack(rows, correct, counts)


def worst_case(result: UnderAttack) -> dict[float, float]:
    """{eps: share of images the model classified correctly under every column} (an image
    is robust only if it survived every attack: never the minimum of the accuracies)."""
    eps_values = dict.fromkeys(e for _, e in result.correct)
    return {e: float(np.mean(autoattack.robust_per_image(
        {c: v for (c, e2), v in result.correct.items() if e2 == e}))) for e in eps_values}


def obfuscation_flags(model: Model, params: Params, x, y, result: UnderAttack, *,
                      key: jax.Array, eps: float, steps: int, probe_n: int = 200
                      ) -> tuple[dict, list[str]]:
    """(the probe, the flags) of a model under attack: `obfuscation.probe` on the first
    probe_n images of x at eps with PGD-`steps` (key: fold_in(key, 11)), then
    `obfuscation.flags` over the result's accuracies (and AutoAttack's counts)."""
    from mlshift_jax.attacks import obfuscation  # pandas: kept off `mlshift --help`

    k = min(probe_n, int(x.shape[0]))
    probed = obfuscation.probe(model, params, x[:k], y[:k], key=jax.random.fold_in(key, 11),
                               eps=eps, steps=steps)
    return probed, obfuscation.flags(result.accuracy, probed, n=int(x.shape[0]),
                                     autoattack=result.autoattack)
