import json
import subprocess
import sys

import numpy as np
import pytest

from mlshift_jax import api, cli
from mlshift_jax.cli import main
from mlshift_jax.core.errors import ConfigError


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_json_has_the_promised_fields(capsys):
    code, out, err = run_cli(capsys, "train", "--model", "seed-mlp", "--hidden", "32",
                             "--train-size", "1000", "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    for key in ("accuracy", "precision", "recall", "f1", "confidence", "train_seconds",
                "data_source"):
        assert key in result
    assert 0.5 < result["accuracy"] <= 1.0


def test_train_table_and_save_in_study_orientation(capsys, tmp_path):
    path = tmp_path / "params.npz"
    code, out, err = run_cli(capsys, "train", "--model", "seed-mlp-numpy", "--hidden", "20",
                             "--train-size", "300", "--save", str(path))
    assert code == 0, err
    accuracy = next(line.split()[1] for line in out.splitlines() if line.startswith("accuracy"))
    assert 0 < float(accuracy) <= 1 and len(accuracy) <= 6  # 0.9255, not 0.9255000352859497
    with np.load(path, allow_pickle=False) as f:
        assert f["wih"].shape == (20, 784) and f["who"].shape == (10, 20)
    assert [p.name for p in tmp_path.iterdir()] == ["params.npz"]  # no temp file left


@pytest.mark.parametrize("argv,fragment", [
    (["train", "--lr", "-0.1"], "--lr"),
    (["train", "--model", "resnet"], "resnet"),
    (["train", "--data-dir", "/nonexistent/mnist"], "/nonexistent/mnist"),
    (["train", "--epochs", "zero"], "--epochs"),
    (["frobnicate"], "frobnicate"),
])
def test_bad_arguments_print_one_line_and_exit_2(capsys, argv, fragment):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("mlshift: error:") and fragment in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["detect", "--reference", "a.npz", "--suspect", "b.npz", "--hidden", "3"],  # not detect's
    ["detect", "--hidden", "3"],
    ["scan-data", "--params", "x.npz", "--eps", "2"],  # a type check during parsing
    ["attack", "--params", "nope.npz", "--hidden", "3"],  # the command's own check
    ["train", "--lr", "-1"],
])
def test_every_error_line_names_its_command_once(capsys, argv):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"mlshift: error: {argv[0]}: ") and err.count(argv[0] + ":") == 1


def test_stability_json(capsys):
    code, out, err = run_cli(capsys, "stability", "--samples", "3", "--size", "400",
                             "--hidden", "16", "--format", "json")
    assert code == 0, err
    samples = json.loads(out)["samples"]
    assert list(samples)[:3] == ["sample 1", "sample 2", "sample 3"]
    assert {"mean", "std", "min", "max"} <= set(samples)
    accs = [samples[f"sample {i}"]["accuracy"] for i in (1, 2, 3)]
    assert len(set(accs)) == 3  # different samples, different models
    assert samples["min"]["accuracy"] == min(accs)


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "mlshift_jax", "train", "--model", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bench_writes_the_report_and_only_leaves_it_alone(capsys, tmp_path):
    from tests.test_runner import TINY

    matrix = tmp_path / "tiny.toml"
    matrix.write_text(TINY)
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "bench", "--matrix", str(matrix), "--out", str(out))
    assert code == 0, err
    assert "wrote" in stdout and (out / "tables.md").is_file() and (out / "run.json").is_file()
    tables = (out / "tables.md").read_text()
    code, stdout, err = run_cli(capsys, "bench", "--matrix", str(matrix), "--out", str(out),
                                "--only", "none")
    assert code == 0, err
    assert "reused" in stdout and "tables not written" in err
    assert (out / "tables.md").read_text() == tables


def test_bench_with_a_missing_matrix_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "bench", "--matrix", str(tmp_path / "nope.toml"))
    assert code == 2 and err.count("\n") == 1 and "nope.toml" in err


def test_poison_json_has_the_promised_fields(capsys):
    code, out, err = run_cli(capsys, "poison", "--kind", "mixture", "--fraction", "0.2",
                             "--patch", "4", "--target", "3", "--hidden", "16",
                             "--train-size", "2000", "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    for key in ("clean_accuracy", "precision", "recall", "f1", "asr", "poisoned_count",
                "train_seconds"):
        assert key in result
    assert 300 < result["poisoned_count"] <= 400  # 20% of the ~1,800 images not of class 3
    assert result["asr"] > 0.5  # a 20% BadNets trigger takes hold even in a small MLP


