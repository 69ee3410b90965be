"""The benchmark: the matrix as data, the cached runner, the sweeps and stability
experiments, the detection benchmark, the torch peer and the report. The top layer below
`api` and `cli`."""
