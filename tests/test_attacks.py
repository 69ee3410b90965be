"""Property tests of the test-time attacks (cleverhans-style), driven by `ATTACKS`.

eps=0 returns x; the perturbation stays within eps; outputs stay in [lo, hi]; the FGSM
gradient matches finite differences and the numpy baseline; PGD is at least as strong as
FGSM on a trained model; targeted attacks move predictions to the target; eps sweeps never
recompile; bad arguments raise ConfigError.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.attacks import ATTACKS, Attack, evasion, get_attack
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models import baseline
from mlshift_jax.models.zoo import MLP_CE, SEED_MLP, Model, predict

TARGET = 3
NAMES = sorted(ATTACKS)
KEY = jax.random.key(0)


def accuracy(params, x, y, model=SEED_MLP) -> float:
    return float(jnp.mean(jnp.argmax(predict(model, params, x), -1) == y))


# the APGD family and AutoAttack at a small budget: the properties hold at any budget
CHEAP = {"apgd-ce": {"iterations": 10}, "apgd-dlr": {"iterations": 10},
         "apgd-t": {"iterations": 10, "targets": 2},
         "autoattack": {"iterations": 10, "targets": 2, "queries": 50},
         "fab-t": {"steps": 20, "targets": 2}}
# called directly, these pick the images still standing on the host (other random draws
# than inside jit, where every image is attacked): same properties, not the same bits
HOST_PICKED = {"apgd-t", "autoattack"}


def run(name, params, x, y, eps, model=SEED_MLP, **kw):
    """Call attack `name` with the key/target it needs (the heavy ones at a small budget)."""
    kw = {**CHEAP.get(name, {}), **kw}
    attack = get_attack(name)
    if attack.needs_key:
        kw.setdefault("key", KEY)
    if attack.targeted:
        kw.setdefault("target", TARGET)
    return attack.fn(model, params, x, y, eps=eps, **kw)


# --- the registry ------------------------------------------------------------------------------


def test_registry():
    """Invariants, not a pinned list: tests/test_attack_registry.py checks every fact."""
    assert {"none", "fgsm", "pgd"} <= set(ATTACKS)
    for name, attack in ATTACKS.items():
        assert isinstance(attack, Attack) and attack.name == name and callable(attack.fn)
        assert get_attack(name) is attack
        # a targeted attack has a target parameter, an untargeted one none
        assert attack.targeted == attack.accepts("target"), name
    assert not get_attack("fgsm").needs_key and get_attack("pgd").needs_key


def test_default_range_is_the_models_input_range():
    from mlshift_jax.data import datasets

    assert SEED_MLP.input_range == tuple(datasets.INPUT_RANGE)  # the study's MNIST scaling
    wide = SEED_MLP._replace(input_range=(-1.0, 2.0))
    x = jnp.full((3, 784), 0.5)
    y = jnp.zeros(3, jnp.int32)
    out = evasion.noise_sign(wide, _p, x, y, eps=1.4, key=KEY)
    assert float(out.min()) < 0.0 and float(out.max()) > 1.0  # not clipped to [0.01, 1]


def test_unknown_attack_lists_known_names():
    with pytest.raises(ConfigError, match="fgsm") as err:
        get_attack("fgsn")
    assert "fgsn" in str(err.value) and "pgd-targeted" in str(err.value)


# --- properties over the registry --------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_eps_zero_returns_x(trained_seed_mlp, name):
    _, params, x, y = trained_seed_mlp
    x_adv = run(name, params, x, y, 0.0)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(x_adv), x)
    assert accuracy(params, x_adv, y) == accuracy(params, x, y)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_within_eps_and_range(trained_seed_mlp, name, eps):
    _, params, x, y = trained_seed_mlp
    x_adv = np.asarray(run(name, params, x, y, eps))
    assert np.all(np.isfinite(x_adv))
    lo, hi = SEED_MLP.input_range
    assert x_adv.min() >= lo and x_adv.max() <= hi
    if ATTACKS[name].linf_bounded:
        assert np.abs(x_adv - x).max() <= eps + 1e-6
    if name != "none":
        assert np.abs(x_adv - x).max() > 0


@pytest.mark.parametrize("name", NAMES)
def test_custom_range_on_an_untrained_ce_model(name):
    """Other model, other range: outputs in [lo, hi], and in the eps-ball of clip(x)."""
    params = MLP_CE.init(jax.random.key(1), n_hidden=32)
    lo, hi, eps = 0.2, 0.7, 0.1
    x = jax.random.uniform(jax.random.key(2), (64, 784), minval=lo, maxval=hi)
    y = jnp.arange(64, dtype=jnp.int32) % 10
    x_adv = np.asarray(run(name, params, x, y, eps, model=MLP_CE, lo=lo, hi=hi))
    assert x_adv.min() >= np.float32(lo) and x_adv.max() <= np.float32(hi)
    if ATTACKS[name].linf_bounded:
        assert np.abs(x_adv - np.asarray(x)).max() <= eps + 1e-6


@pytest.mark.parametrize("name", sorted(set(NAMES) - HOST_PICKED))
def test_runs_under_an_outer_jit_with_traced_eps(trained_seed_mlp, name):
    """The attacks compose with jit (eps traced) and give the same answer as the plain call."""
    _, params, x, y = trained_seed_mlp
    kw = {"key": KEY, **CHEAP.get(name, {})} if ATTACKS[name].needs_key else {}
    if ATTACKS[name].targeted:
        kw["target"] = TARGET
    fn = ATTACKS[name].fn
    jitted = jax.jit(lambda p, x, y, e: fn(SEED_MLP, p, x, y, eps=e, **kw))
    np.testing.assert_allclose(jitted(params, x[:50], y[:50], 0.2),
                               fn(SEED_MLP, params, x[:50], y[:50], eps=0.2, **kw), atol=1e-6)


@pytest.mark.parametrize("name", [n for n in NAMES if ATTACKS[n].needs_key])
def test_keys_same_result_same_key(trained_seed_mlp, name):
    _, params, x, y = trained_seed_mlp
    a = run(name, params, x[:50], y[:50], 0.1, key=jax.random.key(7))
    b = run(name, params, x[:50], y[:50], 0.1, key=jax.random.key(7))
    c = run(name, params, x[:50], y[:50], 0.1, key=jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ConfigError, match="key"):
        ATTACKS[name].fn(SEED_MLP, params, x, y, eps=0.1,
                         **({"target": TARGET} if ATTACKS[name].targeted else {}))


# --- gradients against references --------------------------------------------------------------


@pytest.mark.parametrize("loss_name", ["train", "ce", "dlr"])
@pytest.mark.parametrize("model", [SEED_MLP, MLP_CE], ids=lambda m: m.name)
def test_input_grad_matches_finite_differences(model, loss_name):
    from mlshift_jax.attacks.losses import example_loss

    with jax.enable_x64(True):
        params = model.init(jax.random.key(3), n_in=20, n_hidden=8, dtype=jnp.float64)
        x = jax.random.uniform(jax.random.key(4), (4, 20), jnp.float64, 0.01, 1.0)
        y = jnp.array([0, 3, 7, 9])
        g = np.asarray(evasion.input_grad(model, params, x, y, loss=loss_name))
        assert g.dtype == np.float64
        h = 1e-6
        loss = jax.jit(jax.vmap(example_loss(model, loss_name), in_axes=(None, 0, 0)))
        for j in (0, 5, 13, 19):
            e = jnp.zeros(20, jnp.float64).at[j].set(h)
            fd = (np.asarray(loss(params, x + e, y)) - np.asarray(loss(params, x - e, y))) / (2 * h)
            # DLR's gradient is ~0 where its numerator's two logits do not move with x_j
            np.testing.assert_allclose(g[:, j], fd, rtol=1e-6,
                                       atol=1e-9 if loss_name == "dlr" else 1e-11)


def test_numpy_gradient_matches_jax_float64(trained_seed_mlp):
    net, _, x, y = trained_seed_mlp
    with jax.enable_x64(True):
        params = {k: jnp.asarray(v) for k, v in net.params().items()}
        g_jax = np.asarray(evasion.input_grad(SEED_MLP, params, x.astype(np.float64), y,
                                              loss="train"))
    g_np = baseline.input_grad_batched(net.wih, net.who, x.astype(np.float64), y)
    np.testing.assert_allclose(g_np, g_jax, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(baseline.input_grad_one(net.wih, net.who, x[7], int(y[7])),
                               g_jax[7], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_fgsm_equals_numpy_float64(trained_seed_mlp, eps):
    net, _, x, y = trained_seed_mlp
    x64 = x.astype(np.float64)
    with jax.enable_x64(True):
        params = {k: jnp.asarray(v) for k, v in net.params().items()}
        x_jax = np.asarray(evasion.fgsm(SEED_MLP, params, x64, y, eps=eps, loss="train"))
    assert x_jax.dtype == np.float64
    np.testing.assert_array_equal(x_jax, baseline.fgsm_batched(net.wih, net.who, x64, y, eps))
    np.testing.assert_array_equal(x_jax, baseline.fgsm_loop(net.wih, net.who, x64, y, eps))


def test_fgsm_equals_numpy_float32(trained_seed_mlp):
    """float32: only sign flips of near-zero gradients may differ (>= 99.99% of pixels equal)."""
    _, params, x, y = trained_seed_mlp
    wih, who = np.asarray(params["wih"]), np.asarray(params["who"])
    x_jax = np.asarray(evasion.fgsm(SEED_MLP, params, x, y, eps=0.1, loss="train"))
    for x_np in (baseline.fgsm_batched(wih, who, x, y, 0.1),
                 baseline.fgsm_loop(wih, who, x, y, 0.1)):
        assert x_np.dtype == np.float32
        assert np.mean(x_jax == x_np) >= 0.9999


def test_one_step_pgd_without_random_start_is_fgsm(trained_seed_mlp):
    _, params, x, y = trained_seed_mlp
    one_step = evasion.pgd(SEED_MLP, params, x, y, eps=0.2, steps=1, step_size=0.2,
                           random_start=False)
    np.testing.assert_array_equal(one_step, evasion.fgsm(SEED_MLP, params, x, y, eps=0.2))


# --- strength on a trained model ---------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.2])
def test_pgd_at_least_as_strong_as_fgsm(trained_seed_mlp, eps):
    _, params, x, y = trained_seed_mlp
    clean = accuracy(params, x, y)
    acc_noise = accuracy(params, run("noise-sign", params, x, y, eps), y)
    acc_fgsm = accuracy(params, evasion.fgsm(SEED_MLP, params, x, y, eps=eps), y)
    acc_pgd = accuracy(params, evasion.pgd(SEED_MLP, params, x, y, eps=eps, key=KEY), y)
    assert clean > 0.8
    assert acc_pgd <= acc_fgsm < acc_noise <= clean + 0.01


@pytest.mark.parametrize("name", ["fgsm-targeted", "pgd-targeted"])
def test_targeted_raises_share_of_target(trained_seed_mlp, name):
    _, params, x, y = trained_seed_mlp
    share = accuracy  # the share predicted as t is the "accuracy" against t
    x_adv = run(name, params, x, y, 0.2, target=TARGET)
    assert share(params, x_adv, TARGET) > share(params, x, TARGET) + 0.3
    per_example = (y + 1) % 10  # a different target for every image
    x_adv = run(name, params, x, y, 0.2, target=per_example)
    assert share(params, x_adv, per_example) > share(params, x, per_example) + 0.2


# --- eps sweeps: one compiled call, no recompiles ----------------------------------------------


def counting_model() -> tuple[Model, list[int]]:
    """SEED_MLP whose apply and loss count how often they are traced (a fresh jit cache
    entry): the attacks' losses call apply, the training loss (`loss="train"`) loss."""
    count = [0]

    def loss(params, x, y):
        count[0] += 1
        return SEED_MLP.loss(params, x, y)

    def apply(params, x):
        count[0] += 1
        return SEED_MLP.apply(params, x)

    return SEED_MLP._replace(name="counted", loss=loss, apply=apply), count


