"""The experiment matrix as data: a TOML file -> frozen dataclasses -> cells.

A matrix file (see `bench/matrix.toml`) has these tables; every key not listed is an error:

    [matrix]      datasets, models, attacks, eps, seeds = [0], hidden = 200, n_train, n_test
    [datasets.<name>]         a dataset by path, usable wherever a dataset name is:
                              path (a .npz or a folder, relative to the matrix file),
                              scale ("unit", "study" or [lo, hi]), image_shape ([H, W, C]),
                              n_classes (see `data.load`)
    [timing]      rounds = 3, max_seconds = 10.0
    [train.<model>]           TrainConfig fields for one recipe: hidden, lr, epochs,
                              batch_size, optimizer (the rest take the recipe's defaults)
    [attack_options.<attack>] keyword options of one attack (e.g. pgd: steps, step_size)
    [e1]          clean models: dataset, models, hidden, lr, epochs, seed, n_train, n_test
    [e2]          stability: dataset, samples, size, hidden, lr, epochs, seed, n_train, n_test
    [e3]          input attacks: dataset, model, attacks, eps, n_test = [10000, 6000], hidden,
                  lr, epochs, seed, n_train
    [speed]       workload x implementation timings: dataset, workloads, hidden, lr, eps, seed,
                  n_train, n_test, numpy_loop_images, numpy_epoch_samples, population,
                  population_size, detect_null, scan_models, scan_steps
    [poison]      E4-E7 sweeps (and "backdoors": every backdoor family with its ASR,
                  `sweeps.EXTRA_SWEEPS`) + BadNets: dataset, model, sweeps, badnets_models,
                  badnets_n_train, hidden, epochs, seed, n_train, n_test
    [detect]      the detection benchmark: dataset, quick = false, seed; three cells, one per
                  part (detection_bench.PARTS: detectors, scan-model, categorizer-lofo)
    [defenses]    defense x attack (defenses.py, adaptive.py): dataset, models, defenses,
                  attacks (columns: `defense_columns()`, default fgsm, pgd, adaptive, square,
                  transfer, autoattack), eps, seed,
                  n_train, n_test, steps, restarts, samples, queries, adv_eps, adv_steps,
                  probe_n (images the obfuscation probe uses)

n_train / n_test cap the data to its first n images (file order); absent means all of it.
A model is a built-in recipe name or a user model "pkg.module:attr" (`usermodels`; its module
on PYTHONPATH or in the working folder, imported when the matrix expands; `[train."pkg.mod:attr"]`
sets its training). A cell's hash covers the ref, not the user's code: after editing the
model, rerun with --force.

`load(path) -> Matrix`; `cells(matrix) -> tuple[Cell, ...]`. A `Cell` is one unit of work and
of caching: `kind` says what it runs ("attack", "stability", "speed", "poison", "detect"),
`config` is a frozen dataclass with everything that determines its result, and
`hash` (sha256 of the canonical JSON of kind + config, 12 hex digits) names its cached record.
The cell id is for people ("mnist/seed-mlp/fgsm/0.1/seed0"); the hash is for the cache, so two
blocks asking for the same computation share one result.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import stat
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from mlshift_jax.attacks import ATTACKS, get_attack
from mlshift_jax.attacks.defenses import DEFENSES, resolve_options
from mlshift_jax.bench.detection_bench import PARTS as DETECT_PARTS
from mlshift_jax.bench.sweeps import EXTRA_SWEEPS
from mlshift_jax.bench.sweeps import STUDY_SWEEPS as POISON_SWEEPS
from mlshift_jax.core import rules
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.core.files import (  # noqa: F401  (HASH_LEN: cell ids)
    HASH_LEN,
    config_hash,
    file_kind,
)
from mlshift_jax.data.datasets import DATASETS
from mlshift_jax.models.recipes import RECIPES, TrainConfig, resolve
from mlshift_jax.models.registry import get_recipe
from mlshift_jax.models.train import OPTIMIZERS

MAX_MATRIX_BYTES = 1 << 20
SCHEMA = 3  # bump when a record's meaning changes: every cached cell is then recomputed
SPEED_WORKLOADS = ("fgsm", "pgd", "autoattack", "epoch-per-sample", "epoch-minibatch",
                   "metrics", "population", "detection")
_ATTACK_FIXED_KW = {"eps", "key", "lo", "hi"}  # targeted attacks may set `target` (default 3)



def eps_label(eps: float) -> str:
    """eps as it appears in cell ids: 0.1 -> "0.1", 0.0 -> "0"."""
    return f"{eps:g}"


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
class AttackConfig:
    """Attack a trained model on the first n_test test images at one eps, score and time it."""

    kind: ClassVar[str] = "attack"
    train: TrainSpec
    attack: str
    eps: float
    options: tuple[tuple[str, Any], ...]
    n_test: int | None
    rounds: int
    max_seconds: float

    @property
    def dataset(self) -> str:
        return self.train.dataset


@dataclass(frozen=True)
class StabilityConfig:
    """E2: `samples` seed-mlp models on random subsets of `size` images, one population."""

    kind: ClassVar[str] = "stability"
    dataset: str
    samples: int
    size: int
    hidden: int
    lr: float
    epochs: int
    seed: int
    n_train: int | None
    n_test: int | None


@dataclass(frozen=True)
class SpeedConfig:
    """One speed workload, every implementation of it timed in the same cell."""

    kind: ClassVar[str] = "speed"
    dataset: str
    workload: str
    hidden: int
    lr: float
    eps: float
    seed: int
    n_train: int | None
    n_test: int | None
    numpy_loop_images: int
    numpy_epoch_samples: int
    population: int
    population_size: int
    rounds: int
    max_seconds: float
    detect_null: int = 24
    scan_models: int = 2
    scan_steps: int = 300


@dataclass(frozen=True)
class PoisonSweepConfig:
    """One of the study's poisoning sweeps (sweeps.sweep_configs), trained as one population."""

    kind: ClassVar[str] = "poison"
    dataset: str
    sweep: str
    model: str
    seed: int
    hidden: int
    epochs: int | None
    n_train: int | None
    n_test: int | None


