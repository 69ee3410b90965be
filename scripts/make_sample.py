"""Build the bundled MNIST sample, mlshift_jax/data/_sample/mnist_sample.npz, from a full MNIST.

Stratified by class and seeded: each class keeps its share of the full split (largest
remainder), images drawn without replacement and kept in file order. Stored as uint8 with
np.savez_compressed, with the indices into the full files so the sample can be checked.

    MLSHIFT_DATA_DIR=~/data/mnist python scripts/make_sample.py
    python scripts/make_sample.py --data-dir ~/data/mnist --train 10000 --test 2000 --seed 0
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from mlshift_jax.core.errors import MlshiftError
from mlshift_jax.data.datasets import read_dir

N_CLASSES = 10  # MNIST's digits
OUT = Path(__file__).resolve().parents[1] / "mlshift_jax/data/_sample/mnist_sample.npz"


def stratified(rng: np.random.Generator, y: np.ndarray, size: int) -> np.ndarray:
    """`size` indices into labels y [n], each class in proportion to its count, sorted: [size]."""
    counts = np.bincount(y, minlength=N_CLASSES)
    share = counts * size / len(y)
    quota = np.floor(share).astype(int)
    by_remainder = np.argsort(-(share - quota), kind="stable")
    quota[by_remainder[: size - quota.sum()]] += 1
    picks = [rng.choice(np.flatnonzero(y == c), size=q, replace=False) for c, q in enumerate(quota)]
    return np.sort(np.concatenate(picks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("MLSHIFT_DATA_DIR"))
    parser.add_argument("--train", type=int, default=10_000)
    parser.add_argument("--test", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if not args.data_dir:
        print(
            "error: the full MNIST is needed: set MLSHIFT_DATA_DIR or pass --data-dir",
            file=sys.stderr,
        )
        return 2
    try:
        x_train, y_train, x_test, y_test = read_dir(args.data_dir, "mnist")
    except MlshiftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rng = np.random.default_rng(args.seed)
    train_index = stratified(rng, y_train, args.train)
    test_index = stratified(rng, y_test, args.test)
    index_type = np.min_scalar_type(len(y_train) - 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.stem}.tmp.npz")  # replaced into place once written
    np.savez_compressed(
        tmp,
        x_train=x_train[train_index],
        y_train=y_train[train_index].astype(np.uint8),
        x_test=x_test[test_index],
        y_test=y_test[test_index].astype(np.uint8),
        train_index=train_index.astype(index_type),
        test_index=test_index.astype(index_type),
        seed=np.int64(args.seed),
    )
    os.replace(tmp, args.out)
    print(
        f"{args.out}: {len(train_index)} train / {len(test_index)} test images, "
        f"{args.out.stat().st_size} bytes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
