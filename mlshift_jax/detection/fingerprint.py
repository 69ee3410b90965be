"""Model-level change test: has this model (or this model's input channel) changed, compared
with a reference? Behavioural fingerprints, their null distribution, and calibrated p-values.

**Probe set** (`make_probes`): `n` held-out test images (seeded); the first `n_patched` of
them are the clean images the trigger search works on.

**Responses** (`responses`): what a *system* answers on the probe set. A system is a model
and the inputs it actually sees: for a model change it is (suspect params, the probes); for an
input change it is (reference params, the changed probes), i.e. the reference model behind an
input channel that adds noise or an adversarial perturbation to whatever comes in, row i of
the changed batch being probe i after the change. Feature squeezing is applied to the inputs
the system sees. A Responses record holds the outputs (`model.probs`) on the inputs [P, C]
and the feature squeezing score of each input [P] (the L1 output distance of
`detect.squeeze_distance`).

**Reversed triggers** (`reverse`, `TriggerSummary`): Neural Cleanse (Wang et al., IEEE S&P
2019; `neural_cleanse.reverse_triggers`) run on a model over the first `n_patched` probes,
a short search (`TRIGGER_SCAN`: 100 Adam steps of 64 images per class): for every class the
smallest mask and pattern that send the other classes' images there. The summary keeps the
smallest-norm trigger (its mask, pattern, target class and attack rate on the model) and
the mask norms of all classes. The defender never guesses the trigger's
place, shape or size: a corner square, scattered pixels or a blend, on any image size, is
what the search reverses, if the model learnt one.

**Fingerprint** (`fingerprint_arrays` for the responses, `trigger_features` for the
triggers): features of (reference, suspect), probe by probe:

- disagreement: share of probes whose predicted class differs;
- kl: mean KL(reference || suspect) of the output distributions (`detect.distribution`:
  sigmoid outputs normalized to sum to 1);
- ks: the two-sample Kolmogorov-Smirnov statistic between the confidence distributions
  (`ks_statistic`; `ks_pvalue` gives its asymptotic p-value, which treats the two samples as
  independent: the calibrated decision uses the null distribution instead);
- confidence_shift: mean confidence (suspect) - mean confidence (reference);
- accuracy_drop: accuracy (reference) - accuracy (suspect) on the probes' labels;
- flip_concentration: of the probes whose class changed, the largest share moving to one
  class (column of the class-transition matrix, diagonal excluded);
- trigger_flip: the suspect's smallest reversed trigger, stamped on the search's probes:
  the share of those not of its target class that the suspect sends to the target, minus
  the share the reference sends there (a backdoor's trigger moves the suspect, not a clean
  reference; a clean model's smallest trigger is a universal adversarial pattern that
  transfers to a retrain of the same recipe);
- trigger_norm: log(the reference's reversed mask norm for that target / the suspect's):
  how much smaller the suspect's easiest way into a class is than the reference's way into
  the same class (a backdoor's target is reachable with a far smaller mask; a clean
  retrain's easiest class is easy for the reference too);
- squeeze_gap: mean feature-squeezing score, suspect minus reference (Xu et al., NDSS 2018).

For an input change the model is the reference, so its triggers are the reference's own:
trigger_flip is the reference's rate on its smallest trigger stamped on the changed probes
minus the rate on the probes, and trigger_norm is 0. The class-transition matrix (reference
class -> suspect class, shares of probes) comes with them. Every feature is a jnp function
of the two records: jit it, vmap it over suspects.

**Null distribution and p-values** (`change_test`): the fingerprints of the reference against
clean retrains (other seeds, other random samples: the study's stability experiment, trained
as one population, `retrain.train_sampled`). Per feature, the empirical p-value is
(1 + #{null >= observed}) / (1 + n_null): rank-based, one-sided (larger = more changed),
at its resolution 1 / (1 + n_null). The features of `TEST_FEATURES` are combined by their
**minimum** (min-p), calibrated on the null itself: in the pool {null fingerprints, the
suspect's} every member gets its own per-feature tails among the pool and their minimum T,
and the p-value is the suspect's rank: #{pool members with T <= the suspect's T} /
(1 + n_null). A member above all the others in a feature (whose rank p-value is 1/(n+1),
the floor) has its tail continued below the floor as exp(-excess / scale) / (n + 1), the
excess over the runner-up in units of the feature's robust scale (1.4826 MAD), so that a
suspect far beyond the null in one feature is not tied with null members that each top some
feature by a little. One extreme feature is enough: nothing standardizes it by a pooled
standard deviation it inflates itself (the max-z combination this replaced capped every
member's z at sqrt(n_null), and so tied an extreme targeted flip with ordinary null
members: p = 0.08 in issue 12). T is the same function of the pool for every member, so the
p-value is exactly valid (P(p <= a) <= a) whenever the suspect is exchangeable with the null
models, i.e. a clean retrain of the same recipe, however the features depend on each other.
Fisher's method was not used: it assumes independent p-values, and these features
(disagreement, KL, KS) are strongly correlated. With n_null models the smallest p-value is
1 / (n_null + 1), so a test at alpha needs n_null >= 1/alpha - 1 (19 for 0.05, 99 for 0.01):
`check_alpha` refuses a smaller null.

`changed_probability` turns a p-value into a probability of "changed" (for cross-entropy
scoring, as NIST TrojAI scores its rounds) with the calibration of Sellke, Bayarri & Berger,
"Calibration of p Values for Testing Precise Null Hypotheses", The American Statistician
55(1), 2001: B(p) = -e p ln p (p < 1/e) bounds the Bayes factor for "unchanged", so with even
prior odds P(changed | p) = 1 / (1 + B(p)), and 0.5 for p >= 1/e.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.data.datasets import subsample
from mlshift_jax.detection import neural_cleanse
from mlshift_jax.detection.class_null import MAD_SCALE
from mlshift_jax.detection.detect import SQUEEZERS, squeeze
from mlshift_jax.models.zoo import Model, Params, check_spec, guess_spec

RESPONSE_FEATURES = ("disagreement", "kl", "ks", "confidence_shift", "accuracy_drop",
                     "flip_concentration")
TRIGGER_FEATURES = ("trigger_flip", "trigger_norm")
FEATURES = RESPONSE_FEATURES + TRIGGER_FEATURES + ("squeeze_gap",)
TEST_FEATURES = ("disagreement", "kl", "ks", "trigger_flip", "trigger_norm")
TRIGGER_SCAN = neural_cleanse.ScanConfig(steps=100, batch=64)  # a short search: see `reverse`
ALPHA = 0.05
_EPS = 1e-7
_TINY_NORM = 1e-3  # pixels: keeps the log-ratio of mask norms finite


# --- probes ------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ProbeSet:
    """The probes. x: [P, D] test images; y: int [P] their labels; n_patched: Q, how many of
    the probes (the first Q) the trigger search stamps; index: the test-set rows used."""

    x: jax.Array = field(repr=False)
    y: jax.Array = field(repr=False)
    n_patched: int
    index: np.ndarray = field(repr=False)

    @property
    def size(self) -> int:
        """P, the number of probes."""
        return int(self.y.shape[0])

    @functools.cached_property
    def patched(self) -> tuple[jax.Array, jax.Array]:
        """(x [Q, D], y [Q]): the probes the trigger search stamps (sliced once)."""
        q = self.n_patched
        return jax.device_put(np.asarray(self.x)[:q]), jax.device_put(np.asarray(self.y)[:q])


def make_probes(x_test, y_test, *, n: int = 1000, n_patched: int = 200, seed: int = 0,
                spec=None) -> ProbeSet:
    """`n` test images drawn by `data.subsample(seed, ...)`, the first `n_patched` of which
    the trigger search (`reverse`) works on. spec: the data's models.Spec (or Dataset /
    Model), checked against the arrays; None guesses it from them."""
    n_test = len(y_test)
    n = min(n, n_test)
    if not 2 <= n_patched <= n:
        raise ConfigError(f"probes: expected n_patched in 2..{n}, found {n_patched}")
    if spec is not None:
        check_spec(spec)
    else:
        guess_spec(x_test, y_test)
    index = subsample(seed, n_test, n)  # host-side, then one transfer each (no programs)
    return ProbeSet(jax.device_put(np.asarray(x_test)[index].astype(np.float32)),
                    jax.device_put(np.asarray(y_test)[index].astype(np.int32)),
                    int(n_patched), index)


# --- responses ---------------------------------------------------------------------------------


class Responses(NamedTuple):
    """A system's answers on a probe set. probs: [P, C] (`model.probs` of the outputs);
    squeeze: [P] the feature-squeezing score of each input."""

    probs: jax.Array
    squeeze: jax.Array


def _squeezed(model: Model, x: jax.Array) -> jax.Array:
    """The squeezed copies [S, P, D] of x: [P, D] (`detect.SQUEEZERS`, on the model's image
    shape and range)."""
    return jnp.stack([jax.vmap(lambda xi, s=s: squeeze(model, s, xi))(x) for s in SQUEEZERS])


def _answers(model: Model, params: Params, x: jax.Array, squeezed: jax.Array) -> Responses:
    """Responses of params on inputs x [P, D] and their squeezed copies."""

    def probs(xb):
        return jax.vmap(lambda xi: model.probs(model.apply(params, xi)))(xb)

    p = probs(x)
    d = p / jnp.sum(p, -1, keepdims=True)
    sq = jax.vmap(probs)(squeezed)  # [S, P, C]
    sq = sq / jnp.sum(sq, -1, keepdims=True)
    return Responses(p, jnp.max(jnp.sum(jnp.abs(sq - d[None]), -1), axis=0))


@functools.partial(jax.jit, static_argnames=("model", "batch"))
def _models_jit(model, stacked, x, batch):
    squeezed = _squeezed(model, x)
    return jax.lax.map(lambda p: _answers(model, p, x, squeezed), stacked, batch_size=batch)


@functools.partial(jax.jit, static_argnames=("model",))
def _one_jit(model, params, x):
    return _answers(model, params, x, _squeezed(model, x))


@functools.partial(jax.jit, static_argnames=("model", "batch"))
def _inputs_jit(model, params, xs, batch):
    return jax.lax.map(lambda x: _answers(model, params, x, _squeezed(model, x)), xs,
                       batch_size=batch)


def responses(model: Model, params: Params, probes: ProbeSet, x=None) -> Responses:
    """The responses of one system: `params` on x: [P, D] (default: the probes themselves;
    pass the changed probes for an input-channel change). One jitted call."""
    x = probes.x if x is None else jnp.asarray(x, jnp.float32)
    _check_inputs(x, probes)
    return _one_jit(model, params, x)


def _batch(m: int, batch: int | None) -> int:
    """Systems per vmap: given, else 1 on CPU (XLA:CPU runs many small models no faster
    together, see `population.chunk_size`) and up to 64 elsewhere."""
    if batch is not None:
        if batch < 1:
            raise ConfigError(f"responses: expected batch >= 1, found {batch}")
        return int(batch)
    return 1 if jax.default_backend() == "cpu" else max(1, min(m, 64))


def model_responses(model: Model, stacked: Params, probes: ProbeSet, *,
                    batch: int | None = None) -> Responses:
    """Responses of many models on the probes: stacked params (leaves [m, ...]) -> Responses
    with a leading axis m. One jitted call (`lax.map`, `batch` models per vmap); the squeezed
    probes are built once for all."""
    m = jax.tree.leaves(stacked)[0].shape[0]
    return _models_jit(model, stacked, probes.x, _batch(m, batch))


def input_responses(model: Model, params: Params, xs, probes: ProbeSet, *,
                    batch: int | None = None) -> Responses:
    """Responses of one model behind many input changes: xs: [m, P, D], row i of xs[j] the
    j-th change of probe i -> Responses with a leading axis m. One jitted call."""
    xs = _check_changed(xs, probes)
    return _inputs_jit(model, params, xs, _batch(xs.shape[0], batch))


def _check_inputs(x, probes: ProbeSet) -> None:
    if tuple(x.shape) != tuple(probes.x.shape):
        raise ConfigError(f"suspect inputs: expected one changed copy of each probe, shape "
                          f"{tuple(probes.x.shape)}, found {tuple(x.shape)}")


def _check_changed(xs, probes: ProbeSet) -> jax.Array:
    xs = xs if isinstance(xs, jax.Array) and xs.dtype == jnp.float32 else jnp.asarray(
        xs, jnp.float32)
    if xs.ndim != 3:
        raise ConfigError(f"input_responses: expected changed probes [m, P, D], found "
                          f"{xs.shape}")
    _check_inputs(jax.ShapeDtypeStruct(xs.shape[1:], xs.dtype), probes)
    return xs


# --- reversed triggers ---------------------------------------------------------------------------


class TriggerSummary(NamedTuple):
    """The smallest reversed trigger of a model (leading axes [...] for many). mask:
    [..., H, W] in [0, 1]; pattern: [..., H, W, C]; target: int [...] its class; rate: [...]
    its attack rate on the model (share of the search's probes not of the target sent
    there); norms: [..., K] the L1 mask norm (pixels) of every class's reversed trigger."""

    mask: jax.Array
    pattern: jax.Array
    target: jax.Array
    rate: jax.Array
    norms: jax.Array


