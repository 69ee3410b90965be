"""Model-level change test: has this model (or this model's input channel) changed, compared
with a reference? Behavioural fingerprints, their null distribution, and calibrated p-values.

**Probe set** (`make_probes`): `n` held-out test images (seeded), and the first `n_patched`
of them stamped with each candidate trigger patch (`candidate_patches`: bright squares of
sides 3 and 5 in the four corners, one pixel from the edges; the defender does not know the
trigger, so it tries a few positions and sizes).

**Responses** (`responses`): what a *system* answers on the probe set. A system is a model
and the inputs it actually sees: for a model change it is (suspect params, the probes); for an
input change it is (reference params, the changed probes), i.e. the reference model behind an
input channel that adds noise or an adversarial perturbation to whatever comes in, row i of
the changed batch being probe i after the change. Patches are stamped on the inputs the
system sees; feature squeezing is applied to them too. A Responses record holds the outputs
(`model.probs`) on the inputs [P, C], on the patched inputs [K, Q, C], and the feature
squeezing score of each input [P] (the L1 output distance of `detect.squeeze_distance`).

**Fingerprint** (`fingerprint_arrays`): features of (reference responses, suspect responses),
probe by probe:

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
- trigger_flip: the response to candidate trigger patches, max over patches k and classes c
  of [share of patched probes the suspect calls c, among those it does not call c unpatched]
  minus the same share for the reference (a backdoor sends one patch to one class);
- patch_sensitivity: max over patches of log(suspect sensitivity / reference sensitivity),
  a patch's sensitivity being the mean L1 distance between the output distributions of a
  probe and of its patched copy (a clean model never saw those pixels lit; a model trained
  on patched images, with or without relabelling, answers to them);
- squeeze_gap: mean feature-squeezing score, suspect minus reference (Xu et al., NDSS 2018).

The class-transition matrix (reference class -> suspect class, shares of probes) comes with
them. Every feature is a jnp function of the two records: jit it, vmap it over suspects.

**Null distribution and p-values** (`change_test`): the fingerprints of the reference against
clean retrains (other seeds, other random samples: the study's stability experiment, trained
as one population, `retrain.train_sampled`). Per feature, the empirical p-value is
(1 + #{null >= observed}) / (1 + n_null). The features are combined by the **max-statistic**:
each feature of `TEST_FEATURES` (one-sided: larger = more changed) is standardized by the mean
and standard deviation of the pool {null fingerprints, the suspect's}, the statistic is the
largest z, and the p-value is the suspect's rank among the pool: (1 + #{null T >= T}) /
(1 + n_null). Because the standardization is a symmetric function of the pool, this p-value
is exactly valid (P(p <= a) <= a) whenever the suspect is exchangeable with the null models,
i.e. a clean retrain of the same recipe; the features need not be independent. Fisher's
method was not used: it assumes independent p-values, and these features (disagreement, KL,
KS) are strongly correlated. With n_null models the smallest p-value is 1 / (n_null + 1), so
a test at alpha = 0.05 needs n_null >= 19.

`changed_probability` turns a p-value into a probability of "changed" (for cross-entropy
scoring, as NIST TrojAI scores its rounds) with the calibration of Sellke, Bayarri & Berger,
"Calibration of p Values for Testing Precise Null Hypotheses", The American Statistician
55(1), 2001: B(p) = -e p ln p (p < 1/e) bounds the Bayes factor for "unchanged", so with even
prior odds P(changed | p) = 1 / (1 + B(p)), and 0.5 for p >= 1/e.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.data.datasets import subsample
from mlshift_jax.detection.detect import SQUEEZERS, squeeze
from mlshift_jax.models.zoo import Model, Params, check_spec, guess_spec
from mlshift_jax.poisoning.poison import Patch, patch_pixels

FEATURES = ("disagreement", "kl", "ks", "confidence_shift", "accuracy_drop",
            "flip_concentration", "trigger_flip", "patch_sensitivity", "squeeze_gap")
TEST_FEATURES = ("disagreement", "kl", "ks", "trigger_flip", "patch_sensitivity")
CANDIDATE_SIZES = (3, 5)
PATCH_MARGIN = 1
ALPHA = 0.05
_EPS = 1e-7
_SENS_FLOOR = 1e-3  # keeps the log-ratio of patch sensitivities finite


# --- probes ------------------------------------------------------------------------------------


def candidate_patches(image_shape: tuple[int, ...], sizes: tuple[int, ...] = CANDIDATE_SIZES,
                      margin: int = PATCH_MARGIN) -> tuple[Patch, ...]:
    """Bright square patches (the top of the input range) of each size in the four corners
    of images of image_shape (H, W[, C]), `margin` pixels from the edges: the trigger
    candidates a defender tries (BadNets triggers sit in a corner; Gu et al. 2017). Sizes
    that do not fit the image are left out."""
    h, w = int(image_shape[0]), int(image_shape[1])
    out = []
    for s in sizes:
        if s + 2 * margin > min(h, w):
            continue
        rows, cols = (margin, h - margin - s), (margin, w - margin - s)
        out += [Patch(size=s, position=(r, c)) for r in rows for c in cols]
    if not out:
        raise ConfigError(f"probes: expected images of at least {min(sizes) + 2 * margin} "
                          f"pixels a side for the candidate patches, found {h}x{w}")
    return tuple(out)


@dataclass(frozen=True, eq=False)
class ProbeSet:
    """The probes. x: [P, D] test images; y: int [P] their labels; patches: bool [K, D]
    the pixels of each candidate patch; value: the stamped value; n_patched: Q, how many of
    the probes (the first Q) are stamped with each patch; index: the test-set rows used."""

    x: jax.Array = field(repr=False)
    y: jax.Array = field(repr=False)
    patches: jax.Array = field(repr=False)
    value: float
    n_patched: int
    index: np.ndarray = field(repr=False)

    @property
    def size(self) -> int:
        """P, the number of probes."""
        return int(self.y.shape[0])


def make_probes(x_test, y_test, *, n: int = 1000, n_patched: int = 200, seed: int = 0,
                patches: tuple[Patch, ...] | None = None, spec=None) -> ProbeSet:
    """`n` test images drawn by `data.subsample(seed, ...)`, the first `n_patched` of which
    are also stamped with each of `patches` (default `candidate_patches(image shape)`).
    spec: the data's models.Spec (or Dataset / Model); None guesses it from the arrays."""
    n_test = len(y_test)
    n = min(n, n_test)
    if not 1 <= n_patched <= n:
        raise ConfigError(f"probes: expected n_patched in 1..{n}, found {n_patched}")
    spec = guess_spec(x_test, y_test) if spec is None else check_spec(spec)
    patches = candidate_patches(spec.input_shape) if patches is None else patches
    values = {p.value_for(spec.input_range) for p in patches}
    if len(values) != 1:
        raise ConfigError(f"probes: expected candidate patches of one value, found {values}")
    index = subsample(seed, n_test, n)
    pix = np.stack([patch_pixels(p, spec)[0] for p in patches])
    return ProbeSet(jnp.asarray(np.asarray(x_test)[index], jnp.float32),
                    jnp.asarray(np.asarray(y_test)[index], jnp.int32), jnp.asarray(pix),
                    float(values.pop()), int(n_patched), index)


