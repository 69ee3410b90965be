"""Datasets of any image size, channel count and number of classes, through every part of
the harness: load, train, attack, poison, detect, a matrix in `bench`. The tests make their
own small datasets (keras.datasets-style .npz, IDX folders, CSVs) in tmp_path."""

from __future__ import annotations

import gzip
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.attacks import ATTACKS, evasion
from mlshift_jax.core.errors import ConfigError, DataError
from mlshift_jax.data import datasets
from mlshift_jax.models import zoo
from mlshift_jax.models.metrics import evaluate
from mlshift_jax.models.recipes import TrainConfig
from mlshift_jax.models.registry import fit_model, model_for
from mlshift_jax.poisoning import poison

KEY = jax.random.key(0)


def synthetic(shape, k, n_train=600, n_test=200, seed=0):
    """uint8 images [n, *shape] whose class c lights one horizontal band (and, with colour,
    one channel), plus noise: learnable by a small MLP in one epoch."""
    rng = np.random.default_rng(seed)
    h = shape[0]
    out = []
    for n in (n_train, n_test):
        y = rng.integers(0, k, n)
        x = rng.integers(0, 60, (n, *shape)).astype(np.int32)
        band = (np.arange(h)[None, :] * k // h) == y[:, None]  # [n, h]
        lit = band[:, :, None] if len(shape) == 2 else band[:, :, None, None]
        if len(shape) == 3:
            chan = (np.arange(shape[2])[None, :] == (y % shape[2])[:, None])[:, None, None, :]
            lit = lit & chan
        x = np.where(lit, 200 + x, x)
        out += [x.astype(np.uint8), y.astype(np.int64)]
    return out


def write_npz(path, shape, k, **kw):
    x_train, y_train, x_test, y_test = synthetic(shape, k, **kw)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    """8x8 RGB images, 5 classes."""
    path = write_npz(tmp_path_factory.mktemp("colour") / "tiny-rgb.npz", (8, 8, 3), 5)
    return datasets.load(path)


@pytest.fixture(scope="module")
def grey784(tmp_path_factory):
    """28x28 grey images (784 pixels), 10 classes, in [0, 1]."""
    path = write_npz(tmp_path_factory.mktemp("grey") / "grey.npz", (28, 28), 10)
    return datasets.load(path)


# --- loading ----------------------------------------------------------------------------------


def test_npz_dataset_knows_its_shape_classes_and_range(colour, grey784):
    assert colour.name == "tiny-rgb" and colour.source.startswith("npz:")
    assert colour.image_shape == (8, 8, 3) and colour.n_classes == 5
    assert colour.x_train.shape == (600, 192) and colour.x_train.dtype == np.float32
    assert colour.input_range == (0.0, 1.0)
    assert colour.x_train.min() >= 0.0 and colour.x_train.max() <= 1.0
    assert colour.spec == zoo.Spec((8, 8, 3), 5, (0.0, 1.0))
    assert grey784.image_shape == (28, 28, 1) and grey784.x_train.shape[1] == 784
    assert datasets.content_hash(colour) != datasets.content_hash(grey784)


def test_scale_is_the_datasets_and_overridable(tmp_path):
    path = write_npz(tmp_path / "d.npz", (6, 6), 3, n_train=20, n_test=10)
    study = datasets.load(path, scale="study")
    assert study.input_range == (0.01, 1.0) and study.x_train.min() >= np.float32(0.01)
    wide = datasets.load(path, scale=(-1.0, 1.0))
    raw = np.load(path)["x_train"].reshape(20, -1)
    np.testing.assert_allclose(wide.x_train, raw / 255.0 * 2.0 - 1.0, atol=1e-6)
    with pytest.raises(ConfigError, match="scale"):
        datasets.load(path, scale="zscore")


def test_labels_are_checked_against_k(tmp_path):
    x_train, y_train, x_test, y_test = synthetic((4, 4), 3, n_train=10, n_test=5)
    y_test[2] = 7
    np.savez(tmp_path / "bad.npz", x_train=x_train, y_train=y_train, x_test=x_test,
             y_test=y_test)
    assert datasets.load(tmp_path / "bad.npz").n_classes == 8  # K read off the labels
    with pytest.raises(DataError, match=r"expected labels 0..2, found 7 \(sample 2\)"):
        datasets.load(tmp_path / "bad.npz", n_classes=3)


def test_bad_npz_files_say_what_they_lack(tmp_path):
    np.savez(tmp_path / "half.npz", x_train=np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(DataError, match="missing y_train, x_test, y_test"):
        datasets.load(tmp_path / "half.npz")
    np.savez(tmp_path / "obj.npz", x_train=np.array([{"a": 1}], object), y_train=[0],
             x_test=[0], y_test=[0])
    with pytest.raises(DataError, match="obj.npz"):
        datasets.load(tmp_path / "obj.npz")
    np.savez(tmp_path / "float.npz", x_train=np.zeros((3, 4, 4)), y_train=np.zeros(3, int),
             x_test=np.zeros((3, 4, 4)), y_test=np.zeros(3, int))
    with pytest.raises(DataError, match="expected uint8 images"):
        datasets.load(tmp_path / "float.npz")
    with pytest.raises(DataError, match="found nothing"):
        datasets.load(tmp_path / "absent.npz")


def _idx(a: np.ndarray) -> bytes:
    magic = {1: 2049, 3: 2051, 4: 2052}[a.ndim]
    return struct.pack(f">{1 + a.ndim}I", magic, *a.shape) + a.astype(np.uint8).tobytes()


def test_idx_folder_of_any_image_size(tmp_path):
    x_train, y_train, x_test, y_test = synthetic((12, 10), 4, n_train=30, n_test=10)
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    folder = tmp_path / "digits12x10"
    folder.mkdir()
    for name, a in zip(names, (x_train, y_train, x_test, y_test), strict=True):
        (folder / (name + ".gz")).write_bytes(gzip.compress(_idx(a)))
    ds = datasets.load(folder)
    assert ds.name == "digits12x10" and ds.image_shape == (12, 10, 1) and ds.n_classes == 4
    assert ds.x_test.shape == (10, 120)


def _csv(path, x, y):
    rows = [",".join(map(str, [int(lab), *img.ravel().tolist()]))
            for img, lab in zip(x, y, strict=True)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_csvs_of_any_name_and_shape(tmp_path):
    x_train, y_train, x_test, y_test = synthetic((4, 6, 2), 3, n_train=20, n_test=8)
    train = _csv(tmp_path / "my-train.csv", x_train, y_train)
    test = _csv(tmp_path / "my-test.csv", x_test, y_test)
    with pytest.raises(DataError, match="no square image.*image_shape"):
        datasets.load(train_csv=train, test_csv=test)  # 48 pixels: not square
    ds = datasets.load(train_csv=train, test_csv=test, image_shape=(4, 6, 2))
    assert ds.image_shape == (4, 6, 2) and ds.n_classes == 3 and ds.name == "my-train"
    np.testing.assert_allclose(ds.x_train[0], x_train[0].ravel() / 255.0, atol=1e-6)
    folder = tmp_path / "sq"
    folder.mkdir()
    xs, ys, xt, yt = synthetic((5, 5), 2, n_train=10, n_test=4)
    _csv(folder / "train.csv", xs, ys)
    _csv(folder / "test.csv", xt, yt)
    sq = datasets.load(folder)
    assert sq.image_shape == (5, 5, 1) and sq.name == "sq"


# --- models -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(zoo.BUILTINS))
def test_builtins_are_built_per_spec_and_cached(colour, name):
    model = zoo.build(name, colour.spec, 16)
    assert model is zoo.build(name, colour, 16)  # the same object: one jit cache entry
    assert model.input_shape == (8, 8, 3) and model.n_classes == 5
    params = model.init(KEY, unknown_option=1)  # extra keywords are ignored
    x = jnp.asarray(colour.x_test[:4])
    assert zoo.predict(model, params, x).shape == (4, 5)
    assert model.features(params, x[0]).shape == (16,)
    assert zoo.infer_model(params, colour.spec) is model
    with pytest.raises(ConfigError, match="do not fit"):
        zoo.infer_model(params, zoo.STUDY_SPEC)


def test_the_cnn_reads_its_images_in_hwc_order():
    """On the study's MNIST the per-spec CNN is the one of before (x.reshape(1, 28, 28))."""
    model = zoo.build("cnn", zoo.STUDY_SPEC, 8)
    params = model.init(KEY)
    x = jax.random.uniform(KEY, (784,))
    old = zoo._conv(x.reshape(1, 28, 28), params["c1"], params["cb1"])
    new = zoo._conv(x.reshape(28, 28, 1).transpose(2, 0, 1), params["c1"], params["cb1"])
    np.testing.assert_array_equal(old, new)


# --- train -> attack -> poison -> detect ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["colour", "grey784"])
def test_train_attack_poison_detect(request, fixture):
    ds = request.getfixturevalue(fixture)
    cfg = TrainConfig(hidden=32, epochs=2)
    model, params = fit_model("mlp-ce", cfg, ds.x_train, ds.y_train, ds)
    assert model is model_for("mlp-ce", ds, cfg)
    clean = evaluate(model, params, ds.x_test, ds.y_test)
    assert clean["accuracy"] > 0.8, clean
    x, y = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
    x_adv = evasion.fgsm(model, params, x, y, eps=0.3)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0  # the dataset's range
    assert evaluate(model, params, x_adv, y)["accuracy"] < clean["accuracy"]

    config = poison.Mixture(fraction=0.3, patch=poison.Patch(size=3), target=1)
    xp, yp, mask = poison.apply(KEY, ds.x_train, ds.y_train, config, ds)
    assert int(mask.sum()) == poison.poison_count(config, ds.y_train, ds.n_classes)
    _, backdoored = fit_model("mlp-ce", cfg, np.asarray(xp), np.asarray(yp), ds)
    triggered = poison.apply_trigger(x, config.patch, spec=ds)
    pred = jnp.argmax(zoo.predict(model, backdoored, triggered), -1)
    asr = float(jnp.mean(pred[y != 1] == 1))
    assert asr > 0.5, asr  # a backdoor, learnt from 600 images

    from mlshift_jax.detection.change import CalibrationConfig, detect_pair

    small = CalibrationConfig(n_null=4, sample_size=300, poisonings=(("mixture", 0.2),),
                              poison_seeds=1, attacks=(("fgsm", 0.1), ("noise-sign", 0.1)),
                              probes=100, n_patched=20)
    to_np = {k: np.asarray(v) for k, v in backdoored.items()}
    ref_np = {k: np.asarray(v) for k, v in params.items()}
    result = detect_pair(ref_np, to_np, ds, config=small, cache=False, alpha=0.2)
    assert result["architecture"] == "mlp-ce" and result["verdict"] in ("changed", "unchanged")
    assert 0.0 <= result["p_value"] <= 1.0


@pytest.mark.slow
def test_attacks_clip_to_the_datasets_own_range(tmp_path):
    ds = datasets.load(write_npz(tmp_path / "wide.npz", (6, 6), 3, n_train=40, n_test=20),
                   scale=(-1.0, 1.0))
    model, params = fit_model("seed-mlp", TrainConfig(hidden=8), ds.x_train, ds.y_train, ds)
    assert model.input_range == (-1.0, 1.0)
    x, y = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
    for name, attack in ATTACKS.items():
        kw = {"key": KEY} if attack.needs_key else {}
        if attack.targeted:
            kw["target"] = 0
        if model.n_classes < attack.min_classes:  # refused in one line, never a wrong loss
            with pytest.raises(ConfigError, match=f"at least {attack.min_classes} classes"):
                attack.fn(model, params, x, y, eps=0.5, **kw)
            continue
        x_adv = np.asarray(attack.fn(model, params, x, y, eps=0.5, **kw))
        assert x_adv.min() >= -1.0 and x_adv.max() <= 1.0, name
        if name.startswith("noise"):
            assert x_adv.min() < 0.0  # not clipped to [0, 1] or [0.01, 1]
    narrow = np.asarray(evasion.fgsm(model, params, x, y, eps=0.5, lo=-0.5, hi=0.5))
    assert narrow.min() >= -0.5 and narrow.max() <= 0.5


# --- poison on small images -------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(poison.POISONINGS))
@pytest.mark.parametrize("channels", [1, 3])
def test_poison_every_kind_on_8x8_images(kind, channels):
    shape = (8, 8, channels)
    spec = zoo.Spec(shape, 5, (0.0, 1.0))
    rng = np.random.default_rng(0)
    x = rng.random((200, 64 * channels), dtype=np.float32) * 0.5
    y = rng.integers(0, 5, 200)
    config = {"clean": poison.Clean(), "wrong-label": poison.WrongLabel(0.5, target=3),
              "trigger": poison.Trigger(), "mixture": poison.Mixture(0.3),
              "blended": poison.Blended(0.3), "sparse": poison.Sparse(0.3),
              "sig": poison.Sig(0.5), "warp": poison.Warp(0.3)}[kind]
    if channels == 1:  # 64 flat pixels: the shape is guessed (square, one channel)
        xp, yp, mask = poison.apply(KEY, x, y, config)
    else:
        xp, yp, mask = poison.apply(KEY, x, y, config, spec)
    xp, yp, mask = np.asarray(xp), np.asarray(yp), np.asarray(mask)
    assert xp.shape == x.shape and ((yp >= 0) & (yp < 5)).all()
    np.testing.assert_array_equal(xp[~mask], x[~mask])
    if kind == "wrong-label":
        assert (yp[mask] != y[mask]).all() and set(np.unique(yp[mask])) <= set(range(5))
    if kind in ("trigger", "mixture"):
        img = xp[mask].reshape(-1, *shape)
        patch = config.patch
        if kind == "mixture":  # bottom-right corner, 1 pixel in, every channel
            np.testing.assert_array_equal(img[:, 3:7, 3:7, :], 1.0)
            assert (yp[mask] == 3).all()
        pix = poison.patch_pixels(patch, spec)
        assert pix.shape == (5, 64 * channels)
        assert (pix.reshape(5, 8, 8, channels).sum(-1) % channels == 0).all()  # all channels


def test_wrong_label_uniform_draws_every_other_of_k_classes():
    y = np.arange(600) % 3
    x = np.zeros((600, 16), np.float32)
    _, yp, mask = poison.apply(KEY, x, y, poison.WrongLabel(1.0, "uniform"))
    offsets = np.bincount((np.asarray(yp) - y) % 3, minlength=3)
    assert offsets[0] == 0 and (offsets[1:] > 200 * 0.8).all()
    _, yp, _ = poison.apply(KEY, x, y, poison.WrongLabel(1.0, "shift"))
    np.testing.assert_array_equal(np.asarray(yp), (y + 1) % 3)


def test_poison_errors_are_config_errors_not_broadcasting_errors():
    x, y = np.zeros((10, 64), np.float32), np.arange(10) % 4
    with pytest.raises(ConfigError, match=r"expected x \[n, 49\]"):
        poison.apply(KEY, x, y, poison.WrongLabel(), zoo.Spec((7, 7, 1), 4, (0, 1)))
    with pytest.raises(ConfigError, match="size an integer in 1..8"):
        poison.apply(KEY, x, y, poison.Trigger(patch=poison.Patch(size=9)))
    with pytest.raises(ConfigError, match="target to be a class 0..3, found 5"):
        poison.apply(KEY, x, y, poison.Mixture(target=5), zoo.Spec((8, 8, 1), 4, (0, 1)))
    with pytest.raises(ConfigError, match="no square image"):
        poison.apply(KEY, np.zeros((10, 50), np.float32), y, poison.Clean())


def test_per_class_positions_for_many_classes():
    patch = poison.Patch(size=2, position="per-class")
    spec = zoo.Spec((32, 32, 1), 20, (0.0, 1.0))
    pix = poison.patch_pixels(patch, spec)
    assert pix.shape == (20, 1024) and len({tuple(np.flatnonzero(p)) for p in pix}) == 20


# --- bench: a two-cell matrix on a dataset named by path --------------------------------------


@pytest.mark.slow
def test_two_cell_matrix_on_a_path_dataset(tmp_path, monkeypatch):
    from mlshift_jax.bench import matrix, report, runner

    write_npz(tmp_path / "tiny-rgb.npz", (8, 8, 3), 5)
    (tmp_path / "m.toml").write_text(
        '[matrix]\ndatasets = ["rgb"]\nmodels = ["seed-mlp"]\nattacks = ["none", "fgsm"]\n'
        'eps = [0.1]\nhidden = 16\n\n[datasets.rgb]\npath = "tiny-rgb.npz"\n'
        '\n[timing]\nrounds = 1\nmax_seconds = 1.0\n')
    mx = matrix.load(tmp_path / "m.toml")
    assert len(matrix.cells(mx)) == 2
    assert mx.load_kwargs("rgb")["name"] == str(tmp_path / "tiny-rgb.npz")
    records = runner.run(tmp_path / "m.toml", out_dir=tmp_path / "out")
    assert len(records) == 2 and set(records["dataset"]) == {"rgb"}
    assert (records["accuracy"] >= 0).all()
    fgsm = records[records["attack"] == "fgsm"].iloc[0]
    assert fgsm["detail"]["examples"]["shape"] == [8, 8, 3]
    paths = report.write(records, tmp_path / "out")
    assert (tmp_path / "out" / "tables.md").is_file() and paths
    again = runner.run(tmp_path / "m.toml", out_dir=tmp_path / "out")
    assert set(again["status"]) == {"reused"}


@pytest.mark.parametrize("table,match", [
    ('[datasets.x]\nfile = "a.npz"\n', "unknown key"),
    ('[datasets.x]\npath = "a.npz"\nscale = "zscore"\n', "scale"),
    ('[datasets.x]\npath = "a.npz"\nimage_shape = [8]\n', "image_shape"),
    ('[datasets.mnist]\npath = "a.npz"\n', "other than the built-ins"),
])
def test_matrix_dataset_tables_are_checked(table, match):
    from mlshift_jax.bench import matrix

    text = ('[matrix]\ndatasets = ["x"]\nmodels = ["seed-mlp"]\nattacks = ["none"]\n'
            'eps = [0.1]\n\n' + table)
    with pytest.raises(ConfigError, match=match):
        matrix.parse(text, "m.toml")


# --- the command line on a path dataset -------------------------------------------------------


@pytest.mark.slow
def test_cli_train_attack_poison_on_a_path_dataset(colour, tmp_path, capsys):
    import json

    from mlshift_jax import cli

    path = colour.source.split(":", 1)[1]

    def run(*argv):
        assert cli.main(list(argv)) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out)

    trained = run("train", "--dataset", path, "--model", "seed-mlp", "--hidden", "32",
                  "--epochs", "2", "--save", str(tmp_path / "p.npz"), "--format", "json")
    assert trained["accuracy"] > 0.5
    rows = run("attack", "--dataset", path, "--params", str(tmp_path / "p.npz"), "--attack",
               "fgsm", "--eps", "0", "0.2", "--format", "json")["rows"]
    assert rows[1]["accuracy"] < rows[0]["accuracy"] == trained["accuracy"]
    result = run("poison", "--dataset", path, "--kind", "mixture", "--fraction", "0.2",
                 "--patch", "3", "--target", "1", "--hidden", "32", "--format", "json")
    assert result["asr"] > 0.5 and result["poisoned_count"] > 0


def test_check_pair_places_weights_without_the_data(colour):
    from mlshift_jax.detection.change import check_pair

    for name in ("seed-mlp", "cnn"):
        model = zoo.build(name, colour, 8)
        a, b = model.init(KEY), model.init(jax.random.key(1))
        assert check_pair(a, b) == name  # before the data loads: names and shapes only
        assert check_pair(a, b, colour.spec) == name
    with pytest.raises(ConfigError, match="like the reference"):
        check_pair(zoo.build("seed-mlp", colour, 8).init(KEY),
                   zoo.build("mlp-ce", colour, 8).init(KEY))


@pytest.mark.slow
def test_detect_calibration_on_fewer_than_four_classes(tmp_path):
    """The calibration's poisonings aim at a class the data has (the study's target is 3)."""
    from mlshift_jax.detection import change

    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, 3, n)
        x = rng.integers(0, 40, (n, 8, 8)).astype(np.uint8)
        for i, c in enumerate(y):
            x[i, 3, :] = 255 if c == 0 else x[i, 3, :]
            x[i, :, 3] = 255 if c == 1 else x[i, :, 3]
            if c == 2:
                np.fill_diagonal(x[i], 255)
        return x, y

    (xt, yt), (xs, ys) = make(300), make(100)
    np.savez(tmp_path / "three.npz", x_train=xt, y_train=yt, x_test=xs, y_test=ys)
    ds = datasets.load(str(tmp_path / "three.npz"))
    cfg = change.CalibrationConfig(n_null=3, sample_size=200, probes=60, n_patched=10,
                                   poison_seeds=1)
    cal = change.calibrate("mlp-ce", 8, ds, cfg, cache=False)
    assert ds.n_classes == 3 and len(cal.changed_kinds) == len(cfg.poisonings)
