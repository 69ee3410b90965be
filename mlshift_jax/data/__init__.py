"""Datasets as numpy arrays (built-in, .npz, IDX, CSV; any image shape) and the `Spec` a
dataset gives a model. Imports only `core`."""
