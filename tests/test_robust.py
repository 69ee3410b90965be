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


# --- kind 7: a data file is never code --------------------------------------------------------

MARKER_MODULE = '''
import pathlib
pathlib.Path({marker!r}).write_text("imported")
net = None
'''


def _marker_package(tmp_path: Path) -> tuple[Path, str]:
    """A module and a package (with a submodule) in tmp_path that each write a marker file
    when imported; (marker path, unique module name)."""
    import uuid

    name = f"payload_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "MARKER"
    (tmp_path / f"{name}.py").write_text(MARKER_MODULE.format(marker=str(marker)))
    pkg = tmp_path / f"{name}_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(MARKER_MODULE.format(marker=str(marker)))
    (pkg / "sub.py").write_text(MARKER_MODULE.format(marker=str(marker)))
    return marker, name


def _seed_mlp_file(path: Path, *, meta_text: str | None = None, edit=None,
                   hidden: int = 8) -> None:
    """A working seed-mlp weights file (.safetensors or .npz by suffix), its metadata JSON
    replaced by `meta_text` or changed by `edit(meta)` (written raw: NaN allowed)."""
    import jax
    from safetensors.numpy import save as st_save

    from mlshift_jax.models import weights, zoo

    model = zoo.build("seed-mlp", zoo.STUDY_SPEC, hidden)
    params = jax.tree.map(np.asarray, model.init(jax.random.key(0)))
    meta = weights.save(path, params, weights.metadata(model))
    if edit is not None:
        edit(meta)
    text = meta_text if meta_text is not None else json.dumps(meta)
    flat = weights.flatten(params)
    if path.suffix == ".npz":
        np.savez(path, **flat, __mlshift__=np.frombuffer(text.encode(), np.uint8))
    else:
        path.write_bytes(st_save(flat, metadata={"mlshift": text}))


def _ref(ref):
    return lambda m: m["model"].update(ref=ref)


CODE_REFS = {  # the file's model reference -> what the one line must name
    "a module in the working folder": ("{mod}:net", "never imported"),
    "a submodule of a package": ("{mod}_pkg.sub:net", "never imported"),
    "a package attribute path": ("{mod}_pkg:sub.net", "never imported"),
    "os:system": ("os:system", "never imported"),
    "builtins:print": ("builtins:print", "never imported"),
    "antigravity": ("antigravity:x", "never imported"),
    "this": ("this:s", "never imported"),
    "subprocess:run": ("subprocess:run", "never imported"),
}


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
@pytest.mark.parametrize("kind", CODE_REFS)
def test_a_file_naming_code_never_imports_it(capsys, tmp_path, monkeypatch, kind, suffix):
    from mlshift_jax.models import registry

    marker, mod = _marker_package(tmp_path)
    monkeypatch.chdir(tmp_path)  # the module sits next to the "downloaded" model
    ref, match = (s.format(mod=mod) for s in CODE_REFS[kind])
    path = tmp_path / f"model{suffix}"
    _seed_mlp_file(path, edit=_ref(ref))
    before = sorted(os.listdir(tmp_path))
    for argv in (["attack", "--params", path], ["scan-model", "--params", path],
                 ["scan-data", "--params", path],
                 ["detect", "--reference", path, "--suspect", path]):
        line = one_line_rc2(capsys, *argv)
        assert match in line and ref in line and "--model" in line, line
    with pytest.raises(ConfigError, match=match):
        registry.load_model(path)
    with pytest.raises(ConfigError, match="not 'seed-mlp' as given"):
        registry.load_model(path, model="seed-mlp")  # another reference: refused
    line = one_line_rc2(capsys, "attack", "--params", path, "--model", "other_pkg:net")
    assert "not 'other_pkg:net' as given" in line
    assert not marker.exists() and sorted(os.listdir(tmp_path)) == before
    assert "Beautiful is better than ugly" not in capsys.readouterr().out


MATRIX_CODE = {  # where a matrix names code -> its TOML (ref: the reference)
    "models": '[matrix]\ndatasets = ["mnist"]\nmodels = ["{ref}"]\nattacks = ["none"]\n'
              'eps = [0.1]\n',
    "a [train] table": '[matrix]\ndatasets = ["mnist"]\nmodels = ["seed-mlp"]\n'
                       'attacks = ["none"]\neps = [0.1]\n\n[train."{ref}"]\nlr = 0.1\n',
}


