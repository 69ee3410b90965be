"""The experiment matrix: parsing, checking, expansion into cells, and config hashes."""

from __future__ import annotations

import dataclasses

import pytest

from mlshift_jax.bench import matrix
from mlshift_jax.bench.cells import TINY_TRAIN
from mlshift_jax.bench.runner import DEFAULT_MATRIX, QUICK_MATRIX
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.core.files import HASH_LEN, config_hash
from tests.test_runner import TINY


def _parse(text: str = TINY) -> matrix.Matrix:
    return matrix.parse(text, "tiny.toml")


@pytest.mark.parametrize("path", [DEFAULT_MATRIX, QUICK_MATRIX], ids=["full", "quick"])
def test_bench_matrices_parse(path):
    m = matrix.load(path)
    cells = matrix.cells(m)
    ids = [c.id for c in cells]
    assert len(ids) == len(set(ids))
    assert "mnist/seed-mlp/fgsm/0.1/seed0" in ids
    assert "mnist/seed-mlp/none/0/seed0" in ids
    assert {c.kind for c in cells} == {"attack", "stability", "speed", "poison", "detect",
                                       "defense"}
    assert {c.block for c in cells} == {"matrix", "e1", "e2", "e3", "speed", "poison", "detect",
                                        "defenses"}


def test_full_matrix_has_the_issue_grid():
    m = matrix.load(DEFAULT_MATRIX)
    assert m.datasets == ("mnist", "fashion-mnist")
    assert set(m.models) == {"seed-mlp-numpy", "seed-mlp", "mlp-sgd", "mlp-ce", "cnn"}
    assert m.attacks == ("none", "noise-sign", "fgsm", "pgd")
    assert m.eps == (0.1, 0.2, 0.3) and m.seeds == (0,)
    assert m.block("e3").n_test == (10_000, 6_000) and m.block("e3").eps == (0.0, 0.1, 0.2, 0.3)
    assert (m.block("e2").samples, m.block("e2").size) == (10, 10_000)
    e1 = [c for c in matrix.cells(m) if c.block == "e1"]
    assert {c.config.train.model for c in e1} == {"seed-mlp", "seed-mlp-numpy"}
    assert all((c.config.train.hidden, c.config.train.lr, c.config.train.epochs) == (200, 0.1, 1)
               for c in e1)


def test_quick_matrix_is_capped():
    m = matrix.load(QUICK_MATRIX)
    assert m.models == ("seed-mlp-numpy", "seed-mlp", "mlp-ce")
    assert (m.n_train, m.n_test) == (5000, 1000)


def test_expansion_none_runs_at_eps_zero_only():
    cells = matrix.cells(_parse())
    assert [c.id for c in cells] == [
        "mnist/seed-mlp/none/0/seed0",
        "mnist/seed-mlp/fgsm/0.1/seed0",
        "mnist/seed-mlp/fgsm/0.2/seed0",
    ]
    spec = cells[0].config.train
    assert (spec.hidden, spec.lr, spec.epochs, spec.n_train) == (16, 0.1, 1, 500)
    assert cells[0].config.n_test == 200 and cells[0].config.rounds == 2


def test_recipe_defaults_are_resolved_into_the_spec():
    m = _parse(TINY.replace('["seed-mlp"]', '["mlp-sgd"]'))
    spec = matrix.cells(m)[0].config.train
    assert (spec.optimizer, spec.lr, spec.batch_size, spec.epochs) == ("sgd", 1.0, 16, 5)


def test_train_overrides_and_attack_options():
    m = _parse(TINY + "\n[train.seed-mlp]\nlr = 0.05\nepochs = 2\n")
    spec = matrix.cells(m)[0].config.train
    assert (spec.lr, spec.epochs) == (0.05, 2)
    m = _parse(TINY.replace('"fgsm"]', '"pgd"]') + "\n[attack_options.pgd]\nsteps = 3\n")
    pgd = [c for c in matrix.cells(m) if c.config.attack == "pgd"]
    assert pgd and all(c.config.options == (("steps", 3),) for c in pgd)


# --- errors name the file and the key --------------------------------------------------------