@pytest.mark.parametrize("argv,fragment", [
    (["poison", "--fraction", "1.5"], "1.5"),
    (["poison", "--kind", "bogus"], "bogus"),
    (["poison", "--kind", "mixture", "--target", "12"], "12"),
    (["poison", "--kind", "trigger", "--patch", "40"], "40"),
])
def test_poison_bad_arguments_are_one_line(capsys, argv, fragment):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and fragment in err, err


@pytest.mark.slow
def test_detect_flags_a_planted_change_and_not_the_model_itself(capsys, tmp_path,
                                                                monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # its own calibration
    ref = tmp_path / "ref.npz"
    assert main(["train", "--hidden", "16", "--train-size", "10000", "--save", str(ref)]) == 0
    with np.load(ref) as f:
        params = {k: f[k] for k in f.files}
    swapped = {**params, "who": params["who"][[1, 0, *range(2, 10)]]}  # labels 0 and 1 swapped
    np.savez(tmp_path / "swapped.npz", **swapped)
    capsys.readouterr()
    code, out, err = run_cli(capsys, "detect", "--reference", str(ref), "--suspect",
                             str(tmp_path / "swapped.npz"), "--format", "json")
    assert code == 0, err
    assert "mlshift: calibrating: training 104 benign models" in err  # said before the wait
    assert "carries no metadata" not in err, err  # both files hold train --save's metadata
    result = json.loads(out)
    assert result["verdict"] == "changed" and result["category"] != "none"
    assert {"p_value", "fingerprint", "category_probabilities"} <= set(result)
    assert result["fingerprint"]["disagreement"] > 0.1
    code, out, err = run_cli(capsys, "detect", "--reference", str(ref), "--suspect", str(ref),
                             "--format", "json")
    assert code == 0 and json.loads(out)["verdict"] == "unchanged", err
    assert "calibrating" not in err  # the calibration came from the cache


def test_detect_refuses_mismatched_models_in_one_line(capsys, tmp_path):
    np.savez(tmp_path / "a.npz", wih=np.zeros((8, 784)), who=np.zeros((10, 8)))
    np.savez(tmp_path / "b.npz", wih=np.zeros((16, 784)), who=np.zeros((10, 16)))
    code, _, err = run_cli(capsys, "detect", "--reference", str(tmp_path / "a.npz"),
                           "--suspect", str(tmp_path / "b.npz"))
    assert code == 2 and err.count("\n") == 1, err
    # the options and files named, and only the arrays that differ
    assert f"--suspect {tmp_path / 'b.npz'}'s arrays" in err, err
    assert f"who (10, 16) (--reference {tmp_path / 'a.npz'} has (10, 8))" in err, err


def test_detect_says_how_it_read_a_metadata_free_file(capsys, tmp_path, monkeypatch):
    np.savez(tmp_path / "a.npz", wih=np.zeros((8, 784)), who=np.zeros((10, 8)))
    ref = tmp_path / "ref.safetensors"
    assert main(["train", "--hidden", "8", "--train-size", "300", "--epochs", "1",
                 "--save", str(ref)]) == 0

    def stop(*args, **kw):
        raise ConfigError("stop here")

    monkeypatch.setattr(api, "detect_change", stop)
    capsys.readouterr()
    code, _, err = run_cli(capsys, "detect", "--reference", str(ref), "--suspect",
                           str(tmp_path / "a.npz"))
    assert code == 2 and "stop here" in err, err
    assert f"{tmp_path / 'a.npz'} carries no metadata: read as seed-mlp" in err, err
    assert f"{ref} carries no metadata" not in err, err


def test_detect_refuses_an_alpha_its_null_cannot_reach_in_one_line(capsys, tmp_path):
    np.savez(tmp_path / "a.npz", wih=np.zeros((8, 784)), who=np.zeros((10, 8)))
    code, _, err = run_cli(capsys, "detect", "--reference", str(tmp_path / "a.npz"),
                           "--suspect", str(tmp_path / "a.npz"), "--alpha", "0.005")
    assert code == 2 and err.count("\n") == 1, err
    assert "at least 199 models" in err and "found --null-models 104" in err, err
    assert "raise --null-models to 199" in err, err


def test_unwritable_save_path_is_one_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, "train", "--hidden", "8", "--train-size", "100",
                           "--save", str(blocker / "p.npz"))
    assert code == 2 and err.strip().splitlines()[-1].startswith("mlshift: error:")
    assert "Traceback" not in err and list(tmp_path.iterdir()) == [blocker]


