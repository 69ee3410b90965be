"""Sweeps and cell metrics: a planted backdoor works, tables have the promised columns."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mlshift_jax.bench import sweeps
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.poisoning.poison import Clean, Mixture, Patch, Trigger, WrongLabel


def _cms(clean, triggered=None, steered=None):
    clean = np.asarray(clean)
    triggered = clean if triggered is None else np.asarray(triggered)
    steered = triggered if steered is None else np.asarray(steered)
    return np.stack([clean, triggered, steered])


def test_cell_metrics_by_hand():
    clean = np.diag(np.full(10, 90))
    clean[0, 1] = 10  # 0 -> 1 mistakes (to_next)
    clean[5, 3] = 30  # 5 -> 3 mistakes (to_target)
    steered = np.zeros((10, 10), int)
    steered[:, 3] = 50  # every class sends 50 to class 3 ...
    steered[np.arange(10), np.arange(10)] += 50  # ... and keeps 50
    m = sweeps.cell_metrics(_cms(clean, steered), Mixture(fraction=0.1, target=3))
    total = 900 + 40
    assert m["clean_accuracy"] == pytest.approx(900 / total)
    assert m["off_diagonal"] == pytest.approx(40 / total)
    assert m["to_next"] == pytest.approx(10 / total)
    assert m["to_target"] == pytest.approx(30 / (total - 90))
    assert m["top_confusion"] == "5->3" and m["top_confusion_share"] == pytest.approx(30 / 40)
    assert m["asr"] == pytest.approx(0.5)  # 50 of each non-3 row of 100
    assert m["target_recall"] == pytest.approx(1.0)
    assert m["triggered_accuracy"] == pytest.approx(
        (50 * 9 + 100) / 1000)
    assert np.isnan(m["source_recall"])


def test_cell_metrics_asr_by_kind():
    cm = np.diag(np.full(10, 10))
    assert np.isnan(sweeps.cell_metrics(_cms(cm), WrongLabel(fraction=0.5))["asr"])
    assert np.isnan(sweeps.cell_metrics(_cms(cm), Clean())["triggered_accuracy"])
    # one place for every class: no class to pull towards
    assert np.isnan(sweeps.cell_metrics(_cms(cm), Trigger(patch=Patch(size=2)))["asr"])
    # per-class places: stamped with class y+1's patch, predicted y+1
    nxt = np.zeros((10, 10), int)
    nxt[np.arange(10), (np.arange(10) + 1) % 10] = 10
    assert sweeps.cell_metrics(_cms(cm, cm, nxt), Trigger())["asr"] == pytest.approx(1.0)
    # a source class: how often other digits are pulled to it
    src = np.diag(np.full(10, 10))
    src[:, 7] += 10
    m = sweeps.cell_metrics(_cms(cm, src, src), Trigger(patch=Patch(size=2), source=7))
    assert m["asr"] == pytest.approx(0.5) and m["source_recall"] == pytest.approx(1.0)


HIDDEN = 16
PROPORTIONS = (0.0, 0.2, 0.8)  # three cells in every sweep below: one compiled population
PATCHES = (2, 4, 6)


@pytest.fixture(scope="module")
def small(mnist):
    """3,000 training and 1,000 test images."""
    return type(mnist)(mnist.name, mnist.x_train[:3000], mnist.y_train[:3000],
                       mnist.x_test[:1000], mnist.y_test[:1000], mnist.source)


@pytest.fixture(scope="module")
def backdoor(small):
    """mixture 20%, 4x4 -> 3 on 3,000 images, the study's model (hidden 16, one epoch),
    beside a clean control and a 10% cell."""
    configs = [Mixture(fraction=f, patch=Patch(size=4)) for f in (0.0, 0.2, 0.1)]
    return sweeps.run_sweep(small, configs, model="seed-mlp", hidden=HIDDEN)


def test_planted_backdoor_works(backdoor):
    control, poisoned = backdoor.iloc[0], backdoor.iloc[1]
    assert poisoned["asr"] > 0.8, poisoned.to_dict()
    assert poisoned["clean_accuracy"] > 0.7
    assert control["asr"] < 0.2 and control["poisoned_count"] == 0
    assert poisoned["triggered_accuracy"] < control["triggered_accuracy"]


def test_sweep_table_has_the_promised_columns(backdoor):
    assert list(backdoor.columns) == [*sweeps.CONFIG_COLUMNS, "model", *sweeps.CELL_COLUMNS]
    for col in ("clean_accuracy", "precision", "recall", "f1", "asr", "off_diagonal"):
        assert backdoor[col].between(0, 1).all(), col
    assert backdoor.attrs["model"] == "seed-mlp" and backdoor.attrs["n_train"] == 3000
    assert backdoor.attrs["train_s"] > 0 and backdoor.attrs["chunk"] >= 1


@pytest.fixture(scope="module")
def tiny_tables(small):
    return sweeps.run_all(small, hidden=HIDDEN, badnets_models=("seed-mlp",),
                          proportions=PROPORTIONS, patch_sizes=PATCHES)


def test_run_all_tables_and_findings(tiny_tables):
    tables = tiny_tables
    assert list(tables) == ["E4", "E5", "E6-uniform", "E6-shift", "E6-target", "E7", "badnets"]
    assert tables["E4"]["patch"].tolist() == list(PATCHES)
    for name in ("E5", "E6-uniform", "E7"):
        assert tables[name]["fraction"].tolist() == list(PROPORTIONS)
        counts = tables[name]["poisoned_count"].to_numpy()
        assert counts[0] == 0 and (np.diff(counts) > 0).all()
    assert tables["E6-shift"]["mode"].eq("shift").all()
    assert tables["E7"]["asr"].notna().all() and tables["E6-target"]["asr"].isna().all()
    assert len(tables["badnets"]) == 3
    found = sweeps.findings(tables)
    assert {"finding", "study", "study_value", "ours", "ours_asr", "agrees"} <= set(found)
    assert any(found["finding"].str.startswith("E7")) and len(found) >= 10
    assert found["ours"].dropna().between(0, 1).all()


def test_figures_are_written(small, tiny_tables, tmp_path):
    pytest.importorskip("matplotlib")
    paths = sweeps.figures(tiny_tables, small, tmp_path / "figs")
    assert {p.name for p in paths} == {"poison_patch_size.png", "poison_proportion.png",
                                       "poison_examples.png"}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "figs").glob(".*.tmp"))


def test_poison_one_for_the_cli(small):
    out = sweeps.poison_one(small, kind="mixture", fraction=0.1, patch=4, target=3,
                            hidden=HIDDEN)
    for key in ("clean_accuracy", "precision", "recall", "f1", "asr", "poisoned_count",
                "train_seconds"):
        assert key in out, key
    assert out["poisoned_count"] == round(0.1 * (small.y_train != 3).sum())
    assert out["cell"] == "mixture 10% 4x4 -> 3"
    json.dumps(out, allow_nan=False)  # JSON-ready: NaN became None


@pytest.mark.parametrize("call,match", [
    (lambda ds: sweeps.poison_one(ds, kind="noise", fraction=0.1), "kind one of"),
    (lambda ds: sweeps.poison_one(ds, kind="mixture", fraction=2.0), "fraction"),
    (lambda ds: sweeps.poison_one(ds, kind="trigger", fraction=0.1, patch=40), "size"),
    (lambda ds: sweeps.proportion_configs("clean"), "expected kind"),
    (lambda ds: sweeps.run_sweep(ds, [Clean()], n_train=0), "n_train"),
])
def test_bad_sweep_arguments(mnist, call, match):
    with pytest.raises(ConfigError, match=match):
        call(mnist)


def test_sweep_definitions():
    assert [c.patch.size for c in sweeps.e4_configs()] == [1, 2, 3, 4, 5, 6]
    assert all(c.patch.per_class for c in sweeps.proportion_configs("trigger"))
    assert {c.mode for c in sweeps.proportion_configs("wrong-label", mode="target")} == {
        "target"}
    bad = sweeps.badnets_configs()
    assert [c.fraction for c in bad] == [0.0, 0.1, 0.1]
    assert [c.patch.size for c in bad[1:]] == [5, 4] and all(c.target == 3 for c in bad)
    assert isinstance(sweeps.findings({}), pd.DataFrame)