BAD = [
    (TINY.replace('["seed-mlp"]', '["resnet"]'), "[matrix].models", "resnet"),
    (TINY.replace('"fgsm"]', '"deepfool"]'), "[matrix].attacks", "deepfool"),
    (TINY.replace('["mnist"]', '["cifar10"]'), "[matrix].datasets", "cifar10"),
    (TINY.replace("[0.1, 0.2]", "[0.1, -0.2]"), "[matrix].eps", "-0.2"),
    (TINY.replace("hidden = 16", "hiden = 16"), "[matrix].hiden", "unknown key"),
    (TINY + "\n[extra]\nx = 1\n", "top level.extra", "unknown key"),
    (TINY.replace("rounds = 2", "rounds = 0"), "[timing].rounds", "1..10_000"),
    (TINY.replace("hidden = 16", "hidden = 16\nseeds = [-1]"), "[matrix].seeds", "-1"),
    (TINY.replace("hidden = 16", "hidden = 16\nseeds = [18446744073709551615]"),
     "[matrix].seeds", "18446744073709551615"),
    (TINY.replace("hidden = 16", "hidden = 16\nseeds = [2147483648]"), "[matrix].seeds",
     "2147483648"),
    (TINY.replace("hidden = 16", "hidden = 16\nseeds = [1.5]"), "[matrix].seeds", "1.5"),
    (TINY.replace("hidden = 16", "hidden = 0"), "[matrix].hidden", "found 0"),
    (TINY + "\n[train.seed-mlp]\nepochs = 99999999999\n", "[train.seed-mlp].epochs",
     "99999999999"),
    (TINY + "\n[train.seed-mlp]\nlr = inf\n", "[train.seed-mlp].lr", "inf"),
    (TINY + "\n[train.seed-mlp]\nlr = nan\n", "[train.seed-mlp].lr", "nan"),
    (TINY + "\n[e2]\nsamples = 0\n", "[e2].samples", "found 0"),
    (TINY.replace("rounds = 2", "round = 2"), "[timing].round", "unknown key"),
    (TINY + "\n[e3]\nmodel = \"seed-mlp\"\nepsilon = [0.1]\n", "[e3].epsilon", "unknown key"),
    (TINY + "\n[e3]\neps = [-1.0]\n", "[e3].eps", "-1.0"),
    (TINY + "\n[e1]\nmodels = [\"nope\"]\n", "[e1].models", "nope"),
    (TINY + "\n[speed]\nworkloads = [\"warp\"]\n", "[speed].workloads", "warp"),
    (TINY + "\n[train.seed-mlp]\nlearning_rate = 0.1\n", "[train.seed-mlp].learning_rate",
     "unknown key"),
    (TINY + "\n[train.seed-mlp]\noptimizer = \"lion\"\n", "[train.seed-mlp].optimizer", "lion"),
    (TINY + "\n[train.nope]\nlr = 0.1\n", "[train].nope", "unknown key"),
    (TINY + "\n[attack_options.pgd]\nsteps = 3\nstride = 2\n", "[attack_options.pgd].stride",
     "unknown key"),
    (TINY.replace("[matrix]", "[matrixx]"), "top level", "unknown key"),
    (TINY.replace('datasets = ["mnist"]\n', ""), "[matrix].datasets", "required"),
    (TINY.replace("eps = [0.1, 0.2]", "eps = []"), "[matrix].eps", "non-empty"),
    (TINY.replace("eps = [0.1, 0.2]", "eps = [0.1, 0.1]"), "[matrix].eps", "0.1 twice"),
    (TINY.replace("eps = [0.1, 0.2]", "eps = [0.1, 2e6]"), "[matrix].eps", "2000000.0"),
    (TINY.replace('attacks = ["none", "fgsm"]', 'attacks = ["none", "fgsm"]\nseeds = [0, 0]'),
     None, None),  # repeated cells
    (TINY + "\n[matrix2\n", "not valid TOML", ""),
]


@pytest.mark.parametrize("text,key,found", BAD)
def test_bad_matrix_raises_config_error_naming_file_and_key(text, key, found):
    if key is None:
        with pytest.raises(ConfigError, match="cell ids repeat"):
            _parse(text)
        return
    with pytest.raises(ConfigError) as info:
        _parse(text)
    message = str(info.value)
    assert message.startswith("tiny.toml: ")
    assert key in message and found in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml"):
        matrix.load(tmp_path / "nope.toml")


