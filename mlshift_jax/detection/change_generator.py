"""A generator of diverse model changes, for training and testing the categorizer on changes it
never saw.

The harness's own change kinds (one corner patch, three wrong-label modes, a few attacks) are
too few to teach a categorizer what a *backdoor* is rather than what *that* backdoor looks
like; a categorizer trained on them alone named unseen backdoors "trigger-only" or "none".
This module draws changes from many **families**, each with random settings, and realises
them into trained models (or changed input channels) against a set of references, so that
`categorize.leave_one_family_out` can train without a family and test on it.

Families (`FAMILIES`), with the category each maps to and the **group** held out together
(every family of one trigger shape is one group, so "trained without sparse triggers" means
without any of them):

=================== ================== ============ ==========================================
family              category           group        what is drawn per change
=================== ================== ============ ==========================================
square              backdoor           square       a square of random side (2-6), position
                                                    and value (upper half of the range),
                                                    fraction 0.5-20% (log-uniform), a
                                                    random target class
checkerboard        backdoor           checkerboard a checkerboard square (side 3-6) at a
                                                    random position; fraction, target as above
sparse              backdoor           sparse       8-40 random pixels set to random ends of
                                                    the range; fraction, target as above
blended             backdoor           blended      the image blended with a random pattern,
                                                    alpha 0.1-0.3 (Chen et al. 2017)
warp                backdoor           warp         WaNet (Nguyen & Tran 2021): a smooth
                                                    random warp, strength 0.5-1 pixel
per-class-square    trigger-only       square       labels kept; each class its own square
                                                    position (the study's "noisy" data),
                                                    fraction 50-100%
per-class-sparse    trigger-only       sparse       labels kept; each class its own random
                                                    pixel set, fraction 50-100%
uniform-labels      wrong-label        (own)        5-60% relabelled to a random other class
shift-labels        wrong-label        (own)        5-60% relabelled y -> y + 1 mod K
pair-flip           wrong-label        (own)        5-60% of one class relabelled to another
targeted-labels     wrong-label        (own)        5-60% of every other class relabelled to
                                                    one target class
sample              none               (own)        a clean retrain on another random sample
                                                    with another seed
order               none               (own)        the reference's sample and init, another
                                                    training order
epochs              none               (own)        the reference's recipe, sample and seed,
                                                    one more epoch
lr                  none               (own)        ... with the learning rate x0.5 or x2
prune               none               (own)        the reference with its 10-50% smallest
                                                    weights (each matrix) set to 0
quantize            none               (own)        the reference's weights through float16,
                                                    8 or 4 bits (per-tensor symmetric) and
                                                    back (`benign.transform`)
fine-tune           none               (own)        the reference trained one more epoch on
                                                    clean data at a tenth of its rate
distill             none               (own)        a fresh student trained on the
                                                    reference's labels (`benign.distill`)
noise-sign          input-noise        (own)        +-eps noise on the inputs, eps 0.05-0.3
noise-uniform       input-noise        (own)        uniform noise in [-eps, eps]
noise-gauss         input-noise        (own)        Gaussian noise of std eps
fgsm                adversarial-input  (own)        FGSM (Goodfellow et al. 2015), eps
                                                    0.03-0.2, against the reference
pgd                 adversarial-input  (own)        PGD (Madry et al. 2018), eps 0.03-0.2
=================== ================== ============ ==========================================

`generate(n_refs, per_family, spec, seed)` draws the change specifications (`Change`):
plain, seeded, and the same for the same arguments. `realise(changes, ds, ...)` trains the
references, a null pool of benign models (`benign.benign_null`: retrains, pruning,
quantization, fine-tuning and distillation in turn, as `detect`'s calibration) and every
changed model as populations (one
jit per training plan: the base plan, and one per other learning rate or epoch count), each
member on its own random sample, poisoned inside the jit by its own trigger arrays
(`triggers` masks and patterns, one per class) and label rule (`poison.poison_arrays`,
whose stamp carries a warp); trains the fine-tuned and distilled models on from the
references (`benign.SECOND_STAGE`); applies weight and input changes to the references;
and returns each change's fingerprint
against its reference, its categorizer inputs, and its change-test p-value.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from mlshift_jax.attacks.evasion import attack_key
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.data.datasets import Dataset, subsample
from mlshift_jax.data.spec import Spec, check_spec
from mlshift_jax.detection import benign, categorize, fingerprint
from mlshift_jax.detection.change import changed_inputs
from mlshift_jax.models.population import (
    Plan,
    fit_group,
    init_members,
    map_chunks,
    plan_for,
    poison_key,
)
from mlshift_jax.models.recipes import TrainConfig
from mlshift_jax.poisoning import triggers
from mlshift_jax.poisoning.poison import (
    KEEP,
    SHIFT,
    TO_TARGET,
    UNIFORM,
    PoisonArrays,
    poison_arrays,
    stamp_of,
)


class Family(NamedTuple):
    """A family of changes: its name, the category it maps to, the group held out with it,
    and how it is realised: "poison" (trained on poisoned data), "train" (trained otherwise),
    "weights" (the reference's weights changed), "tune" (trained on from the reference:
    `benign.SECOND_STAGE`) or "input" (the reference behind a changed input channel).
    stamp: its trigger goes through the label rule's `poison.Stamp` (a warp), so its members
    train in a vmap of their own (a stamp changes the poisoning's pytree)."""

    name: str
    category: str
    group: str
    realised_by: str
    stamp: bool = False


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("square", "backdoor", "square", "poison"),
    Family("checkerboard", "backdoor", "checkerboard", "poison"),
    Family("sparse", "backdoor", "sparse", "poison"),
    Family("blended", "backdoor", "blended", "poison"),
    Family("warp", "backdoor", "warp", "poison", stamp=True),
    Family("per-class-square", "trigger-only", "square", "poison"),
    Family("per-class-sparse", "trigger-only", "sparse", "poison"),
    Family("uniform-labels", "wrong-label", "uniform-labels", "poison"),
    Family("shift-labels", "wrong-label", "shift-labels", "poison"),
    Family("pair-flip", "wrong-label", "pair-flip", "poison"),
    Family("targeted-labels", "wrong-label", "targeted-labels", "poison"),
    Family("sample", "none", "sample", "train"),
    Family("order", "none", "order", "train"),
    Family("epochs", "none", "epochs", "train"),
    Family("lr", "none", "lr", "train"),
    Family("prune", "none", "prune", "weights"),
    Family("quantize", "none", "quantize", "weights"),
    Family("fine-tune", "none", "fine-tune", "tune"),
    Family("distill", "none", "distill", "tune"),
    Family("noise-sign", "input-noise", "noise-sign", "input"),
    Family("noise-uniform", "input-noise", "noise-uniform", "input"),
    Family("noise-gauss", "input-noise", "noise-gauss", "input"),
    Family("fgsm", "adversarial-input", "fgsm", "input"),
    Family("pgd", "adversarial-input", "pgd", "input"),
)}
GROUPS = tuple(dict.fromkeys(f.group for f in FAMILIES.values()))
POISON_RATES = (0.005, 0.2)  # a backdoor's share of its eligible samples, drawn log-uniform
FLIP_RATES = (0.05, 0.6)  # a label flip's share of its eligible samples, drawn uniform
WARP_GRID = 4  # WaNet's control grid (Nguyen & Tran 2021: k = 4)
QUANTIZE = {"float16": "float16", "int8": "quant-8", "int4": "quant-4"}  # -> benign.TRANSFORMS
_STREAM = 0xC4A6  # the generator's draws: np.random.default_rng([seed, _STREAM, ...])
MEMBER_STREAM = 0x5EED0000  # trained members' seeds start here (+ seed * 100,000)


