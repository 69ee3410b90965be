"""The categorizer (logistic regression in JAX, held out by seed) and the detection
benchmark's tables, on a tiny configuration."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from mlshift_jax.attacks import ATTACKS
from mlshift_jax.bench import detection_bench
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.detection import categorize, change_generator
from mlshift_jax.detection.categorize import CATEGORIES
from mlshift_jax.detection.fingerprint import FEATURES, FeatureNull
from mlshift_jax.poisoning.poison import POISONINGS


def _blobs(seed: int, per_class: int = 12, groups: int = 4, spread: float = 0.3):
    """One Gaussian blob per category in len(FEATURES) dimensions; rows tagged by group."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(len(CATEGORIES), len(FEATURES)))
    labels = np.repeat(np.arange(len(CATEGORIES)), per_class)
    x = centres[labels] + spread * rng.normal(size=(len(labels), len(FEATURES)))
    return x, [CATEGORIES[i] for i in labels], np.arange(len(labels)) % groups


def test_every_registered_change_has_a_category():
    for name in [*ATTACKS, *POISONINGS]:
        assert categorize.category_of(name) in CATEGORIES
    assert categorize.category_of("mixture") == "backdoor"
    assert categorize.category_of("trigger") == "trigger-only"
    with pytest.raises(ConfigError, match="change kind"):
        categorize.category_of("earthquake")


def test_fit_separates_blobs():
    x, labels, _ = _blobs(0)
    model = categorize.fit(x, labels)
    assert model.predict(x) == labels
    proba = model.predict_proba(x)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    table = model.table()
    assert table.shape == (len(FEATURES) + 1, len(CATEGORIES))


def test_cross_validate_holds_out_whole_groups():
    """Each group's predictions equal those of a categorizer fitted on the other groups."""
    x, labels, groups = _blobs(1, spread=2.5)
    predicted = categorize.cross_validate(x, labels, groups)
    for g in (0, 3):
        keep = groups != g
        alone = categorize.fit(x[keep], [lab for lab, k in zip(labels, keep, strict=True) if k])
        assert list(predicted[groups == g]) == alone.predict(x[groups == g])
    with pytest.raises(ConfigError, match="2 groups"):
        categorize.cross_validate(x, labels, np.zeros(len(labels)))
    with pytest.raises(ConfigError, match="labels"):
        categorize.fit(x, ["backdoor"] * (len(labels) - 1) + ["gremlins"])


def test_confusion_table_matches_sklearn():
    rng = np.random.default_rng(2)
    true = [CATEGORIES[i] for i in rng.integers(0, 6, 50)]
    pred = [CATEGORIES[i] for i in rng.integers(0, 5, 50)]  # "backdoor" never predicted
    table = categorize.confusion_table(true, pred)
    assert list(table.index) == list(CATEGORIES) == list(table.columns)
    np.testing.assert_array_equal(table.to_numpy(),
                                  skm.confusion_matrix(true, pred, labels=list(CATEGORIES)))


def test_categorizer_inputs_are_null_zscores():
    rng = np.random.default_rng(3)
    null = FeatureNull(rng.normal(2.0, 0.5, size=(30, len(FEATURES))))
    z = null.zscores(null.features)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-12)
    x = categorize.categorizer_inputs(null.features, null)
    np.testing.assert_allclose(x, np.sign(z) * np.log1p(np.abs(z)))


TINY = detection_bench.BenchConfig(hidden=16, sample_size=1000, seeds=2, clean_per_seed=1,
                                   n_null=4, probes=100, n_patched=20, n_images=200,
                                   lofo_refs=1, lofo_per_family=1)


@pytest.mark.slow
def test_detection_bench_tables(mnist):
    out = detection_bench.run(mnist, config=TINY)
    assert {"auc", "input_detectors", "change_test", "confusion", "training_data",
            "detectors", "timing"} <= set(out)
    assert all(isinstance(v, pd.DataFrame) for v in out.values())
    auc = out["auc"]
    assert list(auc.index) == list(detection_bench.ROWS)
    attack_cols = [detection_bench.attack_label(k, e) for k, e in TINY.attacks]
    poison_cols = [detection_bench.poison_label(k, f) for k, f in TINY.poisonings]
    assert list(auc.columns) == attack_cols + poison_cols
    image_rows = [d.label for d in detection_bench.INPUT]
    assert auc.loc[image_rows, poison_cols].isna().all().all()
    assert auc.loc[image_rows, attack_cols].notna().all().all()
    assert auc.loc["fingerprint test"].notna().all()
    sample_rows = ["activation clustering", "spectral signatures", "SPECTRE"]
    assert auc.loc[sample_rows, attack_cols].isna().all().all()
    assert auc.loc[sample_rows, poison_cols].notna().all().all()
    values = auc.to_numpy()
    assert np.all((values[~np.isnan(values)] >= 0) & (values[~np.isnan(values)] <= 1))
    n_cells = TINY.seeds * (TINY.clean_per_seed + len(TINY.poisonings) + len(TINY.attacks))
    assert out["confusion"].to_numpy().sum() == n_cells
    assert list(out["confusion"].index) == list(CATEGORIES)
    assert set(out["change_test"].index) == {"clean", *attack_cols, *poison_cols}
    assert len(out["input_detectors"]) == len(TINY.attacks) * len(image_rows)
    lofo = out["categorizer_lofo"]
    assert lofo.index.is_unique and len(lofo) == len(change_generator.FAMILIES)
    assert (lofo[list(categorize.DECISIONS)].sum(axis=1) == lofo["n"]).all()
    assert (lofo["n"] == TINY.lofo_refs * TINY.lofo_per_family).all()
    with pytest.raises(ConfigError, match="seeds"):
        detection_bench.run(mnist, config=detection_bench.with_overrides(TINY, seeds=1))
