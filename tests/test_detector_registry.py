"""The detector registry's contract: every `Detector` has every fact, the CLI and the detection
bench enumerate it, and the report's headline considers every detector of a unit. Driven by
`DETECTORS` itself: adding a detector needs no edit here."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mlshift_jax.bench import detection_bench, report
from mlshift_jax.cli import main
from mlshift_jax.detection import DETECTORS, UNITS, Detector, of_unit, scan
from tests.test_categorize import TINY

ALL = list(DETECTORS.values())


@pytest.mark.parametrize("d", ALL, ids=[d.name for d in ALL])
def test_every_detector_has_every_fact(d):
    assert isinstance(d, Detector)
    assert DETECTORS[d.name] is d
    assert d.unit in UNITS
    assert callable(d.score)
    for fact in (d.name, d.label, d.source, d.summary):
        assert isinstance(fact, str) and fact.strip()


def test_names_and_labels_are_unique():
    assert len({d.label for d in ALL}) == len(ALL)
    assert sorted(of_unit("input") + of_unit("sample") + of_unit("model")) == sorted(ALL)
    assert {DETECTORS[n].unit for n in scan.DETECTORS} == {"model"}  # scan-model's verdicts


def _help(capsys, monkeypatch, command: str) -> str:
    monkeypatch.setenv("COLUMNS", "10000")  # argparse wraps (and splits hyphenated names)
    assert main([command, "--help"]) == 0
    return capsys.readouterr().out


def test_sample_detectors_are_scan_datas_method_choices(capsys, monkeypatch):
    text = _help(capsys, monkeypatch, "scan-data")
    choices = text.split("--method METHOD [METHOD ...]")[-1].split("--top")[0]
    for d in of_unit("sample"):
        assert d.name in choices, d.name
        assert d.label in text, d.label  # the command's description names it too


def test_model_detectors_are_named_by_the_model_commands(capsys, monkeypatch):
    helps = _help(capsys, monkeypatch, "detect") + _help(capsys, monkeypatch, "scan-model")
    for d in of_unit("model"):
        assert d.label in helps, d.label


def _synthetic_tables():
    """Tables as the "detectors" part's steps return them, one value per detector."""
    cfg = TINY
    fpr = f"tpr@{cfg.fpr:g}fpr"
    attack = detection_bench.attack_label(*cfg.attacks[0])
    poison = detection_bench.poison_label(*cfg.poisonings[0])
    inputs = pd.DataFrame([{"attack": cfg.attacks[0][0], "eps": cfg.attacks[0][1],
                            "detector": d.label, "auc": 0.6, fpr: 0.1}
                           for d in detection_bench.INPUT])
    strip = pd.DataFrame([{"change": attack, "auc": 0.5, fpr: 0.05}])
    data = pd.DataFrame([{"detector": d.label, "change": poison, "auc": 0.7, fpr: 0.2}
                         for d in detection_bench.DATA])
    cells = pd.DataFrame({"change": ["clean", "clean", poison, poison],
                          "statistic": [0.1, 0.2, 0.9, 1.0]})
    return cfg, [attack, poison], inputs, strip, data, cells


def test_every_detector_appears_in_the_detection_benchs_tables():
    cfg, columns, inputs, strip, data, cells = _synthetic_tables()
    table = detection_bench._detector_by_attack(cfg, columns, inputs, strip, data, cells)
    scored = table.dropna(subset=columns, how="all")
    described = detection_bench.DETECTORS
    for d in ALL:
        assert described.loc[d.label, "source"] == d.source
        assert described.loc[d.label, "unit"] == detection_bench.UNIT_TITLES[d.unit]
        if d.name in scan.DETECTORS:  # the scan-model part's (scan_bench's tables)
            assert d.label not in set(table["detector"])
        else:
            assert d.label in detection_bench.ROWS
            assert d.label in set(scored["detector"]), d.label  # a value, not only a row


def _detect_records(auc: pd.DataFrame, attacks: list[str]) -> pd.DataFrame:
    inputs = pd.DataFrame([{"attack": a.split()[0], "eps": float(a.split()[1]),
                            "detector": "confidence", "auc": 0.5} for a in attacks])
    detail = {name: json.loads(t.to_json(orient="split"))
              for name, t in (("auc", auc), ("input_detectors", inputs))}
    return pd.DataFrame([{"id": "detect/mnist/seed0/detectors", "kind": "detect",
                          "block": "detect", "dataset": "mnist", "model": "seed-mlp",
                          "seed": 0, "detail": detail}])


def test_headline_names_the_best_training_data_detector_of_the_registry():
    """Every "sample" detector competes: the best one is named (the list in the report once
    left Mahalanobis out, and the headline named a worse detector)."""
    data = [d.label for d in of_unit("sample")]
    auc = pd.DataFrame(np.nan, index=list(detection_bench.ROWS),
                       columns=["fgsm 0.1", "trigger 10%", "mixture 5%"])
    auc.loc[[d.label for d in detection_bench.INPUT], "fgsm 0.1"] = 0.6
    for i, label in enumerate(data):
        auc.loc[label, ["trigger 10%", "mixture 5%"]] = 0.5 + 0.01 * i
    for label in data:  # each one in turn the best
        planted = auc.copy()
        planted.loc[label, ["trigger 10%", "mixture 5%"]] = [0.9, 0.8]
        line = report._detect_finding(_detect_records(planted, ["fgsm 0.1"]))
        assert f"best training-data detector: {label} (mean ROC-AUC 0.850 over 2" in line


def test_headline_considers_a_newly_registered_sample_detector(monkeypatch):
    new = Detector("planted", "sample", lambda *a, **k: None, "planted detector",
                   "this test", "a score")
    monkeypatch.setitem(DETECTORS, new.name, new)
    auc = pd.DataFrame({"trigger 10%": [0.7, 0.95]}, index=["SPECTRE", new.label])
    line = report._detect_finding(_detect_records(auc, []))
    assert "best training-data detector: planted detector (mean ROC-AUC 0.950" in line