@dataclass(frozen=True)
class Change:
    """One change to realise. family: a key of FAMILIES; ref: the index of the reference it
    changes; index: its number within (family, ref); settings: its drawn parameters as
    ((name, value), ...) (plain numbers, a text, or a tuple of ints); seed: its own seed (its
    trigger pattern, its member's training draws)."""

    family: str
    ref: int
    index: int
    settings: tuple = ()
    seed: int = 0

    @property
    def category(self) -> str:
        """The category the change maps to (`categorize.CATEGORIES`)."""
        return FAMILIES[self.family].category

    @property
    def group(self) -> str:
        """The group held out with this change in leave-one-family-out."""
        return FAMILIES[self.family].group

    def get(self, name: str):
        """The value of setting `name`."""
        return dict(self.settings)[name]

    def describe(self) -> str:
        """The settings as one short text: "size=3 position=(4, 17) ...".
        """
        return " ".join(f"{k}={_fmt(v)}" for k, v in self.settings)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _check_families(families) -> tuple[str, ...]:
    families = tuple(FAMILIES) if families is None else tuple(families)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or not families:
        raise ConfigError(f"change generator: expected families among {list(FAMILIES)}, "
                          f"found {unknown or 'none'}")
    return families


def _draw(family: str, rng: np.random.Generator, spec: Spec) -> tuple:
    """The random settings of one change of `family` on data of `spec`."""
    h, w, _ = spec.input_shape
    k = spec.n_classes
    lo, hi = spec.input_range

    def place(size):
        return (int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1)))

    def fraction(a, b):
        return round(float(rng.uniform(a, b)), 3)

    def rate():  # a backdoor's poison rate: log-uniform over POISON_RATES
        a, b = np.log(POISON_RATES)
        return round(float(np.exp(rng.uniform(a, b))), 4)

    if family == "square":
        size = int(rng.integers(2, min(6, h, w) + 1))
        return (("size", size), ("position", place(size)),
                ("value", round(float(rng.uniform(lo + 0.5 * (hi - lo), hi)), 3)),
                ("fraction", rate()), ("target", int(rng.integers(k))))
    if family == "checkerboard":
        size = int(rng.integers(min(3, h, w), min(6, h, w) + 1))
        return (("size", size), ("position", place(size)), ("fraction", rate()),
                ("target", int(rng.integers(k))))
    if family == "sparse":
        return (("pixels", int(rng.integers(8, min(40, h * w) + 1))),
                ("fraction", rate()), ("target", int(rng.integers(k))))
    if family == "blended":
        return (("alpha", round(float(rng.uniform(0.1, 0.3)), 3)),
                ("fraction", rate()), ("target", int(rng.integers(k))))
    if family == "warp":
        return (("strength", round(float(rng.uniform(0.5, 1.0)), 3)),
                ("fraction", rate()), ("target", int(rng.integers(k))))
    if family == "per-class-square":
        return (("size", int(rng.integers(2, min(5, h, w) + 1))),
                ("fraction", fraction(0.5, 1.0)))
    if family == "per-class-sparse":
        return (("pixels", int(rng.integers(8, min(30, h * w) + 1))),
                ("fraction", fraction(0.5, 1.0)))
    if family in ("uniform-labels", "shift-labels"):
        return (("fraction", fraction(*FLIP_RATES)),)
    if family == "pair-flip":
        source = int(rng.integers(k))
        target = int((source + rng.integers(1, k)) % k)
        return (("source", source), ("target", target), ("fraction", fraction(*FLIP_RATES)))
    if family == "targeted-labels":
        return (("target", int(rng.integers(k))), ("fraction", fraction(*FLIP_RATES)))
    if family in ("sample", "order", "epochs", "fine-tune", "distill"):
        return ()
    if family == "lr":
        return (("lr_factor", float(rng.choice([0.5, 2.0]))),)
    if family == "prune":
        return (("fraction", fraction(0.1, 0.5)),)
    if family == "quantize":
        return (("dtype", str(rng.choice(list(QUANTIZE)))),)
    if family.startswith("noise-"):
        return (("eps", round(float(rng.uniform(0.05, 0.3)), 3)),)
    return (("eps", round(float(rng.uniform(0.03, 0.2)), 3)),)  # fgsm, pgd