@jax.jit
def summarize(triggers: neural_cleanse.Triggers) -> TriggerSummary:
    """The smallest-norm trigger of each model of `neural_cleanse.Triggers` (class axis K
    after any leading axes) -> TriggerSummary with the leading axes."""
    lead = triggers.norms.shape[:-1]
    flat = jax.tree.map(lambda a: a.reshape((-1, *a.shape[len(lead):])), triggers)  # [B, K...]
    target = jnp.argmin(flat.norms, axis=-1)
    rows = jnp.arange(target.shape[0])

    def pick(a):  # [B, K, ...] -> [..., ...]
        return a[rows, target].reshape(lead + a.shape[2:])

    return TriggerSummary(pick(flat.masks), pick(flat.patterns),
                          target.astype(jnp.int32).reshape(lead), pick(flat.rates),
                          triggers.norms)


def reverse(model: Model, stacked: Params, probes: ProbeSet, *, key: jax.Array,
            config: neural_cleanse.ScanConfig = TRIGGER_SCAN,
            chunk: int | None = None) -> TriggerSummary:
    """Neural Cleanse's trigger search (`neural_cleanse.scan_population`, Wang et al. 2019)
    on every model of `stacked` (leaves [m, ...]) over the first `probes.n_patched` probes,
    every model with the same key -> TriggerSummary with a leading axis m. One jitted call.
    The search is short (`TRIGGER_SCAN`): what it finds is compared only with what the same
    search finds on the null's clean retrains."""
    x, y = probes.patched
    found = neural_cleanse.scan_population(model, stacked, x, y, key=key, config=config,
                                           chunk=chunk)
    return summarize(found)


