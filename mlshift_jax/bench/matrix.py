"""The experiment matrix as data: a TOML file -> frozen dataclasses -> cells.

A matrix file (see `matrices/full.toml`) has these tables; every key not listed is an error:

    [matrix]      datasets, models, attacks, eps, seeds = [0], hidden = 200, n_train, n_test
    [datasets.<name>]         a dataset by path, usable wherever a dataset name is:
                              path (a .npz or a folder, relative to the matrix file),
                              scale ("unit", "study" or [lo, hi]), image_shape ([H, W, C]),
                              n_classes (see `data.load`)
    [timing]      rounds = 3, max_seconds = 10.0
    [train.<model>]           TrainConfig fields for one recipe: hidden, lr, epochs,
                              batch_size, optimizer (the rest take the recipe's defaults)
    [attack_options.<attack>] keyword options of one attack (e.g. pgd: steps, step_size)
    [sample.<block>]          keys of a block table the file has (any but dataset), used in
                              place of its own when its dataset is the bundled sample
                              (`on_sample`; `--tiny` keeps its own tiny sizes instead)

and one optional table per experiment of `experiments.EXPERIMENTS`: its `block` names the
table ([e1], [e2], [e3]: the study's E1-E3, as committed matrices spell them; [speed],
[poison], [detect], [defenses]), its `schema` the keys the table accepts, its `Block`
dataclass their defaults. The docstring of each module of `bench/experiments/` says what its
table runs. full.toml's `[sample.<block>]` tables preview every table on the bundled sample in
minutes; run.json's `sample_settings` and tables.md's "This run" say which keys were replaced.

n_train / n_test cap the data to its first n images (file order); absent means all of it (a
block's own, else the [matrix] table's). A model is a built-in recipe name or a user model
"pkg.module:attr" (`usermodels`; its module on PYTHONPATH or in the working folder, imported
when the matrix expands; `[train."pkg.mod:attr"]` sets its training). A cell's hash covers
the ref, not the user's code: after editing the model, rerun with --force.

`load(path) -> Matrix`; `cells(matrix) -> tuple[Cell, ...]` (`cells.Cell`: one unit of work
and of caching, named by its config's hash).
"""

from __future__ import annotations

import fnmatch
import math
import stat
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from mlshift_jax.attacks import ATTACKS
from mlshift_jax.bench.cells import (
    TINY_HIDDEN,
    TINY_TEST,
    TINY_TRAIN,
    Cell,
    Checker,
    Matrix,
    Models,
    Parsers,
    Timing,
    attack_option_keys,
    cap,
    common_schema,
    is_model_ref,
)
from mlshift_jax.bench.experiments import EXPERIMENTS
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.core.files import file_kind
from mlshift_jax.data.datasets import DATASETS
from mlshift_jax.models.recipes import RECIPES
from mlshift_jax.models.train import OPTIMIZERS

MAX_MATRIX_BYTES = 1 << 20


# --- parsing and checking ----------------------------------------------------------------------


def _parse_block(chk: Checker, raw: dict, where: str, cls, schema: dict) -> Any:
    """A block table -> `cls`, each key parsed by `schema[key](value, where.key)`."""
    chk.table(raw, where, set(schema))
    return cls(**{k: schema[k](v, f"{where}.{k}") for k, v in raw.items()})


def _code_refs(raw: Any) -> list[str]:
    """Every key and string value of the parsed TOML spelled as "pkg.module:attr"."""
    found, stack = [], [raw]
    while stack:  # iterative: nesting depth is bounded by the parser, not by recursion here
        item = stack.pop()
        if isinstance(item, dict):
            found += [k for k in item if is_model_ref(k)]
            stack += list(item.values())
        elif isinstance(item, list):
            stack += item
        elif is_model_ref(item):
            found.append(item)
    return found


