"""Class-conditional scores: one class of a model against the same class in benign models.

A backdoor makes its target class easy to reach: Neural Cleanse finds a small mask for it,
MM-BD a large margin. Benign models have easy classes too (on MNIST, the classes whose
digits share strokes with many others), so comparing a class with the OTHER classes of the
same model, as Neural Cleanse's anomaly index does, scores a benign easy class as high as a
weak (1%) backdoor's target. `scan-model` always has a null of benign models of the
suspect's own recipe (`scan.calibrate_null`), so each class can be compared with the SAME
class across that null instead:

    profile(v)[c] = log v[c] - median_k log v[k]          (`profile`; [..., K])
    z[c]          = sign * (profile[c] - med_c) / (MAD_SCALE * mad_c)   (`class_z`)
    score         = max_c z[c],  target = argmax_c z[c]   (`score`)

med_c and mad_c are the median and median absolute deviation of class c's profile over
the null; sign is -1 for a detector whose small values are suspicious (mask norms), +1 for
large (margins). Centring on the model's own median keeps the profile scale-free: a pruned
or quantized model that is uniformly harder (or easier) to reach keeps its profile. A null
member is scored against the others (`loo_scores`), so its score is distributed as a fresh
benign model's would be.

This is the anomaly index of Neural Cleanse (Wang et al., IEEE S&P 2019: a robust z-score
with the MAD) with the reference distribution taken across a population of benign models
per class rather than across classes within one model. It was chosen by measurement on a
development population (seed 1 of `bench/scan_bench.py`, never the reported seed 0; the
CLI's scan settings, 104 benign models in the null, each on 10,000 training images): at 1%
poisoning it found 3 of 3 patch, 3 of 3 checkerboard and 3 of 3 blended backdoors with
their target (1 of 3 sparse, whose backdoors were barely learned), against 1, 0, 0 and 0
of 3 for the within-model anomaly index with MM-BD's Gamma score; 1 of 26 held-out benign
models was flagged (a plain retrain, by the margin score), and the verdict's held-out FPR on
the null was 0.019. With every model on all 60,000 training images (the CLI's null, and the
bench's since), the same development seed gave 12 of 12 at 1% (sparse ASR 0.63-0.96), 35
of 36 over 1-10%, 1 of 26 benign flagged (a retrain at twice the learning rate, by Neural
Cleanse), and a held-out FPR of 0.029.
"""

from __future__ import annotations

import numpy as np

from mlshift_jax.core.errors import ConfigError

MAD_SCALE = 1.4826  # MAD of a normal sample times this estimates its standard deviation
SPREAD_FLOOR = 1e-3  # smallest per-class spread (log units): a constant class is not infinite z
MIN_REFERENCE = 3  # null members a class's median and MAD need at the least


def profile(values) -> np.ndarray:
    """Log values centred on each model's median class: values [..., K] > 0 (mask norms,
    margins; floored at 1e-6) -> [..., K] float64."""
    logs = np.log(np.maximum(np.asarray(values, np.float64), 1e-6))
    return logs - np.median(logs, -1, keepdims=True)


def class_z(reference, profiles, sign: float) -> np.ndarray:
    """Robust z of each class of each model against that class over the reference.
    reference: [n, K] profiles of benign models; profiles: [m, K]; sign: -1 (small values
    suspicious) or +1 (large) -> [m, K] (higher = more suspicious). ConfigError for fewer
    than MIN_REFERENCE reference models or a class count that differs."""
    reference, profiles = np.asarray(reference, np.float64), np.asarray(profiles, np.float64)
    if reference.ndim != 2 or len(reference) < MIN_REFERENCE:
        raise ConfigError(f"class-conditional score: expected at least {MIN_REFERENCE} "
                          f"reference models [n, K], found shape {reference.shape}")
    if profiles.shape[-1] != reference.shape[-1]:
        raise ConfigError(f"class-conditional score: expected {reference.shape[-1]} classes "
                          f"as in the null, found {profiles.shape[-1]}")
    centre = np.median(reference, 0)
    spread = MAD_SCALE * np.median(np.abs(reference - centre), 0)
    return sign * (profiles - centre) / np.maximum(spread, SPREAD_FLOOR)


def score(reference, profiles, sign: float) -> tuple[np.ndarray, np.ndarray]:
    """The most suspicious class of each model and its z (`class_z`): -> (scores [m],
    targets [m])."""
    z = class_z(reference, np.atleast_2d(profiles), sign)
    return z.max(-1), z.argmax(-1)


def scorer(sign: float, what: str, detector: str):
    """A registry record's score function: (null_values [n, K], values [m, K]) -> (scores
    [m], targets [m]), each class's log `what` (`profile`) against the same class over a null
    of n >= MIN_REFERENCE benign models (`score`), higher = more suspicious. ConfigError for
    a null too small or a class count that differs."""
    def class_score(null_values, values) -> tuple[np.ndarray, np.ndarray]:
        return score(profile(null_values), profile(values), sign)

    class_score.__doc__ = (f"`scan-model`'s {detector} score: each class's log {what} against "
                           f"the same class over a null of benign models (robust z, "
                           f"{'large' if sign > 0 else 'small'} = suspicious): "
                           "(null [n, K], values [m, K]) -> (scores [m], targets [m]).")
    return class_score


def loo_scores(reference, sign: float) -> np.ndarray:
    """Each reference model's score against the OTHER reference models: [n, K] -> [n]."""
    reference = np.asarray(reference, np.float64)
    keep = ~np.eye(len(reference), dtype=bool)
    return np.array([score(reference[keep[i]], reference[i], sign)[0][0]
                     for i in range(len(reference))])
