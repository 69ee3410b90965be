"""Detection ([detect]): every detector on every change kind, the fingerprint change test
against clean retrains, the categorizer held out by seed, the training-data detectors and the
reference-free scan (`bench.detection_bench`, `bench.scan_bench`).

One `DetectConfig` cell per part (`detection_bench.PARTS`); the section is the detection
tables of the first dataset and seed, the finding the best detector of each kind.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from mlshift_jax.bench import detection_bench
from mlshift_jax.bench.cells import (
    Cell,
    Experiment,
    Matrix,
    Parsers,
    ReportContext,
    unfit_poisonings,
)
from mlshift_jax.bench.context import Loaded, Memo, base_record
from mlshift_jax.bench.markdown import fmt_time, md, records_of
from mlshift_jax.core.timing import PeakMemory
from mlshift_jax.detection import FINGERPRINT, benign, categorize, mm_bd, of_unit
from mlshift_jax.detection import neural_cleanse as nc
from mlshift_jax.detection.scan import NullConfig


@dataclass(frozen=True)
class DetectConfig:
    """The detection benchmark (detection_bench.run): every detector on every change kind."""

    kind: ClassVar[str] = "detect"
    dataset: str
    quick: bool
    seed: int
    part: str = "detectors"  # one of detection_bench.PARTS


@dataclass(frozen=True)
class Detect:
    """The detection benchmark: `quick` picks detection_bench.QUICK over FULL."""

    dataset: str = "mnist"
    quick: bool = False
    seed: int = 0


def schema(p: Parsers) -> dict:
    """The [detect] keys."""
    return {"dataset": p.dataset, "quick": p.chk.bool_, "seed": p.chk.rule("seed")}


def cells(matrix: Matrix, d: Detect) -> list[Cell]:
    """One cell per part of the benchmark (detection_bench.PARTS)."""
    return [Cell(f"detect/{d.dataset}/seed{d.seed}/{part}", "detect",
                 DetectConfig(dataset=d.dataset, quick=d.quick, seed=d.seed, part=part))
            for part in detection_bench.PARTS]


def tiny(d: Detect) -> Detect:
    """[detect] at the quick benchmark's size."""
    return replace(d, quick=True)


def compute(cell: Cell, loaded: Loaded, memo: Memo, cache: Path, force: bool) -> dict:
    """Run one part of the detection benchmark (`detection_bench.run`), timed whole and with
    the process's peak memory; its tables go in the record's detail."""
    cfg: DetectConfig = cell.config
    start = time.perf_counter()
    with PeakMemory() as mem:  # the speed table's detection row: the cell's time and memory
        tables = detection_bench.run(loaded.ds, quick=cfg.quick, seed=cfg.seed,
                                     parts=(cfg.part,))
    bench = detection_bench.QUICK if cfg.quick else detection_bench.FULL
    timing = tables["timing"]["seconds"]
    return {
        **base_record(cell, loaded), "model": bench.recipe, "seed": cfg.seed,
        "hidden": bench.hidden,
        "n_train": min(bench.sample_size, len(loaded.ds.y_train)),
        "train_s": float(timing.get("train population", np.nan)),
        "median_s": time.perf_counter() - start, "peak_rss_bytes": mem.peak_bytes,
        "detail": {name: json.loads(t.to_json(orient="split")) for name, t in tables.items()},
    }


def part_of(record) -> str:
    """The part a detect record ran (detection_bench.PARTS): the last piece of its id."""
    return str(record.get("id", "")).rsplit("/", 1)[-1]


def _detect_group(records: pd.DataFrame) -> pd.DataFrame:
    """The detect records of the first (dataset, seed): one per part (detection_bench.PARTS,
    the "detectors" cell first)."""
    rows = records_of(records, kind="detect")
    if not len(rows):
        return rows
    first = rows.iloc[0]
    same = rows[(rows["dataset"] == first["dataset"]) & (rows["seed"] == first["seed"])]
    order = {part: i for i, part in enumerate(detection_bench.PARTS)}
    return same.sort_values("id", key=lambda ids: ids.map(
        lambda i: order.get(part_of({"id": i}), len(order))), kind="stable")


