"""E3, input attacks on the study's MLP ([e3]): each attack at each eps on all the test images
and on the study's 6,000, beside the study's published FGSM scores (`core.study.E3`).

Its cells are the grid's (`grid.compute`), with FGSM climbing the study's own loss
(loss = "train"); its section is one table per test-set size, its finding FGSM at eps 0.1
and 0.3 against the study's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mlshift_jax.bench.cells import (
    TINY_TEST,
    AttackConfig,
    Cell,
    Experiment,
    Matrix,
    Parsers,
    ReportContext,
    StudyTraining,
    attack_cell,
    inherit,
    shrink,
    train_spec,
    unfit_attacks,
    unfit_study,
)
from mlshift_jax.bench.experiments.grid import compute as attack_compute
from mlshift_jax.bench.markdown import PRF, delta, fmt_time, md, records_of
from mlshift_jax.core import study

BLOCK = "e3"  # the study's experiment number, as committed matrices spell it


@dataclass(frozen=True)
class InputAttacks(StudyTraining):
    """The [e3] table: each of `attacks` at each eps on `model`; n_test lists the test-set
    sizes, each its own table."""

    n_test: tuple[int, ...] = (10_000, 6_000)
    model: str = "seed-mlp"
    attacks: tuple[str, ...] = ("fgsm", "noise-sign", "pgd")
    eps: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)


def schema(p: Parsers) -> dict:
    """The [e3] keys."""
    return {**p.common, "dataset": p.dataset, "model": p.model, "attacks": p.attacks,
            "eps": p.chk.eps_list,
            "n_test": lambda v, w: tuple(p.chk.rule("n_test")(n, w) for n in p.chk.list_(v, w))}


def cells(matrix: Matrix, e3: InputAttacks) -> list[Cell]:
    """n_test x attack x eps, the attacks on the study's loss."""
    spec = train_spec(matrix, e3.dataset, e3.model, e3.seed, hidden=e3.hidden, lr=e3.lr,
                      epochs=e3.epochs, n_train=inherit(e3.n_train, matrix.n_train))
    return [attack_cell(matrix, BLOCK, f"e3/n{n}/", spec, attack, eps, n, study_loss=True)
            for n in e3.n_test for attack in e3.attacks for eps in e3.eps]


def tiny(e3: InputAttacks) -> InputAttacks:
    """[e3] with its test-set sizes scaled down to at most TINY_TEST."""
    top = max(e3.n_test)
    return shrink(e3, n_test=tuple(max(1, n * TINY_TEST // top) for n in e3.n_test))


def _tables(records: pd.DataFrame, warns: dict[str, str], test_sizes: dict[str, int]) -> str:
    rows = records_of(records, kind="attack", block=BLOCK)
    if not len(rows):
        return "No E3 cells in this run.\n"
    parts = []
    for n in sorted(rows["n_test"].unique(), reverse=True):
        # cells that ask for more test images than the data has (10,000 and 6,000 on the
        # bundled sample's 2,000) get the same images: one row each
        sub = rows[rows["n_test"] == n].drop_duplicates(["attack", "eps"])
        r0 = sub.iloc[0]
        if n == study.E3_IMAGES:
            title = (f"### E3 on the study's {int(n):,} images: the first {int(n):,} "
                     f"{r0['dataset']} test images (the study does not say which 6,000 it "
                     "used)\n\n")
        elif n == test_sizes.get(r0["dataset"]):
            title = f"### E3 on all {int(n):,} {r0['dataset']} test images\n\n"
        else:
            title = f"### E3 on the first {int(n):,} {r0['dataset']} test images\n\n"
        table = []
        for _, r in sub.sort_values(["attack", "eps"]).iterrows():
            ref = study.E3.get(float(r["eps"])) if (r["attack"] == "fgsm" or r["eps"] == 0) \
                else None
            row = {"attack": r["attack"], "eps": r["eps"], "accuracy": r["accuracy"],
                   **{m: r[m] for m in PRF}}
            row |= {f"Δ {m}": delta(r[m], ref[m]) if ref else "—" for m in PRF}
            row["study P / R / F1 / conf"] = (" / ".join(f"{ref[m]:.4f}" for m in PRF)
                                              if ref else "—")
            row["time"] = fmt_time(r["median_s"])
            row["warnings"] = warns.get(r["id"], "")
            table.append(row)
        note = (f"{r0['model']} trained on {int(r0['n_train']):,} images. Δ = ours − study, "
                "where the study has a row: FGSM at each eps, and every attack at eps 0 (the "
                "clean model). The study published no numbers for its random noise and never "
                "ran PGD. Our FGSM uses the true gradient of the squared error; time is the "
                "median of the JAX attack over the subset, compile excluded.")
        parts.append(title + md(pd.DataFrame(table), note, index=False))
    return "\n".join(parts)


def finding(records: pd.DataFrame) -> str | None:
    """E3's headline: FGSM at eps 0.1 and 0.3 on the most test images, against the
    study's F1."""
    rows = records_of(records, kind="attack", block=BLOCK)
    rows = rows[rows["attack"] == "fgsm"] if len(rows) else rows
    if not len(rows):
        return None
    rows = rows[rows["n_test"] == rows["n_test"].max()]
    parts = []
    for eps in (0.1, 0.3):
        r = rows[np.isclose(rows["eps"].astype(float), eps)]
        ref = study.E3.get(eps)
        if len(r) and ref:
            r = r.iloc[0]
            parts.append(f"eps {eps:g}: accuracy {r['accuracy']:.4f}, F1 {r['f1']:.4f} vs the "
                         f"study's {ref['f1']:.4f}")
    if not parts:
        return None
    return (f"**E3, FGSM** on {int(rows['n_test'].iloc[0]):,} test images: "
            + "; ".join(parts) + ".")


def section(records: pd.DataFrame, ctx: ReportContext) -> list[tuple[str, str]]:
    """E3's tables, one per test-set size (the sizes of the data from the run's facts)."""
    sizes = {k: d["n_test"] for k, d in ctx.info.get("datasets", {}).items()}
    return [("E3: input attacks on the study's MLP", _tables(records, ctx.warns, sizes))]


EXPERIMENT = Experiment(
    block=BLOCK, Block=InputAttacks, Config=AttackConfig, schema=schema, cells=cells,
    tiny=tiny, compute=attack_compute, section=section, place=30, finding=finding,
    fits=lambda cell, spec: unfit_study(spec) or unfit_attacks([cell.config.attack], spec))
