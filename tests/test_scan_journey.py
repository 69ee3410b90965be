"""A new user's journey through the detection commands: poison --save writes the poisoned
training set and scan-data scans it (or refuses to guess), and says which data it scanned;
a null trained and scanned group by group (bounded memory, progress lines) equals the one-jit
population; few classes make scan-model "inconclusive"; bad inputs are one line, rc 2."""

import json

import jax
import numpy as np
import pytest

from mlshift_jax.cli import main, poisoned_data_path
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.data import datasets
from mlshift_jax.detection import neural_cleanse as nc
from mlshift_jax.detection.benign import train_chunk
from mlshift_jax.detection.scan import NullConfig, min_null, weak_classes
from mlshift_jax.models import weights
from mlshift_jax.models.population import plan_for
from mlshift_jax.models.recipes import TrainConfig
from mlshift_jax.models.retrain import train_sampled
from mlshift_jax.poisoning.poison import make_config


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def poisoned_run(tmp_path_factory):
    """poison --save on 2,000 images: 5% mixture (patch -> 3) (weights, data, result)."""
    folder = tmp_path_factory.mktemp("journey")
    path = folder / "poisoned.safetensors"
    code = main(["poison", "--kind", "mixture", "--fraction", "0.05", "--target", "3",
                 "--hidden", "16", "--train-size", "2000", "--save", str(path),
                 "--format", "json"])
    assert code == 0
    return path, poisoned_data_path(str(path))



def test_poison_save_writes_the_poisoned_training_set(poisoned_run, mnist, capsys):
    path, data = poisoned_run
    assert data.name == "poisoned.train.npz" and data.is_file()
    ds = datasets.load(str(data), scale=mnist.input_range)  # scan-data loads it so
    assert len(ds.y_train) == 2000 and len(ds.y_test) == len(mnist.y_test)
    _, meta = weights.load(str(path))
    assert meta["poisoned_data"]["file"] == data.name  # a name, never a path to follow
    changed = np.any(np.abs(ds.x_train - mnist.x_train[:2000]) > 1e-6, axis=1)
    relabelled = ds.y_train != mnist.y_train[:2000]
    # every poisoned image carries the trigger and the target label, the others are untouched
    eligible = int(np.sum(mnist.y_train[:2000] != 3))  # a mixture poisons other classes
    assert changed.sum() == round(0.05 * eligible) and np.all(ds.y_train[changed] == 3)
    assert np.array_equal(relabelled, changed & (mnist.y_train[:2000] != 3))
    assert np.allclose(ds.x_test, mnist.x_test, atol=1e-6)


def test_scan_data_scans_the_saved_poisoned_set_and_says_so(poisoned_run, capsys):
    path, data = poisoned_run
    code, out, err = run_cli(capsys, "scan-data", "--params", str(path), "--method",
                             "spectre", "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert result["dataset_source"] == f"npz:{data.absolute()}" and result["n"] == 2000
    assert "the poisoned training set poison --save wrote" in err
    code, out, err = run_cli(capsys, "scan-data", "--params", str(path), "--method",
                             "spectre", "--top", "2")
    assert code == 0 and "scanned: the first 2,000 training images of poisoned.train" in out


def test_scan_data_refuses_to_guess_when_the_poisoned_set_is_missing(poisoned_run, capsys,
                                                                     tmp_path):
    path, data = poisoned_run
    params, meta = weights.load(str(path))
    # a path in the metadata is never followed: only the set beside the weights is looked at
    meta = {**meta, "poisoned_data": {"file": data.name, "path": str(data.absolute())}}
    moved = tmp_path / "moved.safetensors"
    weights.save(moved, params, meta)
    code, out, err = run_cli(capsys, "scan-data", "--params", str(moved))
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "trained on poisoned data" in err and "--dataset" in err
    assert "moved.train.npz" in err


@pytest.mark.slow
def test_a_grouped_null_trains_and_scans_as_the_one_jit_population(mnist):
    plan = plan_for("seed-mlp", TrainConfig(hidden=8), mnist.spec)
    seeds = [11, 12, 13]
    configs = [make_config("clean")] * 3
    x, y = mnist.x_train[:600], mnist.y_train[:600]
    whole, _ = train_sampled(plan, configs, x, y, seeds=seeds, size=300)
    lines = []
    grouped, _ = train_sampled(plan, configs, x, y, seeds=seeds, size=300, chunk=2,
                               progress=lambda d, m, s: lines.append((d, m)))
    assert lines == [(2, 3), (3, 3)]
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(grouped.params),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    cfg = nc.ScanConfig(steps=10, batch=32)
    xs, ys = mnist.x_test[:64], mnist.y_test[:64]
    key = jax.random.key(0)
    one = nc.scan_population(plan.arch, whole.params, xs, ys, key=key, config=cfg)
    done = []
    parts = nc.scan_in_groups(plan.arch, whole.params, xs, ys, key=key, config=cfg, group=2,
                              progress=lambda d, m, s: done.append(d))
    assert done == [2, 3]
    np.testing.assert_allclose(parts.norms, np.asarray(one.norms), rtol=1e-4, atol=1e-4)


def test_train_chunk_bounds_the_working_set():
    assert train_chunk(20, 60_000, 784) == 2  # 376 MB a model under the 800 MiB budget
    assert train_chunk(20, 1000, 784) == 20
    assert train_chunk(5, 10**7, 784) == 1


def test_few_classes_are_inconclusive_not_clean():
    verdict = {"verdict": "clean", "target": None}
    weak = weak_classes(verdict, 4)
    assert weak["verdict"] == "inconclusive" and weak["target"] is None
    assert "4 classes" in weak["note"] and "'clean'" in weak["note"]
    assert weak_classes(verdict, 10) == {}


def test_an_alpha_the_null_cannot_reach_is_refused_with_the_size_it_needs(capsys, tmp_path):
    assert min_null(0.05) >= 20 and min_null(0.01) >= 100
    with pytest.raises(ConfigError, match=f"at least {min_null(0.01)} models"):
        NullConfig(n_null=20, alpha=0.01).validate()
    for tiny in (2, 3, 4):  # too small for alpha and for the folds: the size alpha needs first
        with pytest.raises(ConfigError, match=f"at least {min_null(0.05)} models"):
            NullConfig(n_null=tiny).validate()
    path = tmp_path / "m.npz"
    assert main(["train", "--hidden", "8", "--train-size", "300", "--save", str(path)]) == 0
    capsys.readouterr()
    code, _, err = run_cli(capsys, "scan-model", "--params", str(path), "--alpha", "0.01",
                           "--null-models", "20")
    assert code == 2 and err.count("\n") == 1 and f"at least {min_null(0.01)}" in err, err


def test_detect_refuses_a_suspect_of_another_architecture_in_one_line(capsys, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert main(["train", "--hidden", "8", "--train-size", "300", "--save", str(a)]) == 0
    assert main(["train", "--hidden", "16", "--train-size", "300", "--save", str(b)]) == 0
    capsys.readouterr()
    code, out, err = run_cli(capsys, "detect", "--reference", str(a), "--suspect", str(b))
    assert code == 2 and out == "" and err.count("\n") == 1 and "suspect" in err, err