def detection_tables(records: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The detection benchmark's tables (detection_bench.run) of the first dataset and seed:
    the tables of its cells together, their "timing" rows in one table."""
    out: dict[str, pd.DataFrame] = {}
    for _, r in _detect_group(records).iterrows():
        for name, split in r["detail"].items():
            table = pd.DataFrame(**split)
            out[name] = pd.concat([out[name], table]) if name == "timing" and name in out \
                else table
    return out


def _markdown(records: pd.DataFrame) -> str:
    t = detection_tables(records)
    if "auc" not in t:
        return "No detection cell in this run.\n"
    group = _detect_group(records)
    r = group.iloc[0]
    members = int(t["timing"].loc["population members", "seconds"])
    cells = "; ".join(f"{part_of(c)} {fmt_time(c['median_s'])}"
                      for _, c in group.iterrows())
    head = (f"{r['dataset']}: {members} {r['model']} models (hidden {int(r['hidden'])}, each on "
            f"its own random sample of {int(r['n_train']):,} training images) trained as one "
            f"population in {fmt_time(r['train_s'])}. The benchmark's cells took: {cells}.\n\n")
    auc = md(t["auc"], "ROC-AUC of each detector (rows) on each change kind (columns); blank "
             "where the detector does not apply. Input detectors score attacked vs clean test "
             "images; the fingerprint test scores changed systems vs clean retrains; "
             "activation clustering (Chen et al. 2018), spectral signatures (Tran et al. "
             "2018) and SPECTRE (Hayase et al. 2021) score poisoned vs clean training "
             "samples.", floatfmt=".3f")
    change = md(t["change_test"].astype({"n": int}), "The model-level change test per "
                "change kind, as NIST TrojAI scores its rounds: ROC-AUC against clean "
                "retrains, detection rate at alpha, mean p-value, cross-entropy of the "
                "'changed' probability. The 'clean' row is the false-positive rate on "
                "clean retrains.", floatfmt=".3f")
    confusion = md(t["confusion"], "The categorizer's confusion matrix (rows: the true "
                   "change, columns: its verdict), every cell predicted by a categorizer "
                   "trained without that cell's seed.")
    data_tab = md(t["training_data"], "Training-data detectors against the poison mask "
                  "(means over the seeds scanned, the first data_seeds). auc: ROC-AUC over all "
                  "training samples; auc_in_class: within the label holding the poison (the "
                  "detectors rank within a class); "
                  "precision / recall of the samples each would remove (spectral methods: "
                  "1.5 * eps of each class, eps the true poisoned fraction; activation "
                  "clustering: the smaller cluster of a class judged poisoned). All three "
                  "assume the poison is a minority of its class: a BadNets mixture at 10% / "
                  "20% puts about 47% / 65% poison in the target class.",
                  index=False, floatfmt=".3f")
    return (head + "### Detector × change kind: ROC-AUC\n\n" + auc
            + _detector_by_attack(t)
            + "\n### Has the model changed? (fingerprint test)\n\n" + change
            + "\n### How did it change? (categorizer, held out by seed)\n\n" + confusion
            + _lofo_section(t)
            + "\n### Which training samples are poisoned?\n\n" + data_tab
            + _scan_model(t))


def _scan_model(t: dict[str, pd.DataFrame]) -> str:
    """The held-out backdoor-scan table (bench/scan_bench.py), if the run has it."""
    if "scan_model" not in t:
        return ""
    cli_null = NullConfig()
    s = t["scan_model_summary"]["value"]
    table = t["scan_model"].astype({"models": int})
    note = (f"`mlshift scan-model`'s verdict on {int(s['heldout_models'])} models it never "
            f"saw. The verdict: Neural Cleanse (Wang et al. 2019; reversed-trigger mask norms) "
            f"and MM-BD (Wang et al. 2024; maximum margins, no trigger-shape assumption), each "
            f"scored class by class against the same class in the null (the largest robust z "
            f"of a class's log norm or log margin, centred on the model's median class), each "
            f"score's tail p-value against a null "
            f"of {int(s['null_models'])} benign models (the {len(benign.VARIANTS)} variants "
            f"in turn: retrains, pruning, quantization, float16, fine-tuning, distillation), "
            f"flagged when the smaller p is at most {s['cut']:.3f}, the cut-off that flags at "
            f"most {s['alpha']:.0%} of the null (its held-out FPR over folds of the null: "
            f"{s['null_heldout_fpr']:.3f}; Neural Cleanse alone {s['null_nc_heldout_fpr']:.3f}, "
            f"MM-BD alone {s['null_mm_bd_heldout_fpr']:.3f}). Rows: models trained apart from "
            f"the null (other seeds): plain retrains ('clean') and each benign variant "
            f"(`detected` = the false-positive rate; {s['heldout_benign_fpr']:.3f} over all of "
            f"them), then BadNets-style backdoors of each trigger family and poison rate "
            f"(target class, blended pattern and sparse pixels drawn per model). `found`: "
            f"detected with the right target; `target_accuracy`: the named class is the target, "
            f"flagged or not; `asr`: the backdoor's attack success rate (its trigger on clean "
            f"test images of other classes); `nc_flagged` / `mm_bd_flagged`: flagged by "
            f"that detector's p-value alone. Every model: {int(s['sample_size']):,} training "
            f"images, searched on {int(s['images'])} clean test images, {int(s['steps'])} Neural "
            f"Cleanse steps of {int(s['batch'])} images per class, MM-BD "
            f"{int(s['margin_steps'])} steps from {int(s['margin_starts'])} starts per class "
            f"(the CLI's defaults, for a cost the bench can pay: {cli_null.images} images, "
            f"{nc.DEFAULT.steps} steps of {nc.DEFAULT.batch}, MM-BD {mm_bd.DEFAULT.steps} "
            f"steps from {mm_bd.DEFAULT.starts} starts). "
            f"Seconds: null trained in {s['null_train_s']:.0f} and scanned in "
            f"{s['null_scan_s']:.0f}; held-out set trained in "
            f"{s['heldout_train_s']:.0f}; {s['s_per_model_population']:.2f} s per model "
            f"within the held-out scan, {s['s_per_model_single']:.2f} s for one model alone "
            f"(compiled).")
    return ("\n### Is there a backdoor? (scan-model on held-out models)\n\n"
            + md(table, note, floatfmt=".3f"))


def _decided(table: pd.DataFrame) -> tuple[list[str], dict[str, int]]:
    """A `categorize.lofo_table`'s decision columns and, over its non-benign families, the
    count named right, abstained ("uncertain"), named wrong and undetected ("none")."""
    counts = [c for c in table.columns if c not in ("category", "n", "detected", "right")]
    changed = table[table["category"] != "none"]
    named = int(sum(changed.loc[f, changed.loc[f, "category"]] for f in changed.index))
    wrong = int(changed[counts].to_numpy().sum() - named - changed["uncertain"].sum()
                - changed["none"].sum())
    return counts, {"right": named, "abstained": int(changed["uncertain"].sum()),
                    "wrong": wrong, "undetected": int(changed["none"].sum())}


def _summary(n: dict[str, int]) -> str:
    detected = n["right"] + n["abstained"] + n["wrong"]
    named = n["right"] + n["wrong"]
    return (f"Over the non-benign families: {n['right']} named right, {n['abstained']} "
            f"abstained, {n['wrong']} named wrong, {n['undetected']} undetected; of the "
            f"{detected} detected, {n['abstained'] / max(detected, 1):.0%} abstained, and "
            f"{n['right'] / max(named, 1):.0%} of those named were named right.")


_DECISIONS_NOTE = (
    "rows the family and its true category, `n` its changes (random settings, several "
    "references), `detected` the share the change test calls changed (against a null of "
    "benign models: retrains, pruning, quantization, fine-tuning and distillation, as "
    "`detect` calibrates), then how many were "
    "decided as each category or `uncertain` (\"changed, kind uncertain\": the categorizer "
    "abstains when no category reaches its threshold, chosen so that at most "
    f"{categorize.RISK:.0%} of the categories it names on held-out groups are wrong, and "
    "whenever 'none' is the most probable category of a changed verdict); an undetected "
    "change is decided 'none' (and, like every change the test misses, left out of the "
    "categorizer's training). `right`: the share decided as the family's category.")


def _lofo_section(t: dict[str, pd.DataFrame]) -> str:
    """The categorizer on the families it knows (held out by reference) and on families it
    never saw (detection_bench "categorizer_in_family", "categorizer_lofo")."""
    out = ""
    for key, title, lead in (
            ("categorizer_in_family", "Known change families (categorizer, held out by "
             "reference)", "Each change decided by a categorizer trained on every family but "
             "without the changes of its own reference (leave one reference out): "),
            ("categorizer_lofo", "Unseen change families (categorizer, leave one family out)",
             "Each row is one change family, decided by a categorizer trained WITHOUT it (and "
             "without every family of the same trigger shape): ")):
        if key in t:
            counts, n = _decided(t[key])
            out += (f"\n### {title}\n\n" + md(t[key].astype({c: int for c in counts + ["n"]}),
                                               lead + _DECISIONS_NOTE + " " + _summary(n),
                                               floatfmt=".2f"))
    return out


def _detector_by_attack(t: dict[str, pd.DataFrame]) -> str:
    """The detector x attack-kind table (ROC-AUC and TPR at the benchmark's FPR), if the
    record has it (records before it was added do not)."""
    table = t.get("detector_by_attack")
    if table is None:
        return ""
    keep = table.drop(columns=["detector", "metric"]).notna().any(axis=1)
    note = ("Each detector (rows) on each attack kind (columns), two rows per detector: "
            "ROC-AUC, and the TPR at a 5% false-positive rate (the largest TPR over ROC "
            "points with FPR <= 0.05); blank where the detector does not apply. Input "
            "detectors (confidence, margin, entropy, squeezing) and STRIP (Gao et al. 2019) "
            "score attacked vs clean test images on a clean reference; STRIP also scores "
            "triggered test images (true class not the target) vs clean test images on the "
            "model backdoored with that trigger (mixture = BadNets patch, blended, sparse, "
            "sig, warp). Training-data detectors score poisoned vs clean training samples "
            "(means over the seeds scanned); the fingerprint test scores changed systems vs "
            "clean retrains. Nothing is tuned to a column: every detector keeps its defaults.")
    return ("\n### Detector × attack kind: ROC-AUC and TPR at 5% FPR\n\n"
            + md(table[keep], note, index=False, floatfmt=".3f"))


def finding(records: pd.DataFrame) -> str | None:
    """The best detector of each kind (per input, model-level, training data) by mean
    ROC-AUC, and how many changes the categorizer names right."""
    t = detection_tables(records)
    if "auc" not in t:
        return None
    auc = t["auc"].astype(float)
    inputs = list(dict.fromkeys(f"{r['attack']} {r['eps']:g}" for _, r in
                                t["input_detectors"].iterrows())) \
        if "input_detectors" in t else []
    inputs = [c for c in inputs if c in auc.columns]
    poisons = [c for c in auc.columns if c not in inputs]
    parts = []

    def best(rows, columns, what):
        means = auc.loc[rows, columns].mean(axis=1).dropna()
        if len(means):
            name = means.idxmax()
            parts.append(f"{what}: {name} (mean ROC-AUC {means[name]:.3f} over "
                         f"{len(columns)} change kinds)")

    def rows(unit):  # the rows of the registry's detectors of one unit
        return [d.label for d in of_unit(unit) if d.label in auc.index]

    per_input, per_data = rows("input"), rows("sample")
    if inputs:
        best(per_input, inputs, "best per-input detector")
    if FINGERPRINT.label in auc.index:
        best([FINGERPRINT.label], list(auc.columns), "model-level change test")
    if poisons:
        best(per_data, poisons, "best training-data detector")
    if "confusion" in t:
        cm = t["confusion"].to_numpy(dtype=float)
        parts.append(f"the categorizer names {int(np.trace(cm))} of {int(cm.sum())} changes "
                     "right (held out by seed)")
    return "**Detection**: " + "; ".join(parts) + "." if parts else None


def section(records: pd.DataFrame, ctx: ReportContext) -> list[tuple[str, str]]:
    """The detection tables."""
    return [("Detection: telling that, and how, a model changed", _markdown(records))]


def fits(cell: Cell, spec) -> str | None:
    """The benchmark's poisonings fit the data (their target class, their patch)."""
    from mlshift_jax.poisoning.poison import make_config

    cfg = detection_bench.QUICK if cell.config.quick else detection_bench.FULL
    return unfit_poisonings([make_config(k, fraction=f) for k, f in cfg.poisonings], spec)


EXPERIMENT = Experiment(
    block="detect", Block=Detect, Config=DetectConfig, schema=schema, cells=cells, tiny=tiny,
    compute=compute, section=section, place=50, finding=finding, fits=fits)
