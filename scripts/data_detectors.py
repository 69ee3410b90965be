"""Time and score the detection bench's training-data table on its own.

Trains the detection bench's population (FULL settings: seed-mlp, hidden 200, 10,000-image
samples) for `seeds` seeds with the FULL poisonings plus a 10% BadNets mixture, then runs
`detection_bench._training_data_table` on the poisoned members only, and prints its wall and
CPU seconds, peak memory and the table (precision, recall, ROC-AUC per detector and change).

    MLSHIFT_DATA_DIR=/path/to/mnist python scripts/data_detectors.py [seeds]
"""

from __future__ import annotations

import resource
import sys
import time

import jax
import pandas as pd
from threadpoolctl import threadpool_limits

from mlshift_jax.bench import detection_bench as db
from mlshift_jax.data import datasets
from mlshift_jax.models.population import plan_for
from mlshift_jax.models.recipes import TrainConfig
from mlshift_jax.models.retrain import train_sampled


def main(seeds: int = 10) -> None:
    ds = datasets.load("mnist")
    cfg = db.BenchConfig(seeds=max(seeds, 2), poisonings=db.FULL.poisonings + (
        ("mixture", 0.1),), clean_per_seed=1, n_null=2)
    members = db._Members(cfg, 0)
    plan = plan_for(cfg.recipe, TrainConfig(hidden=cfg.hidden), ds.spec)
    clock = time.perf_counter()
    pop, idx = train_sampled(plan, members.configs, ds.x_train, ds.y_train,
                             seeds=members.table["member_seed"].tolist(),
                             size=cfg.sample_size, chunk=8)
    print(f"trained {len(members.configs)} members in {time.perf_counter() - clock:.1f} s")
    table = members.table
    poisoned = (table["role"] == "suspect") & (table["label"] != db.CLEAN)
    n = int(poisoned.sum())
    with threadpool_limits(limits=1, user_api="blas"):
        wall, cpu = time.perf_counter(), time.process_time()
        out = db._training_data_table(cfg, ds, members, pop, idx, jax.random.key(1))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"training-data table: {wall:.1f} s wall, {cpu:.1f} s CPU for {n} poisoned members;"
          f" peak RSS {peak:.0f} MB")
    with pd.option_context("display.width", 200):
        print(out.to_string())


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
