"""Weights files: any pytree of arrays, with its metadata, in safetensors (or .npz); no pickle.

    save(path, params, meta)   -> writes path atomically
    load(path)                 -> (params, meta)
    load_model(path)           -> (Model, params, meta): the architecture from the metadata

Format (safetensors, https://github.com/huggingface/safetensors): one tensor per leaf of the
params pytree, named by its path, the keys of nested dicts / indices of lists, tuples and
module attributes joined by "/" (`{"Dense_0": {"kernel": w}}` -> "Dense_0/kernel",
`[(w, b)]` -> "0/0", "0/1"). The header's `__metadata__` holds one key, "mlshift": a JSON
object (see `metadata`): the model reference and hyper-parameters, input shape and range,
number of classes, training config and seed, dataset name and content hash, poisoning
config, package version, and `finite` (every weight finite when saved). A path ending in
`.npz` writes numpy's zip instead: the same flattened names plus a member "__mlshift__"
holding the metadata JSON as a uint8 array (never a pickle).

Reading rebuilds the nesting from the names (a level whose keys are exactly 0..n-1 comes back
as a list); a file without metadata (a plain .npz of arrays, `files.save_params`) loads with
`meta == {"finite": ...}` and `load_model` then matches its arrays against the built-in
layouts (`models.infer_model`). Nothing on load runs code or unpickles. Every damaged file is
one `DataError` naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mlshift_jax.core.errors import ConfigError, DataError

FORMAT = "mlshift-weights"
FORMAT_VERSION = 1
META_KEY = "mlshift"  # the safetensors header key; the .npz member is "__mlshift__"
NPZ_META = "__mlshift__"
SEP = "/"
# dtypes numpy's safetensors reader cannot hold: stored as float32, cast back on load
_WIDENED = ("bfloat16", "float8_e4m3fn", "float8_e5m2")


# --- pytree <-> flat {path: array} ------------------------------------------------------------


def key_name(key: Any) -> str:
    """One path element as text: a dict key, a sequence index or an attribute name."""
    for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(path: tuple) -> str:
    """A pytree path (from `jax.tree_util.tree_flatten_with_path`) as "a/0/b"."""
    return SEP.join(key_name(k) for k in path)


def flatten(params: Any) -> dict[str, np.ndarray]:
    """{"a/0/b": array} for every array leaf of `params` (None leaves are skipped).

    ConfigError if a key holds "/" or is empty, two leaves get one name, or a leaf is not an
    array (PRNG key arrays included: store `jax.random.key_data` instead).
    """
    flat: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        parts = [key_name(k) for k in path]
        if any(SEP in p or p == "" for p in parts):
            raise ConfigError(f"weights: expected pytree keys without '/' and not empty, "
                              f"found path {parts}")
        name = SEP.join(parts) if parts else "0"
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            raise ConfigError(f"weights: {name!r} is a PRNG key array; save "
                              "jax.random.key_data(key) instead")
        try:
            array = np.asarray(jax.device_get(leaf))
        except Exception as e:  # noqa: BLE001 - any leaf numpy cannot take
            raise ConfigError(f"weights: expected array leaves, found {type(leaf).__name__} "
                              f"at {name!r} ({e})") from None
        if array.dtype.hasobject:
            raise ConfigError(f"weights: expected array leaves, found {type(leaf).__name__} "
                              f"at {name!r}")
        if name in flat:
            raise ConfigError(f"weights: two leaves share the name {name!r}")
        flat[name] = array
    return flat


def unflatten(flat: dict[str, Any]) -> Any:
    """The nested dicts (lists where a level's keys are exactly "0".."n-1") of `flat`."""
    root: dict = {}
    for name, value in flat.items():
        node = root
        *parents, last = name.split(SEP)
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise DataError(f"weights: {name!r} lies under the array {p!r}")
            node = child
        if last in node:
            raise DataError(f"weights: {name!r} is both an array and a group")
        node[last] = value
    return _listify(root)


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    node = {k: _listify(v) for k, v in node.items()}
    if node and sorted(node) == sorted(str(i) for i in range(len(node))):
        return [node[str(i)] for i in range(len(node))]
    return node


def all_finite(flat: dict[str, np.ndarray]) -> bool:
    """True when no float array of `flat` holds NaN or inf."""
    return all(bool(np.all(np.isfinite(a))) for a in flat.values()
               if np.issubdtype(a.dtype, np.inexact))


# --- metadata -----------------------------------------------------------------------------------


def dataset_hash(ds) -> str:
    """sha256 (12 hex) of a Dataset's shapes, every label and every 97th image of each split
    (the runner's `data_hash`: the same data gives the same hash on every machine)."""
    h = hashlib.sha256()
    for a in (ds.y_train, ds.y_test, ds.x_train[::97], ds.x_test[::97]):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:12]