def generate(n_refs: int, per_family: int, spec, *, seed: int = 0,
             families=None) -> list[Change]:
    """Draw `per_family` changes of each family (default: all of FAMILIES) for each of
    `n_refs` references, on data of `spec` (a models.Spec or Dataset). Deterministic: the
    same arguments give the same list (each change's draws come from its own
    np.random.default_rng([seed, stream, family, ref, index])). ConfigError for n_refs or
    per_family < 1 or an unknown family."""
    if n_refs < 1 or per_family < 1:
        raise ConfigError(f"change generator: expected n_refs >= 1 and per_family >= 1, found "
                          f"{n_refs} and {per_family}")
    families = _check_families(families)
    spec = check_spec(spec)
    names = list(FAMILIES)
    out = []
    for r in range(n_refs):
        for f in families:
            for i in range(per_family):
                rng = np.random.default_rng([seed, _STREAM, names.index(f), r, i])
                settings = _draw(f, rng, spec)
                out.append(Change(f, r, i, settings, int(rng.integers(2**31))))
    return out


# --- poisoned data: trigger arrays per class and a label rule -------------------------------------


class MemberPoison(NamedTuple):
    """One member's poisoning: `labels` (a poison.PoisonArrays with no patch: which samples,
    how relabelled) and the trigger stamped on the selected samples, per true class: mask,
    pattern: float32 [K, D] (x' = clip((1 - mask) x + mask pattern, lo, hi); mask 0: none)."""

    labels: PoisonArrays
    mask: np.ndarray
    pattern: np.ndarray


