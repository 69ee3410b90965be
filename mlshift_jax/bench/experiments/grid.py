"""The attack grid: every model x attack x eps of the [matrix] table, on each dataset and seed.

One `AttackConfig` cell per (dataset, model, seed, attack, eps); "none" runs at eps 0 only
(the clean row). A cell trains the model (cached), attacks the first n_test test images at
eps, scores the result and times the attack (`context.measure`). Its section of tables.md is
one pairing table per dataset; its figures, accuracy vs eps per model and a grid of clean and
FGSM digits. The study's E1 and E3 (`clean`, `input_attacks`) run the same cells.
"""

from __future__ import annotations

import base64
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from mlshift_jax.attacks import evasion, get_attack
from mlshift_jax.bench.cells import (
    AttackConfig,
    Cell,
    Experiment,
    Matrix,
    ReportContext,
    attack_cell,
    train_spec,
    unfit_attacks,
)
from mlshift_jax.bench.context import (
    Loaded,
    Memo,
    Trained,
    base_record,
    measure,
    mesh,
    on_device,
    timing_fields,
    trained,
)
from mlshift_jax.bench.markdown import fmt_time, md, records_of
from mlshift_jax.core import sharding, study
from mlshift_jax.core.files import atomic_path
from mlshift_jax.models import zoo
from mlshift_jax.models.metrics import evaluate
from mlshift_jax.models.zoo import Model, predict

N_EXAMPLES = 6  # images kept per clean / FGSM cell for the report's digit grid




def encode_images(x: np.ndarray, input_range: tuple[float, float] = (0.01, 1.0)) -> str:
    """Flat images [k, D] in input_range (lo, hi) -> base64 of uint8 pixels (the report's
    example grid; the record carries the image shape beside them)."""
    lo, hi = input_range
    q = np.round((np.asarray(x, np.float64) - lo) / (hi - lo) * 255)
    return base64.b64encode(np.clip(q, 0, 255).astype(np.uint8).tobytes()).decode()


