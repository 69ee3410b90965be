"""Detecting and naming changes: input detectors, STRIP, the model-vs-reference change test
(fingerprints), Neural Cleanse, training-data detectors and the categorizer. Imports every
layer above but `bench`."""
