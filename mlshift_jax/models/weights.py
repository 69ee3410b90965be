"""Weights files: any pytree of arrays, with its metadata, in safetensors (or .npz); no pickle.

    save(path, params, meta)   -> writes path atomically
    load(path)                 -> (params, meta)

(`registry.load_model(path)` builds the Model the metadata names.)

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
`meta == {"finite": ...}` and `registry.load_model` then matches its arrays against the built-in
layouts (`models.infer_model`). Nothing on load runs code or unpickles. Every damaged file is
one `DataError` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mlshift_jax.core.errors import ConfigError, DataError
from mlshift_jax.data.datasets import content_hash

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
            "hash": content_hash(dataset)},
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
    size, head = read_head(path, 4, "a weights file")
    if not head:
        raise DataError(f"{shown}: expected a weights file, found an empty (0-byte) file")
    if head.startswith(b"PK"):  # the metadata member first: checked before any array is read
        meta = check_metadata(_parse_meta(_npz_meta_text(path, shown), shown), shown)
        flat = _read_npz(path, shown)
    else:
        blob = _read_bounded(path, shown, size)
        meta = check_metadata(_parse_meta(_safetensors_meta_text(blob, shown), shown), shown)
        flat = _read_safetensors(blob, shown)
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


MAX_META_BYTES = 1 << 20  # the metadata JSON: 1 MiB is ~1000 times what `save` writes
MAX_META_DEPTH = 16  # nesting of the metadata JSON (save writes 4 levels at most)


def _npz_meta_text(path, shown: str) -> str | None:
    """The "__mlshift__" member's JSON text, read before any array (None: no member)."""
    from mlshift_jax.core import files

    raw = files.read_npz(path, what="a .npz of weights", only=NPZ_META).get(NPZ_META)
    if raw is None:
        return None
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > MAX_META_BYTES:
        raise DataError(f"{shown}: expected {NPZ_META!r} as at most {MAX_META_BYTES} uint8 "
                        f"JSON bytes, found {raw.dtype} {list(raw.shape)}")
    try:
        return raw.tobytes().decode()
    except UnicodeDecodeError:
        raise DataError(f"{shown}: expected {NPZ_META!r} to hold UTF-8 JSON, found other "
                        "bytes") from None


def _read_npz(path, shown: str) -> dict[str, np.ndarray]:
    from mlshift_jax.core import files

    arrays = files.read_npz(path, what="a .npz of weights")  # sizes, inflation, CRC
    arrays.pop(NPZ_META, None)
    return arrays


def _read_bounded(path, shown: str, size: int) -> bytes:
    """The whole (regular) file, refused when it would take more memory than is free."""
    from mlshift_jax.core import files

    free = files.available_memory()
    if size > files.MEMORY_SHARE * free:
        raise DataError(f"{shown}: a weights file of ~{files.gib(size)}, this machine has "
                        f"{files.gib(free)} free; refusing to load it")
    with open(path, "rb") as f:
        blob = f.read(size + 1)
    if len(blob) != size:
        raise DataError(f"{shown}: expected a file of fixed size {size}, found it changing "
                        "while read")
    return blob


