"""Bad inputs, by kind: every one ends in rc 2, one line, no traceback, nothing half-written.

Each test makes its own bad file. Also: NaN refusal, degenerate poison, SIGINT (a subprocess),
cache self-repair, stale temp files, strict JSON.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.cli import main, strict_json
from mlshift_jax.core import files, rules
from mlshift_jax.core.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def one_line_rc2(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if not line.startswith("mlshift: warning:")
             and not line.startswith("mlshift: mnist from")]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("mlshift: error: "), err
    assert "Traceback" not in err and "mlshift: error: mlshift" not in err
    assert "error: : " not in err  # never an empty path
    return lines[0]


# --- kind 1: parameter files ---------------------------------------------------------------


def _good(path: Path, **arrays) -> bytes:
    arrays = arrays or {"wih": np.ones((8, 784), np.float32), "who": np.ones((10, 8), np.float32)}
    np.savez(path, **arrays)
    return path.read_bytes()


def _npy_header(shape, descr="<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()


def _flip(p: Path) -> None:
    raw = bytearray(_good(p))
    raw[len(raw) // 3] ^= 0xFF
    p.write_bytes(bytes(raw))


def _bad_deflate(p: Path) -> None:
    np.savez_compressed(p, wih=np.random.default_rng(0).random((8, 784), np.float32),
                        who=np.ones((10, 8), np.float32))
    raw = bytearray(p.read_bytes())
    for i in range(100, 160):
        raw[i] ^= 0x55
    p.write_bytes(bytes(raw))


def _lying_header(p: Path) -> None:
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("wih.npy", _npy_header((100_000, 100_000)) + b"\0" * 64)


def _bomb(p: Path) -> None:  # a member that inflates far past what its header declares
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("wih.npy", _npy_header((4,)) + b"\0" * 20_000_000)


def _lying_directory(p: Path) -> None:  # the zip directory declares a huge inflated size
    _good(p)
    raw = bytearray(p.read_bytes())
    at = raw.rfind(b"PK\x01\x02")  # last central directory entry: uncompressed size at +24
    raw[at + 24: at + 28] = (2**32 - 1).to_bytes(4, "little")
    p.write_bytes(bytes(raw))


def _object(p: Path) -> None:
    np.savez(p, wih=np.array([{}, 1], dtype=object))


PARAM_FILES = {
    "cut in half": lambda p: p.write_bytes(_good(p)[: len(_good(p)) // 2]),
    "zero bytes": lambda p: p.write_bytes(b""),
    "flipped byte (CRC)": _flip,
    "corrupt deflate": _bad_deflate,
    ".npy renamed .npz": lambda p: (np.save(p.with_suffix(".npy"), np.ones(3)),
                                    p.write_bytes(p.with_suffix(".npy").read_bytes())),
    "text file": lambda p: p.write_text("wih,who\n1,2\n"),
    "empty zip": lambda p: zipfile.ZipFile(p, "w").close(),
    "non-.npy member": lambda p: zipfile.ZipFile(p, "w").writestr("wih.txt", "1"),
    "header declares 40 GB": _lying_header,
    "inflates past its header": _bomb,
    "directory lies about size": _lying_directory,
    "NaN weights": lambda p: _good(p, wih=np.full((8, 784), np.nan, np.float32),
                                   who=np.ones((10, 8), np.float32)),
    "inf weights": lambda p: _good(p, wih=np.ones((8, 784), np.float32),
                                   who=np.full((10, 8), np.inf, np.float32)),
    "bool arrays": lambda p: _good(p, wih=np.ones((8, 784), bool), who=np.ones((10, 8), bool)),
    "complex arrays": lambda p: _good(p, wih=np.ones((8, 784), np.complex64),
                                      who=np.ones((10, 8), np.complex64)),
    "object array (pickle)": _object,
    "empty array": lambda p: _good(p, wih=np.ones((0, 784), np.float32),
                                   who=np.ones((10, 0), np.float32)),
    "a folder": lambda p: p.mkdir(),
    "missing": lambda p: None,
}


@pytest.mark.parametrize("kind", PARAM_FILES)
def test_bad_params_file_is_one_line_for_every_reader(capsys, tmp_path, kind):
    bad = tmp_path / "p.npz"
    PARAM_FILES[kind](bad)
    good = tmp_path / "good.npz"
    _good(good)
    before = sorted(os.listdir(tmp_path))
    line = one_line_rc2(capsys, "attack", "--params", bad)
    assert "p.npz" in line
    one_line_rc2(capsys, "detect", "--reference", good, "--suspect", bad)
    with pytest.raises(DataError):
        files.load_params(bad)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_read_npz_round_trips_every_layout(tmp_path):
    arrays = {"a": np.arange(12.0).reshape(3, 4), "f": np.asfortranarray(np.ones((3, 2))),
              "i": np.arange(5, dtype=np.int64), "s": np.float32(2.5)}
    np.savez_compressed(tmp_path / "c.npz", **arrays)
    got = files.read_npz(tmp_path / "c.npz")
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == np.asarray(v).dtype


def test_check_arrays_is_shared_by_weights_readers():
    with pytest.raises(DataError, match="NaN/inf"):
        files.check_arrays("w.safetensors", {"dense/kernel": np.array([1.0, np.nan])})
    with pytest.raises(DataError, match="complex"):
        files.check_arrays("w.safetensors", {"k": np.array([1j])})
    assert files.check_arrays("w", {"k": np.ones(2)})["k"].shape == (2,)


# --- kind 2: data files ----------------------------------------------------------------------


def _idx(shape, payload: bytes | None = None) -> bytes:
    magic = 2051 if len(shape) == 3 else 2049
    head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
    return head + (payload if payload is not None else bytes(int(np.prod(shape))))


def _dataset_dir(tmp_path: Path, broken: dict) -> Path:
    d = tmp_path / "mnist"
    d.mkdir()
    good = {"train-images-idx3-ubyte": _idx((20, 28, 28)),
            "train-labels-idx1-ubyte": _idx((20,)),
            "t10k-images-idx3-ubyte": _idx((10, 28, 28)),
            "t10k-labels-idx1-ubyte": _idx((10,))}
    for name, raw in good.items():
        if name in broken:
            (d / (name + ".gz")).write_bytes(broken[name])
        else:
            (d / (name + ".gz")).write_bytes(gzip.compress(raw))
    return d


DATA_FILES = {
    "gzip inflates past the header": {"train-labels-idx1-ubyte": gzip.compress(
        _idx((20,), bytes(20_000_000)))},
    "gzip cut short": {"train-labels-idx1-ubyte": gzip.compress(_idx((20,)))[:-12]},
    "gzip corrupt": {"train-labels-idx1-ubyte": b"\x1f\x8b" + b"\x08" + bytes(30)},
    "header declares 2**32 images": {"train-images-idx3-ubyte": gzip.compress(
        _idx((2**32 - 1, 28, 28), b""))},
    "labels out of range": {"train-labels-idx1-ubyte": gzip.compress(
        _idx((20,), bytes([12] * 20)))},
    "two gzip streams": {"train-labels-idx1-ubyte": gzip.compress(_idx((20,)))
                         + gzip.compress(b"x")},
}


@pytest.mark.parametrize("kind", DATA_FILES)
def test_bad_data_file_is_one_line(capsys, tmp_path, kind):
    d = _dataset_dir(tmp_path, DATA_FILES[kind])
    line = one_line_rc2(capsys, "train", "--data-dir", d, "--hidden", "4")
    assert str(d) in line


def test_bundled_sample_is_read_by_the_safe_reader():
    from mlshift_jax.data import datasets

    ds = datasets._load_sample("mnist", np.float32)
    assert ds.x_train.shape[1] == 784 and ds.is_sample


# --- kind 3: matrix files --------------------------------------------------------------------


MATRIX_FILES = {
    "not UTF-8": lambda p: p.write_bytes(b"[matrix]\ndatasets = [\"mn\xffist\"]\n"),
    "binary": lambda p: p.write_bytes(bytes(range(256))),
    "a folder": lambda p: p.mkdir(),
    "seed out of range": lambda p: p.write_text(
        '[matrix]\ndatasets=["mnist"]\nmodels=["seed-mlp"]\nattacks=["none"]\neps=[0.0]\n'
        "seeds=[18446744073709551615]\n"),
    "nan lr": lambda p: p.write_text(
        '[matrix]\ndatasets=["mnist"]\nmodels=["seed-mlp"]\nattacks=["none"]\neps=[0.0]\n'
        '[train.seed-mlp]\nlr=nan\n'),
    "too big": lambda p: p.write_bytes(b"#" * (2 << 20)),
}


@pytest.mark.parametrize("kind", MATRIX_FILES)
def test_bad_matrix_file_is_one_line_and_writes_nothing(capsys, tmp_path, kind):
    m = tmp_path / "m.toml"
    MATRIX_FILES[kind](m)
    out = tmp_path / "out"
    one_line_rc2(capsys, "bench", "--matrix", m, "--out", out)
    assert not out.exists()


# --- kind 4: numbers and options ---------------------------------------------------------------


BAD_ARGS = [
    ["train", "--seed", "-1"],
    ["attack", "--model", "seed-mlp", "--seed", "18446744073709551615"],
    ["poison", "--seed", "18446744073709551615"],
    ["stability", "--seed", "2147483648"],
    ["train", "--epochs", "99999999999"],
    ["stability", "--lr", "inf"],
    ["train", "--lr", "nan"],
    ["poison", "--lr", "0"],
    ["stability", "--samples", "0"],
    ["attack", "--eps", "nan"],
    ["poison", "--fraction", "1.5"],
    ["detect", "--hidden", "3", "--reference", "a.npz", "--suspect", "b.npz"],
    ["stability", "--batch-size", "16"],
    ["bench", "--hidden", "8"],
    ["train", "--save", ""],
    ["bench", "--out", ""],
    ["attack", "--params", "p.npz", "--hidden", "8"],
    ["poison", "--sweep", "--save", "p.npz"],
    ["train", "--optimizer", "lion"],
    ["attack", "--attack", "deepfool"],
    ["poison", "--kind", "bogus"],
    ["poison", "--mode", "sideways"],
]


@pytest.mark.parametrize("argv", BAD_ARGS, ids=" ".join)
def test_bad_numbers_and_options_are_one_line_before_data_loads(capsys, argv, tmp_path,
                                                                monkeypatch):
    from mlshift_jax.data import datasets

    def no_load(*a, **k):
        raise AssertionError("data loaded before the arguments were checked")

    monkeypatch.setattr(datasets, "load", no_load)
    monkeypatch.chdir(tmp_path)
    one_line_rc2(capsys, *argv)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [
    ["train", "--train-size", "99999", "--hidden", "4"],
    ["poison", "--train-size", "99999", "--hidden", "4"],
    ["stability", "--size", "99999", "--hidden", "4"],
    ["attack", "--model", "seed-mlp", "--n", "99999", "--hidden", "4"],
    ["detect", "--sample-size", "99999"],
], ids=" ".join)
def test_more_than_the_data_is_an_error_everywhere(capsys, tmp_path, argv):
    if argv[0] == "detect":
        for name in ("a", "b"):
            _good(tmp_path / f"{name}.npz")
        argv = [*argv, "--reference", tmp_path / "a.npz", "--suspect", tmp_path / "b.npz"]
    line = one_line_rc2(capsys, *argv)
    assert "99999" in line and "expected at most" in line


def test_rules_are_one_per_option():
    for value in (-1, 2**31, 2**64 - 1, True, 1.5):
        with pytest.raises(ConfigError, match="--seed"):
            rules.check("seed", value)
    assert rules.check("seed", 2**31 - 1) == 2**31 - 1
    with pytest.raises(ConfigError, match="needs ~"):
        rules.check_memory(2**62, "this", "lower --samples/--size/--hidden")


def test_stability_refuses_absurd_memory_before_allocating(mnist):
    from mlshift_jax.bench.stability import stability

    with pytest.raises(ConfigError, match=r"needs ~.*GiB, this machine has .*lower --samples"):
        stability(mnist, samples=100_000, size=len(mnist.y_train), hidden=65_536)


def test_version_and_help_show_defaults_and_choices(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("mlshift ")
    assert main(["attack", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "pgd-targeted" in text and "(default: fgsm)" in text and "0..2**31-1" in text
    assert main(["poison", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "wrong-label" in text and "uniform, shift, target" in text


# --- kind 5: NaN, inf and degenerate results ---------------------------------------------------


def test_non_finite_inputs_are_refused_at_the_api(mnist):
    import jax

    from mlshift_jax.attacks import evasion
    from mlshift_jax.detection import detect
    from mlshift_jax.models import metrics
    from mlshift_jax.models.zoo import SEED_MLP

    params = SEED_MLP.init(jax.random.key(0), n_hidden=8)
    x = np.array(mnist.x_test[:4])
    x[1, 5] = np.nan
    y = jnp.asarray(mnist.y_test[:4])
    for call in (lambda: evasion.fgsm(SEED_MLP, params, x, y, eps=0.1),
                 lambda: evasion.pgd(SEED_MLP, params, x, y, eps=0.1,
                                     key=evasion.attack_key(0)),
                 lambda: metrics.evaluate(SEED_MLP, params, x, y),
                 lambda: detect.input_scores(SEED_MLP, params, x)):
        with pytest.raises(ConfigError, match="NaN/inf"):
            call()


def test_zero_gradients_are_flagged(mnist):
    import jax

    from mlshift_jax.attacks import evasion
    from mlshift_jax.models.zoo import SEED_MLP

    params = jax.tree.map(jnp.zeros_like, SEED_MLP.init(jax.random.key(0), n_hidden=8))
    with pytest.warns(evasion.GradientMaskingWarning):
        report = evasion.gradient_report(SEED_MLP, params, mnist.x_test[:8], mnist.y_test[:8])
    assert report["gradient_flag"] and report["zero_grad_frac"] == 1.0


def test_a_fraction_that_poisons_nothing_is_an_error(capsys):
    line = one_line_rc2(capsys, "poison", "--fraction", "0.001", "--train-size", "500",
                        "--hidden", "4")
    assert "eligible" in line and "none" in line


def test_strict_json_has_no_bare_nan():
    text = strict_json({"asr": float("nan"), "rows": [1.0, float("inf")], "ok": 0.5})
    assert "NaN" not in text and "Infinity" not in text
    payload = json.loads(text)
    assert payload["asr"] is None and payload["non_finite"] == ["asr", "rows[1]"]


# --- kind 6: signals, temp files, caches, results folders -----------------------------------------


def _interrupt_after(argv, wait_for: str, tmp_path: Path):
    """Run the CLI, send SIGINT a second after `wait_for` shows on stderr; (rc, stderr)."""
    import threading

    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLSHIFT_NO_DOWNLOAD": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mlshift_jax", *argv], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    lines: list[str] = []
    seen = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if wait_for in line:
                seen.set()
        seen.set()  # the process ended: do not wait out the timeout

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert seen.wait(240) and proc.poll() is None, "".join(lines)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=240)
    reader.join(10)
    return code, "".join(lines)


def test_sigint_exits_130_in_one_line(tmp_path):
    code, err = _interrupt_after(["attack", "--model", "seed-mlp", "--hidden", "4",
                                  "--train-size", "200", "--n", "50", "--rounds", "10000",
                                  "--attack", "pgd", "--eps", "0.1", "0.2", "0.3"],
                                 "mlshift: mnist from", tmp_path)
    assert code == 130, err
    assert err.strip().splitlines()[-1] == "mlshift: interrupted" and "Traceback" not in err


def test_bench_sigint_says_how_many_cells_are_cached(tmp_path):
    from tests.test_runner import TINY

    (tmp_path / "m.toml").write_text(TINY.replace("rounds = 2", "rounds = 1000\n"
                                                  "max_seconds = 1000.0"))
    code, err = _interrupt_after(["bench", "--matrix", "m.toml", "--out", "out"],
                                 "mlshift: bench", tmp_path)
    assert code == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mlshift: interrupted: ") and last.endswith(
        "cells cached; rerun to resume") and "Traceback" not in err


def test_stale_temp_files_are_cleaned(tmp_path):
    dead = tmp_path / "figures" / f".x.png.{2**22 + 12345}-abcd1234.tmp"
    dead.parent.mkdir()
    dead.write_bytes(b"")
    live = tmp_path / f".y.json.{os.getpid()}-abcd1234.tmp"
    live.write_bytes(b"")
    other = tmp_path / ".keep.tmp"
    other.write_bytes(b"")
    removed = files.clean_stale_temps(tmp_path)
    assert removed == [dead] and live.exists() and other.exists()


def test_damaged_cache_entries_are_rebuilt_with_one_warning(tmp_path):
    import warnings

    from mlshift_jax.bench import runner
    from tests.test_runner import TINY

    m = tmp_path / "m.toml"
    m.write_text(TINY)
    out = tmp_path / "out"
    first = runner.run(m, out_dir=out)
    cells = sorted((out / ".cache" / "cells").glob("*.json"))
    params = sorted((out / ".cache" / "params").glob("*.npz"))
    cells[0].write_text("{not json")
    cells[1].write_bytes(b"\xff\xfe")
    params[0].write_bytes(params[0].read_bytes()[:50])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = runner.run(m, out_dir=out)
    damaged = [w for w in caught if "damaged cache" in str(w.message)]
    assert len(damaged) == 1 and "3 damaged" in str(damaged[0].message)
    assert (again["status"] == "computed").sum() >= 2
    cols = ["id", "accuracy"]
    assert again[cols].equals(first[cols])  # rebuilt bit for bit
    json.loads(cells[0].read_text())  # rewritten whole


def test_sample_and_custom_matrix_runs_go_elsewhere(tmp_path):
    import argparse

    from mlshift_jax.bench import report
    from mlshift_jax.cli import _bench_out

    default = report.default_out_dir()
    args = argparse.Namespace(out=None, matrix=str(tmp_path / "mine.toml"), quick=False)
    out, sample, why = _bench_out(args, tmp_path / "mine.toml")
    assert out != default and out.name.endswith("-mine") and why
    args = argparse.Namespace(out=None, matrix=None, quick=False)
    out, sample, why = _bench_out(args, Path("bench/matrix.toml"))
    assert out == default and sample != default and sample.name.endswith("-sample")


def test_report_removes_figures_of_an_earlier_run(tmp_path):
    from mlshift_jax.bench import runner
    from tests.test_runner import TINY

    m = tmp_path / "m.toml"
    m.write_text(TINY)
    out = tmp_path / "out"
    stale = out / "figures" / "accuracy-vs-eps-old.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"png")
    from mlshift_jax.bench import report

    report.write(runner.run(m, out_dir=out), out)
    assert not stale.exists()
