"""`bench --dataset X` does what it says (issue 23): every cell runs on X or is skipped and
listed as skipped, with the reason its experiment's record (`Experiment.fits`) gives from X's
image shape and classes; nothing crashes, nothing runs on MNIST instead."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlshift_jax.bench import matrix
from mlshift_jax.bench.experiments import BY_BLOCK
from mlshift_jax.bench.runner import DEFAULT_MATRIX, QUICK_MATRIX
from mlshift_jax.data import STUDY_SPEC, Spec

FOUR = Spec((12, 12, 1), 4, (0.0, 1.0))  # a small 4-class dataset
TWO = Spec((3, 3, 1), 2, (0.0, 1.0))  # too small for a 4x4 patch, no class 3
STUDY_BLOCKS = {"e1", "e2", "e3"}  # their tables set our numbers beside the study's


def unfit(path, spec: Spec) -> dict[str, str]:
    """{cell id: why} of the cells of the matrix at `path`, moved to a dataset of `spec`."""
    cells = matrix.cells(matrix.with_dataset(matrix.load(path), "x.npz"))
    out = {c.id: BY_BLOCK[c.block].fits(c, spec) for c in cells}
    return {k: v for k, v in out.items() if v is not None}


@pytest.mark.parametrize("path", [DEFAULT_MATRIX, QUICK_MATRIX], ids=["full", "quick"])
def test_every_cell_fits_the_studys_data(path):
    assert unfit(path, STUDY_SPEC) == {}


@pytest.mark.parametrize("path", [DEFAULT_MATRIX, QUICK_MATRIX], ids=["full", "quick"])
def test_the_study_blocks_need_the_studys_data(path):
    cells = matrix.cells(matrix.with_dataset(matrix.load(path), "x.npz"))
    skipped = unfit(path, FOUR)
    assert {c.block for c in cells if c.id in skipped} == STUDY_BLOCKS
    assert all("28x28x1 images of 10 classes, found 12x12x1 of 4" in skipped[c.id]
               for c in cells if c.block in STUDY_BLOCKS)


def test_a_target_class_or_patch_the_data_lacks_is_named():
    skipped = unfit(QUICK_MATRIX, TWO)
    by_block = {k.split("/")[0]: v for k, v in skipped.items()}
    assert "class 0..1, found 3" in " ".join(skipped.values())  # the sweeps' target 3
    assert "patch" in by_block["detect"] and "3x3" in by_block["detect"]
    assert not any(k.startswith("defense/") for k in skipped)  # its attacks need 2 classes


def _npz(path, k: int, side: int) -> None:
    rng = np.random.default_rng(0)

    def part(n):
        y = rng.integers(0, k, n)
        x = rng.integers(0, 80, (n, side, side)).astype(np.uint8)
        x[np.arange(n), y % side] = 240  # a bright row whose place is the class
        return x, y

    (xt, yt), (xe, ye) = part(300), part(60)
    np.savez(path, x_train=xt, y_train=yt, x_test=xe, y_test=ye)


@pytest.mark.slow
def test_a_run_lists_what_it_skipped(tmp_path):
    """A small matrix (E1 and the grid) on a 4-class dataset: E1 is skipped and listed in
    run.json and tables.md; the grid runs on the dataset; no sentence claims 10 classes."""
    from mlshift_jax.bench import report, runner

    _npz(tmp_path / "four.npz", 4, 12)
    (tmp_path / "m.toml").write_text(
        '[matrix]\ndatasets = ["mnist"]\nmodels = ["seed-mlp"]\nattacks = ["none", "fgsm"]\n'
        'eps = [0.1]\nhidden = 8\n\n[timing]\nrounds = 1\nmax_seconds = 1.0\n\n'
        '[e1]\nmodels = ["seed-mlp"]\n')
    records = runner.run(tmp_path / "m.toml", out_dir=tmp_path / "out",
                         dataset=str(tmp_path / "four.npz"))
    run = records.attrs["run"]
    assert set(records["block"]) == {"matrix"} and len(records) == 2
    assert run["skipped_cells"] == 1 and run["skipped_blocks"][0]["block"] == "e1"
    report.write(records, tmp_path / "out")
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert info["skipped_cells"] == 1 and "12x12x1 of 4" in info["skipped_blocks"][0]["reason"]
    tables = (tmp_path / "out" / "tables.md").read_text()
    assert "[e1] on " in tables and "SKIPPED" in tables and "10 classes)" not in tables


@pytest.mark.slow
def test_e3_lists_each_row_once_when_the_data_has_fewer_test_images(tmp_path):
    """[e3] asks for 10,000 and 6,000 test images; a dataset with fewer (the bundled
    sample's 2,000; here 60) gives both the same images: one table of all of them, each
    (attack, eps) once."""
    from mlshift_jax.bench import report, runner

    (tmp_path / "m.toml").write_text(
        '[matrix]\ndatasets = ["mnist"]\nmodels = ["seed-mlp"]\nattacks = ["none"]\n'
        'eps = [0.0]\nhidden = 8\nn_train = 300\n\n[timing]\nrounds = 1\nmax_seconds = 1.0\n\n'
        '[e3]\nattacks = ["fgsm"]\neps = [0.0, 0.1]\nn_test = [10000, 6000]\nhidden = 8\n'
        'n_train = 300\n')
    _npz(tmp_path / "digits.npz", 10, 28)
    records = runner.run(tmp_path / "m.toml", out_dir=tmp_path / "out",
                         dataset=str(tmp_path / "digits.npz"))
    report.write(records, tmp_path / "out")
    text = (tmp_path / "out" / "tables.md").read_text()
    e3 = text[text.index("## E3"):text.index("## E4")]
    assert e3.count("### E3 on") == 1 and "### E3 on all 60 " in e3
    assert [line.split("|")[1].strip() for line in e3.splitlines()
            if line.startswith("| fgsm")] == ["fgsm", "fgsm"]