# --- hashes --------------------------------------------------------------------------------


def test_same_config_same_hash():
    a, b = matrix.cells(_parse()), matrix.cells(_parse())
    assert [c.hash for c in a] == [c.hash for c in b]
    assert len({c.hash for c in a}) == len(a)
    assert all(len(c.hash) == HASH_LEN for c in a)
    # the hash is of the config, not of the block or id: equal work shares one cache entry
    cell = a[0]
    assert dataclasses.replace(cell, id="other", block="e1").hash == cell.hash


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return value + (("steps", 2),)
    return 7  # None


def test_any_field_change_changes_the_hash():
    cell = matrix.cells(_parse())[1]
    config, spec = cell.config, cell.config.train
    for f in dataclasses.fields(spec):
        changed = dataclasses.replace(spec, **{f.name: _changed(getattr(spec, f.name))})
        assert changed.hash != spec.hash, f.name
        other = dataclasses.replace(cell, config=dataclasses.replace(config, train=changed))
        assert other.hash != cell.hash, f.name
    for f in dataclasses.fields(config):
        if f.name == "train":
            continue
        other = dataclasses.replace(
            cell, config=dataclasses.replace(config, **{f.name: _changed(getattr(config,
                                                                               f.name))}))
        assert other.hash != cell.hash, f.name


def test_config_hash_is_canonical():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_select_by_pattern_or_substring():
    cells = matrix.cells(_parse())
    assert [c.id for c in matrix.select(cells, "mnist/seed-mlp/fgsm/*")] == [
        "mnist/seed-mlp/fgsm/0.1/seed0", "mnist/seed-mlp/fgsm/0.2/seed0"]
    assert [c.id for c in matrix.select(cells, "/none/")] == ["mnist/seed-mlp/none/0/seed0"]
    assert matrix.select(cells, None) == cells
    assert matrix.select(cells, "cifar*") == ()


def test_poison_block_expands_to_one_cell_per_sweep_and_badnets_model():
    text = """
[matrix]
datasets = ["mnist"]
models = ["seed-mlp"]
attacks = ["none"]
eps = [0.1]

[poison]
sweeps = ["E4", "E7"]
badnets_models = ["seed-mlp", "cnn"]
badnets_n_train = 2000
"""
    cells = [c for c in matrix.cells(matrix.parse(text)) if c.kind == "poison"]
    assert [c.id for c in cells] == ["poison/mnist/seed-mlp/E4/seed0",
                                     "poison/mnist/seed-mlp/E7/seed0",
                                     "poison/mnist/seed-mlp/badnets/seed0",
                                     "poison/mnist/cnn/badnets/seed0"]
    assert cells[-1].config.n_train == 2000 and cells[0].config.n_train is None
    with pytest.raises(ConfigError, match=r"\[poison\].sweeps.*E9"):
        matrix.parse(text.replace('"E7"', '"E9"'))


def test_detect_block_is_one_cell_and_checks_its_types():
    text = """
[matrix]
datasets = ["mnist"]
models = ["seed-mlp"]
attacks = ["none"]
eps = [0.1]

[detect]
quick = true
"""
    cell = [c for c in matrix.cells(matrix.parse(text)) if c.kind == "detect"]
    assert [c.id for c in cell] == ["detect/mnist/seed0/detectors",
                                    "detect/mnist/seed0/scan-model",
                                    "detect/mnist/seed0/categorizer-lofo"]
    assert [c.config.part for c in cell] == ["detectors", "scan-model", "categorizer-lofo"]
    assert all(c.config.quick is True for c in cell)
    assert len({c.hash for c in cell}) == 3  # cached apart
    with pytest.raises(ConfigError, match=r"\[detect\].quick: expected true or false"):
        matrix.parse(text.replace("quick = true", 'quick = "yes"'))


def test_targeted_attacks_may_set_their_target():
    text = """
[matrix]
datasets = ["mnist"]
models = ["seed-mlp"]
attacks = ["fgsm-targeted"]
eps = [0.1]

[attack_options.fgsm-targeted]
target = 5
"""
    cell = matrix.cells(matrix.parse(text))[0]
    assert dict(cell.config.options) == {"target": 5}