@pytest.mark.parametrize("where", MATRIX_CODE)
@pytest.mark.parametrize("kind", ["a module in the working folder", "a submodule of a package",
                                  "os:system"])
def test_a_matrix_naming_code_never_imports_it(capsys, tmp_path, monkeypatch, where, kind):
    """A matrix is data too: the code it names is imported only when the user names it
    (`bench --model REF`); refused in one line before anything is imported otherwise."""
    from mlshift_jax.bench import matrix

    marker, mod = _marker_package(tmp_path)
    monkeypatch.chdir(tmp_path)
    ref = CODE_REFS[kind][0].format(mod=mod)
    path = tmp_path / "m.toml"
    path.write_text(MATRIX_CODE[where].format(ref=ref))
    before = sorted(os.listdir(tmp_path))
    line = one_line_rc2(capsys, "bench", "--matrix", path, "--out", tmp_path / "out")
    assert "never imported" in line and ref in line and f"--model {ref}" in line, line
    with pytest.raises(ConfigError, match="never imported"):
        matrix.load(path, allow_code=("other_pkg:net",))
    assert not marker.exists() and sorted(os.listdir(tmp_path)) == before


def test_a_module_in_the_working_folder_is_not_on_the_path(capsys, tmp_path, monkeypatch):
    """Even named by the user, a module in the working folder is not imported: the working
    folder is never added to sys.path (PYTHONPATH or an install puts it there)."""
    marker, mod = _marker_package(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path
                                      if p not in ("", ".", str(tmp_path))])
    path = tmp_path / "model.safetensors"
    _seed_mlp_file(path, edit=_ref(f"{mod}:net"))
    line = one_line_rc2(capsys, "attack", "--params", path, "--model", f"{mod}:net")
    assert f"no module named '{mod}'" in line and "working folder is not searched" in line
    assert not marker.exists()


BAD_META = {  # name -> (edit of the metadata, or its raw text; the field the line names)
    "input_shape 784": (lambda m: m.update(input_shape=784), "input_shape"),
    "hidden 'abc'": (lambda m: m["model"].update(hparams={"hidden": "abc"}),
                     "model.hparams.hidden"),
    "hparams a list": (lambda m: m["model"].update(hparams=[1, 2]), "model.hparams"),
    "hparams unknown key": (lambda m: m["model"].update(hparams={"hidden": 8, "sep": "x"}),
                            "model.hparams.sep"),
    "n_classes 'ten'": (lambda m: m.update(n_classes="ten"), "n_classes"),
    "n_classes [10]": (lambda m: m.update(n_classes=[10]), "n_classes"),
    "n_classes NaN": (lambda m: m.update(n_classes=float("nan")), "n_classes"),
    "n_classes 0": (lambda m: m.update(n_classes=0), "n_classes"),
    "n_classes 10.7": (lambda m: m.update(n_classes=10.7), "n_classes"),
    "n_classes 10**9": (lambda m: m.update(n_classes=10**9), "n_classes"),
    "model a string": (lambda m: m.update(model="seed-mlp"), "model"),
    "ref 5": (lambda m: m["model"].update(ref=5), "model.ref"),
    "ref with spaces": (lambda m: m["model"].update(ref="os:system; rm"), "model.ref"),
    "train.epochs 99999999999": (lambda m: m.update(train={"epochs": 99999999999}),
                                 "train.epochs"),
    "train.lr 'fast'": (lambda m: m.update(train={"lr": "fast"}), "train.lr"),
    "train a list": (lambda m: m.update(train=[1]), "train"),
    "seed -1": (lambda m: m.update(seed=-1), "seed"),
    "input_range NaN": (lambda m: m.update(input_range=[float("nan"), 1.0]), "input_range"),
    "input_range reversed": (lambda m: m.update(input_range=[1.0, 0.01]), "input_range"),
    "hidden disagrees with the arrays": (lambda m: m["model"].update(hparams={"hidden": 7}),
                                         "do not fit"),
    "n_classes disagrees with the arrays": (lambda m: m.update(n_classes=12), "do not fit"),
    "JSON nested 100,000 deep": ("[" * 100_000 + "]" * 100_000, "bad JSON"),
    "object nested 20 deep": ('{"a":' * 20 + "1" + "}" * 20, "nesting"),
    "metadata a list": ("[1, 2]", "JSON object"),
    "widened to a pickle": (lambda m: m.update(widened={"wih": "object"}), "widened"),
}


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
@pytest.mark.parametrize("kind", BAD_META)
def test_hostile_metadata_is_one_line_naming_the_field(capsys, tmp_path, kind, suffix):
    from mlshift_jax.models import registry

    change, field = BAD_META[kind]
    path = tmp_path / f"w{suffix}"
    if isinstance(change, str):
        _seed_mlp_file(path, meta_text=change)
    else:
        _seed_mlp_file(path, edit=change)
    line = one_line_rc2(capsys, "attack", "--params", path, "--n", "5")
    assert field in line and str(path) in line, line
    with pytest.raises((DataError, ConfigError)):
        registry.load_model(path)