@dataclass(frozen=True)
class DetectConfig:
    """The detection benchmark (detection_bench.run): every detector on every change kind."""

    kind: ClassVar[str] = "detect"
    dataset: str
    quick: bool
    seed: int
    part: str = "detectors"  # one of detection_bench.PARTS


@dataclass(frozen=True)
class DefenseConfig:
    """One defended model (a row of the defense x attack table): every attack column at
    every eps, the clean accuracy, the obfuscation probe and flags, and their times."""

    kind: ClassVar[str] = "defense"
    train: TrainSpec
    defense: str
    options: tuple[tuple[str, Any], ...]
    attacks: tuple[str, ...]
    eps: tuple[float, ...]
    n_test: int | None
    steps: int
    restarts: int
    samples: int
    queries: int
    probe_n: int
    rounds: int
    max_seconds: float

    @property
    def dataset(self) -> str:
        return self.train.dataset


CellConfig = (AttackConfig | StabilityConfig | SpeedConfig | PoisonSweepConfig
              | DetectConfig | DefenseConfig)


@dataclass(frozen=True)
class Cell:
    """One unit of work: a readable id, the block it comes from, and its config."""

    id: str
    block: str
    config: CellConfig

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def hash(self) -> str:
        return config_hash({"schema": SCHEMA, "kind": self.kind, **asdict(self.config)})


# --- the matrix --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    rounds: int = 3
    max_seconds: float = 10.0


@dataclass(frozen=True)
class E1:
    dataset: str = "mnist"
    models: tuple[str, ...] = ("seed-mlp", "seed-mlp-numpy")
    hidden: int = 200
    lr: float = 0.1
    epochs: int = 1
    seed: int = 0
    n_train: int | None = None
    n_test: int | None = None


@dataclass(frozen=True)
class E2:
    dataset: str = "mnist"
    samples: int = 10
    size: int = 10_000
    hidden: int = 200
    lr: float = 0.1
    epochs: int = 1
    seed: int = 0
    n_train: int | None = None
    n_test: int | None = None


@dataclass(frozen=True)
class E3:
    dataset: str = "mnist"
    model: str = "seed-mlp"
    attacks: tuple[str, ...] = ("fgsm", "noise-sign", "pgd")
    eps: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
    n_test: tuple[int, ...] = (10_000, 6_000)
    hidden: int = 200
    lr: float = 0.1
    epochs: int = 1
    seed: int = 0
    n_train: int | None = None