@functools.partial(jax.jit, static_argnames=("model",))
def _attack_rates(model: Model, params: Params, x: jax.Array, y: jax.Array,
                  mask: jax.Array, pattern: jax.Array, target: jax.Array) -> jax.Array:
    """Share of x [Q, D] (labels y != target) that params sends to target once stamped,
    for each trigger: mask [m, H, W], pattern [m, H, W, C], target [m] -> [m]."""
    apply = jax.vmap(model.apply, in_axes=(None, 0))

    def one(mk, pt, t):
        pred = jnp.argmax(apply(params, neural_cleanse.stamp(x, mk, pt, model.input_shape)), -1)
        other = y != t
        return jnp.sum((pred == t) & other) / jnp.maximum(jnp.sum(other), 1)

    return jax.vmap(one)(mask, pattern, target)


def trigger_features(model: Model, reference: Params, ref_triggers: TriggerSummary,
                     triggers: TriggerSummary, probes: ProbeSet) -> dict[str, jax.Array]:
    """The trigger features of m suspect models against the reference (module docstring).

    reference: the reference's params; ref_triggers: its own summary (no leading axis);
    triggers: the suspects' summaries (leading axis m). Returns {"trigger_flip": [m],
    "trigger_norm": [m]}: the reference is run on each suspect's trigger, nothing else.
    One jitted call."""
    x, y = probes.patched
    return _trigger_features(model, reference, ref_triggers.norms, triggers, x, y)


