"""core/compile_cache.py: where the CLI's persistent compilation cache goes, and its opt-out.
Never asserts on speed."""

import jax
import pytest

from mlshift_jax.core import compile_cache

KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes", "jax_compilation_cache_max_size")


@pytest.fixture
def restore():
    """Put JAX's cache settings back, and drop the cache object JAX built from them (it
    outlives the settings): later tests in this process must compile without a disk cache."""
    from jax._src import compilation_cache

    saved = {k: getattr(jax.config, k) for k in KEYS}
    yield
    for k, v in saved.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


def test_opt_out_leaves_jax_alone(tmp_path, monkeypatch, restore):
    monkeypatch.setenv(compile_cache.OPT_OUT, "1")
    before = jax.config.jax_compilation_cache_dir
    assert compile_cache.enable(tmp_path / "c") is None
    assert jax.config.jax_compilation_cache_dir == before and not (tmp_path / "c").exists()


def test_enable_points_jax_at_the_folder(tmp_path, monkeypatch, restore):
    monkeypatch.delenv(compile_cache.OPT_OUT, raising=False)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    jax.config.update("jax_compilation_cache_dir", None)
    assert compile_cache.enable(tmp_path / "c") == tmp_path / "c"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert jax.config.jax_compilation_cache_max_size == compile_cache.MAX_BYTES


def test_the_users_own_cache_wins(tmp_path, monkeypatch, restore):
    monkeypatch.delenv(compile_cache.OPT_OUT, raising=False)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.enable(tmp_path / "c") == tmp_path / "mine"
    assert not (tmp_path / "c").exists()


def test_an_unwritable_folder_is_no_error(tmp_path, monkeypatch, restore):
    monkeypatch.delenv(compile_cache.OPT_OUT, raising=False)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    jax.config.update("jax_compilation_cache_dir", None)
    (tmp_path / "file").write_text("x")
    assert compile_cache.enable(tmp_path / "file" / "c") is None
