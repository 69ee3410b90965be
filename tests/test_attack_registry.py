"""The contract of the attack and defense registries: every entry carries every fact with a
valid value, and every layer (the CLI, the matrix, the defense table, the categorizer)
enumerates it. Driven by `ATTACKS` / `DEFENSES`: adding an entry needs no edit here."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax import attacks
from mlshift_jax.attacks import ATTACKS, DEFENSES, Attack, Defense, defenses, get_attack
from mlshift_jax.attacks._common import BOXES
from mlshift_jax.bench import matrix, report
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.detection import categorize
from mlshift_jax.models.zoo import MLP_CE, Model

ATTACK_NAMES = list(ATTACKS)
DEFENSE_NAMES = list(DEFENSES)
PACKAGE = Path(attacks.__file__).parent
JIT_STATIC_TYPES = (bool, int, str)  # a keyword default of these types is a static option


def _keyword_params(fn) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(fn).parameters.items()
            if p.kind == p.KEYWORD_ONLY}


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_every_attack_has_every_fact(name):
    a = ATTACKS[name]
    assert isinstance(a, Attack) and a.name == name and get_attack(name) is a
    assert callable(a.fn)
    assert list(inspect.signature(a.fn).parameters)[:4] == ["model", "params", "x", "y"]
    kw = _keyword_params(a.fn)
    assert {"eps", "key", "lo", "hi"} <= set(kw), name  # the one attack signature
    assert isinstance(a.label, str) and a.label.strip()
    assert isinstance(a.source, str) and len(a.source) > 10  # a paper, not a placeholder
    assert a.category in categorize.CATEGORIES
    assert a.box in BOXES
    for flag in (a.needs_key, a.targeted, a.uses_gradient, a.surrogate, a.linf_bounded):
        assert isinstance(flag, bool)
    assert isinstance(a.min_classes, int) and a.min_classes >= 2
    # the static options are keyword options of fn, and every int/bool/str option is static
    assert isinstance(a.static, tuple) and set(a.static) <= set(kw), name
    assert {n for n, p in kw.items() if type(p.default) in JIT_STATIC_TYPES} <= set(a.static)
    assert a.targeted == ("target" in kw)
    assert a.surrogate == ("source_params" in kw)
    # the facts agree with each other
    if a.uses_gradient:
        assert a.box in ("white", "ensemble") and a.category == "adversarial-input"
    if a.box == "none":
        assert a.category in ("none", "input-noise") and not a.uses_gradient


def test_labels_are_unique():
    labels = [a.label for a in ATTACKS.values()]
    assert len(set(labels)) == len(labels)


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_attack_without_a_needed_key_is_refused(name):
    a = ATTACKS[name]
    if not a.needs_key:
        return
    x = jnp.full((2, 784), 0.5)
    y = jnp.zeros(2, jnp.int32)
    params = MLP_CE.init(jax.random.key(0))
    kw = {"target": 1} if a.targeted else {}
    with pytest.raises(ConfigError, match="key"):
        a.fn(MLP_CE, params, x, y, eps=0.1, **kw)


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_every_attack_is_categorized_by_its_record(name):
    assert categorize.category_of(name) == ATTACKS[name].category


def test_every_attack_is_a_cli_choice(monkeypatch):
    from mlshift_jax import cli

    monkeypatch.setenv("COLUMNS", "10000")  # `mlshift attack --help` on one line per option
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    attack_cmd = sub.choices["attack"]
    action = next(a for a in attack_cmd._actions if a.dest == "attack")
    assert set(action.choices) == set(ATTACKS)
    assert all(name in attack_cmd.format_help() for name in ATTACKS)


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_every_attack_runs_in_the_matrix_grid(name):
    text = f"""
[matrix]
datasets = ["mnist"]
models = ["seed-mlp"]
attacks = ["{name}"]
eps = [0.1]
hidden = 16
n_train = 100
n_test = 20
"""
    cells = [c for c in matrix.cells(matrix.parse(text, "one.toml")) if c.kind == "attack"]
    assert [c.config.attack for c in cells] == [name]


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_defense_table_columns(name):
    """Every untargeted attack may be a column of the defense table (titled by its label);
    a targeted one may not (the table gives no target)."""
    a = ATTACKS[name]
    text = f"""
[matrix]
datasets = ["mnist"]
models = ["mlp-ce"]
attacks = ["none"]
eps = [0.1]

