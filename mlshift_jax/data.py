"""Datasets as numpy arrays: MNIST and Fashion-MNIST from IDX files or the study's CSV.

`load` finds the data, in this order: the `data_dir` argument; env `MLSHIFT_DATA_DIR` (either
holds the files, or one subfolder per dataset: mnist/, fashion-mnist/); the user cache
(`$XDG_CACHE_HOME/mlshift_jax/<name>`, else `~/.cache/mlshift_jax/<name>`);
`/usr/share/datasets/<name>` (Debian's dataset packages); a download from the public mirrors
into the cache (off with `download=False` or env `MLSHIFT_NO_DOWNLOAD=1`); last, for MNIST
only, a small sample shipped in the package. Images are scaled as the study did,
x/255*0.99+0.01, so every input lies in `INPUT_RANGE`.

MNIST: LeCun, Cortes, Burges, "The MNIST database of handwritten digits" (1998).
Fashion-MNIST: Xiao, Rasul, Vollgraf, arXiv:1708.07747 (2017).
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt

from mlshift_jax import download as _dl
from mlshift_jax.download import download
from mlshift_jax.errors import ConfigError, DataError
from mlshift_jax.files import MEMORY_SHARE, available_memory, gib, read_npz

__all__ = [
    "DATASETS",
    "INPUT_RANGE",
    "Dataset",
    "SampleDataWarning",
    "cache_dir",
    "download",
    "load",
    "read_csv",
    "read_dir",
    "read_idx",
    "scale",
    "subsample",
]

INPUT_RANGE = (0.01, 1.0)  # the study's scaling maps pixel 0 to 0.01 and 255 to 1.0
N_PIXELS = 784
N_CLASSES = 10
DATASETS = ("mnist", "fashion-mnist")
SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets"),)

_SAMPLE_FILES = {"mnist": "mnist_sample.npz"}
_IDX_STEMS = {  # role -> file name as published, without ".gz"
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_MAGIC = {2051: 3, 2049: 1}  # magic number -> number of dimensions (images, labels)
# md5 of each known dataset's 60,000 training labels (uint8, no header): catches one
# dataset's files read under another's name, e.g. MLSHIFT_DATA_DIR=.../mnist for fashion-mnist.
_TRAIN_LABELS_MD5 = {
    "mnist": "e86ee40d66677c011a9abda399ec8c4d",
    "fashion-mnist": "3236f6424fc25388b2834cb19942cf7e",
}


class SampleDataWarning(UserWarning):
    """`load` fell back to the small bundled sample: results differ from full-data tables."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset, scaled to its input range; its arrays are read-only.

    x_train: float [n, D] in input_range, each image flattened row-major from image_shape
    (H, W, C), D = H * W * C; y_train: int32 [n] in 0..n_classes-1; x_test: float [m, D];
    y_test: int32 [m]. `source` says where it came from:
    "data_dir:<path>", "env:<path>", "cache:<path>", "system:<path>", "download:<url>" or
    "bundled-sample".
    """

    name: str
    x_train: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    x_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)
    source: str
    image_shape: tuple[int, ...] = (28, 28, 1)
    n_classes: int = 10
    input_range: tuple[float, float] = INPUT_RANGE

    @property
    def is_sample(self) -> bool:
        """True for the bundled sample, which is not the full dataset."""
        return self.source == "bundled-sample"

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"source={self.source!r})"
        )


def load(
    name: str = "mnist",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    dtype: npt.DTypeLike = np.float32,
) -> Dataset:
    """Find, read, check and scale dataset `name` (see the module docstring for the order).

    An explicit `data_dir` or `MLSHIFT_DATA_DIR` that lacks the files raises `DataError`; it
    never falls back, with one exception: an `MLSHIFT_DATA_DIR` that holds another dataset's
    files (say MNIST's, when `name` is fashion-mnist) is passed over for `name`. Unreachable
    mirrors, or downloads switched off, fall through to the bundled sample with a one-line
    `SampleDataWarning`; a download that fails its checksum raises `DataError`.
    """
    if name not in DATASETS:
        raise ConfigError(f"dataset: expected one of {', '.join(DATASETS)}, found {name!r}")
    if data_dir is not None:
        path = _subfolder(Path(data_dir), name)
        return _from_dir(name, path, f"data_dir:{path}", dtype)
    env = os.environ.get("MLSHIFT_DATA_DIR")
    if env:
        path = _subfolder(Path(env), name)
        try:
            return _from_dir(name, path, f"env:{path}", dtype)
        except _OtherDataset:
            pass  # the variable points at another dataset: look for `name` elsewhere
    cache = cache_dir(name)
    if _has_files(cache, name):
        return _from_dir(name, cache, f"cache:{cache}", dtype)
    for root in SYSTEM_DIRS:
        if _has_files(root / name, name):
            return _from_dir(name, root / name, f"system:{root / name}", dtype)

    if not download or _env_flag("MLSHIFT_NO_DOWNLOAD"):
        why = "download disabled"
    elif name not in _dl.SOURCES:
        why = "no checksummed mirror known"
    else:
        try:
            urls = _dl.fetch(name, cache)
        except _dl.DownloadUnavailable:
            why = "download failed: mirrors unreachable"
        else:
            source = f"download:{urls[0].rsplit('/', 1)[0]}/" if urls else f"cache:{cache}"
            return _from_dir(name, cache, source, dtype)

    if name not in _SAMPLE_FILES:
        raise DataError(
            f"{name}: expected its files in data_dir, MLSHIFT_DATA_DIR, {cache} or "
            f"{', '.join(str(r / name) for r in SYSTEM_DIRS)}; found none ({why}). "
            f"Install it with `apt-get install dataset-{name}` or pass --data-dir"
        )
    dataset = _load_sample(name, dtype)
    warnings.warn(
        f"no full {name} in {cache} ({why}): using the bundled sample of "
        f"{len(dataset.y_train)} train / {len(dataset.y_test)} test images, so results will "
        "differ from full-data tables; set MLSHIFT_DATA_DIR or pass data_dir",
        SampleDataWarning,
        stacklevel=2,
    )
    return dataset


def cache_dir(name: str = "mnist") -> Path:
    """The user cache for dataset `name`: `$XDG_CACHE_HOME/mlshift_jax/<name>`, else ~/.cache."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "mlshift_jax" / name


def read_dir(
    directory: str | os.PathLike[str], name: str = "mnist"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read and check dataset `name` in `directory`: its four IDX files, else its two CSVs.

    Returns (x_train uint8 [n, 784], y_train int32 [n], x_test uint8 [m, 784], y_test int32 [m]).
    """
    files = _locate(Path(directory), name)
    if "train" in files:
        x_train, y_train = read_csv(files["train"])
        x_test, y_test = read_csv(files["test"])
        paths = [files["train"]] * 2 + [files["test"]] * 2
    else:
        paths = [files[role] for role in _IDX_STEMS]
        x_train, y_train, x_test, y_test = (read_idx(p) for p in paths)
        x_train, x_test = _images(x_train, paths[0]), _images(x_test, paths[2])
        y_train, y_test = _labels(y_train, paths[1]), _labels(y_test, paths[3])
    _check_split(x_train, y_train, paths[0], paths[1])
    _check_split(x_test, y_test, paths[2], paths[3])
    _check_identity(name, y_train, paths[1])
    return x_train, y_train, x_test, y_test


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, gzip or raw: images -> uint8 [n, 28, 28], labels -> uint8 [n].

    Checks the magic number (2051 images, 2049 labels), the 28x28 image size, and that the
    byte count matches the header. The result is a read-only view of the file's bytes.
    """
    path = Path(path)
    raw = _read_bytes(path, _idx_size)
    magic = int.from_bytes(raw[:4], "big")
    if len(raw) < 4 or magic not in _IDX_MAGIC:
        found = f"magic {magic}" if len(raw) >= 4 else f"{len(raw)} bytes"
        raise DataError(
            f"{path}: expected an IDX file with magic number 2051 (images) or 2049 (labels), "
            f"found {found}"
        )
    header = 4 + 4 * _IDX_MAGIC[magic]
    if len(raw) < header:
        raise DataError(f"{path}: truncated: expected a {header}-byte header, found {len(raw)}")
    dims = tuple(int.from_bytes(raw[i : i + 4], "big") for i in range(4, header, 4))
    if len(dims) == 3 and dims[1:] != (28, 28):
        raise DataError(f"{path}: expected 28x28 images, found {dims[1]}x{dims[2]}")
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "trailing bytes"
        raise DataError(
            f"{path}: {what}: header says {'x'.join(map(str, dims))}, so expected {expected} "
            f"bytes, found {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_csv(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read the study's CSV, `label,p1,...,p784` per line (a `label,...` header is skipped).

    Returns images uint8 [n, 784] and labels int32 [n]; a bad line raises `DataError` with
    its line number.
    """
    path = Path(path)
    lines = _read_bytes(path).decode("utf-8", errors="replace").splitlines()
    rows = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if rows and rows[0][1].split(",", 1)[0].strip().strip('"').lower() == "label":
        rows = rows[1:]
    if not rows:
        raise DataError(f"{path}: expected CSV rows of label and {N_PIXELS} pixels, found none")
    for lineno, line in rows:
        if line.count(",") != N_PIXELS:
            raise DataError(
                f"{path}, line {lineno}: expected {N_PIXELS + 1} fields (label, {N_PIXELS} "
                f"pixels), found {line.count(',') + 1}"
            )
    try:
        table = np.loadtxt([line for _, line in rows], delimiter=",", dtype=np.int16, ndmin=2)
    except (ValueError, OverflowError):  # parse line by line to name the line at fault
        table = np.stack([_parse_row(path, lineno, line) for lineno, line in rows])
    bad = np.argwhere((table < 0) | (table > 255))
    if len(bad):
        row, col = bad[0]
        raise DataError(
            f"{path}, line {rows[row][0]}: expected values 0..255, found {table[row, col]} in "
            f"field {col + 1}"
        )
    return table[:, 1:].astype(np.uint8), table[:, 0].astype(np.int32)


def scale(x_uint8: np.ndarray, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
    """The study's scaling x/255*0.99+0.01: uint8 [n, 28, 28] or [n, 784] -> dtype [n, 784].

    Computed in float64 and rounded once to `dtype`, so 0 -> 0.01 and 255 -> 1.0 exactly.
    """
    x = np.asarray(x_uint8)
    if x.dtype != np.uint8:
        raise ConfigError(f"scale: expected uint8 pixels, found dtype {x.dtype}")
    if not np.issubdtype(dtype, np.floating):
        raise ConfigError(f"scale: expected a floating dtype, found {np.dtype(dtype)}")
    if x.size % N_PIXELS:
        raise ConfigError(f"scale: expected images of {N_PIXELS} pixels, found shape {x.shape}")
    table = (np.arange(256) / 255.0 * 0.99 + 0.01).astype(dtype)
    return table[x.reshape(-1, N_PIXELS)]


def subsample(seed: int, n: int, size: int) -> np.ndarray:
    """`size` distinct indices into range(n), in random order: int64 [size].

    Drawn by `np.random.default_rng(seed)`, so the same seed gives the same indices.
    """
    if not 1 <= size <= n:
        raise ConfigError(f"subsample: expected a size in 1..{n}, found {size}")
    return np.random.default_rng(seed).choice(n, size=size, replace=False)


def _from_dir(name: str, directory: Path, source: str, dtype: npt.DTypeLike) -> Dataset:
    """Read `directory` and wrap it as a scaled, read-only `Dataset`."""
    return _dataset(name, *read_dir(directory, name), source, dtype)


def _dataset(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    source: str,
    dtype: npt.DTypeLike,
) -> Dataset:
    """Scale uint8 images and freeze every array."""
    arrays = [scale(x_train, dtype), y_train.astype(np.int32), scale(x_test, dtype)]
    arrays.append(y_test.astype(np.int32))
    for a in arrays:
        a.flags.writeable = False
    return Dataset(name, *arrays, source)


def _load_sample(name: str, dtype: npt.DTypeLike) -> Dataset:
    """The sample shipped in `mlshift_jax/_sample/` (built by scripts/make_sample.py)."""
    res = resources.files("mlshift_jax") / "_sample" / _SAMPLE_FILES[name]
    keys = ("x_train", "y_train", "x_test", "y_test")
    with resources.as_file(res) as path:
        arrays = read_npz(path, what=f"the bundled {name} sample ({', '.join(keys)})")
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise DataError(f"{res}: expected the bundled {name} sample ({', '.join(keys)}), "
                        f"found {sorted(arrays)}")
    x_train, y_train, x_test, y_test = (arrays[k] for k in keys)
    _check_split(x_train, y_train, Path(str(res)), Path(str(res)))
    _check_split(x_test, y_test, Path(str(res)), Path(str(res)))
    return _dataset(name, x_train, y_train, x_test, y_test, "bundled-sample", dtype)


def _locate(directory: Path, name: str) -> dict[str, Path]:
    """The dataset's files: {x_train, y_train, x_test, y_test} IDX paths, else {train, test} CSV."""
    if not directory.is_dir():
        found = "a file" if directory.exists() else "nothing"
        raise DataError(f"{directory}: expected a folder with the {name} files, found {found}")
    idx = {role: _find_idx(directory, stem) for role, stem in _IDX_STEMS.items()}
    if all(idx.values()):
        return idx  # type: ignore[return-value]
    csv = {split: directory / f"{name}_{split}.csv" for split in ("train", "test")}
    if all(p.is_file() for p in csv.values()):
        return csv
    missing = [f"{stem}[.gz]" for role, stem in _IDX_STEMS.items() if idx[role] is None]
    if any(idx.values()):
        raise DataError(
            f"{directory}: expected the four {name} IDX files, missing {', '.join(missing)}"
        )
    present = sorted(p.name for p in directory.iterdir())
    shown = ", ".join(present[:8]) + (", ..." if len(present) > 8 else "") or "nothing"
    raise DataError(
        f"{directory}: expected {name} as IDX files ({', '.join(_IDX_STEMS.values())}, "
        f"gzip or raw, '-idx' or '.idx') or as {csv['train'].name} and {csv['test'].name}; "
        f"found {shown}"
    )


def _find_idx(directory: Path, stem: str) -> Path | None:
    """The first of the spellings `<stem>[.gz]` and `<stem with .idx>[.gz]` that exists."""
    dotted = stem.replace("-idx", ".idx")
    for file_name in (stem + ".gz", stem, dotted + ".gz", dotted):
        if (directory / file_name).is_file():
            return directory / file_name
    return None


def _subfolder(root: Path, name: str) -> Path:
    """`root/<name>` if that folder exists (one subfolder per dataset), else `root`."""
    root = root.expanduser().absolute()
    return root / name if (root / name).is_dir() else root


def _has_files(directory: Path, name: str) -> bool:
    """Whether `directory` holds a complete set of the dataset's files."""
    try:
        _locate(directory, name)
    except DataError:
        return False
    return True


def _read_bytes(path: Path, declared: Callable[[bytes], int | None] | None = None) -> bytes:
    """A file's bytes, gunzipped if they start with the gzip magic.

    Nothing is read or inflated past what memory allows (`files.MEMORY_SHARE` of the memory
    free now). declared(head) -> the total size the file's own header declares (None: not
    known); given it, a gzip stream is inflated only that far (and one byte more, to catch a
    stream longer than its header says), so a small gzip cannot inflate into gigabytes.
    """
    budget = int(MEMORY_SHARE * available_memory())
    try:
        size = path.stat().st_size
        if size > budget:
            raise DataError(f"{path}: needs ~{gib(size)} to read, this machine has "
                            f"{gib(budget / MEMORY_SHARE)} free")
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"{path}: expected a file, found nothing") from e
    except IsADirectoryError as e:
        raise DataError(f"{path}: expected a file, found a folder") from e
    except OSError as e:
        raise DataError(f"{path}: expected a readable file, found {e.strerror}") from e
    if raw[:2] != b"\x1f\x8b":
        return raw
    d = zlib.decompressobj(wbits=31)  # gzip: header and CRC-32 trailer checked by zlib
    try:
        out = d.decompress(raw, 64)
        limit = budget
        if declared is not None and (n := declared(out)) is not None:
            if n > budget:
                raise DataError(f"{path}: its header declares {n} bytes (~{gib(n)}), this "
                                f"machine has {gib(budget / MEMORY_SHARE)} free")
            limit = n
        while d.unconsumed_tail and len(out) <= limit:
            out += d.decompress(d.unconsumed_tail, limit + 1 - len(out))
    except zlib.error as e:
        raise DataError(f"{path}: expected gzip data, found a corrupt stream ({e})") from e
    if len(out) > limit:
        why = "its header declares" if limit != budget else "memory allows"
        raise DataError(f"{path}: expected the gzip stream to inflate to at most {limit} "
                        f"bytes ({why}), found more; refusing it")
    if not d.eof:
        raise DataError(
            f"{path}: truncated: expected a complete gzip stream, found its "
            f"{len(raw)} bytes end early"
        )
    if d.unused_data:
        raise DataError(f"{path}: expected one gzip stream, found {len(d.unused_data)} "
                        "bytes after it")
    return out


def _idx_size(head: bytes) -> int | None:
    """The total byte count an IDX header declares (None: not an IDX header)."""
    if len(head) < 4 or int.from_bytes(head[:4], "big") not in _IDX_MAGIC:
        return None
    ndim = _IDX_MAGIC[int.from_bytes(head[:4], "big")]
    header = 4 + 4 * ndim
    if len(head) < header:
        return None
    n = 1
    for i in range(4, header, 4):
        n *= int.from_bytes(head[i : i + 4], "big")
    return header + n


def _parse_row(path: Path, lineno: int, line: str) -> np.ndarray:
    """One CSV line as int16 [785]; slow, used only to name the line and field at fault."""
    values = []
    for col, text in enumerate(line.split(",")):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not 0 <= value <= 255:
            raise DataError(
                f"{path}, line {lineno}: expected values 0..255, found {text.strip()!r} in "
                f"field {col + 1}"
            )
        values.append(value)
    return np.array(values, dtype=np.int16)


def _images(x: np.ndarray, path: Path) -> np.ndarray:
    """IDX images [n, 28, 28] -> [n, 784]; labels files in their place are an error."""
    if x.ndim != 3:
        raise DataError(f"{path}: expected an images file (magic 2051), found labels (2049)")
    return x.reshape(len(x), N_PIXELS)


def _labels(y: np.ndarray, path: Path) -> np.ndarray:
    """IDX labels [n] -> int32 [n]; an images file in their place is an error."""
    if y.ndim != 1:
        raise DataError(f"{path}: expected a labels file (magic 2049), found images (2051)")
    return y.astype(np.int32)


def _check_split(x: np.ndarray, y: np.ndarray, x_path: Path, y_path: Path) -> None:
    """Images uint8 [n, 784] and labels [n] in 0..9, n >= 1."""
    if x.ndim != 2 or x.shape[1] != N_PIXELS or x.dtype != np.uint8:
        raise DataError(
            f"{x_path}: expected uint8 images [n, {N_PIXELS}], found {x.dtype} {list(x.shape)}"
        )
    if len(x) != len(y) or len(x) == 0:
        raise DataError(
            f"{x_path} and {y_path}: expected as many labels as images (at least "
            f"one), found {len(x)} images and {len(y)} labels"
        )
    bad = np.flatnonzero((y < 0) | (y >= N_CLASSES))
    if len(bad):
        raise DataError(
            f"{y_path}: expected labels 0..{N_CLASSES - 1}, found {y[bad[0]]} (sample {bad[0]})"
        )


class _OtherDataset(DataError):
    """The files are those of another known dataset."""


def _check_identity(name: str, y_train: np.ndarray, path: Path) -> None:
    """Refuse another known dataset's files read under `name` (same format, same names)."""
    digest = hashlib.md5(y_train.astype(np.uint8).tobytes(), usedforsecurity=False).hexdigest()
    for other, known in _TRAIN_LABELS_MD5.items():
        if other != name and digest == known:
            raise _OtherDataset(
                f"{path}: expected {name}, found the {other} training labels; put "
                f"{name} in its own folder (e.g. $MLSHIFT_DATA_DIR/{name})"
            )


def _env_flag(var: str) -> bool:
    """Whether env `var` is set to something other than '', '0', 'false' or 'no'."""
    return os.environ.get(var, "").strip().lower() not in ("", "0", "false", "no")