def test_params_of_the_wrong_width_are_one_line(capsys, tmp_path):
    np.savez(tmp_path / "p.npz", wih=np.zeros((8, 100), np.float32),
             who=np.zeros((10, 8), np.float32))
    code, _, err = run_cli(capsys, "attack", "--params", str(tmp_path / "p.npz"))
    assert code == 2 and "784" in err and "Traceback" not in err


@pytest.mark.parametrize("value,text", [
    (0.9255000352859497, "0.9255"), (-0.0009999803733080626, "-1.000e-03"), (1.929058, "1.92906"),
    (60000.0, "60000"), (0.0, "0.0"), (float("nan"), "nan"), (3, 3), ("changed", "changed"),
])
def test_table_cells_print_floats_with_sensible_digits(value, text):
    from mlshift_jax.cli import _cell

    assert _cell(value) == text


def test_the_cli_is_a_thin_face_over_the_api(capsys, monkeypatch):
    import ast
    from pathlib import Path

    library = {"fit_model", "time_call", "gradient_report", "probe", "adv_fit", "fit_state",
               "detect_pair", "run", "scan", "poison_one", "run_all", "stability",
               "get_recipe", "evaluate_under_attack", "sweep"}
    for node in ast.walk(ast.parse(Path(cli.__file__).read_text())):
        if isinstance(node, ast.Call):
            called = ast.unparse(node.func)
            *owner, name = called.split(".")
            assert name not in library or owner == ["api"], \
                f"cli.py calls {called} itself: go through api.py"
    calls = []

    def table(*args, **kw):
        calls.append((args, kw))
        return {"rows": [{"attack": "fgsm", "eps": 0.1, "accuracy": 0.5}], "flags": []}

    monkeypatch.setattr(api, "attack_table", table)
    code, out, err = run_cli(capsys, "attack", "--model", "mlp-ce", "--hidden", "8",
                             "--train-size", "200", "--epochs", "1", "--n", "20", "--eps",
                             "0.1", "--format", "json")
    assert code == 0, err
    (args, kw), = calls
    assert list(args[4]) == ["fgsm"] and list(args[5]) == [0.1] and kw["flags"] is False
    assert json.loads(out)["rows"] == [{"attack": "fgsm", "eps": 0.1, "accuracy": 0.5}]


def test_detect_samples_as_many_images_as_the_reference_was_trained_on(capsys, tmp_path):
    """detect's default --sample-size: the reference's training-set size from its metadata
    (train --save records it), else 10,000; never more than the data has."""
    from mlshift_jax.data import datasets
    from mlshift_jax.models import weights

    path = tmp_path / "m.safetensors"
    code, _, err = run_cli(capsys, "train", "--hidden", "8", "--train-size", "700",
                           "--epochs", "1", "--save", str(path))
    assert code == 0, err
    meta = weights.load(path)[1]
    assert meta["train_size"] == 700
    ds = datasets.load()
    assert cli._reference_size(meta, ds) == 700
    assert cli._reference_size({}, ds) == min(10_000, len(ds.y_train))


def test_detect_seed_reaches_the_calibration(capsys, tmp_path, monkeypatch):
    """`detect --seed` seeds the calibration set as well as the random input changes (it
    once reached only the latter)."""
    path = tmp_path / "m.safetensors"
    code, _, err = run_cli(capsys, "train", "--hidden", "8", "--train-size", "300",
                           "--epochs", "1", "--save", str(path))
    assert code == 0, err
    seen = {}

    def fake(model, reference, suspect, ds, **kw):
        seen.update(kw)
        raise ConfigError("stop here")

    monkeypatch.setattr(api, "detect_change", fake)
    code, _, err = run_cli(capsys, "detect", "--reference", str(path), "--suspect", str(path),
                           "--seed", "3")
    assert code == 2 and "stop here" in err
    assert seen["seed"] == 3 and seen["config"].seed == 3
