"""The package's layers import one way: core < data < poisoning < models < attacks <
detection < bench < (api, cli). A module may import its own subpackage and the ones below it,
never one above (checked on every import statement, lazy ones inside functions included)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mlshift_jax"
LAYERS = ["core", "data", "poisoning", "models", "attacks", "detection", "bench"]
TOP = len(LAYERS)  # api.py, cli.py, __init__.py, __main__.py


def layer_of(dotted: str) -> int | None:
    """The layer of module `mlshift_jax.<sub>...`, TOP for the top-level modules, None outside."""
    parts = dotted.split(".")
    if parts[0] != "mlshift_jax":
        return None
    if len(parts) == 1:
        return TOP
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else TOP


def is_module(dotted: str) -> bool:
    """Whether `mlshift_jax.a.b` names a module or subpackage of this package."""
    path = PKG.joinpath(*dotted.split(".")[1:])
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imported(tree: ast.AST) -> list[str]:
    """Every mlshift_jax module an AST imports, by absolute name (also `from X import sub`)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names
                    if is_module(f"{node.module}.{a.name}")]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant):
                out.append(node.args[0].value)
    return [m for m in out if m.startswith("mlshift_jax")]


MODULES = sorted(p for p in PKG.rglob("*.py"))


def test_every_subpackage_is_a_layer():
    subs = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert subs == set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path):
    rel = path.relative_to(PKG).with_suffix("")
    own = layer_of(".".join(("mlshift_jax", *rel.parts)))
    up = [m for m in imported(ast.parse(path.read_text()))
          if m != "mlshift_jax" and layer_of(m) > own]
    assert not up, f"{rel} (layer {LAYERS[own] if own < TOP else 'top'}) imports above: {up}"


def test_the_package_finds_its_files_inside_itself():
    """No path resolves relative to the checkout: the default matrices are package data, the
    default results folder is under the working folder."""
    from mlshift_jax.bench import report, runner

    for matrix in (runner.DEFAULT_MATRIX, runner.QUICK_MATRIX):
        assert matrix.is_file() and PKG.resolve() in matrix.resolve().parents
    assert report.default_out_dir() == Path("results") / report.platform_name()
    pyproject = (PKG.parent / "pyproject.toml").read_text()
    assert '"mlshift_jax.bench" = ["matrices/*.toml"]' in pyproject


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(("mlshift_jax", *parts))


def edges(path: Path) -> set[str]:
    """The modules of its own subpackage that the module at `path` imports.

    Every import counts, at module level or deferred inside a function: a deferred import
    is still a dependency (it runs as soon as the function does), and hiding a cycle in a
    function is what made `recipes` <-> `usermodels` <-> `weights` one knot. `from
    mlshift_jax.models import zoo` is an edge to `models.zoo`, not to the package's
    `__init__` (Python imports the submodule itself); a subpackage's `__init__` may
    re-export its modules, so edges into an `__init__` (a name imported from the package)
    are kept, and a module that does so while the `__init__` imports it is a cycle."""
    name = module_name(path)
    sub = name.split(".")[:2]
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names
                    if is_module(f"{node.module}.{a.name}")]
            out |= set(subs)
            if len(subs) < len(node.names):  # a name, not only submodules
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant):
                out.add(node.args[0].value)
    return {m for m in out if m.split(".")[:2] == sub and len(sub) == 2 and m != name}


def test_no_import_cycle_inside_a_subpackage():
    graph = {module_name(p): edges(p) for p in MODULES}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, set())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.slow
def test_an_installed_package_runs_the_bench_from_any_folder(tmp_path):
    """`pip install .` (not editable), then `mlshift bench --quick` in another folder: the
    matrix comes from the installed package, the results land under that folder."""
    import os
    import shutil
    import subprocess
    import sys

    pytest.importorskip("setuptools")  # the build backend, offline (--no-build-isolation)
    pytest.importorskip("wheel")  # setuptools < 70.1 builds wheels with it (the dev extra)
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(PKG, src / "mlshift_jax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PKG.parent / name, src / name)
    site, work = tmp_path / "site", tmp_path / "work"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(site), str(src)],
                   check=True, cwd=tmp_path, timeout=300)
    assert (site / "mlshift_jax" / "bench" / "matrices" / "quick.toml").is_file()
    env = {**os.environ, "PYTHONPATH": str(site), "MLSHIFT_NO_COMPILE_CACHE": "1"}
    done = subprocess.run([sys.executable, "-m", "mlshift_jax", "bench", "--quick", "--only",
                           "mnist/seed-mlp/fgsm/0.1/seed0"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(site / "mlshift_jax" / "bench" / "matrices" / "quick.toml") in done.stderr
    cells = list((work / "results").glob("*/.cache/cells/*.json"))
    assert cells, sorted(p.relative_to(work) for p in work.rglob("*"))  # the cells it ran
    assert {p.name for p in work.iterdir()} == {"results"}
