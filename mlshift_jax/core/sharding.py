"""One code path from 1 device to N: a 1-D `jax.sharding.Mesh` over every device, the batch
axis sharded for attacks and metrics, the model axis sharded for populations.

The functions in `attacks`, `metrics` and `train` are plain jitted functions; handing them
inputs placed here is all it takes (jit follows the input shardings, GSPMD inserts the
collectives). An axis whose length is not a multiple of the device count is padded by
repeating its last row, and callers slice the padding off (`unpad`).

Multi-host (several processes, one per host: a multi-GPU cluster or a TPU pod slice) starts
with `initialize_distributed()`; `jax.devices()` then spans every host and the same mesh
covers them all.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mlshift_jax.core.errors import ConfigError

AXIS = "shard"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh named AXIS over `devices` (default: all of them, every host's)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), (AXIS,))


def padded_length(n: int, mesh: Mesh) -> int:
    """n rounded up to a multiple of the mesh size."""
    return -(-n // mesh.size) * mesh.size


def pad(x, mesh: Mesh):
    """Pad the leading axis of every leaf to a multiple of the mesh size (repeat the last row)."""
    def one(a):
        a = jnp.asarray(a)
        extra = padded_length(a.shape[0], mesh) - a.shape[0]
        return a if extra == 0 else jnp.concatenate([a, jnp.repeat(a[-1:], extra, axis=0)])
    return jax.tree.map(one, x)


def unpad(x, n: int):
    """The first n rows of every leaf: undo `pad`."""
    return jax.tree.map(lambda a: a[:n], x)


def shard_leading(tree, mesh: Mesh):
    """Place every leaf split along its leading axis (batch or model) across the mesh.

    Pads first; returns (placed tree, original leading length)."""
    n = {a.shape[0] for a in jax.tree.leaves(tree)}
    if len(n) != 1:
        raise ConfigError(f"shard_leading: expected one leading length, found {sorted(n)}")
    sharding = NamedSharding(mesh, PartitionSpec(AXIS))
    return jax.device_put(pad(tree, mesh), sharding), n.pop()


def replicate(tree, mesh: Mesh):
    """Place a full copy of every leaf on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join a multi-process run (`jax.distributed.initialize`).

    Arguments fall back to MLSHIFT_COORDINATOR (host:port), MLSHIFT_NUM_PROCESSES and
    MLSHIFT_PROCESS_ID; when none is given, JAX detects the cluster itself (TPU pods, SLURM,
    Open MPI). Call it before any other JAX call.
    """
    env = os.environ
    coordinator = coordinator or env.get("MLSHIFT_COORDINATOR")
    if num_processes is None and "MLSHIFT_NUM_PROCESSES" in env:
        num_processes = _env_int("MLSHIFT_NUM_PROCESSES", 1)
    if process_id is None and "MLSHIFT_PROCESS_ID" in env:
        process_id = _env_int("MLSHIFT_PROCESS_ID", 0)
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ConfigError(f"MLSHIFT_PROCESS_ID: expected 0..{num_processes - 1}, "
                          f"found {process_id}")
    try:
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id)
    except (ValueError, RuntimeError, TypeError) as e:  # no cluster found, bad address, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--distributed: could not join a multi-process run ({first}); set "
                          "MLSHIFT_COORDINATOR=host:port, MLSHIFT_NUM_PROCESSES and "
                          "MLSHIFT_PROCESS_ID, or run under SLURM / Open MPI / a TPU pod"
                          ) from None


def _env_int(var: str, minimum: int) -> int:
    """Env `var` as an integer >= minimum; ConfigError naming it otherwise."""
    text = os.environ[var]
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ConfigError(f"{var}: expected an integer >= {minimum}, found {text!r}")
    return value


def describe_devices() -> str:
    """One line: backend, device kind and count, process count."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return (f"backend {jax.default_backend()}, {len(devices)} device(s) ({', '.join(kinds)}), "
            f"{jax.process_count()} process(es)")


def attack_sharded(attack_fn, model, params, x, y, *, mesh: Mesh, **kw):
    """`attack_fn(model, params, x, y, **kw)` with the batch split across the mesh.

    x: [batch, n_in] -> x_adv: [batch, n_in]. Deterministic attacks give the same result as
    on one device; random ones draw noise for the padded batch, so their draws differ.
    """
    (xs, ys), n = shard_leading((x, y), mesh)
    return unpad(attack_fn(model, replicate(params, mesh), xs, ys, **kw), n)


def population_sharded(train_fn, params, x, y, *, mesh: Mesh, **kw):
    """`train_fn(params, x, y, **kw)` for a population with the model axis split across the
    mesh. params: leading axis m; x, y shared (replicated) or stacked per model (split)."""
    params, m = shard_leading(params, mesh)
    if x.ndim == 3:
        (x, y), _ = shard_leading((x, y), mesh)
    else:
        x, y = replicate((x, y), mesh)
    return unpad(train_fn(params, x, y, **kw), m)