def _rule(count: int, eligible: np.ndarray, relabel: int, target: int, k: int,
          d: int) -> PoisonArrays:
    return PoisonArrays(np.int32(count), eligible, np.int32(relabel), np.int32(target),
                        np.zeros((k, d), bool), np.float32(0.0))


def member_poison(change: Change | None, y, spec) -> MemberPoison:
    """The poisoning of a trained member of `change` (None or a "train" family: none) for
    its training labels y: [n] on data of `spec`."""
    spec = check_spec(spec)
    k, d = spec.n_classes, spec.n_inputs
    y = np.asarray(y)
    zero = np.zeros((k, d), np.float32)
    if change is None or FAMILIES[change.family].realised_by != "poison":
        return MemberPoison(_rule(0, np.zeros(k, bool), KEEP, 0, k, d), zero, zero.copy())
    f, frac = change.family, float(change.get("fraction"))
    rng = np.random.default_rng([change.seed, _STREAM])
    shape, rng_range = spec.input_shape, spec.input_range
    everyone = np.ones(k, bool)

    def count(eligible):
        return int(round(frac * int(eligible[y].sum())))

    if f in ("uniform-labels", "shift-labels"):
        return MemberPoison(_rule(count(everyone), everyone,
                                  UNIFORM if f == "uniform-labels" else SHIFT, 0, k, d),
                            zero, zero.copy())
    if f == "pair-flip":
        eligible = np.zeros(k, bool)
        eligible[change.get("source")] = True
        return MemberPoison(_rule(count(eligible), eligible, TO_TARGET, change.get("target"),
                                  k, d), zero, zero.copy())
    if f == "targeted-labels":
        eligible = everyone.copy()
        eligible[change.get("target")] = False
        return MemberPoison(_rule(count(eligible), eligible, TO_TARGET, change.get("target"),
                                  k, d), zero, zero.copy())
    if f.startswith("per-class-"):
        trigs = []
        for _ in range(k):
            if f == "per-class-square":
                size = change.get("size")
                pos = (int(rng.integers(0, shape[0] - size + 1)),
                       int(rng.integers(0, shape[1] - size + 1)))
                trigs.append(triggers.patch(shape, rng_range, size=size, position=pos))
            else:
                trigs.append(triggers.sparse(shape, rng_range, pixels=change.get("pixels"),
                                             seed=int(rng.integers(2**31))))
        mask = np.stack([t.mask.reshape(-1) for t in trigs])
        pattern = np.stack([t.pattern.reshape(-1) for t in trigs])
        return MemberPoison(_rule(count(everyone), everyone, KEEP, 0, k, d), mask, pattern)
    target = change.get("target")
    if f == "square":
        t = triggers.patch(shape, rng_range, size=change.get("size"),
                           position=change.get("position"), value=change.get("value"))
    elif f == "checkerboard":
        t = triggers.checkerboard(shape, rng_range, size=change.get("size"),
                                  position=change.get("position"))
    elif f == "sparse":
        t = triggers.sparse(shape, rng_range, pixels=change.get("pixels"),
                            seed=int(rng.integers(2**31)))
    elif f == "warp":  # the warp goes through the label rule's stamp (poison.poison_arrays)
        t = triggers.warp(shape, rng_range, strength=change.get("strength"), grid=WARP_GRID,
                          seed=int(rng.integers(2**31)))
        eligible = everyone.copy()
        eligible[target] = False
        rule = _rule(count(eligible), eligible, TO_TARGET, target, k, d)
        return MemberPoison(rule._replace(trigger=stamp_of(t, spec)), zero, zero.copy())
    else:
        t = triggers.blended(shape, rng_range, alpha=change.get("alpha"),
                             seed=int(rng.integers(2**31)))
    eligible = everyone.copy()
    eligible[target] = False
    mask = np.broadcast_to(t.mask.reshape(1, -1), (k, d)).astype(np.float32)
    pattern = np.broadcast_to(t.pattern.reshape(1, -1), (k, d)).astype(np.float32)
    return MemberPoison(_rule(count(eligible), eligible, TO_TARGET, target, k, d), mask,
                        pattern)