@functools.partial(jax.jit, static_argnames=("model",))
def _trigger_features(model, reference, ref_norms, triggers, x, y):
    ref_rate = _attack_rates(model, reference, x, y, triggers.mask, triggers.pattern,
                             triggers.target)
    mine = jnp.take_along_axis(triggers.norms, triggers.target[:, None], axis=1)[:, 0]
    theirs = ref_norms[triggers.target]
    return {"trigger_flip": triggers.rate - ref_rate,
            "trigger_norm": jnp.log(jnp.maximum(theirs, _TINY_NORM)
                                    / jnp.maximum(mine, _TINY_NORM))}


def input_trigger_features(model: Model, reference: Params, ref_triggers: TriggerSummary,
                           xs, probes: ProbeSet) -> dict[str, jax.Array]:
    """The trigger features of the reference behind m input changes, xs: [m, P, D] (module
    docstring): trigger_flip [m] = the reference's rate on its own smallest trigger stamped on
    the changed probes minus on the probes; trigger_norm [m] = 0 (the same model). One
    jitted call."""
    xs = _check_changed(xs, probes)
    return _input_trigger_features(model, reference, ref_triggers, xs, probes.x, probes.y,
                                   probes.n_patched)


@functools.partial(jax.jit, static_argnames=("model", "q"))
def _input_trigger_features(model, reference, ref_triggers, xs, x, y, q):
    one = jax.tree.map(lambda a: a[None], ref_triggers)

    def rate(images):
        return _attack_rates(model, reference, images[:q], y[:q], one.mask, one.pattern,
                             one.target)[0]

    changed = jax.vmap(rate)(xs)
    return {"trigger_flip": changed - rate(x),
            "trigger_norm": jnp.zeros(xs.shape[0], changed.dtype)}


