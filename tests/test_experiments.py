"""The bench's experiments (`bench.experiments`): the Experiment contract (every record has
every fact, its block parses, its cells are its Config's, it contributes sections to
tables.md), adding one takes one record, and the hashes of committed matrices' cells stay put
(cached cells are keyed by them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest

from mlshift_jax.bench import matrix, report, runner
from mlshift_jax.bench.cells import Cell, Experiment, ReportContext
from mlshift_jax.bench.experiments import BY_BLOCK, EXPERIMENTS
from mlshift_jax.bench.experiments import speed as speed_exp
from mlshift_jax.core.errors import ConfigError
from tests.test_report import _records
from tests.test_runner import TINY

# one cell of each block of each committed matrix (quick: computed on main at 2a0a46e, before
# the bench was sliced by experiment; full: re-pinned when its [timing] and [defenses] n_test
# changed on purpose); a cached cell is found by its hash, so a refactor must not move them
PINNED = {
    "full": {
        "mnist/seed-mlp-numpy/none/0/seed0": "0c176a3627d3",
        "e1/mnist/seed-mlp/none/0/seed0": "fe5f65880abe",
        "e2/mnist/seed-mlp/stability/seed0": "4eb3e7c7646c",
        "e3/n10000/mnist/seed-mlp/fgsm/0/seed0": "1ca8552070a2",
        "speed/mnist/fgsm": "0f7b83a01b5a",  # re-pinned: [speed] detect_null 24 -> 16
        "poison/mnist/seed-mlp/E4/seed0": "4b92f7257742",
        "detect/mnist/seed0/detectors": "e5c88272714b",
        "defense/mnist/seed-mlp/none/seed0": "d86e2f400493",
    },
    "quick": {
        "mnist/seed-mlp-numpy/none/0/seed0": "d7ffcd6d2012",
        "e1/mnist/seed-mlp/none/0/seed0": "44e0a1ab786b",
        "e2/mnist/seed-mlp/stability/seed0": "785c3c47560a",
        "e3/n1000/mnist/seed-mlp/fgsm/0/seed0": "aca26d7c1f0e",
        "speed/mnist/fgsm": "0917419c57d6",
        "poison/mnist/seed-mlp/E4/seed0": "1f79dd2e51e5",
        "detect/mnist/seed0/detectors": "a30e8a594219",
        "defense/mnist/mlp-ce/none/seed0": "2e6e260959cc",
    },
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_committed_matrices_keep_their_cell_hashes(name):
    path = {"full": runner.DEFAULT_MATRIX, "quick": runner.QUICK_MATRIX}[name]
    hashes = {c.id: c.hash for c in matrix.cells(matrix.load(path))}
    assert {i: hashes.get(i) for i in PINNED[name]} == PINNED[name]


# --- the contract ------------------------------------------------------------------------------

IDS = [e.block for e in EXPERIMENTS]


def test_blocks_and_places_are_distinct():
    assert len(set(IDS)) == len(IDS) == len(BY_BLOCK)
    assert len({e.place for e in EXPERIMENTS}) == len(EXPERIMENTS)
    assert EXPERIMENTS[0].block == "matrix" and EXPERIMENTS[0].Block is None  # the grid


@pytest.mark.parametrize("e", EXPERIMENTS, ids=IDS)
def test_every_experiment_has_every_fact(e):
    assert isinstance(e, Experiment)
    for f in dataclasses.fields(Experiment):
        value = getattr(e, f.name)
        if f.name in ("Block", "schema") and e.block == "matrix":
            assert value is None
        elif f.name == "block":
            assert isinstance(value, str) and value
        elif f.name == "place":
            assert isinstance(value, int)
        elif f.name in ("Block", "Config"):
            assert dataclasses.is_dataclass(value) and value.__dataclass_params__.frozen
        else:
            assert callable(value), f.name
    assert isinstance(e.Config.kind, str) and e.Config.kind


@pytest.mark.parametrize("e", [e for e in EXPERIMENTS if e.Block is not None],
                         ids=[e.block for e in EXPERIMENTS if e.Block is not None])
def test_block_parses_with_its_defaults_and_yields_its_cells(e):
    """An empty [block] table is the Block's defaults; its cells are the experiment's Config
    and come after the grid's; every key of the schema is a field of the Block and back."""
    m = matrix.parse(TINY + f"\n[{e.block}]\n", "tiny.toml")
    assert m.block(e.block) == e.Block()
    keys = set(e.schema(_parsers()))
    assert keys == {f.name for f in dataclasses.fields(e.Block)}
    mine = [c for c in matrix.cells(m) if c.block == e.block]
    assert mine and all(isinstance(c.config, e.Config) for c in mine)
    assert all(c.kind == e.Config.kind for c in mine)
    tiny = matrix.tiny(m)
    assert isinstance(tiny.block(e.block), e.Block)
    with pytest.raises(ConfigError, match=rf"\[{e.block}\]\.nope: unknown key"):
        matrix.parse(TINY + f"\n[{e.block}]\nnope = 1\n", "tiny.toml")


