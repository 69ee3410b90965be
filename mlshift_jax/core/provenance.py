"""Which code made a number: the package's source digest and the git commit.

`code_digest()` is a SHA-256 over every file that can change what the package computes: each
`mlshift_jax/**/*.py` and the package data (`data/_sample/*.npz`), by path relative to the
package and content, in sorted order (12 hex characters). Documentation, tests, the matrix
files and results are outside it: a README edit reruns nothing, any change to a trainer, an
attack, a detector or the runner reruns every cell. The digest is the whole package's rather
than per experiment because a per-module digest would have to follow every import, and a
missed one would silently reuse numbers computed by old code.

`git_commit()` is the HEAD commit of the checkout the package lives in ("unknown" for an
installed package or outside git), with "-dirty" appended when the package's source differs
from that commit: the commit alone then does not say which code ran, the digest does.

`relative_source(text)` turns a machine path into one relative to `PACKAGE_HOME` (the folder
holding the package: the checkout, or site-packages for an installed package), or, for a path
outside it, its last folder name: results carry no absolute paths of the machine that ran
them (datasets carry their content hash beside it).
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
PACKAGE_HOME = PACKAGE.parent  # the checkout in a clone, site-packages in an install
DATA_GLOBS = ("data/_sample/*.npz",)  # package data (pyproject's package-data)
DIGEST_CHARS = 12


def code_files(package: str | os.PathLike = PACKAGE) -> list[Path]:
    """The files `code_digest` reads, sorted by their path relative to `package`."""
    package = Path(package)
    files = [p for p in package.rglob("*.py") if "__pycache__" not in p.parts]
    for pattern in DATA_GLOBS:
        files += package.glob(pattern)
    return sorted(set(files), key=lambda p: p.relative_to(package).as_posix())


def digest_of(package: str | os.PathLike) -> str:
    """SHA-256 (first DIGEST_CHARS hex) over `code_files(package)`: each file's relative
    path, its length and its bytes."""
    package = Path(package)
    h = hashlib.sha256()
    for path in code_files(package):
        data = path.read_bytes()
        h.update(f"{path.relative_to(package).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:DIGEST_CHARS]


@functools.cache
def code_digest() -> str:
    """This package's `digest_of` (computed once per process)."""
    return digest_of(PACKAGE)


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], cwd=PACKAGE_HOME, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None


@functools.cache
def git_commit() -> str:
    """HEAD of the checkout whose top folder holds the package, "-dirty" appended when the
    package's files differ from it; "unknown" for an installed package (a site-packages inside
    some other checkout included) or outside git."""
    top = _git("rev-parse", "--show-toplevel", "HEAD")
    lines = top.stdout.split() if top is not None and top.returncode == 0 else []
    if len(lines) != 2 or Path(lines[0]).resolve() != PACKAGE_HOME:
        return "unknown"
    commit = lines[1]
    status = _git("status", "--porcelain", "--untracked-files=normal", "--", PACKAGE.name)
    if status is not None and status.returncode == 0 and any(
            line.endswith(".py") or line.endswith(".npz")
            for line in status.stdout.splitlines()):
        commit += "-dirty"
    return commit


def relative_source(text: str) -> str:
    """A data source or file name without the machine's absolute path.

    "env:/data/mnist" -> "env:mnist"; "/repo/mlshift_jax/bench/matrices/full.toml" ->
    "mlshift_jax/bench/matrices/full.toml" (inside PACKAGE_HOME: relative to it);
    "download:https://..." and other non-paths unchanged.
    """
    prefix, sep, rest = text.partition(":")
    if sep and not prefix.startswith("/") and rest.startswith("/"):
        return f"{prefix}:{relative_source(rest)}"
    if not text.startswith("/") and not (len(text) > 2 and text[1] == ":" and text[2] in "\\/"):
        return text
    path = Path(os.path.normpath(text))
    try:
        return path.relative_to(PACKAGE_HOME).as_posix()
    except ValueError:
        return path.name or text