# --- the two-sample KS test ----------------------------------------------------------------------


def ks_statistic(a: jax.Array, b: jax.Array) -> jax.Array:
    """Two-sample Kolmogorov-Smirnov statistic sup_v |F_a(v) - F_b(v)|. a: [n], b: [m].

    Both empirical CDFs are evaluated at every observed value (ties handled as
    `scipy.stats.ks_2samp`). Jittable and vmappable.
    """
    sa, sb = jnp.sort(a), jnp.sort(b)
    v = jnp.concatenate([sa, sb])
    fa = jnp.searchsorted(sa, v, side="right") / a.shape[0]
    fb = jnp.searchsorted(sb, v, side="right") / b.shape[0]
    return jnp.max(jnp.abs(fa - fb))


def ks_pvalue(d, n: int, m: int) -> np.ndarray:
    """Asymptotic two-sided p-value of a KS statistic d for samples of sizes n and m.

    The Kolmogorov distribution Q(l) = 2 sum_k (-1)^(k-1) exp(-2 k^2 l^2) at
    l = (sqrt(e) + 0.12 + 0.11 / sqrt(e)) d, e = n m / (n + m) (Stephens' correction, as in
    Press et al., Numerical Recipes, 14.3). Assumes independent samples.
    """
    d = np.asarray(d, np.float64)
    en = np.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * d
    k = np.arange(1, 101, dtype=np.float64)
    terms = 2.0 * (-1.0) ** (k - 1) * np.exp(-2.0 * k**2 * lam[..., None] ** 2)
    q = np.where(lam < 0.2, 1.0, terms.sum(-1))  # the series is 1 to 1e-10 below l = 0.2
    return np.clip(q, 0.0, 1.0)


# --- the fingerprint -----------------------------------------------------------------------------


def fingerprint_arrays(ref: Responses, sus: Responses, y: jax.Array) -> dict[str, jax.Array]:
    """The response features of a suspect against a reference, probe by probe (module
    docstring; the trigger features come from `trigger_features`).

    ref, sus: Responses of one system each; y: [P] the probes' labels. Returns scalars keyed
    by `RESPONSE_FEATURES` and "squeeze_gap", and "transitions": [C, C] (reference class ->
    suspect class, shares of the probes). Traceable: jit it, vmap it over suspects
    (in_axes=(None, 0, None)).
    """
    p, c = ref.probs.shape
    pred_r, pred_s = jnp.argmax(ref.probs, -1), jnp.argmax(sus.probs, -1)
    dr = ref.probs / jnp.sum(ref.probs, -1, keepdims=True)
    ds = sus.probs / jnp.sum(sus.probs, -1, keepdims=True)
    kl = jnp.sum(dr * (jnp.log(jnp.maximum(dr, _EPS)) - jnp.log(jnp.maximum(ds, _EPS))), -1)
    conf_r, conf_s = jnp.max(ref.probs, -1), jnp.max(sus.probs, -1)
    transitions = jnp.einsum("pi,pj->ij", jax.nn.one_hot(pred_r, c), jax.nn.one_hot(pred_s, c))
    transitions = transitions / p
    disagreement = jnp.mean(pred_r != pred_s)
    moved = jnp.max(jnp.sum(transitions * (1.0 - jnp.eye(c)), axis=0))
    return {
        "disagreement": disagreement,
        "kl": jnp.mean(kl),
        "ks": ks_statistic(conf_r, conf_s),
        "confidence_shift": jnp.mean(conf_s) - jnp.mean(conf_r),
        "accuracy_drop": jnp.mean(pred_r == y) - jnp.mean(pred_s == y),
        "flip_concentration": moved / jnp.maximum(disagreement, 1.0 / p),
        "squeeze_gap": jnp.mean(sus.squeeze) - jnp.mean(ref.squeeze),
        "transitions": transitions,
    }


