"""Training-data detectors (detect_data): activation clustering with Chen et al.'s decision
rules, spectral signatures' 1.5 * eps removal, SPECTRE; one compile across class sizes; a
planted BadNets mixture in a small MLP's training data; the `scan-data` command.

Synthetic activations check each rule exactly; the silhouette against scikit-learn; the
compile count through the jitted kernels' cache sizes (chex's assert_max_traces idea).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from sklearn.metrics import silhouette_score

from mlshift_jax.cli import main
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.detection import detect, detect_data, of_unit
from mlshift_jax.models.population import member, plan_for
from mlshift_jax.models.recipes import TrainConfig
from mlshift_jax.models.retrain import poisoned_sample, train_sampled
from mlshift_jax.poisoning import poison

DATA_METHODS = [d.name for d in of_unit("sample")]  # scan-data's --method choices

KERNELS = (detect_data._cluster_blocks, detect_data._spectral_blocks,
           detect_data._spectre_blocks)


def _blobs(sizes, d=12, shift=None, seed=0):
    """Gaussian activations, one block of rows per class of `sizes`; shift: {class: (rows,
    offset)} adds offset * e_3 to the first `rows` of that class. -> (h, y, planted)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
    h = rng.normal(size=(y.size, d)).astype(np.float32)
    planted = np.zeros(y.size, bool)
    for c, (rows, offset) in (shift or {}).items():
        start = int(np.sum(sizes[:c]))
        h[start:start + rows, 3] += offset
        planted[start:start + rows] = True
    return h, y, planted


def test_block_sizes_are_powers_of_two_and_a_fixed_block_is_checked():
    assert [detect_data.block_size(c) for c in (0, 1, 64, 65, 1000, 1025)] == [
        64, 64, 64, 128, 1024, 2048]
    y = np.repeat([0, 1, 2], [10, 70, 30])
    idx, valid = detect_data.class_blocks(y, block=256)
    assert idx.shape == (3, 256) and valid.sum() == y.size
    assert np.array_equal(np.sort(idx[valid]), np.arange(y.size))
    with pytest.raises(ConfigError, match="largest class"):
        detect_data.class_blocks(y, block=64)
    with pytest.raises(ConfigError, match="labels"):
        detect_data.class_blocks(y, n_classes=2)


@pytest.mark.slow
def test_detectors_compile_once_across_class_sizes():
    """Three data sets whose classes differ in size (largest 70, 100, 120 rows: one bucket),
    then two more with a fixed block: each kernel compiles once per block size."""
    before = [k._cache_size() for k in KERNELS]
    key = jax.random.key(0)
    for sizes in ([70, 50, 60, 61], [100, 20, 40, 81], [120, 30, 10, 81]):
        h, y, _ = _blobs(np.array(sizes), d=7)  # n = 241 rows each: only the blocks differ
        detect_data.activation_clustering(h, y, key=key, n_classes=4)
        detect_data.spectral_signatures(h, y, eps=0.1, n_classes=4)
        detect_data.spectre(h, y, eps=0.1, n_classes=4)
    assert [k._cache_size() - b for k, b in zip(KERNELS, before, strict=True)] == [1, 1, 1]
    for sizes in ([200, 20, 11, 10], [60, 61, 60, 60]):  # block 128 would not hold 200
        h, y, _ = _blobs(np.array(sizes), d=7)
        detect_data.activation_clustering(h, y, key=key, n_classes=4, block=256)
        detect_data.spectral_signatures(h, y, eps=0.1, n_classes=4, block=256)
        detect_data.spectre(h, y, eps=0.1, n_classes=4, block=256)
    assert [k._cache_size() - b for k, b in zip(KERNELS, before, strict=True)] == [2, 2, 2]


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.2, 0.9])
def test_removal_is_one_and_a_half_times_the_expected_poison_count(eps):
    h, y, _ = _blobs(np.array([100, 37, 250]))
    want = np.minimum(np.round(1.5 * eps * np.bincount(y)), np.bincount(y))
    assert np.array_equal(detect_data.removal_counts(y, eps), want)
    for found in (detect_data.spectral_signatures(h, y, eps=eps),
                  detect_data.spectre(h, y, eps=eps)):
        flag, score = np.asarray(found.flag), np.asarray(found.score)
        assert np.array_equal(np.bincount(y[flag], minlength=3), want)
        for c in range(3):  # the flagged are the class's highest scores
            inside = y == c
            if 0 < flag[inside].sum() < inside.sum():
                assert score[inside][flag[inside]].min() >= score[inside][~flag[inside]].max()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="eps"):
            detect_data.spectral_signatures(h, y, eps=bad)


