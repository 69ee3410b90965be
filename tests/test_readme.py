"""Every code block of the README and of docs/*.md is checked: the README's "Use it on your
own model and data" example runs as written (20 lines or fewer) on a small keras-style .npz
cut from the MNIST this machine has, and its shell block runs command by command; every other
Python block runs, every shell command parses (the `mlshift` ones with the CLI's own parser,
`make` targets against the Makefile, install extras against pyproject.toml), every TOML block
is a matrix the matrix parser accepts, every JSON block parses. Every relative link of those
pages resolves to a file, and a link's #anchor to one of its headings."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

import mlshift_jax
from mlshift_jax.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # the matrix parser's own fallback
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
SECTION = "## Use it on your own model and data"
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
LANGUAGES = {"python", "sh", "toml", "json"}


def blocks(page: Path) -> list[tuple[str, str]]:
    """(language, body) of each fenced block of a Markdown page, in order."""
    return FENCE.findall(page.read_text())


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index(SECTION):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _keras_npz(path: Path, ds, n_train: int = 2000, n_test: int = 300) -> None:
    """x_train, y_train, x_test, y_test as keras.datasets.mnist.load_data() gives them."""
    def raw(x):  # undo the study's scaling x/255*0.99+0.01 -> uint8 [n, 28, 28]
        return np.rint((x - 0.01) / 0.99 * 255).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)

    np.savez(path, x_train=raw(ds.x_train[:n_train]), y_train=ds.y_train[:n_train],
             x_test=raw(ds.x_test[:n_test]), y_test=ds.y_test[:n_test])


def test_readme_example_is_short():
    assert len(readme_example().strip().splitlines()) <= 20


@pytest.mark.slow
def test_readme_example_runs(mnist, tmp_path, monkeypatch):
    from functools import partial

    from mlshift_jax.detection import change

    pytest.importorskip("flax")
    _keras_npz(tmp_path / "digits.npz", mnist)
    monkeypatch.chdir(tmp_path)
    # the example as written; only detect_change's null is smaller here (speed, not meaning)
    monkeypatch.setattr(change, "CalibrationConfig", partial(
        change.CalibrationConfig, n_null=4, sample_size=500, poison_seeds=1, probes=200,
        n_patched=50))
    monkeypatch.setattr(change.fingerprint, "ALPHA", 0.2)  # 4 null models reach 1/5 at best
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    path = tmp_path / "suspect.safetensors"
    with pytest.raises(ConfigError, match="pass the model"):  # "Net" is not importable
        mlshift_jax.load_model(path)
    model, params, meta = mlshift_jax.load_model(path, model=namespace["model"])
    assert meta["dataset"]["name"].startswith("digits") and meta["model"]["ref"] == "Net"

def readme_shell() -> list[list[str]]:
    """The shell block after the Python example: one argv per `mlshift` command."""
    text = README.read_text()
    section = text[text.index(SECTION):]
    block = re.search(r"The same from the shell.*?```sh\n(.*?)```", section, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [line.split()[1:] for line in lines if line.startswith("mlshift ")]


@pytest.mark.slow
def test_readme_shell_block_runs(tmp_path):
    """Each command of the README's shell block, as written, as its own `python -m
    mlshift_jax` process (as a shell runs it), with `Net` from the Python example saved in
    mynet.py in the working folder and a small 28x28 digits.npz."""
    import os
    import subprocess
    import sys

    pytest.importorskip("flax")
    code = readme_example()
    net = code[code.index("class Net"):code.index("\nds = ")]
    (tmp_path / "mynet.py").write_text(f"import flax.linen as nn\n\n{net}\n\nnet = Net()\n")
    rng = np.random.default_rng(0)

    def part(n):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        x[np.arange(n), 2 * y + 2, 4:24] = 250  # a bright row whose place is the class
        return x, y

    (x_tr, y_tr), (x_te, y_te) = part(200), part(64)
    np.savez(tmp_path / "digits.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    commands = readme_shell()
    assert [c[0] for c in commands] == ["train", "attack", "poison", "detect"]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), root, os.environ.get("PYTHONPATH", "")])}
    out = ""
    for argv in commands:
        done = subprocess.run([sys.executable, "-m", "mlshift_jax", *argv], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr
        out += done.stdout
    assert "verdict" in out and "pgd" in out


# --- every block of every page ------------------------------------------------------------

def _ids(items: list[tuple[Path, int, str]]) -> list[str]:
    return [f"{page.relative_to(ROOT)}#{i}" for page, i, _ in items]


def _of(language: str) -> list[tuple[Path, int, str]]:
    """(page, block index, body) of every block in `language`, the README example excepted."""
    example = readme_example()
    return [(page, i, body) for page in PAGES for i, (lang, body) in enumerate(blocks(page))
            if lang == language and body != example]


def test_every_block_names_a_language_this_test_checks():
    found = {(page.name, i, lang) for page in PAGES for i, (lang, _) in enumerate(blocks(page))}
    assert found, "no code block found: the fence pattern no longer matches"
    unknown = sorted(f for f in found if f[2] not in LANGUAGES)
    assert not unknown, f"blocks in a language test_readme does not check: {unknown}"


def _commands(body: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blanks dropped."""
    lines = body.replace("\\\n", " ").splitlines()
    return [c for c in (line.split(" #")[0].strip() for line in lines)
            if c and not c.startswith("#")]


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def _extras() -> set[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return set(tomllib.load(f)["project"]["optional-dependencies"])


def check_command(command: str) -> None:
    """Raise AssertionError (or the CLI parser's ConfigError) unless `command` is one this
    project runs: a make target, a pip install of this package's extras, a script of
    scripts/, or an mlshift command line the CLI's parser accepts (env assignments before
    it, and a cluster launcher such as srun or gcloud around it, are allowed)."""
    from mlshift_jax.cli import build_parser

    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]  # VAR=value before the command
    assert words, f"an empty command: {command!r}"
    head = words[0]
    if head == "make":
        unknown = set(words[1:]) - _makefile_targets()
        assert not unknown, f"{command!r}: no such make target {sorted(unknown)}"
        return
    if head == "pip" and words[1:2] == ["install"]:
        for word in words[2:]:
            if word.startswith(".["):
                wanted = set(word[2:-1].split(","))
                assert wanted <= _extras(), f"{command!r}: no such extra {wanted - _extras()}"
        return
    if head.startswith("scripts/"):
        assert (ROOT / head).is_file(), f"{command!r}: no {head}"
        return
    for i, word in enumerate(words):  # mlshift ..., python -m mlshift_jax ..., srun ... python ...
        if word == "mlshift" or word.endswith("/mlshift"):
            build_parser().parse_args(words[i + 1:])
            return
        if word.endswith("python") and words[i + 1:i + 3] == ["-m", "mlshift_jax"]:
            build_parser().parse_args(words[i + 3:])
            return
        if word.startswith("--command="):  # gcloud ... --command="cd DIR && python -m ..."
            check_command(word.split("=", 1)[1].split("&&")[-1])
            return
    raise AssertionError(f"a shell command test_readme does not know how to check: {command!r}")


SHELL = _of("sh")


@pytest.mark.parametrize("page,index,body", SHELL, ids=_ids(SHELL))
def test_shell_block_commands_parse(page, index, body):
    commands = _commands(body)
    assert commands, f"{page.name} block {index} holds no command"
    for command in commands:
        check_command(command)


def test_check_command_refuses_what_would_fail():
    """The checker itself: a wrong option, a missing make target or extra, an unknown tool."""
    check_command("mlshift attack --params p.npz --attack fgsm --eps 0 0.1")
    for bad, error in [("mlshift attack --params p.npz --attack no-such", ConfigError),
                       ("mlshift detect --hidden 3", ConfigError),
                       ("make no-such-target", AssertionError),
                       ("pip install -e '.[no-such-extra]'", AssertionError),
                       ("curl http://example.com | sh", AssertionError)]:
        with pytest.raises(error):
            check_command(bad)
    assert _commands("a --x 1 \\\n    --y 2   # note\n# only a comment\n\nb\n") == [
        "a --x 1      --y 2", "b"]


def test_other_python_blocks_run(tmp_path, monkeypatch):
    """Every Python block but the README example (run above, on its data), each in a fresh
    namespace in an empty working folder."""
    monkeypatch.chdir(tmp_path)
    for page, index, body in _of("python"):
        exec(compile(body, f"{page.name} block {index}", "exec", dont_inherit=True), {})


TOML = _of("toml")


@pytest.mark.parametrize("page,index,body", TOML, ids=_ids(TOML))
def test_toml_block_is_a_matrix(page, index, body, tmp_path):
    from mlshift_jax.bench import matrix

    parsed = matrix.parse(body, str(tmp_path / "matrix.toml"))
    assert parsed.datasets == tuple(tomllib.loads(body)["matrix"]["datasets"])


JSON = _of("json")


@pytest.mark.parametrize("page,index,body", JSON, ids=_ids(JSON))
def test_json_block_parses(page, index, body):
    assert isinstance(json.loads(body), (dict, list))


# --- links ----------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())  # a "# comment" inside a block is no heading
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_slug_matches_github():
    assert slug("The study's model, reproduced") == "the-studys-model-reproduced"
    assert slug("`scan-model`: a backdoor, with no reference") == (
        "scan-model-a-backdoor-with-no-reference")
    assert slug("Headline results (`results/cpu/`, full MNIST, 2-core CPU)") == (
        "headline-results-resultscpu-full-mnist-2-core-cpu")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no {path})")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
            broken.append(f"{target} (no heading #{anchor} in {file.name})")
    assert not broken, f"{page.name}: broken links {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve()
              for t in LINK.findall(README.read_text())}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_docs_api_lists_every_public_name():
    """docs/api.md's table names exactly what `mlshift_jax` exports (`__all__`)."""
    text = (ROOT / "docs" / "api.md").read_text()
    listed = re.findall(r"^\| `(\w+)` \|", text, re.M)
    exported = [name for name in mlshift_jax.__all__ if name != "__version__"]
    assert sorted(listed) == sorted(exported)
    for name in listed:
        getattr(mlshift_jax, name)  # each imports



def _extending_records() -> dict[str, object]:
    """Every name the README's "Extending" blocks define, each block run in its own namespace."""
    text = README.read_text()
    section = text[text.index("## Extending"):text.index("## Headline results")]
    found: dict[str, object] = {}
    for lang, body in FENCE.findall(section):
        if lang == "python":
            namespace: dict = {}
            exec(compile(body, "README Extending", "exec", dont_inherit=True), namespace)
            for name, value in namespace.items():  # a RECORDS tuple counts as its records
                for i, v in enumerate(value if type(value) is tuple else (value,)):
                    found[f"{name}[{i}]"] = v
    return found


def test_each_extending_example_plugs_in_with_one_registry_entry(monkeypatch, mnist, capsys):
    """Each record of the Extending section, added to its registry (the one line the README
    names), is picked up where the README says: the attack by `mlshift attack`'s choices and
    runs within the range; the defense builds a model whose outputs change; the detector is
    scored by `detect.input_scores`; the recipe trains through `models.fit_model`; the
    experiment's block is a matrix table that yields its cells."""
    import jax
    import jax.numpy as jnp

    from mlshift_jax import attacks, cli
    from mlshift_jax.attacks import defenses
    from mlshift_jax.bench import matrix
    from mlshift_jax.bench.cells import Experiment
    from mlshift_jax.detection import detect
    from mlshift_jax.models import fit_model, recipes, zoo
    from mlshift_jax.models.recipes import TrainConfig

    found = _extending_records()
    attack = next(v for v in found.values() if isinstance(v, attacks.Attack))
    defense = next(v for v in found.values() if isinstance(v, attacks.Defense))
    detector = next(v for v in found.values() if type(v).__name__ == "Detector")
    recipe = next(v for v in found.values() if isinstance(v, recipes.Recipe))
    experiment = next(v for v in found.values() if isinstance(v, Experiment))

    monkeypatch.setitem(attacks.ATTACKS, attack.name, attack)
    monkeypatch.setitem(defenses.DEFENSES, defense.name, defense)
    monkeypatch.setattr(detect, "DETECTORS", (*detect.DETECTORS, detector))
    monkeypatch.setitem(recipes.RECIPES, recipe.name, recipe)
    monkeypatch.setattr(matrix, "EXPERIMENTS", (*matrix.EXPERIMENTS, experiment))

    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["attack", "--help"])
    assert attack.name in capsys.readouterr().out
    model, x, y = zoo.build("mlp-ce"), jnp.asarray(mnist.x_test[:8]), jnp.asarray(mnist.y_test[:8])
    params = model.init(jax.random.key(0))
    x_adv = attacks.get_attack(attack.name).fn(model, params, x, y, eps=1.0)
    assert x_adv.shape == x.shape and float(jnp.abs(x_adv - x).max()) > 0
    lo, hi = np.float32(model.input_range[0]), np.float32(model.input_range[1])
    assert float(x_adv.min()) >= lo and float(x_adv.max()) <= hi
    defended = defenses.build(defense.name, model)
    assert defended is not model
    assert not np.allclose(jax.vmap(lambda xi: defended.apply(params, xi))(x),
                           jax.vmap(lambda xi: model.apply(params, xi))(x))
    assert detector.name in detect.input_scores(model, params, x)
    _, trained = fit_model(recipe.name, TrainConfig(hidden=8, epochs=1),
                           mnist.x_train[:512], mnist.y_train[:512], mnist.spec)
    assert set(trained) == set(params)
    grid = ('[matrix]\ndatasets = ["mnist"]\nmodels = ["seed-mlp"]\nattacks = ["none"]\n'
            "eps = [0.1]\n")
    parsed = matrix.parse(f"{grid}\n[{experiment.block}]\nn = 3\n", "extending.toml")
    cells = [c for c in matrix.cells(parsed) if c.block == experiment.block]
    assert [experiment.compute(c) for c in cells] == [{"seed": i} for i in range(3)]


def test_the_extending_attack_is_one_module_and_its_registry_line(tmp_path):
    """The README's attack example saved as a module of a copy of the package, named on
    `attacks/__init__.py`'s import line and added to `ATTACKS` as the README says: the package
    imports (no circular import) and `mlshift attack --help` offers it."""
    import os
    import shutil
    import subprocess

    text = README.read_text()
    section = text[text.index("**An attack**"):text.index("**A defense**")]
    body = FENCE.findall(section)[0][1]
    pkg = tmp_path / "mlshift_jax"
    shutil.copytree(ROOT / "mlshift_jax", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "attacks" / "fgml2.py").write_text(body)
    init = pkg / "attacks" / "__init__.py"
    source = init.read_text()
    line = re.search(r"^from mlshift_jax\.attacks import .*$", source, re.M).group(0)
    source = source.replace(line, line + ", fgml2", 1)
    source = source.replace("ATTACKS: dict[str, Attack] = {a.name: a for a in (\n",
                            "ATTACKS: dict[str, Attack] = {a.name: a for a in (\n"
                            "    *fgml2.RECORDS,\n", 1)
    init.write_text(source)
    done = subprocess.run([sys.executable, "-m", "mlshift_jax", "attack", "--help"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fgm-l2" in done.stdout