@jax.jit
def fingerprints(ref: Responses, sus: Responses, y: jax.Array) -> dict[str, jax.Array]:
    """`fingerprint_arrays` for many suspects: sus with a leading axis m -> values [m] (and
    transitions [m, C, C]). One jitted call. Add `trigger_features` before `feature_matrix`."""
    return jax.vmap(fingerprint_arrays, in_axes=(None, 0, None))(ref, sus, y)


def feature_matrix(fp: dict[str, jax.Array], names: tuple[str, ...] = FEATURES) -> np.ndarray:
    """The scalar features of a fingerprint as float64 [m, len(names)] (or [F] for one).
    fp: `fingerprints` merged with `trigger_features` (every name must be there)."""
    missing = [k for k in names if k not in fp]
    if missing:
        raise ConfigError(f"fingerprint: expected the features {list(names)}, found no "
                          f"{missing} (merge `trigger_features` into `fingerprints`)")
    return np.stack([np.asarray(fp[k], np.float64) for k in names], axis=-1)


def to_json(fp: dict[str, jax.Array]) -> dict:
    """One fingerprint as plain Python: floats and the transition matrix as lists."""
    out = {k: float(fp[k]) for k in FEATURES}
    out["transitions"] = np.round(np.asarray(fp["transitions"], np.float64), 6).tolist()
    return out


# --- null distribution, p-values -----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FeatureNull:
    """The null distribution of a reference: features: float64 [n_null, F], the fingerprints
    of the reference against n_null clean retrains, columns named by `names`."""

    features: np.ndarray = field(repr=False)
    names: tuple[str, ...] = FEATURES

    def __post_init__(self):
        f = np.asarray(self.features, np.float64)
        if f.ndim != 2 or f.shape[1] != len(self.names) or f.shape[0] < 2:
            raise ConfigError(f"null: expected features [n_null >= 2, {len(self.names)}], "
                              f"found {f.shape}")
        object.__setattr__(self, "features", f)

    @property
    def size(self) -> int:
        """n_null, the number of clean retrains."""
        return int(self.features.shape[0])

    def zscores(self, observed) -> np.ndarray:
        """(observed - null mean) / null std per feature: [..., F] -> [..., F] (std 0 -> 1)."""
        std = self.features.std(axis=0, ddof=1)
        return (np.asarray(observed, np.float64) - self.features.mean(axis=0)) / np.where(
            std > 0, std, 1.0)


class TestResult(NamedTuple):
    """A change test. p_value: [m] the combined p-values (min-p, calibrated on the pool);
    statistic: [m] -log of the smallest per-feature tail (larger = more changed); feature_p:
    [m, F] the per-feature empirical p-values (1 + #{null >= observed}) / (1 + n_null) of
    every feature; resolution: 1 / (1 + n_null), the smallest p-value the null can give."""

    p_value: np.ndarray
    statistic: np.ndarray
    feature_p: np.ndarray
    resolution: float


def min_null_size(alpha: float) -> int:
    """The fewest null members whose smallest p-value 1 / (n + 1) is <= alpha."""
    return max(1, math.ceil(1.0 / alpha - 1.0 - 1e-9))


