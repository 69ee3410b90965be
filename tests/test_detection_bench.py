"""The detection benchmark's memory rule: the population is chunked to fit a memory cap.

Pure arithmetic and a stubbed trainer: no timing or memory measured on real runs.
"""

from __future__ import annotations

import pytest

from mlshift_jax.bench import detection_bench
from mlshift_jax.core.errors import ConfigError
from tests.test_categorize import TINY

MIB = 2**20


def _bytes(chunk: int, size: int, n: int, d: int) -> int:
    """What `population_chunk` counts: the shared set plus each member's two copies."""
    return n * d * 4 + chunk * 2 * size * d * 4


@pytest.mark.parametrize("m, size, n, d, cap", [
    (129, 10_000, 60_000, 784, 2**30),   # FULL on the full MNIST, the default cap
    (129, 10_000, 10_000, 784, 2**30),   # FULL on the bundled sample
    (129, 10_000, 60_000, 784, 3 * 2**30),
    (20, 1000, 10_000, 784, 64 * MIB),
    (5, 100, 1000, 64 * 64 * 3, 2**30),  # a small population of larger images: all at once
])
def test_population_chunk_fits_the_cap(m, size, n, d, cap):
    chunk = detection_bench.population_chunk(m, size, n, d, cap)
    assert 1 <= chunk <= m
    assert _bytes(chunk, size, n, d) <= cap
    assert chunk == m or _bytes(chunk + 1, size, n, d) > cap  # the largest that fits


def test_population_chunk_is_one_when_nothing_fits():
    assert detection_bench.population_chunk(129, 10_000, 60_000, 784, MIB) == 1
    with pytest.raises(ConfigError, match="expected m, size, n, d"):
        detection_bench.population_chunk(0, 10, 10, 10, MIB)
    with pytest.raises(ConfigError, match="memory_cap"):
        detection_bench.with_overrides(TINY, memory_cap=0)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("cap_members", [1, 3, 100])
def test_run_trains_the_population_within_the_cap(mnist, monkeypatch, cap_members):
    """run() hands train_sampled the chunk that fits its memory_cap (the trainer stubbed)."""
    n, d = len(mnist.y_train), mnist.x_train.shape[1]
    size = min(TINY.sample_size, n)
    cap = _bytes(cap_members, size, n, d)
    seen = {}

    def fake_train(plan, configs, x, y, *, seeds, size, chunk=None):
        seen.update(m=len(configs), size=size, chunk=chunk)
        raise _Stop

    monkeypatch.setattr(detection_bench, "train_sampled", fake_train)
    with pytest.raises(_Stop):
        detection_bench.run(mnist, config=detection_bench.with_overrides(TINY, memory_cap=cap))
    assert seen["size"] == size and seen["chunk"] == min(cap_members, seen["m"])
    assert _bytes(seen["chunk"], size, n, d) <= cap


def test_parts_and_data_seeds_are_checked(mnist):
    with pytest.raises(ConfigError, match="parts among"):
        detection_bench.run(mnist, config=TINY, parts=("detector",))
    with pytest.raises(ConfigError, match="parts among"):
        detection_bench.run(mnist, config=TINY, parts=())
    with pytest.raises(ConfigError, match="parts a tuple"):
        detection_bench.run(mnist, config=TINY, parts=None)
    with pytest.raises(ConfigError, match=r"found \['scan_model'\]"):
        detection_bench.run(mnist, config=TINY, parts="scan_model")  # one name, misspelt
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="data_seeds"):
            detection_bench.with_overrides(TINY, data_seeds=bad)


@pytest.mark.slow
def test_training_data_detectors_scan_only_the_first_data_seeds(mnist, monkeypatch):
    """data_seeds=1 of 2 seeds: one scan per poisoning, every poisoning still in the table;
    the "detectors" part alone has no scan-model or leave-one-family-out table."""
    from mlshift_jax.detection import detect_data

    calls = []
    real = detect_data.scan

    def counting(*args, **kw):
        calls.append(kw["eps"])
        return real(*args, **kw)

    monkeypatch.setattr(detection_bench.detect_data, "scan", counting)
    cfg = detection_bench.with_overrides(TINY, data_seeds=1)
    out = detection_bench.run(mnist, config=cfg, parts=("detectors",))
    assert len(calls) == len(cfg.poisonings)
    labels = {detection_bench.poison_label(k, f) for k, f in cfg.poisonings}
    assert set(out["training_data"]["change"]) == labels
    assert "categorizer_lofo" not in out and "scan_model" not in out
    assert "categorizer leave-one-family-out" not in out["timing"].index