def _parsers():
    """The Parsers a schema is built from (what matrix.parse hands it)."""
    from mlshift_jax.bench.cells import Checker, Parsers, common_schema

    chk = Checker("t.toml")
    return Parsers(chk, common_schema(chk), *(lambda v, w: v,) * 4)


@pytest.mark.parametrize("e", EXPERIMENTS, ids=IDS)
def test_every_experiment_contributes_sections_to_tables_md(e):
    """Each experiment says its sections, with or without cells in the run (here only the
    grid's); each is a level-2 heading of tables.md and in its contents."""
    records = _records()
    info = {"platform": "test", "date": "d", "git_commit": "c", "backend": "cpu",
            "device_kind": "cpu", "device_count": 1, "cpu_count": 1,
            "versions": {"jax": "0", "numpy": "0"}}
    found = e.section(records, ReportContext(info, {}))
    assert found
    text = report.tables_markdown(records, info)
    for title, body in found:
        assert isinstance(body, str) and body.strip()
        assert f"## {title}\n" in text and f"](#{report.anchor(title)})" in text


def test_speed_workloads_are_one_list():
    assert speed_exp.Speed().workloads == tuple(speed_exp.WORKLOADS)


# --- adding an experiment: one record --------------------------------------------------------


@dataclass(frozen=True)
class ToyConfig:
    kind: ClassVar[str] = "toy"
    dataset: str
    n: int


@dataclass(frozen=True)
class Toy:
    dataset: str = "mnist"
    n: int = 2


def _toy() -> Experiment:
    def cells(m, block):
        return [Cell(f"toy/{block.dataset}/{i}", "toy", ToyConfig(block.dataset, i))
                for i in range(block.n)]

    def section(records, ctx):
        n = len(records[records["kind"] == "toy"]) if len(records) else 0
        return [("Toy: one record", f"{n} toy cells.\n")]

    return Experiment(
        block="toy", Block=Toy, Config=ToyConfig,
        schema=lambda p: {"dataset": p.dataset, "n": p.chk.int_}, cells=cells,
        tiny=lambda b: dataclasses.replace(b, n=1), compute=lambda cell, *a: {"n": 1},
        section=section, place=55, finding=lambda records: "**Toy**: found.")


def test_an_experiment_is_one_record(monkeypatch):
    """A new record in EXPERIMENTS is a block the matrix accepts, cells in run order, the
    runner's dispatch and a section and finding of tables.md: nothing else is edited."""
    toy = _toy()
    monkeypatch.setattr(matrix, "EXPERIMENTS", (*EXPERIMENTS, toy))
    monkeypatch.setattr(report, "PLACED", tuple(sorted((*EXPERIMENTS, toy),
                                                       key=lambda e: e.place)))
    monkeypatch.setitem(BY_BLOCK, "toy", toy)
    m = matrix.parse(TINY + "\n[toy]\nn = 3\n", "tiny.toml")
    cells = matrix.cells(m)
    assert [c.id for c in cells if c.block == "toy"] == ["toy/mnist/0", "toy/mnist/1",
                                                          "toy/mnist/2"]
    assert [c.block for c in matrix.cells(matrix.tiny(m))].count("toy") == 1
    assert runner.BY_BLOCK["toy"].compute(cells[-1]) == {"n": 1}
    text = report.tables_markdown(_records())
    assert "## Toy: one record\n" in text and "- **Toy**: found." in text
    assert text.index("## Detection") < text.index("## Toy") < text.index("## Defenses")
    with pytest.raises(ConfigError, match=r"\[toy\]\.n: expected an integer"):
        matrix.parse(TINY + "\n[toy]\nn = 0\n", "tiny.toml")