def parse(text: str, path: str = "<matrix>", *, allow_code: Iterable[str] = ()) -> Matrix:
    """Parse matrix TOML `text`; `path` names the file in errors.

    allow_code: the user model references ("pkg.module:attr") the caller names itself
    (`bench --model REF`). A matrix is data: a reference it names that is not in
    `allow_code` is refused (ConfigError) before anything is imported."""
    chk = Checker(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:  # arrays or tables nested tens of thousands deep
        raise ConfigError(f"{path}: expected a matrix TOML file, found values nested too "
                          "deeply to read") from None
    unnamed = sorted(set(_code_refs(raw)) - set(allow_code))
    if unnamed:
        raise ConfigError(f"{path}: names the user model {unnamed[0]!r}, code that is never "
                          "imported because a file names it; to run it, name it yourself: "
                          f"bench --model {unnamed[0]}")
    chk.table(raw, "top level", {"matrix", "datasets", "timing", "train", "attack_options",
                                 "sample", *(e.block for e in EXPERIMENTS if e.Block is not None)},
              {"matrix"})
    sources = _parse_sources(chk, raw.get("datasets", {}), Path(path).parent)
    models, attacks = Models(RECIPES), set(ATTACKS)
    datasets = set(DATASETS) | {name for name, _ in sources}

    def dataset(v, w):
        return chk.name(v, w, datasets, "dataset")

    def model(v, w):
        return chk.name(v, w, models, "model")

    common = common_schema(chk)

    m = chk.table(raw["matrix"], "[matrix]",
                  {"datasets", "models", "attacks", "eps", "seeds", "hidden", "n_train",
                   "n_test"}, {"datasets", "models", "attacks", "eps"})
    fields: dict[str, Any] = {
        "path": path,
        "sources": sources,
        "datasets": chk.names(m["datasets"], "[matrix].datasets", datasets, "dataset"),
        "models": chk.names(m["models"], "[matrix].models", models, "model"),
        "attacks": chk.names(m["attacks"], "[matrix].attacks", attacks, "attack"),
        "eps": chk.eps_list(m["eps"], "[matrix].eps"),
    }
    if "seeds" in m:
        seeds = chk.list_(m["seeds"], "[matrix].seeds")
        fields["seeds"] = tuple(chk.rule("seed")(s, "[matrix].seeds") for s in seeds)
    for key in ("hidden", "n_train", "n_test"):
        if key in m:
            fields[key] = common[key](m[key], f"[matrix].{key}")

    if "timing" in raw:
        fields["timing"] = _parse_block(chk, raw["timing"], "[timing]", Timing,
                                        {"rounds": chk.rule("rounds"),
                                         "max_seconds": chk.rule("max_seconds")})
    fields["train"] = _parse_train(chk, raw.get("train", {}), models)
    fields["attack_options"] = _parse_attack_options(chk, raw.get("attack_options", {}),
                                                     attacks)
    parsers = Parsers(chk, common, dataset, model,
                      lambda v, w: chk.names(v, w, models, "model"),
                      lambda v, w: chk.names(v, w, attacks, "attack"))
    fields["blocks"] = tuple(
        (e.block, _parse_block(chk, raw[e.block], f"[{e.block}]", e.Block, e.schema(parsers)))
        for e in EXPERIMENTS if e.Block is not None and e.block in raw)
    fields["sample_blocks"] = _parse_sample(chk, raw, parsers)
    matrix = Matrix(**fields)
    cells(matrix)  # resolves every recipe config: a bad value fails here, naming the file
    return matrix


BLOCKS = frozenset(e.block for e in EXPERIMENTS if e.Block is not None)


def _parse_sample(chk: Checker, raw: dict, parsers: Parsers) -> tuple:
    """[sample.<block>] tables: keys of a block the file has, replaced when that block's
    dataset is the bundled sample (`on_sample`); any key but `dataset`."""
    sample = raw.get("sample", {})
    blocks = {e.block: e for e in EXPERIMENTS if e.Block is not None and e.block in raw}
    for name in sample if isinstance(sample, dict) else ():
        if name in BLOCKS and name not in blocks:
            chk.fail(f"[sample].{name}", f"the file has no [{name}] table for it to change")
    chk.table(sample, "[sample]", set(blocks))
    out = []
    for name, keys in sample.items():
        where = f"[sample.{name}]"
        schema = blocks[name].schema(parsers)
        if isinstance(keys, dict) and "dataset" in keys:
            chk.fail(f"{where}.dataset", "a [sample] table cannot move a block to other data")
        if keys == {}:
            chk.fail(where, "expected at least one key to replace, found none")
        chk.table(keys, where, set(schema) - {"dataset"})
        block = _parse_block(chk, {**raw[name], **keys}, where, blocks[name].Block, schema)
        out.append((name, block, tuple((k, getattr(block, k)) for k in keys)))
    return tuple(out)


def on_sample(matrix: Matrix, sampled: Iterable[str]) -> Matrix:
    """`matrix` with each block whose dataset is in `sampled` (datasets that loaded as the
    bundled sample) as its [sample.<block>] table says; the others as they are."""
    sampled = set(sampled)
    swap = {name: block for name, block, _ in matrix.sample_blocks
            if getattr(block, "dataset", None) in sampled}
    return replace(matrix, blocks=tuple((k, swap.get(k, b)) for k, b in matrix.blocks))


def _parse_sources(chk: Checker, raw: Any, base: Path) -> tuple:
    """[datasets.<name>] tables -> ((name, ((key, value), ...)), ...), paths made absolute
    (relative ones are taken from the matrix file's folder)."""
    out = []
    for name, table in sorted(chk.table(raw, "[datasets]", set(raw)).items()):
        where = f"[datasets.{name}]"
        if name in DATASETS:
            chk.fail(where, f"expected a name other than the built-ins {list(DATASETS)}")
        chk.table(table, where, {"path", "scale", "image_shape", "n_classes"}, {"path"})
        if not isinstance(table["path"], str) or not table["path"]:
            chk.fail(f"{where}.path", f"expected a path, found {table['path']!r}")
        path = Path(table["path"]).expanduser()
        entry = {"path": str(path if path.is_absolute() else (base / path).absolute())}
        if "scale" in table:
            value = table["scale"]
            if isinstance(value, list):
                if not (len(value) == 2 and all(
                        isinstance(v, (int, float)) and not isinstance(v, bool)
                        and math.isfinite(v) for v in value) and value[0] < value[1]):
                    chk.fail(f"{where}.scale", f"expected [lo, hi] with lo < hi, found "
                                               f"{value!r}")
                value = (float(value[0]), float(value[1]))
            elif value not in ("unit", "study"):
                chk.fail(f"{where}.scale", f"expected \"unit\", \"study\" or [lo, hi], found "
                                           f"{value!r}")
            entry["scale"] = value
        if "image_shape" in table:
            dims = chk.list_(table["image_shape"], f"{where}.image_shape")
            if len(dims) not in (2, 3):
                chk.fail(f"{where}.image_shape", f"expected [H, W] or [H, W, C], found {dims!r}")
            entry["image_shape"] = tuple(chk.int_(d, f"{where}.image_shape") for d in dims)
        if "n_classes" in table:
            entry["n_classes"] = chk.int_(table["n_classes"], f"{where}.n_classes", 2)
        out.append((name, tuple(sorted(entry.items()))))
    return tuple(out)


def _parse_train(chk: Checker, raw: Any, models: set[str]) -> tuple:
    allowed = {"hidden", "lr", "epochs", "batch_size", "optimizer"}
    out = []
    for name, table in sorted(chk.table(raw, "[train]", models).items()):
        where = f"[train.{name}]"
        chk.table(table, where, allowed)
        for key, value in table.items():
            if key == "optimizer":
                chk.name(value, f"{where}.optimizer", set(OPTIMIZERS), "optimizer")
            else:
                chk.rule(key)(value, f"{where}.{key}")
        out.append((name, tuple(sorted(table.items()))))
    return tuple(out)


def _parse_attack_options(chk: Checker, raw: Any, attacks: set[str]) -> tuple:
    out = []
    for name, table in sorted(chk.table(raw, "[attack_options]", attacks).items()):
        chk.table(table, f"[attack_options.{name}]", attack_option_keys(name))
        out.append((name, tuple(sorted(table.items()))))
    return tuple(out)


def with_dataset(matrix: Matrix, name: str) -> Matrix:
    """`matrix` with every dataset it names (the grid's and each block's) replaced by `name`
    (`bench --dataset`): a built-in, a `[datasets.<name>]` of the matrix, or a path (.npz
    file or folder), then named by its file stem and loaded from there. The dataset itself
    is checked when it loads."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"--dataset: expected a dataset name or path, found {name!r}")
    sources = matrix.sources
    if name not in DATASETS and name not in dict(sources):  # a path: named by its file stem,
        path = Path(name).expanduser()                     # so no machine path reaches a
        name = path.stem if path.suffix == ".npz" else path.name  # cell id or a table
        if name in DATASETS:
            raise ConfigError(f"--dataset {str(path)!r}: expected a file or folder named "
                              f"other than the built-ins {list(DATASETS)}")
        sources = (*(s for s in sources if s[0] != name),
                   (name, (("path", str(path.absolute())),)))
    return replace(matrix, datasets=(name,), sources=sources,
                   blocks=tuple((k, replace(b, dataset=name)) for k, b in matrix.blocks),
                   sample_blocks=tuple((k, replace(b, dataset=name), keys)
                                       for k, b, keys in matrix.sample_blocks))


def tiny(matrix: Matrix) -> Matrix:
    """`matrix` with every cell it has, each at a smoke test's size (`bench --tiny`, which
    `scripts/bench_gpu.sh --dry-run` runs): at most TINY_TRAIN training and TINY_TEST test
    images, hidden TINY_HIDDEN (8 for the poisoning sweeps), 2 samples / models where a
    block trains several, the shortest attacks and searches, one timed round. Every code
    path of the full matrix runs; no number of it means anything."""
    tinier = {e.block: e.tiny for e in EXPERIMENTS}
    blocks = tuple((k, tinier[k](b)) for k, b in matrix.blocks)
    return replace(matrix, hidden=TINY_HIDDEN, n_train=cap(matrix.n_train, TINY_TRAIN),
                   n_test=cap(matrix.n_test, TINY_TEST),
                   timing=replace(matrix.timing, rounds=1, max_seconds=0.5), blocks=blocks,
                   sample_blocks=())  # a rehearsal at its own tiny sizes, sample or not


def load(path: str | Path, *, allow_code: Iterable[str] = ()) -> Matrix:
    """Read and check the matrix file at `path`; ConfigError naming the file and key if bad.
    allow_code: the user model references the caller names (see `parse`)."""
    path = Path(path)
    shown = str(path) if str(path) not in ("", ".") else repr(str(path))
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{shown}: expected a matrix TOML file (a regular file), found "
                              f"{file_kind(mode)}")
        if path.stat().st_size > MAX_MATRIX_BYTES:
            raise ConfigError(f"{shown}: expected a matrix file of at most {MAX_MATRIX_BYTES} "
                              f"bytes, found {path.stat().st_size}")
        with open(path, "rb") as f:
            raw = f.read(MAX_MATRIX_BYTES + 1)  # bounded, even if the file grows meanwhile
        if len(raw) > MAX_MATRIX_BYTES:
            raise ConfigError(f"{shown}: expected a matrix file of at most {MAX_MATRIX_BYTES} "
                              "bytes, found more")
    except OSError as e:
        raise ConfigError(f"{shown}: cannot read the matrix file "
                          f"({e.strerror or type(e).__name__})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{shown}: expected a UTF-8 TOML file, found byte "
                          f"0x{raw[e.start]:02x} at offset {e.start} that is not UTF-8") from None
    return parse(text, str(path), allow_code=allow_code)


# --- expansion ---------------------------------------------------------------------------------


def cells(matrix: Matrix) -> tuple[Cell, ...]:
    """Every cell of the matrix, in run order: each experiment's (`EXPERIMENTS`), the grid
    first. ConfigError when two cells have the same id."""
    out = []
    for e in EXPERIMENTS:
        block = None if e.Block is None else matrix.block(e.block)
        if e.Block is None or block is not None:
            out += e.cells(matrix, block)
    counts = Counter(c.id for c in out)  # linear: 100,000 cells are checked at once
    if len(counts) != len(out):
        dup = sorted(i for i, n in counts.items() if n > 1)
        raise ConfigError(f"{matrix.path}: cell ids repeat: {dup[:3]}; expected distinct cells")
    return tuple(out)


def select(all_cells: tuple[Cell, ...], only: str | None) -> tuple[Cell, ...]:
    """The cells whose id matches `only`: an fnmatch pattern when it has * ? or [, else a
    substring; None selects all."""
    if only is None:
        return all_cells
    if any(ch in only for ch in "*?["):
        return tuple(c for c in all_cells if fnmatch.fnmatchcase(c.id, only))
    return tuple(c for c in all_cells if only in c.id)

