"""Tests for mlshift_jax.data.datasets and .download, on tiny datasets made in tmp_path.

No test touches the internet: every mirror points at 127.0.0.1 (a closed port, or a local
http.server), the user cache is under tmp_path, and /usr/share/datasets is replaced. The
full-MNIST tests run only where MLSHIFT_DATA_DIR is set.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import socket
import struct
import threading
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mlshift_jax.core.errors import ConfigError, DataError, MlshiftError
from mlshift_jax.data import datasets
from mlshift_jax.data import download as dl

_env_dir = os.environ.get("MLSHIFT_DATA_DIR")  # read before `isolated` clears it
FULL_DIR = Path(_env_dir).absolute() if _env_dir else None
full_data = pytest.mark.skipif(FULL_DIR is None, reason="needs MLSHIFT_DATA_DIR (full MNIST)")

# sha256 of the decompressed IDX files, from the MANIFEST shipped with the full MNIST.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
STEMS = tuple(datasets._IDX_STEMS.values())  # train images, train labels, test images, test labels


# -- helpers ---------------------------------------------------------------------------------


def tiny(seed: int = 0, n_train: int = 30, n_test: int = 10) -> list[np.ndarray]:
    """A random MNIST-like dataset: [x_train uint8 [n, 28, 28], y_train [n], x_test, y_test]."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (n_train, n_test):
        out.append(rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
        out.append(rng.integers(0, 10, size=n, dtype=np.uint8))
    return out


def idx_bytes(a: np.ndarray, magic: int | None = None) -> bytes:
    """IDX encoding of uint8 images [n, r, c] (magic 2051) or labels [n] (magic 2049)."""
    magic = magic or (2051 if a.ndim == 3 else 2049)
    return struct.pack(f">{1 + a.ndim}I", magic, *a.shape) + a.astype(np.uint8).tobytes()


def write_idx_dir(
    directory: Path, arrays: list[np.ndarray], *, dotted: bool = False, gz: bool = True
) -> list[Path]:
    """Write the four IDX files into `directory` in the chosen spelling; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, a in zip(STEMS, arrays, strict=True):
        name = (stem.replace("-idx", ".idx") if dotted else stem) + (".gz" if gz else "")
        raw = idx_bytes(a)
        (directory / name).write_bytes(gzip.compress(raw) if gz else raw)
        paths.append(directory / name)
    return paths


def write_csv(path: Path, x: np.ndarray, y: np.ndarray, *, header: bool = False) -> Path:
    """The study's CSV: `label,p1,...,p784` per line."""
    lines = ["label," + ",".join(f"p{i}" for i in range(1, 785))] if header else []
    lines += [
        ",".join(map(str, [int(lab), *img.ravel().tolist()])) for img, lab in zip(x, y, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def closed_port() -> int:
    """A local TCP port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files_in(directory: Path) -> list[str]:
    """Every file under `directory`, hidden ones included (none if it does not exist)."""
    return sorted(p.name for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No env data dir, no download; cache and system dirs in tmp_path; mirrors on a dead port."""
    monkeypatch.delenv("MLSHIFT_DATA_DIR", raising=False)
    monkeypatch.setenv("MLSHIFT_NO_DOWNLOAD", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "SYSTEM_DIRS", (tmp_path / "system",))
    dead = f"http://127.0.0.1:{closed_port()}/"
    for name, source in list(dl.SOURCES.items()):
        monkeypatch.setitem(dl.SOURCES, name, source._replace(mirrors=(dead,)))


@pytest.fixture
def server(tmp_path):
    """A threaded http.server on 127.0.0.1 serving tmp_path/srv; `hits` lists requested paths."""
    root = tmp_path / "srv"
    root.mkdir()
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            hits.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=root))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield SimpleNamespace(root=root, url=f"http://127.0.0.1:{httpd.server_address[1]}/", hits=hits)
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def serve_mnist(monkeypatch, server, arrays: list[np.ndarray], mirrors: tuple[str, ...]) -> None:
    """Serve `arrays` as the four .gz files and make them MNIST's published files."""
    sums = {}
    for stem, a in zip(STEMS, arrays, strict=True):
        blob = gzip.compress(idx_bytes(a))
        (server.root / f"{stem}.gz").write_bytes(blob)
        sums[f"{stem}.gz"] = md5(blob)
    monkeypatch.setitem(dl.SOURCES, "mnist", dl.Source(mirrors=mirrors, md5=sums))
    monkeypatch.delenv("MLSHIFT_NO_DOWNLOAD")


def assert_same(ds: datasets.Dataset, arrays: list[np.ndarray]) -> None:
    """`ds` holds `arrays` scaled as the study did."""
    x_train, y_train, x_test, y_test = arrays
    np.testing.assert_array_equal(ds.x_train, datasets.scale(x_train))
    np.testing.assert_array_equal(ds.x_test, datasets.scale(x_test))
    np.testing.assert_array_equal(ds.y_train, y_train)
    np.testing.assert_array_equal(ds.y_test, y_test)
    assert ds.y_train.dtype == np.int32 and ds.x_train.dtype == np.float32


# -- IDX and CSV -----------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("dotted", [False, True], ids=["dash", "dot"])
def test_load_reads_both_spellings_gz_and_raw(tmp_path, dotted, gz):
    arrays = tiny()
    write_idx_dir(tmp_path / "d", arrays, dotted=dotted, gz=gz)
    ds = datasets.load(data_dir=tmp_path / "d")
    assert_same(ds, arrays)
    assert ds.source == f"data_dir:{tmp_path / 'd'}" and not ds.is_sample


def test_read_idx_shapes_and_dtype(tmp_path):
    paths = write_idx_dir(tmp_path, tiny())
    images, labels = datasets.read_idx(paths[0]), datasets.read_idx(paths[1])
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (30,) and labels.dtype == np.uint8


@pytest.mark.parametrize(
    "blob, match",
    [
        (idx_bytes(np.zeros(5, np.uint8), magic=2050), "magic number 2051 .* found magic 2050"),
        (idx_bytes(np.zeros((5, 28, 28), np.uint8))[:-100], "truncated.*expected 3936 bytes"),
        (idx_bytes(np.zeros(5, np.uint8))[:6], "truncated: expected a 8-byte header"),
        (idx_bytes(np.zeros(5, np.uint8)) + b"\0", "trailing bytes.*expected 13 bytes, found 14"),
        (gzip.compress(idx_bytes(np.zeros(500, np.uint8)))[:-12], "truncated.*gzip"),
        (b"\x1f\x8b" + b"not gzip at all", "expected gzip data"),
    ],
    ids=["magic", "truncated", "short-header", "trailing", "truncated-gz", "corrupt-gz"],
)
def test_read_idx_rejects_bad_files(tmp_path, blob, match):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(blob)
    with pytest.raises(DataError, match=match) as info:
        datasets.read_idx(path)
    assert str(path) in str(info.value)


def test_builtin_needs_28x28_images_read_idx_takes_any(tmp_path):
    arrays = tiny()
    arrays[0] = np.zeros((30, 27, 28), np.uint8)
    paths = write_idx_dir(tmp_path, arrays)
    assert datasets.read_idx(paths[0]).shape == (30, 27, 28)
    with pytest.raises(DataError, match="expected 28x28 images, found 27x28"):
        datasets.load("mnist", data_dir=tmp_path)


def test_missing_file_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    write_idx_dir(tmp_path / "env", tiny(1))  # a good env dir, and a good cache:
    write_idx_dir(datasets.cache_dir("mnist"), tiny(2))
    monkeypatch.setenv("MLSHIFT_DATA_DIR", str(tmp_path / "env"))
    paths = write_idx_dir(tmp_path / "d", tiny())
    paths[3].unlink()
    with pytest.raises(DataError, match=r"d: expected the four mnist IDX .* t10k-labels-idx1"):
        datasets.load(data_dir=tmp_path / "d")
    with pytest.raises(DataError, match="expected a folder .* found nothing"):
        datasets.load(data_dir=tmp_path / "nowhere")
    with pytest.raises(DataError, match="expected a file, found nothing"):
        datasets.read_idx(paths[3])


def test_empty_data_dir_says_what_it_expected_and_found(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("")
    with pytest.raises(DataError, match=r"expected mnist as IDX files .* found notes\.txt"):
        datasets.load(data_dir=tmp_path / "d")


def test_image_label_count_mismatch(tmp_path):
    arrays = tiny()
    arrays[1] = arrays[1][:29]
    paths = write_idx_dir(tmp_path, arrays)
    with pytest.raises(DataError, match="found 30 images and 29 labels") as info:
        datasets.load(data_dir=tmp_path)
    assert str(paths[0]) in str(info.value) and str(paths[1]) in str(info.value)


def test_label_out_of_range_and_swapped_files(tmp_path):
    arrays = tiny()
    arrays[3][4] = 10
    write_idx_dir(tmp_path / "a", arrays)
    with pytest.raises(
        DataError, match=r"t10k-labels.*expected labels 0..9, found 10 \(sample 4\)"
    ):
        datasets.load(data_dir=tmp_path / "a")
    arrays = tiny()
    arrays[0], arrays[1] = arrays[1], arrays[0]
    write_idx_dir(tmp_path / "b", arrays)
    with pytest.raises(DataError, match="train-images.*expected an images file"):
        datasets.load(data_dir=tmp_path / "b")


@pytest.mark.parametrize("header", [False, True], ids=["plain", "header"])
def test_csv_round_trip_and_load(tmp_path, header):
    arrays = tiny()
    x, y = datasets.read_csv(write_csv(tmp_path / "mnist_train.csv", *arrays[:2], header=header))
    assert x.dtype == np.uint8 and x.shape == (30, 784) and y.dtype == np.int32
    np.testing.assert_array_equal(x, arrays[0].reshape(30, 784))
    np.testing.assert_array_equal(y, arrays[1])
    write_csv(tmp_path / "mnist_test.csv", *arrays[2:], header=header)
    ds = datasets.load(data_dir=tmp_path)
    assert_same(ds, arrays)


@pytest.mark.parametrize(
    "line3, match",
    [
        ("7," + ",".join(["0"] * 783), "line 3: expected 785 fields .* found 784"),
        ("7," + ",".join(["0"] * 785), "line 3: expected 785 fields .* found 786"),
        (
            "7," + ",".join(["0"] * 782 + ["256", "0"]),
            "line 3: expected values 0..255, found 256 in field 784",
        ),
        (
            "7," + ",".join(["-1"] + ["0"] * 783),
            "line 3: expected values 0..255, found -1 in field 2",
        ),
        (
            "7," + ",".join(["0"] * 783 + ["x"]),
            "line 3: expected values 0..255, found 'x' in field 785",
        ),
        ("7," + ",".join(["0"] * 783 + ["99999"]), "line 3: .* found '99999' in field 785"),
    ],
    ids=["short", "long", "256", "negative", "not-a-number", "overflow"],
)
def test_csv_bad_line_names_its_number(tmp_path, line3, match):
    good = ",".join(["1"] + ["0"] * 784)
    path = tmp_path / "mnist_train.csv"
    path.write_text(f"{good}\n{good}\n{line3}\n{good}\n")
    with pytest.raises(DataError, match=match) as info:
        datasets.read_csv(path)
    assert str(path) in str(info.value)


def test_csv_empty_file(tmp_path):
    (tmp_path / "mnist_train.csv").write_text("\n")
    with pytest.raises(DataError, match="expected CSV rows .* found none"):
        datasets.read_csv(tmp_path / "mnist_train.csv")


# -- scale and subsample ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scale_values(dtype):
    pixels = np.arange(256, dtype=np.uint8)
    x = datasets.scale(np.resize(pixels, (2, 28, 28)), dtype)
    assert x.shape == (2, 784) and x.dtype == dtype
    assert x[0, 0] == dtype(0.01) and x[0, 255] == 1.0
    assert (datasets.INPUT_RANGE[0], datasets.INPUT_RANGE[1]) == (0.01, 1.0)
    assert x.min() == dtype(datasets.INPUT_RANGE[0]) and x.max() == datasets.INPUT_RANGE[1]
    study = np.resize(pixels, (2, 784)) / 255.0 * 0.99 + 0.01  # the study's float64 formula
    np.testing.assert_array_equal(x, study.astype(dtype))


def test_scale_rejects_bad_input():
    with pytest.raises(ConfigError, match="expected uint8 pixels, found dtype float64"):
        datasets.scale(np.zeros((1, 784)))
    assert datasets.scale(np.zeros((1, 100), np.uint8)).shape == (1, 100)  # any image size
    with pytest.raises(ConfigError, match="expected images"):
        datasets.scale(np.zeros(100, np.uint8))
    with pytest.raises(ConfigError, match="floating dtype"):
        datasets.scale(np.zeros((1, 784), np.uint8), np.int32)


def test_subsample_is_deterministic_and_without_replacement():
    a, b, c = (
        datasets.subsample(0, 1000, 100),
        datasets.subsample(0, 1000, 100),
        datasets.subsample(1, 1000, 100),
    )
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(np.unique(a)) == 100 and a.min() >= 0 and a.max() < 1000
    assert sorted(datasets.subsample(3, 5, 5)) == [0, 1, 2, 3, 4]
    for size in (0, 1001):
        with pytest.raises(ConfigError, match=f"expected a size in 1..1000, found {size}"):
            datasets.subsample(0, 1000, size)


# -- discovery -------------------------------------------------------------------------------


def test_discovery_order(tmp_path, monkeypatch):
    a, b, c, s = tiny(1), tiny(2), tiny(3), tiny(4)
    write_idx_dir(tmp_path / "a", a)
    write_idx_dir(tmp_path / "b", b)
    write_idx_dir(datasets.cache_dir("mnist"), c)
    write_idx_dir(tmp_path / "system" / "mnist", s)
    monkeypatch.setenv("MLSHIFT_DATA_DIR", str(tmp_path / "b"))

    ds = datasets.load(data_dir=tmp_path / "a")  # data_dir beats env
    assert ds.source == f"data_dir:{tmp_path / 'a'}"
    assert_same(ds, a)
    ds = datasets.load()  # env beats cache
    assert ds.source == f"env:{tmp_path / 'b'}"
    assert_same(ds, b)
    monkeypatch.delenv("MLSHIFT_DATA_DIR")
    ds = datasets.load()  # cache beats the system dir
    assert ds.source == f"cache:{tmp_path / 'cache' / 'mlshift_jax' / 'mnist'}"
    assert_same(ds, c)
    for p in datasets.cache_dir("mnist").iterdir():
        p.unlink()
    ds = datasets.load()  # the system dir beats the bundled sample
    assert ds.source == f"system:{tmp_path / 'system' / 'mnist'}"
    assert_same(ds, s)


def test_env_dir_with_one_subfolder_per_dataset(tmp_path, monkeypatch):
    write_idx_dir(tmp_path / "env" / "mnist", tiny(1))
    monkeypatch.setenv("MLSHIFT_DATA_DIR", str(tmp_path / "env"))
    assert datasets.load().source == f"env:{tmp_path / 'env' / 'mnist'}"
    monkeypatch.setenv("MLSHIFT_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="empty: expected a folder"):  # no silent fallback
        datasets.load()


def test_bundled_sample_comes_last_with_a_one_line_warning():
    warning = datasets.SampleDataWarning
    with pytest.warns(warning, match="the bundled mnist sample .* results will differ") as rec:
        ds = datasets.load()
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    assert ds.is_sample and ds.source == "bundled-sample" and ds.name == "mnist"
    assert ds.x_train.shape == (10_000, 784) and ds.x_test.shape == (2_000, 784)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.x_train.min() >= 0.01 and ds.x_train.max() <= 1.0
    for y, full in ((ds.y_train, MNIST_TRAIN_COUNTS), (ds.y_test, MNIST_TEST_COUNTS)):
        share = np.array(full) * len(y) / sum(full)  # stratified: each class within 1 of its share
        assert np.all(np.abs(np.bincount(y, minlength=10) - share) < 1)


def test_download_disabled_never_asks_a_mirror(server, monkeypatch):
    serve_mnist(monkeypatch, server, tiny(), mirrors=(server.url,))
    with pytest.warns(datasets.SampleDataWarning, match="bundled.*download disabled"):
        assert datasets.load(download=False).is_sample
    monkeypatch.setenv("MLSHIFT_NO_DOWNLOAD", "1")
    with pytest.warns(datasets.SampleDataWarning, match="download disabled"):
        assert datasets.load().is_sample
    assert server.hits == [] and files_in(datasets.cache_dir("mnist")) == []


def test_fashion_mnist_has_no_sample_and_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist.*--data-dir"):
        datasets.load("fashion-mnist")
    arrays = tiny(5)
    write_idx_dir(tmp_path / "system" / "fashion-mnist", arrays)
    ds = datasets.load("fashion-mnist")
    assert ds.name == "fashion-mnist" and ds.source.startswith("system:")
    assert_same(ds, arrays)


def test_one_datasets_files_are_refused_under_another_name(tmp_path, monkeypatch):
    arrays = tiny()
    write_idx_dir(tmp_path, arrays)
    monkeypatch.setitem(datasets._TRAIN_LABELS_MD5, "mnist", md5(arrays[1].tobytes()))
    with pytest.raises(DataError, match="expected fashion-mnist, found the mnist training labels"):
        datasets.load("fashion-mnist", data_dir=tmp_path)
    assert datasets.load("mnist", data_dir=tmp_path).name == "mnist"


def test_dataset_is_frozen_and_dtype_selectable(tmp_path):
    write_idx_dir(tmp_path, tiny())
    ds = datasets.load(data_dir=tmp_path, dtype=np.float64)
    assert ds.x_train.dtype == np.float64 and ds.y_test.dtype == np.int32
    with pytest.raises(ValueError, match="read-only"):
        ds.x_train[0, 0] = 0.0
    assert "train=30, test=10" in repr(ds)
    with pytest.raises(ConfigError, match="expected one of mnist, fashion-mnist, found 'cifar'"):
        datasets.load("cifar")
    assert issubclass(DataError, MlshiftError)


# -- download --------------------------------------------------------------------------------


def test_download_good_file(server, tmp_path):
    blob = gzip.compress(b"payload")
    (server.root / "f.gz").write_bytes(blob)
    dest = tmp_path / "cache" / "f.gz"
    assert datasets.download([server.url + "f.gz"], dest, md5(blob)) == server.url + "f.gz"
    assert dest.read_bytes() == blob and files_in(dest.parent) == ["f.gz"]


def test_download_corrupt_file_leaves_nothing(server, tmp_path):
    (server.root / "f.gz").write_bytes(b"corrupt")
    dest = tmp_path / "cache" / "f.gz"
    with pytest.raises(DataError, match=f"md5 expected {'0' * 32}, found {md5(b'corrupt')}") as e:
        datasets.download([server.url + "f.gz"], dest, "0" * 32)
    assert not isinstance(e.value, dl.DownloadUnavailable)
    assert str(dest) in str(e.value) and files_in(dest.parent) == []


@pytest.mark.parametrize("first", ["closed-port", "404"])
def test_download_falls_back_to_the_second_mirror(server, tmp_path, first):
    blob = b"payload"
    (server.root / "f.gz").write_bytes(blob)
    dead = f"http://127.0.0.1:{closed_port()}/" if first == "closed-port" else server.url + "no/"
    urls = [dead + "f.gz", server.url + "f.gz"]
    assert datasets.download(urls, tmp_path / "f.gz", md5(blob), timeout=2) == urls[1]
    assert (tmp_path / "f.gz").read_bytes() == blob


def test_download_all_mirrors_down(server, tmp_path):
    urls = [f"http://127.0.0.1:{closed_port()}/f.gz", server.url + "missing.gz"]
    with pytest.raises(dl.DownloadUnavailable, match="HTTP 404"):
        datasets.download(urls, tmp_path / "c" / "f.gz", "0" * 32, timeout=2)
    assert files_in(tmp_path / "c") == []


def test_load_downloads_into_the_cache(server, monkeypatch):
    arrays = tiny()
    dead = f"http://127.0.0.1:{closed_port()}/"
    serve_mnist(monkeypatch, server, arrays, mirrors=(dead, server.url))
    ds = datasets.load()
    assert ds.source == f"download:{server.url}"
    assert_same(ds, arrays)
    assert files_in(datasets.cache_dir("mnist")) == sorted(f"{s}.gz" for s in STEMS)
    assert len(server.hits) == 4
    ds = datasets.load()  # from the cache now, no request
    assert ds.source.startswith("cache:") and len(server.hits) == 4


def test_load_with_a_corrupt_mirror_raises_and_caches_nothing(server, monkeypatch):
    serve_mnist(monkeypatch, server, tiny(), mirrors=(server.url,))
    (server.root / "train-images-idx3-ubyte.gz").write_bytes(b"tampered")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*md5 expected"):
        datasets.load()
    assert files_in(datasets.cache_dir("mnist")) == []


def test_load_offline_falls_through_to_the_sample(monkeypatch):
    monkeypatch.delenv("MLSHIFT_NO_DOWNLOAD")
    with pytest.warns(datasets.SampleDataWarning, match="bundled.*was tried.*MLSHIFT_DATA_DIR"):
        assert datasets.load().is_sample
    assert files_in(datasets.cache_dir("mnist")) == []


# -- the full MNIST (only where MLSHIFT_DATA_DIR is set) -------------------------------------


@full_data
@pytest.mark.full_data
def test_full_mnist_matches_its_manifest():
    for stem, sha in MNIST_SHA256.items():
        path = datasets._find_idx(FULL_DIR, stem)
        assert path is not None, f"{FULL_DIR}: {stem} missing"
        raw = path.read_bytes()
        raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        assert hashlib.sha256(raw).hexdigest() == sha, path


@full_data
@pytest.mark.full_data
def test_full_mnist_loads_and_the_sample_is_drawn_from_it():
    ds = datasets.load(data_dir=FULL_DIR)
    assert ds.x_train.shape == (60_000, 784) and ds.x_test.shape == (10_000, 784)
    assert np.bincount(ds.y_train).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(ds.y_test).tolist() == MNIST_TEST_COUNTS
    res = Path(str(datasets.resources.files("mlshift_jax.data") / "_sample" / "mnist_sample.npz"))
    with np.load(res) as sample:
        for split in ("train", "test"):
            index = sample[f"{split}_index"].astype(np.int64)
            np.testing.assert_array_equal(
                datasets.scale(sample[f"x_{split}"]), getattr(ds, f"x_{split}")[index]
            )
            np.testing.assert_array_equal(sample[f"y_{split}"], getattr(ds, f"y_{split}")[index])


def test_env_dir_holding_another_dataset_is_passed_over_for_this_one(tmp_path, monkeypatch):
    """CI points MLSHIFT_DATA_DIR at MNIST; fashion-mnist must still be found elsewhere."""
    mnist_arrays, fashion_arrays = tiny(), tiny(5)
    write_idx_dir(tmp_path / "env", mnist_arrays)
    write_idx_dir(tmp_path / "system" / "fashion-mnist", fashion_arrays)
    monkeypatch.setitem(datasets._TRAIN_LABELS_MD5, "mnist", md5(mnist_arrays[1].tobytes()))
    monkeypatch.setenv("MLSHIFT_DATA_DIR", str(tmp_path / "env"))
    assert datasets.load("mnist").source.startswith("env:")
    ds = datasets.load("fashion-mnist")
    assert ds.source.startswith("system:")
    assert_same(ds, fashion_arrays)