def _plain(value: Any) -> Any:
    """value as JSON-able data (dataclasses -> dicts with their class, tuples -> lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        kind = getattr(value, "kind", None)
        return {"type": type(value).__name__, **out} if kind is None else out
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def metadata(model, *, train=None, dataset=None, poison=None, seed: int | None = None,
             **extra) -> dict:
    """The metadata `save` expects, from a `models.Model` and what it was trained on.

    model: its name is the reference ("seed-mlp" or "pkg.mod:attr"), its hparams, input_shape,
    input_range and n_classes are recorded; train: a TrainConfig (or dict); dataset: a
    `data.Dataset` (name, source and content hash); poison: a poison config dataclass (or
    dict); seed: the training seed (default: train.seed); extra: more JSON-able keys.
    """
    train_d = _plain(train) if train is not None else None
    if seed is None and isinstance(train_d, dict):
        seed = train_d.get("seed")
    meta = {
        "model": {"ref": model.name, "hparams": _plain(dict(model.hparams))},
        "input_shape": list(model.input_shape),
        "input_range": [float(v) for v in model.input_range],
        "n_classes": int(model.n_classes),
        "train": train_d,
        "seed": seed,
        "dataset": None if dataset is None else {
            "name": dataset.name, "source": getattr(dataset, "source", None),
            "hash": dataset_hash(dataset)},
        "poison": _plain(poison) if poison is not None else None,
    }
    meta.update(_plain(extra))
    return meta


def _version() -> str:
    from mlshift_jax import __version__
    return __version__


# --- save ---------------------------------------------------------------------------------------


def save(path: str | os.PathLike, params: Any, meta: dict | None = None) -> dict:
    """Write `params` (any pytree of arrays) and `meta` to `path`, atomically.

    safetensors unless the path ends in ".npz". `meta` (JSON-able; see `metadata`) is stored
    with "format", "format_version", "mlshift_version" and "finite" added. bfloat16 / float8
    leaves are stored as float32 and cast back on load ("widened" in the metadata).
    Returns the metadata written. ConfigError for leaves that are not arrays.
    """
    from mlshift_jax.core.files import atomic_path

    flat = flatten(params)
    full = dict(_plain(meta or {}))
    widened = {}
    for name, a in flat.items():
        if a.dtype.name in _WIDENED:
            widened[name] = a.dtype.name
            flat[name] = a.astype(np.float32)
        flat[name] = np.ascontiguousarray(flat[name])
    full.update(format=FORMAT, format_version=FORMAT_VERSION, mlshift_version=_version(),
                finite=all_finite(flat))
    if widened:
        full["widened"] = widened
    text = json.dumps(full, sort_keys=True, allow_nan=False)
    if str(path).endswith(".npz"):
        if NPZ_META in flat:
            raise ConfigError(f"weights: the name {NPZ_META!r} is reserved for the metadata")
        members = {**flat, NPZ_META: np.frombuffer(text.encode(), np.uint8)}
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **members)
    else:
        from safetensors.numpy import save as st_save

        blob = st_save(flat, metadata={META_KEY: text})
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(blob)
    return full


# --- load ---------------------------------------------------------------------------------------


def load(path: str | os.PathLike, *, finite: bool = True) -> tuple[Any, dict]:
    """(params, meta) from a file `save` wrote, or a metadata-free .npz / safetensors file.

    The format is told by the file's first bytes (a zip is .npz), not its name. params:
    nested dicts / lists of numpy arrays. meta: the stored metadata ({} when none), with
    "finite" recomputed. DataError (one line, naming the file) for a missing, empty,
    truncated or damaged file, bad metadata JSON, non-numeric arrays, or weights that were
    finite when saved and are not now; with `finite` (the default, what every command uses),
    also for NaN / inf weights and empty arrays, whatever the metadata says.
    """
    from mlshift_jax.core.files import read_head

    shown = str(path) or "''"
    _, head = read_head(path, 4, "a weights file")
    if not head:
        raise DataError(f"{shown}: expected a weights file, found an empty (0-byte) file")
    if head.startswith(b"PK"):
        flat, text = _read_npz(path, shown)
    else:
        flat, text = _read_safetensors(path, shown)
    meta = _parse_meta(text, shown)
    flat = _check(shown, flat, finite)
    for name, dtype in (meta.get("widened") or {}).items():
        if name in flat and dtype in _WIDENED:
            import ml_dtypes

            flat[name] = flat[name].astype(getattr(ml_dtypes, dtype))
    finite = all_finite(flat)
    if meta.get("finite") is True and not finite:
        raise DataError(f"{shown}: expected finite weights (so they were saved), found NaN "
                        "or inf: the file is damaged")
    meta["finite"] = finite
    return unflatten(flat), meta


def _read_npz(path, shown: str) -> tuple[dict[str, np.ndarray], str | None]:
    from mlshift_jax.core import files

    arrays = files.read_npz(path, what="a .npz of weights")  # sizes, inflation, CRC
    raw = arrays.pop(NPZ_META, None)
    if raw is None:
        return arrays, None
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise DataError(f"{shown}: expected {NPZ_META!r} as uint8 JSON bytes, found "
                        f"{raw.dtype} {list(raw.shape)}")
    try:
        return arrays, raw.tobytes().decode()
    except UnicodeDecodeError:
        raise DataError(f"{shown}: expected {NPZ_META!r} to hold UTF-8 JSON, found other "
                        "bytes") from None


def _read_safetensors(path, shown: str) -> tuple[dict[str, np.ndarray], str | None]:
    from safetensors import SafetensorError
    from safetensors.numpy import load as st_load

    blob = Path(path).read_bytes()
    try:
        flat = st_load(blob)
    except SafetensorError as e:
        raise DataError(f"{shown}: expected a safetensors or .npz weights file, found a "
                        f"damaged one ({e})") from None
    except (KeyError, ValueError, TypeError) as e:  # e.g. a dtype numpy cannot hold
        raise DataError(f"{shown}: expected safetensors with numpy dtypes, could not read "
                        f"it ({type(e).__name__}: {e})") from None
    # the library checked the header; read its metadata (8-byte little-endian size, JSON)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    return flat, (header.get("__metadata__") or {}).get(META_KEY)


def _parse_meta(text: str | None, shown: str) -> dict:
    if text is None:
        return {}
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise DataError(f"{shown}: expected JSON metadata under {META_KEY!r}, found bad JSON "
                        f"({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{shown}: expected a JSON object as metadata, found "
                        f"{type(meta).__name__}")
    return meta


def _check(shown: str, flat: dict, finite: bool) -> dict[str, np.ndarray]:
    """files.check_arrays's rules (real numeric, not empty, finite with `finite`), scalars
    allowed."""
    from mlshift_jax.core.files import check_arrays

    return check_arrays(shown, flat, finite=finite, scalars=True)


# --- model from a weights file ----------------------------------------------------------------


def load_model(path: str | os.PathLike, model=None):
    """(Model, params, meta) from a weights file.

    The architecture is `model` when given (a built `models.Model`, e.g. from `wrap(obj)
    .build(spec)`, for files whose reference cannot be imported), else the one named in the
    metadata (a built-in name or "pkg.mod:attr", built for the stored input shape, range,
    classes and hyper-parameters), else, for a metadata-free file, the built-in layout its
    arrays match (`models.infer_model`). DataError when the arrays do not fit that model;
    ConfigError when the reference cannot be resolved.
    """
    from mlshift_jax.models.usermodels import build_model, fit_check

    params, meta = load(path)
    ref = (meta.get("model") or {}).get("ref")
    if model is None and ref is None:
        from mlshift_jax.models.zoo import infer_model

        if not isinstance(params, dict):
            raise DataError(f"{path}: expected metadata naming the model, or the arrays of a "
                            "built-in model; found neither")
        return infer_model(params), params, meta
    if model is None:
        from mlshift_jax.models.recipes import RECIPES

        if ":" not in ref and ref not in RECIPES:
            raise ConfigError(f"{path}: its model {ref!r} is neither a built-in name "
                              f"({', '.join(sorted(RECIPES))}) nor a pkg.module:attr "
                              "reference; pass the model: load_model(path, model=...)")
        model = build_model(ref, input_shape=meta.get("input_shape"),
                            n_classes=meta.get("n_classes"),
                            input_range=meta.get("input_range"),
                            hparams=(meta.get("model") or {}).get("hparams") or {})
    fit_check(model, params, where=str(path))
    return model, params, meta