def test_an_input_range_far_from_the_data_is_one_line(capsys, tmp_path):
    path = tmp_path / "w.safetensors"
    _seed_mlp_file(path, edit=lambda m: m.update(input_range=[0.0, 255.0]))
    line = one_line_rc2(capsys, "attack", "--params", path, "--n", "5", "--rounds", "1")
    assert "input_range" in line and "[0, 255]" in line


# --- kind 8: special files, output folders ----------------------------------------------------


def _fifo(tmp_path: Path) -> Path:
    p = tmp_path / "fifo"
    os.mkfifo(p)
    return p


SPECIAL_PATHS = {  # name -> (argv builder from (tmp_path, special path), expected words)
    "--params FIFO": (lambda t, s: ["attack", "--params", s], "FIFO"),
    "--params /dev/zero": (lambda t, s: ["attack", "--params", "/dev/zero"], "device"),
    "--params folder": (lambda t, s: ["scan-data", "--params", t], "folder"),
    "--reference FIFO": (lambda t, s: ["detect", "--reference", s, "--suspect", s], "FIFO"),
    "--matrix FIFO": (lambda t, s: ["bench", "--matrix", s, "--out", t / "o"], "FIFO"),
    "--matrix /dev/zero": (lambda t, s: ["bench", "--matrix", "/dev/zero", "--out", t / "o"],
                           "device"),
    "--dataset /dev/zero": (lambda t, s: ["train", "--dataset", "/dev/zero"], "device"),
    "--dataset FIFO": (lambda t, s: ["train", "--dataset", s], "FIFO"),
    "--data-dir FIFO": (lambda t, s: ["train", "--data-dir", s], "FIFO"),
    "--save FIFO": (lambda t, s: ["train", "--hidden", "4", "--save", s], "FIFO"),
    "--save folder": (lambda t, s: ["train", "--hidden", "4", "--save", t], "folder"),
    "bench --out FIFO": (lambda t, s: ["bench", "--quick", "--out", s], "FIFO"),
    "scan-data --out folder": (lambda t, s: ["scan-data", "--params", t / "x.npz", "--out",
                                             t], "folder"),
    "scan-model --out /dev/null": (lambda t, s: ["scan-model", "--params", t / "x.npz",
                                                 "--out", "/dev/null"], "device"),
}


@pytest.mark.parametrize("kind", SPECIAL_PATHS)
def test_special_files_are_refused_before_they_are_opened(capsys, tmp_path, kind):
    special = _fifo(tmp_path)
    argv, words = SPECIAL_PATHS[kind]
    line = one_line_rc2(capsys, *argv(tmp_path, special))
    assert words in line, line


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


OUT_FOLDERS = {  # name -> (make the folder's contents in d, words of the one line)
    "a foreign file": (lambda d: (d / "notes.txt").write_text("mine"), "did not write"),
    "foreign figures, no manifest": (lambda d: ((d / "figures").mkdir(),
                                                (d / "figures" / "x.png").write_bytes(b"p"),
                                                (d / "tables.md").write_text("mine")),
                                     "did not write"),
    "a manifest plus a foreign file": (
        lambda d: ((d / ".mlshift-manifest.json").write_text(json.dumps(
            {"format": "mlshift-output-manifest", "files": ["tables.md"], "folders": []})),
            (d / "tables.md").write_text("t"), (d / "thesis.tex").write_text("mine")),
        "thesis.tex"),
    "a manifest leaving the folder": (
        lambda d: ((d / ".mlshift-manifest.json").write_text(json.dumps(
            {"format": "mlshift-output-manifest", "files": ["../victim.txt"],
             "folders": []})),), "inside the folder"),
    "a manifest nested 100,000 deep": (
        lambda d: (d / ".mlshift-manifest.json").write_text("[" * 100_000 + "]" * 100_000),
        "bad JSON"),
}


