"""Files: written so that nothing half-written is ever left on disk, read so that no bad file
gets past one named error.

Writing: `atomic_path` (a temp file beside the target, renamed into place only when the
writer succeeds; its name carries the writer's pid so that `clean_stale_temps` can remove
what a hard-killed run left behind), `write_text`, `save_params`.

Reading: `read_npz` is the one reader of `.npz` files in the harness (params, the bundled
sample, datasets, every cache). It never unpickles and checks, before it allocates anything:
that the file is a whole zip, each member's `.npy` header, the size the header declares
against the member's real size and against the memory free on this machine, and the ratio of
inflated to compressed size (deflate cannot exceed ~1032:1); while reading, the CRC and the
deflate stream. `check_arrays` (real numeric dtypes, finite values, sane shapes) is what every
reader of weights applies: `load_params` here, and `weights.load` for safetensors.
Every failure is a `DataError` naming the file and what was expected and found.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from mlshift_jax.core.errors import ConfigError, DataError

HASH_LEN = 12  # hex digits of a config hash (cache keys, cell ids)

__all__ = [
    "MAX_INFLATE_RATIO",
    "atomic_path",
    "available_memory",
    "check_arrays",
    "clean_stale_temps",
    "load_params",
    "read_npz",
    "save_params",
    "write_text",
]

MAX_INFLATE_RATIO = 1100  # deflate's ceiling is ~1032:1; above it the sizes are lies
MAX_NDIM = 8
MEMORY_SHARE = 0.8  # a file may take at most this share of the memory free now
_TEMP = re.compile(r"^\..+\.(\d+)-[^.]+\.tmp$")  # .<name>.<pid>-<random>.tmp
_OLD_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # the pid-less names of older versions
_OLD_TEMP_AGE_S = 600


# --- writing --------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    An interrupted or failing writer leaves the old file (or no file) and no temp file; a
    hard kill (SIGKILL, power loss) leaves `.<name>.<pid>-<random>.tmp`, which
    `clean_stale_temps` removes on the next run.
    """
    path = Path(path)
    if not path.name:
        raise DataError(f"expected a file path to write, found {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp",
                               dir=path.parent)
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


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2**22  # someone else's live process (or a nonsense pid: not alive)
    return True