@dataclass(frozen=True)
class Speed:
    dataset: str = "mnist"
    workloads: tuple[str, ...] = SPEED_WORKLOADS
    hidden: int = 200
    lr: float = 0.1
    eps: float = 0.1
    seed: int = 0
    n_train: int | None = None
    n_test: int | None = None
    numpy_loop_images: int = 500
    numpy_epoch_samples: int = 2000
    population: int = 10
    population_size: int = 10_000
    detect_null: int = 24        # clean retrains in the detection workload's calibration
    scan_models: int = 2         # models in the detection workload's vmapped scan
    scan_steps: int = 300        # Adam steps per class of each scan (neural_cleanse default)


@dataclass(frozen=True)
class Poison:
    """E4-E7 for `model`, then the BadNets reference cells for each of `badnets_models`
    (trained on `badnets_n_train` images when set)."""

    dataset: str = "mnist"
    model: str = "seed-mlp"
    sweeps: tuple[str, ...] = POISON_SWEEPS
    badnets_models: tuple[str, ...] = ("seed-mlp", "cnn")
    badnets_n_train: int | None = None
    hidden: int = 200
    epochs: int | None = None
    seed: int = 0
    n_train: int | None = None
    n_test: int | None = None


@dataclass(frozen=True)
class Detect:
    """The detection benchmark: `quick` picks detection_bench.QUICK over FULL."""

    dataset: str = "mnist"
    quick: bool = False
    seed: int = 0


DEFENSE_COLUMNS = ("fgsm", "pgd", "adaptive", "square", "transfer", "autoattack")  # default


def defense_columns() -> set[str]:
    """The columns a defense table may have: "adaptive" (the defense's own adaptive attack)
    and every untargeted attack (the table gives no target)."""
    return {"adaptive"} | {a.name for a in ATTACKS.values() if not a.targeted}


@dataclass(frozen=True)
class Defenses:
    """The defense x attack table: each defense on each model, every column at every eps.
    "adaptive" is the defense's own adaptive attack (`defenses.Defense.adaptive`)."""

    dataset: str = "mnist"
    models: tuple[str, ...] = ("seed-mlp", "mlp-ce")
    defenses: tuple[str, ...] = ("none", "randomize", "quantize", "median", "denoise-ae",
                                 "adv-train")
    attacks: tuple[str, ...] = DEFENSE_COLUMNS
    eps: tuple[float, ...] = (0.1, 0.2, 0.3)
    seed: int = 0
    n_train: int | None = None
    n_test: int | None = 1000
    steps: int = 10
    restarts: int = 2
    samples: int = 8
    queries: int = 1000
    adv_eps: float = 0.1
    adv_steps: int = 7
    probe_n: int = 200


@dataclass(frozen=True)
class Matrix:
    """A parsed matrix file. train / attack_options: ((name, ((key, value), ...)), ...)."""

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
    e1: E1 | None = None
    e2: E2 | None = None
    e3: E3 | None = None
    speed: Speed | None = None
    poison: Poison | None = None
    detect: Detect | None = None
    # [datasets.<name>]: ((name, ((key, value), ...)), ...), path made absolute
    sources: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    def load_kwargs(self, name: str) -> dict[str, Any]:
        """`data.load` arguments for dataset `name`: {"name": name} for a built-in, else the
        path and options of its [datasets.<name>] table."""
        table = dict(self.sources).get(name)
        if table is None:
            return {"name": name}
        kw = dict(table)
        return {"name": kw.pop("path"), **kw}
    defenses: Defenses | None = None


# --- parsing and checking ----------------------------------------------------------------------


class _Checker:
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


class _Models(frozenset):
    """The built-in recipe names; `in` also holds for a user ref "pkg.module:attr"."""

    def __contains__(self, value: Any) -> bool:
        return super().__contains__(value) or is_model_ref(value)


def _attack_option_keys(name: str) -> set[str]:
    """The keyword-only options of attack `name` a matrix may set (steps, step_size, ...)."""
    params = inspect.signature(get_attack(name).fn).parameters.values()
    return {p.name for p in params if p.kind is p.KEYWORD_ONLY} - _ATTACK_FIXED_KW