def test_tiny_keeps_every_cell_of_the_full_matrix_at_a_smoke_tests_size():
    """`bench --tiny` (scripts/bench_gpu.sh --dry-run): the same cells, block by block and
    part by part, every size capped."""

    full = matrix.load(DEFAULT_MATRIX)
    small = matrix.tiny(full)
    before, after = matrix.cells(full), matrix.cells(small)
    assert [(c.kind, c.block) for c in before] == [(c.kind, c.block) for c in after]
    assert len({c.id for c in after}) == len(after)
    assert not {c.hash for c in before} & {c.hash for c in after}  # caches never mix
    for cell in after:
        cfg = cell.config
        for name in ("n_train", "n_test"):
            value = getattr(cfg, name, None)
            if isinstance(value, int):
                assert value <= TINY_TRAIN, (cell.id, name, value)
        spec = getattr(cfg, "train", None)
        if spec is not None and spec.n_train is not None:
            assert spec.n_train <= TINY_TRAIN
    assert small.timing.rounds == 1 and small.block("detect").quick
    assert small.block("defenses").n_test <= 50 and small.block("speed").population == 2


def test_with_dataset_moves_every_block_the_defenses_included():
    """`bench --dataset X`: no block stays on the matrix's own dataset (the defense cells
    once ran on the MNIST sample and landed, unlabelled, in X's report)."""

    full = matrix.load(DEFAULT_MATRIX)
    moved = matrix.with_dataset(full, "/some/where/tiny.npz")
    kinds = {c.kind for c in matrix.cells(moved)}
    assert {"attack", "stability", "speed", "poison", "detect", "defense"} <= kinds
    # a path is named by its stem (no machine path in a cell id) and loaded from the path
    assert {c.config.dataset for c in matrix.cells(moved)} == {"tiny"}
    assert not any("/some/where" in c.id for c in matrix.cells(moved))
    assert dict(dict(moved.sources)["tiny"])["path"] == "/some/where/tiny.npz"
    assert matrix.with_dataset(full, "mnist").sources == full.sources
    with pytest.raises(ConfigError, match="other than the built-ins"):
        matrix.with_dataset(full, "/data/mnist.npz")


def test_sample_tables_replace_a_blocks_keys_only_on_the_bundled_sample():
    full = matrix.load(DEFAULT_MATRIX)
    by_id = {c.id: c for c in matrix.cells(full)}
    on = matrix.on_sample(full, ["mnist"])
    changed = {c.id for c in matrix.cells(on) if c.hash != by_id[c.id].hash}
    assert changed and {c.split("/")[0] for c in changed} == {"defense", "detect", "speed"}
    defense = [c for c in matrix.cells(on) if c.kind == "defense"]
    assert {c.config.n_test for c in defense} == {100}
    assert {c.config.train.model for c in defense} == {"mlp-ce"}
    assert {c.id for c in matrix.cells(on)} <= set(by_id)  # no new cell, some other settings
    off = matrix.on_sample(full, ["fashion-mnist"])  # no block of the file runs on it
    assert [c.hash for c in matrix.cells(off)] == [c.hash for c in matrix.cells(full)]
    # --tiny is already smaller: the sample tables do not undo it
    tiny = matrix.tiny(full)
    assert matrix.on_sample(tiny, ["mnist"]) == tiny


@pytest.mark.parametrize("table, key", [
    ("[sample.defenses]\nn_test = 0\n", "[sample.defenses].n_test"),
    ("[sample.defenses]\ndataset = 'mnist'\n", "[sample.defenses].dataset"),
    ("[sample.defenses]\nnope = 1\n", "[sample.defenses].nope"),
    ("[sample.nope]\nx = 1\n", "[sample].nope"),
    ("[sample.defenses]\n", "[sample.defenses]"),  # nothing to replace
])
def test_bad_sample_table_names_its_key(table, key):
    text = open(DEFAULT_MATRIX).read().split("[sample.defenses]")[0] + table
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace(".", r"\.")):
        matrix.parse(text, "full.toml")