def test_silhouette_matches_scikit_learn():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(300, 3)).astype(np.float32)
    a = (rng.random(300) < 0.3).astype(np.int32)
    z[a == 1] += 1.5
    pad = np.zeros((512, 3), np.float32)
    pad[:300] = z
    assign, w = np.zeros(512, np.int32), np.zeros(512, np.float32)
    assign[:300], w[:300] = a, 1.0
    got = float(detect_data._silhouette(pad, assign, w))
    assert got == pytest.approx(silhouette_score(z, a), abs=1e-4)
    sampled = float(detect_data._silhouette(pad, assign, w, jax.random.key(0), 256))
    assert sampled == pytest.approx(got, abs=0.03)  # 256 of the 300 rows, vs all rows
    assert float(detect_data._silhouette(pad, assign, w, jax.random.key(0), 512)) == \
        pytest.approx(got, abs=1e-5)  # a sample as large as the block: every valid row


def test_activation_clustering_decides_per_class():
    """Class 0: a distinct 15% cluster (poisoned by both rules); class 1: two distinct halves
    (the size rule says clean); class 2: one Gaussian (a 2-means split of it has a low
    silhouette in 12 dimensions). Only class 0 is judged poisoned; only its small cluster
    scores above 0.5, every sample of a clean class scores 0 (no inverted ranking from clean
    classes' small clusters)."""
    sizes = np.array([400, 400, 400])
    h, y, planted = _blobs(sizes, shift={0: (60, 10.0), 1: (200, 10.0)})
    planted[400:800] = False  # class 1's halves are both legitimate
    found = detect_data.activation_clustering(h, y, key=jax.random.key(0))
    assert np.array_equal(np.asarray(found.classes), [True, False, False])
    assert np.array_equal(np.asarray(found.flag), planted)
    score = np.asarray(found.score)
    assert np.all(score[y != 0] == 0.0)
    assert np.all(score[planted] > 0.5) and np.all(score[(y == 0) & ~planted] < 0.5)
    assert detect.roc_auc(score, planted) == 1.0
    strict = detect_data.activation_clustering(h, y, key=jax.random.key(0),
                                               silhouette_threshold=0.99)
    assert not np.asarray(strict.classes).any() and not np.asarray(strict.score).any()
    with pytest.raises(ConfigError, match="silhouette_threshold"):
        detect_data.activation_clustering(h, y, key=jax.random.key(0),
                                          silhouette_threshold=2.0)


def test_spectre_ranks_a_planted_minority_first():
    """A 20% cluster offset along one direction: SPECTRE's QUE scores rank it above the
    class (its MCD fit follows the 80% majority) and flag 1.5 * eps of the class."""
    h, y, planted = _blobs(np.array([500, 500]), shift={0: (100, 6.0)}, seed=3)
    found = detect_data.spectre(h, y, eps=0.1)
    inside = y == 0
    assert detect.roc_auc(np.asarray(found.score)[inside], planted[inside]) > 0.99
    assert np.asarray(found.flag)[planted].sum() == 75  # 1.5 * 0.1 * 500, all planted
    with pytest.raises(ConfigError, match="alpha"):
        detect_data.spectre(h, y, eps=0.1, alpha=0.0)


# --- a planted BadNets mixture in a small MLP -------------------------------------------------


