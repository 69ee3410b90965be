"""Records -> files: `tables.md`, `records.csv`, `run.json` and PNG figures in one folder.

`write(records, out_dir) -> list[Path]` takes the DataFrame `runner.run` returns (its
`attrs["run"]` carries the run's facts) and writes, each file atomically (`files.atomic_path`):

- tables.md: a one-screen summary (each experiment's headline `finding`, the number of
  validity warnings) and contents, then "This run", each experiment's sections
  (`experiments.EXPERIMENTS`, ordered by `place`: the study's E1-E3 with the study's numbers
  beside ours, the poisoning sweeps, detection, defenses, speed, the grid's pairing tables),
  the cost per block, the validity warnings (after AutoAttack's flags, Croce & Hein, ICML
  2020) and the figures;
- records.csv: long (tidy) form, one row per cell x measure (`records_csv`): the cell's
  own scores and every detail table's numbers, no JSON inside a column;
- run.json: versions, backend, device, CPU count, git commit, date, wall time, data sources;
- figures/ (when matplotlib is installed): each experiment's `figures`.

The default folder is `results/<platform_name()>/`.
"""

from __future__ import annotations

import json
import math
import os
import platform as _platform
import re
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pandas as pd

from mlshift_jax.bench.cells import ReportContext
from mlshift_jax.bench.experiments import EXPERIMENTS
from mlshift_jax.bench.markdown import MEASURES, finite, fmt_time, md, records_of
from mlshift_jax.core import outdir
from mlshift_jax.core.files import atomic_path, write_text
from mlshift_jax.core.provenance import code_digest, git_commit, relative_source

SCORED_KINDS = ("attack", "stability")  # the kinds whose records carry model scores
PLACED = tuple(sorted(EXPERIMENTS, key=lambda e: e.place))  # tables.md's order


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
    scored = pd.concat([records_of(records, kind=k) for k in SCORED_KINDS])
    for _, r in scored.iterrows():
        measures = MEASURES if r["kind"] == "attack" else MEASURES[:4]
        ok = r.get("params_finite") is not False and all(finite(r.get(m)) for m in measures)
        if not ok:
            found.append((r["id"], "training diverged: non-finite params or scores"))
    attack = records_of(records, kind="attack")
    for _, r in attack.iterrows():
        if (r["eps"] == 0 or r["attack"] == "none") and finite(r.get("clean_accuracy")):
            if abs(r["accuracy"] - r["clean_accuracy"]) > 1e-9:
                found.append((r["id"], f"eps=0 gives accuracy {r['accuracy']:.4f}, not the "
                                       f"clean {r['clean_accuracy']:.4f}"))
        if finite(r.get("zero_grad_frac")) and r["zero_grad_frac"] > 0.5:
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


# --- the summary at the top ----------------------------------------------------------------


def summary(records: pd.DataFrame, warnings: pd.DataFrame | None = None) -> str:
    """The headline findings as a bullet list: each experiment's `finding` (E1 vs the study,
    E3 FGSM at eps 0.1 / 0.3, BadNets ASR, the best detectors, the speed-ups), then the
    number of validity warnings. A finding whose cells are not in this run is left out."""
    warnings = validity_warnings(records) if warnings is None else warnings
    found = [e.finding(records) for e in PLACED]
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
    ctx = ReportContext(info, warns)
    for e in PLACED:
        for title, text in e.section(records, ctx):
            out += [f"## {title}\n", text]
    out += ["## Cost: compute time and memory per block\n", _cost(records)]
    out += ["## Validity warnings\n", _warning_list(warnings)]
    if figures:
        out += ["## Figures\n", figures]
    body = "\n".join(out)
    top = [f"# mlshift_jax benchmark: {info['platform']}\n", summary(records, warnings),
           "**Contents**\n", contents(body)]
    return "\n".join(top) + "\n" + body


def settings_text(kv: dict[str, Any]) -> str:
    """Matrix keys as the TOML reads: "models = [mlp-ce], n_test = 100, quick = true"."""
    def value(v):
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(map(str, v)) + "]"
        return str(v).lower() if isinstance(v, bool) else str(v)
    return ", ".join(f"{k} = {value(v)}" for k, v in kv.items())


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
    for block, kv in (info.get("sample_settings") or {}).items():
        lines.append(f"- [{block}] on the bundled sample, as the matrix's [sample.{block}] "
                     f"says: {settings_text(kv)}")
    for name, why in info.get("skipped", {}).items():
        lines.append(f"- data {name}: SKIPPED, with every cell of every block on it ({why})")
    for b in info.get("skipped_blocks", []):
        lines.append(f"- [{b['block']}] on {b['dataset']}: {b['cells']} cell(s) SKIPPED, its "
                     f"settings do not fit the data ({b['reason']})")
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
        "share": [f"{v / total:.0%}" if finite(v) and finite(total) and total > 0 else "—"
                  for v in table["compute_s"]],
        "peak memory": [f"{v / 2**30:.2f} GiB" if finite(v) else "—"
                        for v in table["peak_rss"]]})
    note = ("Each block's cells (a cell shared by two blocks counts once), the time its cells "
            "took to compute (from their records: cells reused from the cache carry the time "
            "of the run that computed them; — where a record predates the measure) and the "
            "largest resident memory of the process while one of its cells ran (a lower "
            "bound, sampled every 0.2 s; it includes what the process held before). Sorted "
            "by compute time: the next growth shows at the top.")
    return md(shown, note, index=False)


def _warning_list(warnings: pd.DataFrame) -> str:
    if not len(warnings):
        return "None: every check passed.\n"
    items = [f"- `{r.id}`: {r.warning}" for r in warnings.itertuples()]
    return "\n".join(items) + ("\n\n*Checks (after AutoAttack): eps 0 reproduces clean "
                               "accuracy; noise is weaker than FGSM; PGD at least as strong "
                               "as FGSM; FGSM's step non-zero on most pixels; finite "
                               "training.*\n")


# --- figures ---------------------------------------------------------------------------------


def write_figures(records: pd.DataFrame, out_dir: str | Path) -> tuple[list[Path], str]:
    """PNG figures into out_dir/figures, each experiment's in the order of its sections;
    (paths, a note: "" or why none were drawn)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [], "matplotlib is not installed: no figures (pip install '.[plots]')."
    info = {**records.attrs.get("run", {}),  # the run's facts, and how it loaded each dataset
            "load": records.attrs.get("load", {})}
    folder = Path(out_dir) / "figures"
    return [path for e in PLACED for path in e.figures(records, folder, info)], ""


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