def _parse_block(chk: _Checker, raw: dict, where: str, cls, schema: dict) -> Any:
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
    chk = _Checker(path)
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
                                 "e1", "e2", "e3", "speed", "poison", "detect", "defenses"},
              {"matrix"})
    sources = _parse_sources(chk, raw.get("datasets", {}), Path(path).parent)
    models, attacks = _Models(RECIPES), set(ATTACKS)
    datasets = set(DATASETS) | {name for name, _ in sources}

    def dataset(v, w):
        return chk.name(v, w, datasets, "dataset")

    def model(v, w):
        return chk.name(v, w, models, "model")

    def pos_float(v, w):
        return chk.float_(v, w, positive=True)

    common = {"hidden": chk.rule("hidden"), "lr": chk.rule("lr"), "epochs": chk.rule("epochs"),
              "seed": chk.rule("seed"), "n_train": chk.opt_rule("n_train"),
              "n_test": chk.opt_rule("n_test")}

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
    names = {
        "models": lambda v, w: chk.names(v, w, models, "model"),
        "attacks": lambda v, w: chk.names(v, w, attacks, "attack"),
        "workloads": lambda v, w: chk.names(v, w, set(SPEED_WORKLOADS), "workload"),
        "sweeps": lambda v, w: chk.names(v, w, {*POISON_SWEEPS, *EXTRA_SWEEPS}, "sweep"),
    }
    blocks = {
        "e1": (E1, {**common, "dataset": dataset, "models": names["models"]}),
        "e2": (E2, {**common, "dataset": dataset, "samples": chk.rule("samples"),
                    "size": chk.rule("size")}),
        "e3": (E3, {**common, "dataset": dataset, "model": model, "attacks": names["attacks"],
                    "eps": chk.eps_list,
                    "n_test": lambda v, w: tuple(chk.rule("n_test")(n, w)
                                                 for n in chk.list_(v, w))}),
        "speed": (Speed, {**common, "dataset": dataset, "workloads": names["workloads"],
                          "eps": chk.float_, "numpy_loop_images": chk.int_,
                          "numpy_epoch_samples": chk.int_, "population": chk.int_,
                          "population_size": chk.int_, "detect_null": chk.int_,
                          "scan_models": chk.int_, "scan_steps": chk.int_}),
        "poison": (Poison, {**common, "dataset": dataset, "model": model,
                            "sweeps": names["sweeps"], "badnets_models": names["models"],
                            "badnets_n_train": chk.opt_rule("n_train"),
                            "epochs": chk.opt_rule("epochs")}),
        "detect": (Detect, {"dataset": dataset, "quick": chk.bool_, "seed": chk.rule("seed")}),
        "defenses": (Defenses, {
            **common, "dataset": dataset, "models": names["models"],
            "defenses": lambda v, w: chk.names(v, w, set(DEFENSES), "defense"),
            "attacks": lambda v, w: chk.names(v, w, defense_columns(), "attack column"),
            "eps": chk.eps_list, "steps": chk.int_, "restarts": chk.int_,
            "samples": chk.int_, "queries": chk.int_, "adv_eps": pos_float,
            "adv_steps": chk.int_, "probe_n": chk.int_}),
    }
    for key, (cls, schema) in blocks.items():
        if key in raw:
            fields[key] = _parse_block(chk, raw[key], f"[{key}]", cls, schema)
    matrix = Matrix(**fields)
    cells(matrix)  # resolves every recipe config: a bad value fails here, naming the file
    return matrix


def _parse_sources(chk: _Checker, raw: Any, base: Path) -> tuple:
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


def _parse_train(chk: _Checker, raw: Any, models: set[str]) -> tuple:
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


def _parse_attack_options(chk: _Checker, raw: Any, attacks: set[str]) -> tuple:
    out = []
    for name, table in sorted(chk.table(raw, "[attack_options]", attacks).items()):
        chk.table(table, f"[attack_options.{name}]", _attack_option_keys(name))
        out.append((name, tuple(sorted(table.items()))))
    return tuple(out)


