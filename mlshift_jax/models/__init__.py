"""Models and their training: the built-in zoo, users' models (flax, equinox, records),
recipes, the trainers, populations trained in one jit, weights files, metrics and the numpy
baseline. Imports `core`, `data`, `poisoning`."""