def decode_images(text: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """`encode_images` back to floats in [0, 1]: [k, H, W, C] for shape (H, W, C); None:
    the study's 28x28x1 (records written before they carried their shape)."""
    q = np.frombuffer(base64.b64decode(text), np.uint8).astype(np.float32) / 255
    return q.reshape(-1, *(shape or zoo.STUDY_SPEC.input_shape))


# --- computing a cell ----------------------------------------------------------------------


@jax.jit
def _perturbation(x: jax.Array, x_adv: jax.Array) -> dict[str, jax.Array]:
    """Share of pixels changed and the L∞ size of the change. x, x_adv: [n, D]."""
    return {"changed_frac": jnp.mean(x_adv != x), "linf": jnp.max(jnp.abs(x_adv - x))}


@partial(jax.jit, static_argnames="model")
def _zero_grad_frac(model: Model, params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Share of pixels whose input gradient is exactly 0 (FGSM leaves them where they are)."""
    return jnp.mean(evasion.input_grad(model, params, x, y) == 0)


def _per_test(key: str, fitted: Trained, x, y, attack: str, memo: Memo) -> dict:
    slot = memo.per_test.setdefault((key, x.shape[0]), {})
    if "clean" not in slot:
        slot["clean"] = evaluate(fitted.arch, fitted.params, x, y)
    if get_attack(attack).uses_gradient and "zero_grad_frac" not in slot:
        slot["zero_grad_frac"] = float(_zero_grad_frac(fitted.arch, fitted.params, x, y))
    return slot


def compute(cell: Cell, loaded: Loaded, memo: Memo, cache: Path, force: bool) -> dict:
    """Train (or reuse) the cell's model, attack its first n_test test images at eps, score
    and time the attack; FGSM and the clean row keep N_EXAMPLES images for the report."""
    cfg: AttackConfig = cell.config
    spec = cfg.train
    key, fitted = trained(spec, loaded, memo, cache, force)
    x, y = on_device(memo, loaded, "test", cfg.n_test)
    per_test = _per_test(key, fitted, x, y, cfg.attack, memo)
    attack = get_attack(cfg.attack)
    options = dict(cfg.options)
    if attack.targeted:
        # the study's target class 3, or the last class of data with fewer classes
        options.setdefault("target", min(study.E7_TARGET, fitted.arch.n_classes - 1))
    # one code path from 1 device to N: the batch split across the mesh, params replicated
    (xs, ys), n = sharding.shard_leading((x, y), mesh())
    fn = partial(attack.fn, fitted.arch, sharding.replicate(fitted.params, mesh()),
                 eps=cfg.eps, key=evasion.attack_key(spec.seed), **options)
    timing, x_adv = measure(fn, xs, ys, rounds=cfg.rounds, max_seconds=cfg.max_seconds)
    x_adv = sharding.unpad(x_adv, n)
    scores = evaluate(fitted.arch, fitted.params, x_adv, y,
                      key=jax.random.fold_in(evasion.attack_key(spec.seed), 7))
    detail = {}
    if cfg.attack in ("none", "fgsm"):
        k = min(N_EXAMPLES, x.shape[0])
        pred = jnp.argmax(predict(fitted.arch, fitted.params, x_adv[:k]), axis=-1)
        detail["examples"] = {"images": encode_images(np.asarray(x_adv[:k]),
                                                      fitted.arch.input_range),
                              "shape": list(fitted.arch.input_shape),
                              "labels": np.asarray(y[:k]).tolist(),
                              "preds": np.asarray(pred).tolist()}
    return {
        **base_record(cell, loaded), "model": spec.model, "arch": fitted.arch.name,
        "seed": spec.seed, "attack": cfg.attack, "eps": cfg.eps, "n_train": fitted.n_train,
        "n_test": int(x.shape[0]), "hidden": spec.hidden, "lr": spec.lr,
        "epochs": spec.epochs, **scores, "clean_accuracy": per_test["clean"]["accuracy"],
        **timing_fields(timing), "train_s": fitted.train_s, "params_finite": fitted.finite,
        "zero_grad_frac": per_test.get("zero_grad_frac") if attack.uses_gradient
        else None, **{k: float(v) for k, v in _perturbation(x, x_adv).items()},
        "detail": detail,
    }


# --- the cells -------------------------------------------------------------------------------


def cells(matrix: Matrix, block: None = None) -> list[Cell]:
    """dataset x model x seed x attack x eps of the [matrix] table, in that order."""
    out = []
    for dataset in matrix.datasets:
        for model in matrix.models:
            for seed in matrix.seeds:
                spec = train_spec(matrix, dataset, model, seed, n_train=matrix.n_train)
                for attack in matrix.attacks:
                    for eps in (0.0,) if attack == "none" else matrix.eps:
                        out.append(attack_cell(matrix, "matrix", "", spec, attack, eps,
                                               matrix.n_test))
    return out


# --- tables.md and figures ---------------------------------------------------------------------


def _pairings(records: pd.DataFrame, dataset: str, warns: dict[str, str]) -> str:
    rows = records_of(records, kind="attack", block="matrix")
    rows = rows[rows["dataset"] == dataset]
    table = pd.DataFrame({
        "model": rows["model"], "attack": rows["attack"], "eps": rows["eps"],
        "accuracy": rows["accuracy"], "f1": rows["f1"], "confidence": rows["confidence"],
        "attack time": rows["median_s"].map(fmt_time), "rounds": rows["rounds"].astype(int),
        "compile": rows["compile_s"].map(fmt_time), "train": rows["train_s"].map(fmt_time),
        "warnings": [warns.get(i, "") for i in rows["id"]],
    })
    r0 = rows.iloc[0]
    head = (f"Trained on {int(r0['n_train']):,} images, attacked and scored on "
            f"{int(r0['n_test']):,} test images ({r0['data_source']}).\n\n")
    note = ("One row per model × attack@eps; `none` at eps 0 is the clean model. Attack time "
            "is the median of one jitted call over the whole test set, timed in as many "
            "rounds as fit in the matrix's [timing] max_seconds (at most its rounds); a call "
            "slower than that is timed once: its first call less the compile. compile: the "
            "time JAX reports tracing and compiling during the first call, 0 where every "
            "program the call needs was already compiled in this run (at an earlier eps, or "
            "for the same architecture on another dataset of the same shape). "
            + ("seed-mlp-numpy is the model of the study's numpy code, attacked in JAX. "
               if (rows["model"] == "seed-mlp-numpy").any() else "")
            + "train is one timed training run (JAX compile included).")
    return head + md(table, note, index=False)


def _accuracy_figure(rows: pd.DataFrame, dataset: str):
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(rows["model"]))
    fig = Figure(figsize=(3.2 * len(models), 3.0), layout="constrained")
    axes = fig.subplots(1, len(models), sharey=True, squeeze=False)[0]
    for ax, model in zip(axes, models, strict=True):
        sub = rows[rows["model"] == model]
        clean = sub["clean_accuracy"].iloc[0]
        for attack in dict.fromkeys(sub["attack"]):
            if attack == "none":
                continue
            a = sub[sub["attack"] == attack].sort_values("eps")
            eps = np.concatenate([[0.0], a["eps"]]) if a["eps"].min() > 0 else a["eps"]
            acc = np.concatenate([[clean], a["accuracy"]]) if a["eps"].min() > 0 \
                else a["accuracy"]
            ax.plot(eps, acc, marker="o", label=attack)
        ax.set_title(model)
        ax.set_xlabel("eps (L∞)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"accuracy ({dataset})")
    axes[-1].legend(fontsize="small")
    return fig


def _digits_figure(rows: pd.DataFrame, dataset: str):
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(rows["model"]))
    model = "seed-mlp" if "seed-mlp" in models else models[0]
    sub = rows[(rows["model"] == model) & rows["attack"].isin(["none", "fgsm"])]
    sub = sub[[bool(d.get("examples")) for d in sub["detail"]]].sort_values("eps")
    if not len(sub):
        return None
    k = len(sub.iloc[0]["detail"]["examples"]["labels"])
    fig = Figure(figsize=(1.3 * k, 1.5 * len(sub)), layout="constrained")
    axes = fig.subplots(len(sub), k, squeeze=False)
    for row_axes, (_, r) in zip(axes, sub.iterrows(), strict=True):
        ex = r["detail"]["examples"]
        images = decode_images(ex["images"], ex.get("shape"))  # [k, H, W, C] in [0, 1]
        for j, ax in enumerate(row_axes):
            img = images[j] if images.shape[-1] == 3 else images[j][..., 0]
            ax.imshow(img, cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{ex['labels'][j]} → {ex['preds'][j]}", fontsize=8,
                         color="black" if ex["labels"][j] == ex["preds"][j] else "red")
        label = "original" if r["eps"] == 0 else f"FGSM eps {r['eps']:g}"
        row_axes[0].set_ylabel(label, fontsize=8)
    fig.suptitle(f"{model} on {dataset}: label → prediction", fontsize=9)
    return fig


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure to path as PNG (atomically)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def section(records: pd.DataFrame, ctx: ReportContext) -> list[tuple[str, str]]:
    """One pairing table per dataset, then a line for each dataset the run skipped."""
    out = [(f"Pairings: {name}", _pairings(records, name, ctx.warns))
           for name in dict.fromkeys(records_of(records, kind="attack", block="matrix")
                                     ["dataset"])]
    out += [(f"Pairings: {name}", f"Skipped: the dataset could not be loaded ({why}).\n")
            for name, why in ctx.info.get("skipped", {}).items()]
    return out


def figures(records: pd.DataFrame, figures_dir: Path, info: dict[str, Any]) -> list[Path]:
    """Per dataset: accuracy vs eps for each model, and clean and FGSM digits."""
    rows = records_of(records, kind="attack", block="matrix")
    paths = []
    for dataset in dict.fromkeys(rows["dataset"]):
        sub = rows[rows["dataset"] == dataset]
        drawn = {f"accuracy-vs-eps-{dataset}.png": _accuracy_figure(sub, dataset),
                 f"fgsm-digits-{dataset}.png": _digits_figure(sub, dataset)}
        paths += [save_figure(fig, figures_dir / name) for name, fig in drawn.items()
                  if fig is not None]
    return paths


EXPERIMENT = Experiment(
    block="matrix", Block=None, Config=AttackConfig, schema=None, cells=cells,
    tiny=lambda block: block, compute=compute, section=section, place=90, figures=figures,
    fits=lambda cell, spec: unfit_attacks([cell.config.attack], spec))
