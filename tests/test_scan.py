"""scan-model: the reference-free backdoor scan (Neural Cleanse + a null of clean models):
a planted backdoor found with its target while a clean model stays clean, the null's cache
and false-positive rate, and the CLI (json keys, trigger files, one-line refusals)."""

import json
from dataclasses import replace

import jax
import numpy as np
import pytest

from mlshift_jax.cli import main
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.detection import benign
from mlshift_jax.detection.neural_cleanse import ScanConfig
from mlshift_jax.detection.scan import NullConfig, calibrate_null, scan_model
from mlshift_jax.models.population import fit_group, init_members, member, plan_for
from mlshift_jax.models.recipes import TrainConfig
from mlshift_jax.poisoning import triggers

FAST = ScanConfig(steps=120, batch=128)
KEYS = {"verdict", "target", "anomaly_index", "threshold", "threshold_fpr", "n_null",
        "mask_norms", "attack_rates", "files", "null", "scan_seconds", "compile_seconds",
        "log_anomaly_index", "log_threshold", "log_threshold_fpr"}


@pytest.fixture(scope="module")
def small(mnist):
    """3,000 training images; a clean and a checkerboard-backdoored (10%, target 3) seed-mlp
    of width 32 trained on them together."""
    ds = replace(mnist, x_train=mnist.x_train[:3000], y_train=mnist.y_train[:3000])
    x, y = np.asarray(ds.x_train), np.asarray(ds.y_train)
    trig = triggers.checkerboard(ds.image_shape, ds.input_range, size=4)
    rng = np.random.default_rng(0)
    idx = rng.choice(np.flatnonzero(y != 3), 300, replace=False)
    xp, yp = x.copy(), y.copy()
    xp[idx] = np.asarray(triggers.stamp(x[idx], trig, ds.image_shape, ds.input_range))
    yp[idx] = 3
    plan = plan_for("seed-mlp", TrainConfig(hidden=32), ds.spec)
    params, keys = init_members(plan, [1, 2], x.shape[1])
    pop = jax.jit(lambda g, xs, ys: fit_group(plan, g, xs, ys))(
        {"params": params, "shuffle_key": keys}, np.stack([x, xp]), np.stack([y, yp]))
    return ds, plan.arch, member(pop, 0), member(pop, 1)


@pytest.mark.slow
def test_planted_backdoor_is_found_with_its_target_and_a_clean_model_is_not(small, tmp_path):
    ds, model, clean, backdoor = small
    cfg = NullConfig(n_null=10, images=200, alpha=0.5, seed=0, benign=False, folds=2)
    null = calibrate_null("seed-mlp", 32, ds, cfg, scan=FAST, cache_path=tmp_path)
    assert null.indices.shape == (10,) and null.norms.shape == (10, 10)
    t = null.threshold
    assert t.value >= 2.0 and t.value >= np.sort(null.indices)[-6] and t.n_null == 10
    assert 0.0 <= t.fpr_loo <= 1.0
    found = scan_model(model, backdoor, ds, null=null)
    assert found["verdict"] == "backdoor" and found["target"] == 3, found["mask_norms"]
    assert found["attack_rates"][3] > 0.9
    assert found["trigger"]["mask"].shape == (10, 28, 28)
    kept = scan_model(model, clean, ds, null=null)
    # at alpha 0.5 half the null is flagged: the clean twin is judged by its scores instead
    nc_score = [r["detectors"]["neural-cleanse"]["score"] for r in (kept, found)]
    assert nc_score[0] < nc_score[1] and found["combined_p"] == pytest.approx(1 / 11)
    json.dumps({k: v for k, v in found.items() if k != "trigger"})
    again = calibrate_null("seed-mlp", 32, ds, cfg, scan=FAST, cache_path=tmp_path)
    assert again.seconds["cached"] and np.allclose(again.norms, null.norms)
    with pytest.raises(ConfigError, match="hidden 32"):
        scan_model(model, backdoor, ds, null=replace(null, hidden=16))


def test_null_config_refuses_what_cannot_work():
    for bad, fragment in ((NullConfig(n_null=1), "n_null"), (NullConfig(alpha=1.0), "alpha"),
                          (NullConfig(images=1), "images"),
                          (NullConfig(n_null=6, alpha=0.9, folds=2, benign=False), "leave 3")):
        with pytest.raises(ConfigError, match=fragment):
            bad.validate()
    # a fold of 4 leaves the other 4: each scored against the 3 beyond it, the fewest allowed
    NullConfig(n_null=8, alpha=0.7, folds=2, benign=False).validate()


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("scan") / "m.npz"
    assert main(["train", "--hidden", "16", "--train-size", "1000", "--save", str(path)]) == 0
    return path