def with_dataset(matrix: Matrix, name: str) -> Matrix:
    """`matrix` with every dataset it names (the grid's and each block's) replaced by `name`
    (`bench --dataset`); the dataset itself is checked when it loads."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"--dataset: expected a dataset name or path, found {name!r}")
    blocks = {k: replace(getattr(matrix, k), dataset=name)
              for k in ("e1", "e2", "e3", "speed", "poison", "detect", "defenses")
              if getattr(matrix, k) is not None}
    return replace(matrix, datasets=(name,), **blocks)


TINY_TRAIN, TINY_TEST, TINY_HIDDEN = 600, 100, 16


def tiny(matrix: Matrix) -> Matrix:
    """`matrix` with every cell it has, each at a smoke test's size (`bench --tiny`, which
    `scripts/bench_gpu.sh --dry-run` runs): at most TINY_TRAIN training and TINY_TEST test
    images, hidden TINY_HIDDEN (8 for the poisoning sweeps), 2 samples / models where a
    block trains several, the shortest attacks and searches, one timed round. Every code
    path of the full matrix runs; no number of it means anything."""
    def cap(n: int | None, k: int) -> int:
        return k if n is None else min(n, k)

    blocks: dict[str, Any] = {}
    if matrix.e1 is not None:
        e1 = matrix.e1
        blocks["e1"] = replace(e1, hidden=TINY_HIDDEN, n_train=cap(e1.n_train, TINY_TRAIN),
                               n_test=cap(e1.n_test, TINY_TEST))
    if matrix.e2 is not None:
        e2 = matrix.e2
        blocks["e2"] = replace(e2, samples=min(e2.samples, 2), size=min(e2.size, 300),
                               hidden=TINY_HIDDEN, n_train=cap(e2.n_train, TINY_TRAIN),
                               n_test=cap(e2.n_test, TINY_TEST))
    if matrix.e3 is not None:
        e3 = matrix.e3
        top = max(e3.n_test)
        blocks["e3"] = replace(e3, hidden=TINY_HIDDEN, n_train=cap(e3.n_train, TINY_TRAIN),
                               n_test=tuple(max(1, n * TINY_TEST // top) for n in e3.n_test))
    if matrix.speed is not None:
        sp = matrix.speed
        blocks["speed"] = replace(sp, hidden=TINY_HIDDEN, n_train=cap(sp.n_train, TINY_TRAIN),
                                  n_test=cap(sp.n_test, TINY_TEST), numpy_loop_images=10,
                                  numpy_epoch_samples=20, population=2, population_size=200,
                                  detect_null=2, scan_models=2, scan_steps=5)
    if matrix.poison is not None:
        po = matrix.poison
        blocks["poison"] = replace(po, hidden=8, n_train=cap(po.n_train, TINY_TRAIN),
                                   n_test=cap(po.n_test, TINY_TEST),
                                   badnets_n_train=cap(po.badnets_n_train, TINY_TRAIN))
    if matrix.detect is not None:
        blocks["detect"] = replace(matrix.detect, quick=True)
    if matrix.defenses is not None:
        d = matrix.defenses
        blocks["defenses"] = replace(d, n_train=cap(d.n_train, TINY_TRAIN),
                                     n_test=cap(d.n_test, 50), steps=2, restarts=1,
                                     samples=2, queries=10, adv_steps=2, probe_n=20)
    return replace(matrix, hidden=TINY_HIDDEN, n_train=cap(matrix.n_train, TINY_TRAIN),
                   n_test=cap(matrix.n_test, TINY_TEST),
                   timing=replace(matrix.timing, rounds=1, max_seconds=0.5), **blocks)


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


def _attack_cell(matrix: Matrix, block: str, prefix: str, spec: TrainSpec, attack: str,
                 eps: float, n_test: int | None, *, study_loss: bool = False) -> Cell:
    options = dict(matrix.attack_options).get(attack, ())
    if study_loss and "loss" in inspect.signature(get_attack(attack).fn).parameters:
        # the study's FGSM climbs the model's own training loss (E3 reproduces it)
        options = tuple(sorted({**dict(options), "loss": "train"}.items()))
    config = AttackConfig(train=spec, attack=attack, eps=float(eps), options=options,
                          n_test=n_test, rounds=matrix.timing.rounds,
                          max_seconds=matrix.timing.max_seconds)
    cell_id = f"{prefix}{spec.dataset}/{spec.model}/{attack}/{eps_label(eps)}/seed{spec.seed}"
    return Cell(cell_id, block, config)


def _grid_cells(matrix: Matrix) -> list[Cell]:
    out = []
    for dataset in matrix.datasets:
        for model in matrix.models:
            for seed in matrix.seeds:
                spec = train_spec(matrix, dataset, model, seed, n_train=matrix.n_train)
                for attack in matrix.attacks:
                    for eps in (0.0,) if attack == "none" else matrix.eps:
                        out.append(_attack_cell(matrix, "matrix", "", spec, attack, eps,
                                                matrix.n_test))
    return out


def _e1_cells(matrix: Matrix, e1: E1) -> list[Cell]:
    n_train = e1.n_train if e1.n_train is not None else matrix.n_train
    n_test = e1.n_test if e1.n_test is not None else matrix.n_test
    return [_attack_cell(matrix, "e1", "e1/",
                         train_spec(matrix, e1.dataset, model, e1.seed, hidden=e1.hidden,
                                    lr=e1.lr, epochs=e1.epochs, n_train=n_train),
                         "none", 0.0, n_test)
            for model in e1.models]


def _e2_cells(matrix: Matrix, e2: E2) -> list[Cell]:
    config = StabilityConfig(
        dataset=e2.dataset, samples=e2.samples, size=e2.size, hidden=e2.hidden, lr=e2.lr,
        epochs=e2.epochs, seed=e2.seed,
        n_train=e2.n_train if e2.n_train is not None else matrix.n_train,
        n_test=e2.n_test if e2.n_test is not None else matrix.n_test)
    return [Cell(f"e2/{e2.dataset}/seed-mlp/stability/seed{e2.seed}", "e2", config)]


def _e3_cells(matrix: Matrix, e3: E3) -> list[Cell]:
    n_train = e3.n_train if e3.n_train is not None else matrix.n_train
    spec = train_spec(matrix, e3.dataset, e3.model, e3.seed, hidden=e3.hidden, lr=e3.lr,
                      epochs=e3.epochs, n_train=n_train)
    return [_attack_cell(matrix, "e3", f"e3/n{n}/", spec, attack, eps, n, study_loss=True)
            for n in e3.n_test for attack in e3.attacks for eps in e3.eps]


def _speed_cells(matrix: Matrix, sp: Speed) -> list[Cell]:
    out = []
    for workload in sp.workloads:
        config = SpeedConfig(
            dataset=sp.dataset, workload=workload, hidden=sp.hidden, lr=sp.lr, eps=sp.eps,
            seed=sp.seed, n_train=sp.n_train if sp.n_train is not None else matrix.n_train,
            n_test=sp.n_test if sp.n_test is not None else matrix.n_test,
            numpy_loop_images=sp.numpy_loop_images, numpy_epoch_samples=sp.numpy_epoch_samples,
            population=sp.population, population_size=sp.population_size,
            rounds=matrix.timing.rounds, max_seconds=matrix.timing.max_seconds,
            detect_null=sp.detect_null, scan_models=sp.scan_models, scan_steps=sp.scan_steps)
        out.append(Cell(f"speed/{sp.dataset}/{workload}", "speed", config))
    return out


def _poison_cells(matrix: Matrix, po: Poison) -> list[Cell]:
    n_train = po.n_train if po.n_train is not None else matrix.n_train
    n_test = po.n_test if po.n_test is not None else matrix.n_test
    runs = [(sweep, po.model, po.epochs, n_train) for sweep in po.sweeps]
    runs += [("badnets", m, po.epochs if m == po.model else None,
              po.badnets_n_train if po.badnets_n_train is not None else n_train)
             for m in po.badnets_models]
    return [Cell(f"poison/{po.dataset}/{model}/{sweep}/seed{po.seed}", "poison",
                 PoisonSweepConfig(dataset=po.dataset, sweep=sweep, model=model, seed=po.seed,
                                   hidden=po.hidden, epochs=epochs, n_train=n, n_test=n_test))
            for sweep, model, epochs, n in runs]


def _defense_cells(matrix: Matrix, d: Defenses) -> list[Cell]:
    n_train = d.n_train if d.n_train is not None else matrix.n_train
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


def cells(matrix: Matrix) -> tuple[Cell, ...]:
    """Every cell of the matrix, in run order: the grid, E1, E2, E3, speed, poison, detect,
    defenses."""
    out = _grid_cells(matrix)
    if matrix.e1 is not None:
        out += _e1_cells(matrix, matrix.e1)
    if matrix.e2 is not None:
        out += _e2_cells(matrix, matrix.e2)
    if matrix.e3 is not None:
        out += _e3_cells(matrix, matrix.e3)
    if matrix.speed is not None:
        out += _speed_cells(matrix, matrix.speed)
    if matrix.poison is not None:
        out += _poison_cells(matrix, matrix.poison)
    if matrix.detect is not None:
        d = matrix.detect
        for part in DETECT_PARTS:  # detection_bench.PARTS: one cell each
            out.append(Cell(f"detect/{d.dataset}/seed{d.seed}/{part}", "detect",
                            DetectConfig(dataset=d.dataset, quick=d.quick, seed=d.seed,
                                         part=part)))
    if matrix.defenses is not None:
        out += _defense_cells(matrix, matrix.defenses)
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
