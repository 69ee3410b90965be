"""The runner end to end on a tiny matrix: records, report files, resume, determinism.

Never asserts on speed: timings are only checked for shape and sign.
"""

from __future__ import annotations

import contextlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from mlshift_jax.bench import context as bench_context
from mlshift_jax.bench import matrix, report, runner
from mlshift_jax.bench.experiments import detect as detect_exp
from mlshift_jax.bench.experiments import grid
from mlshift_jax.bench.experiments import poison as poison_exp
from mlshift_jax.bench.experiments import speed as speed_exp
from mlshift_jax.core.errors import ConfigError, DataError
from mlshift_jax.data import datasets
from mlshift_jax.models.metrics import SCORE_NAMES, scores_from_outputs

TINY = """
[matrix]
datasets = ["mnist"]
models = ["seed-mlp"]
attacks = ["none", "fgsm"]
eps = [0.1, 0.2]
hidden = 16
n_train = 500
n_test = 200

[timing]
rounds = 2
"""

BLOCKS = """
[e1]
models = ["seed-mlp"]
hidden = 16
lr = 0.1
epochs = 1

[e2]
samples = 2
size = 100
hidden = 16

[e3]
model = "seed-mlp"
attacks = ["fgsm", "noise-sign"]
eps = [0.0, 0.1]
n_test = [200, 100]
hidden = 16

[speed]
workloads = ["fgsm", "pgd", "autoattack", "epoch-per-sample", "epoch-minibatch", "metrics",
             "population"]
hidden = 16
numpy_loop_images = 20
numpy_epoch_samples = 40
population = 2
population_size = 100
detect_null = 2
scan_models = 2
scan_steps = 5

[poison]
sweeps = ["E7"]
badnets_models = ["seed-mlp"]
hidden = 8
n_train = 300
"""

