"""The categorizer: from a fingerprint, name the change.

Categories (`CATEGORIES`): none / input-noise / adversarial-input / wrong-label /
trigger-only / backdoor (trigger + relabel). An attack names its own (`Attack.category`);
`CATEGORY_OF` maps the other change kinds (clean, the poisoning names) onto them.

Inputs (`categorizer_inputs`): the fingerprint's scalar features (`fingerprint.FEATURES`) as
z-scores against the reference's own null distribution (clean retrains), so that features of
different references share one scale, then compressed by sign(z) * log(1 + |z|) (a change can
sit hundreds of null standard deviations out; the log keeps one feature from swamping the
rest).

Classifier: multinomial logistic regression with an L2 penalty, in JAX: inputs standardized
by the training cells' mean and standard deviation, classes weighted to equal total weight,
full-batch Adam on the mean cross-entropy for a fixed number of steps inside one `lax.scan`.
Transparent: `Categorizer.weights` [F, K] reads as "how much feature f pushes toward category
k", in training standard deviations. `cross_validate` holds out one *seed* at a time (every
cell generated with that seed: its reference, its retrains, its changed inputs), never single
rows, and trains all folds at once (`vmap` over folds, held-out rows weighted 0).

**Abstention and consistency** (`decide`). The categorizer answers only when it is sure
enough and never contradicts the change test: an "unchanged" verdict reports "none"; a
"changed" verdict reports `UNCERTAIN` ("changed, kind uncertain") when "none" is the most
probable category (it never names a poisoning that it finds less probable than no change)
or when the largest probability is below `Categorizer.threshold`; otherwise the most
probable category. The threshold is chosen on held-out data, as in selective
classification (Chow, "On Optimum Recognition Error and Reject Tradeoff", IEEE Trans. Inf.
Theory 16(1), 1970; Geifman & El-Yaniv, "Selective Classification for Deep Neural
Networks", NeurIPS 2017): `fit(..., groups=...)` predicts every training row with a
categorizer fitted without its group (leave-one-group-out, all folds in one jit) and takes
the smallest threshold at which at most `risk` (default `RISK`, 10%) of the held-out rows it
names are named wrong (`select_threshold`). Held out by *group*, those rows stand for changes
of a kind the categorizer did not see, so the threshold is set for such changes.

**Leave-one-family-out** (`leave_one_family_out`): for each group of changes (a change
family, or every family of one trigger shape; see `change_generator`), a categorizer is
trained without it, its threshold chosen by an inner leave-one-group-out over the remaining
groups, and the held-out group's cells decided with their verdicts. It learns from the
benign cells and the changes the test flagged (`usable_rows`): it is only asked about
flagged changes, and a missed one looks like no change. `lofo_table`: rows the held-out
family, columns the decisions (the categories and "uncertain").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from mlshift_jax.attacks import ATTACKS
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.detection.fingerprint import FEATURES, FeatureNull

CATEGORIES = ("none", "input-noise", "adversarial-input", "wrong-label", "trigger-only",
              "backdoor")
UNCERTAIN = "uncertain"  # "changed, kind uncertain": the categorizer abstains
DECISIONS = (*CATEGORIES, UNCERTAIN)
RISK = 0.1  # the held-out error rate of named categories that sets the threshold
CATEGORY_OF = {  # the change kinds that are not attacks (an Attack carries its category)
    "clean": "none",
    "wrong-label": "wrong-label", "trigger": "trigger-only", "mixture": "backdoor",
    "blended": "backdoor", "sparse": "backdoor", "sig": "backdoor", "warp": "backdoor",
}
L2 = 1e-2
STEPS = 600
LEARNING_RATE = 0.05


def category_of(kind: str) -> str:
    """The category of a change kind: an attack's `Attack.category`, or `CATEGORY_OF`'s for
    clean and the poisoning names. ConfigError naming the known kinds otherwise."""
    if isinstance(kind, str) and kind in ATTACKS:
        return ATTACKS[kind].category
    try:
        return CATEGORY_OF[kind]
    except (KeyError, TypeError):
        kinds = sorted({*ATTACKS, *CATEGORY_OF})
        raise ConfigError(f"categorize: expected a change kind among {kinds}, "
                          f"found {kind!r}") from None


def categorizer_inputs(features, null: FeatureNull) -> np.ndarray:
    """sign(z) log(1 + |z|) of the null z-scores. features: [m, F] in `null.names` order."""
    z = null.zscores(features)
    return np.sign(z) * np.log1p(np.abs(z))


# --- multinomial logistic regression -------------------------------------------------------------


def _fit(x: jax.Array, onehot: jax.Array, w: jax.Array, l2: float, steps: int):
    """Weighted multinomial logistic regression. x: [n, F], onehot: [n, K], w: [n] >= 0.

    Returns (weights [F, K], bias [K], center [F], scale [F]); traceable (vmap over folds).
    """
    wsum = jnp.maximum(jnp.sum(w), 1e-12)
    center = (w @ x) / wsum
    scale = jnp.sqrt((w @ (x - center) ** 2) / wsum)
    scale = jnp.where(scale > 1e-9, scale, 1.0)
    xs = (x - center) / scale
    per_class = onehot.T @ w  # [K] total weight per class
    cw = jnp.where(per_class > 0, 1.0 / jnp.maximum(per_class, 1e-12), 0.0)
    sw = w * (onehot @ cw)  # each present class gets equal total weight
    sw = sw / jnp.maximum(jnp.sum(sw), 1e-12)
    f, k = x.shape[1], onehot.shape[1]

    def loss(theta):
        logits = xs @ theta["w"] + theta["b"]
        ce = -jnp.sum(onehot * jax.nn.log_softmax(logits), axis=1)
        return jnp.sum(sw * ce) + l2 * jnp.sum(theta["w"] ** 2)

    opt = optax.adam(LEARNING_RATE)
    theta = {"w": jnp.zeros((f, k), x.dtype), "b": jnp.zeros((k,), x.dtype)}

    def step(carry, _):
        theta, state = carry
        grads = jax.grad(loss)(theta)
        updates, state = opt.update(grads, state, theta)
        return (optax.apply_updates(theta, updates), state), None

    (theta, _), _ = jax.lax.scan(step, (theta, opt.init(theta)), None, length=steps)
    return theta["w"], theta["b"], center, scale


@functools.partial(jax.jit, static_argnames=("steps",))
def _fit_folds(x, onehot, weights, l2, *, steps: int):
    """`_fit` for every row of weights: [n_folds, n] -> stacked results."""
    return jax.vmap(lambda w: _fit(x, onehot, w, l2, steps))(weights)


@dataclass(frozen=True, eq=False)
class Categorizer:
    """A fitted categorizer. weights: [F, K]; bias: [K]; center, scale: [F] the training
    inputs' standardization; features: the F input names; categories: the K class names;
    threshold: the smallest largest-probability at which it names a category (below it,
    `decide` abstains; 0: never abstains, > 1: always)."""

    weights: np.ndarray = field(repr=False)
    bias: np.ndarray = field(repr=False)
    center: np.ndarray = field(repr=False)
    scale: np.ndarray = field(repr=False)
    features: tuple[str, ...] = FEATURES
    categories: tuple[str, ...] = CATEGORIES
    threshold: float = 0.0

    def predict_proba(self, inputs) -> np.ndarray:
        """Category probabilities: inputs [m, F] (`categorizer_inputs`) -> [m, K]."""
        z = (np.asarray(inputs, np.float64) - self.center) / self.scale
        logits = z @ self.weights + self.bias
        logits -= logits.max(axis=-1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=-1, keepdims=True)

    def predict(self, inputs, verdicts=None) -> list[str]:
        """The decision for each row of inputs [m, F] (`decide` with this threshold): a
        category or UNCERTAIN. verdicts: [m] "changed" / "unchanged" / None (no test)."""
        return decide(self.predict_proba(inputs), verdicts, threshold=self.threshold,
                      categories=self.categories)

    def table(self) -> pd.DataFrame:
        """The weights as a DataFrame: features x categories (plus the bias row)."""
        rows = np.vstack([self.weights, self.bias[None]])
        return pd.DataFrame(rows, index=[*self.features, "(bias)"], columns=self.categories)


def decide(proba, verdicts=None, *, threshold: float = 0.0,
           categories: tuple[str, ...] = CATEGORIES) -> list[str]:
    """Decisions consistent with the verdicts (module docstring). proba: [m, K] category
    probabilities; verdicts: [m] of "changed" / "unchanged" / None (None, or a single None:
    no change test, so "none" may be named). Per row: "unchanged" -> "none"; otherwise the
    most probable category, except UNCERTAIN when the verdict is "changed" and "none" is the
    most probable, or when the largest probability < threshold. ConfigError for a verdict
    that is none of these."""
    proba = np.atleast_2d(np.asarray(proba, np.float64))
    if proba.shape[1] != len(categories):
        raise ConfigError(f"categorize: expected probabilities [m, {len(categories)}], found "
                          f"{proba.shape}")
    verdicts = [None] * len(proba) if verdicts is None else list(verdicts)
    if len(verdicts) != len(proba):
        raise ConfigError(f"categorize: expected one verdict per row ({len(proba)}), found "
                          f"{len(verdicts)}")
    out = []
    for p, v in zip(proba, verdicts, strict=True):
        if v not in (None, "changed", "unchanged"):
            raise ConfigError(f"categorize: expected verdicts 'changed', 'unchanged' or None, "
                              f"found {v!r}")
        best = categories[int(np.argmax(p))]
        if v == "unchanged":
            out.append("none")
        elif (v == "changed" and best == "none") or float(np.max(p)) < threshold:
            out.append(UNCERTAIN)
        else:
            out.append(best)
    return out


def select_threshold(proba, true, verdicts=None, *, risk: float = RISK,
                     categories: tuple[str, ...] = CATEGORIES) -> float:
    """The smallest threshold t such that, of the held-out rows `decide` names a category at
    t, at most `risk` are named wrong (selective classification; module docstring).

    proba: [m, K] held-out probabilities; true: [m] the true categories; verdicts: as in
    `decide`. Candidates: 0 and every row's largest probability; when none meets the risk,
    returns a value above 1 (always abstain). Rows with an "unchanged" verdict are decided
    "none" whatever t is, and count neither way.
    """
    if not 0.0 <= risk < 1.0:
        raise ConfigError(f"categorize: expected a risk in [0, 1), found {risk!r}")
    proba = np.atleast_2d(np.asarray(proba, np.float64))
    base = decide(proba, verdicts, threshold=0.0, categories=categories)
    verdicts = [None] * len(proba) if verdicts is None else list(verdicts)
    answered = np.array([d != UNCERTAIN and v != "unchanged"
                         for d, v in zip(base, verdicts, strict=True)], bool)
    wrong = np.array([d != t for d, t in zip(base, true, strict=True)], bool)
    top = proba.max(axis=1)
    for t in np.unique(np.r_[0.0, top[answered]]):
        named = answered & (top >= t)
        if not named.any() or wrong[named].mean() <= risk:
            return float(t)
    return float(np.nextafter(1.0, 2.0))


def _encode(labels, categories: tuple[str, ...]) -> np.ndarray:
    unknown = sorted(set(labels) - set(categories))
    if unknown:
        raise ConfigError(f"categorize: expected labels among {categories}, found {unknown}")
    return np.eye(len(categories))[[categories.index(c) for c in labels]]


def fit(inputs, labels, *, categories: tuple[str, ...] = CATEGORIES,
        features: tuple[str, ...] = FEATURES, l2: float = L2, steps: int = STEPS,
        groups=None, verdicts=None, risk: float = RISK) -> Categorizer:
    """Fit the categorizer on inputs [n, F] (`categorizer_inputs`) and labels ([n] names).

    groups: [n] (optional) the group of each row; given, the abstention threshold is chosen
    on leave-one-group-out predictions (`select_threshold` at `risk`, with `verdicts` [n] as
    in `decide`); without, the threshold is 0 (never abstains on its own). All fits in one
    jit. ConfigError for a bad shape, an unknown label, or fewer than 2 groups."""
    x = np.asarray(inputs, np.float32)
    if x.ndim != 2 or x.shape[1] != len(features) or len(x) != len(labels):
        raise ConfigError(f"categorize: expected inputs [n, {len(features)}] with n labels, "
                          f"found {x.shape} and {len(labels)} labels")
    onehot = _encode(labels, categories)
    weights = np.ones((1, len(x)), np.float32)
    folds = None
    if groups is not None:
        groups = np.asarray(groups)
        folds = np.unique(groups)
        if len(groups) != len(x) or len(folds) < 2:
            raise ConfigError(f"categorize: expected a group per row and at least 2 groups, "
                              f"found {len(groups)} groups for {len(x)} rows "
                              f"({len(folds)} distinct)")
        weights = np.vstack([weights, (groups[None, :] != folds[:, None]).astype(np.float32)])
    w, b, c, s = (np.asarray(a, np.float64) for a in _fit_folds(
        x, onehot.astype(np.float32), weights, l2, steps=steps))
    threshold = 0.0
    if folds is not None:
        proba = np.empty((len(x), len(categories)))
        for i, g in enumerate(folds):
            rows = groups == g
            proba[rows] = Categorizer(w[i + 1], b[i + 1], c[i + 1], s[i + 1],
                                      categories=categories).predict_proba(x[rows])
        threshold = select_threshold(proba, list(labels), verdicts, risk=risk,
                                     categories=categories)
    return Categorizer(w[0], b[0], c[0], s[0], features=features, categories=categories,
                       threshold=threshold)


def cross_validate(inputs, labels, groups, *, categories: tuple[str, ...] = CATEGORIES,
                   l2: float = L2, steps: int = STEPS) -> np.ndarray:
    """Leave-one-group-out predictions: every row predicted by a categorizer that never saw
    its group (its seed). inputs: [n, F]; labels, groups: [n]. All folds in one jit.
    Returns the predicted category names, [n]."""
    x = np.asarray(inputs, np.float32)
    groups = np.asarray(groups)
    folds = np.unique(groups)
    if len(folds) < 2:
        raise ConfigError(f"categorize: expected at least 2 groups to hold out, found "
                          f"{len(folds)}")
    onehot = _encode(labels, categories)
    weights = (groups[None, :] != folds[:, None]).astype(np.float32)  # [folds, n]
    w, b, c, s = (np.asarray(a, np.float64) for a in _fit_folds(
        x, onehot.astype(np.float32), weights, l2, steps=steps))
    out = np.empty(len(x), dtype=object)
    for i, g in enumerate(folds):
        rows = groups == g
        model = Categorizer(w[i], b[i], c[i], s[i], categories=categories)
        out[rows] = model.predict(x[rows])
    return out


def leave_one_family_out(inputs, true, groups, verdicts=None, *,
                         categories: tuple[str, ...] = CATEGORIES, risk: float = RISK,
                         l2: float = L2, steps: int = STEPS,
                         train_rows=None) -> tuple[np.ndarray, np.ndarray]:
    """Decisions for rows of groups never seen in training (module docstring).

    inputs: [n, F]; true: [n] categories; groups: [n] the held-out unit of each row;
    verdicts: [n] "changed" / "unchanged" / None. For each group g: a categorizer fitted on
    the other groups, its threshold chosen by leave-one-group-out among them (at `risk`),
    decides g's rows. All G + G (G - 1) fits in one jit. train_rows: bool [n], the rows
    the categorizer may learn from (default all; `usable_rows` leaves out the changes the
    test missed); every row is decided when its group is held out. Returns (decisions [n],
    the threshold used for each row [n]). ConfigError for fewer than 3 groups.
    """
    x = np.asarray(inputs, np.float32)
    groups = np.asarray(groups)
    true = list(true)
    verdicts = [None] * len(x) if verdicts is None else list(verdicts)
    folds = list(np.unique(groups))
    if len(folds) < 3 or len(groups) != len(x) or len(true) != len(x):
        raise ConfigError(f"categorize: expected a group and category per row and at least 3 "
                          f"groups, found {len(folds)} groups, {len(groups)} groups and "
                          f"{len(true)} categories for {len(x)} rows")
    onehot = _encode(true, categories)
    pairs = [(g, None) for g in folds] + [(g, h) for g in folds for h in folds if h != g]
    usable = np.ones(len(x), bool) if train_rows is None else np.asarray(train_rows, bool)
    if usable.shape != (len(x),):
        raise ConfigError(f"categorize: expected train_rows bool [{len(x)}], found "
                          f"{usable.shape}")
    weights = np.stack([((groups != g) & (groups != h) if h is not None else groups != g)
                        & usable for g, h in pairs]).astype(np.float32)
    w, b, c, s = (np.asarray(a, np.float64) for a in _fit_folds(
        x, onehot.astype(np.float32), weights, l2, steps=steps))
    model = {p: Categorizer(w[i], b[i], c[i], s[i], categories=categories)
             for i, p in enumerate(pairs)}
    decisions = np.empty(len(x), dtype=object)
    thresholds = np.empty(len(x))
    for g in folds:
        train = groups != g
        proba = np.empty((len(x), len(categories)))
        for h in folds:
            if h != g:
                proba[groups == h] = model[(g, h)].predict_proba(x[groups == h])
        idx = np.flatnonzero(train)
        t = select_threshold(proba[idx], [true[i] for i in idx], [verdicts[i] for i in idx],
                             risk=risk, categories=categories)
        rows = np.flatnonzero(groups == g)
        decisions[rows] = decide(model[(g, None)].predict_proba(x[rows]),
                                 [verdicts[i] for i in rows], threshold=t,
                                 categories=categories)
        thresholds[rows] = t
    return decisions, thresholds


def usable_rows(true, verdicts) -> np.ndarray:
    """bool [n]: the rows a categorizer learns from: every benign ("none") row, and the
    changes the test flagged. A change the test missed looks like no change, and the
    categorizer is only asked about flagged ones: learning from it would teach that
    unchanged-looking fingerprints are poisonings."""
    return np.array([t == "none" or v != "unchanged" for t, v in zip(true, verdicts,
                                                                      strict=True)], bool)


def lofo_table(cells: pd.DataFrame, decisions) -> pd.DataFrame:
    """The leave-one-family-out confusion table. cells: one row per change with columns
    family, category, verdict (`change_generator.realise`); decisions: [n] from
    `leave_one_family_out`. Rows: families (in order of first appearance); columns: the
    family's category, n, detected (share of "changed" verdicts), the count of each
    decision (CATEGORIES and "uncertain"), and right (share decided as its category; an
    unchanged benign change decided "none" is right)."""
    t = pd.DataFrame({"family": cells["family"].to_numpy(),
                      "category": cells["category"].to_numpy(),
                      "detected": (cells["verdict"] == "changed").to_numpy(),
                      "decision": list(decisions)})
    rows = []
    for fam, g in t.groupby("family", sort=False):
        counts = g["decision"].value_counts()
        row = {"family": fam, "category": g["category"].iloc[0], "n": len(g),
               "detected": float(g["detected"].mean())}
        row.update({d: int(counts.get(d, 0)) for d in DECISIONS})
        row["right"] = float(np.mean(g["decision"] == g["category"]))
        rows.append(row)
    return pd.DataFrame(rows).set_index("family")


def confusion_table(true, predicted, categories: tuple[str, ...] = CATEGORIES) -> pd.DataFrame:
    """Counts of (true category, predicted category): rows true, columns predicted."""
    cm = pd.crosstab(pd.Categorical(list(true), categories=categories),
                     pd.Categorical(list(predicted), categories=categories), dropna=False)
    cm.index.name, cm.columns.name = "true", "predicted"
    return cm.astype(int)
