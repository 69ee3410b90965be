"""Run an experiment matrix: compute every selected cell once, caching each one.

`run(matrix_path, *, out_dir, only=None, force=False) -> pandas.DataFrame` of records, one row
per selected cell (all cells, or those whose id matches `only`), in matrix order. Its
`attrs["run"]` holds the run's facts (wall time, data source per dataset, skipped datasets,
cells computed / reused) for `report.write`. A dataset that fails to load (DataError, e.g.
Fashion-MNIST not installed) is skipped with a note on stderr and in `attrs["run"]["skipped"]`;
a cell whose block's settings do not fit its dataset (`Experiment.fits`: a target class the
data lacks, a patch larger than its images, an attack needing more classes) is skipped with
a note and listed in `attrs["run"]["skipped_blocks"]`; `skipped_cells` counts both.
Each cell is computed by its experiment's `compute` (`experiments.BY_BLOCK[cell.block]`).

The cache lives in `<out_dir>/.cache/` (git-ignored), so each results folder carries its own:

    .cache/cells/<cell hash>.json          one finished cell's record
    .cache/params/<train hash>-<data hash>-<determinism>.npz / .json   trained params, time

A damaged entry (unreadable, truncated, not a record of its cell) counts as missing: it is
rebuilt, and one warning line lists what was damaged. Every key includes
`determinism_key()` (jaxlib, backend, device kind, CPU cores): see the README.

Every file is written atomically (`files.atomic_path`): an interrupted run leaves whole files,
and the next run computes only the cells whose record is missing. A cached record counts only
if it was computed on the same data (its `data_hash`, a fingerprint of the loaded arrays);
`force=True` recomputes (and retrains) everything selected.

Timing follows `timing.py` (`context.measure`): inputs are put on the device first; the first
call (trace + compile + run) is `compile_s`; then `rounds` calls, ended by
`block_until_ready`, give median / min / max (fewer rounds, at least one, where one call
would exceed `max_seconds`). Training is timed once (`time_once`, compile included for JAX).
The numpy baseline is timed in the same run as the JAX code it is compared with: both live in
one speed cell (`experiments.speed`).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
import warnings
from dataclasses import replace
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import jax
import pandas as pd
from tqdm import tqdm

from mlshift_jax.bench.cells import Cell
from mlshift_jax.bench.context import Loaded, Memo, data_hash, determinism_key, json_default
from mlshift_jax.bench.experiments import BY_BLOCK
from mlshift_jax.bench.matrix import Matrix, cells, load, on_sample, select, with_dataset
from mlshift_jax.bench.matrix import tiny as tiny_matrix
from mlshift_jax.bench.report import settings_text
from mlshift_jax.core import memory_maps, outdir
from mlshift_jax.core.errors import ConfigError, DataError, Interrupted
from mlshift_jax.core.files import write_text
from mlshift_jax.core.provenance import code_digest, git_commit, relative_source
from mlshift_jax.core.timing import PeakMemory
from mlshift_jax.data import datasets

CACHE_DIR = ".cache"


def _load_datasets(names: list[str], matrix: Matrix | None = None, data_dir: str | None = None
                   ) -> tuple[dict[str, Loaded], dict[str, str]]:
    """({name: Loaded}, {name: why it was skipped}). A DataError skips that dataset only.
    A name the matrix defines by path ([datasets.<name>]) is loaded from there, named `name`;
    data_dir (bench --data-dir) is where the built-in datasets are looked for."""
    loaded, skipped = {}, {}
    for name in names:
        try:
            ds = datasets.load(**_load_kwargs(matrix, name, data_dir))
            if ds.name != name:
                ds = replace(ds, name=name)
        except DataError as e:
            skipped[name] = str(e)
            print(f"mlshift: skipping {name}: {e}", file=sys.stderr)
            continue
        loaded[name] = Loaded(ds, data_hash(ds))
    return loaded, skipped


def _load_kwargs(matrix: Matrix | None, name: str, data_dir: str | None) -> dict:
    """The `datasets.load` arguments of dataset `name` in this run."""
    kw = matrix.load_kwargs(name) if matrix else {"name": name}
    if data_dir is not None and kw == {"name": name}:
        kw["data_dir"] = data_dir
    return kw


# --- progress --------------------------------------------------------------------------------

LINE_FORMAT = "[{n_fmt}/{total_fmt}] {percentage:3.0f}% elapsed {elapsed} eta {remaining}"


class Progress:
    """The progress of a run's cells on `stream` (default stderr), for any kind of stream.

    On a terminal: a live tqdm bar (count, percent, elapsed, ETA, the running cell). Off a
    terminal (a log file, a pipe, CI): one line per finished cell, "[3/27]  11% elapsed
    00:42 eta 05:36  <cell id> (12.3 s)", the ETA = mean time per finished cell x cells left.
    `start(label)` when a cell begins, `done(label)` when it ends, `close()` at the end.
    """

    def __init__(self, total: int, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.n = int(total), 0
        self.start_time = self.cell_time = time.perf_counter()
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = tqdm(total=self.total, file=self.stream, unit="cell", dynamic_ncols=True,
                        mininterval=0) if self.live and self.total else None

    def start(self, label: str) -> None:
        """A cell begins (shown on the live bar)."""
        self.cell_time = time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=True)

    def done(self, label: str) -> None:
        """A cell has finished: advance the bar, or write its line."""
        self.n += 1
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(1)
            return
        meter = tqdm.format_meter(self.n, self.total, now - self.start_time,
                                  bar_format=LINE_FORMAT)
        self.stream.write(f"{meter}  {label} ({now - self.cell_time:.1f} s)\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar (a no-op off a terminal)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --- the run -----------------------------------------------------------------------------------


def _dataset_of(cell: Cell) -> str:
    return cell.config.dataset


def _cached(cache: Path, cell: Cell, loaded: Loaded, damaged: list,
            reuse_stale: bool = False) -> dict | None:
    """The cached record to reuse for `cell`, or None to compute it.

    A record counts if it is whole and was computed on the same data under the same
    `determinism_key` by the same code (`provenance.code_digest`). A record of other code is
    stale: None (recomputed), unless `reuse_stale`, when it is returned as it is (its
    `code_digest` and `commit` name the code that made it). A damaged record (unreadable, not
    JSON, not a record of this cell) is listed in `damaged` and treated as missing."""
    path = cache / "cells" / f"{cell.hash}.json"
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
        whole = (isinstance(record, dict) and record.get("hash") == cell.hash
                 and isinstance(record.get("data_hash"), str))
    except (OSError, ValueError):
        whole = False
    if not whole:
        damaged.append(f"cells/{path.name}")
        return None
    if record.get("data_hash") != loaded.hash or BY_BLOCK[cell.block].redo(record):
        return None
    if record.get("determinism") != determinism_key():
        return None
    if record.get("code_digest") != code_digest() and not reuse_stale:
        return None
    return record


def _warn_damaged(cache: Path, damaged: list) -> None:
    if damaged:
        shown = ", ".join(damaged[:3]) + (f" and {len(damaged) - 3} more" if len(damaged) > 3
                                          else "")
        warnings.warn(f"{len(damaged)} damaged cache entr{'y' if len(damaged) == 1 else 'ies'} "
                      f"in {cache} treated as missing and rebuilt: {shown}", stacklevel=3)


MATRICES = Path(str(resources.files("mlshift_jax.bench") / "matrices"))  # package data
DEFAULT_MATRIX = MATRICES / "full.toml"  # `mlshift bench`
QUICK_MATRIX = MATRICES / "quick.toml"  # `mlshift bench --quick`
# how run.json names the default matrix: now, and before it moved into the package
_DEFAULT_NAMES = (relative_source(str(DEFAULT_MATRIX)), "bench/matrix.toml")


def _holds_default_run(out_dir: str | Path) -> bool:
    """Whether `out_dir` holds a full-data run of the default matrix (what the committed
    results/<platform>/ holds): told by its run.json (the matrix it names, not tiny, no
    dataset from the bundled sample), wherever the folder is."""
    path = Path(out_dir) / "run.json"
    try:
        if not path.is_file() or path.stat().st_size > outdir.MAX_BYTES:
            return False
        info = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError, UnicodeDecodeError):
        return False
    if not isinstance(info, dict) or not isinstance(info.get("matrix"), str):
        return False
    named = info["matrix"]
    default = any(named == n or named.endswith("/" + n) for n in _DEFAULT_NAMES)
    datasets = info.get("datasets")
    full = isinstance(datasets, dict) and all(
        isinstance(d, dict) and d.get("is_sample") is False for d in datasets.values())
    return default and full and not info.get("tiny")


def _check_committed(out_dir, matrix_path, dataset, sample: bool) -> None:
    """A folder holding the default matrix's run on the full data (the committed
    results/<platform>/, recognised by its run.json) takes only that run again: ConfigError
    for another matrix, --dataset or the bundled sample there."""
    if not _holds_default_run(out_dir):
        return
    same = Path(matrix_path).resolve() == DEFAULT_MATRIX.resolve() and dataset is None
    if same and sample:
        raise ConfigError(f"--out {out_dir}: the committed results of the full data; refusing "
                          "to write a run on the bundled sample there (set MLSHIFT_DATA_DIR "
                          "or give --out another folder)")
    if not same:
        raise ConfigError(f"--out {out_dir}: the committed results of the default matrix; "
                          f"refusing to write {Path(matrix_path).name}"
                          f"{' on ' + dataset if dataset else ''} there; give --out another "
                          "folder")


def _file_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes (first 12 hex): what names a matrix in run.json, with its
    path relative to the repository."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


_ABS_PATH = re.compile(r"(?<![\w:./~-])/[^\s'\",;()]+")


def _without_paths(text: str) -> str:
    """text with each absolute path in it made relative (`provenance.relative_source`)."""
    return _ABS_PATH.sub(lambda m: relative_source(m.group(0)), text)


def run(matrix_path: str | Path, *, out_dir: str | Path, only: str | None = None,
        force: bool = False, data_dir: str | None = None, dataset: str | None = None,
        sample_out_dir: str | Path | None = None, reuse_stale: bool = False,
        tiny: bool = False, allow_code: tuple[str, ...] = ()) -> pd.DataFrame:
    """Run the cells of the matrix at `matrix_path` whose id matches `only` (fnmatch pattern
    or substring; None: all); reuse cached cells unless `force`. Returns their records.

    data_dir: where every dataset is looked for (`datasets.load`); dataset: run the matrix on this
    dataset instead of its own (`matrix.with_dataset`); sample_out_dir: where the run goes
    instead of `out_dir` when a dataset comes from the bundled sample (said in one line), so
    a sample run never lands in a full-data results folder. `attrs["run"]["out_dir"]` is the
    folder used. Ctrl-C raises `Interrupted` (how many cells are cached). reuse_stale: reuse
    cached cells computed by other code (another `code_digest`) instead of recomputing them;
    their records get status "stale" and keep the digest and commit of the code that made
    them (the report marks them). tiny: every cell at a smoke test's size (`matrix.tiny`).
    allow_code: the user model references ("pkg.module:attr") the caller names; the matrix
    may name no other (`matrix.parse`).

    Each record is one row: id, kind, block, dataset, model, attack, eps, seed, n_train,
    n_test, accuracy, precision, recall, f1, confidence, clean_accuracy, compile_s, median_s,
    min_s, max_s, iqr_s, rounds, train_s, ..., code_digest and commit (the code that computed
    it), compute_s and peak_rss_bytes_cell (the cell's wall time and the process's peak
    resident memory while it ran, when it was computed), status ("computed", "reused" or
    "stale") and `detail` (a dict: digit examples, the stability table, a speed cell's
    implementations).
    """
    start, started = time.perf_counter(), datetime.now(timezone.utc)
    mx = load(matrix_path, allow_code=allow_code)
    if dataset is not None:
        mx = with_dataset(mx, dataset)
    if tiny:
        mx = tiny_matrix(mx)
    selected = select(cells(mx), only)
    if not selected:
        raise ConfigError(f"{matrix_path}: no cell id matches {only!r}; ids look like "
                          f"{cells(mx)[0].id!r}")
    names = list(dict.fromkeys(_dataset_of(c) for c in selected))
    try:
        loaded, skipped = _load_datasets(names, mx, data_dir)
    except KeyboardInterrupt:  # before any cell ran: say what the cache already holds
        cells_dir = Path(out_dir) / CACHE_DIR / "cells"
        held = sum((cells_dir / f"{c.hash}.json").is_file() for c in selected)
        raise Interrupted(held, len(selected)) from None
    if not loaded:
        raise DataError(f"{matrix_path}: no dataset of the matrix could be loaded: "
                        + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    sampled = [n for n, d in loaded.items() if d.ds.is_sample]
    sample_settings = {name: dict(keys) for name, block, keys in mx.sample_blocks
                       if getattr(block, "dataset", None) in sampled}
    if sample_settings:  # the bundled sample: the blocks' [sample.<block>] settings
        mx = on_sample(mx, sampled)
        selected = select(cells(mx), only)
        print("mlshift: the bundled sample: " + "; ".join(
            f"[{b}] {settings_text(kv)}" for b, kv in sample_settings.items())
            + " (the matrix's [sample.<block>] tables)", file=sys.stderr)
    if sample_out_dir is not None and any(d.ds.is_sample for d in loaded.values()):
        print(f"mlshift: the bundled sample, not the full data: results go to "
              f"{sample_out_dir}, not {out_dir}", file=sys.stderr)
        out_dir = sample_out_dir
    _check_committed(out_dir, matrix_path, dataset,
                     any(d.ds.is_sample for d in loaded.values()))
    outdir.claim(out_dir)  # only a folder mlshift wrote, or a new one
    outdir.record(out_dir, folders=[CACHE_DIR])
    cache = Path(out_dir) / CACHE_DIR
    outdir.clean_temps(out_dir)  # what a hard-killed run left half-written
    records: dict[str, dict] = {}
    todo = []
    memo = Memo({}, {}, {}, [], {})
    unfit: dict[tuple[str, str, str], list[str]] = {}  # (block, dataset, why) -> cell ids
    for cell in selected:
        name = _dataset_of(cell)
        if name in skipped:
            continue
        why = BY_BLOCK[cell.block].fits(cell, loaded[name].ds.spec)
        if why is not None:  # the block's settings do not fit this dataset: listed, not run
            unfit.setdefault((cell.block, name, why), []).append(cell.id)
            continue
        record = None if force else _cached(cache, cell, loaded[name], memo.damaged,
                                            reuse_stale)
        if record is None:
            todo.append(cell)
        else:
            status = "reused" if record.get("code_digest") == code_digest() else "stale"
            records[cell.id] = {**record, "id": cell.id, "block": cell.block, "status": status}
    for (block, name, why), ids in unfit.items():
        print(f"mlshift: skipping {len(ids)} [{block}] cell(s) on {name}: {why}",
              file=sys.stderr)
    by_hash: dict[str, dict] = {}
    shown = Progress(len(todo))
    try:
        for cell in todo:
            shown.start(cell.id)
            record = by_hash.get(cell.hash)
            if record is None:
                began = time.perf_counter()
                with PeakMemory(interval=0.2) as mem:
                    record = BY_BLOCK[cell.block].compute(cell, loaded[_dataset_of(cell)],
                                                          memo, cache, force)
                record["compute_s"] = time.perf_counter() - began
                record["peak_rss_bytes_cell"] = mem.peak_bytes
                record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
                if jax.process_index() == 0:  # several hosts run the same cells; one writes
                    write_text(cache / "cells" / f"{cell.hash}.json",
                               json.dumps(record, indent=1, default=json_default))
                by_hash[cell.hash] = record
            records[cell.id] = {**record, "id": cell.id, "block": cell.block,
                                "status": "computed"}
            shown.done(cell.id)
            memory_maps.relieve()  # 150+ cells of compiles would pass the kernel's map limit
    except KeyboardInterrupt:
        shown.close()
        _warn_damaged(cache, memo.damaged)
        raise Interrupted(len(records), len(selected)) from None
    shown.close()
    _warn_damaged(cache, memo.damaged)
    frame = pd.DataFrame([records[c.id] for c in selected if c.id in records])
    computed = {c.hash: by_hash[c.hash] for c in todo if c.hash in by_hash}
    frame.attrs["run"] = {
        "matrix": relative_source(str(matrix_path)), "matrix_sha256": _file_hash(matrix_path),
        "only": only, "force": force, "reuse_stale": reuse_stale, "tiny": tiny,
        "sample_settings": sample_settings,
        "started": started.isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - start,
        "cells": len(selected), "computed": len(todo),
        "reused": sum(r["status"] == "reused" for r in records.values()),
        "stale": sum(r["status"] == "stale" for r in records.values()),
        "skipped_cells": sum(_dataset_of(c) in skipped for c in selected)
        + sum(len(ids) for ids in unfit.values()),
        # cells whose block's settings do not fit their dataset (`Experiment.fits`)
        "skipped_blocks": [{"block": block, "dataset": name, "cells": len(ids),
                            "reason": _without_paths(why)}
                           for (block, name, why), ids in unfit.items()],
        "compute_s": sum(float(r.get("compute_s") or 0.0) for r in computed.values()),
        "code_digest": code_digest(), "commit": git_commit(),
        "datasets": {n: {"source": relative_source(d.ds.source), "is_sample": d.ds.is_sample,
                         "n_train": len(d.ds.y_train), "n_test": len(d.ds.y_test),
                         "data_hash": d.hash, "image_shape": list(d.ds.image_shape),
                         "n_classes": d.ds.n_classes, "input_range": list(d.ds.input_range),
                         "load": {k: relative_source(v) if isinstance(v, str) else v
                                  for k, v in mx.load_kwargs(n).items()}}
                     for n, d in loaded.items()},
        "skipped": {n: _without_paths(why) for n, why in skipped.items()},
        "out_dir": str(out_dir),  # report.run_info writes it relative (run.json)
        "determinism": determinism_key(),
    }
    # how each dataset loaded, absolute paths kept (figures reload it; never written)
    frame.attrs["load"] = {n: _load_kwargs(mx, n, data_dir) for n in loaded}
    return frame

