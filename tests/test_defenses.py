"""Defenses as models, the adaptive attacks, the obfuscation flags and adversarial training.

Small on purpose (CI has 2 cores): one mlp-ce of 64 hidden units trained on 2,000 images,
attacked on 200. Never asserts on speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.attacks import adaptive, defenses, evasion, get_attack, obfuscation
from mlshift_jax.bench import matrix, report, runner
from mlshift_jax.bench.experiments import defenses as defenses_exp
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models import metrics
from mlshift_jax.models.recipes import TrainConfig
from mlshift_jax.models.zoo import MLP_CE, Model

N_TRAIN, N_TEST, HIDDEN = 2000, 200, 64  # the sizes of conftest's trained_mlp_ce
KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def dae(trained_mlp_ce):
    return defenses.fit_state("denoise-ae", MLP_CE, trained_mlp_ce[3], key=KEY, steps=200,
                              hidden=64)


def _built(name, dae_state):
    return defenses.build(name, MLP_CE, state=dae_state if name == "denoise-ae" else None,
                          **({"steps": 200, "hidden": 64} if name == "denoise-ae" else {}))


def _acc(model, params, x, y, key=KEY):
    return metrics.evaluate(model, params, x, y, key=key)["accuracy"]


# --- each defense is a model --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(defenses.DEFENSES))
def test_each_defense_is_a_model(name, trained_mlp_ce, dae):
    params, x, y, _ = trained_mlp_ce
    model = _built(name, dae)
    assert isinstance(model, Model)
    assert model.input_shape == MLP_CE.input_shape and model.input_range == MLP_CE.input_range
    assert _built(name, dae) is model  # cached: jit reuses its compiled code
    kw = {"key": KEY} if model.stochastic else {}
    out = model.apply(params, x[0], **kw)
    assert out.shape == (MLP_CE.n_classes,)
    assert jnp.shape(model.loss(params, x[0], y[0], **kw)) == ()
    scores = metrics.predict_keyed(model, params, x, KEY)
    assert scores.shape == (N_TEST, MLP_CE.n_classes)
    again = metrics.predict_keyed(model, params, x, KEY)
    np.testing.assert_array_equal(scores, again)  # same key, same result
    if name == "none":
        assert model is MLP_CE
    else:
        assert model.name == f"mlp-ce+{name}"
        assert defenses.base_of(model) is MLP_CE
    assert model.stochastic == (name == "randomize")


def test_randomize_draws_fresh_randomness_per_key_and_needs_one(trained_mlp_ce):
    params, x, y, _ = trained_mlp_ce
    model = defenses.build("randomize", MLP_CE)
    a = metrics.predict_keyed(model, params, x, jax.random.key(1))
    b = metrics.predict_keyed(model, params, x, jax.random.key(2))
    assert not np.allclose(a, b)
    for call in (lambda: metrics.evaluate(model, params, x, y),
                 lambda: evasion.fgsm(model, params, x, y, eps=0.1),
                 lambda: evasion.pgd(model, params, x, y, eps=0.1, random_start=False),
                 lambda: evasion.input_grad(model, params, x, y)):
        with pytest.raises(ConfigError, match="stochastic"):
            call()
    x_adv = evasion.pgd(model, params, x, y, eps=0.1, key=KEY, steps=2)
    assert float(jnp.max(jnp.abs(x_adv - x))) <= 0.1 + 1e-6


@pytest.mark.slow
def test_preprocessors_take_the_shape_from_the_model():
    """A 6x5 RGB model in [0, 1]: nothing assumes 28x28, 784 or one channel."""
    shape, d = (6, 5, 3), 90

    def init(key, **_):
        return {"w": jax.random.normal(key, (4, d))}

    def apply(p, x):
        return p["w"] @ x

    def loss(p, x, y):
        return -jax.nn.log_softmax(apply(p, x))[y]

    toy = Model("toy", init, apply, loss, jax.nn.softmax, input_shape=shape, n_classes=4,
                input_range=(0.0, 1.0))
    params = toy.init(KEY)
    x = jax.random.uniform(KEY, (7, d))
    y = jnp.arange(7) % 4
    for name in ("randomize", "quantize", "median"):
        model = defenses.build(name, toy)
        assert metrics.predict_keyed(model, params, x, KEY).shape == (7, 4)
        pre = defenses.info(model).pre
        out = pre(x[0], KEY)
        assert out.shape == (d,) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    x_adv = adaptive.square(defenses.build("quantize", toy), params, x, y, eps=0.1, key=KEY,
                            queries=5, lo=0.0, hi=1.0)
    assert x_adv.shape == x.shape


def test_quantize_masks_the_gradient_and_median_of_a_constant_is_the_constant(trained_mlp_ce):
    params, x, y, _ = trained_mlp_ce
    q = defenses.build("quantize", MLP_CE, bits=1)
    assert float(jnp.max(jnp.abs(evasion.input_grad(q, params, x, y)))) == 0.0
    pre = defenses.info(q).pre
    np.testing.assert_allclose(np.unique(np.asarray(pre(x[0], None))), [0.01, 1.0], rtol=1e-6)
    med = defenses.info(defenses.build("median", MLP_CE)).pre
    np.testing.assert_allclose(med(jnp.full((784,), 0.3), None), 0.3)


@pytest.mark.parametrize("size", [3, 5])
def test_median_defense_equals_scipys_median_filter_ties_and_channels_included(size):
    from scipy import ndimage

    rng = np.random.default_rng(size)
    imgs = rng.random((6, 12, 9, 2)).astype(np.float32)
    imgs[:3] = np.round(imgs[:3] * 3) / 3  # many ties
    toy = MLP_CE._replace(input_shape=(12, 9, 2), input_range=(0.0, 1.0))
    pre = defenses.info(defenses.build("median", toy, size=size)).pre
    got = jax.vmap(pre)(jnp.asarray(imgs.reshape(6, -1)))
    want = ndimage.median_filter(imgs, size=(1, size, size, 1), mode="nearest")
    np.testing.assert_array_equal(np.asarray(got), want.reshape(6, -1))
    # its gradient routes each output pixel's cotangent to the pixel(s) holding the median
    grads = np.asarray(jax.jacrev(lambda v: pre(v, None))(jnp.asarray(imgs[4].reshape(-1))))
    assert grads.min() >= 0.0
    np.testing.assert_allclose(grads.sum(axis=1), 1.0, atol=1e-6)


def test_bad_options_raise():
    with pytest.raises(ConfigError, match="unknown defense"):
        defenses.get_defense("nope")
    with pytest.raises(ConfigError, match="bits"):
        defenses.build("quantize", MLP_CE, bits=0)
    with pytest.raises(ConfigError, match="unknown option"):
        defenses.build("median", MLP_CE, radius=2)
    with pytest.raises(ConfigError, match="state"):
        defenses.build("denoise-ae", MLP_CE)


# --- adaptive attacks ---------------------------------------------------------------------------


def test_eot_reduces_to_pgd_when_the_randomness_is_off(trained_mlp_ce):
    params, x, y, _ = trained_mlp_ce
    want = evasion.pgd(MLP_CE, params, x, y, eps=0.1, key=KEY, steps=5)
    got = adaptive.eot_pgd(MLP_CE, params, x, y, eps=0.1, key=KEY, steps=5, samples=4)
    np.testing.assert_array_equal(got, want)
    # a randomized defense with its randomness off (no resize, no noise): the EOT mean of
    # identical gradients is the gradient; PGD's fresh draws change nothing either
    off = defenses.build("randomize", MLP_CE, min_scale=1.0, noise=0.0)
    got = adaptive.eot_pgd(off, params, x, y, eps=0.1, key=KEY, steps=5, samples=4)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_bpda_equals_pgd_on_a_differentiable_identity_preprocessor(trained_mlp_ce):
    params, x, y, _ = trained_mlp_ce
    ident = defenses.preprocessed(MLP_CE, lambda v, key: v, defense="identity")
    want = evasion.pgd(ident, params, x, y, eps=0.1, key=KEY, steps=5)
    got = adaptive.bpda_pgd(ident, params, x, y, eps=0.1, key=KEY, steps=5)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, evasion.pgd(MLP_CE, params, x, y, eps=0.1, key=KEY,
                                                   steps=5))


@pytest.mark.parametrize("name", ["eot-pgd", "bpda-pgd", "square", "transfer"])
def test_adaptive_attacks_stay_in_the_ball_and_are_deterministic(name, trained_mlp_ce):
    params, x, y, _ = trained_mlp_ce
    model = defenses.build("quantize", MLP_CE)
    kw = {"queries": 20} if name == "square" else {"steps": 3}
    fn = get_attack(name).fn
    a = fn(model, params, x, y, eps=0.2, key=KEY, **kw)
    b = fn(model, params, x, y, eps=0.2, key=KEY, **kw)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - x))) <= 0.2 + 1e-6
    assert float(a.min()) >= 0.01 - 1e-7 and float(a.max()) <= 1.0 + 1e-7
    if name != "eot-pgd":  # quantize's gradient is 0: EOT through it moves nothing
        assert _acc(model, params, a, y) < _acc(model, params, x, y)
    with pytest.raises(ConfigError):
        fn(model, params, x, y, eps=0.2, key=None, **kw)


@pytest.mark.slow
def test_adaptive_attacks_are_at_least_as_strong_as_the_naive_ones(trained_mlp_ce, dae):
    """On every defense, its adaptive attack leaves at most the accuracy FGSM and PGD leave
    (within 0.05: a stochastic model's accuracy is itself a random draw)."""
    params, x, y, _ = trained_mlp_ce
    for name in sorted(defenses.DEFENSES):
        if name == "adv-train":  # the same functions as `none`; its weights differ only
            continue
        model = _built(name, dae)
        adaptive_name = defenses.get_defense(name).adaptive
        xs, ys = x[:100], y[:100]
        naive = min(_acc(model, params, get_attack(a).fn(
            model, params, xs, ys, eps=0.15, key=KEY, **({"steps": 5} if a == "pgd" else {})),
            ys) for a in ("fgsm", "pgd"))
        strong = _acc(model, params, get_attack(adaptive_name).fn(
            model, params, xs, ys, eps=0.15, key=KEY, steps=5, restarts=2, samples=2), ys)
        assert strong <= naive + 0.05, (name, adaptive_name, strong, naive)


def test_square_attack_runs_in_a_sweep(trained_mlp_ce):
    params, x, y, _ = trained_mlp_ce
    out = evasion.sweep(get_attack("square"), MLP_CE, params, x[:50], y[:50],
                        [0.0, 0.3], key=KEY, queries=30)
    np.testing.assert_array_equal(out[0], x[:50])
    assert _acc(MLP_CE, params, out[1], y[:50]) < _acc(MLP_CE, params, x[:50], y[:50])


# --- flags --------------------------------------------------------------------------------------


def _table(model, params, x, y, eps_values=(0.1, 0.3)):
    acc = {}
    for name, kw in (("fgsm", {}), ("pgd", {"steps": 10}), ("square", {"queries": 60}),
                     ("transfer", {"steps": 10})):
        for eps in eps_values:
            x_adv = get_attack(name).fn(model, params, x, y, eps=eps, key=KEY, **kw)
            acc[(name, eps)] = _acc(model, params, x_adv, y)
    return acc


@pytest.mark.slow
def test_flags_fire_on_a_planted_masked_model_and_stay_quiet_on_an_undefended_one(trained_mlp_ce):
    params, x, y, _ = trained_mlp_ce
    masked = defenses.preprocessed(MLP_CE, lambda v, key: jax.lax.stop_gradient(v),
                                   defense="planted-mask")
    raised = obfuscation.flags(_table(masked, params, x, y),
                               obfuscation.probe(masked, params, x, y, key=KEY), n=N_TEST)
    names = {line.split(":")[0] for line in raised}
    assert {"zero-gradient", "black-box", "unbounded"} <= names, raised
    quiet = obfuscation.flags(_table(MLP_CE, params, x, y),
                              obfuscation.probe(MLP_CE, params, x, y, key=KEY), n=N_TEST)
    assert quiet == []
    randomized = obfuscation.probe(defenses.build("randomize", MLP_CE), params, x, y, key=KEY)
    assert randomized["varies_frac"] > 0


def test_flags_see_accuracy_growing_with_eps():
    acc = {("pgd", 0.1): 0.2, ("pgd", 0.2): 0.5, ("fgsm", 0.1): 0.3, ("fgsm", 0.2): 0.1}
    raised = obfuscation.flags(acc, None, n=1000)
    assert len(raised) == 1 and raised[0].startswith("not-monotone: pgd")


# --- adversarial training -----------------------------------------------------------------------


def test_adversarial_training_raises_pgd_robustness(trained_mlp_ce, mnist):
    params, x, y, _ = trained_mlp_ce
    xs, ys = mnist.x_train[:N_TRAIN], mnist.y_train[:N_TRAIN]
    adv = defenses.adv_fit("mlp-ce", TrainConfig(hidden=HIDDEN, epochs=10), xs, ys, eps=0.1,
                           steps=3)

    def robust(p):
        return _acc(MLP_CE, p, evasion.pgd(MLP_CE, p, x, y, eps=0.1, key=KEY, steps=10), y)

    assert robust(adv) > robust(params) + 0.15
    assert _acc(MLP_CE, adv, x, y) > 0.6


def test_adversarial_training_of_the_per_sample_rule_runs(mnist):
    adv = defenses.adv_fit("seed-mlp", TrainConfig(hidden=16, epochs=1), mnist.x_train[:300],
                           mnist.y_train[:300], eps=0.1, steps=2)
    assert set(adv) == {"wih", "who"} and all(bool(jnp.all(jnp.isfinite(v)))
                                               for v in adv.values())


def test_perturb_none_leaves_minibatch_training_unchanged(mnist):
    from mlshift_jax.models.train import train_minibatch

    x, y = jnp.asarray(mnist.x_train[:256]), jnp.asarray(mnist.y_train[:256])
    p0 = MLP_CE.init(KEY, n_hidden=8)
    a = train_minibatch(KEY, p0, x, y, model=MLP_CE, epochs=1)
    b = train_minibatch(KEY, p0, x, y, model=MLP_CE, epochs=1, perturb=None)
    jax.tree.map(np.testing.assert_array_equal, a, b)


# --- the matrix block, the runner cell, the report section ---------------------------------------

DEFENSE_TOML = """
[matrix]
datasets = ["mnist"]
models = ["mlp-ce"]
attacks = ["none"]
eps = [0.1]
hidden = 16
n_train = 500
n_test = 100

[timing]
rounds = 1
max_seconds = 1.0

[train.mlp-ce]
epochs = 1

[defenses]
models = ["mlp-ce"]
defenses = ["none", "quantize"]
eps = [0.1, 0.3]
n_test = 100
steps = 2
restarts = 1
samples = 2
queries = 10
adv_steps = 1
probe_n = 50
"""


@pytest.mark.slow
def test_defense_cells_land_in_records_and_tables(tmp_path):
    path = tmp_path / "d.toml"
    path.write_text(DEFENSE_TOML)
    mx = matrix.load(path)
    ids = [c.id for c in matrix.cells(mx) if c.kind == "defense"]
    assert ids == ["defense/mnist/mlp-ce/none/seed0", "defense/mnist/mlp-ce/quantize/seed0"]
    records = runner.run(path, out_dir=tmp_path / "out", only="defense/")
    q = records.set_index("defense").loc["quantize"]
    assert "zero-gradient" in q["flags"]
    cols = {r["column"] for r in q["detail"]["rows"]}
    assert cols == set(defenses_exp.DEFENSE_COLUMNS) | {"worst"}
    for eps in (0.1, 0.3):  # the worst case per image: at most every column, AutoAttack too
        acc = {r["column"]: r["accuracy"] for r in q["detail"]["rows"] if r["eps"] == eps}
        assert acc["worst"] <= min(v for c, v in acc.items() if c != "worst")
    assert set(q["detail"]["autoattack"]["0.1"]) >= {"apgd-ce", "apgd-t", "square", "robust"}
    text = report.tables_markdown(records)
    assert "## Defenses" in text and "bpda-pgd" in text and "### Verdicts" in text
    # the note explains the columns the table has, each once
    tables = text.count("Robust accuracy on the first")  # one table per eps
    for title in ("Square: gradient-free", "AutoAttack: APGD-CE", "transfer: PGD", "worst: "):
        assert text.count(title) == tables == 2


def test_bad_defense_block_names_the_key(tmp_path):
    bad = DEFENSE_TOML.replace('defenses = ["none", "quantize"]', 'defenses = ["magic"]')
    with pytest.raises(ConfigError, match=r"\[defenses\]\.defenses"):
        matrix.parse(bad, "bad.toml")


# --- the command line ---------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_train_adv_and_attack_defense_with_flags(capsys):
    import json

    from mlshift_jax.cli import main

    code = main(["train", "--model", "mlp-ce", "--hidden", "16", "--train-size", "500",
                 "--epochs", "1", "--defense", "adv-train", "--eps", "0.1", "--steps", "2",
                 "--format", "json"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)
    assert result["defense"] == "adv-train" and 0 <= result["pgd40_accuracy"] <= 1
    code = main(["attack", "--model", "mlp-ce", "--hidden", "16", "--epochs", "1",
                 "--defense", "quantize", "--attack", "fgsm", "square", "--eps", "0.3",
                 "--n", "100", "--rounds", "1", "--steps", "3"])
    out = capsys.readouterr().out
    assert code == 0 and "zero-gradient" in out and "flags (mlp-ce+quantize)" in out
    assert main(["train", "--defense", "quantize"]) == 2
    assert main(["attack", "--model", "mlp-ce", "--defense", "magic"]) == 2


def test_cli_adv_train_records_defense_eps_and_resolved_epochs(tmp_path, capsys):
    """train --defense adv-train without --epochs trains twice the recipe's epochs (the
    README's rule) and writes the defense, its eps and the resolved epochs to the weights."""
    import json

    from mlshift_jax.attacks.defenses import ADV_EPOCH_FACTOR
    from mlshift_jax.cli import main
    from mlshift_jax.models.registry import get_recipe, load_model

    path = tmp_path / "adv.safetensors"
    code = main(["train", "--model", "mlp-ce", "--hidden", "8", "--train-size", "200",
                 "--defense", "adv-train", "--eps", "0.1", "--steps", "1", "--save",
                 str(path), "--format", "json"])
    assert code == 0
    epochs = ADV_EPOCH_FACTOR * int(get_recipe("mlp-ce").defaults["epochs"])
    assert json.loads(capsys.readouterr().out)["epochs"] == epochs
    meta = load_model(str(path))[2]
    assert meta["defense"] == {"name": "adv-train", "eps": 0.1, "steps": 1, "warmup": 0.0,
                               "epochs": epochs}
    assert meta["train"]["epochs"] == epochs


@pytest.mark.slow
def test_cli_attack_queries_and_loss_options(capsys):
    from mlshift_jax.cli import main

    base = ["attack", "--model", "mlp-ce", "--hidden", "8", "--epochs", "1", "--train-size",
            "200", "--n", "20", "--rounds", "1", "--eps", "0.1"]
    assert main([*base, "--attack", "square", "--queries", "0"]) == 2
    assert main([*base, "--attack", "fgsm", "--loss", "mse"]) == 2
    assert main([*base, "--attack", "fgsm", "--eps", "nan"]) == 2
    assert main([*base, "--attack", "fgsm-targeted", "--target", "10"]) == 2
    capsys.readouterr()
    assert main([*base, "--attack", "fgsm", "autoattack", "--queries", "20", "--steps", "5",
                 "--loss", "train", "--format", "json"]) == 0
    assert "autoattack" in capsys.readouterr().out
