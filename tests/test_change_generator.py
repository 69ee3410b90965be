"""The change generator (diverse change families), the categorizer's abstention and
consistency rules, and leave-one-family-out: changes with triggers outside the categorizer's
training families are detected and then named right or abstained on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.data.spec import STUDY_SPEC
from mlshift_jax.detection import categorize
from mlshift_jax.detection import change_generator as cg
from mlshift_jax.detection.categorize import CATEGORIES, DECISIONS, UNCERTAIN
from mlshift_jax.poisoning.poison import PoisonArrays

POISONINGS = ("square", "checkerboard", "sparse", "blended", "warp")


# --- the generator -----------------------------------------------------------------------------


def test_generate_is_seeded_and_covers_every_family():
    a = cg.generate(3, 2, STUDY_SPEC, seed=5)
    assert a == cg.generate(3, 2, STUDY_SPEC, seed=5)
    assert a != cg.generate(3, 2, STUDY_SPEC, seed=6)
    assert len(a) == 3 * 2 * len(cg.FAMILIES)
    assert {c.family for c in a} == set(cg.FAMILIES)
    assert {c.category for c in a} == set(CATEGORIES)
    assert {c.ref for c in a} == {0, 1, 2}
    for c in a:
        if c.family in POISONINGS:
            assert 0.005 <= c.get("fraction") <= 0.2 and 0 <= c.get("target") < 10
        if c.category == "wrong-label":
            assert 0.05 <= c.get("fraction") <= 0.6
        if c.family in ("square", "checkerboard"):
            r, col = c.get("position")
            assert 0 <= r <= 28 - c.get("size") and 0 <= col <= 28 - c.get("size")
    squares = [c.settings for c in a if c.family == "square"]
    assert len(set(squares)) == len(squares)  # every square drawn anew
    sub = cg.generate(1, 1, STUDY_SPEC, families=["sparse", "fgsm"])
    assert [c.family for c in sub] == ["sparse", "fgsm"]
    assert sub[0] == cg.generate(1, 1, STUDY_SPEC)[list(cg.FAMILIES).index("sparse")]
    with pytest.raises(ConfigError, match="families"):
        cg.generate(1, 1, STUDY_SPEC, families=["earthquake"])
    with pytest.raises(ConfigError, match="n_refs"):
        cg.generate(0, 1, STUDY_SPEC)


def test_trigger_groups_hold_out_every_family_of_a_shape():
    assert cg.FAMILIES["per-class-sparse"].group == cg.FAMILIES["sparse"].group == "sparse"
    assert cg.FAMILIES["per-class-square"].group == "square"
    for f in cg.FAMILIES.values():
        assert f.category in CATEGORIES
        assert f.realised_by in ("poison", "train", "weights", "tune", "input")
        assert not f.stamp or f.realised_by == "poison"


def _poison(change, n=400, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.01, 0.5, (n, 784)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    p = cg.member_poison(change, y, STUDY_SPEC)
    p = jax.tree.map(jnp.asarray, p)
    xp, yp, mask = cg.poison_member(jax.random.key(seed), jnp.asarray(x), jnp.asarray(y), p,
                                    0.01, 1.0)
    return x, y, np.asarray(xp), np.asarray(yp), np.asarray(mask)


@pytest.mark.parametrize("family", POISONINGS)
def test_backdoor_families_stamp_one_trigger_and_relabel_to_the_target(family):
    change = cg.generate(1, 1, STUDY_SPEC, seed=1, families=[family])[0]
    x, y, xp, yp, mask = _poison(change)
    target = change.get("target")
    eligible = y != target
    assert mask.sum() == round(change.get("fraction") * eligible.sum())
    assert not mask[~eligible].any()
    assert np.all(yp[mask] == target) and np.array_equal(yp[~mask], y[~mask])
    np.testing.assert_array_equal(xp[~mask], x[~mask])
    assert np.all((xp >= 0.01) & (xp <= 1.0))
    diff = xp[mask] != x[mask]
    assert diff.any(axis=1).all()  # every poisoned image carries the trigger
    if family not in ("blended", "warp"):  # the same pixels on every image
        assert np.array_equal(diff.any(axis=0), diff.all(axis=0))


def test_per_class_triggers_keep_labels_and_differ_by_class():
    change = cg.Change("per-class-square", 0, 0, (("size", 3), ("fraction", 1.0)), seed=3)
    x, y, xp, yp, mask = _poison(change)
    assert mask.all() and np.array_equal(yp, y)
    where = [np.flatnonzero((xp != x)[np.flatnonzero(y == k)[0]]) for k in range(10)]
    assert len({tuple(w) for w in where}) > 1


def test_label_families():
    pair = cg.Change("pair-flip", 0, 0, (("source", 2), ("target", 7), ("fraction", 0.5)))
    x, y, xp, yp, mask = _poison(pair)
    assert np.all(y[mask] == 2) and np.all(yp[mask] == 7)
    assert mask.sum() == round(0.5 * (y == 2).sum())
    np.testing.assert_array_equal(xp, x)
    targeted = cg.Change("targeted-labels", 0, 0, (("target", 4), ("fraction", 0.25)))
    x, y, xp, yp, mask = _poison(targeted)
    assert np.all(y[mask] != 4) and np.all(yp[mask] == 4)
    assert mask.sum() == round(0.25 * (y != 4).sum())
    np.testing.assert_array_equal(xp, x)
    shift = cg.Change("shift-labels", 0, 0, (("fraction", 0.3),))
    _, y, _, yp, mask = _poison(shift)
    np.testing.assert_array_equal(yp[mask], (y[mask] + 1) % 10)
    clean = cg.member_poison(None, y, STUDY_SPEC)
    assert isinstance(clean.labels, PoisonArrays) and int(clean.labels.count) == 0


def test_weight_families_are_the_benign_transforms():
    from mlshift_jax.detection import benign

    params = {"w": jax.random.normal(jax.random.key(0), (50, 40)), "b": jnp.ones(40)}
    for change, same in (
            (cg.Change("prune", 0, 0, (("fraction", 0.3),)), benign.prune(params, 0.3)),
            (cg.Change("quantize", 0, 0, (("dtype", "int4"),)), benign.quantize(params, 4)),
            (cg.Change("quantize", 0, 0, (("dtype", "int8"),)), benign.quantize(params, 8)),
            (cg.Change("quantize", 0, 0, (("dtype", "float16"),)), benign.to_float16(params))):
        out = cg.weight_change(change, params)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(same), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ConfigError, match="prune or quantize"):
        cg.weight_change(cg.Change("sample", 0, 0), params)


# --- abstention and consistency ------------------------------------------------------------------


def test_decide_agrees_with_the_verdict_and_abstains():
    k = len(CATEGORIES)
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.full(k, 0.5), size=400)
    verdicts = rng.choice(["changed", "unchanged", None], size=400).tolist()
    for t in (0.0, 0.5, 0.9):
        out = categorize.decide(proba, verdicts, threshold=t)
        for p, v, d in zip(proba, verdicts, out, strict=True):
            assert d in DECISIONS
            best = CATEGORIES[int(np.argmax(p))]
            if v == "unchanged":
                assert d == "none"
            elif v == "changed":
                assert d != "none"  # a changed verdict never gets 'none'
                if best == "none":
                    assert d == UNCERTAIN  # ... nor a poisoning when 'none' is most probable
            if d not in ("none", UNCERTAIN):
                assert d == best and p.max() >= t
            if v != "unchanged" and p.max() < t:
                assert d == UNCERTAIN
    with pytest.raises(ConfigError, match="verdicts"):
        categorize.decide(proba[:1], ["maybe"])


def test_select_threshold_meets_the_risk_on_held_out_rows():
    rng = np.random.default_rng(1)
    n, k = 300, len(CATEGORIES)
    true = rng.integers(1, k, n)
    sure = rng.uniform(0.2, 1.0, n)
    right = rng.uniform(size=n) < sure  # the surer, the more often right
    guess = np.where(right, true, (true % (k - 1)) + 1)
    proba = np.full((n, k), 0.0)
    proba[np.arange(n), guess] = sure
    proba += (1 - proba.sum(1, keepdims=True)) / k
    labels = [CATEGORIES[i] for i in true]
    for risk in (0.05, 0.2):
        t = categorize.select_threshold(proba, labels, ["changed"] * n, risk=risk)
        named = proba.max(1) >= t
        assert named.any()
        assert np.mean(guess[named] != true[named]) <= risk
        # the smallest such threshold: one step lower breaks the risk
        lower = np.sort(proba.max(1)[proba.max(1) < t])
        if len(lower):
            below = proba.max(1) >= lower[-1]
            assert np.mean(guess[below] != true[below]) > risk
    never = categorize.select_threshold(proba[~right], [labels[i] for i in np.flatnonzero(~right)],
                                        None, risk=0.0)
    assert never > 1.0  # always wrong: always abstain


def _blobs(seed=0, per=6, groups_per_category=2):
    """Separable blobs: one centre per category, several groups (families) per category,
    each group shifted a little."""
    rng = np.random.default_rng(seed)
    f = 9
    centres = rng.normal(scale=4.0, size=(len(CATEGORIES), f))
    x, labels, groups = [], [], []
    for c, name in enumerate(CATEGORIES):
        for g in range(groups_per_category):
            shift = rng.normal(scale=0.5, size=f)
            x.append(centres[c] + shift + 0.3 * rng.normal(size=(per, f)))
            labels += [name] * per
            groups += [f"{name}-{g}"] * per
    return np.concatenate(x), labels, np.array(groups)


def test_fit_with_groups_sets_a_threshold_and_leave_one_family_out():
    x, labels, groups = _blobs()
    model = categorize.fit(x, labels, groups=groups, verdicts=["changed"] * len(labels))
    assert 0.0 <= model.threshold <= 1.0
    assert categorize.fit(x, labels).threshold == 0.0
    decisions, thresholds = categorize.leave_one_family_out(x, labels, groups,
                                                            [None] * len(labels))
    assert set(decisions) <= set(DECISIONS)
    # separable blobs, each category seen through its other groups: named right
    assert np.mean(np.asarray(decisions) == np.asarray(labels)) > 0.9
    # a category whose only group is held out cannot be named: abstained on, or, for rows
    # the categorizer calls 'none' with no verdict, 'none'
    one = groups != "backdoor-1"
    d, _ = categorize.leave_one_family_out(x[one], [lab for lab, k in zip(labels, one,
                                                                          strict=True) if k],
                                           groups[one], ["changed"] * int(one.sum()))
    held = groups[one] == "backdoor-0"
    assert "backdoor" not in set(d[held])
    # rows left out of training are still decided; with all rows usable, the same result
    skip = groups == "wrong-label-0"
    d2, _ = categorize.leave_one_family_out(x, labels, groups, None, train_rows=~skip)
    assert set(d2) <= set(DECISIONS)
    d3, _ = categorize.leave_one_family_out(x, labels, groups, None,
                                            train_rows=np.ones(len(labels), bool))
    np.testing.assert_array_equal(d3, decisions)
    assert categorize.usable_rows(["none", "backdoor", "backdoor"],
                                  ["unchanged", "unchanged", "changed"]).tolist() == [
        True, False, True]
    with pytest.raises(ConfigError, match="3 groups"):
        categorize.leave_one_family_out(x[:12], labels[:12], groups[:12])


# --- planted changes outside the training families ------------------------------------------------

TINY = cg.GeneratorConfig(hidden=32, sample_size=2000, n_null=19, probes=200, n_patched=100)
HELD_OUT = ("sparse", "blended")
# one training plan (no epochs / lr families: each would be another compile)
TRAIN_FAMILIES = ("square", "checkerboard", "per-class-square", "uniform-labels",
                  "shift-labels", "pair-flip", "sample", "order", "prune", "quantize",
                  "noise-sign", "noise-gauss", "fgsm", "pgd")


@pytest.mark.slow
def test_unseen_trigger_families_are_detected_and_abstained_on_or_named_right(full_mnist):
    """Train the categorizer on families without sparse or blended triggers, then plant sparse and
    blended backdoors (strong ones, 100 pixels or alpha 0.3 on half the images, so that models
    this small show them on clean probes; a 60-pixel one was missed in one of two tries): the
    change test, against 19 benign models, flags at least 3 of the 4 (it missed one sparse
    backdoor of this width-32 world, p 0.30), and the categorizer calls the flagged ones
    'backdoor' or abstains; it never names another kind of change. (In a world this small the
    threshold, chosen on held-out groups, may well be "always abstain": the property holds
    either way; the benchmark's larger world, `change_generator.lofo`, shows how often it
    names.) Full MNIST only: on the bundled sample's 10,000 images the categorizer, trained on 2
    changes per family, named one sparse backdoor "wrong-label" (half the data relabelled to one
    class also reads as a label change), which the benchmark's table reports."""
    mnist = full_mnist
    assert not {cg.FAMILIES[f].group for f in TRAIN_FAMILIES} & set(HELD_OUT)
    changes = cg.generate(2, 2, mnist.spec, seed=0, families=TRAIN_FAMILIES)
    planted = [
        cg.Change("sparse", r, 0, (("pixels", 100), ("fraction", 0.5), ("target", 3 + r)),
                  seed=11 + r) for r in range(2)] + [
        cg.Change("blended", r, 0, (("alpha", 0.3), ("fraction", 0.5), ("target", 5 + r)),
                  seed=21 + r) for r in range(2)]
    out = cg.realise(changes + planted, mnist, TINY, seed=0)
    cells = out.cells
    test_rows = cells["family"].isin(HELD_OUT).to_numpy()
    assert test_rows.sum() == len(planted)
    train = ~test_rows
    model = categorize.fit(out.inputs[train], cells["category"][train].tolist(),
                           groups=cells["group"][train].to_numpy(),
                           verdicts=cells["verdict"][train].tolist())
    verdicts = np.array(cells["verdict"][test_rows].tolist())
    flagged = verdicts == "changed"
    assert flagged.sum() >= len(planted) - 1, cells[test_rows][["family", "p_value"]]
    decided = model.predict(out.inputs[test_rows][flagged], verdicts[flagged].tolist())
    assert set(decided) <= {"backdoor", UNCERTAIN}, decided


