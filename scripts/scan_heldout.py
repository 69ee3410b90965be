"""The held-out scan-model table (`bench/scan_bench.py`, what `make bench` writes for seed-mlp)
for another recipe, on its own: the cnn row that does not fit the bench's 20 minutes on a
2-core CPU.

Builds the same table as the bench's "scan-model" cell (the FULL settings: a null of 104
benign models, 2 held-out models of each benign variant, 3 backdoors per trigger family and
rate at 1%, 5% and 10%) with `--recipe` in place of seed-mlp, prints it as `tables.md` does,
with the wall seconds and peak memory, and writes the markdown to `--out` when given.

    MLSHIFT_DATA_DIR=/path/to/mnist python scripts/scan_heldout.py --recipe cnn [--out cnn.md]

--quick: the bench's QUICK settings (`make bench-quick`'s table: 20 models in the null,
2,000 training images each), for a trial run in a minute or two.

On 2 CPU cores at full MNIST, a cnn table trains and scans 166 cnns: about half an hour.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import time

from mlshift_jax.bench import scan_bench
from mlshift_jax.bench.experiments import detect as report
from mlshift_jax.core.files import write_text
from mlshift_jax.data import datasets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="cnn", help="a built-in recipe (default cnn)")
    parser.add_argument("--sample-size", type=int, default=None,
                        help="training images of each model (default: all, as the CLI)")
    parser.add_argument("--seed", type=int, default=0, help="the bench's seed is 0")
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--quick", action="store_true", help="the bench's QUICK settings")
    args = parser.parse_args(argv)
    ds = datasets.load("mnist")
    base = scan_bench.QUICK if args.quick else scan_bench.FULL
    cfg = dataclasses.replace(base, recipe=args.recipe,
                              sample_size=args.sample_size or base.sample_size)
    start = time.perf_counter()
    tables = scan_bench.scan_table(ds, seed=args.seed, config=cfg)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    text = (f"{args.recipe}, seed {args.seed}: {seconds:.0f} s, peak RSS {peak:.2f} GiB\n"
            + report._scan_model(tables))
    print(text)
    if args.out:
        write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