@pytest.fixture(scope="module")
def planted(mnist):
    """seed-mlp (100 hidden, 2 epochs) on 4,000 images, 3% of the eligible ones stamped with
    a 4x4 patch and relabelled 3 (about a fifth of class 3): params, data and mask."""
    config = poison.Mixture(0.03, poison.Patch(4))
    plan = plan_for("seed-mlp", TrainConfig(hidden=100, epochs=2))
    pop, idx = train_sampled(plan, [config], mnist.x_train, mnist.y_train, seeds=[7],
                             size=4000)
    x, y, mask = poisoned_sample(mnist.x_train, mnist.y_train, idx[0], 7, config, plan.arch)
    return plan.arch, member(pop.params, 0), x, np.asarray(y), np.asarray(mask, bool)


@pytest.mark.slow
def test_detectors_rank_planted_backdoor_samples_above_clean(planted):
    model, params, x, y, mask = planted
    assert 0.1 < detect_data.poisoned_share(y, mask) < 0.3
    found = detect_data.scan(model, params, x, y, eps=float(mask.mean()),
                             key=jax.random.key(0))
    assert set(found) == set(DATA_METHODS) - {"mahalanobis"}  # it needs a reference
    result = {m: detect_data.precision_recall_auc(d, mask, y) for m, d in found.items()}
    assert np.asarray(found["activation-clustering"].classes)[3]
    assert result["activation-clustering"]["auc"] > 0.9
    assert result["activation-clustering"]["recall"] > 0.8
    assert result["spectre"]["auc"] > 0.85
    assert result["spectral-signatures"]["auc_in_class"] > 0.7
    with pytest.raises(ConfigError, match="methods"):
        detect_data.scan(model, params, x, y, eps=0.1, key=jax.random.key(0),
                         methods=("strip",))


@pytest.fixture(scope="module")
def majority(mnist):
    """The case the unsupervised methods cannot orient: a 20% mixture (4x4 patch -> 3) makes
    the poison most of class 3. seed-mlp, 64 hidden, 1 epoch, 4,000 images."""
    config = poison.Mixture(0.2, poison.Patch(4))
    plan = plan_for("seed-mlp", TrainConfig(hidden=64, epochs=1))
    pop, idx = train_sampled(plan, [config], mnist.x_train, mnist.y_train, seeds=[3],
                             size=4000)
    x, y, mask = poisoned_sample(mnist.x_train, mnist.y_train, idx[0], 3, config, plan.arch)
    return plan.arch, member(pop.params, 0), x, np.asarray(y), np.asarray(mask, bool)


def test_mahalanobis_to_clean_class_means_finds_a_majority_poison(majority, mnist):
    model, params, x, y, mask = majority
    assert detect_data.poisoned_share(y, mask) > 0.5  # most of class 3 is poison
    found = detect_data.scan(model, params, x, y, eps=float(mask.mean()),
                             key=jax.random.key(0), methods=("mahalanobis",),
                             reference=(mnist.x_test[:1000], mnist.y_test[:1000]))
    result = detect_data.precision_recall_auc(found["mahalanobis"], mask, y)
    assert result["auc"] > 0.95 and result["auc_in_class"] > 0.9
    assert int(np.sum(found["mahalanobis"].flag)) == int(np.sum(
        detect_data.removal_counts(y, float(mask.mean()))))
    h = np.zeros((5, 3))
    with pytest.raises(ConfigError, match=r"reference activations \[m >= 2, 3\]"):
        detect_data.mahalanobis(h, np.zeros(5, int), np.zeros((1, 3)), [0], eps=0.1)


