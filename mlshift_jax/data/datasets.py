"""Datasets as numpy arrays: MNIST and Fashion-MNIST by name, or the user's own by path.

`load(name)` takes a built-in name or a path: an `.npz` with x_train, y_train, x_test, y_test
(uint8 images [n, H, W] or [n, H, W, C], integer labels: the `keras.datasets` layout); a
folder of four IDX files of any image size; or CSVs of `label,p1..pD` rows (`train_csv=` /
`test_csv=`, or a folder holding train.csv and test.csv; square single-channel images unless
`image_shape=` says otherwise). Any image size, channel count and number of classes K
(labels 0..K-1, checked; K read off the labels unless `n_classes=` gives it). Scaling belongs
to the dataset: the built-ins keep the study's x/255*0.99+0.01 in [0.01, 1]; path datasets
default to x/255 in [0, 1]; `scale=` ("study", "unit" or (lo, hi)) overrides either.

For a built-in name:

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
import math
import os
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt

from mlshift_jax.core import files
from mlshift_jax.core.errors import ConfigError, DataError
from mlshift_jax.core.files import MEMORY_SHARE, available_memory, gib
from mlshift_jax.data import download as _dl
from mlshift_jax.data.download import download
from mlshift_jax.data.spec import Spec

__all__ = [
    "DATASETS",
    "builtin_spec",
    "INPUT_RANGE",
    "Dataset",
    "SampleDataWarning",
    "cache_dir",
    "content_hash",
    "download",
    "load",
    "read_csv",
    "read_dir",
    "read_idx",
    "read_npz",
    "scale",
    "subsample",
    "to_image",
]

INPUT_RANGE = (0.01, 1.0)  # the study's scaling maps pixel 0 to 0.01 and 255 to 1.0
# named scalings: pixel 0 -> lo, 255 -> hi
SCALES = {"study": INPUT_RANGE, "unit": (0.0, 1.0)}
DATASETS = ("mnist", "fashion-mnist")
_BUILTIN_SHAPE, _BUILTIN_CLASSES = (28, 28, 1), 10  # both built-ins: 28x28 grey, 10 classes
_CSV_NAMES = ("train.csv", "test.csv")  # a folder dataset's CSVs
SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets"),)

_SAMPLE_FILES = {"mnist": "mnist_sample.npz"}
_IDX_STEMS = {  # role -> file name as published, without ".gz"
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
MAX_CLASSES = 100_000  # more classes than any image dataset has; 10**9 would not fit memory
_IDX_MAGIC = {2051: 3, 2052: 4, 2049: 1}  # magic -> dimensions (images, with channels, labels)
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
    def spec(self) -> Spec:
        """What a model needs to know of this data: `Spec(image_shape, n_classes,
        input_range)`."""

        return Spec(tuple(self.image_shape), int(self.n_classes),
                           tuple(self.input_range))

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
    name: str | os.PathLike[str] = "mnist",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    dtype: npt.DTypeLike = np.float32,
    train_csv: str | os.PathLike[str] | None = None,
    test_csv: str | os.PathLike[str] | None = None,
    image_shape: tuple[int, ...] | None = None,
    scale: str | tuple[float, float] | None = None,
    n_classes: int | None = None,
) -> Dataset:
    """Find, read, check and scale a dataset: a built-in `name` or a path.

    Built-ins (see the module docstring for the order they are searched in): an explicit
    `data_dir` or `MLSHIFT_DATA_DIR` that lacks the files raises `DataError`; it never falls
    back, with one exception: an `MLSHIFT_DATA_DIR` that holds another dataset's files (say
    MNIST's, when `name` is fashion-mnist) is passed over for `name`. Unreachable mirrors, or
    downloads switched off, fall through to the bundled sample with a one-line
    `SampleDataWarning`; a download that fails its checksum raises `DataError`.

    A path: a `.npz` file or a folder (IDX files, or train.csv and test.csv); `train_csv` and
    `test_csv` name two CSV files directly (then `name` may be left as it is or name the
    dataset). The dataset's name is the file's stem or the folder's name. image_shape:
    (H, W) or (H, W, C), needed for CSVs of non-square or colour images (default: square,
    one channel); n_classes: K (default: the largest label + 1); scale: "study"
    (x/255*0.99+0.01), "unit" (x/255) or (lo, hi): pixel 0 -> lo, 255 -> hi (default: the
    study's for the built-ins, "unit" for paths). Raises `DataError` for a missing or bad
    file, `ConfigError` for a bad argument.
    """
    if (train_csv is None) != (test_csv is None):
        raise ConfigError("dataset: expected both train_csv and test_csv, or neither; found "
                          f"train_csv={train_csv!r}, test_csv={test_csv!r}")
    if train_csv is not None:
        default = Path(train_csv).expanduser().stem
        csv_name = name if isinstance(name, str) and name not in ("mnist", *DATASETS) else default
        return _from_csv(str(csv_name), Path(train_csv), Path(test_csv), dtype=dtype,
                         image_shape=image_shape, scale=scale, n_classes=n_classes)
    if isinstance(name, str) and name in DATASETS:
        _check_builtin_options(name, image_shape, n_classes)
        return _load_builtin(name, data_dir, download=download, dtype=dtype,
                             input_range=_input_range(scale, INPUT_RANGE))
    return _load_path(name, dtype=dtype, image_shape=image_shape, scale=scale,
                      n_classes=n_classes)


def _check_builtin_options(name: str, image_shape, n_classes) -> None:
    """image_shape / n_classes given with a built-in name must be the built-in's own."""
    shape = None if image_shape is None else _image_shape(image_shape)
    if shape not in (None, _BUILTIN_SHAPE) or n_classes not in (None, _BUILTIN_CLASSES):
        raise ConfigError(f"{name}: its images are {_BUILTIN_SHAPE} with {_BUILTIN_CLASSES} "
                          f"classes; found image_shape={image_shape!r}, n_classes={n_classes!r}")


def _load_builtin(name: str, data_dir, *, download: bool, dtype: npt.DTypeLike,
                  input_range: tuple[float, float]) -> Dataset:
    """A built-in dataset found as `load` describes."""
    if data_dir is not None:
        path = _subfolder(Path(data_dir), name)
        return _from_dir(name, path, f"data_dir:{path}", dtype, input_range)
    env = os.environ.get("MLSHIFT_DATA_DIR")
    if env:
        path = _subfolder(Path(env), name)
        try:
            return _from_dir(name, path, f"env:{path}", dtype, input_range)
        except _OtherDataset:
            pass  # the variable points at another dataset: look for `name` elsewhere
    cache = cache_dir(name)
    if _has_files(cache, name):
        return _from_dir(name, cache, f"cache:{cache}", dtype, input_range)
    for root in SYSTEM_DIRS:
        if _has_files(root / name, name):
            return _from_dir(name, root / name, f"system:{root / name}", dtype, input_range)

    if not download or _env_flag("MLSHIFT_NO_DOWNLOAD"):
        why = "download disabled, none attempted"
    elif name not in _dl.SOURCES:
        why = "no checksummed mirror known, none attempted"
    else:
        try:
            urls = _dl.fetch(name, cache)
        except _dl.DownloadUnavailable:
            why = "a download was tried; no mirror answered"
        else:
            source = f"download:{urls[0].rsplit('/', 1)[0]}/" if urls else f"cache:{cache}"
            return _from_dir(name, cache, source, dtype, input_range)

    if name not in _SAMPLE_FILES:
        raise DataError(
            f"{name}: expected its files in data_dir, MLSHIFT_DATA_DIR, {cache} or "
            f"{', '.join(str(r / name) for r in SYSTEM_DIRS)}; found none ({why}). "
            f"Install it with `apt-get install dataset-{name}` or pass --data-dir"
        )
    dataset = _load_sample(name, dtype, input_range)
    warnings.warn(
        f"using the bundled {name} sample ({len(dataset.y_train)} train / "
        f"{len(dataset.y_test)} test images), not the full {name}: none found on disk ({why}); "
        f"results will differ from full-data tables. For the full {name}: set "
        "MLSHIFT_DATA_DIR=DIR (or pass --data-dir DIR / data_dir=) to a folder of its IDX "
        "files",
        SampleDataWarning,
        stacklevel=3,
    )
    return dataset


def _load_path(path, *, dtype, image_shape, scale, n_classes) -> Dataset:
    """A dataset at `path`: an .npz file, or a folder of IDX files or train.csv/test.csv."""
    text = os.fspath(path)
    path = Path(text).expanduser()
    if not path.exists():
        if os.sep not in text and "." not in text:
            raise ConfigError(f"dataset: expected one of {', '.join(DATASETS)}, found {text!r}: "
                              "no such built-in, file or folder (a path names a .npz file or "
                              "a folder of IDX or CSV files)")
        raise DataError(f"{path}: expected a .npz file or a folder of IDX or CSV files, "
                        "found nothing")
    input_range = _input_range(scale, SCALES["unit"])
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise DataError(f"{path}: expected a .npz file (x_train, y_train, x_test, y_test) "
                            f"or a folder, found a {path.suffix or 'suffix-less'} file; pass "
                            "CSVs as train_csv= and test_csv=")
        arrays = read_npz(path)
        return _dataset(path.stem, *arrays, f"npz:{path.absolute()}", dtype,
                        image_shape=image_shape, input_range=input_range, n_classes=n_classes,
                        where=(path,) * 4)
    idx = {role: _find_idx(path, stem) for role, stem in _IDX_STEMS.items()}
    if all(idx.values()):
        paths = [idx[role] for role in _IDX_STEMS]
        x_train, y_train, x_test, y_test = (read_idx(p) for p in paths)
        x_train, x_test = _images(x_train, paths[0]), _images(x_test, paths[2])
        y_train, y_test = _labels(y_train, paths[1]), _labels(y_test, paths[3])
        return _dataset(path.absolute().name, x_train, y_train, x_test, y_test,
                        f"idx:{path.absolute()}", dtype, image_shape=image_shape,
                        input_range=input_range, n_classes=n_classes, where=tuple(paths))
    csvs = [path / n for n in _CSV_NAMES]
    if all(p.is_file() for p in csvs):
        return _from_csv(path.absolute().name, *csvs, dtype=dtype, image_shape=image_shape,
                         scale=scale, n_classes=n_classes)
    present = sorted(p.name for p in path.iterdir())
    shown = ", ".join(present[:8]) + (", ..." if len(present) > 8 else "") or "nothing"
    raise DataError(f"{path}: expected four IDX files ({', '.join(_IDX_STEMS.values())}, gzip "
                    f"or raw) or {' and '.join(_CSV_NAMES)}; found {shown}")


def _from_csv(name: str, train: Path, test: Path, *, dtype, image_shape, scale,
              n_classes) -> Dataset:
    """A dataset from two CSVs of `label,p1..pD` rows."""
    train, test = train.expanduser(), test.expanduser()
    x_train, y_train = read_csv(train)
    x_test, y_test = read_csv(test)
    return _dataset(name, x_train, y_train, x_test, y_test, f"csv:{train.absolute()}", dtype,
                    image_shape=image_shape, input_range=_input_range(scale, SCALES["unit"]),
                    n_classes=n_classes, where=(train, train, test, test))


def _input_range(scale, default: tuple[float, float]) -> tuple[float, float]:
    """The (lo, hi) a `scale` argument names: None -> default, "study", "unit" or (lo, hi)."""
    if scale is None:
        return default
    if isinstance(scale, str):
        if scale not in SCALES:
            raise ConfigError(f"scale: expected one of {', '.join(SCALES)} or (lo, hi), "
                              f"found {scale!r}")
        return SCALES[scale]
    try:
        lo, hi = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise ConfigError(f"scale: expected one of {', '.join(SCALES)} or (lo, hi), "
                          f"found {scale!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ConfigError(f"scale: expected finite lo < hi, found ({lo}, {hi})")
    return (lo, hi)


def _image_shape(shape) -> tuple[int, int, int]:
    """(H, W) or (H, W, C) of positive ints as (H, W, C); ConfigError otherwise."""
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        dims = ()
    if len(dims) == 2:
        dims = (*dims, 1)
    if len(dims) != 3 or min(dims) < 1:
        raise ConfigError(f"image_shape: expected (H, W) or (H, W, C) of positive ints, "
                          f"found {shape!r}")
    return dims  # type: ignore[return-value]


def content_hash(ds: Dataset) -> str:
    """sha256 (12 hex) of the shapes, every label and every 97th image of each split; for
    a dataset that is not 28x28x1 with 10 classes in [0.01, 1], its image shape, classes and
    input range too. Names a dataset's content (the runner's cache, weights metadata)."""
    spec = (tuple(ds.image_shape), int(ds.n_classes), tuple(ds.input_range))
    tail = b"" if spec == (_BUILTIN_SHAPE, _BUILTIN_CLASSES, INPUT_RANGE) else repr(spec).encode()
    return files.tree_digest((ds.y_train, ds.y_test, ds.x_train[::97], ds.x_test[::97]),
                             length=12, tail=tail)


def cache_dir(name: str = "mnist") -> Path:
    """The user cache for dataset `name`: `$XDG_CACHE_HOME/mlshift_jax/<name>`, else ~/.cache."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "mlshift_jax" / name


def read_dir(
    directory: str | os.PathLike[str], name: str = "mnist"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read and check built-in dataset `name` in `directory`: its four IDX files, else its two
    CSVs (`<name>_train.csv`, `<name>_test.csv`).

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
    h, w, c = _BUILTIN_SHAPE
    for x, path in ((x_train, paths[0]), (x_test, paths[2])):
        if x.shape[1:] not in ((h, w), (h, w, c), (h * w * c,)):
            found = "x".join(map(str, x.shape[1:]))
            raise DataError(f"{path}: expected {h}x{w} images, found {found}")
    x_train, x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    _check_split(x_train, y_train, paths[0], paths[1], _BUILTIN_CLASSES)
    _check_split(x_test, y_test, paths[2], paths[3], _BUILTIN_CLASSES)
    _check_identity(name, y_train, paths[1])
    return x_train, y_train, x_test, y_test


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, gzip or raw: images -> uint8 [n, H, W] (magic 2051) or
    [n, H, W, C] (2052), labels -> uint8 [n] (2049). Any image size.

    Checks the magic number and that the byte count matches the header. The result is a
    read-only view of the file's bytes.
    """
    path = Path(path)
    raw = _read_bytes(path, _idx_size)
    magic = int.from_bytes(raw[:4], "big")
    if len(raw) < 4 or magic not in _IDX_MAGIC:
        found = f"magic {magic}" if len(raw) >= 4 else f"{len(raw)} bytes"
        raise DataError(
            f"{path}: expected an IDX file with magic number 2051 (images), 2052 (images with "
            f"channels) or 2049 (labels), found {found}"
        )
    header = 4 + 4 * _IDX_MAGIC[magic]
    if len(raw) < header:
        raise DataError(f"{path}: truncated: expected a {header}-byte header, found {len(raw)}")
    dims = tuple(int.from_bytes(raw[i : i + 4], "big") for i in range(4, header, 4))
    if len(dims) > 1 and min(dims[1:]) < 1:
        raise DataError(f"{path}: expected images of at least 1x1, found "
                        f"{'x'.join(map(str, dims[1:]))}")
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "trailing bytes"
        raise DataError(
            f"{path}: {what}: header says {'x'.join(map(str, dims))}, so expected {expected} "
            f"bytes, found {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_npz(path: str | os.PathLike[str]) -> tuple[np.ndarray, ...]:
    """Read a keras.datasets-style .npz: (x_train, y_train, x_test, y_test) as stored.

    Through the hardened `files.read_npz` (never unpickles; sizes, inflation and CRC checked
    before allocating); DataError naming the file for a missing key or a damaged file. The
    arrays are checked by `load`.
    """
    keys = ("x_train", "y_train", "x_test", "y_test")
    arrays = files.read_npz(path, what=f"a .npz dataset ({', '.join(keys)})")
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise DataError(f"{path}: expected arrays {', '.join(keys)}, missing "
                        f"{', '.join(missing)} (found {', '.join(arrays) or 'none'})")
    return tuple(arrays[k] for k in keys)


def read_csv(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read a CSV of `label,p1,...,pD` per line (the study's has D = 784; a `label,...`
    header is skipped). Every line must have as many fields as the first.

    Returns images uint8 [n, D] and labels int32 [n]; a bad line raises `DataError` with
    its line number.
    """
    path = Path(path)
    lines = _read_bytes(path).decode("utf-8", errors="replace").splitlines()
    rows = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if rows and rows[0][1].split(",", 1)[0].strip().strip('"').lower() == "label":
        rows = rows[1:]
    if not rows:
        raise DataError(f"{path}: expected CSV rows of a label and its pixels, found none")
    n_pixels = rows[0][1].count(",")
    if n_pixels < 1:
        raise DataError(f"{path}, line {rows[0][0]}: expected a label and at least one pixel, "
                        "found one field")
    for lineno, line in rows:
        if line.count(",") != n_pixels:
            raise DataError(
                f"{path}, line {lineno}: expected {n_pixels + 1} fields (label, {n_pixels} "
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


def scale(x_uint8: np.ndarray, dtype: npt.DTypeLike = np.float32,
          input_range: tuple[float, float] = INPUT_RANGE) -> np.ndarray:
    """Pixels to inputs: uint8 [n, ...] -> dtype [n, D], pixel p -> p/255*(hi-lo)+lo.

    The default (lo, hi) = (0.01, 1.0) is the study's x/255*0.99+0.01. Computed in float64
    and rounded once to `dtype`, so 0 -> lo and 255 -> hi exactly.
    """
    x = np.asarray(x_uint8)
    if x.dtype != np.uint8:
        raise ConfigError(f"scale: expected uint8 pixels, found dtype {x.dtype}")
    if not np.issubdtype(dtype, np.floating):
        raise ConfigError(f"scale: expected a floating dtype, found {np.dtype(dtype)}")
    if x.ndim < 2:
        raise ConfigError(f"scale: expected images [n, ...], found shape {x.shape}")
    lo, hi = input_range
    if (lo, hi) == INPUT_RANGE:
        table = (np.arange(256) / 255.0 * 0.99 + 0.01).astype(dtype)  # the study's formula
    else:
        table = (np.arange(256) / 255.0 * (hi - lo) + lo).astype(dtype)
        table[-1] = np.asarray(hi, dtype)  # 255 -> hi exactly
    return table[x.reshape(len(x), -1)]


def builtin_spec(name) -> Spec | None:
    """The `Spec` of built-in dataset `name` under the study's scaling (known before
    it loads), or None for a path."""
    if not (isinstance(name, str) and name in DATASETS):
        return None

    return Spec(_BUILTIN_SHAPE, _BUILTIN_CLASSES, INPUT_RANGE)


def to_image(x, image_shape: tuple[int, ...], input_range: tuple[float, float] = (0.0, 1.0),
             ) -> np.ndarray:
    """One flat example [D] as a picture for matplotlib's imshow: floats in [0, 1] mapped
    from input_range, [H, W] for one channel, [H, W, 3] for three, else the first channel."""
    h, w, c = (tuple(image_shape) + (1,))[:3] if len(image_shape) == 2 else tuple(image_shape)
    lo, hi = input_range
    img = (np.asarray(x, np.float64).reshape(h, w, c) - lo) / (hi - lo)
    img = np.clip(img, 0.0, 1.0)
    return img if c == 3 else img[..., 0]


def subsample(seed: int, n: int, size: int) -> np.ndarray:
    """`size` distinct indices into range(n), in random order: int64 [size].

    Drawn by `np.random.default_rng(seed)`, so the same seed gives the same indices.
    """
    if not 1 <= size <= n:
        raise ConfigError(f"subsample: expected a size in 1..{n}, found {size}")
    return np.random.default_rng(seed).choice(n, size=size, replace=False)


def _from_dir(name: str, directory: Path, source: str, dtype: npt.DTypeLike,
              input_range: tuple[float, float] = INPUT_RANGE) -> Dataset:
    """Read built-in `name` in `directory` and wrap it as a scaled, read-only `Dataset`."""
    return _dataset(name, *read_dir(directory, name), source, dtype, image_shape=_BUILTIN_SHAPE,
                    input_range=input_range, n_classes=_BUILTIN_CLASSES)


def _dataset(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    source: str,
    dtype: npt.DTypeLike,
    *,
    image_shape: tuple[int, ...] | None = None,
    input_range: tuple[float, float] = INPUT_RANGE,
    n_classes: int | None = None,
    where: tuple[Path, ...] | None = None,
) -> Dataset:
    """Check images and labels, scale, and freeze every array.

    x_*: uint8 [n, D] (then image_shape, else square one-channel), [n, H, W] or [n, H, W, C];
    y_*: integer [n] in 0..K-1, K = n_classes or the largest label + 1. `where`: the paths
    of (x_train, y_train, x_test, y_test) for error messages."""
    where = where or (Path(source),) * 4
    arrays = []
    for x, y, (x_path, y_path) in ((x_train, y_train, where[:2]), (x_test, y_test, where[2:])):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != np.uint8 or x.ndim not in (2, 3, 4) or len(x) == 0:
            raise DataError(f"{x_path}: expected uint8 images [n, H, W] or [n, H, W, C] (or "
                            f"[n, D] rows), found {x.dtype} {list(x.shape)}")
        if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
            raise DataError(f"{y_path}: expected integer labels [n], found {y.dtype} "
                            f"{list(y.shape)}")
        arrays.append((x, y, x_path, y_path))
    shapes = [a[0].shape[1:] for a in arrays]
    if shapes[0] != shapes[1]:
        raise DataError(f"{where[0]} and {where[2]}: expected train and test images of one "
                        f"shape, found {list(shapes[0])} and {list(shapes[1])}")
    shape = _shape_of(shapes[0], image_shape, where[0])
    labels = np.concatenate([a[1].astype(np.int64) for a in arrays])
    if n_classes is None:
        for _x, y, _x_path, y_path in arrays:  # a label of 10**9 would make 10**9 classes
            big = np.flatnonzero(y.astype(np.int64) >= MAX_CLASSES)
            if big.size:
                raise DataError(f"{y_path}: expected labels 0..{MAX_CLASSES - 1} (classes), "
                                f"found {int(y[big[0]])} (sample {int(big[0])})")
        n_classes = max(2, int(labels.max()) + 1)
    elif isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) \
            or not 2 <= n_classes <= MAX_CLASSES:
        raise ConfigError(f"n_classes: expected an integer in 2..{MAX_CLASSES}, found "
                          f"{n_classes!r}")
    out = []
    for x, y, x_path, y_path in arrays:
        _check_split(x.reshape(len(x), -1), y, x_path, y_path, int(n_classes))
        out += [scale(x, dtype, input_range), y.astype(np.int32)]
    for a in out:
        a.flags.writeable = False
    return Dataset(name, *out, source, image_shape=shape, n_classes=int(n_classes),
                   input_range=(float(input_range[0]), float(input_range[1])))


def _shape_of(dims: tuple[int, ...], image_shape, path: Path) -> tuple[int, int, int]:
    """(H, W, C) of images whose per-example array shape is dims ((D,), (H, W) or (H, W, C)),
    checked against an explicit image_shape."""
    if image_shape is not None:
        shape = _image_shape(image_shape)
        if math.prod(shape) != math.prod(dims) or (len(dims) > 1 and
                                                     shape[:len(dims)] != tuple(dims)[:3]):
            raise DataError(f"{path}: expected images of shape {shape} "
                            f"({math.prod(shape)} values), found {list(dims)}")
        return shape
    if len(dims) == 1:
        side = math.isqrt(dims[0])
        if side * side != dims[0]:
            raise DataError(f"{path}: rows of {dims[0]} pixels are no square image; expected "
                            "image_shape=(H, W[, C]) to say the image size")
        return (side, side, 1)
    return (dims[0], dims[1], 1) if len(dims) == 2 else tuple(dims)  # type: ignore[return-value]


def _load_sample(name: str, dtype: npt.DTypeLike,
                 input_range: tuple[float, float] = INPUT_RANGE) -> Dataset:
    """The sample shipped in `mlshift_jax/data/_sample/` (built by scripts/make_sample.py)."""
    res = resources.files("mlshift_jax.data") / "_sample" / _SAMPLE_FILES[name]
    keys = ("x_train", "y_train", "x_test", "y_test")
    with resources.as_file(res) as path:
        arrays = files.read_npz(path, what=f"the bundled {name} sample ({', '.join(keys)})")
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise DataError(f"{res}: expected the bundled {name} sample ({', '.join(keys)}), "
                        f"found {sorted(arrays)}")
    x_train, y_train, x_test, y_test = (arrays[k] for k in keys)
    return _dataset(name, x_train, y_train, x_test, y_test, "bundled-sample", dtype,
                    image_shape=_BUILTIN_SHAPE, input_range=input_range,
                    n_classes=_BUILTIN_CLASSES, where=(Path(str(res)),) * 4)


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
    """IDX images [n, H, W] or [n, H, W, C], as they are; a labels file in their place is an
    error."""
    if x.ndim not in (3, 4):
        raise DataError(f"{path}: expected an images file (magic 2051), found labels (2049)")
    return x


def _labels(y: np.ndarray, path: Path) -> np.ndarray:
    """IDX labels [n] -> int32 [n]; an images file in their place is an error."""
    if y.ndim != 1:
        raise DataError(f"{path}: expected a labels file (magic 2049), found images (2051)")
    return y.astype(np.int32)


def _check_split(x: np.ndarray, y: np.ndarray, x_path: Path, y_path: Path,
                 n_classes: int) -> None:
    """Images uint8 [n, D] and labels [n] in 0..n_classes-1, n >= 1."""
    if x.ndim != 2 or x.dtype != np.uint8:
        raise DataError(f"{x_path}: expected uint8 images [n, D], found {x.dtype} {list(x.shape)}")
    if len(x) != len(y) or len(x) == 0:
        raise DataError(
            f"{x_path} and {y_path}: expected as many labels as images (at least "
            f"one), found {len(x)} images and {len(y)} labels"
        )
    bad = np.flatnonzero((y < 0) | (y >= n_classes))
    if len(bad):
        raise DataError(
            f"{y_path}: expected labels 0..{n_classes - 1}, found {y[bad[0]]} (sample {bad[0]})"
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
