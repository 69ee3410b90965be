"""Datasets as numpy arrays (built-in, .npz, IDX, CSV; any image shape) and the `Spec` a
dataset gives a model. Imports only `core`.

The public names are re-exported here, so a module can move without breaking users."""

from mlshift_jax.data.datasets import (
    DATASETS,
    INPUT_RANGE,
    Dataset,
    SampleDataWarning,
    cache_dir,
    content_hash,
    load,
    read_csv,
    read_dir,
    read_idx,
    read_npz,
    subsample,
)
from mlshift_jax.data.spec import STUDY_SPEC, Spec, check_spec, guess_spec

__all__ = [
    "DATASETS", "INPUT_RANGE", "STUDY_SPEC", "Dataset", "SampleDataWarning", "Spec",
    "cache_dir", "check_spec", "content_hash", "guess_spec", "load", "read_csv", "read_dir",
    "read_idx", "read_npz", "subsample",
]