def check_alpha(alpha, n_null: int, *, alpha_name: str = "alpha",
                null_name: str = "n_null", where: str = "detect") -> float:
    """Refuse a level the null cannot reach: with n_null members the smallest p-value is
    1 / (n_null + 1), so a test at alpha < that could never say "changed". Returns alpha as
    a float; raises ConfigError (one line, naming the null size alpha needs)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not (
            0.0 < float(alpha) < 1.0):
        raise ConfigError(f"{where}: expected {alpha_name} in (0, 1), found {alpha!r}")
    alpha = float(alpha)
    if 1.0 / (n_null + 1) > alpha * (1.0 + 1e-9):
        need = min_null_size(alpha)
        raise ConfigError(
            f"{where}: {alpha_name} {alpha:g} needs a null of at least {need} models, so that "
            f"its smallest p-value 1/(N+1) is <= {alpha:g}; found {null_name} {n_null} "
            f"(smallest p-value 1/{n_null + 1} = {1.0 / (n_null + 1):.3g}): raise {null_name} "
            f"to {need}")
    return alpha


def _robust_scale(pool: np.ndarray) -> np.ndarray:
    """Per column of pool [..., N, f]: 1.4826 * MAD, else the std, else 1 -> [..., 1, f]."""
    med = np.median(pool, axis=-2, keepdims=True)
    mad = MAD_SCALE * np.median(np.abs(pool - med), axis=-2, keepdims=True)
    std = pool.std(axis=-2, keepdims=True)
    return np.where(mad > 0, mad, np.where(std > 0, std, 1.0))


def _tails(pool: np.ndarray) -> np.ndarray:
    """The per-feature tail of every member of each pool: pool [m, N, f] -> [m, N, f].

    The rank p-value #{pool >= x} / N (itself included), except for a member strictly above
    all the others, whose tail continues below 1/N as exp(-(x - runner-up) / scale) / N (an
    exponential tail in units of the column's robust scale): how far out the top lies breaks
    the tie between members that each top some feature."""
    n = pool.shape[1]
    count = (pool[:, None, :, :] >= pool[:, :, None, :]).sum(2)  # [m, N(member), f]
    top2 = -np.sort(-pool, axis=1)[:, :2]  # [m, 2, f] largest, runner-up
    others = np.where(pool >= top2[:, :1], top2[:, 1:2], top2[:, :1])  # max of the others
    excess = (pool - others) / _robust_scale(pool)
    return np.where(excess > 0, np.exp(-np.clip(excess, 0.0, 700.0)) / n, count / n)


def change_test(observed, null: FeatureNull, test_features: tuple[str, ...] = TEST_FEATURES
                ) -> TestResult:
    """Calibrated p-values of suspects' fingerprints against a null (module docstring).

    observed: float [m, F] or [F] (columns in `null.names` order). Each suspect is tested
    on its own: pool = the null's n fingerprints + its own (N = n + 1); each member's tail
    in each feature of `test_features` (`_tails`: its rank p-value among the pool, extended
    by an exponential tail for a member above all others); T = the member's smallest tail;
    p = #{pool members with T <= the suspect's} / N. T is computed alike for every member
    from the pool as a set, so p is exactly valid when the suspect is exchangeable with the
    null (a clean retrain), whatever the features' dependence.
    """
    obs = np.atleast_2d(np.asarray(observed, np.float64))
    if obs.shape[1] != len(null.names):
        raise ConfigError(f"change_test: expected {len(null.names)} features per suspect, "
                          f"found {obs.shape[1]}")
    unknown = sorted(set(test_features) - set(null.names))
    if unknown or not test_features:
        raise ConfigError(f"change_test: expected test features among {list(null.names)}, "
                          f"found {list(test_features)}")
    cols = [null.names.index(f) for f in test_features]
    n = null.size
    feature_p = (1.0 + (null.features[None, :, :] >= obs[:, None, :]).sum(1)) / (1.0 + n)
    pool = np.concatenate([np.broadcast_to(null.features[:, cols], (len(obs), n, len(cols))),
                           obs[:, None, cols]], axis=1)  # [m, n + 1, f]
    t = _tails(pool).min(axis=2)  # [m, n + 1]
    mine = t[:, -1]
    p = (t <= mine[:, None] * (1.0 + 1e-9)).sum(1) / (1.0 + n)
    return TestResult(p, -np.log(mine), feature_p, 1.0 / (1.0 + n))


def changed_probability(p_value) -> np.ndarray:
    """P(changed | p) = 1 / (1 + B(p)), B(p) = -e p ln p for p < 1/e else 1 (Sellke, Bayarri &
    Berger 2001, even prior odds). p: [...] -> [...] in [0.5, 1)."""
    p = np.clip(np.asarray(p_value, np.float64), 1e-300, 1.0)
    b = np.where(p < np.exp(-1.0), -np.e * p * np.log(p), 1.0)
    return 1.0 / (1.0 + b)