# --- responses ---------------------------------------------------------------------------------


class Responses(NamedTuple):
    """A system's answers on a probe set. probs: [P, C] (`model.probs` of the outputs);
    patched: [K, Q, C] the same on the inputs stamped with each candidate patch; squeeze:
    [P] the feature-squeezing score of each input."""

    probs: jax.Array
    patched: jax.Array
    squeeze: jax.Array


def _system_inputs(model: Model, x: jax.Array, patches: jax.Array, value,
                   n_patched: int) -> tuple[jax.Array, jax.Array]:
    """What a system is queried with besides x: [P, D]: its squeezed copies [S, P, D]
    (`detect.SQUEEZERS`, on the model's image shape and range) and its first n_patched rows
    stamped with each patch [K, Q, D]."""
    squeezed = jnp.stack([jax.vmap(lambda xi, s=s: squeeze(model, s, xi))(x)
                          for s in SQUEEZERS])
    stamped = jnp.where(patches[:, None, :], jnp.asarray(value, x.dtype), x[None, :n_patched])
    return squeezed, stamped


def _answers(model: Model, params: Params, x: jax.Array, squeezed: jax.Array,
             stamped: jax.Array) -> Responses:
    """Responses of params on inputs x [P, D] and their squeezed / stamped copies."""

    def probs(xb):
        return jax.vmap(lambda xi: model.probs(model.apply(params, xi)))(xb)

    p = probs(x)
    d = p / jnp.sum(p, -1, keepdims=True)
    sq = jax.vmap(probs)(squeezed)  # [S, P, C]
    sq = sq / jnp.sum(sq, -1, keepdims=True)
    squeeze = jnp.max(jnp.sum(jnp.abs(sq - d[None]), -1), axis=0)
    return Responses(p, jax.vmap(probs)(stamped), squeeze)


