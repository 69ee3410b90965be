"""Defenses ([defenses]): each defense on each model, attacked by every column (by default
FGSM, PGD, the defense's adaptive attack, Square, transfer, AutoAttack; any of
`defense_columns()`) at every eps, with the worst case per image, the obfuscated-gradient
probe and flags (Athalye et al. 2018) and a verdict per defense.

One `DefenseConfig` cell per (model, defense), a row of the defense x attack table; the
section is that table per eps, the defenses' fit times, the flags and the verdicts, the
figure robust accuracy vs eps per defense.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np
import pandas as pd

from mlshift_jax.attacks import ATTACKS, defenses, evasion, get_attack
from mlshift_jax.attacks.defenses import DEFENSES, resolve_options
from mlshift_jax.attacks.evaluate import (
    Column,
    evaluate_under_attack,
    obfuscation_flags,
    worst_case,
)
from mlshift_jax.bench.cells import (
    BlockData,
    Cell,
    Experiment,
    Matrix,
    ModelCell,
    Parsers,
    ReportContext,
    cap,
    inherit,
    shrink,
    train_spec,
    unfit_attacks,
)
from mlshift_jax.bench.context import (
    Loaded,
    Memo,
    Trained,
    base_record,
    capped,
    measure,
    on_device,
    trained,
)
from mlshift_jax.bench.experiments.grid import save_figure
from mlshift_jax.bench.markdown import finite, fmt_time, md, records_of
from mlshift_jax.core.timing import first_call
from mlshift_jax.models.metrics import evaluate
from mlshift_jax.models.zoo import Model

DEFENSE_COLUMNS = ("fgsm", "pgd", "adaptive", "square", "transfer", "autoattack")  # default


def defense_columns() -> set[str]:
    """The columns a defense table may have: "adaptive" (the defense's own adaptive attack)
    and every untargeted attack (the table gives no target)."""
    return {"adaptive"} | {a.name for a in ATTACKS.values() if not a.targeted}


@dataclass(frozen=True)
class DefenseConfig(ModelCell):
    """One defended model (a row of the defense x attack table): every attack column at
    every eps, the clean accuracy, the obfuscation probe and flags, and their times."""

    kind: ClassVar[str] = "defense"
    defense: str
    options: tuple[tuple[str, Any], ...]
    attacks: tuple[str, ...]
    eps: tuple[float, ...]
    steps: int
    restarts: int
    samples: int
    queries: int
    probe_n: int


@dataclass(frozen=True)
class Defenses(BlockData):
    """The defense x attack table: each defense on each model, every column at every eps.
    "adaptive" is the defense's own adaptive attack (`defenses.Defense.adaptive`)."""

    n_test: int | None = 1000
    models: tuple[str, ...] = ("seed-mlp", "mlp-ce")
    defenses: tuple[str, ...] = ("none", "randomize", "quantize", "median", "denoise-ae",
                                 "adv-train")
    attacks: tuple[str, ...] = DEFENSE_COLUMNS
    eps: tuple[float, ...] = (0.1, 0.2, 0.3)
    steps: int = 10
    restarts: int = 2
    samples: int = 8
    queries: int = 1000
    adv_eps: float = 0.1
    adv_steps: int = 7
    probe_n: int = 200


def schema(p: Parsers) -> dict:
    """The [defenses] keys."""
    chk = p.chk
    return {
        **{k: p.common[k] for k in ("seed", "n_train", "n_test")}, "dataset": p.dataset,
        "models": p.models,
        "defenses": lambda v, w: chk.names(v, w, set(DEFENSES), "defense"),
        "attacks": lambda v, w: chk.names(v, w, defense_columns(), "attack column"),
        "eps": chk.eps_list, "steps": chk.int_, "restarts": chk.int_,
        "samples": chk.int_, "queries": chk.int_,
        "adv_eps": lambda v, w: chk.float_(v, w, positive=True),
        "adv_steps": chk.int_, "probe_n": chk.int_}


def cells(matrix: Matrix, d: Defenses) -> list[Cell]:
    """One cell per (model, defense)."""
    n_train = inherit(d.n_train, matrix.n_train)
    out = []
    for model in d.models:
        spec = train_spec(matrix, d.dataset, model, d.seed, n_train=n_train)
        for name in d.defenses:
            options = (("eps", d.adv_eps), ("steps", d.adv_steps)) if name == "adv-train" \
                else ()
            config = DefenseConfig(
                train=spec, defense=name, options=resolve_options(name, dict(options)),
                attacks=d.attacks, eps=d.eps, n_test=d.n_test, steps=d.steps,
                restarts=d.restarts, samples=d.samples, queries=d.queries,
                probe_n=d.probe_n, rounds=matrix.timing.rounds,
                max_seconds=matrix.timing.max_seconds)
            out.append(Cell(f"defense/{d.dataset}/{model}/{name}/seed{d.seed}", "defenses",
                            config))
    return out


def tiny(d: Defenses) -> Defenses:
    """[defenses] on at most TINY_TRAIN / 50 images, with the shortest attacks."""
    return shrink(d, n_test=cap(d.n_test, 50), steps=2, restarts=1, samples=2, queries=10,
                  adv_steps=2, probe_n=20)


# --- computing a row ---------------------------------------------------------------------------


def _defended(cfg: DefenseConfig, loaded: Loaded, base: Trained,
              memo: Memo) -> tuple[Model, Any, float]:
    """(defended model, its params, seconds to fit the defense: adversarial training or the
    denoiser, fitted once per run for every model of the same data; 0 for a pure wrapper)."""
    opts = dict(cfg.options)
    spec = cfg.train
    if cfg.defense == "adv-train":
        ds = capped(loaded.ds, spec.n_train, None)
        adv_cfg = replace(spec.train_config(),
                          epochs=spec.epochs * defenses.ADV_EPOCH_FACTOR)
        timing, params = first_call(partial(defenses.adv_fit, spec.model, adv_cfg,
                                      eps=float(opts["eps"]), steps=int(opts["steps"]),
                                      warmup=float(opts.get("warmup", 0.0)), spec=ds.spec),
                              ds.x_train, ds.y_train)
        return defenses.build("adv-train", base.arch, **opts), params, timing.median_s
    if defenses.get_defense(cfg.defense).needs_state:
        # a fit reads the data and the model's input shape and range, no weights
        # (`defenses.Defense.fit`): one per run serves seed-mlp and mlp-ce alike
        at = (cfg.defense, cfg.options, loaded.hash, spec.n_train, spec.seed,
              base.arch.input_shape, base.arch.input_range)
        if at not in memo.fitted:
            ds = capped(loaded.ds, spec.n_train, None)
            key = jax.random.fold_in(jax.random.key(spec.seed), 0xDAE)
            timing, state = first_call(partial(defenses.fit_state, cfg.defense, base.arch, key=key,
                                         **opts), ds.x_train)
            memo.fitted[at] = (timing.median_s, state)
        fit_s, state = memo.fitted[at]
        return (defenses.build(cfg.defense, base.arch, state=state, **opts), base.params,
                fit_s)
    return defenses.build(cfg.defense, base.arch, **opts), base.params, 0.0


def compute(cell: Cell, loaded: Loaded, memo: Memo, cache: Path, force: bool) -> dict:
    """One row of the defense x attack table: every column at every eps (one compiled eps
    sweep per column, timed; AutoAttack one call per eps, timed once with its compiles), the
    clean
    accuracy, the worst case per image over every column, the obfuscation probe and its
    flags."""
    cfg: DefenseConfig = cell.config
    spec = cfg.train
    _, base = trained(spec, loaded, memo, cache, force)
    model, params, defense_s = _defended(cfg, loaded, base, memo)
    x, y = on_device(memo, loaded, "test", cfg.n_test)
    lo, hi = (float(v) for v in model.input_range)
    key = evasion.attack_key(spec.seed)
    eval_key = jax.random.fold_in(key, 7)
    clean = evaluate(model, params, x, y, key=eval_key)["accuracy"]
    adaptive_name = defenses.get_defense(cfg.defense).adaptive
    columns = []
    for column in cfg.attacks:
        attack = get_attack(adaptive_name if column == "adaptive" else column)
        kw = {k: v for k, v in (("steps", cfg.steps), ("samples", cfg.samples),
                                ("queries", cfg.queries)) if attack.accepts(k)}
        if attack.accepts("steps") and attack.accepts("restarts"):  # the PGD attacks' restarts
            kw["restarts"] = cfg.restarts
        columns.append(Column(column, attack, {} if column == "autoattack" else kw))
    training = defenses.get_defense(cfg.defense).kind == "training"
    result = evaluate_under_attack(
        model, params, x, y, columns, cfg.eps, key=key,
        timer=partial(measure, rounds=cfg.rounds, max_seconds=cfg.max_seconds),
        source_params=base.params if training else None)  # crafted on the undefended weights
    rows = list(result.rows)
    for eps, robust in worst_case(result).items():  # per image, never min of accuracies
        rows.append({"column": "worst", "attack": "per image", "eps": eps, "accuracy": robust,
                     "median_s": float("nan"), "compile_s": float("nan"), "rounds": 0})
    probed, raised = obfuscation_flags(model, params, x, y, result, key=key, eps=max(cfg.eps),
                                       steps=cfg.steps, probe_n=cfg.probe_n)
    aa_counts = result.autoattack
    pgd40 = {}
    if cfg.defense == "adv-train":  # Madry et al.'s yardstick: PGD-40 at the training eps
        adv_eps = float(dict(cfg.options)["eps"])
        x_adv = evasion.pgd(model, params, x, y, eps=adv_eps, steps=40,
                            key=jax.random.fold_in(key, 40), lo=lo, hi=hi)
        pgd40 = {"pgd40_eps": adv_eps, "adv_steps": int(dict(cfg.options).get("steps", 7)),
                 "pgd40_accuracy": evaluate(model, params, x_adv, y, key=eval_key)["accuracy"]}
    return {
        **base_record(cell, loaded), "model": spec.model, "arch": model.name, "seed": spec.seed,
        **pgd40,
        "defense": cfg.defense, "adaptive": adaptive_name, "n_train": base.n_train,
        "n_test": int(x.shape[0]), "hidden": spec.hidden, "lr": spec.lr,
        "epochs": spec.epochs, "clean_accuracy": clean, "train_s": base.train_s,
        "defense_s": defense_s, "stochastic": bool(model.stochastic),
        "flags": "; ".join(raised),
        "detail": {"rows": rows, "probe": {k: v for k, v in probed.items()
                                           if k != "pgd_steps"},
                   "pgd_steps": {str(k): v for k, v in probed["pgd_steps"].items()},
                   "flags": raised,
                   **({"autoattack": {str(e): c for e, c in aa_counts.items()}}
                      if aa_counts is not None else {})},
    }


# --- tables.md and the figure ----------------------------------------------------------------


# what the table's note says of a column, where the table has it
COLUMN_NOTES = {
    "adaptive": "the defense's own adaptive attack (eot-pgd: EOT over the randomness; "
                "bpda-pgd: BPDA through the preprocessing)",
    "square": "gradient-free",
    "transfer": "PGD on the undefended model",
    "autoattack": "APGD-CE, APGD-T, FAB-T and Square (5,000 queries) in turn on the images "
                  "still standing (Croce & Hein 2020; the rand version, APGD-CE and APGD-DLR "
                  "with EOT over 20 draws, on a randomized defense; its time: one call per "
                  "eps, compiles included)",
    "worst": "the images that survived every column, counted per image",
}


def column_title(column: str) -> str:
    """A defense-table column's title: the attack's `Attack.label`; "adaptive" and "worst"
    as they are."""
    return ATTACKS[column].label if column in ATTACKS else column


def defense_table(records: pd.DataFrame) -> pd.DataFrame:
    """The defense cells as one tidy frame: model, defense, column, attack, eps, accuracy,
    median_s (the column's whole eps sweep), clean_accuracy, defense_s, flags."""
    rows = []
    for _, r in records_of(records, kind="defense").iterrows():
        for row in r["detail"]["rows"]:
            rows.append({"model": r["model"], "defense": r["defense"], **row,
                         "clean_accuracy": r["clean_accuracy"], "defense_s": r["defense_s"],
                         "n_test": r["n_test"], "flags": r["flags"]})
    return pd.DataFrame(rows)


def _verdict(sub: pd.DataFrame, defense: str, none: pd.DataFrame | None) -> str:
    """One sentence: what the defense seems to buy against FGSM (the study's attack), and
    what is left against the strongest attack, per eps; judged at the smallest eps."""
    clean = sub["clean_accuracy"].iloc[0]
    parts, judged, gap = [], None, (0.0, None, None, None, None)
    for eps in sorted(set(sub["eps"])):
        at = sub[sub["eps"] == eps].set_index("column")["accuracy"]
        if "worst" in at.index:  # per image: robust only where every attack failed
            worst, name = at["worst"], "every attack, per image"
            at = at.drop("worst")
        else:
            worst, col = at.min(), at.idxmin()
            name = sub[(sub["column"] == col)]["attack"].iloc[0]
        fgsm = at.get("fgsm", np.nan)
        undefended = np.nan
        if none is not None and len(none):
            undefended = none[none["eps"] == eps]["accuracy"].min()
        parts.append(f"eps {eps:g}: FGSM {fgsm:.3f}, worst {worst:.3f} ({name})")
        if judged is None:
            judged = (eps, fgsm, worst, name, undefended)
        if np.isfinite(fgsm) and fgsm - worst > gap[0]:
            gap = (fgsm - worst, eps, fgsm, worst, name)
    eps, fgsm, worst, name, undefended = judged
    if np.isfinite(undefended) and worst - undefended > 0.1:
        what = (f"something survives at eps {eps:g}: worst case {worst:.3f} vs "
                f"{undefended:.3f} undefended")
    else:
        what = f"buys little: worst case {worst:.3f} at eps {eps:g}"
    if gap[0] > 0.2:
        what += (f"; FGSM overstates it: {gap[4]} takes eps {gap[1]:g} from {gap[2]:.3f} to "
                 f"{gap[3]:.3f}")
    return f"clean {clean:.3f}; " + "; ".join(parts) + f". **{what}**."


def _markdown(records: pd.DataFrame) -> str:
    table = defense_table(records)
    if not len(table):
        return "Not in this run (add a `[defenses]` block to the matrix).\n"
    out = []
    cols = list(dict.fromkeys(table["column"]))  # the matrix's order, "worst" last
    for eps in sorted(set(table["eps"])):
        rows = []
        for (model, defense), sub in table[table["eps"] == eps].groupby(
                ["model", "defense"], sort=False):
            by = sub.set_index("column")
            row = {"model": model, "defense": defense,
                   "clean": f"{sub['clean_accuracy'].iloc[0]:.3f}"}
            for c in cols:
                if c == "worst" and c in by.index:
                    row["worst"] = f"{by.loc[c, 'accuracy']:.3f}"
                elif c in by.index:
                    label = column_title(c)
                    name = f" {by.loc[c, 'attack']}" if c == "adaptive" else ""
                    row[label] = (f"{by.loc[c, 'accuracy']:.3f}{name} "
                                  f"({fmt_time(by.loc[c, 'median_s'])})")
            flags = sub["flags"].iloc[0]
            row["flags"] = ", ".join(sorted({f.split(":")[0] for f in flags.split("; ")
                                             if f})) or "—"
            rows.append(row)
        out.append(f"### eps {eps:g}\n")
        n = int(table["n_test"].iloc[0])
        out.append(md(pd.DataFrame(rows), f"Robust accuracy on the first {n:,} test images "
                      f"(standard error at most {0.5 / np.sqrt(n):.3f}: sqrt(p(1 - p) / n) at "
                      "p = 0.5; time: the column's "
                      "whole eps sweep, one compiled call, median of the timed rounds). "
                      + "; ".join(f"{column_title(c)}: {COLUMN_NOTES[c]}" for c in cols
                                  if c in COLUMN_NOTES) + ".", index=False))
    times = table.drop_duplicates(["model", "defense"])[["model", "defense", "defense_s"]]
    times = times.assign(defense_s=[fmt_time(v) for v in times["defense_s"]])
    adv = records_of(records, kind="defense")
    adv = adv[adv["defense"] == "adv-train"] if "defense" in adv else adv
    if len(adv) and "pgd40_accuracy" in adv:
        lines = [f"- `{r['model']}` + adv-train (PGD-{int(r['adv_steps'])} training at eps "
                 f"{r['pgd40_eps']:g}): clean {r['clean_accuracy']:.4f}, PGD-40 at eps "
                 f"{r['pgd40_eps']:g} {r['pgd40_accuracy']:.4f}"
                 for _, r in adv.iterrows() if finite(r.get("pgd40_accuracy"))]
        if lines:
            out.append("### Adversarial training against PGD-40\n")
            out.append("\n".join(lines) + f"\n\n*On the first {int(adv['n_test'].iloc[0]):,} "
                       "test images; PGD-40 with a random start and Madry et al.'s step size "
                       "2.5 eps / 40.*\n")
    out.append("### Time to build each defense\n")
    out.append(md(times.rename(columns={"defense_s": "fit"}), "Adversarial training or the "
                  "denoiser's training, compile included; 0 for a pure wrapper.",
                  index=False))
    out.append("### Obfuscated-gradient flags\n")
    lines = []
    for _, r in records_of(records, kind="defense").iterrows():
        for f in r["detail"].get("flags", []):
            lines.append(f"- `{r['model']}` + {r['defense']}: {f}")
    out.append(("\n".join(lines) if lines else "None raised.") + "\n\n*After Athalye et al. "
               "2018 and AutoAttack: black-box/transfer beating white-box, accuracy growing "
               "with eps or steps, randomized outputs, zero or vanishing gradients, eps of "
               "half the input range not reaching chance.*\n")
    out.append("### Verdicts\n")
    verdicts = []
    for model in dict.fromkeys(table["model"]):
        sub_m = table[table["model"] == model]
        none = sub_m[sub_m["defense"] == "none"]
        for defense in dict.fromkeys(sub_m["defense"]):
            if defense == "none":
                continue
            sub = sub_m[sub_m["defense"] == defense]
            verdicts.append(f"- `{model}` + **{defense}**: {_verdict(sub, defense, none)}")
    out.append("\n".join(verdicts) + "\n")
    return "\n".join(out)


def _defense_figure(table: pd.DataFrame):
    from matplotlib.figure import Figure

    defs = list(dict.fromkeys(table["defense"]))
    models = list(dict.fromkeys(table["model"]))
    fig = Figure(figsize=(2.8 * len(defs), 2.9 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), len(defs), sharey=True, squeeze=False)
    for i, model in enumerate(models):
        for j, defense in enumerate(defs):
            ax = axes[i][j]
            sub = table[(table["model"] == model) & (table["defense"] == defense)]
            if not len(sub):
                continue
            clean = sub["clean_accuracy"].iloc[0]
            for column in dict.fromkeys(sub["column"]):
                a = sub[sub["column"] == column].sort_values("eps")
                label = a["attack"].iloc[0] if column == "adaptive" else column
                ax.plot(np.concatenate([[0.0], a["eps"]]),
                        np.concatenate([[clean], a["accuracy"]]), marker="o", label=label)
            ax.set_title(f"{model} + {defense}", fontsize=9)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.set_xlabel("eps (L∞)")
            ax.legend(fontsize=6)
        axes[i][0].set_ylabel("robust accuracy")
    return fig


def section(records: pd.DataFrame, ctx: ReportContext) -> list[tuple[str, str]]:
    """The defense x attack tables, fit times, flags and verdicts."""
    return [("Defenses: defense × attack, with adaptive attacks", _markdown(records))]


def figures(records: pd.DataFrame, figures_dir: Path, info: dict[str, Any]) -> list[Path]:
    """Robust accuracy vs eps, one panel per model and defense."""
    table = defense_table(records)
    if not len(table):
        return []
    return [save_figure(_defense_figure(table), figures_dir / "defenses-accuracy-vs-eps.png")]


EXPERIMENT = Experiment(
    block="defenses", Block=Defenses, Config=DefenseConfig, schema=schema, cells=cells,
    tiny=tiny, compute=compute, section=section, place=60, figures=figures,
    fits=lambda cell, spec: unfit_attacks(cell.config.attacks, spec))
