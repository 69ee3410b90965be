"""A fresh install's persistent compilation cache (issue 23): the same CLI command run twice
in fresh processes with an empty cache folder; the second loads its compiled programs from the
cache (it writes no new entry) and neither prints the cache's warning (JAX needs `filelock`
to read entries: without it every command warned "Error reading persistent compilation cache
entry ... Please install the filelock package" and recompiled)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
ARGV = ["train", "--hidden", "16", "--train-size", "500", "--epochs", "1", "--format", "json"]


def test_filelock_is_a_dependency():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].strip() == "filelock" for d in deps)


def _run(tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "MLSHIFT_NO_COMPILE_CACHE")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), MLSHIFT_NO_DOWNLOAD="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "mlshift_jax", *ARGV], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def _entries(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_a_second_process_loads_the_compiled_programs(tmp_path):
    folder = tmp_path / "cache" / "mlshift_jax" / "jax"
    first = _run(tmp_path)
    assert "compilation cache" not in first.stderr.lower(), first.stderr
    written = _entries(folder)
    assert written, "the first run cached no compiled program"
    second = _run(tmp_path)
    assert "compilation cache" not in second.stderr.lower(), second.stderr
    assert "filelock" not in second.stderr
    again = _entries(folder)
    new = sorted(set(again) - set(written))
    assert not new, f"the second run compiled programs again: {new[:3]}"
    assert first.stdout.split('"train_seconds"')[0] == second.stdout.split('"train_seconds"')[0]
