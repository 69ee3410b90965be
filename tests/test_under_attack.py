"""`attacks.evaluate.evaluate_under_attack`, the one defense-and-attack loop behind `mlshift
attack` and the bench's defense table: its rows equal the attacks run and scored by hand, a
swept column equals one call per eps where the attack allows it, the worst case is per image,
and the flags see a masked gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.attacks import attack_key, defenses, get_attack, sweep
from mlshift_jax.attacks.evaluate import (
    Column,
    correct_scorer,
    evaluate_under_attack,
    obfuscation_flags,
    worst_case,
)
from mlshift_jax.models import TrainConfig, fit_model

EPS = (0.0, 0.1, 0.3)


@pytest.fixture(scope="module")
def small(mnist):
    model, params = fit_model("mlp-ce", TrainConfig(hidden=16, epochs=1),
                              mnist.x_train[:600], mnist.y_train[:600], mnist.spec)
    x, y = jnp.asarray(mnist.x_test[:96]), jnp.asarray(mnist.y_test[:96])
    return model, params, x, y


def _columns(*names, **options):
    return [Column(n, get_attack(n), dict(options.get(n, {}))) for n in names]


def test_swept_rows_equal_the_attacks_scored_by_hand(small):
    model, params, x, y = small
    key = attack_key(0)
    result = evaluate_under_attack(model, params, x, y, _columns("fgsm", "pgd", pgd={"steps": 5}),
                                   EPS, key=key, timer=_untimed)
    assert [(r["column"], r["eps"]) for r in result.rows] == \
        [(c, e) for c in ("fgsm", "pgd") for e in EPS]
    lo, hi = model.input_range
    for name, kw in (("fgsm", {}), ("pgd", {"steps": 5})):
        x_adv = sweep(get_attack(name), model, params, x, y, EPS, key=key, lo=lo, hi=hi, **kw)
        score = correct_scorer(model, params, y, jax.random.fold_in(key, 7))
        for i, e in enumerate(EPS):
            expected = score(x_adv[i], i)
            assert result.accuracy[(name, e)] == expected["accuracy"]
            np.testing.assert_array_equal(result.correct[(name, e)], expected["correct"])
    clean = float(np.mean(np.argmax(np.asarray(jax.vmap(
        lambda v: model.apply(params, v))(x)), -1) == np.asarray(y)))
    assert result.accuracy[("fgsm", 0.0)] == result.accuracy[("pgd", 0.0)] == clean
    assert result.accuracy[("pgd", 0.3)] < clean and result.autoattack is None


def _untimed(fn, *args):
    from mlshift_jax.core.timing import Timing

    return Timing(None, 0.0, 0.0, 0.0, 0.0, 1, (0.0,)), fn(*args)


def test_one_call_per_eps_equals_the_attack_called_at_each_eps(small):
    model, params, x, y = small
    key = attack_key(3)
    result = evaluate_under_attack(model, params, x, y, _columns("apgd-t", **{
        "apgd-t": {"iterations": 5, "targets": 2}}), EPS[1:], key=key, sweep=False,
        timer=_untimed)
    lo, hi = model.input_range
    for i, e in enumerate(EPS[1:]):
        x_adv = get_attack("apgd-t").fn(model, params, x, y, eps=e, key=key, lo=lo, hi=hi,
                                        iterations=5, targets=2)
        pred = np.argmax(np.asarray(jax.vmap(lambda v: model.apply(params, v))(x_adv)), -1)
        assert result.accuracy[("apgd-t", e)] == float(np.mean(pred == np.asarray(y)))
        assert result.rows[i]["rounds"] == 1


def test_worst_case_is_per_image_and_the_flags_see_a_masked_gradient(small):
    model, params, x, y = small
    key = attack_key(0)
    result = evaluate_under_attack(model, params, x, y, _columns("fgsm", "noise-sign"),
                                   EPS[1:], key=key, timer=_untimed)
    worst = worst_case(result)
    for e in EPS[1:]:
        both = result.correct[("fgsm", e)] & result.correct[("noise-sign", e)]
        assert worst[e] == float(np.mean(both))
        assert worst[e] <= min(result.accuracy[("fgsm", e)], result.accuracy[("noise-sign", e)])
    masked = defenses.build("quantize", model)  # bit depth 1: the input gradient is 0
    result = evaluate_under_attack(masked, params, x, y, _columns("fgsm"), EPS[1:], key=key,
                                   timer=_untimed)
    probed, raised = obfuscation_flags(masked, params, x, y, result, key=key, eps=0.3, steps=5,
                                       probe_n=64)
    assert probed["n"] == 64 and any(line.startswith("zero-gradient") for line in raised)
