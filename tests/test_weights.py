"""weights: any pytree round-trips through safetensors and .npz with its metadata; no pickle;
damaged files are one DataError; metadata-free files fall back to the built-in layouts."""

from __future__ import annotations

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.core.errors import ConfigError, DataError
from mlshift_jax.core.files import save_params
from mlshift_jax.models import registry, weights
from mlshift_jax.models.zoo import MODELS, STUDY_SPEC, build

SUFFIXES = ("w.safetensors", "w.npz")


def _same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_builtin_params_round_trip_with_metadata(tmp_path, suffix, name):
    model = build(name, STUDY_SPEC, 16)
    params = model.init(jax.random.key(1))
    meta = weights.metadata(model, seed=3, poison={"kind": "mixture", "fraction": 0.1})
    path = tmp_path / suffix
    weights.save(path, params, meta)
    loaded, got = weights.load(path)
    _same(loaded, jax.device_get(params))
    assert got["model"] == {"ref": name, "hparams": {"hidden": 16}}
    assert got["input_shape"] == [28, 28, 1] and got["n_classes"] == 10
    assert got["input_range"] == [0.01, 1.0] and got["seed"] == 3
    assert got["poison"]["kind"] == "mixture" and got["finite"] is True
    assert got["format"] == weights.FORMAT and "mlshift_version" in got
    m2, p2, _ = registry.load_model(path)
    assert m2 is model
    _same(p2, loaded)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_nested_dicts_lists_tuples_and_scalars_round_trip(tmp_path, suffix):
    flax_like = {"params": {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
                            "scale": jnp.float32(2.0)}}
    jax_example = [(np.ones((4, 3), np.float32), np.zeros(3, np.float32)),
                   (np.ones((3, 2), np.float64), np.arange(2, dtype=np.int32))]
    for tree, expected in ((flax_like, flax_like),
                           (jax_example, [list(layer) for layer in jax_example])):
        weights.save(tmp_path / suffix, tree, {})
        loaded, meta = weights.load(tmp_path / suffix)
        _same(loaded, jax.device_get(expected))


def test_flatten_names_paths_with_slashes():
    flat = weights.flatten({"a": [{"b": 1.0}, 2.0], "c": np.zeros(2)})
    assert sorted(flat) == ["a/0/b", "a/1", "c"]
    with pytest.raises(ConfigError, match="'/'"):
        weights.flatten({"a/b": np.zeros(1)})
    with pytest.raises(ConfigError, match="PRNG key"):
        weights.flatten({"k": jax.random.key(0)})


def test_equinox_pytree_round_trips(tmp_path):
    eqx = pytest.importorskip("equinox")
    mlp = eqx.nn.MLP(6, 3, 5, 2, key=jax.random.key(0))
    arrays = eqx.partition(mlp, eqx.is_array)[0]
    weights.save(tmp_path / "e.safetensors", arrays, {"model": {"ref": "x:y"}})
    loaded, meta = weights.load(tmp_path / "e.safetensors")
    assert sorted(weights.flatten(loaded)) == sorted(weights.flatten(arrays))
    for name, value in weights.flatten(arrays).items():
        np.testing.assert_array_equal(weights.flatten(loaded)[name], value)


def test_bfloat16_is_kept(tmp_path):
    params = {"w": jnp.arange(4, dtype=jnp.bfloat16)}
    weights.save(tmp_path / "b.safetensors", params, {})
    loaded, meta = weights.load(tmp_path / "b.safetensors")
    assert loaded["w"].dtype == jnp.bfloat16 and meta["widened"] == {"w": "bfloat16"}


def test_non_finite_weights_are_refused_unless_asked_for(tmp_path):
    weights.save(tmp_path / "n.safetensors", {"w": np.array([1.0, np.nan])}, {})
    with pytest.raises(DataError, match="expected finite weights"):
        weights.load(tmp_path / "n.safetensors")
    _, meta = weights.load(tmp_path / "n.safetensors", finite=False)
    assert meta["finite"] is False


def test_metadata_free_npz_falls_back_to_the_builtin_layouts(tmp_path):
    params = MODELS["mlp-ce"].init(jax.random.key(0), n_hidden=8)
    save_params(tmp_path / "old.npz", {k: np.asarray(v) for k, v in params.items()})
    model, loaded, meta = registry.load_model(tmp_path / "old.npz")
    assert model.name == "mlp-ce" and meta == {"finite": True}
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v) for k, v in params.items()}, str(tmp_path / "bare.st"))
    model, _, meta = registry.load_model(tmp_path / "bare.st")
    assert model.name == "mlp-ce" and meta == {"finite": True}


def test_file_is_written_atomically(tmp_path):
    weights.save(tmp_path / "w.safetensors", {"w": np.ones(2)}, {})
    with pytest.raises(ConfigError):
        weights.save(tmp_path / "w.safetensors", {"w": object()}, {})
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    assert weights.load(tmp_path / "w.safetensors")[0]["w"].tolist() == [1.0, 1.0]


def _damaged(tmp_path):
    """(name, bytes) of damaged weights files."""
    good = tmp_path / "good.safetensors"
    weights.save(good, {"w": np.arange(6, dtype=np.float32)}, {"model": {"ref": "mlp-ce"}})
    blob = good.read_bytes()
    weights.save(tmp_path / "good.npz", {"w": np.arange(6, dtype=np.float32)}, {})
    npz = (tmp_path / "good.npz").read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    header["__metadata__"]["mlshift"] = "{not json"
    bad_json = json.dumps(header).encode()
    bad_json += b" " * (n - len(bad_json)) if len(bad_json) <= n else b""
    nan = blob[:-4] + np.float32(np.nan).tobytes()  # finite when saved, NaN now
    return [("empty", b""), ("truncated", blob[:-5]), ("header-only", blob[:12]),
            ("garbage", b"\x00\x01 not weights at all" * 3), ("npz-truncated", npz[:40]),
            ("npz-garbage", b"PK\x03\x04" + b"\x00" * 60),
            ("bad-json", struct.pack("<Q", n) + bad_json[:n] + blob[8 + n:]),
            ("nan", nan)]


