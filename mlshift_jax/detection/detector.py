"""The `Detector` record: every fact the CLI, the detection bench and the report need about one
detector. The records live beside their score functions; `detection/__init__.py` assembles
them into `DETECTORS`."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

UNITS = ("input", "sample", "model")  # what a detector judges: an input, a training sample, a model


class Detector(NamedTuple):
    """One detector.

    name: its identifier (the CLI's spelling, e.g. "spectral-signatures").
    unit: what it judges: "input" (is this input changed?), "sample" (is this training sample
      poisoned?) or "model" (has this model changed / is it backdoored?).
    score: the scoring function, higher = more suspicious. Its signature is the unit's:
      "input": score(model, params, x [D], p [n_out], squeezers) -> scalar, ONE example whose
      `model.probs` outputs are p (`detect.input_scores` vmaps them), except STRIP, which
      needs clean images to blend with (`strip.strip_scores`);
      "sample": score(model, params, x [n, D], y [n], h [n, d], *, eps, key, n_classes,
      block, reference) -> `detect_data.Detection`, or None when it needs a clean reference
      and none was given (`detect_data.scan`);
      "model": the statistic the model-level test computes (see its module).
    label: the display name, the row of the bench's tables and the report's.
    source: the paper (or "this harness").
    summary: what the score is, in one line (the bench's "detectors" table).
    """

    name: str
    unit: str
    score: Callable
    label: str
    source: str
    summary: str