[defenses]
models = ["mlp-ce"]
defenses = ["none"]
attacks = ["{name}"]
eps = [0.1]
"""
    if a.targeted:
        assert name not in matrix.defense_columns()
        with pytest.raises(ConfigError, match=name):
            matrix.parse(text, "d.toml")
        return
    assert name in matrix.defense_columns()
    cells = [c for c in matrix.cells(matrix.parse(text, "d.toml")) if c.kind == "defense"]
    assert cells and all(c.config.attacks == (name,) for c in cells)
    assert report.column_title(name) == a.label


def test_default_defense_columns_are_allowed():
    assert set(matrix.DEFENSE_COLUMNS) <= matrix.defense_columns()


def test_obfuscation_flag_reads_the_boxes():
    """black-box attacks that beat the untargeted white-box ones raise the flag, by record."""
    from mlshift_jax.attacks import obfuscation

    white = [a for a in ATTACKS.values() if a.box == "white" and not a.targeted]
    black = [a for a in ATTACKS.values() if a.box == "black"]
    assert white and black
    acc = {(a.name, 0.1): 0.9 for a in white} | {(b.name, 0.1): 0.5 for b in black}
    raised = obfuscation.flags(acc, n=10_000)
    assert {line.split()[1] for line in raised} == {b.name for b in black}


# --- no import-time registration, no cycles, no private names across modules ----------------


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py"))}


def _sibling_imports(tree: ast.Module) -> set[tuple[str, str]]:
    """(module, name) for every `from mlshift_jax.attacks[.module] import name`."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "mlshift_jax.attacks":
                out |= {(alias.name, "") for alias in node.names}
            elif node.module.startswith("mlshift_jax.attacks."):
                mod = node.module.rsplit(".", 1)[1]
                out |= {(mod, alias.name) for alias in node.names}
    return out


def test_attack_modules_import_no_private_sibling_name():
    modules = _modules()
    for name, tree in modules.items():
        for mod, imported in _sibling_imports(tree):
            if mod != "_common":
                assert not imported.startswith("_"), f"{name} imports {mod}.{imported}"
        for node in ast.walk(tree):  # sibling._private attribute use
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in modules and node.attr.startswith("_")):
                pytest.fail(f"{name} uses {node.value.id}.{node.attr}")


def test_no_import_cycle_inside_attacks():
    modules = _modules()
    graph = {}
    for name, tree in modules.items():
        deps = set()
        for mod, imported in _sibling_imports(tree):
            if mod in modules:  # from mlshift_jax.attacks.mod import ...
                deps.add(mod)
            elif imported == "":  # from mlshift_jax.attacks import mod_or_name
                deps.add(mod if mod in modules else "__init__")
        graph[name] = deps - {name}
    done, path = set(), []

    def visit(n):
        if n in path:
            pytest.fail(f"import cycle: {' -> '.join([*path[path.index(n):], n])}")
        if n not in done:
            path.append(n)
            for d in sorted(graph.get(n, ())):
                visit(d)
            path.pop()
            done.add(n)

    for n in sorted(graph):
        visit(n)


def test_registry_is_the_union_of_the_modules_records():
    """Each attack module exports RECORDS; __init__ assembles them, nothing registers itself."""
    import importlib

    records = []
    for name in _modules():
        mod = importlib.import_module(f"mlshift_jax.attacks.{name}")
        if name != "__init__" and hasattr(mod, "RECORDS"):
            assert isinstance(mod.RECORDS, tuple)
            assert all(isinstance(r, Attack) for r in mod.RECORDS)
            records += list(mod.RECORDS)
    assert sorted(r.name for r in records) == sorted(ATTACKS)
    assert all(ATTACKS[r.name] is r for r in records)


# --- defenses --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DEFENSE_NAMES)
def test_every_defense_has_every_fact(name):
    d = DEFENSES[name]
    assert isinstance(d, Defense) and d.name == name
    assert d.kind in ("preprocess", "training")
    assert isinstance(d.about, str) and d.about.strip()
    assert d.adaptive in ATTACKS and not ATTACKS[d.adaptive].targeted
    assert d.adaptive in matrix.defense_columns()
    assert all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in d.defaults)
    assert d.needs_state == (d.fit is not None)
    assert callable(d.check)
    if d.kind == "training":
        assert d.make_pre is None and not d.pre_stochastic
    if d.make_pre is None:
        assert not d.pre_stochastic
    assert defenses.resolve_options(name) == tuple(sorted(d.defaults))


@pytest.mark.parametrize("name", DEFENSE_NAMES)
def test_every_defense_builds(name):
    d = DEFENSES[name]
    x = np.full((200, 784), 0.5, np.float32)
    small = {"steps": 2, "hidden": 8} if d.needs_state else {}
    state = defenses.fit_state(name, MLP_CE, x, key=jax.random.key(0), **small)
    assert (state is None) == (not d.needs_state)
    built = defenses.build(name, MLP_CE, state=state, **small)
    assert isinstance(built, Model)
    assert built is defenses.build(name, MLP_CE, state=state, **small)  # cached
    info = defenses.info(built)
    if d.make_pre is None and d.kind != "training":
        assert built is MLP_CE and info is None
        return
    assert info.defense == name and info.base is MLP_CE
    assert (info.pre is None) == (d.make_pre is None)
    assert built.stochastic == d.pre_stochastic
    assert defenses.base_of(built) is MLP_CE


def test_defense_checks_its_own_options():
    for name, d in DEFENSES.items():
        for key, _ in d.defaults:
            with pytest.raises(ConfigError, match=key):
                defenses.resolve_options(name, {key: -1})
        with pytest.raises(ConfigError, match="unknown option"):
            defenses.resolve_options(name, {"no-such-option": 1})
