"""Detecting and naming changes: input detectors, STRIP, the model-vs-reference change test
(fingerprints), Neural Cleanse, MM-BD, training-data detectors and the categorizer. Imports
every layer above but `bench`.

`DETECTORS` (name -> `Detector`) is every detector, assembled from the records each module
exports beside its score function: the CLI, the detection bench and the report enumerate it.
Adding a detector is its function and its record in one module (plus that module's line
below if the module is new)."""

from mlshift_jax.detection import detect, detect_data, fingerprint, mm_bd, neural_cleanse, strip
from mlshift_jax.detection.detector import UNITS, Detector

FINGERPRINT = Detector(
    "fingerprint", "model", fingerprint.change_test, "fingerprint test",
    "this harness (see fingerprint.py)",
    "min-p of rank tails of disagreement, KL, KS, reversed-trigger flip and norm vs clean "
    "retrains")

DETECTORS: dict[str, Detector] = {d.name: d for d in (
    *detect.DETECTORS, *strip.DETECTORS, FINGERPRINT, *detect_data.DETECTORS,
    *neural_cleanse.DETECTORS, *mm_bd.DETECTORS)}


def of_unit(unit: str) -> tuple[Detector, ...]:
    """The detectors of `DETECTORS` that judge `unit` ("input", "sample" or "model"), in
    registry order."""
    return tuple(d for d in DETECTORS.values() if d.unit == unit)


__all__ = ["DETECTORS", "FINGERPRINT", "UNITS", "Detector", "of_unit"]
