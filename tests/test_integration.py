"""Issue 11, end to end: a flax linen and an equinox model, on a 784-pixel (28x28x1) and an
8x8x3 dataset, each through train -> --save -> attack -> poison --save -> detect, from the
shell (`cli.main`) and the Python API, and through a two-cell `bench` matrix.

The models live in a module written to tmp_path and imported by ref ("mod:attr"); the data
are small keras-style .npz files made here (a bright block per class, so the models learn).
Sizes are tiny: a few hundred images, a few epochs, a null of 4 retrains.
"""

from __future__ import annotations

import json
import sys
import textwrap
import uuid

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("equinox")

import mlshift_jax as ms  # noqa: E402
from mlshift_jax import cli  # noqa: E402
from mlshift_jax.models import registry, weights  # noqa: E402

USER_MODULE = """
import math

import equinox as eqx
import flax.linen as nn


class Net(nn.Module):                        # [batch, H, W, C] -> logits
    n_classes: int = 4

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
        return nn.Dense(self.n_classes)(x.reshape(x.shape[0], -1))


net = Net()


class Mlp(eqx.Module):                       # ONE image [H, W, C] -> logits
    mlp: eqx.nn.MLP

    def __call__(self, x):
        return self.mlp(x.reshape(-1))


def mlp(key, input_shape, n_classes):
    return Mlp(eqx.nn.MLP(math.prod(input_shape), n_classes, 16, 1, key=key))
"""

SHAPES = {"rgb": (8, 8, 3), "digits": (28, 28)}  # 8x8x3 and 784 pixels (28x28x1)


def write_npz(path, shape, n_classes=4, n_train=256, n_test=64, seed=0):
    """A keras-style .npz: uint8 noise with a bright band of rows whose place is the class."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, n_classes, n)
        x = rng.integers(0, 60, (n, *shape)).astype(np.uint8)
        band = shape[0] // n_classes
        for c in range(n_classes):
            x[y == c, c * band:(c + 1) * band] = 250
        return x, y.astype(np.int64)

    (x_tr, y_tr), (x_te, y_te) = make(n_train), make(n_test)
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """The models' module in tmp_path, the working folder (the CLI imports refs from it)."""
    name = f"integ_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    yield name
    sys.modules.pop(name, None)


