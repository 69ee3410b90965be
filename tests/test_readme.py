"""The README's "Use it on your own model and data" example runs as written (20 lines or
fewer), on a small keras-style .npz cut from the MNIST this machine has."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import mlshift_jax
from mlshift_jax.core.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Use it on your own model and data"


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index(SECTION):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _keras_npz(path: Path, ds, n_train: int = 2000, n_test: int = 300) -> None:
    """x_train, y_train, x_test, y_test as keras.datasets.mnist.load_data() gives them."""
    def raw(x):  # undo the study's scaling x/255*0.99+0.01 -> uint8 [n, 28, 28]
        return np.rint((x - 0.01) / 0.99 * 255).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)

    np.savez(path, x_train=raw(ds.x_train[:n_train]), y_train=ds.y_train[:n_train],
             x_test=raw(ds.x_test[:n_test]), y_test=ds.y_test[:n_test])


def test_readme_example_is_short():
    assert len(readme_example().strip().splitlines()) <= 20


def test_readme_example_runs(mnist, tmp_path, monkeypatch):
    from functools import partial

    from mlshift_jax.detection import change

    pytest.importorskip("flax")
    _keras_npz(tmp_path / "digits.npz", mnist)
    monkeypatch.chdir(tmp_path)
    # the example as written; only detect_change's null is smaller here (speed, not meaning)
    monkeypatch.setattr(change, "CalibrationConfig", partial(
        change.CalibrationConfig, n_null=4, sample_size=500, poison_seeds=1, probes=200,
        n_patched=50))
    monkeypatch.setattr(change.fingerprint, "ALPHA", 0.2)  # 4 null models reach 1/5 at best
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    path = tmp_path / "suspect.safetensors"
    with pytest.raises(ConfigError, match="pass the model"):  # "Net" is not importable
        mlshift_jax.load_model(path)
    model, params, meta = mlshift_jax.load_model(path, model=namespace["model"])
    assert meta["dataset"]["name"].startswith("digits") and meta["model"]["ref"] == "Net"

def readme_shell() -> list[list[str]]:
    """The shell block after the Python example: one argv per `mlshift` command."""
    text = README.read_text()
    section = text[text.index(SECTION):]
    block = re.search(r"The same from the shell.*?```\n(.*?)```", section, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [line.split()[1:] for line in lines if line.startswith("mlshift ")]


@pytest.mark.slow
def test_readme_shell_block_runs(tmp_path):
    """Each command of the README's shell block, as written, as its own `python -m
    mlshift_jax` process (as a shell runs it), with `Net` from the Python example saved in
    mynet.py in the working folder and a small 28x28 digits.npz."""
    import os
    import subprocess
    import sys

    pytest.importorskip("flax")
    code = readme_example()
    net = code[code.index("class Net"):code.index("\nds = ")]
    (tmp_path / "mynet.py").write_text(f"import flax.linen as nn\n\n{net}\n\nnet = Net()\n")
    rng = np.random.default_rng(0)

    def part(n):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        x[np.arange(n), 2 * y + 2, 4:24] = 250  # a bright row whose place is the class
        return x, y

    (x_tr, y_tr), (x_te, y_te) = part(200), part(64)
    np.savez(tmp_path / "digits.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    commands = readme_shell()
    assert [c[0] for c in commands] == ["train", "attack", "poison", "detect"]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), root, os.environ.get("PYTHONPATH", "")])}
    out = ""
    for argv in commands:
        done = subprocess.run([sys.executable, "-m", "mlshift_jax", *argv], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr
        out += done.stdout
    assert "verdict" in out and "pgd" in out
