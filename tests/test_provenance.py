"""Which code made a number (core/provenance.py, issue 23): the code digest in every cached
cell, a stale cell caught when a trainer's source changes, `--reuse-stale` marking the row,
and results free of the machine's absolute paths."""

from __future__ import annotations

import json
import shutil

import pytest

from mlshift_jax.bench import report, runner
from mlshift_jax.core import provenance

TINY = """
[matrix]
datasets = ["mnist"]
models = ["seed-mlp"]
attacks = ["none", "fgsm"]
eps = [0.1]
hidden = 16
n_train = 300
n_test = 100

[timing]
rounds = 1
"""

pytestmark = pytest.mark.filterwarnings("ignore::mlshift_jax.data.datasets.SampleDataWarning")


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory):
    """A copy of the package's source and data, to change without touching the real one."""
    root = tmp_path_factory.mktemp("pkg")
    dest = root / "mlshift_jax"
    shutil.copytree(provenance.PACKAGE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_digest_covers_the_package_source_and_data():
    files = {p.relative_to(provenance.PACKAGE).as_posix() for p in provenance.code_files()}
    assert {"models/train.py", "bench/runner.py", "attacks/evasion.py"} <= files
    assert "data/_sample/mnist_sample.npz" in files
    assert all(f.endswith((".py", ".npz")) for f in files)
    assert len(provenance.code_digest()) == provenance.DIGEST_CHARS


def test_a_trainer_change_changes_the_digest_and_docs_do_not(package_copy):
    before = provenance.digest_of(package_copy)
    assert before == provenance.code_digest()  # the copy is the same code
    (package_copy.parent / "README.md").write_text("docs changed\n")  # outside the package
    (package_copy / "notes.md").write_text("not code\n")
    assert provenance.digest_of(package_copy) == before
    train = package_copy / "models" / "train.py"
    source = train.read_text()
    train.write_text(source.replace("def train_seed_sgd(", "def train_seed_sgd(  ", 1))
    try:
        assert provenance.digest_of(package_copy) != before
    finally:
        train.write_text(source)
    assert provenance.digest_of(package_copy) == before


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("prov")
    path = root / "tiny.toml"
    path.write_text(TINY)
    out = root / "out"
    return path, out, runner.run(path, out_dir=out)


def test_every_record_names_its_code(first_run):
    _, _, records = first_run
    assert set(records["code_digest"]) == {provenance.code_digest()}
    assert set(records["commit"]) == {provenance.git_commit()}
    assert (records["compute_s"] > 0).all()
    run = records.attrs["run"]
    assert run["code_digest"] == provenance.code_digest() and run["computed"] == 2
    assert run["compute_s"] == pytest.approx(records["compute_s"].sum())
    assert run["stale"] == 0 and run["skipped_cells"] == 0


def test_a_changed_trainer_recomputes_the_cached_cell(first_run, package_copy, tmp_path,
                                                      monkeypatch):
    """The stale-cell check: the cache holds cells of the real code; with models/train.py
    changed (in a copy of the package), the same matrix must recompute every cell."""
    path, out, first = first_run
    copied = tmp_path / "out"
    shutil.copytree(out, copied)
    again = runner.run(path, out_dir=copied)
    assert set(again["status"]) == {"reused"}  # same code: the cache is used

    train = package_copy / "models" / "train.py"
    source = train.read_text()
    train.write_text(source + "\n# a change to the trainer\n")
    try:
        changed = provenance.digest_of(package_copy)
    finally:
        train.write_text(source)
    monkeypatch.setattr(runner, "code_digest", lambda: changed)
    rerun = runner.run(path, out_dir=copied)
    assert set(rerun["status"]) == {"computed"}, "a cell of the old trainer was reused"
    assert set(rerun["code_digest"]) == {changed}
    assert rerun.attrs["run"]["computed"] == len(rerun)
    assert list(rerun["accuracy"]) == list(first["accuracy"])  # (a comment changes no number)


def test_reuse_stale_reuses_and_the_tables_mark_the_row(first_run, tmp_path, monkeypatch):
    path, out, _ = first_run
    copied = tmp_path / "out"
    shutil.copytree(out, copied)
    monkeypatch.setattr(runner, "code_digest", lambda: "0123456789ab")
    records = runner.run(path, out_dir=copied, reuse_stale=True)
    assert set(records["status"]) == {"stale"}
    assert records.attrs["run"]["stale"] == len(records)
    assert records.attrs["run"]["computed"] == 0
    text = report.tables_markdown(records)
    commit = provenance.git_commit()[:12]
    for cell in records["id"]:
        assert f"`{cell}`: STALE" in text  # the warning list names each stale row
    assert f"at commit {commit}" in text and provenance.code_digest() in text
    assert "STALE (other code, --reuse-stale)" in text


def test_results_carry_no_absolute_paths(first_run, tmp_path):
    _, _, records = first_run
    out = tmp_path / "written"
    report.write(records, out)
    for name in ("run.json", "tables.md", "records.csv"):
        text = (out / name).read_text()
        for root in {str(provenance.PACKAGE_HOME), str(tmp_path), str(out)}:
            assert root not in text, (name, root)
    info = json.loads((out / "run.json").read_text())
    assert not info["matrix"].startswith("/") and len(info["matrix_sha256"]) == 12
    for d in info["datasets"].values():
        assert "/" not in d["source"].partition(":")[2][:1], d["source"]
        assert len(d["data_hash"]) == 12


@pytest.mark.parametrize("given, expected", [
    ("env:/data/shared/mnist", "env:mnist"),
    ("system:/usr/share/datasets/fashion-mnist", "system:fashion-mnist"),
    (str(provenance.PACKAGE_HOME / "mlshift_jax" / "bench" / "matrices" / "full.toml"),
     "mlshift_jax/bench/matrices/full.toml"),
    ("bundled-sample", "bundled-sample"),
    ("download:https://example.org/mnist/", "download:https://example.org/mnist/"),
    ("bench/matrix.toml", "bench/matrix.toml"),
])
def test_relative_source(given, expected):
    assert provenance.relative_source(given) == expected


def test_paths_inside_a_skip_reason_are_made_relative():
    text = "fashion-mnist: expected its files in /home/someone/.cache/mlshift_jax/fm; found none"
    assert runner._without_paths(text) == ("fashion-mnist: expected its files in fm; "
                                           "found none")
