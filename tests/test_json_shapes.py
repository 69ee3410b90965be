"""One JSON shape per command (issue 23, docs/json.md): `attack` prints the same top-level
keys with and without --defense, and docs/json.md lists what each command prints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mlshift_jax import cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "json.md"
pytestmark = pytest.mark.filterwarnings("ignore::mlshift_jax.data.datasets.SampleDataWarning")


def _json(capsys, *argv) -> dict:
    capsys.readouterr()
    code = cli.main([*argv, "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _outside_parentheses(text: str) -> str:
    out, depth = [], 0
    for ch in text:
        depth += ch == "("
        if depth == 0:
            out.append(ch)
        depth -= ch == ")" and depth > 0
    return "".join(out)


def _documented(command: str) -> set[str]:
    """The backquoted keys of the "top-level keys (always)" column of docs/json.md's row for
    `command` (what parentheses say about a key is not a key)."""
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 3 and cells[1] == f"`{command}`":
            return set(re.findall(r"`([a-z_]+)`", _outside_parentheses(cells[2])))
    raise AssertionError(f"docs/json.md has no row for {command}")


@pytest.mark.slow
def test_attack_has_one_shape_with_and_without_a_defense(capsys):
    common = ["attack", "--model", "seed-mlp", "--hidden", "16", "--train-size", "500",
              "--epochs", "1", "--n", "100", "--eps", "0.1", "--rounds", "1"]
    plain = _json(capsys, *common)
    defended = _json(capsys, *common, "--defense", "quantize")
    assert set(plain) == set(defended) == _documented("attack")
    assert plain["defense"] is None and plain["flags"] == []
    assert defended["defense"] == "quantize" and isinstance(defended["flags"], list)
    for result in (plain, defended):
        assert isinstance(result["rows"], list) and result["rows"][0]["attack"] == "fgsm"
        assert result["n_images"] == 100 and result["non_finite"] == []


def test_every_command_with_json_output_is_documented():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.choices and "train" in a.choices)
    with_json = [name for name, p in sub.choices.items()
                 if any("--format" in a.option_strings for a in p._actions)]
    assert {"train", "attack", "detect"} <= set(with_json)
    for name in with_json:
        assert _documented(name), name


def test_train_prints_what_docs_json_says(capsys):
    result = _json(capsys, "train", "--hidden", "16", "--train-size", "500", "--epochs", "1")
    assert _documented("train") <= set(result)


TRAIN = ("--hidden", "16", "--train-size", "500", "--epochs", "1")


def test_train_has_one_shape_with_and_without_save(capsys, tmp_path):
    plain = _json(capsys, "train", *TRAIN)
    saved = _json(capsys, "train", *TRAIN, "--save", str(tmp_path / "m.safetensors"))
    assert set(plain) == set(saved) and _documented("train") <= set(plain)
    assert plain["saved"] is None and plain["defense"] is None
    assert plain["pgd40_accuracy"] is None and saved["saved"].endswith("m.safetensors")


@pytest.mark.slow
def test_poison_has_one_shape_with_and_without_save(capsys, tmp_path):
    plain = _json(capsys, "poison", *TRAIN)
    saved = _json(capsys, "poison", *TRAIN, "--save", str(tmp_path / "p.safetensors"))
    assert set(plain) == set(saved) and _documented("poison") <= set(plain)
    assert plain["saved"] is None and plain["saved_training_set"] is None
    # the mixture never poisons the target class's own images: the count says of what
    assert plain["target"] not in plain["eligible_classes"]
    assert plain["poisoned_count"] == round(plain["fraction"] * plain["eligible_count"])
    assert plain["eligible_count"] < 500


@pytest.mark.slow
def test_scan_data_has_one_shape_with_and_without_out(capsys, tmp_path):
    params = str(tmp_path / "m.safetensors")
    _json(capsys, "train", *TRAIN, "--save", params)
    common = ("scan-data", "--params", params, "--train-size", "300", "--top", "2")
    plain = _json(capsys, *common)
    written = _json(capsys, *common, "--out", str(tmp_path / "s.csv"))
    assert set(plain) == set(written) == _documented("scan-data")
    assert plain["out"] is None and written["out"].endswith("s.csv")
    for result in (plain, written):
        for entry in result["methods"].values():
            assert set(entry) == {"flagged", "top", "suspect_classes"}