def clean_stale_temps(folder: str | os.PathLike, *, recursive: bool = True,
                      names: set[str] | None = None) -> list[Path]:
    """Remove the temp files `atomic_path` left in `folder` when a writer was killed hard.

    A temp file counts as stale when the process named in it is gone (or, for pid-less names
    of older versions, when it is over 10 minutes old). names: only the temps of these target
    names (`.<name>.<pid>-<random>.tmp`), e.g. the one file `--save` writes; None: any (only
    for folders the tool created itself). Symlinks are never followed or removed. Returns the
    paths removed; folders that cannot be read are passed over.
    """
    folder = Path(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                if recursive and names is None:
                    removed += clean_stale_temps(entry.path)
                continue
            if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
                continue
            if names is not None and not any(
                    entry.name.startswith(f".{n}.") for n in names):
                continue
            match = _TEMP.match(entry.name)
            if match:
                stale = not _alive(int(match.group(1)))
            elif _OLD_TEMP.match(entry.name):
                stale = time.time() - entry.stat().st_mtime > _OLD_TEMP_AGE_S
            else:
                continue
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_params(path: str | os.PathLike, params: dict) -> None:
    """Save a flat dict of arrays as .npz, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in params.items()})


# --- reading --------------------------------------------------------------------------------


def available_memory() -> int:
    """Bytes of memory free for new allocations now (MemAvailable; else free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**62  # unknown: do not refuse on memory


def gib(n_bytes: float) -> str:
    """Bytes as '1.2 GiB'."""
    return f"{n_bytes / 2**30:.1f} GiB"


def _refused_dtype(dtype: np.dtype) -> str | None:
    """Why a dtype is refused (None: a real numeric dtype)."""
    if dtype.hasobject:
        return "object (pickled Python objects)"
    if dtype.kind == "b":
        return "bool"
    if dtype.kind == "c":
        return f"complex ({dtype})"
    if dtype.kind not in "iuf" or dtype.fields is not None or dtype.subdtype is not None:
        return f"{dtype} (not a real numeric dtype)"
    return None


def read_head(path: str | os.PathLike, n: int, what: str) -> tuple[int, bytes]:
    """(size in bytes, first n bytes) of a file; one DataError naming it when it is missing,
    a folder or unreadable (what: what was expected there)."""
    shown = str(path) or "''"
    size = regular_file(path, what)
    try:
        with open(path, "rb") as fh:
            return size, fh.read(n)
    except FileNotFoundError:
        raise DataError(f"{shown}: expected {what}, found no such file") from None
    except IsADirectoryError:
        raise DataError(f"{shown}: expected {what}, found a folder") from None
    except OSError as e:
        raise DataError(f"{shown}: expected a readable file, found {e.strerror or e}") from None


def file_kind(mode: int) -> str:
    """What a stat mode is, in words ("a folder", "a FIFO (named pipe)", ...)."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "a special file"


def regular_file(path: str | os.PathLike, what: str) -> int:
    """The size of `path` when it is a regular file (symlinks followed); one DataError naming
    it otherwise: missing, a folder, a FIFO, a device or a socket (never opened: a FIFO would
    block, /dev/zero would never end)."""
    shown = str(path) or "''"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{shown}: expected {what}, found no such file") from None
    except OSError as e:
        raise DataError(f"{shown}: expected a readable file, found {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{shown}: expected {what} (a regular file), found "
                        f"{file_kind(st.st_mode)}")
    return st.st_size


def read_npz(path: str | os.PathLike, *, what: str = "a .npz of arrays",
             only: str | None = None) -> dict[str, np.ndarray]:
    """Read an `.npz` safely: {name: array}, each array a fresh writable copy.

    No pickle is ever loaded. Refused, each with one `DataError` naming `path`: a missing,
    empty or truncated file; a bare `.npy` or anything else that is not a zip; a member that
    is not a `.npy`, whose header is bad, whose dtype is object, bool, complex or structured,
    whose declared size differs from the member's real size, or whose inflated size exceeds
    MAX_INFLATE_RATIO times its compressed size; members that together need more than
    MEMORY_SHARE of the memory free now (checked before allocating); a CRC mismatch or corrupt
    deflate data. `what` says what was expected (for the messages); only: read just the
    member of that name (every member's sizes are still checked; {} when it is absent).
    """
    path = Path(path)
    shown = str(path) or "''"
    size, head = read_head(path, 6, what)
    if size == 0:
        raise DataError(f"{shown}: expected {what}, found an empty (0-byte) file")
    if head.startswith(b"\x93NUMPY"):
        raise DataError(f"{shown}: expected {what} (a zip of .npy members), found a single "
                        ".npy array; save it with numpy.savez")
    if not head.startswith(b"PK"):
        raise DataError(f"{shown}: expected {what} (a zip file), found {size} bytes that do "
                        f"not start like a zip (first bytes {head[:4]!r})")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            plan = _plan(shown, infos, size)
            return {name: _read_member(shown, zf, info) for name, info in plan
                    if only is None or name == only}
    except DataError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise DataError(f"{shown}: expected {what}, found a damaged or truncated zip "
                        f"({type(e).__name__}: {e})") from None
    except (NotImplementedError, RuntimeError) as e:  # unknown compression, encryption
        raise DataError(f"{shown}: expected {what}, found a zip numpy cannot read ({e})") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{shown}: expected {what}, could not read it ({e})") from None


def _plan(shown: str, infos: list[zipfile.ZipInfo], size: int) -> list[tuple[str, zipfile.ZipInfo]]:
    """Check every member's sizes before anything is inflated; [(array name, info)]."""
    plan, names, total = [], set(), 0
    for info in infos:
        if info.is_dir():
            continue
        if not info.filename.endswith(".npy"):
            raise DataError(f"{shown}: expected only .npy members, found {info.filename!r}")
        name = info.filename[: -len(".npy")]
        if name in names:
            raise DataError(f"{shown}: expected distinct member names, found {name!r} twice")
        names.add(name)
        if info.compress_size > size:
            raise DataError(f"{shown}: member {name!r} declares {info.compress_size} "
                            f"compressed bytes, but the whole file holds {size}")
        if info.file_size > MAX_INFLATE_RATIO * max(info.compress_size, 1) + 1024:
            raise DataError(f"{shown}: member {name!r} would inflate from {info.compress_size} "
                            f"to {info.file_size} bytes (over {MAX_INFLATE_RATIO}:1, more than "
                            "deflate can give); refusing it")
        total += info.file_size
        plan.append((name, info))
    if not plan:
        raise DataError(f"{shown}: expected at least one array, found an empty archive")
    free = available_memory()
    if total > MEMORY_SHARE * free:
        raise DataError(f"{shown}: its arrays need ~{gib(total)}, this machine has "
                        f"{gib(free)} free; refusing to load it")
    return plan


def _read_member(shown: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One member as an array: header checked against the member's size before allocating."""
    fmt = np.lib.format
    name = info.filename[: -len(".npy")]
    with zf.open(info) as f:
        try:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except ValueError as e:
            raise DataError(f"{shown}: member {name!r}: expected a .npy header, found "
                            f"something else ({e})") from None
        why = _refused_dtype(dtype)
        if why is not None:
            raise DataError(f"{shown}: array {name!r}: expected a real numeric dtype "
                            f"(integer or float), found {why}")
        if len(shape) > MAX_NDIM:
            raise DataError(f"{shown}: array {name!r}: expected at most {MAX_NDIM} "
                            f"dimensions, found shape {shape}")
        count = 1
        for d in shape:
            count *= int(d)
        n_bytes = count * dtype.itemsize
        header = f.tell()
        if header + n_bytes != info.file_size:
            raise DataError(f"{shown}: array {name!r}: its header declares {dtype} "
                            f"{list(shape)} ({n_bytes} bytes), but the member holds "
                            f"{info.file_size - header} bytes")
        out = np.empty(shape, dtype=dtype, order="F" if fortran else "C")
        view = memoryview(out.reshape(-1, order="A")).cast("B") if n_bytes else memoryview(b"")
        got = 0
        while got < n_bytes:
            chunk = f.read(min(n_bytes - got, 1 << 24))
            if not chunk:
                break
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
        if got != n_bytes:
            raise DataError(f"{shown}: array {name!r}: truncated: expected {n_bytes} bytes, "
                            f"found {got}")
        if f.read(1):
            raise DataError(f"{shown}: array {name!r}: trailing bytes after its data")
    return out


def check_arrays(where: str, arrays: dict, *, finite: bool = True, what: str = "weights",
                 scalars: bool = False) -> dict[str, np.ndarray]:
    """Refuse arrays no model can use; return them as numpy arrays.

    where: the file (or other origin) named in the message. Every array must be real numeric
    (integer or float: not bool, complex, object, string or structured), have 1 to MAX_NDIM
    dimensions (0 too with `scalars`: flax and equinox pytrees hold scalar leaves) and at least
    one element, and, with `finite`, hold no NaN or inf. `DataError`
    names the first array at fault, what was expected and what was found. `weights.load`
    calls this too, so every weights format is held to the same rules.
    """
    if not arrays:
        raise DataError(f"{where}: expected {what} (named arrays), found none")
    out = {}
    for name, value in arrays.items():
        a = np.asarray(value)
        why = _refused_dtype(a.dtype)
        if why is not None:
            raise DataError(f"{where}: array {name!r}: expected a real numeric dtype "
                            f"(integer or float), found {why}")
        if not (0 if scalars else 1) <= a.ndim <= MAX_NDIM or a.size == 0:
            raise DataError(f"{where}: array {name!r}: expected 1 to {MAX_NDIM} dimensions "
                            f"and at least one element, found shape {list(a.shape)}")
        if finite and a.dtype.kind == "f":
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            if bad:
                raise DataError(f"{where}: array {name!r}: expected finite {what}, found "
                                f"{bad} NaN/inf value(s) of {a.size} (a diverged training?)")
        out[name] = a
    return out


def load_params(path: str | os.PathLike, expected: dict[str, int] | None = None, *,
                finite: bool = True) -> dict:
    """Load params saved by `save_params`: {name: array}, checked by `read_npz` and
    `check_arrays` (finite unless `finite=False`). expected: {name: ndim} to check."""
    params = check_arrays(str(path), read_npz(path, what="a .npz of params"), finite=finite)
    for name, ndim in (expected or {}).items():
        if name not in params or params[name].ndim != ndim:
            found = {k: v.shape for k, v in params.items()}
            raise DataError(f"{path}: expected array {name!r} with {ndim} dims; found {found}")
    return params

def config_hash(payload) -> str:
    """sha256 of the canonical JSON of `payload` (sorted keys, no spaces), short hex."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_LEN]


def tree_digest(tree, *, length: int = 16, tail: bytes = b"") -> str:
    """sha256 (`length` hex digits) of a pytree's array leaves (dtypes, shapes and bytes, in
    leaf order), then `tail`. The same arrays give the same digest on every machine."""
    import jax

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    h.update(tail)
    return h.hexdigest()[:length]


def cached_npz(path: str | os.PathLike, compute: Callable[[], dict], *, what: str,
               read: bool = True, write: bool = True,
               check: Callable[[dict], object] | None = None,
               on_damaged: Callable[[Path], None] | None = None) -> dict[str, np.ndarray]:
    """The arrays `compute()` returns (a dict of arrays), from the .npz cache entry at `path`.

    read: use the entry when it is there (`read_npz`, `what` names it in errors); an entry
    that fails to read, or that `check(arrays)` rejects (DataError, ConfigError, KeyError,
    TypeError, ValueError), is damaged: `on_damaged(path)` is called (default: a warning
    "damaged cache entry ... treated as missing and rebuilt") and the arrays are recomputed.
    write: save computed arrays there atomically; an unwritable cache (OSError) costs time,
    not correctness. -> {name: np.ndarray}."""
    path = Path(path)
    if read and path.exists():
        try:
            arrays = {k: np.asarray(v) for k, v in read_npz(path, what=what).items()}
            if check is not None:
                check(arrays)
            return arrays
        except (DataError, ConfigError, KeyError, TypeError, ValueError):
            if on_damaged is None:
                warnings.warn(f"damaged cache entry {path} treated as missing and rebuilt",
                              stacklevel=2)
            else:
                on_damaged(path)
    arrays = {k: np.asarray(v) for k, v in compute().items()}
    if write:
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, **arrays)
        except OSError:
            pass
    return arrays
