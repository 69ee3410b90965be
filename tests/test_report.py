"""The report from planted records: validity warnings, tables, atomic writes, platform names."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from mlshift_jax.bench import report
from mlshift_jax.bench.experiments import grid
from mlshift_jax.bench.experiments import speed as speed_exp
from mlshift_jax.core import fmt


def _cell(attack: str, eps: float, accuracy: float, **over) -> dict:
    rid = f"mnist/seed-mlp/{attack}/{eps:g}/seed0"
    base = {
        "id": rid, "hash": rid, "kind": "attack", "block": "matrix", "dataset": "mnist",
        "data_source": "test", "model": "seed-mlp", "seed": 0, "attack": attack, "eps": eps,
        "n_train": 500, "n_test": 200, "hidden": 16, "lr": 0.1, "epochs": 1,
        "accuracy": accuracy, "precision": accuracy, "recall": accuracy, "f1": accuracy,
        "confidence": 0.8, "clean_accuracy": 0.9, "compile_s": 0.2, "median_s": 0.01,
        "min_s": 0.01, "max_s": 0.02, "iqr_s": 0.0, "rounds": 3, "train_s": 1.0,
        "params_finite": True, "zero_grad_frac": 0.0 if attack in ("fgsm", "pgd") else None,
        "detail": {}, "status": "computed",
    }
    return base | over


def _records(*rows: dict) -> pd.DataFrame:
    sound = [_cell("none", 0.0, 0.9), _cell("noise-sign", 0.1, 0.85), _cell("fgsm", 0.1, 0.4),
             _cell("pgd", 0.1, 0.3)]
    by_id = {r["id"]: r for r in sound}
    by_id.update({r["id"]: r for r in rows})
    return pd.DataFrame(list(by_id.values()))


def _warnings(records) -> dict[str, str]:
    w = report.validity_warnings(records)
    return dict(zip(w["id"], w["warning"], strict=True))


def test_sound_records_raise_no_warning():
    assert report.validity_warnings(_records()).empty


def test_noise_stronger_than_fgsm_is_flagged():
    w = _warnings(_records(_cell("noise-sign", 0.1, 0.2)))
    assert "random noise (noise-sign) is stronger than FGSM" in w["mnist/seed-mlp/fgsm/0.1/seed0"]


def test_pgd_weaker_than_fgsm_is_flagged():
    w = _warnings(_records(_cell("pgd", 0.1, 0.6)))
    assert "PGD is weaker than FGSM" in w["mnist/seed-mlp/pgd/0.1/seed0"]


def test_eps_zero_not_clean_is_flagged():
    w = _warnings(_records(_cell("fgsm", 0.0, 0.8), _cell("none", 0.0, 0.89)))
    assert "eps=0 gives accuracy 0.8000, not the clean 0.9000" in w[
        "mnist/seed-mlp/fgsm/0/seed0"]
    assert "mnist/seed-mlp/none/0/seed0" in w


def test_zero_gradients_are_flagged():
    w = _warnings(_records(_cell("fgsm", 0.1, 0.4, zero_grad_frac=0.8)))
    assert "zero input gradients" in w["mnist/seed-mlp/fgsm/0.1/seed0"]


@pytest.mark.parametrize("over", [{"params_finite": False}, {"f1": float("nan")},
                                  {"precision": float("inf")}])
def test_divergence_is_flagged(over):
    w = _warnings(_records(_cell("noise-sign", 0.1, 0.85, **over)))
    assert "training diverged" in w["mnist/seed-mlp/noise-sign/0.1/seed0"]


def test_warnings_show_in_the_tables():
    records = _records(_cell("noise-sign", 0.1, 0.2))
    text = report.tables_markdown(records)
    assert "## Pairings: mnist" in text and "## Validity warnings" in text
    pairing = text.split("## Pairings: mnist")[1]
    row = next(line for line in pairing.splitlines() if "| fgsm" in line)
    assert "stronger than FGSM" in row
    assert "No E1 cells" in text and "No speed cells" in text


def _speed_record() -> dict:
    def row(impl, median, ref=False):
        return {"impl": impl, "n": 100, "n_timed": 100, "scale": 1.0, "ref": ref, "note": "",
                "compile_s": None, "median_s": median, "min_s": median, "max_s": median,
                "iqr_s": 0.0, "rounds": 3}

    extra = {"flops": 1e9, "gemm_gflop_per_s": 100.0, "jax_over_floor": 2.0,
             "jax_over_xla_floor": 1.5, "jax_s_per_image": 1e-6, "study_s_per_image": 75.0,
             "study_over_jax_per_image": 7.5e7}
    return {"id": "speed/mnist/fgsm", "kind": "speed", "block": "speed", "dataset": "mnist",
            "workload": "fgsm", "detail": {"rows": [row("jax", 0.01), row("numpy", 0.04, True)],
                                           "extra": extra}}


def test_speed_table_reports_speed_up_vs_numpy():
    records = pd.concat([_records(), pd.DataFrame([_speed_record()])], ignore_index=True)
    text = report.tables_markdown(records)
    speed = text.split("## Speed")[1].split("## Pairings")[0]
    jax_row = next(line for line in speed.splitlines() if line.startswith("| fgsm") and
                   "| jax " in line)
    assert "4×" in jax_row and "10 ms" in jax_row
    assert "7.5e+07× less" in speed and "2.00× the floor" in speed


def _peer_record(*, torch: bool, noisy: bool = False) -> dict:
    def row(impl, median, task="pgd", **kw):
        return {"impl": impl, "n": 100, "n_timed": 100, "scale": 1.0, "ref": False,
                "peer": False, "task": task, "note": "", "compile_s": None,
                "median_s": median, "min_s": median * 0.9, "max_s": median * 1.1,
                "iqr_s": 0.0, "rounds": 5, "spread": 0.2, "attempts": 1, "noisy": False,
                **kw}

    rows = [row("jax: PGD", 0.01, spread=0.5 if noisy else 0.2, noisy=noisy),
            row("numpy: PGD", 0.05, ref=True)]
    if torch:
        rows.append(row("torch: PGD", 0.03, peer=True))
    else:
        rows.append({"impl": "torch: PGD", "n": 100, "n_timed": 100, "scale": 1.0,
                     "ref": False, "peer": True, "task": "pgd", "note": "not installed",
                     "missing": True, "spread": None, "compile_s": None, "median_s": None,
                     "min_s": None, "max_s": None, "iqr_s": None, "rounds": None})
    extra = {"steps": 10, "agree_with_numpy": 1.0, "torch": "2.13.0" if torch else None,
             "torch_threads": 2 if torch else None}
    return {"id": "speed/mnist/pgd", "kind": "speed", "block": "speed", "dataset": "mnist",
            "workload": "pgd", "detail": {"rows": rows, "extra": extra}}


def _speed_lines(records) -> list[str]:
    return speed_exp._table(pd.concat([_records(), pd.DataFrame(records)],
                                   ignore_index=True)).splitlines()


def test_speed_table_has_vs_torch_rounds_and_spread():
    lines = _speed_lines([_peer_record(torch=True)])
    header = next(line for line in lines if line.startswith("| workload"))
    for column in ("vs torch", "rounds", "spread", "min – max", "speed-up vs numpy"):
        assert column in header, column
    jax_row = next(line for line in lines if "| jax: PGD" in line)
    assert "3×" in jax_row and "5×" in jax_row and "20%" in jax_row  # torch/jax, numpy/jax
    assert any("torch: 2.13.0" in line for line in lines)


def test_speed_table_without_torch_says_not_installed():
    lines = _speed_lines([_peer_record(torch=False)])
    torch_row = next(line for line in lines if "| torch: PGD" in line)
    assert "not installed" in torch_row
    jax_row = next(line for line in lines if "| jax: PGD" in line)
    assert jax_row.count("—") >= 1  # no torch to compare with
    assert any("make bench-peers" in line for line in lines)


def test_speed_table_flags_a_still_noisy_row_and_shows_the_detect_cell():
    detect = {**_detect_record(), "median_s": 95.0, "peak_rss_bytes": 2.5 * 2**30}
    lines = _speed_lines([_peer_record(torch=True, noisy=True), detect])
    assert "(noisy)" in next(line for line in lines if "| jax: PGD" in line)
    assert any("Still noisy" in line and "pgd (1 of its rows)" in line for line in lines)
    cell = next(line for line in lines if "detection benchmark cell" in line)
    assert "95 s" in cell
    assert "2.50 GiB" in cell


def test_write_is_atomic(tmp_path, monkeypatch):
    records = _records()
    report.write(records, tmp_path)
    before = (tmp_path / "tables.md").read_text()
    real = Path.write_text

    def half_then_fail(self, text, *args, **kw):
        real(self, text[: len(text) // 2], *args, **kw)  # the temp file exists, half written
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        report.write(_records(_cell("fgsm", 0.1, 0.123)), tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "tables.md").read_text() == before
    left = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert left == []


def _detect_record() -> dict:
    auc = pd.DataFrame([[0.7, np.nan], [1.0, 1.0]], index=["confidence", "fingerprint test"],
                       columns=["fgsm 0.1", "mixture 5%"])
    cells = pd.DataFrame({"seed": [0, 0], "change": ["clean", "fgsm 0.1"],
                          "predicted": ["none", "adversarial-input"], "p_value": [0.5, 0.025]})
    return {"id": "detect/mnist/seed0/detectors", "kind": "detect", "block": "detect",
            "dataset": "mnist",
            "model": "seed-mlp", "seed": 0, "hidden": 200, "n_train": 10000, "median_s": 80.0,
            "train_s": 50.0, "detail": {"auc": json.loads(auc.to_json(orient="split")),
                                        "cells": json.loads(cells.to_json(orient="split"))}}


def _csv_round_trip(records: pd.DataFrame, tmp_path) -> pd.DataFrame:
    """records.csv as `report.write` writes it, read back."""
    report.records_csv(records).to_csv(tmp_path / "records.csv", index=False)
    csv = pd.read_csv(tmp_path / "records.csv")
    return csv.fillna({"text": "", "row": ""})


def test_records_csv_is_long_one_row_per_cell_and_measure(tmp_path):
    records = pd.concat([_records(), pd.DataFrame([_speed_record(), _detect_record()])],
                        ignore_index=True)
    csv = _csv_round_trip(records, tmp_path)
    assert list(csv.columns) == list(report.LONG_COLUMNS)
    assert not csv["text"].str.startswith("{").any()  # no JSON inside a column
    assert not csv.duplicated(["id", "table", "row", "measure"]).any()
    # the cells' own scores pivot back to the records, exactly
    own = csv[(csv["kind"] == "attack") & (csv["table"] == "cell")]
    wide = own.pivot(index="id", columns="measure", values="value")
    attack = records[records["kind"] == "attack"].set_index("id")
    for m in ("accuracy", "f1", "median_s", "rounds", "clean_accuracy", "train_s"):
        assert wide[m].to_dict() == attack[m].astype(float).to_dict(), m
    assert set(wide["params_finite"]) == {1.0}
    assert wide["zero_grad_frac"].isna().sum() == 2  # None where the attack has no gradient
    cell = own.drop_duplicates("id").set_index("id")
    assert cell.loc[attack.index, "eps"].tolist() == attack["eps"].tolist()
    assert cell["n_test"].tolist() == [200.0] * 4 and "n_test" not in set(own["measure"])
    # a detail table pivots back to itself; text values land in `text`
    det = csv[csv["id"] == "detect/mnist/seed0/detectors"]
    auc = det[det["table"] == "auc"].pivot(index="row", columns="measure", values="value")
    assert auc.loc["confidence", "fgsm 0.1"] == 0.7 and auc.loc["fingerprint test"].eq(1).all()
    assert np.isnan(auc.loc["confidence", "mixture 5%"])  # a missing value is left out
    verdicts = det[(det["table"] == "cells") & (det["measure"] == "predicted")]
    assert verdicts["text"].tolist() == ["none", "adversarial-input"]
    speed = csv[(csv["id"] == "speed/mnist/fgsm") & (csv["table"] == "rows")]
    medians = speed[speed["measure"] == "median_s"].set_index("row")["value"]
    assert medians.to_dict() == {"jax": 0.01, "numpy": 0.04}
    extra = csv[(csv["id"] == "speed/mnist/fgsm") & (csv["table"] == "extra")]
    assert dict(zip(extra["measure"], extra["value"], strict=True))["jax_over_floor"] == 2.0


def test_records_csv_leaves_images_out():
    r = _cell("fgsm", 0.1, 0.4, detail={"examples": {"images": "AAAA"}, "other": 1})
    csv = report.records_csv(pd.DataFrame([r]))
    assert "AAAA" not in csv.to_csv() and "examples" not in set(csv["table"])
    assert csv.set_index("measure").loc["other", "value"] == 1.0


def test_figures_are_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    paths, note = report.write_figures(_records(), tmp_path)
    assert paths == [] and "matplotlib" in note


def test_figures_are_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    x = np.full((2, 784), 0.5)
    ex = {"images": grid.encode_images(x), "labels": [1, 2], "preds": [1, 3]}
    records = _records(_cell("none", 0.0, 0.9, detail={"examples": ex}),
                       _cell("fgsm", 0.1, 0.4, detail={"examples": ex}))
    paths, note = report.write_figures(records, tmp_path)
    assert note == "" and sorted(p.name for p in paths) == [
        "accuracy-vs-eps-mnist.png", "fgsm-digits-mnist.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


@pytest.mark.parametrize("platform,kind,name", [
    ("cpu", "cpu", "cpu"), ("gpu", "NVIDIA H200", "gpu-h200"),
    ("gpu", "NVIDIA A100-SXM4-80GB", "gpu-a100"), ("tpu", "TPU v5 lite", "tpu-v5-lite"),
    ("gpu", "NVIDIA H100 80GB HBM3", "gpu-h100"), ("gpu", "NVIDIA H100 NVL", "gpu-h100"),
    ("gpu", "NVIDIA GeForce RTX 4090", "gpu-rtx-4090"), ("gpu", "Tesla V100-SXM2-16GB",
                                                          "gpu-v100"),
])
def test_platform_name(platform, kind, name):
    assert report.platform_name(SimpleNamespace(platform=platform, device_kind=kind)) == name


def test_platform_name_here_and_default_out_dir():
    assert report.platform_name() in ("cpu",) or report.platform_name().count("-") >= 1
    assert report.default_out_dir("/x") == Path("/x/results") / report.platform_name()


@pytest.mark.parametrize("seconds,text", [(1.234, "1.23 s"), (0.0456, "45.6 ms"),
                                          (7.89e-5, "78.9 µs"), (None, "—"),
                                          (float("nan"), "—")])
def test_fmt_time(seconds, text):
    assert report.fmt_time(seconds) == text


def test_cells_capped_to_the_same_test_set_do_not_break_the_checks():
    """E3's 10,000- and 6,000-image cells both shrink to the sample's 2,000 test images."""
    rows = [_cell(a, 0.1, acc, id=f"e3/n{n}/mnist/seed-mlp/{a}/0.1/seed0", block="e3",
                  n_test=2000)
            for n in (10000, 6000) for a, acc in (("fgsm", 0.4), ("noise-sign", 0.2))]
    w = _warnings(_records(*rows))
    assert any("stronger than FGSM" in v for v in w.values())
    assert "## E3" in report.tables_markdown(_records(*rows))


@pytest.mark.parametrize("value, column, text", [
    (0.9255000352859497, "accuracy", "0.9255"),
    (6000.0, "n_test", "6,000"),
    (6000, "anything", "6,000"),
    (517.8, "flagged", "517.8"),
    (60000.0, "poisoned_count", "60,000"),
    (0.1, "eps", "0.1"),
    (0.05, "fraction", "0.05"),
    (50.0741, "seconds", "50.07"),
    (12345.6, "seconds", "12,346"),
    (None, "accuracy", ""),
    (float("nan"), "auc", ""),
    (True, "agrees", "True"),
    ("7->9", "top_confusion", "7->9"),
])
def test_fmt_number(value, column, text):
    assert fmt.number(value, column) == text


NOISE = re.compile(r"\d\.\d{6,}|\d,\d{3}\.0\b|\bnan\b")  # float noise, "6,000.0", "nan"


def _study_records() -> pd.DataFrame:
    """E1 and E3 cells with float-typed counts and float noise, as pandas makes them when
    some records lack a column."""
    noisy = 0.9255000352859497
    rows = [_cell("none", 0.0, noisy, id="e1/seed-mlp", block="e1", n_train=60000.0,
                  n_test=10000.0, hidden=200.0)]
    for n in (10000.0, 6000.0):
        for eps, acc in ((0.0, noisy), (0.1, 0.5862000346183777), (0.3, 0.18570000529289246)):
            rows.append(_cell("fgsm", eps, acc, id=f"e3/n{n:g}/fgsm/{eps:g}", block="e3",
                              n_test=n, n_train=60000.0))
    return _records(*rows)


def test_tables_have_no_float_noise_and_integer_counts():
    records = pd.concat([_study_records(), pd.DataFrame([_speed_record()])], ignore_index=True)
    text = report.tables_markdown(records)
    assert not NOISE.search(text), NOISE.search(text)
    assert "0.9255" in text and "the first 6,000 mnist test images" in text
    assert "trained on 60,000 images" in text


def test_tables_md_opens_with_a_summary_and_contents():
    records = pd.concat([_study_records(), pd.DataFrame([_speed_record()])], ignore_index=True)
    text = report.tables_markdown(records)
    top = text.split("## ")[0]  # everything before the first section: one screen
    assert len(top.splitlines()) <= 40
    assert "**E1" in top and "vs the study's 0.963" in top and "0.9255" in top
    assert "**E3, FGSM**" in top and "eps 0.1: accuracy 0.5862" in top
    assert "eps 0.3: accuracy 0.1857" in top and "the study's 0.7765" in top
    assert "fgsm 4×" in top  # the speed-up of JAX over numpy
    headings = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    links = re.findall(r"^- \[(.+)\]\(#([^)]+)\)$", top, flags=re.M)
    assert [t for t, _ in links] == headings
    assert dict(links)["E4–E7: training-time poisoning"] == "e4e7-training-time-poisoning"
    assert dict(links)["E1: the study's clean model"] == "e1-the-studys-clean-model"


def test_summary_leaves_out_what_did_not_run():
    text = report.summary(_records())
    assert "E1" not in text and "BadNets" not in text and "Validity warnings" in text


def test_speed_table_states_the_minibatch_floor():
    rec = _peer_record(torch=True)
    rec["workload"], rec["id"] = "epoch-minibatch", "speed/mnist/epoch-minibatch"
    rec["detail"]["rows"][0].update(over_floor=3.5, over_matmuls=1.25, task="mlp-sgd")
    rec["detail"]["extra"] = {"gemm_gflop_per_s": 150.0, "torch": "2.13.0", "torch_threads": 2}
    lines = _speed_lines([rec])
    floor = next(line for line in lines if line.startswith("- Minibatch floor"))
    assert "150 GFLOP/s" in floor and "3.50×" in floor and "1.25×" in floor


def test_the_header_says_which_sample_settings_replaced_a_blocks_own():
    assert report.settings_text({"models": ["mlp-ce"], "n_test": 100, "quick": True}) == \
        "models = [mlp-ce], n_test = 100, quick = true"
    info = {"date": "d", "git_commit": "c", "backend": "cpu", "device_kind": "cpu",
            "device_count": 1, "cpu_count": 2, "versions": {"jax": "j", "numpy": "n"},
            "sample_settings": {"defenses": {"n_test": 100}}}
    assert "- [defenses] on the bundled sample, as the matrix's [sample.defenses] says: " \
           "n_test = 100" in report._header(info)