def test_damaged_files_are_one_data_error(tmp_path):
    for name, blob in _damaged(tmp_path):
        path = tmp_path / f"{name}.bin"
        path.write_bytes(blob)
        with pytest.raises(DataError) as info:
            weights.load(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message, (name, message)
    # a file of another kind is named as neither format (its first bytes shown), not as a
    # safetensors file with an absurd header size; a cut safetensors header says so
    (tmp_path / "notes.txt").write_text("these are notes, not weights\n" * 4)
    with pytest.raises(DataError, match=r"found neither \(it starts b'these are no', 116 bytes\)"):
        weights.load(tmp_path / "notes.txt")
    (tmp_path / "short.bin").write_bytes(b"abcdef")  # shorter than a safetensors length
    with pytest.raises(DataError, match=r"found neither \(it starts b'abcdef', 6 bytes\)"):
        weights.load(tmp_path / "short.bin")
    (tmp_path / "cut.safetensors").write_bytes(_damaged(tmp_path)[2][1])  # header-only
    with pytest.raises(DataError, match="header that fits in the file.*truncated"):
        weights.load(tmp_path / "cut.safetensors")
    with pytest.raises(DataError, match="no such file"):
        weights.load(tmp_path / "missing.safetensors")
    with pytest.raises(DataError, match="folder"):
        weights.load(tmp_path)


def test_pickled_npz_is_refused(tmp_path):
    path = tmp_path / "p.npz"
    np.savez(path, w=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError):
        weights.load(path)


def test_weights_that_do_not_fit_their_model_are_a_data_error(tmp_path):
    params = MODELS["mlp-ce"].init(jax.random.key(0), n_hidden=8)
    params["w2"] = params["w2"][:, :3]
    weights.save(tmp_path / "w.safetensors", params, weights.metadata(MODELS["mlp-ce"]))
    with pytest.raises(DataError, match="do not fit"):
        registry.load_model(tmp_path / "w.safetensors")


def test_a_reference_that_cannot_be_built_asks_for_the_model(tmp_path):
    model = MODELS["mlp-ce"]._replace(name="MyNet")
    params = model.init(jax.random.key(0), n_hidden=8)
    weights.save(tmp_path / "w.safetensors", params, weights.metadata(model))
    with pytest.raises(ConfigError, match=r"'MyNet' is neither .*load_model\(path, model="):
        registry.load_model(tmp_path / "w.safetensors")
    got, _, meta = registry.load_model(tmp_path / "w.safetensors", model=model)
    assert got is model and meta["model"]["ref"] == "MyNet"


def test_a_weights_files_dataset_hash_is_the_runners_for_any_shape(tmp_path):
    """The metadata's dataset hash is `datasets.content_hash`, the runner's `data_hash`: for
    32x32x3 data too (the spec is part of the hash there, not for MNIST)."""
    from mlshift_jax.bench.runner import data_hash
    from mlshift_jax.data.datasets import Dataset, content_hash
    from mlshift_jax.models import zoo

    rng = np.random.default_rng(0)
    d = 32 * 32 * 3
    ds = Dataset("colour", rng.random((200, d), np.float32), rng.integers(0, 4, 200),
                 rng.random((50, d), np.float32), rng.integers(0, 4, 50), "test",
                 image_shape=(32, 32, 3), n_classes=4, input_range=(0.0, 1.0))
    model = zoo.build("mlp-ce", ds.spec, 8)
    weights.save(tmp_path / "w.safetensors", model.init(jax.random.key(0)),
                 weights.metadata(model, dataset=ds))
    _, meta = weights.load(tmp_path / "w.safetensors")
    assert meta["dataset"]["hash"] == data_hash(ds) == content_hash(ds)
    same_arrays = Dataset("grey", ds.x_train, ds.y_train, ds.x_test, ds.y_test, "test",
                          image_shape=(64, 48, 1), n_classes=4, input_range=(0.0, 1.0))
    assert content_hash(same_arrays) != content_hash(ds)  # the spec is hashed


def test_tree_digest_and_cached_npz(tmp_path):
    from mlshift_jax.core.files import cached_npz, tree_digest

    a = {"w": np.arange(6, dtype=np.float32)}
    assert tree_digest(a) == tree_digest({"w": np.arange(6, dtype=np.float32)})
    assert len(tree_digest(a)) == 16 and len(tree_digest(a, length=12)) == 12
    assert tree_digest(a) != tree_digest({"w": np.arange(6, dtype=np.float64)})
    assert tree_digest(a) != tree_digest(a, tail=b"x")
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.arange(3)}

    path = tmp_path / "c" / "e.npz"
    assert cached_npz(path, compute, what="an entry")["x"].tolist() == [0, 1, 2]
    assert cached_npz(path, compute, what="an entry")["x"].tolist() == [0, 1, 2]
    assert len(calls) == 1  # the second read the file
    path.write_bytes(b"PK damaged")
    with pytest.warns(UserWarning, match="damaged cache entry"):
        assert cached_npz(path, compute, what="an entry")["x"].tolist() == [0, 1, 2]
    assert len(calls) == 2
    seen = []
    cached_npz(path, compute, what="an entry", check=lambda f: f["y"], on_damaged=seen.append)
    assert seen == [path] and len(calls) == 3
    cached_npz(path, compute, what="an entry", read=False)
    assert len(calls) == 4