def poison_member(key: jax.Array, x: jax.Array, y: jax.Array, p: MemberPoison, lo,
                  hi) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Poison one member's sample (x: [n, D], y: [n]) as p says -> (x', y', mask [n]).
    Traceable: vmap it over members."""
    x_out, y_out, mask = poison_arrays(key, x, y, p.labels)  # x_out: x, or x warped
    m, pat = p.mask[y], p.pattern[y]  # [n, D]: the trigger of each sample's true class
    stamped = jnp.clip((1.0 - m) * x_out + m * pat, lo, hi)
    return jnp.where(mask[:, None], stamped, x), y_out, mask


# --- weight changes ------------------------------------------------------------------------------


def weight_change(change: Change, params):
    """The reference's params changed as a "weights" family says: magnitude pruning or
    quantization, `detection.benign`'s transforms (the scan's benign null uses the same)."""
    if change.family == "prune":
        return benign.prune(params, float(change.get("fraction")))
    if change.family == "quantize":
        return benign.transform(params, QUANTIZE[change.get("dtype")])
    raise ConfigError(f"weight_change: expected a prune or quantize change, found "
                      f"{change.family!r}")


# --- realising: train, change, fingerprint ----------------------------------------------------


@dataclass(frozen=True)
class GeneratorConfig:
    """How `realise` builds its world: the recipe and width of every model; sample_size:
    training images per model; n_null: benign models in the null pool (shared by all
    references; `benign.benign_null`, the benign variants in turn, as `detect`'s null);
    probes / n_patched: of `fingerprint.make_probes`; alpha: the change test's level (the
    verdict); memory_cap: bytes for the training data of the members that train together
    (`member_chunk`)."""

    recipe: str = "seed-mlp"
    hidden: int = 200
    sample_size: int = 10_000
    n_null: int = 30
    probes: int = 1000
    n_patched: int = 200
    alpha: float = fingerprint.ALPHA
    memory_cap: int = 2**30


COPIES = 5  # [size, D] float32 arrays per member in the jit: sample, mask, pattern, stamped, out


def member_chunk(m: int, size: int, n: int, d: int, memory_cap: int) -> int:
    """Members per vmap so that the training data fits in memory_cap bytes: the shared set
    (n * d * 4 bytes) once, and COPIES [size, d] float32 arrays per member (its sample, its
    trigger's mask and pattern per sample, the stamped and the final copy). At least 1."""
    per_member = COPIES * size * d * 4
    return int(max(1, min(m, (memory_cap - n * d * 4) // per_member)))


class _Member(NamedTuple):
    role: str  # "reference" or "change"
    change: Change | None
    seed: int  # init / order / poison draws
    sample_seed: int  # the sample: subsample(sample_seed, n, size)
    reverse: bool  # train on the sample in another order (a permutation)
    lr_factor: float
    extra_epochs: int


def _members(changes: list[Change], n_refs: int, seed: int) -> list[_Member]:
    base = MEMBER_STREAM + seed * 100_000
    out = [_Member("reference", None, base + r, base + r, False, 1.0, 0) for r in range(n_refs)]
    for j, c in enumerate(changes):
        how = FAMILIES[c.family].realised_by
        ref_seed = base + c.ref
        own = base + 10_000 + j  # its own init, sample and poison draws
        if how == "poison" or c.family == "sample":
            out.append(_Member("change", c, own, own, False, 1.0, 0))
        elif c.family == "order":
            out.append(_Member("change", c, ref_seed, ref_seed, True, 1.0, 0))
        elif c.family == "epochs":
            out.append(_Member("change", c, ref_seed, ref_seed, False, 1.0, 1))
        elif c.family == "lr":
            out.append(_Member("change", c, ref_seed, ref_seed, False,
                               float(c.get("lr_factor")), 0))
    return out


def _train_group(plan: Plan, x: jax.Array, y: jax.Array, lo: float, hi: float, group: dict):
    xs, ys = x[group["idx"]], y[group["idx"]]
    xs, ys, masks = jax.vmap(partial(poison_member, lo=lo, hi=hi))(
        group["poison_key"], xs, ys, group["poison"])
    return fit_group(plan, group, xs, ys)


@partial(jax.jit, static_argnames=("plan", "chunk", "lo", "hi"))
def _train(members: dict, x: jax.Array, y: jax.Array, *, plan: Plan, chunk: int, lo: float,
           hi: float):
    return map_chunks(partial(_train_group, plan, x, y, lo, hi), members, chunk)


def _train_members(plan: Plan, members: list[_Member], x, y, size: int, spec: Spec,
                   memory_cap: int):
    """Train `members` (one plan) in one jit: params with leading axis len(members)."""
    n = len(y)
    y_host = np.asarray(y)
    idx = []
    for m in members:
        i = subsample(m.sample_seed, n, size)
        if m.reverse:  # the same images in another order: a seeded permutation
            i = i[np.random.default_rng([m.seed, _STREAM, 1]).permutation(size)]
        idx.append(i)
    idx = np.stack(idx)
    params, shuffle = init_members(plan, [m.seed for m in members], spec.n_inputs)
    if any(m.reverse for m in members) and plan.kind != "seed-sgd":
        # minibatch trainers shuffle by their key: another order is another shuffle key
        keys = [jax.random.fold_in(s, 1) if m.reverse else s
                for m, s in zip(members, shuffle, strict=True)]
        shuffle = jnp.stack(keys)
    poisons = [member_poison(m.change, y_host[i], spec) for m, i in
               zip(members, idx, strict=True)]
    stacked = jax.tree.map(lambda *a: jnp.asarray(np.stack(a)), *poisons)
    group = {"params": params, "shuffle_key": shuffle,
             "poison_key": jnp.stack([poison_key(m.seed) for m in members]),
             "poison": stacked, "idx": jnp.asarray(idx, jnp.int32)}
    chunk = member_chunk(len(members), size, n, spec.n_inputs, memory_cap)
    lo, hi = (float(v) for v in spec.input_range)
    return _train(group, jnp.asarray(x, jnp.float32), jnp.asarray(y_host, jnp.int32),
                  plan=plan, chunk=chunk, lo=lo, hi=hi)


def _tune(changes: list[Change], refs: list, plan: Plan, ds: Dataset, size: int, seed: int,
          memory_cap: int) -> dict:
    """The "tune" changes realised from their references, one population per kind (fine-tune,
    distill: `benign.SECOND_STAGE`): {id(change): params}."""
    out = {}
    for kind, stage in benign.SECOND_STAGE.items():
        mine = [(j, c) for j, c in enumerate(changes) if c.family == kind]
        if not mine:
            continue
        parents = jax.tree.map(lambda *a: jnp.stack(a), *[refs[c.ref] for _, c in mine])
        seeds = [MEMBER_STREAM + seed * 100_000 + 20_000 + j for j, _ in mine]
        chunk = member_chunk(len(mine), size, len(ds.y_train), ds.spec.n_inputs, memory_cap)
        params = stage(plan, parents, seeds, ds.x_train, ds.y_train, size=size, chunk=chunk)
        for k, (_, c) in enumerate(mine):
            out[id(c)] = jax.tree.map(lambda a, k=k: jnp.asarray(a[k]), params)
    return out


class Realised(NamedTuple):
    """What `realise` measured. cells: one row per change (family, category, group, ref,
    index, settings, p_value, statistic, verdict, and the fingerprint features by name);
    inputs: float64 [n, F] their categorizer inputs (`categorize.categorizer_inputs`
    against their reference's null); features: float64 [n, F] the raw fingerprints;
    timing: seconds per stage."""

    cells: pd.DataFrame
    inputs: np.ndarray
    features: np.ndarray
    timing: dict


def realise(changes: list[Change], ds: Dataset, config: GeneratorConfig | None = None, *,
            seed: int = 0) -> Realised:
    """Train the references, the null pool and every changed model; change weights and inputs;
    fingerprint every change against its reference (module docstring).

    changes: from `generate` (their `ref` in 0..n_refs-1, n_refs = 1 + the largest); ds: the
    data (training images for every model, test images for the probes); seed: of the
    members' draws and the input changes' randomness. Same arguments, same result.
    """
    cfg = config or GeneratorConfig()
    if not changes:
        raise ConfigError("realise: expected at least one change, found none")
    if cfg.n_null < 2:
        raise ConfigError(f"realise: expected n_null >= 2, found {cfg.n_null}")
    timing = {}
    clock = time.perf_counter()
    spec = check_spec(ds.spec)
    n_refs = 1 + max(c.ref for c in changes)
    size = min(cfg.sample_size, len(ds.y_train))
    base = plan_for(cfg.recipe, TrainConfig(hidden=cfg.hidden), spec)
    members = _members(changes, n_refs, seed)
    plans = {}
    for i, m in enumerate(members):
        stamp = m.change is not None and FAMILIES[m.change.family].stamp
        plans.setdefault((m.lr_factor, m.extra_epochs, stamp), []).append(i)
    trained = [None] * len(members)
    for (lr_factor, extra, _), rows in plans.items():
        plan = base._replace(lr=base.lr * lr_factor, epochs=base.epochs + extra)
        params = _train_members(plan, [members[i] for i in rows], ds.x_train, ds.y_train,
                                size, spec, cfg.memory_cap)
        for j, i in enumerate(rows):
            trained[i] = jax.tree.map(lambda a, j=j: a[j], params)
    refs = [trained[i] for i in range(len(members)) if members[i].role == "reference"]
    tuned = _tune(changes, refs, base, ds, size, seed, cfg.memory_cap)
    null_seeds = MEMBER_STREAM + seed * 100_000 + 1000 + np.arange(cfg.n_null)
    null_pool, _ = benign.benign_null(base, ds.x_train, ds.y_train, seeds=null_seeds.tolist(),
                                      size=size, chunk=benign.train_chunk(
                                          cfg.n_null, size, spec.n_inputs))
    jax.block_until_ready((trained, tuned, null_pool))
    timing["train"] = time.perf_counter() - clock

    clock = time.perf_counter()
    model = base.arch
    probes = fingerprint.make_probes(ds.x_test, ds.y_test, n=cfg.probes,
                                     n_patched=cfg.n_patched, seed=seed, spec=spec)

    def stack(trees):
        return jax.tree.map(lambda *a: jnp.stack(a), *trees)

    # every model's responses in one call: references, null pool, changed models
    model_changes = [c for c in changes if FAMILIES[c.family].realised_by != "input"]
    change_of = {id(m.change): i for i, m in enumerate(members) if m.role == "change"}
    pool = [jax.tree.map(lambda a, i=i: a[i], null_pool) for i in range(cfg.n_null)]
    systems = refs + pool + [
        weight_change(c, refs[c.ref]) if FAMILIES[c.family].realised_by == "weights"
        else tuned[id(c)] if id(c) in tuned else trained[change_of[id(c)]]
        for c in model_changes]
    resp = fingerprint.model_responses(model, stack(systems), probes)
    found = fingerprint.reverse(model, stack(systems), probes,  # every system's triggers
                                key=jax.random.fold_in(attack_key(seed), 10**6))
    null_resp = jax.tree.map(lambda a: a[n_refs:n_refs + cfg.n_null], resp)
    where = {id(c): n_refs + cfg.n_null + j for j, c in enumerate(model_changes)}
    key = attack_key(seed)
    rows, feats, inputs = [], [], []
    for r in range(n_refs):
        ref = jax.tree.map(lambda a, r=r: a[r], resp)
        ref_t = jax.tree.map(lambda a, r=r: a[r], found)
        null = fingerprint.FeatureNull(fingerprint.feature_matrix({
            **fingerprint.fingerprints(ref, null_resp, probes.y),
            **fingerprint.trigger_features(model, refs[r], ref_t, jax.tree.map(
                lambda a: a[n_refs:n_refs + cfg.n_null], found), probes)}))
        mine = [c for c in model_changes if c.ref == r]
        input_changes = [c for c in changes
                         if c.ref == r and FAMILIES[c.family].realised_by == "input"]
        parts, trig, order = [], [], []
        if mine:
            rows_m = np.array([where[id(c)] for c in mine])
            parts.append(jax.tree.map(lambda a, m=rows_m: a[m], resp))
            trig.append(fingerprint.trigger_features(
                model, refs[r], ref_t, jax.tree.map(lambda a, m=rows_m: a[m], found), probes))
            order += mine
        if input_changes:
            attacks = tuple((c.family, float(c.get("eps"))) for c in input_changes)
            xs = changed_inputs(model, refs[r], probes, attacks, jax.random.fold_in(key, r))
            parts.append(fingerprint.input_responses(model, refs[r], xs, probes))
            trig.append(fingerprint.input_trigger_features(model, refs[r], ref_t, xs, probes))
            order += input_changes
        if not order:
            continue
        sus = jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
        f = fingerprint.feature_matrix({**fingerprint.fingerprints(ref, sus, probes.y),
                                        **jax.tree.map(lambda *a: jnp.concatenate(a), *trig)})
        test = fingerprint.change_test(f, null)
        for j, c in enumerate(order):
            rows.append({"family": c.family, "category": c.category, "group": c.group,
                         "ref": c.ref, "index": c.index, "settings": c.describe(),
                         "p_value": float(test.p_value[j]),
                         "statistic": float(test.statistic[j]),
                         "verdict": "changed" if test.p_value[j] <= cfg.alpha
                         else "unchanged"})
        feats.append(f)
        inputs.append(categorize.categorizer_inputs(f, null))
    timing["fingerprints"] = time.perf_counter() - clock
    feats, inputs = np.concatenate(feats), np.concatenate(inputs)
    cells = pd.concat([pd.DataFrame(rows), pd.DataFrame(feats, columns=fingerprint.FEATURES)],
                      axis=1)
    timing["members"] = float(len(members))
    timing["plans"] = float(len(plans))
    return Realised(cells, inputs, feats, timing)


def lofo(ds: Dataset, *, n_refs: int, per_family: int,
         config: GeneratorConfig | None = None, seed: int = 0, families=None,
         risk: float = categorize.RISK) -> tuple[pd.DataFrame, Realised]:
    """The leave-one-family-out benchmark: `generate` per_family changes of every family for
    each of n_refs references, `realise` them on ds, and decide every change with a
    categorizer that never saw its group (`categorize.leave_one_family_out`, threshold at
    `risk`, trained on the benign changes and the flagged ones: `categorize.usable_rows`).
    Returns (`categorize.lofo_table`, the Realised cells with a "decision" and a "threshold"
    column added, and with n_refs >= 3 an "in_family" column: each change decided by a
    categorizer trained on every family but without the changes of its reference, its
    threshold chosen the same way over the other references)."""
    changes = generate(n_refs, per_family, ds.spec, seed=seed, families=families)
    r = realise(changes, ds, config, seed=seed)
    clock = time.perf_counter()
    usable = categorize.usable_rows(r.cells["category"], r.cells["verdict"])
    decisions, thresholds = categorize.leave_one_family_out(
        r.inputs, r.cells["category"], r.cells["group"], r.cells["verdict"], risk=risk,
        train_rows=usable)
    cells = r.cells.assign(decision=decisions, threshold=thresholds)
    if n_refs >= 3:  # every family known, the change's reference held out
        in_family, _ = categorize.leave_one_family_out(
            r.inputs, r.cells["category"], r.cells["ref"], r.cells["verdict"], risk=risk,
            train_rows=usable)
        cells = cells.assign(in_family=in_family)
    r.timing["categorizer"] = time.perf_counter() - clock
    return categorize.lofo_table(cells, decisions), r._replace(cells=cells)