@pytest.mark.parametrize("kind", OUT_FOLDERS)
def test_out_at_a_folder_with_foreign_files_is_refused(capsys, tmp_path, kind):
    from tests.test_runner import TINY

    (tmp_path / "m.toml").write_text(TINY)
    d = tmp_path / "out"
    d.mkdir()
    make, words = OUT_FOLDERS[kind]
    make(d)
    (tmp_path / "victim.txt").write_text("keep")
    before = _listing(d)
    line = one_line_rc2(capsys, "bench", "--matrix", tmp_path / "m.toml", "--out", d)
    assert words in line, line
    assert _listing(d) == before and (tmp_path / "victim.txt").exists()


@pytest.mark.parametrize("where", ["/", "home", "repository root", "committed results"])
def test_out_at_protected_places_is_refused(capsys, tmp_path, monkeypatch, where):
    from mlshift_jax.bench import report
    from tests.test_runner import TINY

    (tmp_path / "m.toml").write_text(TINY)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    out = {"/": Path("/"), "home": home, "repository root": ROOT,
           "committed results": report.default_out_dir()}[where]
    before = sorted(os.listdir(out))
    line = one_line_rc2(capsys, "bench", "--matrix", tmp_path / "m.toml", "--out", out)
    assert "refusing" in line, line
    assert sorted(os.listdir(out)) == before


def test_committed_results_carry_a_manifest_of_their_files():
    from mlshift_jax.core import outdir

    folder = ROOT / "results" / "cpu"
    manifest = outdir.read(folder)
    assert manifest is not None and outdir.claim(folder, protected=[ROOT]) == folder
    assert {"tables.md", "records.csv", "run.json"} <= manifest["files"]
    figures = {f"figures/{p.name}" for p in (folder / "figures").glob("*.png")}
    assert figures <= manifest["files"]


def test_a_rerun_removes_only_listed_figures(tmp_path):
    from mlshift_jax.bench import report, runner
    from mlshift_jax.core import outdir
    from tests.test_runner import TINY

    m = tmp_path / "m.toml"
    m.write_text(TINY)
    out = tmp_path / "out"
    report.write(runner.run(m, out_dir=out), out)
    listed = out / "figures" / "accuracy-vs-eps-old.png"  # a figure an earlier run drew
    listed.write_bytes(b"png")
    outdir.record(out, files=[listed])
    mine = out / "figures" / "my-notes.png"  # not listed: never removed
    mine.write_bytes(b"mine")
    foreign_temp = out / f".notes.txt.{2**22 + 7}-abcd1234.tmp"  # not a listed name
    cache_temp = out / ".cache" / f".x.json.{2**22 + 7}-abcd1234.tmp"  # the tool's folder
    cache_temp.write_bytes(b"")
    before = _listing(out)
    report.write(runner.run(m, out_dir=out), out)
    after = _listing(out)
    assert not listed.exists() and mine.read_bytes() == b"mine" and not cache_temp.exists()
    assert set(before) - set(after) == {"figures/accuracy-vs-eps-old.png",
                                        f".cache/{cache_temp.name}"}
    assert not foreign_temp.exists()  # never made: a foreign temp would stop the claim


def test_save_touches_only_its_own_file_and_temps(capsys, tmp_path):
    theirs = tmp_path / f".other.npz.{2**22 + 9}-abcd1234.tmp"  # a stale temp, not ours
    theirs.write_bytes(b"x")
    own = tmp_path / f".p.npz.{2**22 + 9}-abcd1234.tmp"  # ours, left by a killed run
    own.write_bytes(b"x")
    code = main(["train", "--hidden", "4", "--train-size", "200", "--save",
                 str(tmp_path / "p.npz")])
    assert code == 0, capsys.readouterr().err
    assert theirs.exists() and not own.exists() and (tmp_path / "p.npz").is_file()