@pytest.mark.parametrize("name", ["fgsm", "pgd", "pgd-targeted", "apgd-ce"])
def test_eps_changes_never_retrace(trained_seed_mlp, name):
    _, params, x, y = trained_seed_mlp
    model, count = counting_model()
    run(name, params, x, y, 0.1, model=model)
    traced = count[0]
    assert traced >= 1
    for eps in (np.float32(0.2), jnp.asarray(0.3), 0.25):
        run(name, params, x, y, eps, model=model)
    assert count[0] == traced


def test_sweep_traces_once(trained_seed_mlp):
    _, params, x, y = trained_seed_mlp
    model, count = counting_model()
    out = evasion.sweep(ATTACKS["fgsm"], model, params, x, y, [0.0, 0.1, 0.2])
    traced = count[0]
    assert out.shape == (3, *x.shape)
    for eps_values in ([0.05, 0.15, 0.3], np.array([0.3, 0.2, 0.1]), jnp.array([0.0, 0.0, 0.1])):
        evasion.sweep(ATTACKS["fgsm"], model, params, x, y, eps_values)
    assert count[0] == traced


@pytest.mark.parametrize("name", sorted(set(NAMES) - HOST_PICKED))
def test_sweep_matches_single_calls(trained_seed_mlp, name):
    _, params, x, y = trained_seed_mlp
    x, y = x[:100], y[:100]
    kw = {"key": KEY, **CHEAP.get(name, {})} if ATTACKS[name].needs_key else {}
    if ATTACKS[name].targeted:
        kw["target"] = TARGET
    eps_values = [0.0, 0.1, 0.3]
    out = evasion.sweep(ATTACKS[name], SEED_MLP, params, x, y, eps_values, **kw)
    assert out.shape == (3, 100, 784)
    np.testing.assert_array_equal(out[0], x)
    for i, eps in enumerate(eps_values):
        single = ATTACKS[name].fn(SEED_MLP, params, x, y, eps=eps, **kw)
        close = np.abs(np.asarray(out[i]) - np.asarray(single)) <= 1e-6  # fused: last-ulp noise
        if np.mean(close) >= 0.999:  # gradient attacks: rare sign flips of ~0 gradients
            continue
        # APGD branches on loss comparisons (its step-size halving): on some CPUs a last-ulp
        # difference of the fused sweep sends an image down another path, to the same verdict
        assert name.startswith("apgd"), (name, eps, np.mean(close))
        fooled = [np.asarray(jnp.argmax(predict(SEED_MLP, params, a), -1)) != y
                  for a in (out[i], single)]
        assert np.mean(fooled[0] == fooled[1]) >= 0.97, (name, eps)
        assert np.mean(np.all(close, axis=1)) >= 0.5, (name, eps)


