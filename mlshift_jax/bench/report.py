"""Records -> files: `tables.md`, `records.csv`, `run.json` and PNG figures in one folder.

`write(records, out_dir) -> list[Path]` takes the DataFrame `runner.run` returns (its
`attrs["run"]` carries the run's facts) and writes, each file atomically (`files.atomic_path`):

- tables.md: one table per study experiment (E1, E2, E3 on 10,000 and on 6,000 test images)
  with our numbers beside the study's (`study.py`) and the deltas; the poisoning sweeps
  (E4-E7, BadNets, ours vs the study); the detection tables (detector x change kind ROC-AUC,
  the change test, the categorizer's confusion matrix, training-data detectors); the speed
  table (workload x
  implementation, median time and speed-up vs numpy); a pairing table per dataset (model x
  attack@eps); validity warnings, after AutoAttack's flags (Croce & Hein, ICML 2020);
- tables.md also holds the defense x attack table (`[defenses]`): robust accuracy per
  defense and model under FGSM, PGD, the defense's adaptive attack, Square and transfer at
  each eps, with times, the obfuscated-gradient flags and a verdict per defense;
- records.csv: long (tidy) form, one row per cell x measure (`records_csv`): the cell's
  own scores and every detail table's numbers, no JSON inside a column;
- run.json: versions, backend, device, CPU count, git commit, date, wall time, data sources;
- figures/ (when matplotlib is installed): accuracy vs eps per attack for each model, and a
  grid of clean and FGSM digits at each eps; the poisoning curves and examples (`sweeps`).

The default folder is `results/<platform_name()>/`.
"""

from __future__ import annotations

import json
import math
import os
import platform as _platform
import re
import warnings
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pandas as pd

from mlshift_jax.attacks import ATTACKS
from mlshift_jax.bench import detection_bench, sweeps
from mlshift_jax.bench.torch_peer import NOT_INSTALLED
from mlshift_jax.core import fmt, outdir, study
from mlshift_jax.core.files import atomic_path, write_text
from mlshift_jax.core.provenance import code_digest, git_commit, relative_source
from mlshift_jax.core.timing import NOISY, RERUNS
from mlshift_jax.data import datasets
from mlshift_jax.detection import FINGERPRINT, categorize, of_unit

MEASURES = ("accuracy", "precision", "recall", "f1", "confidence")
PRF = ("precision", "recall", "f1", "confidence")
SCORED_KINDS = ("attack", "stability")  # the kinds whose records carry model scores


# --- where and on what -------------------------------------------------------------------------


_VENDOR = frozenset({"nvidia", "amd", "tesla", "geforce", "radeon", "tpu", "instinct"})
# where a GPU's model name ends: its memory size, form factor or memory type
_GPU_SUFFIX = re.compile(r"^(\d+gb|sxm\d*|pcie|hbm\d*e?|nvl|mig)$")


def platform_for(platform: str, device_kind: str) -> str:
    """The results folder's name for a device: "cpu", or "<platform>-<model>" such as
    "gpu-h100" ("NVIDIA H100 80GB HBM3"), "gpu-h200" ("NVIDIA H200"), "gpu-a100"
    ("NVIDIA A100-SXM4-40GB") or "tpu-v5-lite" ("TPU v5 lite"): the vendor dropped, and for
    GPUs the memory size and form factor after the model."""
    if platform == "cpu":
        return "cpu"
    words = [w for w in re.split(r"[^a-z0-9]+", device_kind.lower()) if w]
    words = [w for w in words if w not in _VENDOR]
    if platform in ("gpu", "cuda", "rocm"):
        platform = "gpu"
        for i, w in enumerate(words):
            if i and _GPU_SUFFIX.match(w):
                words = words[:i]
                break
    return f"{platform}-{'-'.join(words) or 'unknown'}"


def platform_name(device: Any = None) -> str:
    """`platform_for` the first device (or `device`): "cpu", "gpu-h200", "tpu-v5-lite"."""
    device = jax.devices()[0] if device is None else device
    return platform_for(device.platform, device.device_kind)


