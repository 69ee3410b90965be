"""What every experiment of the bench is made of: the `Experiment` record, the `Cell` (one
unit of work and of caching), the configs several experiments share (`TrainSpec`,
`AttackConfig`) and the `Checker` a matrix block's keys go through.

Each module of `bench/experiments/` exports one `Experiment`; `matrix`, `runner` and `report`
iterate over `experiments.EXPERIMENTS`. A `Cell` is one unit of work and of caching: `kind`
says what it runs, `config` is a frozen dataclass with everything that determines its result,
and `hash` (sha256 of the canonical JSON of kind + config, 12 hex digits) names its cached
record. The cell id is for people ("mnist/seed-mlp/fgsm/0.1/seed0"); the hash is for the
cache, so two blocks asking for the same computation share one result.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from mlshift_jax.attacks import get_attack
from mlshift_jax.core import rules
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.core.files import config_hash
from mlshift_jax.models.recipes import TrainConfig, resolve
from mlshift_jax.models.registry import get_recipe

if TYPE_CHECKING:
    import pandas as pd

SCHEMA = 3  # bump when a record's meaning changes: every cached cell is then recomputed
ATTACK_FIXED_KW = {"eps", "key", "lo", "hi"}  # targeted attacks may set `target` (default 3)


def eps_label(eps: float) -> str:
    """eps as it appears in cell ids: 0.1 -> "0.1", 0.0 -> "0"."""
    return f"{eps:g}"


# --- the matrix --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    rounds: int = 3
    max_seconds: float = 10.0


@dataclass(frozen=True)
class Matrix:
    """A parsed matrix file. train / attack_options: ((name, ((key, value), ...)), ...);
    blocks: ((block name, its parsed table), ...) for each experiment's table the file has,
    in `EXPERIMENTS` order (`block(name)` reads one)."""

    path: str
    datasets: tuple[str, ...]
    models: tuple[str, ...]
    attacks: tuple[str, ...]
    eps: tuple[float, ...]
    seeds: tuple[int, ...] = (0,)
    hidden: int = 200
    n_train: int | None = None
    n_test: int | None = None
    timing: Timing = field(default_factory=Timing)
    train: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    attack_options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    # [datasets.<name>]: ((name, ((key, value), ...)), ...), path made absolute
    sources: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    blocks: tuple[tuple[str, Any], ...] = ()
    # [sample.<block>]: the blocks as they run on the bundled sample (their keys replaced by
    # the [sample.<block>] table's), ((block name, its parsed table, the keys replaced), ...)
    sample_blocks: tuple[tuple[str, Any, tuple[tuple[str, Any], ...]], ...] = ()

    def block(self, name: str) -> Any | None:
        """The parsed [name] table (an experiment's `Block`), None when the file has none."""
        return dict(self.blocks).get(name)

    def load_kwargs(self, name: str) -> dict[str, Any]:
        """`data.load` arguments for dataset `name`: {"name": name} for a built-in, else the
        path and options of its [datasets.<name>] table."""
        table = dict(self.sources).get(name)
        if table is None:
            return {"name": name}
        kw = dict(table)
        return {"name": kw.pop("path"), **kw}


# --- cell configs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSpec:
    """One trained model: recipe `model` on the first n_train images of `dataset`.

    Fields are the recipe's resolved TrainConfig (defaults filled in), so the hash changes
    when a recipe's default does.
    """

    dataset: str
    model: str
    hidden: int
    lr: float
    epochs: int
    batch_size: int | None
    optimizer: str | None
    seed: int
    n_train: int | None

    @property
    def hash(self) -> str:
        return config_hash({"schema": SCHEMA, "train": asdict(self)})

    def train_config(self) -> TrainConfig:
        return TrainConfig(hidden=self.hidden, lr=self.lr, epochs=self.epochs,
                           batch_size=self.batch_size, optimizer=self.optimizer, seed=self.seed)


@dataclass(frozen=True)
class ModelCell:
    """A cell that attacks one trained model (`train`) on its first n_test test images,
    timing each attack with `rounds` rounds of at most `max_seconds`."""

    train: TrainSpec
    n_test: int | None
    rounds: int
    max_seconds: float

    @property
    def dataset(self) -> str:
        return self.train.dataset


@dataclass(frozen=True)
class AttackConfig(ModelCell):
    """Attack a trained model on the first n_test test images at one eps, score and time it."""

    kind: ClassVar[str] = "attack"
    attack: str
    eps: float
    options: tuple[tuple[str, Any], ...]


# --- the blocks' common keys ---------------------------------------------------------------------


@dataclass(frozen=True)
class BlockData:
    """The keys of a block that trains: its dataset and seed, and the caps on the training
    and test images (None: the [matrix] table's)."""

    dataset: str = "mnist"
    seed: int = 0
    n_train: int | None = None
    n_test: int | None = None


@dataclass(frozen=True)
class StudyTraining(BlockData):
    """A block that trains the study's way: hidden units, learning rate, epochs."""

    hidden: int = 200
    lr: float = 0.1
    epochs: int = 1


@dataclass(frozen=True)
class Cell:
    """One unit of work: a readable id, the block it comes from, and its config."""

    id: str
    block: str
    config: Any  # an experiment's Config: a frozen dataclass, its `kind` a ClassVar

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def hash(self) -> str:
        return config_hash({"schema": SCHEMA, "kind": self.kind, **asdict(self.config)})


# `bench --tiny` (`matrix.tiny`): every cell at a smoke test's size
TINY_TRAIN, TINY_TEST, TINY_HIDDEN = 600, 100, 16


def cap(n: int | None, k: int) -> int:
    """n capped at k (None, all the data, becomes k)."""
    return k if n is None else min(n, k)


def shrink(block: Any, **changes: Any) -> Any:
    """`block` (a Block dataclass) at a smoke test's size: hidden TINY_HIDDEN, at most
    TINY_TRAIN training and TINY_TEST test images (each where the block has the key and
    `changes` does not set it), then `changes`."""
    keys = {f.name for f in fields(block)} - set(changes)
    caps = {"hidden": lambda: TINY_HIDDEN, "n_train": lambda: cap(block.n_train, TINY_TRAIN),
            "n_test": lambda: cap(block.n_test, TINY_TEST)}
    return replace(block, **{k: f() for k, f in caps.items() if k in keys}, **changes)


def inherit(value: Any, default: Any) -> Any:
    """A block's own value, else the matrix's (n_train / n_test left out of a block)."""
    return value if value is not None else default


def train_spec(matrix: Matrix, dataset: str, model: str, seed: int, *, hidden: int | None = None,
               lr: float | None = None, epochs: int | None = None,
               n_train: int | None = None) -> TrainSpec:
    """The resolved TrainSpec of `model`: block values, else [train.<model>], else the
    matrix's hidden, else the recipe's defaults."""
    overrides = dict(dict(matrix.train).get(model, ()))
    explicit = {"hidden": hidden, "lr": lr, "epochs": epochs}
    overrides.update({k: v for k, v in explicit.items() if v is not None})
    overrides.setdefault("hidden", matrix.hidden)
    recipe = get_recipe(model)
    try:
        cfg = resolve(recipe, TrainConfig(seed=seed, **overrides))
    except ConfigError as e:
        raise ConfigError(f"{matrix.path}: [train.{model}]: {e}") from None
    return TrainSpec(dataset=dataset, model=model, hidden=cfg.hidden, lr=float(cfg.lr),
                     epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=cfg.optimizer,
                     seed=seed, n_train=n_train)


def attack_cell(matrix: Matrix, block: str, prefix: str, spec: TrainSpec, attack: str,
                eps: float, n_test: int | None, *, study_loss: bool = False) -> Cell:
    """The AttackConfig cell of `attack` at eps on spec's model, its id `prefix` + dataset /
    model / attack / eps / seed; study_loss: an attack with a `loss` option climbs the
    model's own training loss (the study's FGSM, E3)."""
    options = dict(matrix.attack_options).get(attack, ())
    if study_loss and "loss" in inspect.signature(get_attack(attack).fn).parameters:
        # the study's FGSM climbs the model's own training loss (E3 reproduces it)
        options = tuple(sorted({**dict(options), "loss": "train"}.items()))
    config = AttackConfig(train=spec, attack=attack, eps=float(eps), options=options,
                          n_test=n_test, rounds=matrix.timing.rounds,
                          max_seconds=matrix.timing.max_seconds)
    cell_id = f"{prefix}{spec.dataset}/{spec.model}/{attack}/{eps_label(eps)}/seed{spec.seed}"
    return Cell(cell_id, block, config)


# --- checking a block ---------------------------------------------------------------------------


class Checker:
    """Type checks that name the file and the key (`path: [table] key: expected ..., found ...`)."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, message: str):
        raise ConfigError(f"{self.path}: {where}: {message}")

    def table(self, raw: Any, where: str, allowed: set[str], required: set[str] = frozenset()):
        if not isinstance(raw, dict):
            self.fail(where, f"expected a table, found {type(raw).__name__}")
        for key in raw:
            if key not in allowed:
                self.fail(f"{where}.{key}", f"unknown key; expected one of {sorted(allowed)}")
        for key in sorted(required - set(raw)):
            self.fail(f"{where}.{key}", "missing; it is required")
        return raw

    def int_(self, value: Any, where: str, minimum: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(where, f"expected an integer >= {minimum}, found {value!r}")
        return value

    def rule(self, name: str):
        """The shared rule for `name` (see `rules`), as a (value, where) checker."""
        def check(value: Any, where: str):
            if isinstance(value, float) and rules.RULES[name].kind is int:
                value = repr(value)  # TOML 3.0 for an integer key: refused, shown as written
            return rules.check(name, value, f"{self.path}: {where}")
        return check

    def opt_rule(self, name: str):
        check = self.rule(name)
        return lambda value, where: None if value is None else check(value, where)

    def bool_(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            self.fail(where, f"expected true or false, found {value!r}")
        return value

    def opt_int(self, value: Any, where: str) -> int | None:
        return None if value is None else self.int_(value, where)

    def float_(self, value: Any, where: str, *, positive: bool = False) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0 or (positive and value == 0):
            bound = "> 0" if positive else ">= 0"
            self.fail(where, f"expected a finite number {bound}, found {value!r}")
        return float(value)

    def list_(self, value: Any, where: str) -> list:
        if not isinstance(value, list) or not value:
            self.fail(where, f"expected a non-empty list, found {value!r}")
        return value

    def names(self, value: Any, where: str, known, what: str) -> tuple[str, ...]:
        out = []
        for name in self.list_(value, where):
            out.append(self.name(name, where, known, what))
        if len(set(out)) != len(out):
            self.fail(where, f"expected distinct {what}s, found {out}")
        return tuple(out)

    def name(self, value: Any, where: str, known, what: str) -> str:
        if not isinstance(value, str) or value not in known:
            self.fail(where, f"unknown {what} {value!r}; expected one of {sorted(known)}")
        return value

    def eps_list(self, value: Any, where: str) -> tuple[float, ...]:
        """Distinct eps values, each within the CLI's --eps rule (`rules.RULES["eps"]`)."""
        out = tuple(self.rule("eps")(e, where) for e in self.list_(value, where))
        if len(set(out)) != len(out):  # a set: linear in the count
            seen: set = set()
            dup = next(e for e in out if e in seen or seen.add(e))
            self.fail(where, f"expected distinct eps values, found {dup!r} twice")
        return out


def is_model_ref(value: Any) -> bool:
    """Whether value is spelled as a user model reference "pkg.module:attr" (identifiers;
    the module is imported only when the matrix expands, by `registry.get_recipe`)."""
    if not isinstance(value, str):
        return False
    module, sep, attr = value.partition(":")
    return bool(sep) and all(p.isidentifier() for p in module.split(".") + attr.split("."))


class Models(frozenset):
    """The built-in recipe names; `in` also holds for a user ref "pkg.module:attr"."""

    def __contains__(self, value: Any) -> bool:
        return super().__contains__(value) or is_model_ref(value)


def attack_option_keys(name: str) -> set[str]:
    """The keyword-only options of attack `name` a matrix may set (steps, step_size, ...)."""
    params = inspect.signature(get_attack(name).fn).parameters.values()
    return {p.name for p in params if p.kind is p.KEYWORD_ONLY} - ATTACK_FIXED_KW


def common_schema(chk: Checker) -> dict[str, Callable[[Any, str], Any]]:
    """The keys most blocks share: the training (hidden, lr, epochs, seed) and the data caps
    (n_train, n_test), each under its shared rule (`core.rules`)."""
    return {"hidden": chk.rule("hidden"), "lr": chk.rule("lr"), "epochs": chk.rule("epochs"),
            "seed": chk.rule("seed"), "n_train": chk.opt_rule("n_train"),
            "n_test": chk.opt_rule("n_test")}


class Parsers(NamedTuple):
    """What a block's schema is built from: each a check(value, where) -> value.

    chk: the file's Checker; common: `common_schema(chk)`; dataset / model: one name the
    matrix knows (a built-in, a [datasets.<name>] table, a user model it may import);
    models / attacks: a list of distinct such names."""

    chk: Checker
    common: dict[str, Callable[[Any, str], Any]]
    dataset: Callable[[Any, str], str]
    model: Callable[[Any, str], str]
    models: Callable[[Any, str], tuple[str, ...]]
    attacks: Callable[[Any, str], tuple[str, ...]]


class ReportContext(NamedTuple):
    """What a section needs beside the records: info, the run's facts (`report.run_info`:
    datasets, skipped, ...), and warns, each cell id's validity warnings joined by "; "."""

    info: dict[str, Any]
    warns: dict[str, str]


def no_finding(records: pd.DataFrame) -> None:
    """An experiment with no headline of its own."""
    return None


def no_figures(records: pd.DataFrame, figures_dir: Path, info: dict[str, Any]) -> list[Path]:
    """An experiment that draws no figure."""
    return []


def any_data(cell: Cell, spec: Any) -> str | None:
    """A cell that runs on any dataset (any image shape, any number of classes)."""
    return None


def unfit_study(spec: Any) -> str | None:
    """Why a block that sets its numbers beside the study's (E1-E3) cannot run on data of
    `spec`, None when it can: the study's images and classes (`data.STUDY_SPEC`), without
    which every comparison it prints would be of unlike things."""
    from mlshift_jax.data import STUDY_SPEC

    want = (tuple(STUDY_SPEC.input_shape), STUDY_SPEC.n_classes)
    found = (tuple(spec.input_shape), int(spec.n_classes))
    if found == want:
        return None
    shape = "x".join(map(str, found[0]))
    return (f"the study's numbers are of MNIST: expected "
            f"{'x'.join(map(str, want[0]))} images of {want[1]} classes, found {shape} of "
            f"{found[1]}")


def unfit_attacks(names: Any, spec: Any) -> str | None:
    """Why attacks `names` cannot run on data of `spec` (a `models.Spec`: input_shape,
    n_classes), None when they all can: an attack's `min_classes` (the registry's record)."""
    from mlshift_jax.attacks import ATTACKS

    for name in names:
        attack = ATTACKS.get(name)
        if attack is not None and spec.n_classes < attack.min_classes:
            return (f"attack {name} needs at least {attack.min_classes} classes, found "
                    f"{spec.n_classes}")
    return None


def unfit_poisonings(configs: Any, spec: Any) -> str | None:
    """Why poisonings `configs` cannot run on data of `spec`, None when they all can: each
    config's target / source class below n_classes and its patch inside the image
    (`poison.check_for`, the poisoning's own record)."""
    from mlshift_jax.poisoning.poison import check_for

    for config in configs:
        try:
            check_for(config, spec)
        except ConfigError as e:
            return str(e)
    return None


def unfit_calibration(spec: Any) -> str | None:
    """Why `detect`'s calibration (its poisoned retrains, `change.CalibrationConfig`) cannot
    run on data of `spec`, None when it can."""
    from mlshift_jax.detection.change import CalibrationConfig
    from mlshift_jax.poisoning.poison import make_config

    return unfit_poisonings([make_config(k, fraction=f)
                             for k, f in CalibrationConfig().poisonings], spec)


def never(record: dict[str, Any]) -> bool:
    """A cached record that is always good to reuse."""
    return False


@dataclass(frozen=True)
class Experiment:
    """One experiment of the bench: every fact `matrix`, `runner` and `report` need of it.

    block: its table in a matrix file; "matrix" for the attack grid, whose keys are the
      [matrix] table every matrix has (the Matrix's own fields).
    Block: the table's frozen dataclass, its defaults the table's (None for the grid).
    Config: the frozen dataclass of its cells' configs (its `kind` names the cells).
    schema(parsers) -> {key: check(value, where) -> value}: the keys its table accepts
      (None for the grid); `matrix.parse` refuses any other.
    cells(matrix, block) -> [Cell]: its cells in run order (block None for the grid).
    tiny(block) -> block: the table at a smoke test's size (`matrix.tiny`).
    compute(cell, loaded, memo, cache, force) -> dict: one cell's record (`runner.run`; the
      arguments are `context`'s).
    section(records, ctx) -> [(title, markdown)]: its level-2 sections of tables.md, said
      even when the run has none of its cells.
    finding(records) -> str | None: its line of the summary at the top (None: nothing).
    place: where its sections and finding sit in tables.md, smaller first.
    figures(records, figures_dir, info) -> [Path]: the PNG files it draws (matplotlib is
      installed when called).
    redo(record) -> bool: whether a cached record of its must be computed again anyway.
    fits(cell, spec) -> str | None: why `cell` cannot run on data of `spec` (the dataset's
      image shape and classes, `models.Spec`), None when it can: `runner.run` skips such a
      cell and lists it, with this reason, as skipped (run.json, tables.md).
    """

    block: str
    Block: type | None
    Config: type
    schema: Callable[[Parsers], dict[str, Callable[[Any, str], Any]]] | None
    cells: Callable[[Matrix, Any], list[Cell]]
    tiny: Callable[[Any], Any]
    compute: Callable[..., dict[str, Any]]
    section: Callable[[pd.DataFrame, ReportContext], list[tuple[str, str]]]
    place: int
    finding: Callable[[pd.DataFrame], str | None] = no_finding
    figures: Callable[[pd.DataFrame, Path, dict[str, Any]], list[Path]] = no_figures
    redo: Callable[[dict[str, Any]], bool] = never
    fits: Callable[[Cell, Any], str | None] = any_data
