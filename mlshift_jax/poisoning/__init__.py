"""Training-time changes to a dataset: wrong labels, BadNets triggers, mixtures, and the
trigger families (patch, checkerboard, blended, sparse, SIG, WaNet warp). Imports `core`, `data`."""
