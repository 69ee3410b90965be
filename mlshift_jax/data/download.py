"""Download dataset files from public mirrors, each checked against its published md5.

A file is streamed into a hidden temporary file beside its destination and moved into place
with `os.replace` only once its md5 matches, so a failed, cut or corrupt download leaves
nothing behind. Timeouts are short: an offline machine falls through in well under a minute.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

from mlshift_jax.core.errors import DataError

TIMEOUT_S = 3.0  # seconds per socket operation, per URL
_CHUNK = 1 << 20
_log = logging.getLogger(__name__)


class Source(NamedTuple):
    """Mirrors (base URLs, tried in order) and the published md5 of each `.gz` file."""

    mirrors: tuple[str, ...]
    md5: dict[str, str]


SOURCES: dict[str, Source] = {
    # LeCun, Cortes, Burges; md5 of the published .gz files as common loaders list them.
    "mnist": Source(
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    # Xiao, Rasul, Vollgraf (2017); md5 sums from the zalandoresearch/fashion-mnist README,
    # the same ones torchvision's FashionMNIST checks.
    "fashion-mnist": Source(
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}


class DownloadUnavailable(DataError):
    """No mirror answered with the file (offline, timeout, HTTP error), or the destination
    folder cannot be made; nothing was written. Unlike a checksum mismatch, worth falling
    back from."""


def download(urls: list[str], dest: Path, md5: str, *, timeout: float = TIMEOUT_S) -> str:
    """Fetch the first of `urls` whose bytes have md5 `md5` into `dest`; returns that url.

    Raises `DownloadUnavailable` when no url could be fetched, `DataError` when one was fetched
    but failed its checksum. Either way `dest` and its temporary file are left absent.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = f"{dest.parent}: expected a writable folder, found {e.strerror}"
        raise DownloadUnavailable(msg) from e
    failures: list[str] = []
    corrupt = False
    for url in urls:
        try:
            found = _fetch(url, dest, md5, timeout)
        except (OSError, http.client.HTTPException, ValueError) as e:
            failures.append(f"{url}: {_reason(e)}")
            continue
        if found == md5:
            return url
        corrupt = True
        failures.append(f"{url}: md5 expected {md5}, found {found}")
    error = DataError if corrupt else DownloadUnavailable
    raise error(f"{dest}: could not download it ({'; '.join(failures) or 'no url given'})")


def fetch(name: str, dest_dir: Path, *, timeout: float = TIMEOUT_S) -> list[str]:
    """Download each of dataset `name`'s files that `dest_dir` lacks; returns the urls used.

    The mirror that answered last is tried first for the next file, so a dead mirror costs
    one timeout, not one per file.
    """
    source = SOURCES[name]
    mirrors = list(source.mirrors)
    used = []
    for file_name, md5 in source.md5.items():
        dest = Path(dest_dir) / file_name
        if dest.is_file():
            continue
        _log.info("downloading %s into %s", file_name, dest_dir)
        url = download([m + file_name for m in mirrors], dest, md5, timeout=timeout)
        mirror = url[: -len(file_name)]
        mirrors.remove(mirror)
        mirrors.insert(0, mirror)
        used.append(url)
    return used


def _fetch(url: str, dest: Path, md5: str, timeout: float) -> str:
    """Stream `url` into a temporary file beside `dest`; keep it as `dest` if its md5 is `md5`."""
    request = urllib.request.Request(url, headers={"User-Agent": "mlshift_jax"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            digest = hashlib.md5(usedforsecurity=False)
            with os.fdopen(fd, "wb") as out:
                while chunk := response.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            found = digest.hexdigest()
            if found == md5:
                os.replace(tmp, dest)
            return found
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _reason(e: BaseException) -> str:
    """One short line for a failed request."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__
