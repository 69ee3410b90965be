"""scripts/bench_gpu.sh (`make bench-gpu`) refuses on a machine without a GPU: one line on
stderr, exit status 2, nothing installed or run. The GPU path itself runs on a lent GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_gpu.sh"


def _run(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120, cwd=ROOT)


def _fake_smi(tmp_path, output: str, status: int = 0) -> str:
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nprintf '%s' '{output}'\nexit {status}\n")
    smi.chmod(0o755)
    return str(smi)


def test_check_refuses_without_nvidia_smi(tmp_path):
    done = _run("--check", MLSHIFT_NVIDIA_SMI=str(tmp_path / "absent"))
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "no NVIDIA GPU" in done.stderr


def test_check_refuses_when_nvidia_smi_lists_no_gpu(tmp_path):
    done = _run("--check", MLSHIFT_NVIDIA_SMI=_fake_smi(tmp_path, "No devices found", 6))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


def test_check_passes_with_a_gpu(tmp_path):
    smi = _fake_smi(tmp_path, "GPU 0: NVIDIA H200 (UUID: GPU-0)")
    done = _run("--check", MLSHIFT_NVIDIA_SMI=smi)
    assert done.returncode == 0 and done.stderr == ""


def test_run_refuses_when_jax_sees_only_the_cpu():
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("JAX has an accelerator here")
    done = _run(sys.executable, JAX_PLATFORMS="cpu")
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "no accelerator" in done.stderr
    assert not (ROOT / "results" / "cpu" / "floor.json").exists()  # nothing was run


def test_make_checks_before_installing():
    recipe = (ROOT / "Makefile").read_text().split("\nbench-gpu:")[1].split("\n\n")[0]
    steps = [line.strip() for line in recipe.splitlines()[1:] if line.startswith("\t")]
    assert steps[0] == "scripts/bench_gpu.sh --check" and "cuda12" in steps[1]