SCORES = list(SCORE_NAMES)
pytestmark = pytest.mark.filterwarnings("ignore::mlshift_jax.data.datasets.SampleDataWarning")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(matrix path, out dir, records of a first run)."""
    root = tmp_path_factory.mktemp("tiny")
    path = root / "tiny.toml"
    path.write_text(TINY)
    out = root / "out"
    return path, out, runner.run(path, out_dir=out)


def test_tiny_matrix_end_to_end(tiny):
    path, out, records = tiny
    assert list(records["id"]) == [c.id for c in matrix.cells(matrix.load(path))]
    assert set(records["status"]) == {"computed"}
    assert (records["n_train"] == 500).all() and (records["n_test"] == 200).all()
    assert records[SCORES].notna().all().all()
    assert ((records[SCORES] >= 0) & (records[SCORES] <= 1)).all().all()
    assert (records["rounds"] >= 1).all() and (records["median_s"] > 0).all()
    assert (records["compile_s"] >= 0).all() and (records["train_s"] > 0).all()
    assert (records["compile_s"] > 0).any()  # JAX's own compile time: 0 once compiled
    clean = records.set_index("attack").loc["none"]
    assert clean["accuracy"] == clean["clean_accuracy"] and clean["linf"] == 0
    fgsm = records[records["attack"] == "fgsm"]
    assert np.allclose(fgsm["linf"], fgsm["eps"], atol=1e-6)
    assert fgsm["accuracy"].max() < clean["accuracy"]
    run = records.attrs["run"]
    assert run["computed"] == 3 and run["reused"] == 0 and run["wall_s"] > 0
    assert run["datasets"]["mnist"]["source"]

    paths = report.write(records, out)
    for name in ("tables.md", "records.csv", "run.json"):
        assert (out / name).is_file() and out / name in paths
    tables = (out / "tables.md").read_text()
    assert "## Pairings: mnist" in tables and "No E1 cells" in tables
    info = json.loads((out / "run.json").read_text())
    for key in ("versions", "backend", "device_kind", "device_count", "cpu_count",
                "git_commit", "date", "wall_s", "datasets"):
        assert key in info, key
    assert {"jax", "jaxlib", "numpy", "optax"} <= set(info["versions"])
    csv = pd.read_csv(out / "records.csv")
    assert set(csv["id"]) == set(records["id"]) and "images" not in set(csv["measure"])
    assert (csv.groupby("id")["measure"].nunique() > 10).all()  # one row per cell x measure


def test_resume_reruns_only_the_missing_cell(tiny):
    path, out, first = tiny
    victim = first.iloc[1]
    (out / runner.CACHE_DIR / "cells" / f"{victim['hash']}.json").unlink()
    again = runner.run(path, out_dir=out)
    status = dict(zip(again["id"], again["status"], strict=True))
    assert status.pop(victim["id"]) == "computed"
    assert set(status.values()) == {"reused"}
    assert again.attrs["run"]["computed"] == 1
    assert again[SCORES].equals(first[SCORES])


def test_force_reruns_everything_with_identical_scores(tiny):
    path, out, first = tiny
    again = runner.run(path, out_dir=out, force=True)
    assert set(again["status"]) == {"computed"}
    assert again[SCORES].equals(first[SCORES])  # exact: same config + seed, same numbers


def test_only_selects_cells(tiny):
    path, out, _ = tiny
    some = runner.run(path, out_dir=out, only="mnist/seed-mlp/fgsm/*")
    assert list(some["id"]) == ["mnist/seed-mlp/fgsm/0.1/seed0", "mnist/seed-mlp/fgsm/0.2/seed0"]
    assert list(runner.run(path, out_dir=out, only="/none/")["id"]) == [
        "mnist/seed-mlp/none/0/seed0"]
    with pytest.raises(ConfigError, match="no cell id matches"):
        runner.run(path, out_dir=out, only="cifar/*")


def test_a_missing_dataset_is_skipped_and_reported(tiny, monkeypatch, tmp_path):
    path, out, first = tiny
    real = datasets.load

    def load(name, *args, **kw):
        if name == "fashion-mnist":
            raise DataError("fashion-mnist: expected its files; found none")
        return real(name, *args, **kw)

    monkeypatch.setattr(datasets, "load", load)
    both = path.with_name("both.toml")
    both.write_text(TINY.replace('["mnist"]', '["mnist", "fashion-mnist"]'))
    records = runner.run(both, out_dir=out)  # the mnist cells come from the cache
    assert set(records["dataset"]) == {"mnist"} and set(records["status"]) == {"reused"}
    assert "fashion-mnist" in records.attrs["run"]["skipped"]
    text = report.tables_markdown(records)
    assert "fashion-mnist: SKIPPED" in text and "## Pairings: fashion-mnist" in text

    monkeypatch.setattr(datasets, "load", lambda *a, **k: (_ for _ in ()).throw(DataError("no")))
    with pytest.raises(DataError, match="no dataset"):
        runner.run(both, out_dir=tmp_path)


@pytest.mark.slow
def test_every_block_runs_tiny(tmp_path):
    path = tmp_path / "blocks.toml"
    path.write_text(TINY + BLOCKS)
    records = runner.run(path, out_dir=tmp_path / "out")
    kinds = records.groupby("block")["kind"].first().to_dict()
    assert kinds == {"matrix": "attack", "e1": "attack", "e2": "stability", "e3": "attack",
                     "speed": "speed", "poison": "poison"}
    # E1 and the grid's clean cell are the same computation: one hash, one result
    e1 = records[records["block"] == "e1"].iloc[0]
    grid = records.set_index("id").loc["mnist/seed-mlp/none/0/seed0"]
    assert e1["hash"] == grid["hash"] and e1["accuracy"] == grid["accuracy"]
    e2 = records[records["block"] == "e2"].iloc[0]
    assert e2["detail"]["table"]["index"][:2] == ["sample 1", "sample 2"]
    speed = records[records["kind"] == "speed"].set_index("workload")
    assert set(speed.index) == set(speed_exp.WORKLOADS) - {"detection"}  # its own test
    for workload, r in speed.iterrows():
        rows = [row for row in r["detail"]["rows"] if not row.get("missing")]
        assert all(row["median_s"] > 0 and row["rounds"] >= 1 for row in rows), workload
        assert sum(row["ref"] for row in rows) == (
            0 if workload in ("epoch-minibatch", "detection", "autoattack") else 1)
        torch_rows = [row for row in r["detail"]["rows"] if row["impl"].startswith("torch")]
        if workload in ("fgsm", "pgd", "epoch-per-sample", "epoch-minibatch"):
            assert torch_rows and all(row["task"] for row in torch_rows), workload
            assert all(row.get("missing") for row in torch_rows) != speed_exp.torch_peer.available()
    minibatch = speed.loc["epoch-minibatch"]["detail"]
    assert minibatch["extra"]["gemm_gflop_per_s"] > 0
    epochs = [row for row in minibatch["rows"] if "over_floor" in row]
    assert {row["task"] for row in epochs} == {"mlp-sgd", "mlp-ce"}
    assert all(row["over_floor"] > 0 and row["over_matmuls"] > 0 for row in epochs)
    assert speed.loc["pgd"]["detail"]["extra"]["agree_with_numpy"] > 0.99
    fgsm = speed.loc["fgsm"]["detail"]
    assert fgsm["extra"]["agree_with_numpy"] > 0.99
    loop = next(row for row in fgsm["rows"] if "loop" in row["impl"])
    assert (loop["n_timed"], loop["n"], loop["scale"]) == (20, 200, 10)
    assert speed.loc["metrics"]["detail"]["extra"]["max_abs_diff"] < 1e-5
    aa = speed.loc["autoattack"]["detail"]["extra"]
    assert 0.0 <= aa["robust_accuracy"] <= 1.0
    if speed_exp.torch_peer.torchattacks_available():
        assert aa["agreement"] >= 0.9  # the close bound is test_autoattack's oracle test

    poison = records[records["kind"] == "poison"].set_index("id")
    assert list(poison.index) == ["poison/mnist/seed-mlp/E7/seed0",
                                  "poison/mnist/seed-mlp/badnets/seed0"]
    e7 = poison_exp.poison_tables(records)["E7"]
    assert list(e7["fraction"]) == [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8]
    assert e7["poisoned_count"].iloc[-1] > 0 and e7["asr"].notna().all()

    paths = report.write(records, tmp_path / "out")
    tables = (tmp_path / "out" / "tables.md").read_text()
    for title in ("## E1", "## E2", "### E3 on the first 200", "### E3 on the first 100",
                  "## Speed", "speed-up vs numpy", "GEMM floor", "## E4–E7", "### E7",
                  "### badnets", "ours vs the study"):
        assert title in tables, title
    assert {"poison_proportion.png", "poison_examples.png"} <= {p.name for p in paths}


# --- pieces ------------------------------------------------------------------------------------


def test_numpy_scores_match_jax():
    rng = np.random.default_rng(0)
    outputs = rng.random((300, 10)).astype(np.float32)
    y = rng.integers(0, 10, 300)
    y[y == 7] = 3  # a class absent from y_true: zero_division=0
    ours = speed_exp.numpy_scores(outputs, y)
    theirs = scores_from_outputs(jnp.asarray(outputs), jnp.asarray(y))
    for name in SCORE_NAMES:
        assert ours[name] == pytest.approx(float(theirs[name]), abs=1e-6), name


def test_gemm_floor_has_fgsm_flops():
    a, b = speed_exp.gemm_floor_operands(5, 16, 784, 10)
    assert a.dtype == b.dtype == np.float32
    assert 2 * a.shape[0] * a.shape[1] * b.shape[1] == speed_exp.fgsm_flops(5, 16, 784, 10)
    assert speed_exp.fgsm_flops(5, 16, 784, 10) == 2 * 5 * (784 * 16 + 16 * 10) * 2
    assert speed_exp.fgsm_flops(5, 16, 192, 5) == 2 * 5 * (192 * 16 + 16 * 5) * 2


def _fake_interleaved(spreads):
    """A stand-in for timing.interleaved whose n-th timed call has spread spreads[n]."""
    from mlshift_jax.core.timing import _stats

    calls = []

    def fake(fns, *, rounds, warmup=1, sync=None):
        calls.append(rounds)
        s = spreads[min(len(calls) - 2, len(spreads) - 1)] if len(calls) > 1 else 0.0
        times = [1.0] * rounds if rounds == 1 else [1.0 - s / 2, 1.0, 1.0 + s / 2]
        return {name: _stats(0.5 if warmup else None, times) for name in fns}

    return fake, calls


@pytest.mark.parametrize("spreads, attempts, noisy", [
    ([0.1], 1, False),            # quiet: one attempt
    ([0.9, 0.2], 2, False),       # noisy, then quiet: rerun once
    ([0.9, 0.8, 0.7], 3, True),   # noisy throughout: two reruns, the least noisy kept, flagged
])
def test_compare_reruns_a_noisy_comparison(monkeypatch, spreads, attempts, noisy):
    fake, calls = _fake_interleaved(spreads)
    monkeypatch.setattr(speed_exp, "interleaved", fake)
    impls = [speed_exp._Impl("jax", lambda: 1, task="t"),
             speed_exp._Impl("numpy", lambda: 1, ref=True, compiled=False, task="t")]
    rows, facts = speed_exp._compare(impls, 10, rounds=3, max_seconds=60.0)
    assert (facts["attempts"], facts["noisy"]) == (attempts, noisy)
    assert facts["worst_spread"] == pytest.approx(min(spreads[:attempts]))
    assert calls == [1] + [3] * attempts  # the first timed pass, then the timed attempts
    # the JAX row's compiling call timed apart (none for numpy, which compiles nothing)
    assert rows[0]["compile_s"] >= 0.0 and rows[1]["compile_s"] is None
    assert all(r["attempts"] == attempts and r["noisy"] == noisy for r in rows)


def test_compare_bounds_rounds_by_the_slowest_call(monkeypatch):
    fake, calls = _fake_interleaved([0.0])
    monkeypatch.setattr(speed_exp, "interleaved", fake)
    impls = [speed_exp._Impl("a", lambda: 1)]
    speed_exp._compare(impls, 1, rounds=10, max_seconds=1e-9)
    assert calls[-1] == speed_exp.MIN_ROUNDS
    speed_exp._compare(impls, 1, rounds=10, max_seconds=1e-9, min_rounds=1)
    assert calls[-1] == 1


def test_without_torch_the_peer_rows_say_not_installed(mnist, monkeypatch):
    from mlshift_jax.bench.experiments.speed import SpeedConfig

    monkeypatch.setattr(speed_exp.torch_peer, "available", lambda: False)
    ds = bench_context.capped(mnist, 100, 50)
    cfg = SpeedConfig(dataset="mnist", workload="pgd", hidden=8, lr=0.1, eps=0.1, seed=0,
                      n_train=100, n_test=50, numpy_loop_images=10, numpy_epoch_samples=10,
                      population=2, population_size=50, rounds=1, max_seconds=1.0)
    rows, extra = speed_exp._speed_pgd(ds, cfg)
    torch_row = next(r for r in rows if r["impl"].startswith("torch"))
    assert torch_row["missing"] and torch_row["note"] == "not installed"
    assert torch_row["median_s"] is None and extra["torch"] is None
    assert all(r["median_s"] > 0 for r in rows if not r.get("missing"))


def test_detection_workload_times_calibration_detect_and_scans(mnist, monkeypatch):
    """The plumbing of the detection rows, with the heavy calls replaced by stand-ins (the
    real ones run in `make bench`; detect and scan have their own tests)."""
    from mlshift_jax.bench.experiments.speed import SpeedConfig
    from mlshift_jax.detection import change, neural_cleanse

    seen = {}

    class Null:
        changed_kinds = ("trigger 0.1",) * 3

    def calibrate(recipe, hidden, ds, config, *, cache_path):
        seen["calibrate"] = (recipe, hidden, config.n_null, config.sample_size, cache_path)
        return Null()

    def detect_pair(ref, sus, ds, *, config, cache_path, seed, alpha):
        seen["detect"], seen["alpha"] = cache_path, alpha
        return {"verdict": "unchanged"}

    monkeypatch.setattr(change, "calibrate", calibrate)
    monkeypatch.setattr(change, "detect_pair", detect_pair)
    monkeypatch.setattr(neural_cleanse, "reverse_triggers", lambda *a, **k: seen.setdefault(
        "single", k["config"].steps))
    monkeypatch.setattr(neural_cleanse, "scan_population", lambda m, p, *a, **k: seen.setdefault(
        "population", jax.tree.leaves(p)[0].shape[0]))
    ds = bench_context.capped(mnist, 100, 50)
    cfg = SpeedConfig(dataset="mnist", workload="detection", hidden=8, lr=0.1, eps=0.1, seed=0,
                      n_train=100, n_test=50, numpy_loop_images=10, numpy_epoch_samples=10,
                      population=2, population_size=50, rounds=2, max_seconds=1.0,
                      detect_null=3, scan_models=3, scan_steps=7)
    rows, extra = speed_exp._speed_detection(ds, cfg)
    assert [r["task"] for r in rows] == ["calibration", "detect", "detect", "scan", "scan"]
    assert seen["calibrate"][:4] == ("seed-mlp", 8, 3, 100)
    assert seen["detect"] == seen["calibrate"][4]  # the detect call finds the cached one
    assert seen["alpha"] >= 1 / (3 + 1)  # a level a 3-model null can reach
    assert (seen["single"], seen["population"]) == (7, 3)
    assert rows[0]["n"] == extra["calibration_members"] == 3 + 3
    assert rows[-1]["scale"] == pytest.approx(1 / 3)  # the population row: per model
    assert all(r["median_s"] >= 0 for r in rows)


def test_numpy_pgd_stays_in_the_ball_and_range(mnist):
    rng = np.random.default_rng(0)
    wih, who = rng.normal(0, 0.1, (8, 784)), rng.normal(0, 0.3, (10, 8))
    x = np.clip(np.asarray(mnist.x_test[:20], np.float64), 0.01, 1.0)  # float32's 0.01 < 0.01
    y = np.asarray(mnist.y_test[:20])
    xa = speed_exp.numpy_pgd(wih, who, x, y, 0.1, 0.01, 1.0, steps=3)
    assert np.all(np.abs(xa - x) <= 0.1 + 1e-12) and xa.min() >= 0.01 and xa.max() <= 1.0
    assert np.array_equal(speed_exp.numpy_pgd(wih, who, x, y, 0.0, 0.01, 1.0, steps=3), x)


def test_minibatch_flops_count_the_five_matmuls():
    # forward 784x16 and 16x10, weight gradients the same, the hidden error 10x16
    assert speed_exp.minibatch_flops(3, 4, 784, 16, 10) == 2 * 3 * 4 * (2 * 784 * 16
                                                                     + 3 * 16 * 10)


def test_measure_keeps_output_and_bounds_rounds():
    calls = []

    def fn(a):
        calls.append(a)
        return a * 2

    timing, out = bench_context.measure(fn, 3, rounds=4, max_seconds=1e-12)
    # one call: slower than max_seconds, the first call less its compile is the one round
    assert out == 6 and timing.rounds == 1 and len(calls) == 1
    assert timing.compile_s is not None and timing.median_s >= 0
    timing, _ = bench_context.measure(fn, 3, rounds=4, max_seconds=60, compiled=False)
    assert timing.rounds == 4 and timing.compile_s is None
    calls.clear()
    timing, _ = bench_context.measure(fn, 3, rounds=4, max_seconds=1e-12, compiled=False)
    assert len(calls) == 1 and timing.rounds == 1 and timing.compile_s is None


def test_images_round_trip():
    x = np.linspace(0.01, 1.0, 2 * 784).reshape(2, 784)
    back = grid.decode_images(grid.encode_images(x))
    assert back.shape == (2, 28, 28, 1)  # records without a shape: the study's
    assert np.allclose(back.reshape(2, 784), (x - 0.01) / 0.99, atol=1 / 255)
    rgb = np.linspace(-1.0, 1.0, 2 * 192).reshape(2, 192)  # 8x8x3 in [-1, 1]
    back = grid.decode_images(grid.encode_images(rgb, (-1.0, 1.0)), (8, 8, 3))
    assert back.shape == (2, 8, 8, 3)
    assert np.allclose(back.reshape(2, 192), (rgb + 1) / 2, atol=1 / 255)


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.slow
def test_progress_off_a_terminal_is_one_line_per_finished_cell(tmp_path):
    """A run of the tiny matrix with stderr a plain stream (a log, a pipe): one line per
    computed cell, in order, each with count, elapsed, ETA and the cell's id; no bar."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        records = runner.run(path, out_dir=tmp_path / "out")
    lines = [line for line in log.getvalue().splitlines() if line.startswith("[")]
    assert "\r" not in log.getvalue()
    assert len(lines) == len(records) == 3
    for i, (line, cell) in enumerate(zip(lines, records["id"], strict=True), start=1):
        assert line.startswith(f"[{i}/3]") and "elapsed" in line and "eta" in line, line
        assert cell in line and line.endswith(" s)"), line
    with contextlib.redirect_stderr(again := io.StringIO()):
        runner.run(path, out_dir=tmp_path / "out")  # every cell reused: nothing to report
    assert again.getvalue() == ""