def run_cli(capsys, *argv) -> dict | list:
    """cli.main(argv + --format json): exit 0, its JSON."""
    capsys.readouterr()
    code = cli.main([*argv, "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


CASES = [("net", "rgb"), ("mlp", "digits")]  # the API test takes the other two pairs


@pytest.mark.slow
@pytest.mark.parametrize("attr,data", CASES)
def test_shell_chain_train_attack_poison_detect(user_module, tmp_path, capsys, attr, data):
    write_npz(tmp_path / f"{data}.npz", SHAPES[data])
    ref, ds = f"{user_module}:{attr}", f"{data}.npz"
    train = run_cli(capsys, "train", "--model", ref, "--dataset", ds, "--epochs", "3",
                    "--save", "clean.safetensors")
    assert train["model"] == ref and train["accuracy"] > 0.25 and train["saved"]
    _, meta = weights.load("clean.safetensors")
    assert meta["model"]["ref"] == ref and meta["poison"] is None
    assert meta["input_shape"] == list((*SHAPES[data], 1)[:3])
    # attack the saved file: the dataset from the metadata, then named explicitly
    rows = run_cli(capsys, "attack", "--params", "clean.safetensors", "--model", ref,
                   "--attack", "fgsm", "--eps", "0", "0.3", "--rounds", "1")["rows"]
    assert [r["eps"] for r in rows] == [0.0, 0.3]
    assert rows[0]["accuracy"] == pytest.approx(train["accuracy"], abs=1e-6)
    assert rows[1]["accuracy"] < rows[0]["accuracy"]
    again = run_cli(capsys, "attack", "--params", "clean.safetensors", "--dataset", ds,
                    "--model", ref, "--attack", "noise-sign", "--eps", "0.1",
                    "--rounds", "1")["rows"]
    assert again[0]["attack"] == "noise-sign"
    poisoned = run_cli(capsys, "poison", "--model", ref, "--dataset", ds, "--epochs", "3",
                       "--kind", "mixture", "--fraction", "0.2", "--patch", "2",
                       "--target", "3", "--save", "suspect.safetensors")
    assert poisoned["model"] == ref and poisoned["poisoned_count"] > 0
    assert "hidden" not in poisoned  # a user model has its own widths
    assert poisoned["params_finite"] and poisoned["saved"] == "suspect.safetensors"
    model, params, meta = registry.load_model("suspect.safetensors", model=ref)
    assert model.name == ref and meta["poison"]["target"] == 3
    assert meta["poison"]["fraction"] == pytest.approx(0.2)
    result = run_cli(capsys, "detect", "--reference", "clean.safetensors", "--suspect",
                     "suspect.safetensors", "--model", ref, "--dataset", ds,
                     "--sample-size", "128",
                     "--null-models", "4", "--alpha", "0.2")
    assert result["verdict"] in ("changed", "unchanged")
    assert result["architecture"] == ref and 0 < result["p_value"] <= 1
    assert result["calibration"]["n_null"] == 4
    assert result["calibration"]["sample_size"] == 128


@pytest.mark.slow
def test_detect_refuses_models_of_different_kinds(user_module, tmp_path, capsys):
    write_npz(tmp_path / "rgb.npz", SHAPES["rgb"])
    for attr in ("net", "mlp"):
        assert cli.main(["train", "--model", f"{user_module}:{attr}", "--dataset", "rgb.npz",
                         "--epochs", "1", "--save", f"{attr}.safetensors"]) == 0
    capsys.readouterr()
    code = cli.main(["detect", "--reference", "net.safetensors", "--suspect",
                     "mlp.safetensors", "--model", f"{user_module}:net", "--null-models", "4"])
    assert code == 2 and f"its model is '{user_module}:mlp', not" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("attr,data", [("net", "digits"), ("mlp", "rgb")])
def test_python_api_chain(user_module, tmp_path, attr, data):
    from mlshift_jax.bench.sweeps import poison_one
    from mlshift_jax.detection.change import CalibrationConfig, detect_pair
    from mlshift_jax.models.recipes import TrainConfig
    from mlshift_jax.models.registry import get_recipe

    write_npz(tmp_path / f"{data}.npz", SHAPES[data])
    ref = f"{user_module}:{attr}"
    ds = ms.load_dataset(f"{data}.npz")
    recipe = get_recipe(ref)
    cfg = TrainConfig(epochs=3)
    model, params = ms.fit(ref, ds, epochs=3)
    x_adv = ms.attack("fgsm", model, params, ds.x_test, ds.y_test, eps=0.3)
    assert ms.evaluate(model, params, x_adv, ds.y_test)["accuracy"] < \
        ms.evaluate(model, params, ds.x_test, ds.y_test)["accuracy"]
    ms.save_weights("clean.safetensors", params, ms.metadata(model, dataset=ds, train=cfg))
    result = poison_one(ds, kind="mixture", fraction=0.2, patch=2, target=3, model=ref,
                        epochs=3, keep_params=True)
    suspect = result["params"]
    assert type(suspect) is type(params)
    ms.save_weights("suspect.safetensors", suspect, ms.metadata(model, dataset=ds))
    loaded, reference, _ = registry.load_model("clean.safetensors", model=ref)
    assert loaded is recipe.build(ds.spec, cfg)  # the same cached Model
    out = detect_pair(reference, suspect, ds, model=loaded, train=cfg,
                      config=CalibrationConfig(n_null=4, sample_size=128), alpha=0.2)
    assert out["architecture"] == ref and out["verdict"] in ("changed", "unchanged")


@pytest.mark.slow
def test_a_population_of_user_models_is_one_vmap_of_the_user_trainer(user_module, tmp_path):
    import jax

    from mlshift_jax.models import population, recipes, usermodels
    from mlshift_jax.poisoning.poison import make_config

    write_npz(tmp_path / "rgb.npz", SHAPES["rgb"])
    ds = ms.load_dataset("rgb.npz")
    ref = f"{user_module}:net"
    pop = population.train_poisoned(ref, [make_config("clean")] * 2, ds.x_train, ds.y_train,
                                    train=recipes.TrainConfig(epochs=2), seeds=[0, 1],
                                    spec=ds.spec)
    model = registry.model_for(ref, ds.spec)
    for i, seed in enumerate((0, 1)):  # member i == usermodels.fit with that seed
        alone = usermodels.fit(model, recipes.TrainConfig(epochs=2, seed=seed),
                               ds.x_train, ds.y_train)
        member = population.member(pop.params, i)
        assert jax.tree.structure(member) == jax.tree.structure(alone)
        for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(alone), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_two_cell_bench_matrix_with_a_flax_model(user_module, tmp_path):
    from mlshift_jax.bench import matrix, report, runner
    from mlshift_jax.core.errors import ConfigError

    write_npz(tmp_path / "tiny-rgb.npz", SHAPES["rgb"])
    ref = f"{user_module}:net"
    (tmp_path / "m.toml").write_text(
        f'[matrix]\ndatasets = ["rgb"]\nmodels = ["{ref}"]\nattacks = ["none", "fgsm"]\n'
        f'eps = [0.1]\n\n[datasets.rgb]\npath = "tiny-rgb.npz"\n\n[train."{ref}"]\n'
        'epochs = 2\n\n[timing]\nrounds = 1\nmax_seconds = 1.0\n')
    with pytest.raises(ConfigError, match="never imported"):  # the matrix alone: refused
        matrix.load(tmp_path / "m.toml")
    allow = (ref,)  # named by the user (bench --model REF)
    assert len(matrix.cells(matrix.load(tmp_path / "m.toml", allow_code=allow))) == 2
    records = runner.run(tmp_path / "m.toml", out_dir=tmp_path / "out", allow_code=allow)
    assert len(records) == 2 and set(records["model"]) == {ref}
    assert set(records["dataset"]) == {"rgb"} and (records["accuracy"] >= 0).all()
    paths = report.write(records, tmp_path / "out")
    assert paths and ref in (tmp_path / "out" / "tables.md").read_text()
    again = runner.run(tmp_path / "m.toml", out_dir=tmp_path / "out",  # params from cache
                       allow_code=allow)
    assert set(again["status"]) == {"reused"}


def test_matrix_models_take_refs_and_name_bad_ones(user_module):
    from mlshift_jax.bench import matrix
    from mlshift_jax.core.errors import ConfigError

    base = '[matrix]\ndatasets = ["mnist"]\nattacks = ["none"]\neps = [0.1]\nmodels = '
    ref = f"{user_module}:net"
    allow = (ref, "no_such_pkg_xyz:net")  # the references the user names (bench --model)
    assert matrix.parse(base + f'["{ref}", "cnn"]', allow_code=allow).models == (ref, "cnn")
    for bad, match in (('["pkg.mod:"]', "unknown model"), ('["no-such"]', "unknown model"),
                       ('["a b:c"]', "unknown model"),
                       ('["no_such_pkg_xyz:net"]', "no module named"),
                       (f'["{ref}"]', "never imported")):
        with pytest.raises(ConfigError, match=match):
            matrix.parse(base + bad, allow_code=allow if "never" not in match else ())
