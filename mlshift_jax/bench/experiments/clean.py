"""E1, the study's clean model ([e1]): each of `models` trained with the study's settings and
scored on the clean test set, beside the study's published scores (`core.study.E1`).

Its cells are the grid's ("none" at eps 0, `grid.compute`); its section is the study's
measures with ours and the deltas, its finding the accuracy and F1 against the study's.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from mlshift_jax.bench.cells import (
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
from mlshift_jax.bench.markdown import MEASURES, delta, md, records_of
from mlshift_jax.core import study

BLOCK = "e1"  # the study's experiment number, as committed matrices spell it


@dataclass(frozen=True)
class Clean(StudyTraining):
    """The [e1] table: the study's clean model for each of `models`."""

    models: tuple[str, ...] = ("seed-mlp", "seed-mlp-numpy")


def schema(p: Parsers) -> dict:
    """The [e1] keys."""
    return {**p.common, "dataset": p.dataset, "models": p.models}


def cells(matrix: Matrix, e1: Clean) -> list[Cell]:
    """One clean ("none" at eps 0) cell per model."""
    n_train, n_test = inherit(e1.n_train, matrix.n_train), inherit(e1.n_test, matrix.n_test)
    return [attack_cell(matrix, BLOCK, "e1/",
                        train_spec(matrix, e1.dataset, model, e1.seed, hidden=e1.hidden,
                                   lr=e1.lr, epochs=e1.epochs, n_train=n_train),
                        "none", 0.0, n_test)
            for model in e1.models]


def tiny(e1: Clean) -> Clean:
    """[e1] at a smoke test's size."""
    return shrink(e1)


def _table(records: pd.DataFrame) -> str:
    rows = records_of(records, block=BLOCK)
    if not len(rows):
        return "No E1 cells in this run.\n"
    table = pd.DataFrame({"study": [study.E1[m] for m in MEASURES]}, index=list(MEASURES))
    for _, r in rows.iterrows():
        table[r["model"]] = [r[m] for m in MEASURES]
        table[f"Δ {r['model']}"] = [delta(r[m], study.E1[m]) for m in MEASURES]
    r = rows.iloc[0]
    head = (f"{r['dataset']}, trained on {int(r['n_train']):,} images (hidden {int(r['hidden'])},"
            f" lr {r['lr']:g}, {int(r['epochs'])} epoch(s), seed {int(r['seed'])}), scored on "
            f"{int(r['n_test']):,} test images.\n\n")
    note = ("Rows are the study's measures; Δ = ours − study. The study's \"performance\" "
            "0.963 is accuracy; its P/R/F1/confidence come from its attack table's first row. "
            "Confidence is the mean top sigmoid output.")
    return head + md(table, note)


def finding(records: pd.DataFrame) -> str | None:
    """E1's headline: seed-mlp's clean accuracy and F1 against the study's."""
    rows = records_of(records, block=BLOCK)
    if not len(rows):
        return None
    by = rows.set_index("model")
    model = "seed-mlp" if "seed-mlp" in by.index else by.index[0]
    r = by.loc[model]
    return (f"**E1, the study's clean model**: {model} accuracy {r['accuracy']:.4f} vs the "
            f"study's {study.E1['accuracy']:.3f} (Δ {delta(r['accuracy'], study.E1['accuracy'])}"
            f"); F1 {r['f1']:.4f} vs {study.E1['f1']:.4f}.")


def section(records: pd.DataFrame, ctx: ReportContext) -> list[tuple[str, str]]:
    """E1's table."""
    return [("E1: the study's clean model", _table(records))]


EXPERIMENT = Experiment(
    block=BLOCK, Block=Clean, Config=AttackConfig, schema=schema, cells=cells, tiny=tiny,
    compute=attack_compute, section=section, place=10, finding=finding,
    fits=lambda cell, spec: unfit_study(spec) or unfit_attacks([cell.config.attack], spec))