# --- bad arguments -----------------------------------------------------------------------------

_x = np.full((4, 784), 0.5, np.float32)
_y = np.arange(4, dtype=np.int32)
_p = SEED_MLP.init(jax.random.key(0), n_hidden=8)

BAD = {
    "eps<0": (functools.partial(evasion.fgsm, eps=-0.1), "eps"),
    "eps nan": (functools.partial(evasion.pgd, eps=float("nan"), key=KEY), "eps"),
    "eps array<0": (functools.partial(evasion.noise_sign, eps=jnp.asarray(-1.0), key=KEY), "eps"),
    "eps not scalar": (functools.partial(evasion.fgsm, eps=[0.1, 0.2]), "eps"),
    "eps str": (functools.partial(evasion.fgsm, eps="0.1"), "eps"),
    "lo str": (functools.partial(evasion.fgsm, eps=0.1, lo="0"), "lo"),
    "lo>=hi": (functools.partial(evasion.fgsm, eps=0.1, lo=1.0, hi=0.01), "lo < hi"),
    "lo==hi": (functools.partial(evasion.noise_uniform, eps=0.1, key=KEY, lo=0.5, hi=0.5),
               "lo < hi"),
    "steps=0": (functools.partial(evasion.pgd, eps=0.1, key=KEY, steps=0), "steps"),
    "steps float": (functools.partial(evasion.pgd, eps=0.1, key=KEY, steps=2.5), "steps"),
    "step_size<0": (functools.partial(evasion.pgd, eps=0.1, key=KEY, step_size=-1.0),
                    "step_size"),
    "no key sign": (functools.partial(evasion.noise_sign, eps=0.1), "key"),
    "no key uniform": (functools.partial(evasion.noise_uniform, eps=0.1), "key"),
    "no key gauss": (functools.partial(evasion.noise_gauss, eps=0.1), "key"),
    "no key pgd": (functools.partial(evasion.pgd, eps=0.1), "key"),
    "no key pgd-targeted": (functools.partial(evasion.pgd_targeted, eps=0.1, target=1), "key"),
    "no target": (functools.partial(evasion.fgsm_targeted, eps=0.1), "target"),
    "loss unknown": (functools.partial(evasion.fgsm, eps=0.1, loss="mse"), "loss"),
    "target out of range": (functools.partial(evasion.fgsm_targeted, eps=0.1, target=10),
                            "target"),
    "target bad shape": (functools.partial(evasion.pgd_targeted, eps=0.1, key=KEY,
                                           target=np.zeros(3, np.int32)), "target"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_raise_config_error(case):
    fn, match = BAD[case]
    with pytest.raises(ConfigError, match=match):
        fn(SEED_MLP, _p, _x, _y)


def test_bad_inputs_raise_config_error():
    with pytest.raises(ConfigError, match="x:"):
        evasion.fgsm(SEED_MLP, _p, _x[0], _y, eps=0.1)
    with pytest.raises(ConfigError, match="y:"):
        evasion.fgsm(SEED_MLP, _p, _x, _y[:3], eps=0.1)
    with pytest.raises(ConfigError, match="model"):
        evasion.fgsm("seed-mlp", _p, _x, _y, eps=0.1)
    with pytest.raises(ConfigError, match="eps_values"):
        evasion.sweep(ATTACKS["fgsm"], SEED_MLP, _p, _x, _y, [0.1, -0.1])
    with pytest.raises(ConfigError, match="lo < hi"):
        evasion.sweep(ATTACKS["fgsm"], SEED_MLP, _p, _x, _y, [0.1], lo=0.9, hi=0.1)
    with pytest.raises(ConfigError, match="steps"):
        evasion.sweep(ATTACKS["pgd"], SEED_MLP, _p, _x, _y, [0.1], key=KEY, steps=0)
    with pytest.raises(ConfigError, match="key"):
        evasion.sweep(ATTACKS["pgd"], SEED_MLP, _p, _x, _y, [0.1])
    with pytest.raises(ConfigError, match="expected an Attack"):
        evasion.sweep(evasion.fgsm, SEED_MLP, _p, _x, _y, [0.1])


def test_numpy_fgsm_bad_arguments():
    wih, who = (np.asarray(_p[k]) for k in ("wih", "who"))
    with pytest.raises(ConfigError, match="eps"):
        baseline.fgsm_batched(wih, who, _x, _y, -0.1)
    with pytest.raises(ConfigError, match="lo < hi"):
        baseline.fgsm_loop(wih, who, _x, _y, 0.1, lo=1.0, hi=0.0)


def test_attack_key_is_no_training_key():
    """Training draws from key(seed), its splits and small fold_ins; attacks must not."""
    from mlshift_jax.attacks.evasion import attack_key

    base = jax.random.key(0)
    training = [base, *jax.random.split(base, 4), *(jax.random.fold_in(base, i) for i in range(8))]
    data = jax.random.key_data
    assert all(not np.array_equal(data(attack_key(0)), data(k)) for k in training)
    assert not np.array_equal(data(attack_key(0)), data(attack_key(1)))