def test_lofo_table_and_its_report_section():
    import pandas as pd

    from mlshift_jax.bench.experiments import detect as report

    cells = pd.DataFrame({"family": ["sparse", "sparse", "sparse", "prune", "prune"],
                          "category": ["backdoor"] * 3 + ["none"] * 2,
                          "verdict": ["changed", "changed", "unchanged", "unchanged",
                                      "changed"]})
    decisions = ["backdoor", UNCERTAIN, "none", "none", UNCERTAIN]
    table = categorize.lofo_table(cells, decisions)
    assert list(table.index) == ["sparse", "prune"]
    assert table.loc["sparse", "backdoor"] == 1 and table.loc["sparse", UNCERTAIN] == 1
    assert table.loc["sparse", "none"] == 1 and table.loc["sparse", "n"] == 3
    assert table.loc["sparse", "detected"] == pytest.approx(2 / 3)
    assert table.loc["sparse", "right"] == pytest.approx(1 / 3)
    assert table.loc["prune", "right"] == 0.5
    text = report._lofo_section({"categorizer_lofo": table})
    assert "leave one family out" in text and "| sparse" in text
    assert "1 named right, 1 abstained, 0 named wrong, 1 undetected" in text
    assert report._lofo_section({}) == ""


def test_member_chunk_fits_the_memory_cap():
    mib = 2**20
    for m, size, n, d, cap in [(147, 10_000, 60_000, 784, 1024 * mib),
                               (5, 100, 1000, 784, 64 * mib)]:
        chunk = cg.member_chunk(m, size, n, d, cap)
        assert 1 <= chunk <= m
        assert n * d * 4 + chunk * cg.COPIES * size * d * 4 <= cap or chunk == 1
        if chunk < m:
            assert n * d * 4 + (chunk + 1) * cg.COPIES * size * d * 4 > cap
    assert cg.member_chunk(10, 60_000, 60_000, 784, mib) == 1


def test_lofo_also_decides_known_families_with_the_reference_held_out(mnist):
    small = cg.GeneratorConfig(hidden=16, sample_size=1000, n_null=6, probes=100,
                               n_patched=50)
    families = ("square", "uniform-labels", "sample", "prune")
    table, r = cg.lofo(mnist, n_refs=3, per_family=1, config=small, seed=0,
                       families=families)
    assert list(table.index) == list(families)
    cells = r.cells
    assert len(cells) == 3 * len(families) and set(cells["ref"]) == {0, 1, 2}
    assert set(cells["in_family"]) <= set(DECISIONS)
    unchanged = (cells["verdict"] == "unchanged").to_numpy()
    assert (cells["in_family"][unchanged] == "none").all()  # never contradicts the test
    known = categorize.lofo_table(cells, cells["in_family"])
    assert known["n"].tolist() == [3] * len(families)