def default_out_dir(root: str | Path = ".") -> Path:
    """results/<platform_name()>/ under `root` (the working folder by default)."""
    return Path(root) / "results" / platform_name()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def run_info(records: pd.DataFrame) -> dict[str, Any]:
    """What run.json holds: the environment now, plus the run's facts from records.attrs."""
    devices = jax.devices()
    run = dict(records.attrs.get("run", {}))
    return {
        "platform": platform_name(devices[0]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "code_digest": code_digest(),
        "versions": {p: _version(p) for p in ("jax", "jaxlib", "numpy", "optax", "pandas")}
        | {"python": _platform.python_version()},
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "cpu_count": os.cpu_count(),
        **run,
        **({"out_dir": relative_source(str(Path(run["out_dir"]).resolve()))}
           if "out_dir" in run else {}),
    }


# --- validity warnings ---------------------------------------------------------------------------


def _rows(records: pd.DataFrame, *, kind: str | None = None,
          block: str | None = None) -> pd.DataFrame:
    """The records of one kind and/or block (an empty frame when there are none)."""
    if records.empty or "kind" not in records:
        return records.iloc[0:0]
    keep = np.ones(len(records), bool)
    if kind is not None:
        keep &= (records["kind"] == kind).to_numpy()
    if block is not None:
        keep &= (records["block"] == block).to_numpy()
    return records[keep]


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def validity_warnings(records: pd.DataFrame) -> pd.DataFrame:
    """Checks that a result is sound, as AutoAttack flags suspicious robustness numbers.

    Returns a frame (id, warning), one row per finding:
    - eps=0 or the "none" attack does not reproduce the clean accuracy;
    - random noise lowers accuracy more than FGSM at the same eps (FGSM is then not finding
      the gradient: a broken attack or masked gradients);
    - PGD is weaker than FGSM at the same eps (PGD includes FGSM's step);
    - zero input gradients: FGSM's step is 0 on more than half of the pixels;
    - training diverged: NaN/inf params or scores;
    - stale: the record was reused (`--reuse-stale`) from other code than this run's.
    """
    found: list[tuple[str, str]] = []
    if "status" in records:
        for _, r in records[records["status"] == "stale"].iterrows():
            found.append((r["id"], f"STALE: reused (--reuse-stale) from code "
                                   f"{r.get('code_digest') or 'of no recorded digest'} at "
                                   f"commit {str(r.get('commit') or 'unknown')[:12]}, not "
                                   "this run's code"))
    scored = pd.concat([_rows(records, kind=k) for k in SCORED_KINDS])
    for _, r in scored.iterrows():
        measures = MEASURES if r["kind"] == "attack" else MEASURES[:4]
        finite = r.get("params_finite") is not False and all(_finite(r.get(m)) for m in measures)
        if not finite:
            found.append((r["id"], "training diverged: non-finite params or scores"))
    attack = _rows(records, kind="attack")
    for _, r in attack.iterrows():
        if (r["eps"] == 0 or r["attack"] == "none") and _finite(r.get("clean_accuracy")):
            if abs(r["accuracy"] - r["clean_accuracy"]) > 1e-9:
                found.append((r["id"], f"eps=0 gives accuracy {r['accuracy']:.4f}, not the "
                                       f"clean {r['clean_accuracy']:.4f}"))
        if _finite(r.get("zero_grad_frac")) and r["zero_grad_frac"] > 0.5:
            found.append((r["id"], f"zero input gradients: FGSM's step is 0 on "
                                   f"{r['zero_grad_frac']:.0%} of pixels"))
    keys = ["block", "dataset", "model", "seed", "n_test", "eps"]
    for _, group in attack[attack["eps"] > 0].groupby(keys, dropna=False) if len(attack) else ():
        # cells that ask for more test images than the data has (E3's 10,000 and 6,000 on the
        # bundled sample) collapse onto the same n_test: keep one row per attack
        by = group.drop_duplicates("attack").set_index("attack")
        if "fgsm" not in by.index:
            continue
        fgsm = by.loc["fgsm"]
        for name in by.index:
            other = by.loc[name]
            if str(name).startswith("noise") and other["accuracy"] < fgsm["accuracy"]:
                found.append((fgsm["id"], f"random noise ({name}) is stronger than FGSM at "
                                          f"eps {fgsm['eps']:g}: accuracy "
                                          f"{other['accuracy']:.4f} < {fgsm['accuracy']:.4f}"))
            if name == "pgd" and other["accuracy"] > fgsm["accuracy"]:
                found.append((other["id"], f"PGD is weaker than FGSM at eps "
                                           f"{fgsm['eps']:g}: accuracy {other['accuracy']:.4f}"
                                           f" > {fgsm['accuracy']:.4f}"))
    return pd.DataFrame(found, columns=["id", "warning"]).drop_duplicates()


def _warnings_by_id(warnings: pd.DataFrame) -> dict[str, str]:
    return warnings.groupby("id")["warning"].agg("; ".join).to_dict() if len(warnings) else {}


# --- formatting ------------------------------------------------------------------------------


def fmt_time(seconds: Any) -> str:
    """1.23 s, 45.6 ms, 789 µs; "—" when missing."""
    if not _finite(seconds):
        return "—"
    s = float(seconds)
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(s) >= scale or unit == "µs":
            return f"{s / scale:.3g} {unit}"
    return f"{s:.3g} s"


def _md(frame: pd.DataFrame, note: str, *, index: bool = True, floatfmt: str = ".4f") -> str:
    """A markdown table and the line under it that says how to read it: numbers through
    `fmt.number` (scores to `floatfmt`'s decimals, counts as integers, eps as written, NaN
    blank)."""
    digits = int(floatfmt.strip(".f"))
    return f"{fmt.markdown(frame, index=index, digits=digits)}\n\n*{note}*\n"


def _delta(ours: Any, theirs: Any) -> str:
    """ours - theirs as a signed string, "—" where either is missing."""
    return f"{float(ours) - float(theirs):+.4f}" if _finite(ours) and _finite(theirs) else "—"


# --- the tables ------------------------------------------------------------------------------


def _e1(records: pd.DataFrame) -> str:
    rows = _rows(records, block="e1")
    if not len(rows):
        return "No E1 cells in this run.\n"
    table = pd.DataFrame({"study": [study.E1[m] for m in MEASURES]}, index=list(MEASURES))
    for _, r in rows.iterrows():
        table[r["model"]] = [r[m] for m in MEASURES]
        table[f"Δ {r['model']}"] = [_delta(r[m], study.E1[m]) for m in MEASURES]
    r = rows.iloc[0]
    head = (f"{r['dataset']}, trained on {int(r['n_train']):,} images (hidden {int(r['hidden'])},"
            f" lr {r['lr']:g}, {int(r['epochs'])} epoch(s), seed {int(r['seed'])}), scored on "
            f"{int(r['n_test']):,} test images.\n\n")
    note = ("Rows are the study's measures; Δ = ours − study. The study's \"performance\" "
            "0.963 is accuracy; its P/R/F1/confidence come from its attack table's first row. "
            "Confidence is the mean top sigmoid output.")
    return head + _md(table, note)


def _e2(records: pd.DataFrame) -> str:
    rows = _rows(records, kind="stability")
    if not len(rows):
        return "No E2 cells in this run.\n"
    r = rows.iloc[0]
    t = r["detail"]["table"]
    table = pd.DataFrame(t["data"], index=t["index"], columns=t["columns"])
    table["Δ accuracy vs study E1"] = [
        "—" if name == "std" else _delta(a, study.E1["accuracy"])
        for name, a in zip(table.index, table["accuracy"], strict=True)]
    head = (f"{int(r['detail']['samples'])} seed-mlp models, each trained on its own random "
            f"sample of {int(r['detail']['size']):,} {r['dataset']} training images, trained "
            f"as one population in one compiled call ({fmt_time(r['train_s'])}, compile "
            f"included); scored on "
            f"{int(r['n_test']):,} test images.\n\n")
    note = ("One row per sample, then mean / std (ddof=1) / min / max over samples. The study "
            "showed these as charts and published no numbers (study.py has none), so the only "
            f"comparison is with its full-data accuracy, {study.E1['accuracy']:g}: training on "
            f"a {int(r['detail']['size']):,}-image sample instead of the whole training set "
            "costs the difference.")
    return head + _md(table, note)


def _e3(records: pd.DataFrame, warns: dict[str, str], test_sizes: dict[str, int]) -> str:
    rows = _rows(records, kind="attack", block="e3")
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
            row |= {f"Δ {m}": _delta(r[m], ref[m]) if ref else "—" for m in PRF}
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
        parts.append(title + _md(pd.DataFrame(table), note, index=False))
    return "\n".join(parts)


def _ratio(num: Any, den: Any) -> str:
    """num / den as "1.23×", or "—" when either is missing or not positive."""
    if not (_finite(num) and _finite(den)) or num <= 0 or den <= 0:
        return "—"
    return f"{num / den:.3g}×"


def _detect_part(record) -> str:
    """The part a detect record ran (detection_bench.PARTS): the last piece of its id."""
    return str(record.get("id", "")).rsplit("/", 1)[-1]


def _detect_cell_rows(records: pd.DataFrame) -> list[dict[str, Any]]:
    """The speed table's rows for the detection benchmark cells ([detect]): the whole cell's
    wall time and the process's peak resident memory during it (sampled)."""
    out = []
    for _, r in _rows(records, kind="detect").iterrows():
        peak = r.get("peak_rss_bytes")
        out.append({
            "workload": "detection", "implementation": f"the detection benchmark cell "
            f"{_detect_part(r)} ({r.get('dataset', '')})",
            "n": "1", "median": fmt_time(r.get("median_s")), "min – max": "—",
            "rounds": 1, "spread": "—", "compile": "—", "speed-up vs numpy": "—",
            "vs torch": "—",
            "note": "one run, compile included" + (
                f"; peak memory {peak / 2**30:.2f} GiB" if _finite(peak) else ""),
        })
    return out


def _speed(records: pd.DataFrame) -> str:
    rows = _rows(records, kind="speed")
    if not len(rows):
        return "No speed cells in this run.\n"
    table, lines = [], []
    noisy = []
    for _, r in rows.iterrows():
        impls = r["detail"]["rows"]
        extra = r["detail"]["extra"]
        ref = next((i["median_s"] for i in impls if i["ref"]), None)
        peers = {i.get("task", ""): i["median_s"] for i in impls
                 if i.get("peer") and not i.get("missing")}
        for i in impls:
            missing = i.get("missing", False)
            spread = i.get("spread")
            if i.get("noisy"):
                noisy.append(r["workload"])
            table.append({
                "workload": r["workload"], "implementation": i["impl"],
                "n": f"{i['n']:,}",
                "median": NOT_INSTALLED if missing else fmt_time(i["median_s"]),
                "min – max": "—" if missing else
                f"{fmt_time(i['min_s'])} – {fmt_time(i['max_s'])}",
                "rounds": "—" if missing else i["rounds"],
                "spread": f"{spread:.0%}" + (" (noisy)" if i.get("noisy") else "")
                if _finite(spread) else "—",
                "compile": fmt_time(i["compile_s"]),
                "speed-up vs numpy": "—" if missing or not ref else _ratio(ref, i["median_s"]),
                "vs torch": "—" if missing or i.get("peer") else
                _ratio(peers.get(i.get("task", "")), i["median_s"]),
                "note": ("reference; " if i["ref"] else "") + i["note"],
            })
        if r["workload"] == "fgsm":
            lines.append(
                f"- FGSM per image: JAX {fmt_time(extra['jax_s_per_image'])} vs the study's "
                f"{extra['study_s_per_image']:.0f} s (125 h / 6,000 images): "
                f"{extra['study_over_jax_per_image']:.3g}× less.")
            lines.append(
                f"- GEMM floor: one numpy float32 GEMM with FGSM's {extra['flops'] / 1e9:.2f} "
                f"GFLOP runs at {extra['gemm_gflop_per_s']:.0f} GFLOP/s; JAX FGSM takes "
                f"{extra['jax_over_floor']:.2f}× the floor's time "
                f"({extra['jax_over_xla_floor']:.2f}× that of the same GEMM in XLA).")
        floors = [i for i in impls if _finite(i.get("over_floor"))]
        if r["workload"] == "epoch-minibatch" and floors:
            parts = [f"{i['impl'].split(' (')[0]} {i['over_floor']:.2f}×" for i in floors]
            alone = [f"{i['impl'].split(' (')[0]} {i['over_matmuls']:.2f}×" for i in floors
                     if _finite(i.get("over_matmuls"))]
            lines.append(
                f"- Minibatch floor: an epoch's matmul FLOPs over the GEMM rate measured in the "
                f"same rounds ({extra['gemm_gflop_per_s']:.0f} GFLOP/s, one large XLA GEMM); "
                f"time / floor: {', '.join(parts)}"
                + (f"; time / the same matmuls at the batch size alone: {', '.join(alone)}"
                   if alone else "") + ".")
        if r["workload"] == "population":
            lines.append(f"- Population: {extra['models']} models as one population "
                         f"({extra.get('chunk', '?')} per vmap) take "
                         f"{extra.get('population_over_separate', float('nan')):.2f}× the time "
                         f"of {extra['models']} separate JAX trainings; all {extra['models']} "
                         f"in one vmap take {extra['vmap_over_separate']:.2f}×.")
        if r["workload"] == "autoattack" and "torchattacks_robust_accuracy" in extra:
            lines.append(f"- AutoAttack at eps {extra['eps']:g}: robust accuracy "
                         f"{extra['robust_accuracy']:.3f} (JAX) vs "
                         f"{extra['torchattacks_robust_accuracy']:.3f} (torchattacks), the same "
                         f"verdict on {extra['agreement']:.1%} of images.")
        if r["workload"] == "metrics":
            lines.append(f"- Metrics: JAX and numpy scores agree within "
                         f"{extra['max_abs_diff']:.1e}.")
        if r["workload"] in ("fgsm", "pgd") and "agree_with_numpy" in extra:
            if r["workload"] == "pgd":
                lines.append(f"- PGD-{extra.get('steps', 10)}: JAX and numpy agree on "
                             f"{extra['agree_with_numpy']:.2%} of pixels.")
    table += _detect_cell_rows(records)
    versions = sorted({str(r["detail"]["extra"].get("torch")) for _, r in rows.iterrows()
                       if r["detail"]["extra"].get("torch")})
    threads = sorted({r["detail"]["extra"].get("torch_threads") for _, r in rows.iterrows()
                      if r["detail"]["extra"].get("torch_threads")})
    lines.append(f"- torch: {', '.join(versions)} (CPU build, {threads[0]} threads, passive "
                 "OpenMP waiting)" if versions else
                 "- torch: not installed (`make bench-peers` installs the `peers` extra and "
                 "reruns this table).")
    if noisy:
        counts = {w: noisy.count(w) for w in dict.fromkeys(noisy)}
        lines.append(f"- Still noisy after {RERUNS} reruns (rows with a spread > {NOISY:.0%}, "
                     "marked in the table): "
                     + ", ".join(f"{w} ({c} of its rows)" for w, c in counts.items()) + ".")
    note = ("Each workload's implementations run in the same interleaved rounds (round r "
            "times each once, the order rotating), after one compiling and one warm call each; "
            "median, min – max and `rounds` are over those rounds, and spread = (max − min) / "
            f"median. A workload with a spread over {NOISY:.0%} is rerun (up to {RERUNS} times) "
            "and its least noisy attempt kept. Inputs are on the device, each call ended by "
            "block_until_ready. Speed-up = the numpy reference row's median / this row's; vs "
            "torch = the torch row's (same task: torchattacks-style autograd for FGSM, the same "
            "recipe for a minibatch epoch) / this row's (> 1: faster). Rows timed on a subset "
            "are scaled to n, as their note says. 'not installed': torch (the `peers` extra) "
            "is missing.")
    return _md(pd.DataFrame(table), note, index=False) + "\n" + "\n".join(lines) + "\n"


def _pairings(records: pd.DataFrame, dataset: str, warns: dict[str, str]) -> str:
    rows = _rows(records, kind="attack", block="matrix")
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
            "is the median over rounds of one jitted call over the whole test set; compile is "
            "the first call, which traces and compiles only the first time an attack meets a "
            "model (the other eps reuse that compile); train is one timed training run (JAX "
            "compile included).")
    return head + _md(table, note, index=False)