def test_a_save_path_that_is_not_utf8_prints(capsys, tmp_path):
    name = os.fsdecode(b"p-\xff.npz")  # surrogate-escaped, as argv gives it
    code = main(["train", "--hidden", "4", "--train-size", "200", "--save",
                 str(tmp_path / name)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err and "saved" in out
    assert (tmp_path / name).is_file()


# --- kind 9: inputs outside the model's range, absurd labels and matrices ------------------------


def test_inputs_outside_the_range_are_refused_or_clipped(mnist):
    import jax

    from mlshift_jax.attacks import evasion
    from mlshift_jax.detection.detect import input_scores
    from mlshift_jax.models import zoo
    from mlshift_jax.models.metrics import evaluate

    model = zoo.build("seed-mlp", mnist.spec, 8)
    params = model.init(jax.random.key(0))
    x, y = mnist.x_test[:200], mnist.y_test[:200]
    half = np.asarray(x) * 0.5 - 0.01  # [0, 0.5]-ish: below the range's 0.01
    for call in (lambda: evasion.fgsm(model, params, half, y, eps=0.0),
                 lambda: evasion.pgd(model, params, half, y, eps=0.1, key=jax.random.key(0)),
                 lambda: evaluate(model, params, half, y),
                 lambda: input_scores(model, params, half)):
        with pytest.raises(ConfigError, match=r"input range \[0.01, 1\], found values in "
                           r"\[-0.005"):
            call()
    with pytest.warns(UserWarning, match="clipped"):
        clipped = evaluate(model, params, half, y, clip=True)
    assert 0 <= clipped["accuracy"] <= 1
    same = evasion.fgsm(model, params, x, y, eps=0.0)  # the data's own range passes
    np.testing.assert_array_equal(np.asarray(same), np.asarray(x))


def test_a_label_of_a_billion_is_one_line(capsys, tmp_path):
    y = np.zeros(20, np.int64)
    y[3] = 10**9
    np.savez(tmp_path / "d.npz", x_train=np.zeros((20, 28, 28), np.uint8), y_train=y,
             x_test=np.zeros((10, 28, 28), np.uint8), y_test=np.zeros(10, np.int64))
    line = one_line_rc2(capsys, "train", "--dataset", tmp_path / "d.npz", "--hidden", "4")
    assert "1000000000" in line and "y_train" in line or "d.npz" in line


MATRIX_HEAD = '[matrix]\ndatasets=["mnist"]\nmodels=["seed-mlp"]\nattacks=["none"]\n'

BAD_MATRICES = {
    "nested 50,000 deep": (MATRIX_HEAD + "eps=" + "[" * 50_000 + "]" * 50_000 + "\n",
                           "nested too deeply"),
    "eps above the CLI's bound": (MATRIX_HEAD + "eps=[1e9]\n", "eps"),
    "100,000 eps with a repeat": (MATRIX_HEAD + "eps=[" + ",".join(
        f"{i / 1e5:.5f}" for i in range(100_000)) + ",0.5]\n", "distinct eps"),
}


@pytest.mark.parametrize("kind", BAD_MATRICES)
def test_absurd_matrices_are_one_line(capsys, tmp_path, kind):
    text, words = BAD_MATRICES[kind]
    (tmp_path / "m.toml").write_text(text)
    line = one_line_rc2(capsys, "bench", "--matrix", tmp_path / "m.toml", "--out",
                        tmp_path / "o")
    assert words in line, line
    assert not (tmp_path / "o").exists()


def test_a_results_folder_of_an_earlier_version_is_adopted(tmp_path):
    """Before manifests: tables.md, records.csv, run.json, figures/, .cache/ only, run.json a
    run record; the figures tables.md links are listed, any other file stays unlisted."""
    from mlshift_jax.core import outdir

    d = tmp_path / "old"
    (d / "figures").mkdir(parents=True)
    (d / ".cache").mkdir()
    (d / "run.json").write_text(json.dumps({"determinism": "x", "out_dir": str(d)}))
    (d / "tables.md").write_text("- [a.png](figures/a.png)\n")
    (d / "records.csv").write_text("id\n")
    (d / "figures" / "a.png").write_bytes(b"a")
    (d / "figures" / "b.png").write_bytes(b"b")  # not linked: never listed
    assert outdir.claim(d) == d
    manifest = outdir.read(d)
    assert manifest["files"] == {"tables.md", "records.csv", "run.json", "figures/a.png"}
    (d / "run.json").write_text("{}")  # no run record: not provably ours
    (d / ".mlshift-manifest.json").unlink()
    with pytest.raises(ConfigError, match="did not write"):
        outdir.claim(d)