def test_progress_on_a_terminal_is_a_live_bar():
    tty = _Tty()
    shown = runner.Progress(4, tty)
    shown.start("a/b")
    shown.done("a/b")
    assert "a/b" in tty.getvalue() and "1/4" in tty.getvalue() and "\r" in tty.getvalue()
    for _ in range(3):
        shown.done("c")
    shown.close()
    assert "4/4" in tty.getvalue() and tty.getvalue().endswith("\n")


@pytest.mark.slow
def test_detect_cell_lands_in_the_report(tmp_path, monkeypatch):
    """The detection benchmark as a matrix cell (a tiny configuration stands in for QUICK;
    its scan null of 8 leaves each held-out fold 4 others, the 3 a class-conditional
    leave-one-out score needs and one more)."""
    from mlshift_jax.bench import detection_bench, scan_bench
    from mlshift_jax.detection.mm_bd import MarginConfig
    from mlshift_jax.detection.neural_cleanse import ScanConfig
    from tests.test_categorize import TINY as TINY_DETECT

    scan = scan_bench.ScanBenchConfig(hidden=8, sample_size=400, kinds=("patch",),
                                      rates=(0.1,), per_cell=1, n_null=8, alpha=0.9, folds=2,
                                      per_variant=1, images=50,
                                      scan=ScanConfig(steps=5, batch=32),
                                      margin=MarginConfig(steps=5, starts=2), rounds=1)
    monkeypatch.setattr(detection_bench, "QUICK",
                        detection_bench.with_overrides(TINY_DETECT, scan_model=scan))
    path = tmp_path / "detect.toml"
    path.write_text(TINY + '\n[detect]\nquick = true\nseed = 1\n')
    records = runner.run(path, out_dir=tmp_path / "out", only="detect")
    assert list(records["id"]) == [f"detect/mnist/seed1/{part}"
                                   for part in detection_bench.PARTS]
    tables = detect_exp.detection_tables(records)  # the three cells' tables together
    assert {"auc", "change_test", "confusion", "training_data", "categorizer_lofo",
            "scan_model"} <= set(tables)
    stages = set(tables["timing"].index)
    assert {"train population", "categorizer leave-one-family-out",
            "scan-model table"} <= stages
    assert list(tables["auc"].index) == list(detection_bench.ROWS)
    text = report.tables_markdown(records)
    for title in ("## Detection", "ROC-AUC", "fingerprint test", "categorizer",
                  "categorizer-lofo"):
        assert title in text, title
    speed = [row["implementation"] for row in speed_exp._detect_cell_rows(records)]
    assert speed == [f"the detection benchmark cell {part} (mnist)"
                     for part in detection_bench.PARTS]


def test_a_speed_record_without_torch_is_recomputed_once_torch_is_there(monkeypatch):
    missing = {"kind": "speed", "detail": {"rows": [{"impl": "torch: x", "missing": True}]}}
    timed = {"kind": "speed", "detail": {"rows": [{"impl": "torch: x", "median_s": 1.0}]}}
    monkeypatch.setattr(speed_exp.torch_peer, "available", lambda: True)
    assert speed_exp.lacks_peer(missing) and not speed_exp.lacks_peer(timed)
    assert not speed_exp.lacks_peer({"kind": "attack"})
    monkeypatch.setattr(speed_exp.torch_peer, "available", lambda: False)
    assert not speed_exp.lacks_peer(missing)


def test_matmul_steps_does_the_counted_matmuls():
    w1, w2 = jnp.ones((4, 6)), jnp.ones((3, 4))
    x = jnp.ones((10, 6))
    a, b = speed_exp.matmul_steps(w1, w2, x, batch=4)  # two batches; the last 2 rows dropped
    assert a.shape == (4, 6) and b.shape == (3, 4)
    assert float(jnp.max(jnp.abs(a - w1))) > 0 and float(jnp.max(jnp.abs(a - w1))) < 1e-3
