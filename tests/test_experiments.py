"""The bench's experiments: the hashes of committed matrices' cells stay put (cached cells
are keyed by them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlshift_jax.bench import matrix

BENCH = Path(__file__).resolve().parents[1] / "bench"

# computed on main at 2a0a46e, before the bench was sliced by experiment: one cell of each
# block of each committed matrix; a cached cell is found by its hash, so these must not move
PINNED = {
    "matrix.toml": {
        "mnist/seed-mlp-numpy/none/0/seed0": "ab18c15a4b7f",
        "e1/mnist/seed-mlp/none/0/seed0": "cb5b14aa0dff",
        "e2/mnist/seed-mlp/stability/seed0": "4eb3e7c7646c",
        "e3/n10000/mnist/seed-mlp/fgsm/0/seed0": "27c92d1230d6",
        "speed/mnist/fgsm": "4c3d73c3ff5b",
        "poison/mnist/seed-mlp/E4/seed0": "4b92f7257742",
        "detect/mnist/seed0/detectors": "e5c88272714b",
        "defense/mnist/seed-mlp/none/seed0": "0c5063e15b16",
    },
    "matrix-quick.toml": {
        "mnist/seed-mlp-numpy/none/0/seed0": "d7ffcd6d2012",
        "e1/mnist/seed-mlp/none/0/seed0": "44e0a1ab786b",
        "e2/mnist/seed-mlp/stability/seed0": "785c3c47560a",
        "e3/n1000/mnist/seed-mlp/fgsm/0/seed0": "aca26d7c1f0e",
        "speed/mnist/fgsm": "0917419c57d6",
        "poison/mnist/seed-mlp/E4/seed0": "1f79dd2e51e5",
        "detect/mnist/seed0/detectors": "a30e8a594219",
        "defense/mnist/mlp-ce/none/seed0": "2e6e260959cc",
    },
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_committed_matrices_keep_their_cell_hashes(name):
    hashes = {c.id: c.hash for c in matrix.cells(matrix.load(BENCH / name))}
    assert {i: hashes.get(i) for i in PINNED[name]} == PINNED[name]
