import jax
import jax.numpy as jnp
import pytest

from mlshift_jax.core import memory_maps


def test_relieve_clears_compiled_programs_past_the_share():
    f = jax.jit(lambda x: x * 2 + 1)
    f(jnp.ones(3)).block_until_ready()
    assert f._cache_size() == 1
    assert memory_maps.relieve(share=0.0)
    assert f._cache_size() == 0
    assert float(f(jnp.ones(3))[0]) == 3.0  # recompiles on the next call


def test_relieve_leaves_caches_below_the_share():
    f = jax.jit(lambda x: x - 1)
    f(jnp.ones(2)).block_until_ready()
    assert not memory_maps.relieve(share=1e9)
    assert f._cache_size() == 1


def test_in_use_counts_this_process_maps():
    used = memory_maps.in_use()
    if used is None:
        pytest.skip("no /proc on this system")
    assert used > 10
