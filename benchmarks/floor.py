"""How close JAX FGSM runs to this machine's floor, and how fast a big population trains.

Measured in one run, on whatever backend JAX has (CPU, GPU, TPU):
- the machine's matmul rate (a float32 GEMM at default precision, as FGSM runs) and memory
  bandwidth (a device-side copy);
- FGSM over N images on the study's MLP (hidden 200); its floor is the larger of
  FLOPs / matmul rate and bytes moved / bandwidth; we report time / floor;
- a population of M seed-mlp models trained together for one per-sample epoch.

    python benchmarks/floor.py [--images 60000] [--population 1000] [--out results/<platform>]

Writes floor.json and floor.md (atomically) into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.attacks import evasion
from mlshift_jax.bench.report import platform_name
from mlshift_jax.bench.runner import fgsm_flops
from mlshift_jax.core import outdir
from mlshift_jax.core.files import write_text
from mlshift_jax.core.sharding import describe_devices
from mlshift_jax.core.timing import time_call
from mlshift_jax.data import datasets
from mlshift_jax.models.population import chunk_size, device_bytes, host_bytes
from mlshift_jax.models.train import init_population, train_seed_sgd_population
from mlshift_jax.models.zoo import SEED_MLP

N_IN = 784


def matmul_rate(n: int) -> tuple[float, float]:
    """FLOP/s of an n x n x n float32 matmul at default precision; (rate, median seconds)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    t = time_call(jax.jit(jnp.matmul), a, b, rounds=10)
    return 2.0 * n**3 / t.median_s, t.median_s


def bandwidth(n_bytes: int) -> float:
    """Bytes/s of a device-side read + write of n_bytes (x * 1.0001 over a float32 array)."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    t = time_call(jax.jit(lambda v: v * 1.0001), x, rounds=10)
    return 2.0 * n_bytes / t.median_s


def fgsm_cost(n: int, hidden: int) -> tuple[float, float]:
    """(FLOPs, bytes) of FGSM on the seed MLP for n images: its 4 matmuls (`fgsm_flops`);
    reads x once and writes x_adv once (float32), the weights are negligible."""
    return float(fgsm_flops(n, hidden, N_IN, 10)), 2.0 * 4.0 * n * N_IN


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60_000)
    parser.add_argument("--population", type=int, default=1000)
    parser.add_argument("--population-size", type=int, default=60_000,
                        help="training images per population member (one epoch)")
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--gemm", type=int, default=4096, help="side of the matmul probe")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    out = Path(args.out or Path("results") / platform_name())
    print(f"floor: {describe_devices()}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = datasets.load("mnist")
    reps = -(-args.images // len(ds.x_train))
    x = jax.device_put(np.tile(ds.x_train, (reps, 1))[: args.images])
    y = jax.device_put(np.tile(ds.y_train, reps)[: args.images])
    params = SEED_MLP.init(jax.random.key(0), n_hidden=args.hidden)

    rate, _ = matmul_rate(args.gemm)
    bw = bandwidth(256 * 2**20)
    fgsm_t = time_call(lambda: evasion.fgsm(SEED_MLP, params, x, y, eps=0.1), rounds=10)
    flops, n_bytes = fgsm_cost(args.images, args.hidden)
    floor_s = max(flops / rate, n_bytes / bw)

    size = min(args.population_size, len(ds.x_train))
    keys = jax.random.split(jax.random.key(1), args.population)
    pop = init_population(SEED_MLP, keys, n_hidden=args.hidden)
    xt, yt = jax.device_put((ds.x_train[:size], ds.y_train[:size]))
    start = time.perf_counter()
    pop_t = time_call(lambda: train_seed_sgd_population(pop, xt, yt, lr=0.1), rounds=3)
    wall = time.perf_counter() - start
    # the chunk rule the poisoning sweeps follow (population.chunk_size): how many members'
    # poisoned copies of the training set one vmap holds on this device, at this run's size
    # and at the full 60,000 images
    memory = host_bytes() if jax.default_backend() == "cpu" else device_bytes()
    chunk = chunk_size(args.population, size, N_IN)
    chunk_full = chunk_size(args.population, 60_000, N_IN)

    result = {
        "platform": platform_name(), "devices": describe_devices(), "data_source": ds.source,
        "matmul_flops_per_s": rate, "bandwidth_bytes_per_s": bw,
        "fgsm_images": args.images, "fgsm_median_s": fgsm_t.median_s,
        "fgsm_compile_s": fgsm_t.compile_s, "fgsm_flops": flops, "fgsm_bytes": n_bytes,
        "fgsm_floor_s": floor_s, "fgsm_over_floor": fgsm_t.median_s / floor_s,
        "population_models": args.population, "population_images": size,
        "population_epoch_median_s": pop_t.median_s, "population_compile_s": pop_t.compile_s,
        "population_wall_s": wall, "chunk_memory_bytes": memory,
        "population_chunk": chunk, "population_chunk_60000": chunk_full,
    }
    # a results folder of its own, like bench --out: floor's two files are listed in its
    # manifest before they are written, so the bench run that follows may write there too
    out = outdir.claim(out)
    outdir.record(out, files=[out / "floor.json", out / "floor.md"])
    write_text(out / "floor.json", json.dumps(result, indent=2) + "\n")
    write_text(out / "floor.md", "\n".join([
        f"# Floor check on {result['platform']} ({result['devices']})", "",
        "| measure | value |", "|---|---|",
        f"| matmul rate (float32, default precision, {args.gemm}^3) | {rate / 1e12:.2f} TFLOP/s |",
        f"| memory bandwidth (copy) | {bw / 1e9:.0f} GB/s |",
        f"| FGSM, {args.images} images, hidden {args.hidden} | {fgsm_t.median_s * 1e3:.3f} ms |",
        f"| FGSM floor max(FLOPs/rate, bytes/bandwidth) | {floor_s * 1e3:.3f} ms |",
        f"| FGSM / floor | {result['fgsm_over_floor']:.2f}x |",
        f"| {args.population} seed-mlp models, one per-sample epoch of {size} images "
        f"| {pop_t.median_s:.3f} s (compile {pop_t.compile_s:.1f} s) |",
        f"| chunk rule: members per vmap, {args.population} poisoned copies of {size} / "
        f"60,000 images in {memory / 2**30:.0f} GiB | {chunk} / {chunk_full} |", ""]))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