def poison_tables(records: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The poisoning sweeps of the records: {"E4": table, ..., "badnets": all models'}."""
    tables, badnets = {}, []
    for detail in _rows(records, kind="poison")["detail"]:
        table = pd.DataFrame(**detail["table"])
        table.attrs.update(detail["attrs"])
        if detail["sweep"] == "badnets":
            badnets.append(table)
        else:
            tables[detail["sweep"]] = table
    if badnets:
        tables["badnets"] = sweeps.concat_tables(badnets)
    return tables


def _poison(records: pd.DataFrame) -> str:
    tables = poison_tables(records)
    if not tables:
        return "No poisoning cells in this run.\n"
    note = ("Each sweep is one population: every model of a table trained together in one "
            "jit from the shared clean data, each poisoning its own copy inside the jit. "
            "`clean_accuracy` is the study's \"performance\" (clean test images); `asr` is the "
            "attack success rate on triggered test images whose true class is not the target "
            "(BadNets, Gu et al. 2017); E4/E5's \"noisy\" trigger puts one patch position per "
            "class on every image of that class, labels kept (the reading of the study that "
            "reproduces its E4 claim; see the README).")
    return f"*{note}*\n\n" + sweeps.markdown(tables, sweeps.findings(tables))


def _detect_group(records: pd.DataFrame) -> pd.DataFrame:
    """The detect records of the first (dataset, seed): one per part (detection_bench.PARTS,
    the "detectors" cell first)."""
    rows = _rows(records, kind="detect")
    if not len(rows):
        return rows
    first = rows.iloc[0]
    same = rows[(rows["dataset"] == first["dataset"]) & (rows["seed"] == first["seed"])]
    order = {part: i for i, part in enumerate(detection_bench.PARTS)}
    return same.sort_values("id", key=lambda ids: ids.map(
        lambda i: order.get(_detect_part({"id": i}), len(order))), kind="stable")


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


def _detect(records: pd.DataFrame) -> str:
    t = detection_tables(records)
    if "auc" not in t:
        return "No detection cell in this run.\n"
    group = _detect_group(records)
    r = group.iloc[0]
    members = int(t["timing"].loc["population members", "seconds"])
    cells = "; ".join(f"{_detect_part(c)} {fmt_time(c['median_s'])}"
                      for _, c in group.iterrows())
    head = (f"{r['dataset']}: {members} {r['model']} models (hidden {int(r['hidden'])}, each on "
            f"its own random sample of {int(r['n_train']):,} training images) trained as one "
            f"population in {fmt_time(r['train_s'])}. The benchmark's cells took: {cells}.\n\n")
    auc = _md(t["auc"], "ROC-AUC of each detector (rows) on each change kind (columns); blank "
              "where the detector does not apply. Input detectors score attacked vs clean test "
              "images; the fingerprint test scores changed systems vs clean retrains; "
              "activation clustering (Chen et al. 2018), spectral signatures (Tran et al. "
              "2018) and SPECTRE (Hayase et al. 2021) score poisoned vs clean training "
              "samples.", floatfmt=".3f")
    change = _md(t["change_test"].astype({"n": int}), "The model-level change test per "
                 "change kind, as NIST TrojAI scores its rounds: ROC-AUC against clean "
                 "retrains, detection rate at alpha, mean p-value, cross-entropy of the "
                 "'changed' probability. The 'clean' row is the false-positive rate on "
                 "clean retrains.", floatfmt=".3f")
    confusion = _md(t["confusion"], "The categorizer's confusion matrix (rows: the true "
                    "change, columns: its verdict), every cell predicted by a categorizer "
                    "trained without that cell's seed.")
    data_tab = _md(t["training_data"], "Training-data detectors against the poison mask "
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
    """The reference-free scan's table (bench/scan_bench.py), if the run has it."""
    if "scan_model" not in t:
        return ""
    s = t["scan_model_summary"]["value"]
    table = t["scan_model"].astype({"models": int})
    note = (f"`mlshift scan-model` (Neural Cleanse, Wang et al. 2019): the smallest trigger "
            f"that sends clean images to each class, every class at once, and the anomaly "
            f"index of the mask norms. Threshold {s['threshold']:.2f}, calibrated on "
            f"{int(s['null_models'])} clean models of the recipe (at least 2, at most "
            f"{s['alpha']:.0%} of them above; leave-one-out false-positive rate "
            f"{s['threshold_fpr_loo']:.2f}). Rows: fresh clean models of the recipe and "
            f"benign ones trained otherwise (`detected` = false-positive rate), and models "
            f"backdoored with each trigger family at each poison rate, a different target "
            f"class each. `detected`: share flagged; `target_accuracy`: share whose most "
            f"anomalous class is the true target; `found`: flagged with the right target; "
            f"`*_log`: the same with the anomaly index of the log norms (its own "
            f"threshold {s['log_threshold']:.2f}). {int(s['images'])} clean test images, "
            f"{int(s['steps'])} steps per class; {s['s_per_model_single']:.2f} s per model "
            f"alone, {s['s_per_model_population']:.2f} s per model within one scan of all "
            f"{int(s['models'])} (compile {s['scan_compile_s']:.1f} s apart).")
    return ("\n### Is there a backdoor? (scan-model, no reference)\n\n"
            + _md(table, note, floatfmt=".3f"))


def _lofo_section(t: dict[str, pd.DataFrame]) -> str:
    """The categorizer on change families it never saw (detection_bench "categorizer_lofo")."""
    if "categorizer_lofo" not in t:
        return ""
    table = t["categorizer_lofo"]
    counts = [c for c in table.columns if c not in ("category", "n", "detected", "right")]
    changed = table[table["category"] != "none"]
    named = int(sum(changed.loc[f, changed.loc[f, "category"]] for f in changed.index))
    wrong = int(changed[counts].to_numpy().sum() - named - changed["uncertain"].sum()
                - changed["none"].sum())
    note = ("Each row is one change family, decided by a categorizer trained WITHOUT it (and "
            "without every family of the same trigger shape): rows the held-out family and "
            "its true category, `n` its changes (random settings, several references), "
            "`detected` the share the change test calls changed, then how many were decided "
            "as each category or `uncertain` (\"changed, kind uncertain\": the categorizer "
            "abstains when no category reaches its threshold, chosen so that at most "
            f"{categorize.RISK:.0%} of the categories it names on held-out families are "
            "wrong, and whenever 'none' is "
            "the most probable category of a changed verdict); an undetected change is "
            "decided 'none' (and, like every change the test misses, left out of the "
            "categorizer's training). `right`: the share decided as the family's category. "
            f"Over the non-benign families: {named} named right, "
            f"{int(changed['uncertain'].sum())} abstained, {wrong} named wrong, "
            f"{int(changed['none'].sum())} undetected.")
    return ("\n### Unseen change families (categorizer, leave one family out)\n\n"
            + _md(table.astype({c: int for c in counts + ["n"]}), note, floatfmt=".2f"))


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
            + _md(table[keep], note, index=False, floatfmt=".3f"))


# --- defenses: the defense x attack table ---------------------------------------------------

def column_title(column: str) -> str:
    """A defense-table column's title: the attack's `Attack.label`; "adaptive" and "worst"
    as they are."""
    return ATTACKS[column].label if column in ATTACKS else column


def defense_table(records: pd.DataFrame) -> pd.DataFrame:
    """The defense cells as one tidy frame: model, defense, column, attack, eps, accuracy,
    median_s (the column's whole eps sweep), clean_accuracy, defense_s, flags."""
    rows = []
    for _, r in _rows(records, kind="defense").iterrows():
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


def _defenses(records: pd.DataFrame) -> str:
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
        out.append(_md(pd.DataFrame(rows), "Robust accuracy on the first "
                       f"{int(table['n_test'].iloc[0]):,} test images (time: the column's "
                       "whole eps sweep, one compiled call, median of the timed rounds). "
                       "adaptive: the defense's own adaptive attack (eot-pgd: EOT over the "
                       "randomness; bpda-pgd: BPDA through the preprocessing); Square: "
                       "gradient-free; transfer: PGD on the undefended model; AutoAttack: "
                       "APGD-CE, APGD-T and Square (5,000 queries) on the images still "
                       "standing (Croce & Hein 2020; the rand version, APGD-CE and APGD-DLR "
                       "with EOT, on a randomized defense); worst: the images that survived "
                       "every column, counted per image.", index=False))
    times = table.drop_duplicates(["model", "defense"])[["model", "defense", "defense_s"]]
    times = times.assign(defense_s=[fmt_time(v) for v in times["defense_s"]])
    adv = _rows(records, kind="defense")
    adv = adv[adv["defense"] == "adv-train"] if "defense" in adv else adv
    if len(adv) and "pgd40_accuracy" in adv:
        lines = [f"- `{r['model']}` + adv-train (PGD-{int(r['adv_steps'])} training at eps "
                 f"{r['pgd40_eps']:g}): clean {r['clean_accuracy']:.4f}, PGD-40 at eps "
                 f"{r['pgd40_eps']:g} {r['pgd40_accuracy']:.4f}"
                 for _, r in adv.iterrows() if _finite(r.get("pgd40_accuracy"))]
        if lines:
            out.append("### Adversarial training against PGD-40\n")
            out.append("\n".join(lines) + f"\n\n*On the first {int(adv['n_test'].iloc[0]):,} "
                       "test images; PGD-40 with a random start and Madry et al.'s step size "
                       "2.5 eps / 40.*\n")
    out.append("### Time to build each defense\n")
    out.append(_md(times.rename(columns={"defense_s": "fit"}), "Adversarial training or the "
                   "denoiser's training, compile included; 0 for a pure wrapper.",
                   index=False))
    out.append("### Obfuscated-gradient flags\n")
    lines = []
    for _, r in _rows(records, kind="defense").iterrows():
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


# --- the summary at the top ----------------------------------------------------------------


def _e1_finding(records: pd.DataFrame) -> str | None:
    rows = _rows(records, block="e1")
    if not len(rows):
        return None
    by = rows.set_index("model")
    model = "seed-mlp" if "seed-mlp" in by.index else by.index[0]
    r = by.loc[model]
    return (f"**E1, the study's clean model**: {model} accuracy {r['accuracy']:.4f} vs the "
            f"study's {study.E1['accuracy']:.3f} (Δ {_delta(r['accuracy'], study.E1['accuracy'])}"
            f"); F1 {r['f1']:.4f} vs {study.E1['f1']:.4f}.")


def _e3_finding(records: pd.DataFrame) -> str | None:
    rows = _rows(records, kind="attack", block="e3")
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


def _badnets_finding(records: pd.DataFrame) -> str | None:
    table = poison_tables(records).get("badnets")
    if table is None or not {"model", "fraction", "asr", "clean_accuracy"} <= set(table):
        return None
    parts = []
    for model, group in table.groupby("model", sort=False):
        clean = group[group["fraction"] == 0]["clean_accuracy"]
        for _, r in group[group["fraction"] > 0].iterrows():
            size = f" {int(r['patch'])}x{int(r['patch'])}" if "patch" in r else ""
            cost = (f", clean accuracy {r['clean_accuracy']:.4f} "
                    f"(Δ {_delta(r['clean_accuracy'], clean.iloc[0])})" if len(clean) else "")
            parts.append(f"{model}{size} at {r['fraction']:.0%}: ASR {r['asr']:.4f}{cost}")
    return "**BadNets**: " + "; ".join(parts) + "." if parts else None


def _detect_finding(records: pd.DataFrame) -> str | None:
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


def _speed_finding(records: pd.DataFrame) -> str | None:
    parts = []
    for _, r in _rows(records, kind="speed").iterrows():
        impls = r["detail"]["rows"]
        ref = next((i["median_s"] for i in impls if i["ref"]), None)
        mine = next((i for i in impls if i["impl"].startswith("jax")), None)
        if ref and mine and _finite(mine["median_s"]) and mine["median_s"] > 0:
            parts.append(f"{r['workload']} {ref / mine['median_s']:.3g}×")
    return ("**Speed-ups of JAX over numpy** (same run): " + ", ".join(parts) + "."
            if parts else None)


def summary(records: pd.DataFrame, warnings: pd.DataFrame | None = None) -> str:
    """The headline findings as a bullet list: E1 vs the study, E3 FGSM at eps 0.1 / 0.3,
    BadNets ASR, the best detectors, the speed-ups, the number of validity warnings. A
    finding whose cells are not in this run is left out."""
    warnings = validity_warnings(records) if warnings is None else warnings
    found = [f(records) for f in (_e1_finding, _e3_finding, _badnets_finding,
                                  _detect_finding, _speed_finding)]
    found.append(f"**Validity warnings**: {len(warnings)}" + (
        " (see [Validity warnings](#validity-warnings))." if len(warnings) else "."))
    return "\n".join(f"- {line}" for line in found if line) + "\n"


def anchor(title: str) -> str:
    """The link anchor GitHub gives a markdown heading: lower case, punctuation dropped,
    spaces to hyphens ("E4–E7: training-time poisoning" -> "e4e7-training-time-poisoning")."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def contents(text: str) -> str:
    """A table of contents of the level-2 headings in text: one linked line each."""
    titles = [line[3:].strip() for line in text.splitlines() if line.startswith("## ")]
    return "\n".join(f"- [{t}](#{anchor(t)})" for t in titles) + "\n"


def tables_markdown(records: pd.DataFrame, info: dict[str, Any] | None = None,
                    figures: str = "") -> str:
    """The whole tables.md as text: a one-screen summary (headline findings, contents),
    then every section; `figures` (markdown) is the last section's body when given."""
    info = run_info(records) if info is None else info
    warnings = validity_warnings(records)
    warns = _warnings_by_id(warnings)
    out = ["## This run\n", _header(info)]
    out += ["## E1: the study's clean model\n", _e1(records)]
    out += ["## E2: stability over random training samples\n", _e2(records)]
    sizes = {k: d["n_test"] for k, d in info.get("datasets", {}).items()}
    out += ["## E3: input attacks on the study's MLP\n", _e3(records, warns, sizes)]
    out += ["## E4–E7: training-time poisoning\n", _poison(records)]
    out += ["## Detection: telling that, and how, a model changed\n", _detect(records)]
    out += ["## Defenses: defense × attack, with adaptive attacks\n", _defenses(records)]
    out += ["## Speed: workload × implementation\n", _speed(records)]
    for name in dict.fromkeys(_rows(records, kind="attack", block="matrix")["dataset"]):
        out += [f"## Pairings: {name}\n", _pairings(records, name, warns)]
    for name, why in info.get("skipped", {}).items():
        out += [f"## Pairings: {name}\n", f"Skipped: the dataset could not be loaded ({why}).\n"]
    out += ["## Cost: compute time and memory per block\n", _cost(records)]
    out += ["## Validity warnings\n", _warning_list(warnings)]
    if figures:
        out += ["## Figures\n", figures]
    body = "\n".join(out)
    top = [f"# mlshift_jax benchmark: {info['platform']}\n", summary(records, warnings),
           "**Contents**\n", contents(body)]
    return "\n".join(top) + "\n" + body


def _header(info: dict[str, Any]) -> str:
    lines = [f"- date {info['date']}, git commit {info['git_commit']}, code digest "
             f"{info.get('code_digest', '—')}, backend "
             f"{info['backend']} ({info['device_kind']} x{info['device_count']}), "
             f"{info['cpu_count']} CPUs; jax {info['versions']['jax']}, numpy "
             f"{info['versions']['numpy']}"]
    if "wall_s" in info:
        stale = info.get("stale") or 0
        skipped = info.get("skipped_cells") or 0
        lines.append(f"- matrix `{info.get('matrix')}`: {info.get('cells')} cells "
                     f"({info.get('computed')} computed in {fmt_time(info.get('compute_s'))}, "
                     f"{info.get('reused')} reused from the cache"
                     + (f", {stale} STALE (other code, --reuse-stale)" if stale else "")
                     + (f", {skipped} skipped" if skipped else "")
                     + f"), wall time {fmt_time(info['wall_s'])}")
    for name, d in info.get("datasets", {}).items():
        what = "the bundled SAMPLE, not the full dataset" if d["is_sample"] else "full"
        lines.append(f"- data {name}: {d['source']}, content {d.get('data_hash', '—')} "
                     f"({what}: {d['n_train']:,} train / {d['n_test']:,} test images, "
                     f"{d.get('n_classes', '?')} classes)")
    for name, why in info.get("skipped", {}).items():
        lines.append(f"- data {name}: SKIPPED, with every cell of every block on it ({why})")
    return "\n".join(lines) + "\n"


def cost_table(records: pd.DataFrame) -> pd.DataFrame:
    """Per block: cells, cells computed in this run, their compute time (s) and the largest
    peak resident memory (bytes) while one ran; sorted by compute time, largest first.
    Reused cells count in `cells` with the compute time their record carries (from the run
    that computed them)."""
    if records.empty or "block" not in records:
        return pd.DataFrame(columns=["block", "cells", "computed", "compute_s", "peak_rss"])
    frame = records.drop_duplicates("hash") if "hash" in records else records
    compute = pd.to_numeric(frame.get("compute_s", pd.Series(np.nan, index=frame.index)))
    peak = pd.to_numeric(frame.get("peak_rss_bytes_cell",
                                   pd.Series(np.nan, index=frame.index)))
    status = frame.get("status", pd.Series("", index=frame.index))
    out = pd.DataFrame({"block": frame["block"], "compute_s": compute, "peak_rss": peak,
                        "computed": (status == "computed").astype(int)})
    table = out.groupby("block").agg(cells=("block", "size"), computed=("computed", "sum"),
                                     compute_s=("compute_s", lambda v: v.sum(min_count=1)),
                                     peak_rss=("peak_rss", "max"))
    return table.sort_values("compute_s", ascending=False, na_position="last").reset_index()


def _cost(records: pd.DataFrame) -> str:
    table = cost_table(records)
    if not len(table):
        return "No cells in this run.\n"
    total = table["compute_s"].sum(min_count=1)
    shown = pd.DataFrame({
        "block": table["block"], "cells": table["cells"], "computed here": table["computed"],
        "compute time": [fmt_time(v) for v in table["compute_s"]],
        "share": [f"{v / total:.0%}" if _finite(v) and _finite(total) and total > 0 else "—"
                  for v in table["compute_s"]],
        "peak memory": [f"{v / 2**30:.2f} GiB" if _finite(v) else "—"
                        for v in table["peak_rss"]]})
    note = ("Each block's cells (a cell shared by two blocks counts once), the time its cells "
            "took to compute (from their records: cells reused from the cache carry the time "
            "of the run that computed them; — where a record predates the measure) and the "
            "largest resident memory of the process while one of its cells ran (a lower "
            "bound, sampled every 0.2 s; it includes what the process held before). Sorted "
            "by compute time: the next growth shows at the top.")
    return _md(shown, note, index=False)


def _warning_list(warnings: pd.DataFrame) -> str:
    if not len(warnings):
        return "None: every check passed.\n"
    items = [f"- `{r.id}`: {r.warning}" for r in warnings.itertuples()]
    return "\n".join(items) + ("\n\n*Checks (after AutoAttack): eps 0 reproduces clean "
                               "accuracy; noise is weaker than FGSM; PGD at least as strong "
                               "as FGSM; FGSM's step non-zero on most pixels; finite "
                               "training.*\n")


# --- figures ---------------------------------------------------------------------------------


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

    from mlshift_jax.bench.runner import decode_images

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


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def write_figures(records: pd.DataFrame, out_dir: str | Path) -> tuple[list[Path], str]:
    """PNG figures into out_dir/figures; (paths, a note: "" or why none were drawn)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [], "matplotlib is not installed: no figures (pip install '.[plots]')."
    rows = _rows(records, kind="attack", block="matrix")
    paths = []
    for dataset in dict.fromkeys(rows["dataset"]):
        sub = rows[rows["dataset"] == dataset]
        figures = {f"accuracy-vs-eps-{dataset}.png": _accuracy_figure(sub, dataset),
                   f"fgsm-digits-{dataset}.png": _digits_figure(sub, dataset)}
        for name, fig in figures.items():
            if fig is not None:
                paths.append(_save(fig, Path(out_dir) / "figures" / name))
    table = defense_table(records)
    if len(table):
        paths.append(_save(_defense_figure(table),
                           Path(out_dir) / "figures" / "defenses-accuracy-vs-eps.png"))
    tables = poison_tables(records)
    if tables:
        name = _rows(records, kind="poison")["dataset"].iloc[0]
        # a dataset the matrix named by path is loaded as the run loaded it
        info = records.attrs.get("run", {}).get("datasets", {}).get(name, {})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = datasets.load(**info.get("load", {"name": name}))
        paths += sweeps.figures(tables, ds, Path(out_dir) / "figures")
    return paths, ""


# --- writing it all ------------------------------------------------------------------------


# the columns that say which cell a records.csv row belongs to (its config); every other
# field of a record is a measure of that cell
CELL_COLUMNS = ("id", "hash", "kind", "block", "dataset", "model", "arch", "workload",
                "attack", "eps", "seed", "n_train", "n_test", "hidden", "lr", "epochs",
                "status", "code_digest", "commit")
LONG_COLUMNS = (*CELL_COLUMNS, "table", "row", "measure", "value", "text")
_INT_COLUMNS = ("seed", "n_train", "n_test", "hidden", "epochs")
# record fields that are neither config nor measure: run.json has them (datasets, backend)
# or the cache does (finished), or they are the record's nested detail
_NOT_MEASURES = frozenset({"data_source", "is_sample", "data_hash", "backend",
                           "device_kind", "finished", "detail"})
# the key columns of a detail table's rows (the rest are its measures); a table not named
# here is keyed by its index
_ROW_KEYS = {"input_detectors": ("attack", "eps", "detector"),
             "training_data": ("detector", "change"),
             "detector_by_attack": ("detector", "metric"), "strip": ("change",),
             "rows": ("impl", "column", "attack", "eps")}  # a speed cell's or a defense's
_SKIPPED_DETAIL = frozenset({"examples", "detectors"})  # digit images; the detectors' docs


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _entry(measure: str, value: Any) -> dict[str, Any] | None:
    """One measure as (measure, value, text): numbers (bools as 0/1) in value, anything else
    in text; None where the value is missing."""
    if _missing(value):
        return None
    if isinstance(value, (bool, np.bool_)):
        return {"measure": measure, "value": float(value), "text": ""}
    if isinstance(value, (int, float, np.integer, np.floating)):
        return {"measure": measure, "value": float(value), "text": ""}
    return {"measure": measure, "value": np.nan, "text": str(value)}


def _row_key(values: dict, keys: tuple[str, ...]) -> str:
    return " ".join(f"{values[k]:g}" if isinstance(values[k], float) else str(values[k])
                    for k in keys)


def _table_entries(name: str, table: Any) -> list[dict[str, Any]]:
    """A detail table -> entries {table, row, measure, value, text}. table: pandas'
    split-orient dict {index, columns, data}, a list of row dicts, or a flat dict."""
    if isinstance(table, dict) and {"columns", "data"} <= set(table):
        columns = list(table["columns"])
        index = table.get("index") or list(range(len(table["data"])))
        rows = [(i, dict(zip(columns, row, strict=True)))
                for i, row in zip(index, table["data"], strict=True)]
    elif isinstance(table, list):
        rows = list(enumerate(table))
    else:
        rows = [("", table)]
    out = []
    for index, values in rows:
        if not isinstance(values, dict):  # a list of plain values (a defense's flags)
            values = {"value": values}
        keys = tuple(k for k in _ROW_KEYS.get(name, ()) if k in values)  # a speed cell's
        key = _row_key(values, keys) if keys else str(index)  # "rows" are not a defense's
        for measure, value in values.items():
            if measure in keys or measure == "note":  # a speed row's note: tables.md has it
                continue
            entry = _entry(str(measure), value)
            if entry is not None:
                out.append({"table": name, "row": key, **entry})
    return out


def _detail_entries(record: dict) -> list[dict[str, Any]]:
    """The measures inside a record's detail, by table (scalars in the table "detail")."""
    detail = record.get("detail")
    if not isinstance(detail, dict):
        return []
    out, scalars = [], {}
    for name, part in detail.items():
        if name in _SKIPPED_DETAIL:
            continue
        if isinstance(part, (dict, list)) and not (name == "attrs" or name == "extra"):
            if name == "table":  # a poison cell's sweep table, a stability cell's samples
                name = str(detail.get("sweep", record.get("kind")))
            out += _table_entries(name, part)
        elif isinstance(part, dict):  # a poison sweep's attrs, a speed cell's extra
            out += [{"table": name, "row": "", **e} for k, v in part.items()
                    if (e := _entry(k, v)) is not None]
        else:
            scalars[name] = part
    out += [{"table": "detail", "row": "", **e} for k, v in scalars.items()
            if (e := _entry(k, v)) is not None]
    return out


def records_csv(records: pd.DataFrame) -> pd.DataFrame:
    """The records in long (tidy) form, as records.csv holds them: one row per cell x measure.

    Columns: CELL_COLUMNS (which cell: id, kind, dataset, model, attack, eps, ..., and the
    code_digest and commit of the code that computed it), then
    `table` ("cell" for the cell's own measures, else the detail table it comes from: "E7",
    "auc", "cells", "rows" of a speed cell, ...), `row` (the row of that table: a detector,
    a sample, an implementation; "" for scalars), `measure`, `value` (a number; booleans as
    0/1) and `text` (the value when it is not a number, e.g. a categorizer's verdict; else
    ""). Missing values are left out. The digit images and the detectors' documentation
    table stay in the cache only. Pivot back with e.g.
    `csv[csv.table == "cell"].pivot(index="id", columns="measure", values="value")`.
    """
    rows = []
    for record in records.to_dict("records"):
        cell = {c: record.get(c) for c in CELL_COLUMNS}
        cell = {c: (None if _missing(v) else v) for c, v in cell.items()}
        own = [{"table": "cell", "row": "", **e} for k, v in record.items()
               if k not in CELL_COLUMNS and k not in _NOT_MEASURES
               and (e := _entry(k, v)) is not None]
        rows += [{**cell, **entry} for entry in own + _detail_entries(record)]
    out = pd.DataFrame(rows, columns=list(LONG_COLUMNS))
    for c in _INT_COLUMNS:  # counts stay integers where some cells lack them
        out[c] = pd.to_numeric(out[c]).round().astype("Int64")
    return out


def write(records: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write tables.md, records.csv, run.json and figures/ into out_dir (atomically, each),
    listed in its manifest (`core.outdir`); figures an earlier run listed and this one did not
    draw are removed, so the folder holds one run. ConfigError for a folder holding files
    mlshift did not write, the filesystem root, the home folder or the folder holding the package.

    records: what `runner.run` returns. Returns the paths written.
    """
    out_dir = outdir.claim(out_dir)
    paths = [out_dir / "tables.md", out_dir / "records.csv", out_dir / "run.json"]
    outdir.record(out_dir, files=paths, folders=["figures"])  # listed before they exist
    info = run_info(records)
    figures, note = write_figures(records, out_dir)
    outdir.record(out_dir, files=figures)
    links = "\n".join(f"- [{p.name}](figures/{p.name})" for p in figures) or note
    text = tables_markdown(records, info, figures=links + "\n" if links else "")
    write_text(paths[0], text)
    with atomic_path(paths[1]) as tmp:
        records_csv(records).to_csv(tmp, index=False)
    write_text(paths[2], json.dumps(info, indent=2, default=str) + "\n")
    # one run per folder: figures an earlier run drew (listed in the manifest) and this one
    # did not are removed; nothing the manifest does not list is ever touched
    outdir.remove_listed(out_dir, figures, under="figures")
    outdir.clean_temps(out_dir)
    return paths + figures
