"""Writing files so that nothing half-written is ever left on disk, and reading params back."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mlshift_jax.errors import DataError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    An interrupted or failing writer leaves the old file (or no file) and no temp file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; give it a normal file's mode
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_params(path: str | os.PathLike, params: dict) -> None:
    """Save a flat dict of arrays as .npz, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in params.items()})


def load_params(path: str | os.PathLike, expected: dict[str, int] | None = None) -> dict:
    """Load params saved by `save_params` (no pickles). expected: {name: ndim} to check."""
    try:
        with np.load(path, allow_pickle=False) as f:
            params = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise DataError(f"{path}: no such params file") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: expected a .npz of arrays, could not read it ({e})") from None
    for name, ndim in (expected or {}).items():
        if name not in params or params[name].ndim != ndim:
            found = {k: v.shape for k, v in params.items()}
            raise DataError(f"{path}: expected array {name!r} with {ndim} dims; found {found}")
    return params