@pytest.mark.slow
def test_cli_scan_model_json_and_trigger_files(capsys, saved, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # its own null
    capsys.readouterr()
    out_dir = tmp_path / "out"
    argv = ["scan-model", "--params", str(saved), "--null-models", "13", "--alpha", "0.4",
            "--sample-size",
            "1000", "--n", "60", "--steps", "20", "--out", str(out_dir), "--format", "json"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "mlshift: calibrating: training and scanning 13 clean models" in err
    result = json.loads(out)
    assert KEYS <= set(result) and result["verdict"] in ("backdoor", "clean")
    assert len(result["mask_norms"]) == 10 and len(result["attack_rates"]) == 10
    assert result["n_null"] == 13 and result["threshold"] >= 2.0
    assert set(result["threshold_fpr_by_variant"]) == set(benign.VARIANTS)
    assert (result["target"] is None) == (result["verdict"] == "clean")
    names = sorted(p.name for p in out_dir.iterdir())  # no temporary files left
    assert "triggers.npz" in names and all(not n.startswith(".") for n in names
                                           if n != ".mlshift-manifest.json")
    if "matplotlib" not in (result["note"] or ""):  # the plots were drawn
        assert "triggers.png" in names
    # a class whose search never reached the attack rate is named in the note
    assert ("upper bounds" in (result["note"] or "")) == (not all(result["reached"]))
    with np.load(out_dir / "triggers.npz") as f:
        assert f["mask"].shape == (10, 28, 28) and f["pattern"].shape == (10, 28, 28, 1)
    code, out, err = run_cli(capsys, *argv)  # the null comes from the cache this time
    assert code == 0 and json.loads(out)["null"]["cached"] is True, err
    assert "calibrating" not in err
    plain = tmp_path / "plain.npz"  # the same arrays, no metadata: placed by their shapes
    with np.load(saved) as f:
        np.savez(plain, **{k: f[k] for k in ("wih", "who")})
    argv[argv.index(str(saved))] = str(plain)
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and "carries no metadata: read as seed-mlp" in err, err


@pytest.mark.parametrize("extra,fragment", [
    (["--null-models", "1"], "--null-models"),
    (["--null-models", "50"], "found --null-models 50: raise --null-models to 100"),
    (["--alpha", "0"], "--alpha"),
    (["--steps", "0"], "--steps"),
    (["--eps", "0.1"], "--eps"),  # an option scan-model does not use
    (["--n", "999999"], "--n"),
    (["--sample-size", "9999999"], "--sample-size"),
])
def test_cli_scan_model_refusals_are_one_line(capsys, saved, extra, fragment):
    capsys.readouterr()
    code, _, err = run_cli(capsys, "scan-model", "--params", str(saved), *extra)
    lines = [ln for ln in err.splitlines() if ln.startswith("mlshift: error:")]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err and "n_null" not in err and "scan-model: scan" not in err


def test_cli_scan_model_refuses_a_missing_file_and_an_out_that_is_a_file(capsys, tmp_path,
                                                                         saved):
    code, _, err = run_cli(capsys, "scan-model", "--params", str(tmp_path / "nope.npz"))
    assert code == 2 and err.count("\n") == 1 and "nope.npz" in err, err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "scan-model", "--params", str(saved), "--out", str(blocker))
    assert code == 2 and err.count("\n") == 1 and "--out" in err, err


@pytest.mark.slow
def test_scan_table_judges_heldout_models_with_the_clis_rule(mnist, monkeypatch):
    from mlshift_jax.bench import scan_bench
    from mlshift_jax.bench.experiments import detect as report
    from mlshift_jax.detection import mm_bd, scan

    tiny = scan_bench.ScanBenchConfig(hidden=8, sample_size=400, n_null=8, alpha=0.7, folds=2,
                                      per_variant=1, kinds=("patch", "sparse"), rates=(0.1,),
                                      per_cell=2, images=50, scan=ScanConfig(steps=10, batch=32),
                                      margin=mm_bd.MarginConfig(steps=5, starts=2), rounds=1)
    judged = []
    real = scan.judge
    monkeypatch.setattr(scan, "judge", lambda *a: judged.append(real(*a)) or judged[-1])
    out = scan_bench.scan_table(mnist, config=tiny)
    table, summary = out["scan_model"], out["scan_model_summary"]["value"]
    variants = [v for v in benign.VARIANTS if v != scan_bench.CLEAN_VARIANT]
    assert list(table.index) == (["clean"] + [f"benign: {v}" for v in variants]
                                 + ["patch 10%", "sparse 10%"])
    n = len(benign.VARIANTS)
    assert table["models"].tolist() == [1] * n + [2, 2]
    (j,) = judged  # one verdict call, scan.judge, over every held-out model
    assert j.flagged.shape == (n + 4,)
    np.testing.assert_allclose(table["detected"].to_numpy(),
                               list(j.flagged[:n]) + [j.flagged[-4:-2].mean(),
                                                      j.flagged[-2:].mean()])
    for col in ("detected", "found", "target_accuracy", "nc_flagged", "mm_bd_flagged"):
        values = table[col].dropna()
        assert ((values >= 0) & (values <= 1)).all(), col
    assert np.isnan(table.loc["clean", "found"])
    doors = table["found"].notna()
    assert (table.loc[doors, "found"] <= table.loc[doors, "detected"]).all()
    assert summary["null_models"] == 8 and 0 <= summary["cut"] <= 1
    assert summary["heldout_models"] == n + 4
    assert summary["s_per_model_single"] > 0 and summary["null_train_s"] > 0
    text = report._scan_model(out)
    assert "scan-model" in text and "patch 10%" in text and "benign: prune-30" in text
    with pytest.raises(ConfigError, match="families"):
        replace(tiny, kinds=("laser",)).validate()
    with pytest.raises(ConfigError, match="at least 20"):
        replace(tiny, n_null=8, alpha=0.25).validate()


@pytest.mark.slow
def test_the_heldout_script_writes_the_table_for_a_recipe(tmp_path, monkeypatch):
    """scripts/scan_heldout.py end to end at the QUICK settings: the bench's scan-model table,
    for the recipe asked, in the file asked."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "scripts" / "scan_heldout.py"
    spec = importlib.util.spec_from_file_location("scan_heldout", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "t.md"
    assert script.main(["--recipe", "seed-mlp", "--quick", "--sample-size", "600",
                        "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("seed-mlp, seed 0:") and "| patch 5%" in text
    assert "Every model: 600 training images" in text