@functools.partial(jax.jit, static_argnames=("model", "n_patched", "batch"))
def _models_jit(model, stacked, x, patches, value, n_patched, batch):
    squeezed, stamped = _system_inputs(model, x, patches, value, n_patched)
    return jax.lax.map(lambda p: _answers(model, p, x, squeezed, stamped), stacked,
                       batch_size=batch)


@functools.partial(jax.jit, static_argnames=("model", "n_patched", "batch"))
def _inputs_jit(model, params, xs, patches, value, n_patched, batch):
    def one(x):
        return _answers(model, params, x, *_system_inputs(model, x, patches, value, n_patched))

    return jax.lax.map(one, xs, batch_size=batch)


def responses(model: Model, params: Params, probes: ProbeSet, x=None) -> Responses:
    """The responses of one system: `params` on x: [P, D] (default: the probes themselves;
    pass the changed probes for an input-channel change). One jitted call."""
    x = probes.x if x is None else jnp.asarray(x, jnp.float32)
    _check_inputs(x, probes)
    out = _inputs_jit(model, params, x[None], probes.patches, probes.value, probes.n_patched, 1)
    return jax.tree.map(lambda a: a[0], out)


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
    and stamped probes are built once for all."""
    m = jax.tree.leaves(stacked)[0].shape[0]
    return _models_jit(model, stacked, probes.x, probes.patches, probes.value,
                       probes.n_patched, _batch(m, batch))


def input_responses(model: Model, params: Params, xs, probes: ProbeSet, *,
                    batch: int | None = None) -> Responses:
    """Responses of one model behind many input changes: xs: [m, P, D], row i of xs[j] the
    j-th change of probe i -> Responses with a leading axis m. One jitted call."""
    xs = jnp.asarray(xs, jnp.float32)
    if xs.ndim != 3:
        raise ConfigError(f"input_responses: expected changed probes [m, P, D], found "
                          f"{xs.shape}")
    _check_inputs(xs[0], probes)
    return _inputs_jit(model, params, xs, probes.patches, probes.value, probes.n_patched,
                       _batch(xs.shape[0], batch))


def _check_inputs(x, probes: ProbeSet) -> None:
    if tuple(x.shape) != tuple(probes.x.shape):
        raise ConfigError(f"suspect inputs: expected one changed copy of each probe, shape "
                          f"{tuple(probes.x.shape)}, found {tuple(x.shape)}")


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


def _trigger_rates(r: Responses, n_patched: int) -> tuple[jax.Array, jax.Array]:
    """rate: [K, C] share of patched probes called c among those not called c unpatched;
    sensitivity: [K] mean L1 distance between the output distributions of a probe and of
    its patched copy."""
    base = jnp.argmax(r.probs[:n_patched], axis=-1)  # [Q]
    pk = jnp.argmax(r.patched, axis=-1)  # [K, Q]
    c = r.probs.shape[-1]
    to = jax.nn.one_hot(pk, c)  # [K, Q, C]
    not_base = 1.0 - jax.nn.one_hot(base, c)  # [Q, C]
    rate = jnp.sum(to * not_base, axis=1) / jnp.maximum(jnp.sum(not_base, axis=0), 1.0)
    d = r.probs[:n_patched] / jnp.sum(r.probs[:n_patched], -1, keepdims=True)
    dk = r.patched / jnp.sum(r.patched, -1, keepdims=True)
    sensitivity = jnp.mean(jnp.sum(jnp.abs(dk - d[None]), -1), axis=1)
    return rate, sensitivity


def fingerprint_arrays(ref: Responses, sus: Responses, y: jax.Array) -> dict[str, jax.Array]:
    """The fingerprint of a suspect against a reference, probe by probe (module docstring).

    ref, sus: Responses of one system each; y: [P] the probes' labels. Returns scalars keyed
    by `FEATURES` and "transitions": [C, C] (reference class -> suspect class, shares of the
    probes). Traceable: jit it, vmap it over suspects (in_axes=(None, 0, None)).
    """
    p, c = ref.probs.shape
    n_patched = ref.patched.shape[1]
    pred_r, pred_s = jnp.argmax(ref.probs, -1), jnp.argmax(sus.probs, -1)
    dr = ref.probs / jnp.sum(ref.probs, -1, keepdims=True)
    ds = sus.probs / jnp.sum(sus.probs, -1, keepdims=True)
    kl = jnp.sum(dr * (jnp.log(jnp.maximum(dr, _EPS)) - jnp.log(jnp.maximum(ds, _EPS))), -1)
    conf_r, conf_s = jnp.max(ref.probs, -1), jnp.max(sus.probs, -1)
    transitions = jnp.einsum("pi,pj->ij", jax.nn.one_hot(pred_r, c), jax.nn.one_hot(pred_s, c))
    transitions = transitions / p
    disagreement = jnp.mean(pred_r != pred_s)
    moved = jnp.max(jnp.sum(transitions * (1.0 - jnp.eye(c)), axis=0))
    rate_r, sens_r = _trigger_rates(ref, n_patched)
    rate_s, sens_s = _trigger_rates(sus, n_patched)
    return {
        "disagreement": disagreement,
        "kl": jnp.mean(kl),
        "ks": ks_statistic(conf_r, conf_s),
        "confidence_shift": jnp.mean(conf_s) - jnp.mean(conf_r),
        "accuracy_drop": jnp.mean(pred_r == y) - jnp.mean(pred_s == y),
        "flip_concentration": moved / jnp.maximum(disagreement, 1.0 / p),
        "trigger_flip": jnp.max(rate_s - rate_r),
        "patch_sensitivity": jnp.max(jnp.log((sens_s + _SENS_FLOOR) / (sens_r + _SENS_FLOOR))),
        "squeeze_gap": jnp.mean(sus.squeeze) - jnp.mean(ref.squeeze),
        "transitions": transitions,
    }


@jax.jit
def fingerprints(ref: Responses, sus: Responses, y: jax.Array) -> dict[str, jax.Array]:
    """`fingerprint_arrays` for many suspects: sus with a leading axis m -> values [m] (and
    transitions [m, C, C]). One jitted call."""
    return jax.vmap(fingerprint_arrays, in_axes=(None, 0, None))(ref, sus, y)


def feature_matrix(fp: dict[str, jax.Array], names: tuple[str, ...] = FEATURES) -> np.ndarray:
    """The scalar features of `fingerprints` as float64 [m, len(names)] (or [F] for one)."""
    return np.stack([np.asarray(fp[k], np.float64) for k in names], axis=-1)


def to_json(fp: dict[str, jax.Array]) -> dict:
    """One fingerprint as plain Python: floats and the transition matrix as lists."""
    out = {k: float(fp[k]) for k in FEATURES}
    out["transitions"] = np.round(np.asarray(fp["transitions"], np.float64), 6).tolist()
    return out


# --- null distribution, p-values -----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Null:
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
    """A change test. p_value: [m] the combined (max-statistic) p-values; statistic: [m] the
    largest pooled z; feature_p: [m, F] the per-feature empirical p-values (all features)."""

    p_value: np.ndarray
    statistic: np.ndarray
    feature_p: np.ndarray


def change_test(observed, null: Null, test_features: tuple[str, ...] = TEST_FEATURES
                ) -> TestResult:
    """Calibrated p-values of suspects' fingerprints against a null (module docstring).

    observed: float [m, F] or [F] (columns in `null.names` order). Each suspect is tested
    on its own: pool = the null's n fingerprints + its own; every feature of
    `test_features` standardized by the pool's mean and std; T = the largest z; p = (1 +
    #{null T >= suspect T}) / (1 + n).
    """
    obs = np.atleast_2d(np.asarray(observed, np.float64))
    if obs.shape[1] != len(null.names):
        raise ConfigError(f"change_test: expected {len(null.names)} features per suspect, "
                          f"found {obs.shape[1]}")
    unknown = sorted(set(test_features) - set(null.names))
    if unknown:
        raise ConfigError(f"change_test: unknown test features {unknown}")
    cols = [null.names.index(f) for f in test_features]
    n = null.size
    feature_p = (1.0 + (null.features[None, :, :] >= obs[:, None, :]).sum(1)) / (1.0 + n)
    pool = np.concatenate([np.broadcast_to(null.features[:, cols], (len(obs), n, len(cols))),
                           obs[:, None, cols]], axis=1)  # [m, n + 1, f]
    mean = pool.mean(axis=1, keepdims=True)
    std = pool.std(axis=1, keepdims=True)
    z = (pool - mean) / np.where(std > 0, std, 1.0)
    t = z.max(axis=2)  # [m, n + 1]
    stat = t[:, -1]
    p = (1.0 + (t[:, :-1] >= stat[:, None] - 1e-12).sum(1)) / (1.0 + n)
    return TestResult(p, stat, feature_p)


def changed_probability(p_value) -> np.ndarray:
    """P(changed | p) = 1 / (1 + B(p)), B(p) = -e p ln p for p < 1/e else 1 (Sellke, Bayarri &
    Berger 2001, even prior odds). p: [...] -> [...] in [0.5, 1)."""
    p = np.clip(np.asarray(p_value, np.float64), 1e-300, 1.0)
    b = np.where(p < np.exp(-1.0), -np.e * p * np.log(p), 1.0)
    return 1.0 / (1.0 + b)