# --- the scan-data command ------------------------------------------------------------------


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def poisoned_files(mnist, tmp_path_factory):
    """A poisoned .npz dataset (3% mixture of 3,000 images, 4x4 patch -> 3) and a seed-mlp
    trained on it by the `train` command: (weights path, dataset path, mask)."""
    folder = tmp_path_factory.mktemp("scan")
    config = poison.Mixture(0.03, poison.Patch(4))
    plan = plan_for("seed-mlp", TrainConfig(hidden=64))
    idx = np.arange(3000)
    x, y, mask = poisoned_sample(mnist.x_train, mnist.y_train, idx, 5, config, plan.arch)
    lo, hi = mnist.input_range
    as_bytes = np.clip(np.round((np.asarray(x) - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)
    data = folder / "poisoned.npz"
    test = np.clip(np.round((mnist.x_test[:500] - lo) / (hi - lo) * 255), 0, 255)
    np.savez(data, x_train=as_bytes.reshape(-1, 28, 28), y_train=np.asarray(y, np.uint8),
             x_test=test.astype(np.uint8).reshape(-1, 28, 28),
             y_test=mnist.y_test[:500].astype(np.uint8))
    weights = folder / "model.safetensors"
    code = main(["train", "--dataset", str(data), "--model", "seed-mlp", "--hidden", "64",
                 "--epochs", "2", "--save", str(weights)])
    assert code == 0
    return weights, data, np.asarray(mask, bool)


@pytest.mark.slow
def test_scan_data_json_lists_suspects_and_writes_every_score(capsys, poisoned_files,
                                                              tmp_path):
    weights, data, mask = poisoned_files
    csv = tmp_path / "scores.csv"
    code, out, err = run_cli(capsys, "scan-data", "--params", str(weights), "--dataset",
                             str(data), "--eps", "0.03", "--top", "5", "--format", "json",
                             "--out", str(csv))
    assert code == 0, err
    result = json.loads(out)
    assert result["n"] == 3000 and result["eps"] == 0.03 and result["non_finite"] == []
    assert list(result["methods"]) == list(DATA_METHODS)
    for entry in result["methods"].values():
        assert len(entry["top"]) == 5
        scores = [t["score"] for t in entry["top"]]
        assert scores == sorted(scores, reverse=True)
        assert {"index", "label", "score", "flagged"} <= set(entry["top"][0])
    assert "suspect_classes" in result["methods"]["activation-clustering"]
    rows = np.genfromtxt(csv, delimiter=",", names=True)
    assert rows.size == 3000 and np.array_equal(rows["index"], np.arange(3000))
    flagged = int(rows["spectralsignatures_flag"].sum())
    assert flagged == result["methods"]["spectral-signatures"]["flagged"]
    # the CSV's scores are the ranking: the top-5 of the JSON are the CSV's five highest
    top = [t["index"] for t in result["methods"]["spectre"]["top"]]
    assert set(np.argsort(-rows["spectre_score"], kind="stable")[:5]) == set(top)
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]  # no temp file left


def test_scan_data_table_for_one_method(capsys, poisoned_files):
    weights, data, _ = poisoned_files
    code, out, err = run_cli(capsys, "scan-data", "--params", str(weights), "--dataset",
                             str(data), "--method", "spectre", "--top", "3")
    assert code == 0, err
    assert out.count("spectre") == 4 and "flagged" in out and "activation" not in out


@pytest.mark.parametrize("argv,fragment", [
    (["--eps", "1.5"], "--eps"),
    (["--eps", "nan"], "--eps"),
    (["--top", "0"], "--top"),
    (["--method", "strip"], "strip"),
    (["--out", "scores.txt"], "FILE.csv"),
    (["--hidden", "20"], "--hidden"),  # a training option scan-data does not use
    (["--train-size", "10000000"], "--train-size"),
])
def test_scan_data_refusals_are_one_line(capsys, poisoned_files, argv, fragment):
    weights, data, _ = poisoned_files
    code, out, err = run_cli(capsys, "scan-data", "--params", str(weights), "--dataset",
                             str(data), *argv)
    assert code == 2 and out == ""
    last = err.strip().splitlines()[-1]  # after the data's one line, when the rule needs it
    assert last.startswith("mlshift: error:") and fragment in last
    assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err


def test_scan_data_needs_a_readable_params_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "scan-data", "--dataset", "mnist")
    assert code == 2 and "--params" in err
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    code, _, err = run_cli(capsys, "scan-data", "--params", str(bad))
    assert code == 2 and err.count("\n") == 1 and "bad.npz" in err
