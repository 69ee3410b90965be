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


@pytest.mark.slow
def test_dry_run_runs_every_step_at_a_tiny_size_into_a_folder_named_from_the_device(tmp_path):
    """The dry run's steps and layout, with a stand-in Python that runs `-c` snippets for real
    and records the two long steps (floor.py, bench), writing the files they would write.
    The whole dry run for real is CI's (.ci/run): about 13 minutes on 2 busy cores."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$1" = -c ]; then exec {sys.executable} "$@"; fi
echo "$*" >> {log}
out=""; prev=""
for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
mkdir -p "$out"
case "$*" in
  *floor.py*) echo '{{}}' > "$out/floor.json"; echo x > "$out/floor.md" ;;
  *mlshift_jax\\ bench*) for f in tables.md records.csv run.json; do echo x > "$out/$f"; done ;;
esac
""")
    fake.chmod(0o755)
    done = _run("--dry-run", str(fake), JAX_PLATFORMS="cpu",
                MLSHIFT_DRY_RUN_OUT=str(tmp_path / "dry"),
                MLSHIFT_DRY_RUN_DEVICE="NVIDIA H200")
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    out = tmp_path / "dry" / "results" / "gpu-h200"
    assert len(calls) == 2 and "benchmarks/floor.py" in calls[0] and "--images 2000" in calls[0]
    assert f"--out {out}" in calls[0]
    assert calls[1].startswith("-m mlshift_jax bench --force --tiny") and str(out) in calls[1]
    assert "results/gpu-h200 written" in done.stdout and "DRY RUN" in done.stderr
    assert "[1/3]" in done.stderr and "[3/3]" in done.stderr
    assert not (ROOT / "results" / "gpu-h200").exists()  # the repository's results untouched


@pytest.mark.slow
def test_dry_run_fails_when_a_step_leaves_a_file_out(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\nif [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\n'
                    "exit 0\n")
    fake.chmod(0o755)
    done = _run("--dry-run", str(fake), JAX_PLATFORMS="cpu",
                MLSHIFT_DRY_RUN_OUT=str(tmp_path / "dry"))
    assert done.returncode == 1 and "lacks floor.json" in done.stderr


@pytest.mark.slow
def test_floor_lists_its_files_so_the_bench_may_write_beside_them(tmp_path):
    """bench-gpu writes floor.py's files, then the bench's, into one results folder: floor
    must list its two files in the folder's manifest, or the bench refuses the folder as
    holding files mlshift did not write (the CI dry run failed so)."""
    from mlshift_jax.core import outdir

    out = tmp_path / "results" / "gpu-test"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "floor.py"), "--images", "200",
                           "--population", "2", "--population-size", "100", "--gemm", "64",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert {p.name for p in out.iterdir()} == {"floor.json", "floor.md",
                                               ".mlshift-manifest.json"}
    assert outdir.claim(out) == out  # the bench accepts the folder
    (out / "notes.txt").write_text("mine")  # a file floor did not write: refused as before
    with pytest.raises(Exception, match="did not write"):
        outdir.claim(out)