def _safetensors_meta_text(blob: bytes, shown: str) -> str | None:
    """The "mlshift" metadata of a safetensors header, read before the tensors."""
    if blob[8:9] != b"{":  # a safetensors header is a JSON object right after its length
        start = f"it starts {blob[:12]!r}" if blob else "it is empty"
        raise DataError(f"{shown}: expected a safetensors or .npz weights file, found "
                        f"neither ({start}, {len(blob)} bytes)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8 or n > 100_000_000:  # the safetensors library's own header bound
        raise DataError(f"{shown}: expected a safetensors header that fits in the file, "
                        f"found one of {n} bytes in a file of {len(blob)}: truncated or "
                        "damaged")
    try:
        header = _json_loads(blob[8:8 + n].decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{shown}: expected a safetensors or .npz weights file, found a "
                        f"damaged header ({_first(e)})") from None
    if not isinstance(header, dict):
        raise DataError(f"{shown}: expected a safetensors header object, found "
                        f"{type(header).__name__}")
    extra = header.get("__metadata__") or {}
    text = extra.get(META_KEY) if isinstance(extra, dict) else None
    if text is not None and not isinstance(text, str):
        raise DataError(f"{shown}: expected the metadata {META_KEY!r} as a JSON string, "
                        f"found {type(text).__name__}")
    return text


def _read_safetensors(blob: bytes, shown: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load as st_load

    try:
        return st_load(blob)
    except SafetensorError as e:
        raise DataError(f"{shown}: expected a safetensors or .npz weights file, found a "
                        f"damaged one ({e})") from None
    except (KeyError, ValueError, TypeError) as e:  # e.g. a dtype numpy cannot hold
        raise DataError(f"{shown}: expected safetensors with numpy dtypes, could not read "
                        f"it ({type(e).__name__}: {e})") from None


def _first(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


def _json_loads(text: str) -> Any:
    """json.loads, with nesting deeper than the interpreter's stack a ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _parse_meta(text: str | None, shown: str) -> dict:
    if text is None:
        return {}
    if len(text) > MAX_META_BYTES:
        raise DataError(f"{shown}: expected metadata of at most {MAX_META_BYTES} bytes, "
                        f"found {len(text)}")
    try:
        meta = _json_loads(text)
    except ValueError as e:
        raise DataError(f"{shown}: expected JSON metadata under {META_KEY!r}, found bad JSON "
                        f"({_first(e)})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{shown}: expected a JSON object as metadata, found "
                        f"{type(meta).__name__}")
    return meta


# --- metadata as data: every field checked before anything is built ---------------------------

_REF = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*(:[A-Za-z_][A-Za-z0-9_.]*)?$")
MAX_INPUTS = 1 << 26  # values per example (64 Mi: far above any image the harness takes)
MAX_CLASSES = 1 << 20  # rules' "target" bound: a class index is below it
MAX_HPARAMS = 64


def _depth(value: Any, limit: int) -> bool:
    """True when value nests at most `limit` levels (iterative: no recursion)."""
    todo = [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return False
            todo += [(c, d + 1) for c in (v.values() if isinstance(v, dict) else v)]
    return True


def _bad(shown: str, field: str, expected: str, found: Any) -> DataError:
    text = repr(found)
    text = text if len(text) <= 60 else text[:57] + "..."
    return DataError(f"{shown}: metadata {field!r}: expected {expected}, found {text}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v)))


def _scalar_ok(v: Any) -> bool:
    """A hyper-parameter value: a bool, a finite number, a short string, or a short list of
    those (never a dict: nothing from a file is a keyword structure)."""
    if isinstance(v, bool) or v is None:
        return True
    if _is_int(v):
        return abs(v) < 2**53
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, str):
        return len(v) <= 200
    if isinstance(v, list):
        return len(v) <= 64 and all(not isinstance(x, list) and _scalar_ok(x) for x in v)
    return False


def check_hparams(ref: str, hparams: Any, where: str) -> dict:
    """A model's hyper-parameters as validated data: built-ins take only "hidden" (an integer
    in rules' range); a user reference takes at most 64 identifier keys with bool, finite
    number, short string or short list values. DataError naming the field otherwise."""
    from mlshift_jax.core import rules

    field = "model.hparams"
    if hparams is None:
        return {}
    if not isinstance(hparams, dict):
        raise _bad(where, field, "an object of named values", hparams)
    if ":" not in ref:
        unknown = sorted(set(hparams) - {"hidden"})
        if unknown:
            raise _bad(where, f"{field}.{unknown[0]}", "only 'hidden' for a built-in model",
                       unknown[0])
        if "hidden" in hparams:
            try:
                rules.check("hidden", hparams["hidden"], f"{where}: metadata "
                            f"'{field}.hidden'")
            except ConfigError as e:
                raise DataError(str(e)) from None
        return dict(hparams)
    if len(hparams) > MAX_HPARAMS:
        raise _bad(where, field, f"at most {MAX_HPARAMS} entries", f"{len(hparams)} entries")
    for k, v in hparams.items():
        if not k.isidentifier():
            raise _bad(where, field, "identifier names", k)
        if not _scalar_ok(v):
            raise _bad(where, f"{field}.{k}", "a bool, a finite number, a string of at most "
                       "200 characters or a short flat list of those", v)
    return dict(hparams)


_TRAIN_RULES = {"hidden": "hidden", "epochs": "epochs", "batch_size": "batch_size",
                "seed": "seed", "lr": "lr"}


def check_metadata(meta: dict, shown: str) -> dict:
    """`meta` if every field a reader uses is well-typed and in range, checked before any
    array is read or any model built; DataError naming the field otherwise.

    model: {"ref": a name or "pkg.module:attr", "hparams": see `check_hparams`};
    input_shape: 1 to 3 positive ints, at most 2**26 values; input_range: two finite numbers
    lo < hi; n_classes: an integer in 2..2**20; train: an object whose hidden, epochs,
    batch_size, seed and lr follow the CLI's rules and whose optimizer is a known name;
    seed: an integer seed; dataset, poison: objects; widened: names of widened dtypes.
    """
    from mlshift_jax.core import rules

    if not _depth(meta, MAX_META_DEPTH):
        raise _bad(shown, "(whole)", f"at most {MAX_META_DEPTH} levels of nesting", "deeper")
    model = meta.get("model")
    if model is not None:
        if not isinstance(model, dict):
            raise _bad(shown, "model", 'an object {"ref": ..., "hparams": ...}', model)
        ref = model.get("ref")
        if ref is not None and not (isinstance(ref, str) and len(ref) <= 200
                                    and _REF.match(ref)):
            raise _bad(shown, "model.ref", "a model name or 'pkg.module:attr'", ref)
        check_hparams(ref or "", model.get("hparams"), shown)
    shape = meta.get("input_shape")
    if shape is not None:
        if not (isinstance(shape, list) and 1 <= len(shape) <= 3
                and all(_is_int(d) and 1 <= d <= MAX_INPUTS for d in shape)
                and math.prod(shape) <= MAX_INPUTS):
            raise _bad(shown, "input_shape", f"1 to 3 positive integers (H, W, C) with at "
                       f"most {MAX_INPUTS} values", shape)
    span = meta.get("input_range")
    if span is not None:
        if not (isinstance(span, list) and len(span) == 2 and all(map(_is_number, span))
                and span[0] < span[1]):
            raise _bad(shown, "input_range", "two finite numbers lo < hi", span)
    k = meta.get("n_classes")
    if k is not None and not (_is_int(k) and 2 <= k <= MAX_CLASSES):
        raise _bad(shown, "n_classes", f"an integer in 2..{MAX_CLASSES}", k)
    train = meta.get("train")
    if train is not None:
        if not isinstance(train, dict):
            raise _bad(shown, "train", "an object of training settings", train)
        for key, rule in _TRAIN_RULES.items():
            if train.get(key) is not None:
                try:
                    rules.check(rule, train[key], f"{shown}: metadata 'train.{key}'")
                except ConfigError as e:
                    raise DataError(str(e)) from None
        opt = train.get("optimizer")
        if opt is not None:
            from mlshift_jax.models.train import OPTIMIZERS

            if opt not in OPTIMIZERS:
                raise _bad(shown, "train.optimizer", f"one of {sorted(OPTIMIZERS)}", opt)
    if meta.get("seed") is not None:
        try:
            rules.check("seed", meta["seed"], f"{shown}: metadata 'seed'")
        except ConfigError as e:
            raise DataError(str(e)) from None
    for field in ("dataset", "poison"):
        if meta.get(field) is not None and not isinstance(meta[field], dict):
            raise _bad(shown, field, "an object", meta[field])
    found = meta.get("dataset") or {}
    for key in ("name", "source", "hash"):
        if found.get(key) is not None and not (isinstance(found[key], str)
                                               and len(found[key]) <= 4096):
            raise _bad(shown, f"dataset.{key}", "a string", found[key])
    widened = meta.get("widened")
    if widened is not None and not (isinstance(widened, dict) and all(
            isinstance(v, str) and v in _WIDENED for v in widened.values())):
        raise _bad(shown, "widened", f"an object of dtype names in {list(_WIDENED)}", widened)
    return meta


def _check(shown: str, flat: dict, finite: bool) -> dict[str, np.ndarray]:
    """files.check_arrays's rules (real numeric, not empty, finite with `finite`), scalars
    allowed."""
    from mlshift_jax.core.files import check_arrays

    return check_arrays(shown, flat, finite=finite, scalars=True)
